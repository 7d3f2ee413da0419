"""Creating output files safely: private, never clobbering, never through a symlink."""

import os

from ctrace.status import CtraceError, ExitStatus


def create_private(path: str) -> int:
    """Open a new file 0600 for writing; refuse an existing file or any symbolic link
    (even a dangling one) at the path. Returns the file descriptor."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags, 0o600)
    except FileExistsError:
        kind = "a symbolic link" if os.path.islink(path) else "an existing file"
        raise CtraceError(f"{path} is {kind}: refusing to overwrite it", ExitStatus.CANNOT_WRITE) from None
    except OSError as exc:
        raise CtraceError(f"cannot create {path}: {exc.strerror or exc}", ExitStatus.CANNOT_WRITE) from None
