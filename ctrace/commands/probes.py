"""ctrace probes: the attach plan for this kernel (function, method, why)."""

import json

import click

from typing import Optional

from ctrace import kernel
from ctrace.commands.options import attach_method_option
from ctrace.env import Environment
from ctrace.status import ExitStatus


def render(plan: kernel.ProbePlan) -> str:
    lines = [f"kernel {plan.kernel} (attach method {plan.method}): events via {'ring buffer' if plan.ringbuf else 'perf buffer'}, "
             f"clock {'CLOCK_BOOTTIME' if plan.boot_ns else 'CLOCK_MONOTONIC'}"]
    width = max(len(p.function or "-") for p in plan.probes)
    for p in plan.probes:
        req = "*" if p.required else " "
        lines.append(f"{req}{p.name:<11} {p.function or '-':<{width}}  {p.method:<16} {p.why}")
    for n in plan.notes:
        lines.append(f"note: {n}")
    missing = plan.missing_required()
    if missing:
        lines.append("cannot trace: " + ", ".join(p.name for p in missing) + " (required, marked *) absent")
    unmet = plan.unmet()
    if unmet:
        lines.append("cannot use fentry (--attach-method fentry) for: " + ", ".join(p.name for p in unmet))
    return "\n".join(lines) + "\n"


@click.command("probes")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--attach", is_flag=True, help="Also compile, load and attach every probe, then detach (needs root).")
@click.option("-v", "--verbose", is_flag=True, help="With --attach: print compiler and verifier logs in full.")
@attach_method_option
@click.pass_obj
def command(env: Environment, as_json: bool, attach: bool, verbose: bool, attach_method: Optional[str]) -> ExitStatus:
    """Show which kernel function each probe uses, how it attaches, and why.

    Decided by feature detection (kallsyms, available_filter_functions, BTF,
    tracepoints, what the installed bcc can do), never by kernel version.
    Probes marked * are required. With --attach the plan shown is the one
    attached: a fentry/fexit pair whose load failed shows its kprobes and why.

    \b
    Example:
      sudo ctrace probes
      sudo ctrace probes --attach --json
    """
    from ctrace.sources.live import LiveSource, detect

    plan = detect(attach_method)
    result = plan.to_json()
    if attach and not plan.missing_required() and not plan.unmet():
        src = LiveSource(read_existing=False, verbose=verbose, log=env.stderr, method=attach_method)
        try:
            plan = src.plan
            result = plan.to_json()
            result["attached"] = True
            result["compile_seconds"] = round(src.compile_seconds, 2)
            result["attach_seconds"] = round(src.attach_seconds, 2)
        finally:
            src.close()
    if as_json:
        env.stdout.write(json.dumps(result, indent=1) + "\n")
    else:
        env.stdout.write(render(plan))
        if attach:
            env.stdout.write(f"attached and detached every probe (compile {result['compile_seconds']} s, "
                             f"load+attach {result['attach_seconds']} s)\n")
    return ExitStatus.OK if not plan.missing_required() and not plan.unmet() else ExitStatus.ATTACH_FAILED
