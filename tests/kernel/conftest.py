"""Kernel tests run only inside a lab guest (tests/vm/lab.py sets
CTRACE_LAB_GUEST=1 in the guest).  Anywhere else they are skipped, so a plain
``pytest tests/`` on a developer machine still passes; inside the guest a
missing tool or a broken scenario fails loudly."""

from __future__ import annotations

import os
from typing import Iterator, List

import pytest

IN_GUEST = os.environ.get("CTRACE_LAB_GUEST") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    if IN_GUEST:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    skip = pytest.mark.skip(reason="kernel test: runs only in a lab guest (tests/vm/lab.py run)")
    for item in items:
        if str(item.fspath).startswith(here + os.sep):
            item.add_marker(skip)


@pytest.fixture
def topo() -> Iterator["object"]:
    """A fresh server/client namespace pair with conntrack on in the server."""
    from lab_toolkit import Topology

    t = Topology.create()
    try:
        yield t
    finally:
        t.destroy()


@pytest.fixture(scope="session")
def lab_out() -> str:
    """The guest's result directory (shared with the host), for extra reports."""
    return os.environ.get("CTRACE_LAB_OUT", "/tmp")
