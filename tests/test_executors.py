"""The spawned worker pools of the stages: results as usual, and no worker outlives a killed parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from agd.executors import spawn_pool
from tests.conftest import REPO_ROOT

psutil = pytest.importorskip("psutil")

_INITIALISED: list[str] = []


def _remember(tag: str) -> None:
    _INITIALISED.append(tag)


def _initialised_and_pid(x: int) -> tuple[int, list[str], int]:
    return x * x, list(_INITIALISED), os.getpid()


def test_spawn_pool_runs_tasks_after_the_callers_initializer() -> None:
    with spawn_pool(2, initializer=_remember, initargs=("ready",)) as pool:
        results = list(pool.map(_initialised_and_pid, range(6)))
    assert [r[0] for r in results] == [0, 1, 4, 9, 16, 25]
    assert all(r[1] == ["ready"] for r in results)  # once per worker, before any task
    assert os.getpid() not in {r[2] for r in results}


# A parent that starts two workers on an hour-long task each, prints their pids, and waits.
_PARENT = textwrap.dedent(
    """
    import os, time
    from agd.executors import spawn_pool

    def pid_then_sleep(seconds):
        os.write(1, f"{os.getpid()}\\n".encode())  # one write: the two workers' lines never interleave
        time.sleep(seconds)

    if __name__ == "__main__":
        pool = spawn_pool(2)
        futures = [pool.submit(pid_then_sleep, 3600) for _ in range(2)]
        time.sleep(3600)
    """
)


def _alive(proc) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_workers_exit_when_their_parent_is_killed(tmp_path, sig) -> None:
    script = tmp_path / "parent.py"
    script.write_text(_PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    workers = []
    try:
        # both workers are busy in their task (each printed its pid from inside it)
        pids = {int(parent.stdout.readline()) for _ in range(2)}
        workers = [psutil.Process(pid) for pid in pids]
        assert len(workers) == 2 and all(_alive(w) for w in workers)
        parent.send_signal(sig)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "a worker outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        for worker in workers:  # never leave a worker behind, even when the test fails
            if _alive(worker):
                worker.kill()
