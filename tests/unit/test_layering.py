"""Data flows one way: sources -> model -> views. Checked on the import graph."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "ctrace"


def imports(path: Path) -> set:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module == "ctrace":
            out |= {f"ctrace.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def modules():
    for p in PKG.rglob("*.py"):
        yield p.relative_to(PKG).as_posix(), imports(p)


def test_only_the_live_source_imports_bcc():
    users = {name for name, imps in modules() if any(i == "bcc" or i.startswith("bcc.") for i in imps)}
    assert users <= {"sources/live.py"}, users


def test_views_import_only_the_model_layer():
    allowed = {"ctrace.model", "ctrace.abi", "ctrace.columns", "ctrace.keys", "ctrace.grouping", "ctrace.keytable", "ctrace.views.units"}
    for name, imps in modules():
        if name.startswith("views/"):
            ours = {i for i in imps if i.startswith("ctrace")}
            assert ours <= allowed, (name, ours - allowed)


def test_model_is_pure():
    for name in ("model.py", "columns.py", "keys.py", "grouping.py", "keytable.py", "abi.py"):
        imps = dict(modules())[name]
        ours = {i for i in imps if i.startswith("ctrace")}
        assert ours <= {"ctrace.abi", "ctrace.columns", "ctrace.grouping", "ctrace.keys", "ctrace.keytable", "ctrace.sources.base"}, (name, ours)
        assert not imps & {"os", "subprocess", "socket" if name != "keys.py" else "", "click", "bcc"} - {""}, (name, imps)


def test_nothing_imports_the_cli():
    for name, imps in modules():
        if name not in ("cli.py", "__main__.py"):
            assert "ctrace.cli" not in imps, name
