"""Resource use per module and of the process tree, sampled into gauges while the engine runs.

Per module: the tasks it owns and the records it holds in memory (``Module.queue_depth``); for the
process: every asyncio task on the loop, and the trainer's worker processes with their resident memory.
The engine's own memory and CPU come from prometheus_client's process collector (``process_*``).
"""

from __future__ import annotations

import asyncio
import contextlib

import psutil

from alphaengine.kernel.supervisor import Supervisor
from alphaengine.metrics import (
    ASYNCIO_TASKS,
    MODULE_QUEUE,
    MODULE_TASKS,
    WORKER_MEMORY,
    WORKER_PROCESSES,
    PeriodicSampler,
)


class ResourceSampler(PeriodicSampler):
    """Samples module and process resources every ``interval_s`` until stopped."""

    task_name = "resource-sampler"

    def __init__(self, supervisor: Supervisor, interval_s: float = 2.0) -> None:
        super().__init__(interval_s)
        self.supervisor = supervisor
        self._process = psutil.Process()

    def start(self) -> None:
        """Sample now and then periodically on the running loop."""
        self.sample()
        super().start()

    def sample(self) -> None:
        """Set every resource gauge from the current state."""
        for slot in self.supervisor.slots.values():
            MODULE_TASKS.labels(slot.name).set(slot.instance.task_count())
            MODULE_QUEUE.labels(slot.name).set(slot.instance.queue_depth())
        ASYNCIO_TASKS.set(len(asyncio.all_tasks()))
        workers = 0
        rss = 0
        for child in self._process.children(recursive=True):
            # A worker may exit between the listing and the reading.
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                rss += child.memory_info().rss
                workers += 1
        WORKER_PROCESSES.set(workers)
        WORKER_MEMORY.set(rss)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.sample()
