"""The supervisor: starts modules in order, restarts crashed ones, marks repeat offenders FAULTED.

A module whose task raises is aborted (its tasks cancelled, nothing drained: its consumers resume from
their committed offsets), then rebuilt from its class and configuration after a capped exponential
backoff with jitter. More than ``max_restarts`` failures within ``restart_window_s``, or one failure with an
error that says retrying cannot succeed (``retriable = False``, such as refused credentials), and the
module stays FAULTED until an operator acts; the other modules keep running either way.

Restart timing is an operational concern, not market time, so it uses the event loop's monotonic clock
rather than the injected market clock (a simulated clock would never wake a restart).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from alphaengine.backoff import Backoff
from alphaengine.config import ModuleConfig, SupervisorConfig
from alphaengine.errors import PluginError
from alphaengine.kernel.module import Context, Module, ModuleState
from alphaengine.metrics import MODULE_FAILURES, MODULE_RESTARTS

log = logging.getLogger("alphaengine.supervisor")


@dataclass(frozen=True, slots=True)
class Reload:
    """The outcome of a hot reload: bus positions on both sides of it and the state handed over."""

    stopped_at: dict[str, int]
    """Where the old instance stopped reading, per ``topic/partition``."""
    resumed_from: dict[str, int]
    """Where the new instance reads on."""
    state_keys: list[str]
    """The keys of the snapshot handed to the new instance."""


@dataclass(eq=False)
class ModuleSlot:
    """One configured module: its class, settings, the live instance and its failure history."""

    decl: ModuleConfig
    cls: type[Module[Any]]
    instance: Module[Any]
    backoff: Backoff
    failures: collections.deque[float] = field(default_factory=collections.deque)
    restarts: int = 0
    gave_up: bool = False
    last_error: str = ""
    restart_task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        """The module's configured name."""
        return self.decl.name

    @property
    def state(self) -> ModuleState:
        """The live instance's state."""
        return self.instance.state


