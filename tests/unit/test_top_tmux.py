"""The interactive view, driven like a person would: tmux send-keys, capture-pane."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.unit.conftest import ROOT, run_cli


def tmux(*args: str) -> str:
    """tmux on a server of the session's own (-L NAME, NAME after -s/-t): a new session never
    races the shutdown of a server whose last session another test just ended."""
    name = args[args.index("-s" if "-s" in args else "-t") + 1]
    r = subprocess.run(["tmux", "-L", name, *args], capture_output=True, text=True)
    assert r.returncode == 0, f"tmux {' '.join(args)}: {r.stderr.strip()}"
    return r.stdout


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("top") / "lf.ctr")
    assert run_cli(["synth", "lost-fin", "-o", path, "--events", "20000", "--seed", "2"])[0] == 0
    return path


@pytest.fixture
def screen(recording):
    if shutil.which("tmux") is None:
        pytest.fail("tmux is needed for the interactive tests (apt-get install tmux)")
    name = f"ctrace-{uuid.uuid4().hex[:8]}"
    cmd = f"cd {ROOT} && exec {sys.executable} -m ctrace replay --speed 20 {recording}"
    tmux("new-session", "-d", "-s", name, "-x", "100", "-y", "30", cmd)

    def capture() -> str:
        return tmux("capture-pane", "-p", "-t", name)

    def wait_for(text: str, timeout: float = 15.0, absent: bool = False) -> str:
        deadline = time.monotonic() + timeout
        while True:
            out = capture()
            if (text in out) != absent:
                return out
            if time.monotonic() > deadline:
                raise AssertionError(f"{'still' if absent else 'never'} saw {text!r}; screen:\n{out}")
            time.sleep(0.2)

    def keys(*k: str) -> None:
        tmux("send-keys", "-t", name, *k)

    yield keys, wait_for, capture, name
    subprocess.run(["tmux", "-L", name, "kill-session", "-t", name], capture_output=True)


def test_sort_group_filter_help_quit(screen):
    keys, wait_for, capture, name = screen
    out = wait_for("NETNS")  # 100 columns: the netns column is shown
    assert "SYNTHETIC DATA" in out and "sort live" in out and "ADDRESS" in out
    keys("s")
    wait_for("sort new/s")
    keys("S", "S")
    wait_for("sort age")
    keys("g")
    out = wait_for("PREFIX")
    assert "/24" in out or "/64" in out
    keys("g")
    out = wait_for("/16")
    keys("g")
    out = wait_for("netns:")
    keys("g")
    wait_for("ADDRESS")
    keys("f")
    wait_for("filter: _")
    keys("addr=203.0.113", "Enter")
    out = wait_for("addr~203.0.113")
    rows = [line for line in out.splitlines() if line[:1].isdigit() or line.startswith("2001")]
    assert rows and all(line.startswith("203.0.113.") for line in rows), out
    keys("f")
    keys("BSpace", "BSpace", "BSpace", "BSpace", "BSpace", "BSpace", "BSpace", "BSpace", "BSpace", "BSpace")
    keys("BSpace", "BSpace", "BSpace", "BSpace", "BSpace", "BSpace", "BSpace", "BSpace", "BSpace", "BSpace")
    keys("port=443", "Enter")
    wait_for("filter port=443")
    keys("p")
    wait_for("[PAUSED]")
    keys("p")
    wait_for("[PAUSED]", absent=True)
    keys("h")
    wait_for("ctrace top -- keys")
    keys("x")
    wait_for("ADDRESS")
    keys("q")
    deadline = time.monotonic() + 10
    while subprocess.run(["tmux", "-L", name, "has-session", "-t", name], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "q did not quit"
        time.sleep(0.2)


def test_resize_uses_the_width(screen):
    keys, wait_for, capture, name = screen
    wait_for("NETNS")
    tmux("resize-window", "-t", name, "-x", "80", "-y", "24")
    out = wait_for("NETNS", absent=True)
    assert max(len(line.rstrip()) for line in out.splitlines()) <= 80
    keys("q")


def test_seek_moves_the_clock(screen):
    keys, wait_for, capture, name = screen
    out = wait_for("ADDRESS")
    clock = next(line for line in out.splitlines() if line.startswith("ctrace ")).split()[2]
    keys("p", "]", "]")
    out = wait_for(clock, absent=True)
    later = next(line for line in out.splitlines() if line.startswith("ctrace ")).split()[2]
    assert later > clock
    keys("[", "[", "[", "[", "[", "[", "[", "[", "[", "[", "[", "[")
    out = wait_for("16:00:00Z")
    keys("q")



@pytest.mark.parametrize("how", ["kill-session", "sighup"])
def test_hang_up_quits_cleanly(recording, tmp_path, how):
    """The terminal closing ends the view with status 0 and nothing on stderr, whether the SIGHUP
    reaches ctrace or only the shell (which ignores it here; ctrace then sees EIO from the tty)."""
    name = f"ctrace-{uuid.uuid4().hex[:8]}"
    err, rc = tmp_path / "err", tmp_path / "rc"
    cmd = (f"trap '' HUP; cd {ROOT} && {sys.executable} -m ctrace replay --speed 20 {recording} 2>{err}; "
           f"echo $? >{rc}")
    tmux("new-session", "-d", "-s", name, "-x", "100", "-y", "30", cmd)
    pid = 0
    try:
        deadline = time.monotonic() + 15
        while "ADDRESS" not in tmux("capture-pane", "-p", "-t", name):
            assert time.monotonic() < deadline, "the view never came up"
            time.sleep(0.2)
        shell = tmux("display-message", "-p", "-t", name, "#{pane_pid}").strip()
        with open(f"/proc/{shell}/task/{shell}/children") as f:  # no pgrep in a minbase chroot
            pid = int(f.read().split()[0])
        if how == "sighup":
            os.kill(pid, signal.SIGHUP)
        else:
            tmux("kill-session", "-t", name)
        deadline = time.monotonic() + 15
        while not rc.exists() or not rc.read_text().strip():
            assert time.monotonic() < deadline, f"ctrace kept running after the hang-up; stderr: {err.read_text()}"
            time.sleep(0.2)
        pid = 0
        assert (rc.read_text().strip(), err.read_text()) == ("0", "")
    finally:
        subprocess.run(["tmux", "-L", name, "kill-session", "-t", name], capture_output=True)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
