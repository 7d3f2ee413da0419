import io
import os
import sys
from typing import List, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ctrace.cli import main  # noqa: E402
from ctrace.env import Environment  # noqa: E402


def run_cli(args: List[str]) -> Tuple[int, str, str]:
    """Run ctrace in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    status = main(args, Environment(stdout=out, stderr=err, environ={}))
    return int(status), out.getvalue(), err.getvalue()


@pytest.fixture
def cli():
    return run_cli