class Supervisor:
    """Owns the engine's modules and their restarts."""

    def __init__(self, ctx: Context, settings: SupervisorConfig) -> None:
        self.ctx = ctx
        self.settings = settings
        self.slots: dict[str, ModuleSlot] = {}
        self._stopping = False

    def add(self, decl: ModuleConfig, cls: type[Module[Any]]) -> ModuleSlot:
        """Build a module from its declaration (not started yet)."""
        backoff = Backoff(self.settings.backoff_initial_s, self.settings.backoff_max_s, jitter="equal")
        slot = ModuleSlot(decl, cls, self._build(decl, cls), backoff)
        self.slots[decl.name] = slot
        MODULE_FAILURES.labels(decl.name)  # zeros from the start, for increase() and the alerts
        MODULE_RESTARTS.labels(decl.name)
        return slot

    def _build(self, decl: ModuleConfig, cls: type[Module[Any]]) -> Module[Any]:
        module = cls(decl.name, decl.settings, self.ctx)
        module.on_failure(self._failed)
        return module

    async def start_all(self) -> None:
        """Start every module in configuration order; one that fails to start is retried like a crash."""
        for slot in self.slots.values():
            try:
                await slot.instance.start()
            except Exception as exc:
                self._record_failure(slot, exc)

    async def stop_all(self, drain_until: float | None = None) -> None:
        """Stop sources first, then the other modules in configuration order (upstream to downstream).

        ``drain_until`` (monotonic time) bounds how long consumers drain (see :meth:`Module.stop`).
        """
        self._stopping = True
        for slot in self.slots.values():
            if slot.restart_task is not None:
                slot.restart_task.cancel()
        ordered = sorted(self.slots.values(), key=lambda s: s.instance.role != "source")
        for slot in ordered:
            try:
                await slot.instance.stop(drain_until)
            except Exception:
                log.exception("module %s failed while stopping", slot.name)

    def module(self, name: str) -> Module[Any]:
        """The live instance of a module; raises KeyError."""
        return self.slots[name].instance

    async def replace(self, name: str, cls: type[Module[Any]], decl: ModuleConfig) -> Reload:
        """Swap a module for a new instance of ``cls`` with ``decl`` (hot reload); returns what happened.

        The old instance stops at once, without draining the backlog: it flushes and commits what it has
        handled, so the new one reads on from the same bus position; its :meth:`Module.snapshot` is
        handed to the new one's :meth:`Module.restore`. If the new instance cannot be built or started,
        the old class and settings are started again with the same state and :class:`PluginError` says
        why. A FAULTED module is cleaned up instead of stopped (this is how new code fixes it).
        """
        slot = self.slots[name]
        if slot.restart_task is not None:
            slot.restart_task.cancel()
            await asyncio.gather(slot.restart_task, return_exceptions=True)
            slot.restart_task = None
        old = slot.instance
        healthy = old.state is not ModuleState.FAULTED
        await old.stop(drain_until=time.monotonic())
        state = old.snapshot() if healthy else {}
        stopped_at = old.positions()
        previous = (slot.decl, slot.cls)
        new: Module[Any] | None = None
        try:
            new = self._build(decl, cls)
            new.restore(state)
            slot.decl, slot.cls, slot.instance = decl, cls, new
            await new.start()
        except Exception as exc:
            log.error("reloaded module %s failed to start, the previous code runs again: %r", name, exc)
            if new is not None:
                await new.abort()  # leaves its consumer group, if it joined one
            slot.decl, slot.cls = previous
            slot.instance = self._build(*previous)
            slot.instance.restore(state)
            try:
                await slot.instance.start()
            except Exception as again:
                self._record_failure(slot, again)
            raise PluginError(
                f"module {name}: the new code or settings failed ({type(exc).__name__}: {exc}); "
                "the previous code and settings run again"
            ) from exc
        slot.gave_up = False
        slot.failures.clear()
        slot.last_error = ""
        return Reload(stopped_at, new.positions(), sorted(state))

    def status(self) -> list[dict[str, Any]]:
        """One row per module: state, detail, restarts, whether the supervisor gave up."""
        rows = []
        for slot in self.slots.values():
            rows.append(
                {
                    "module": slot.name,
                    "type": slot.decl.type,
                    "state": slot.state.value,
                    "detail": slot.instance.detail,
                    "restarts": slot.restarts,
                    "failures_in_window": len(slot.failures),
                    "gave_up": slot.gave_up,
                    "last_error": slot.last_error,
                    "restarting": slot.restart_task is not None and not slot.restart_task.done(),
                }
            )
        return rows

    # -- failures ---------------------------------------------------------------------------------

    def _failed(self, module: Module[Any], exc: BaseException) -> None:
        slot = self.slots.get(module.name)
        if slot is None or slot.instance is not module:
            return  # a replaced instance's late failure
        self._record_failure(slot, exc)

    def _record_failure(self, slot: ModuleSlot, exc: BaseException) -> None:
        MODULE_FAILURES.labels(slot.name).inc()
        slot.last_error = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        slot.failures.append(now)
        while slot.failures and slot.failures[0] < now - self.settings.restart_window_s:
            slot.failures.popleft()
        if self._stopping:
            return
        hopeless = getattr(exc, "retriable", True) is False
        if hopeless or len(slot.failures) > self.settings.max_restarts:
            slot.gave_up = True
            if hopeless:
                # The error says a retry cannot succeed (refused credentials, a bad configuration):
                # restarting would only repeat it, and against an exchange that looks like an attack.
                log.error("module %s failed and will not be restarted: %s", slot.name, slot.last_error)
            else:
                log.error(
                    "module %s failed %d times within %.0f s: it stays FAULTED (last error: %s)",
                    slot.name,
                    len(slot.failures),
                    self.settings.restart_window_s,
                    slot.last_error,
                )
            slot.restart_task = asyncio.get_running_loop().create_task(
                slot.instance.abort(), name=f"abort:{slot.name}"
            )
            return
        slot.restart_task = asyncio.get_running_loop().create_task(
            self._restart(slot), name=f"restart:{slot.name}"
        )

    async def _restart(self, slot: ModuleSlot) -> None:
        await slot.instance.abort()
        # The backoff grows with the failures still inside the window, so it relaxes by itself once a
        # module has run well for a while.
        slot.backoff.attempt = max(0, len(slot.failures) - 1)
        delay = slot.backoff.next_delay()
        log.warning("restarting module %s in %.2f s after: %s", slot.name, delay, slot.last_error)
        await asyncio.sleep(delay)
        slot.instance = self._build(slot.decl, slot.cls)
        slot.restarts += 1
        MODULE_RESTARTS.labels(slot.name).inc()
        try:
            await slot.instance.start()
        except Exception as exc:
            slot.restart_task = None
            self._record_failure(slot, exc)
