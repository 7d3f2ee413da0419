"""ctrace export as a command: user errors are one line and an exit status; a replay is served."""

import threading
import time
import urllib.request

import pytest

from tests.unit.conftest import run_cli
from tests.unit.export.conftest import parse_exposition, value


@pytest.mark.parametrize("args, status, text", [
    (["--listen", "localhost:80"], 2, "numeric address"),
    (["--listen", "127.0.0.1:99999"], 2, "port out of range"),
    (["--replay-speed", "slow", "--replay", "x.ctr"], 2, "replay-speed"),
    (["--by", "dport", "--replay", "x.ctr"], 2, "--by src or --by dst"),
    (["--replay", "/nonexistent/x.ctr"], 3, "/nonexistent/x.ctr"),
])
def test_user_errors(args, status, text):
    pytest.importorskip("prometheus_client")
    got, out, err = run_cli(["export"] + args)
    assert got == status, err
    assert err.startswith("ctrace: ") and text in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_help_names_the_defaults(capsys):
    status, _, _ = run_cli(["export", "--help"])
    out = capsys.readouterr().out
    assert status == 0 and "9737]" in out and "--top" in out and "--replay-speed" in out


def test_serves_a_replay_in_process(recordings, tmp_path):
    pytest.importorskip("prometheus_client")
    ready = tmp_path / "ready"
    result = {}

    def scrape_when_ready():
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with urllib.request.urlopen(ready.read_text().strip(), timeout=5) as r:
            result["series"] = parse_exposition(r.read().decode())

    t = threading.Thread(target=scrape_when_ready)
    t.start()
    status, _, err = run_cli(["export", "--replay", recordings["lost-fin"], "--replay-speed", "fast",
                              "--listen", "127.0.0.1:0", "--duration", "2", "--ready-file", str(ready)])
    t.join()
    assert status == 0, err
    assert "serving http://127.0.0.1:" in err and "at most 2538 series" in err
    s = result["series"]
    assert value(s, "ctrace_info", hostname="synthetic-lost-fin", kernel="synthetic", synthetic="true") == 1
    assert value(s, "ctrace_orphans_total", kind="socket-closed") > 0
    assert len(s) <= 2538
