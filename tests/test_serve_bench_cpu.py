"""bench/serve_bench.py's CPU accounting: what a server's process tree and the load generator spent per request,
and the scaling ceiling it implies on a machine whose cores both share."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import pytest

from bench.serve_bench import child_pids, connection_split, own_cpu_seconds, scaling_ceiling, tree_cpu_seconds
from online.settings import usable_cores

# A parent that starts a child, both spinning for about `seconds` of CPU before they sleep (so both are alive when
# the tree is read).
SPIN = """
import subprocess, sys, time
def spin(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
child = subprocess.Popen([sys.executable, "-c", "import time\\nend = time.process_time() + {s}\\nwhile time.process_time() < end: pass\\ntime.sleep(60)"])
spin({s})
print("spun", flush=True)
time.sleep(60)
"""


def test_tree_cpu_seconds_counts_the_parent_and_its_children():
    proc = subprocess.Popen([sys.executable, "-c", SPIN.format(s=0.6)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "spun"
        deadline = time.time() + 30
        total = tree_cpu_seconds(proc.pid)
        while total < 1.1 and time.time() < deadline:  # the child may still be spinning on a busy machine
            time.sleep(0.2)
            total = tree_cpu_seconds(proc.pid)
        # Both processes spun 0.6 s: the tree holds more than either one alone.
        assert 1.1 <= total < 30
        own = tree_cpu_seconds(os.getpid())
        assert own >= own_cpu_seconds() - 0.05  # this process's tree includes at least this process
    finally:
        for p in _descendants(proc.pid):
            _kill(p)
        proc.kill()
        proc.wait()


def test_tree_cpu_seconds_of_a_finished_process_is_zero():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert tree_cpu_seconds(proc.pid) == 0.0


def test_connection_split_names_the_busiest_worker_first():
    assert connection_split([11, 12, 11, 12]) == "2+2"
    assert connection_split([11, 12, 11, 11]) == "3+1"
    assert connection_split([7, 7, 7, 7]) == "4"
    assert connection_split([5]) == "1"


def test_scaling_ceiling_takes_the_tighter_of_the_cores_and_the_workers():
    cores = usable_cores()
    cell = {"server_cpu_ms_per_request": 1.0, "client_cpu_ms_per_request": 0.25}
    # All cores shared by server and load generator: cores / 1.25 ms; one worker: at most one core's 1000/s.
    assert scaling_ceiling(cell, 1) == pytest.approx(min(cores / 1.25e-3, 1000.0))
    assert scaling_ceiling(cell, cores) == pytest.approx(cores / 1.25e-3)
    # No server CPU measured (a bench run without a server pid): no ceiling, rather than a division by zero.
    assert math.isnan(scaling_ceiling({"server_cpu_ms_per_request": 0.0, "client_cpu_ms_per_request": 0.1}, 2))


def _descendants(pid: int) -> list[int]:
    children = child_pids(pid)
    return children + [d for c in children for d in _descendants(c)]


def _kill(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass
