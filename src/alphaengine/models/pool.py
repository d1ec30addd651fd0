"""The trainer's process pool: jobs in fresh spawned processes, crashes and hangs survived.

A :class:`WorkerPool` wraps a :class:`~concurrent.futures.ProcessPoolExecutor` with the ``spawn`` start
method (a forked child would inherit the event loop, the store's threads and locks) and
``max_tasks_per_child=1``: every job runs in a new process, so whatever a library keeps between fits
(JAX's compilation caches, allocator arenas, leaked references) goes away with it and the memory of
continuous retraining stays flat.

A job that raises comes back as :class:`JobError`. A worker that dies (killed, out of memory, a crash
in native code) breaks the executor: the pool is rebuilt and the job raises :class:`WorkerCrashed`. A job
that outlives its timeout is a hang: its worker processes are killed, the pool rebuilt, and the job
raises :class:`JobTimeout`. In each case the next job runs on a working pool.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, ClassVar, Final, Literal, TypeVar

from alphaengine.errors import ModelError
from alphaengine.models.worker import init_worker

log = logging.getLogger("alphaengine.trainer.pool")

A = TypeVar("A")
R = TypeVar("R")

StartMethod = Literal["spawn", "forkserver"]

_KILL_WAIT_S: Final = 5.0


class JobFailed(ModelError):
    """A training job did not produce its result; ``kind`` says how it failed."""

    kind: ClassVar[str] = "error"
    retriable = True


class JobError(JobFailed):
    """The job raised an exception in its worker."""

    kind = "error"


class WorkerCrashed(JobFailed):
    """The worker process died while the job ran (killed, out of memory, a native crash)."""

    kind = "crashed"


class JobTimeout(JobFailed):
    """The job ran past its timeout; its worker was killed."""

    kind = "timeout"


class WorkerPool:
    """Runs jobs in worker processes; rebuilds itself after a crash or a hang."""

    def __init__(
        self,
        *,
        workers: int,
        threads: int,
        nice: int,
        keras_backend: str,
        start_method: StartMethod = "spawn",
    ) -> None:
        self.workers = workers
        self._initargs = (threads, nice, keras_backend)
        self._context = multiprocessing.get_context(start_method)
        self._executor: ProcessPoolExecutor | None = None
        self._closed = False
        self.rebuilds = 0
        """How many times the pool was rebuilt after a crash or a hang."""

    def _pool(self) -> ProcessPoolExecutor:
        if self._closed:
            raise JobFailed("the worker pool is closed")
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=self._context,
                initializer=init_worker,
                initargs=self._initargs,
                max_tasks_per_child=1,
            )
        return self._executor

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (benchmarks and tests watch them)."""
        if self._executor is None:
            return []
        # The executor keeps its processes in a private mapping; it is the only handle on them.
        processes = getattr(self._executor, "_processes", None) or {}
        return [p.pid for p in list(processes.values()) if p.pid is not None and p.is_alive()]

    async def run(self, fn: Callable[[A], R], arg: A, *, timeout_s: float, what: str) -> R:
        """Run ``fn(arg)`` in a worker; raises a :class:`JobFailed` subclass when it does not finish."""
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._pool(), fn, arg)
        except BrokenProcessPool:
            self._discard()
            future = loop.run_in_executor(self._pool(), fn, arg)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            log.error(
                "%s ran past its %.0f s timeout: killing its worker and rebuilding the pool", what, timeout_s
            )
            await self._kill()
            raise JobTimeout(f"{what}: no result within {timeout_s:.0f} s (the worker was killed)") from None
        except BrokenProcessPool as exc:
            log.error("%s: a worker process died; rebuilding the pool", what)
            self._discard()
            raise WorkerCrashed(f"{what}: the worker process died ({exc})") from None
        except asyncio.CancelledError:
            # The trainer is stopping: do not leave a worker fitting for minutes after it.
            await self._kill()
            raise
        except Exception as exc:
            raise JobError(f"{what}: {type(exc).__name__}: {exc}") from exc

    async def _kill(self) -> None:
        executor = self._executor
        if executor is None:
            return
        processes = list((getattr(executor, "_processes", None) or {}).values())
        for process in processes:
            if process.is_alive():
                process.kill()
        self._discard()
        await asyncio.to_thread(_join, processes)

    def _discard(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
            self.rebuilds += 1

    async def close(self) -> None:
        """Stop the workers (killing any still running a job); idempotent. No job runs after this."""
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is None:
            return
        processes = list((getattr(executor, "_processes", None) or {}).values())
        for process in processes:
            if process.is_alive():
                process.kill()
        executor.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(_join, processes)


def _join(processes: list[Any]) -> None:
    for process in processes:
        process.join(_KILL_WAIT_S)
