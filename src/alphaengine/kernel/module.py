"""The module base class: one lifecycle, task ownership and health for every plugin.

A module author subclasses :class:`Module`, declares its ``Config`` struct, and overrides only the hooks
(``on_start``, ``on_stop``, optionally ``snapshot``/``restore``); the public ``start``/``stop``/``abort``
are fixed so every module gets the same state table, logging and metrics.

State table (any other transition raises :class:`~alphaengine.errors.LifecycleError`)::

    INITIALIZED -> STARTING -> RUNNING <-> DEGRADED
    STARTING | RUNNING | DEGRADED -> STOPPING -> STOPPED
    any state but STOPPED -> FAULTED           (a failure; final for this instance: the supervisor
                                               cleans it up with abort() and builds a new one)
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from alphaengine.bus.base import Bus
from alphaengine.clock import Clock
from alphaengine.config import Strict
from alphaengine.errors import LifecycleError
from alphaengine.metrics import MODULE_STATE
from alphaengine.objectstore.base import ObjectStore
from alphaengine.store.base import Store


class ModuleState(enum.StrEnum):
    """Where a module is in its life."""

    INITIALIZED = "INITIALIZED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    DEGRADED = "DEGRADED"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    FAULTED = "FAULTED"


_S = ModuleState
_TRANSITIONS: dict[ModuleState, frozenset[ModuleState]] = {
    _S.INITIALIZED: frozenset({_S.STARTING, _S.FAULTED}),
    _S.STARTING: frozenset({_S.RUNNING, _S.STOPPING, _S.FAULTED}),
    _S.RUNNING: frozenset({_S.DEGRADED, _S.STOPPING, _S.FAULTED}),
    _S.DEGRADED: frozenset({_S.RUNNING, _S.STOPPING, _S.FAULTED}),
    _S.STOPPING: frozenset({_S.STOPPED, _S.FAULTED}),
    _S.STOPPED: frozenset(),
    _S.FAULTED: frozenset(),
}


@dataclass(frozen=True, slots=True)
class Context:
    """What the engine gives every module: the ports, the clock and its data directory."""

    bus: Bus
    store: Store
    objects: ObjectStore
    clock: Clock
    data_dir: Path
    engine_name: str = "alphaengine"


class ModuleSettings(Strict, frozen=True):
    """Settings every module accepts (module config structs derive from this)."""


C = TypeVar("C", bound=ModuleSettings)

FailureCallback = Callable[["Module[Any]", BaseException], None]
AdminHandler = Callable[[dict[str, Any]], Awaitable[Any]]
"""An admin command: its JSON arguments in, a JSON-ready result out."""


class Module(Generic[C]):
    """Base of every module (actor). Subclasses set ``Config`` and override the ``on_*`` hooks."""

    Config: ClassVar[type[ModuleSettings]] = ModuleSettings
    role: ClassVar[str] = "module"
    """``source`` modules are stopped first on shutdown; the rest stop in configuration order."""

    def __init__(self, name: str, config: C, ctx: Context) -> None:
        self.name = name
        self.config = config
        self.ctx = ctx
        self.log = logging.getLogger(f"alphaengine.{name}")
        self._state = ModuleState.INITIALIZED
        self._detail = ""
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = asyncio.Event()
        self._on_failure: FailureCallback | None = None
        self.failure: BaseException | None = None
        self.drain_until: float | None = None
        """When draining must end during a graceful stop (monotonic time; None: drain everything)."""
        self._publish_state()

    # -- state ------------------------------------------------------------------------------------

    @property
    def state(self) -> ModuleState:
        """The current lifecycle state."""
        return self._state

    @property
    def detail(self) -> str:
        """Why the module is DEGRADED or FAULTED (empty otherwise)."""
        return self._detail

    @property
    def stopping(self) -> asyncio.Event:
        """Set when a graceful stop has been requested: loops finish their work and return."""
        return self._stopping

    def _transition(self, new: ModuleState, detail: str = "") -> None:
        if new not in _TRANSITIONS[self._state]:
            raise LifecycleError(f"module {self.name}: {self._state} -> {new} is not allowed")
        self.log.debug("%s -> %s %s", self._state, new, detail)
        self._state = new
        self._detail = detail
        self._publish_state()

    def _advance(self, expected: ModuleState, new: ModuleState) -> None:
        """Move to ``new`` only if still in ``expected`` (a failure meanwhile has made it FAULTED)."""
        if self._state is expected:
            self._transition(new)

    def _publish_state(self) -> None:
        for state in ModuleState:
            MODULE_STATE.labels(self.name, state.value).set(1.0 if state is self._state else 0.0)

    def set_degraded(self, reason: str) -> None:
        """Mark the module DEGRADED (working, but impaired) with a reason; a new reason replaces the old."""
        if self._state is ModuleState.RUNNING:
            self.log.warning("degraded: %s", reason)
            self._transition(ModuleState.DEGRADED, reason)
        elif self._state is ModuleState.DEGRADED:
            self._detail = reason

    def set_healthy(self) -> None:
        """Return from DEGRADED to RUNNING."""
        if self._state is ModuleState.DEGRADED:
            self.log.info("recovered from: %s", self._detail)
            self._transition(ModuleState.RUNNING)

    def on_failure(self, callback: FailureCallback) -> None:
        """Register who is told when a task of this module fails (the supervisor)."""
        self._on_failure = callback

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the module; returns once it is ready (RUNNING). A failure leaves it FAULTED."""
        self._transition(ModuleState.STARTING)
        try:
            await self.on_start()
        except BaseException as exc:
            self._fail(exc, notify=False)
            await self._cancel_tasks()
            raise
        self._advance(ModuleState.STARTING, ModuleState.RUNNING)

    async def stop(self, drain_until: float | None = None) -> None:
        """Stop gracefully: ``on_stop`` drains and flushes, then every owned task is cancelled.

        ``drain_until`` (a ``time.monotonic()`` value) bounds the draining: past it a module flushes what
        it holds and stops, leaving the rest in the durable log for the next start. Idempotent; if
        cancelled (a stop deadline), the tasks are still cancelled and awaited. A FAULTED module is only
        cleaned up (see :meth:`abort`).
        """
        self.drain_until = drain_until
        if self._state is ModuleState.FAULTED:
            await self.abort()
            return
        if self._state in (ModuleState.STOPPED, ModuleState.STOPPING, ModuleState.INITIALIZED):
            return
        self._transition(ModuleState.STOPPING)
        self._stopping.set()
        try:
            await self.on_stop()
        finally:
            await self._cancel_tasks()
            self._advance(ModuleState.STOPPING, ModuleState.STOPPED)

    async def abort(self) -> None:
        """Release a failed module at once, without draining: owned tasks are cancelled and awaited.

        The state stays FAULTED; what is not committed is read again by the replacement instance.
        """
        self._stopping.set()
        await self._cancel_tasks()
        try:
            await self.on_abort()
        except Exception:
            self.log.exception("cleanup after failure failed")

    # -- hooks ------------------------------------------------------------------------------------

    async def on_start(self) -> None:
        """Acquire resources and spawn tasks; return when ready to serve."""

    async def on_stop(self) -> None:
        """Finish gracefully: stop taking input, drain, flush, commit. Owned tasks are cancelled after."""

    async def on_abort(self) -> None:
        """Release resources after a failure (no draining); errors here are ignored."""

    def snapshot(self) -> dict[str, Any]:
        """State to hand to a replacement instance (hot reload); JSON-serialisable."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Take over state from :meth:`snapshot` of a previous instance, before :meth:`start`."""

    def queue_depth(self) -> int:
        """Records (or events) held in memory that are not yet durable; exported per module."""
        return 0

    def positions(self) -> dict[str, int]:
        """Where the module reads its topics, per ``topic/partition`` (empty for modules that read none)."""
        return {}

    def task_count(self) -> int:
        """Owned tasks that have not finished."""
        return sum(1 for task in self._tasks if not task.done())

    def health(self) -> dict[str, Any]:
        """Module-specific health details (shown by the admin ``health`` command)."""
        return {}

    def commands(self) -> Mapping[str, AdminHandler]:
        """Admin commands this module serves, by name (the engine routes them to the running instance)."""
        return {}

    # -- tasks ------------------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run a task owned by this module; if it raises, the module fails and the supervisor is told."""
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.name}:{name}")
        self._tasks.append(task)
        task.add_done_callback(self._task_done)
        return task

    async def wait_tasks(self) -> None:
        """Wait for every owned task to finish by itself (used by ``on_stop`` after signalling a drain)."""
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._fail(exc, notify=True)

    def _fail(self, exc: BaseException, *, notify: bool) -> None:
        if self._state in (ModuleState.FAULTED, ModuleState.STOPPED):
            return
        self.failure = exc
        self.log.error("failed: %r", exc, exc_info=exc)
        self._transition(ModuleState.FAULTED, f"{type(exc).__name__}: {exc}")
        if notify and self._on_failure is not None:
            self._on_failure(self, exc)

    async def _cancel_tasks(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in reversed(self._tasks) if t is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._tasks = [t for t in self._tasks if not t.done()]
