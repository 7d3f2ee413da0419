"""Command line: a thin click layer over the library. `main(argv, env)` returns an
ExitStatus and never raises for user errors; `run()` is the console script."""

import importlib
import sys
from typing import List, Optional

import click

from ctrace import __version__
from ctrace.env import Environment
from ctrace.status import CtraceError, ExitStatus

# Each module under ctrace/commands defines one click command named `command`.
COMMANDS = ("synth", "report", "replay", "top", "probes", "record", "doctor", "export")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ctrace")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """ctrace: trace Linux connection tracking (nf_conntrack) from inside the kernel.

    Who fills the conntrack table, which entries never saw a FIN or RST, how fast
    entries are born versus how fast they expire, and when the table will be full.
    """


for _name in COMMANDS:
    cli.add_command(importlib.import_module(f"ctrace.commands.{_name}").command)


def main(argv: Optional[List[str]] = None, env: Optional[Environment] = None) -> ExitStatus:
    """Run one ctrace command; user errors become one line on stderr and an exit status."""
    env = env or Environment()
    try:
        rv = cli.main(args=argv, prog_name="ctrace", standalone_mode=False, obj=env)
    except CtraceError as exc:
        env.error(str(exc))
        return exc.status
    except click.exceptions.Abort:
        env.error("interrupted")
        return ExitStatus.INTERRUPTED
    except click.exceptions.Exit as exc:
        return ExitStatus(exc.exit_code) if exc.exit_code in ExitStatus._value2member_map_ else ExitStatus.ERROR
    except click.ClickException as exc:
        env.error(exc.format_message())
        return ExitStatus.USAGE
    except KeyboardInterrupt:
        env.error("interrupted")
        return ExitStatus.INTERRUPTED
    except BrokenPipeError:
        return ExitStatus.OK
    except Exception as exc:  # a bug: one line, not a traceback (CTRACE_DEBUG=1 shows it)
        if env.environ.get("CTRACE_DEBUG"):
            raise
        env.error(f"internal error: {type(exc).__name__}: {exc} -- please report it (CTRACE_DEBUG=1 shows where)")
        return ExitStatus.ERROR
    return ExitStatus(rv) if isinstance(rv, int) else ExitStatus.OK


def run() -> None:
    sys.exit(int(main()))
