"""The wheel ships every package and the BPF sources (pyproject lists packages by hand)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_is_listed():
    text = (ROOT / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(ctrace(?:\.[a-z_]+)*)"', re.search(r"packages = \[(.*?)\]", text).group(1)))
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "ctrace").rglob("__init__.py")}
    assert found <= listed, found - listed
    assert '"ctrace.bpf" = "bpf"' in text and '"ctrace.bpf" = ["*.h", "*.c"]' in text
    assert (ROOT / "bpf" / "ctrace.bpf.c").is_file() and (ROOT / "bpf" / "ctrace.h").is_file()


def test_bcc_is_never_a_pip_dependency():
    deps = re.search(r"dependencies = \[(.*?)\]", (ROOT / "pyproject.toml").read_text()).group(1)
    assert "bcc" not in deps.lower()
