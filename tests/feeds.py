"""Helpers shared by the live-source tests: read back what a source put on the bus, wait for a condition."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pyarrow as pa

from alphaengine.codec import decode_ticks
from alphaengine.domain import TickBatch
from alphaengine.kernel.module import Context


async def drain(ctx: Context) -> TickBatch:
    """Every tick on the ``ticks`` topic, per symbol in the order sent."""
    consumer = ctx.bus.consumer("test", ["ticks"])
    await consumer.start()
    batches = []
    try:
        while records := await consumer.getmany(100_000, 0.05):
            batches.extend(decode_ticks(r.value).data for r in records)
    finally:
        await consumer.close()
    batches = [b for b in batches if b.num_rows]
    return TickBatch(pa.concat_batches(batches)) if batches else TickBatch.empty()


async def eventually(check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Wait until ``check()`` holds; a TimeoutError after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.02)
