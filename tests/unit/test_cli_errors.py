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
