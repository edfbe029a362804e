"""Where the independent pieces of a stage run: in this process (``local``) or as Ray tasks (``ray``).

An executor maps a module-level function over items and returns the results in input order, so a
stage's tables do not depend on which executor computed them. ``local`` is what the stages did
before executors existed (each stage keeps its own local code path; nothing here imports Ray).
``ray`` connects to a Ray cluster (``address``; ``None`` starts a local instance or honours Ray's own
``RAY_ADDRESS``) or reuses the one this process has initialised already, and runs each item as one
task. Shared arguments (models, configs) are put into Ray's object store once per ``map`` call.

Multi-node clusters: the tasks read and write the stage's files at the driver's absolute paths, so
the project folder must sit on a filesystem every node mounts at the same path, with ``agd``
installed in each node's Python. tests/test_ray_cluster.py joins a two-node cluster (two raylets on
one machine) by address and checks that tasks run on both nodes with a model shared between them.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, Literal, Protocol

ExecutorKind = Literal["local", "ray"]
EXECUTOR_KINDS: tuple[str, ...] = ("local", "ray")
ResultHook = Callable[[int, Any], None]


class ExecutorError(RuntimeError):
    """An executor that cannot be made: Ray missing, or its cluster unreachable."""


class Executor(Protocol):
    """Maps a function over items; results come back in input order."""

    kind: str

    def map(
        self,
        fn: Callable[..., Any],
        items: Sequence[Any],
        *shared: Any,
        on_result: ResultHook | None = None,
        progress: bool = False,
        desc: str | None = None,
    ) -> list[Any]:
        """``[fn(item, *shared) for item in items]``; ``on_result(index, result)`` as each one finishes."""
        ...

    def close(self) -> None:
        """Release what the executor started."""
        ...


def _bar(total: int, progress: bool, desc: str | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="task", disable=not progress)


class LocalExecutor:
    """Runs every item in this process, one after the other."""

    kind = "local"

    def map(
        self,
        fn: Callable[..., Any],
        items: Sequence[Any],
        *shared: Any,
        on_result: ResultHook | None = None,
        progress: bool = False,
        desc: str | None = None,
    ) -> list[Any]:
        """``[fn(item, *shared) for item in items]``, calling ``on_result`` after each."""
        results = []
        with _bar(len(items), progress, desc) as bar:
            for i, item in enumerate(items):
                results.append(fn(item, *shared))
                if on_result is not None:
                    on_result(i, results[-1])
                bar.update(1)
        return results

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ExecutorError(
            "the ray executor needs Ray, which is not installed: pip install 'agd[ray]'"
        ) from None
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a host:port nobody listens on (ray.init would retry for minutes)."""
    if address == "auto" or address == "local" or "://" in address:
        return  # ray resolves these itself and fails quickly when nothing runs
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ExecutorError(
            f"Ray address {address!r}: expected HOST:PORT (e.g. 10.0.0.5:6379), 'auto' or ray://..."
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ExecutorError(
            f"cannot reach the Ray cluster at {address} ({exc}); start one with `ray start --head` "
            "or pass the address `ray start` printed"
        ) from None


class RayExecutor:
    """Runs every item as one Ray task (``num_cpus`` CPUs each, default 1)."""

    kind = "ray"

    def __init__(
        self,
        address: str | None = None,
        num_cpus: int | None = None,
        task_cpus: float = 1.0,
    ) -> None:
        ray = _import_ray()
        self._ray = ray
        self.task_cpus = task_cpus
        self._owned = False
        self._remotes: dict[Callable[..., Any], Any] = {}
        if ray.is_initialized():
            return  # a caller (a test, a notebook) manages its own Ray
        target = address or os.environ.get("RAY_ADDRESS") or None
        kwargs: dict[str, Any] = {"address": target, "log_to_driver": True}
        if target is None or target == "local":
            kwargs["num_cpus"] = num_cpus  # only a Ray started here may be sized
        else:
            _check_reachable(target)
        try:
            ray.init(**kwargs)
        except (ConnectionError, TimeoutError, ValueError) as exc:
            where = f"at {target}" if target else "(local instance)"
            hint = ""
            if target and os.environ.get("RAY_AUTH_MODE") != "token":
                # `ray start` turns token authentication on (Ray >= 2.59); a client must opt in to send it
                hint = "; if the cluster was started with `ray start`, set RAY_AUTH_MODE=token here as well"
            raise ExecutorError(f"cannot start or reach Ray {where}: {exc}{hint}") from None
        self._owned = True

    def _remote(self, fn: Callable[..., Any]):
        if fn not in self._remotes:
            self._remotes[fn] = self._ray.remote(num_cpus=self.task_cpus)(fn)
        return self._remotes[fn]

    def map(
        self,
        fn: Callable[..., Any],
        items: Sequence[Any],
        *shared: Any,
        on_result: ResultHook | None = None,
        progress: bool = False,
        desc: str | None = None,
    ) -> list[Any]:
        """One task per item; shared arguments go to the object store once; results in input order."""
        ray = self._ray
        remote = self._remote(fn)
        # top-level ObjectRef arguments reach the task as the objects themselves
        shared_refs = [ray.put(value) for value in shared]
        refs = [remote.remote(item, *shared_refs) for item in items]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        try:
            with _bar(len(refs), progress, desc) as bar:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    for ref in done:
                        i = index[ref]
                        results[i] = ray.get(ref)  # a failed task raises its own exception here
                        if on_result is not None:
                            on_result(i, results[i])
                        bar.update(1)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        return results

    def close(self) -> None:
        """Shut Ray down if this executor started it."""
        if self._owned and self._ray.is_initialized():
            self._ray.shutdown()
        self._owned = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_executor(
    kind: ExecutorKind | str = "local", address: str | None = None, num_cpus: int | None = None
) -> LocalExecutor | RayExecutor:
    """An executor by name: ``local`` (this process) or ``ray`` (``address``: a cluster; ``num_cpus``: a local Ray's size)."""
    if kind == "local":
        if address is not None:
            raise ExecutorError("--address is for the ray executor; add --executor ray")
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(address=address, num_cpus=num_cpus)
    raise ExecutorError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTOR_KINDS)}")


