"""The soak benchmark, short: two editors on one daemon under an edit storm with completions and
cancels, a kill -9 of the daemon, a client that vanishes mid-request, malformed frames. The engine's
text of every document equals the editor's at every check, the daemon comes back, nothing leaks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_short_soak_loses_nothing():
    cmd = [sys.executable, "-m", "bench.soak", "--clients", "2", "--files", "1", "--seconds", "10", "--rate", "8",
           "--kill-every", "5", "--check-s", "3", "--model", "smollm2-135m"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    assert r["mismatches"] == 0 and r["check_errors"] == 0 and r["checks"] >= 6, r
    assert r["kills"] >= 1 and r["recovered"], r
    assert r["edits"] > 30 and r["completions"] > 3 and r["errors"] == 0, r
    assert r["vanished_client_exit_s"] is not None and r["vanished_client_exit_s"] < 30, r
    for pid, growth in r["growth_same_pid"].items():
        assert growth["fds"] <= 2 and growth["threads"] <= 4, (pid, r)
