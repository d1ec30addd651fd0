"""Small modules used by the kernel tests, loaded through ``"tests.plugins:Class"`` paths."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import ClassVar

from alphaengine.kernel.module import Module, ModuleSettings

STARTS: Counter[str] = Counter()
"""How many instances of each module name have started (instances are rebuilt on restart)."""


class FlakySettings(ModuleSettings, frozen=True):
    """Fail the first ``fail_times`` runs, each after ``after_s`` seconds."""

    fail_times: int = 2
    after_s: float = 0.01


class Flaky(Module[FlakySettings]):
    """A module whose task raises for its first few instances, then runs quietly."""

    Config: ClassVar[type[ModuleSettings]] = FlakySettings

    async def on_start(self) -> None:
        STARTS[self.name] += 1
        self.spawn(self._work(STARTS[self.name]), "work")

    async def _work(self, run: int) -> None:
        await asyncio.sleep(self.config.after_s)
        if run <= self.config.fail_times:
            raise RuntimeError(f"boom #{run}")
        await self.stopping.wait()


class FailsToStart(Module[ModuleSettings]):
    """A module whose start always raises."""

    async def on_start(self) -> None:
        STARTS[self.name] += 1
        raise OSError("cannot bind")


class Ticker(Module[ModuleSettings]):
    """Counts while it runs, to show it is untouched by other modules' failures."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.count = 0

    async def on_start(self) -> None:
        STARTS[self.name] += 1
        self.spawn(self._tick(), "tick")

    async def _tick(self) -> None:
        while not self.stopping.is_set():
            self.count += 1
            await asyncio.sleep(0.005)
