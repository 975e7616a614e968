"""The harness of the distributed tests: a hung script is ended, its whole process group with it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from ranks import run_isolated

# A parent that starts a child in its own process group, writes the child's pid, and hangs.
HANG = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its reaper counts as gone
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_script_past_its_timeout_is_ended_with_the_processes_it_started(tmp_path):
    pidfile = tmp_path / "child"
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_isolated([sys.executable, "-c", HANG, str(pidfile)], cwd=tmp_path, timeout=5)
    assert time.monotonic() - start < 30
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_a_failing_script_raises_with_its_exit_status(tmp_path):
    with pytest.raises(subprocess.CalledProcessError) as info:
        run_isolated([sys.executable, "-c", "raise SystemExit(3)"], cwd=tmp_path)
    assert info.value.returncode == 3
    run_isolated([sys.executable, "-c", "pass"], cwd=tmp_path)  # and a clean exit passes
