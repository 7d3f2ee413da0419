"""Exit codes. Every user-facing failure maps to exactly one of these (documented in docs/CLI.md)."""

from enum import IntEnum


class ExitStatus(IntEnum):
    OK = 0
    ERROR = 1  # unexpected internal error (a bug: please report)
    USAGE = 2  # bad command line (click's own code)
    NO_INPUT = 3  # input file missing or unreadable
    TRUNCATED = 4  # recording ends mid-chunk: complete chunks were used
    CORRUPT = 5  # recording damaged (bad magic, CRC, length): complete chunks before it were used
    NEWER_FORMAT = 6  # recording written by a newer ctrace (unknown major version)
    CANNOT_WRITE = 7  # output exists, is a symlink, or cannot be created
    NO_PRIVILEGE = 8  # not root / missing CAP_BPF+CAP_PERFMON
    NO_KERNEL_HEADERS = 9  # bcc needs linux-headers for the running kernel
    NO_CONNTRACK = 10  # nf_conntrack not loaded
    ATTACH_FAILED = 11  # a required kernel function cannot be attached
    VERIFIER_REJECTED = 12  # the kernel's verifier refused a program
    NO_BCC = 13  # python3-bpfcc not installed
    DOCTOR_WARNING = 20  # doctor: findings of severity warning, none critical
    DOCTOR_CRITICAL = 21  # doctor: at least one critical finding
    DOCTOR_INCOMPLETE = 22  # doctor: required inputs missing, nothing could be judged
    INTERRUPTED = 130  # SIGINT before the command finished its work


class CtraceError(Exception):
    """A user-facing failure: one line of text and the exit status it maps to."""

    status: ExitStatus = ExitStatus.ERROR

    def __init__(self, message: str, status: "ExitStatus | None" = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
