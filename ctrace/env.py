"""The process environment a command runs in, so tests can run the CLI in-process."""

import os
import sys
from dataclasses import dataclass, field
from typing import IO, Dict


@dataclass
class Environment:
    stdout: IO[str] = field(default_factory=lambda: sys.stdout)
    stderr: IO[str] = field(default_factory=lambda: sys.stderr)
    environ: Dict[str, str] = field(default_factory=lambda: dict(os.environ))

    @property
    def stdout_isatty(self) -> bool:
        isatty = getattr(self.stdout, "isatty", None)
        return bool(isatty and isatty())

    def error(self, message: str) -> None:
        """One line on stderr, prefixed like every ctrace error."""
        print(f"ctrace: {message}", file=self.stderr, flush=True)

    def warn(self, message: str) -> None:
        print(f"ctrace: warning: {message}", file=self.stderr, flush=True)
