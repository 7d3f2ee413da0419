"""The command line as a whole: every failure is one line and a documented status."""

from ctrace import cli as cli_module
from ctrace.status import ExitStatus


def test_an_internal_error_is_one_line_and_status_1(cli, monkeypatch):
    def boom(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli_module.cli, "main", boom)
    status, out, err = cli(["report", "x"])
    assert status == ExitStatus.ERROR and err.count("\n") == 1 and "internal error: ZeroDivisionError" in err


def test_usage_errors_exit_2(cli):
    status, _, err = cli(["report"])
    assert status == ExitStatus.USAGE and "Missing argument" in err
    status, _, err = cli(["no-such-command"])
    assert status == ExitStatus.USAGE


def test_every_live_command_sizes_its_ring_and_picks_its_attach_method(cli, monkeypatch, tmp_path):
    """record, top and export take --ring-pages and --attach-method to the live source;
    a ring size out of range is a usage error."""
    from ctrace.sources import live
    from ctrace.status import CtraceError

    seen = []

    def fake_source(**kw):
        seen.append((kw["ring_pages"], kw["method"]))
        raise CtraceError("no kernel here", ExitStatus.NO_PRIVILEGE)

    monkeypatch.setattr(live, "LiveSource", lambda *a, **kw: fake_source(**kw))
    for args in (["record", "-o", str(tmp_path / "r.ctr")], ["top", "--once"], ["export", "--listen", "127.0.0.1:0"]):
        status, _, err = cli(args + ["--ring-pages", "512", "--attach-method", "kprobe"])
        assert status == ExitStatus.NO_PRIVILEGE and err == "ctrace: no kernel here\n", (args, err)
        cli(args)
        status, _, err = cli(args + ["--ring-pages", "7"])
        assert status == ExitStatus.USAGE and "--ring-pages" in err, (args, err)
    assert seen == [(512, "kprobe"), (4096, None)] * 3
