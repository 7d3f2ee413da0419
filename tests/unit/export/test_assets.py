"""docs/prometheus, docs/grafana, docs/kubernetes: rules pass promtool, every query parses
and names only metrics the exporter serves, the DaemonSet asks for what the docs say."""

import json
import os
import re
import shutil
import subprocess

import pytest

from ctrace.model import ModelOptions
from ctrace.pipeline import fold_file
from ctrace.views.export import families
from ctrace.exporter import server_families, MetricsServer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DOCS = os.path.join(ROOT, "docs")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian's prometheus package) is not installed")
NAME = re.compile(r"\bctrace_[a-z_]+")
# tests/compat/debian11.sh copies only ctrace/, bpf/ and tests/unit/ into its chroot
pytestmark = pytest.mark.skipif(not os.path.isdir(os.path.join(DOCS, "prometheus")), reason="docs/ not in this tree")


@pytest.fixture(scope="module")
def served_names(recordings):
    model, _, end = fold_file(recordings["syn-flood"], ModelOptions())
    server = MetricsServer("127.0.0.1", 0)
    try:
        fams = families(model.snapshot(end)) + server_families(server)
    finally:
        server.close()
    return {f.name for f in fams}


def dashboard_exprs():
    with open(os.path.join(DOCS, "grafana", "ctrace-dashboard.json")) as f:
        dash = json.load(f)
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    return dash, exprs


@needs_promtool
def test_promtool_checks_and_tests_the_rules():
    rules = os.path.join(DOCS, "prometheus", "ctrace-alerts.yml")
    r = subprocess.run([PROMTOOL, "check", "rules", rules], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert r.returncode == 0 and "SUCCESS: 4 rules found" in r.stdout, r.stdout
    r = subprocess.run([PROMTOOL, "test", "rules", "ctrace-alerts.test.yml"], cwd=os.path.join(DOCS, "prometheus"),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout


def test_every_alert_has_a_firing_and_a_quiet_case():
    text = open(os.path.join(DOCS, "prometheus", "ctrace-alerts.test.yml")).read()
    alerts = re.findall(r"^\s+- alert: (\w+)", open(os.path.join(DOCS, "prometheus", "ctrace-alerts.yml")).read(), re.M)
    assert len(alerts) == 4
    for a in alerts:
        blocks = re.findall(rf"alertname: {a}\n\s+exp_alerts:(.*?)(?=\n\s+- eval_time|\n\s+- name|\Z)", text, re.S)
        assert any(b.strip().startswith("[]") for b in blocks), f"{a}: no quiet case"
        assert any("exp_labels" in b for b in blocks), f"{a}: no firing case"


@needs_promtool
def test_dashboard_queries_parse(tmp_path):
    _, exprs = dashboard_exprs()
    rules = "groups:\n  - name: dashboard\n    rules:\n"
    for i, e in enumerate(exprs):
        e = e.replace("$__rate_interval", "5m").replace("$instance", ".*")
        if e.startswith("label_values("):
            e = e[len("label_values("):].split(",")[0]
        rules += f"      - record: dashboard:q{i}\n        expr: {json.dumps(e)}\n"
    (tmp_path / "q.yml").write_text(rules)
    r = subprocess.run([PROMTOOL, "check", "rules", str(tmp_path / "q.yml")], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    assert r.returncode == 0, r.stdout


def test_assets_name_only_served_metrics(served_names):
    _, exprs = dashboard_exprs()
    texts = exprs + [open(os.path.join(DOCS, "prometheus", n)).read() for n in ("ctrace-alerts.yml",)]
    used = {m for t in texts for m in NAME.findall(t)}
    assert used, "no metric names found"
    assert "ctrace_events_lost_total" in used
    assert used <= served_names, used - served_names
    doc = open(os.path.join(DOCS, "EXPORT.md")).read()
    documented = set(NAME.findall(doc))
    assert served_names <= documented, served_names - documented


def test_dashboard_covers_the_issue():
    dash, exprs = dashboard_exprs()
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for word in ("max", "inserts vs expiries", "removals by reason", "top prefixes", "orphans", "lost"):
        assert word in titles, word
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_daemonset_asks_for_exactly_what_the_docs_list():
    y = open(os.path.join(DOCS, "kubernetes", "ctrace-daemonset.yaml")).read()
    caps = re.search(r"add:\n((?:\s+- \w+.*\n)+)", y).group(1)
    added = set(re.findall(r"- (\w+)", caps))
    assert added == {"BPF", "PERFMON", "SYS_ADMIN", "SYS_RESOURCE", "NET_ADMIN", "SYS_PTRACE"}
    assert "drop: [ALL]" in y and "privileged: false" in y and "allowPrivilegeEscalation: false" in y
    assert "0.0.0.0" not in y.split("# ")[0] and "--listen=$(NODE_IP):9737" in y
    readme = open(os.path.join(DOCS, "kubernetes", "README.md")).read()
    for cap in added:
        assert f"CAP_{cap}" in readme, cap
    mounts = set(re.findall(r"mountPath: (\S+?)[,}]", y))
    for m in mounts:
        assert f"`{m}`" in readme, m