def is_local(executor: Executor | None) -> bool:
    """True for no executor or the local one: the stage takes its own (unchanged) local path."""
    return executor is None or executor.kind == "local"


# -- worker processes that end with their parent ---------------------------------------------------


def spawn_pool(
    workers: int, initializer: Callable[..., None] | None = None, initargs: tuple = ()
) -> ProcessPoolExecutor:
    """A ``ProcessPoolExecutor`` of spawned workers (torch and fork do not mix) that end with this process.

    A pool's workers outlive a parent killed by SIGKILL (or the kernel's OOM killer) and finish the
    task in hand, which for a Roost member, a campaign repeat or a screening group is up to an hour of
    every core; a rerun started meanwhile would compete with them. Each worker here watches the
    process that made the pool (:func:`exit_with_parent`) and exits within a second of its death.
    ``initializer(*initargs)`` then runs as usual.
    """
    return ProcessPoolExecutor(
        workers,
        mp_context=get_context("spawn"),
        initializer=_start_worker,
        initargs=(os.getpid(), initializer, initargs),
    )


def _start_worker(parent: int, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    exit_with_parent(parent)
    if initializer is not None:
        initializer(*initargs)


def exit_with_parent(parent: int, interval: float = 0.5) -> None:
    """End this process (``os._exit(1)``) once the process ``parent`` is gone.

    A daemon thread checks every ``interval`` seconds whether this process has been re-parented,
    which is how a dead parent shows on POSIX; it works in the middle of a long torch operation,
    where a check between epochs would wait for the epoch. Nothing is left to receive a result, so
    the exit is immediate; files the task writes whole-then-renamed stay consistent.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="agd-exit-with-parent", daemon=True).start()
