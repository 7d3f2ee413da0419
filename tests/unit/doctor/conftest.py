"""Fixtures for doctor's host tests (helpers live in doctor_helpers.py and
doctor_tree.py: test modules import those by name, never `conftest`)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from doctor_tree import Tree  # noqa: E402


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path / "root")
