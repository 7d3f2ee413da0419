"""`vagrant validate` on vagrant/Vagrantfile (skipped only without vagrant)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

VAGRANT_DIR = Path(__file__).resolve().parent.parent.parent / "vagrant"


@pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant not installed")
def test_vagrant_validate(tmp_path: Path) -> None:
    env = dict(os.environ, VAGRANT_CHECKPOINT_DISABLE="1", VAGRANT_HOME=str(tmp_path / "home"),
               VAGRANT_DOTFILE_PATH=str(tmp_path / "dot"))
    res = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=VAGRANT_DIR, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert res.returncode == 0, res.stdout
    assert "validated successfully" in res.stdout


def test_vagrant_uses_shared_provisioning() -> None:
    text = (VAGRANT_DIR / "Vagrantfile").read_text()
    assert "../tests/vm/provision.sh" in text
    assert "exec sh /vagrant/tests/vm/guest-run.sh" in (VAGRANT_DIR / "run-kernel-tests.sh").read_text()
