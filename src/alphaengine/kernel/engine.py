"""The engine runtime: builds the ports and modules from a configuration and runs them on one loop.

``run()`` starts the store, bus and object store, the metrics endpoint, the admin socket and the
modules (in configuration order), then waits for a stop request: SIGTERM/SIGINT, the admin ``stop``
command, ``duration_s``, or (optionally) every source having finished. The graceful stop (sources first,
then each module drains, flushes and commits) must finish within ``engine.stop_deadline_s``; past it,
or on a second signal, the remaining modules are aborted (nothing committed is lost: what was not
committed is read again at the next start).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pyarrow as pa

from alphaengine import metrics
from alphaengine.archive import SCRATCH_DIR, Archive, ArchiveError, PendingPartition
from alphaengine.bus import build_bus
from alphaengine.clock import Clock, LiveClock
from alphaengine.config import LoadedConfig, ModuleConfig, load
from alphaengine.config._schema import ChdbStoreConfig, LocalBusConfig, LocalObjectStoreConfig
from alphaengine.errors import PluginError
from alphaengine.kernel.admin import AdminServer
from alphaengine.kernel.module import Context, ModuleState
from alphaengine.kernel.registry import reload_module_type, resolve_module
from alphaengine.kernel.resources import ResourceSampler
from alphaengine.kernel.supervisor import Supervisor
from alphaengine.objectstore import build_objectstore
from alphaengine.sources.base import TickSource
from alphaengine.store import build_store

log = logging.getLogger("alphaengine.engine")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RunSummary:
    """What one run did (counted from the metrics, so restarts of modules are included)."""

    ticks_received: int
    ticks_stored: int
    bars: int
    seconds: float
    clean: bool
    """Whether the graceful stop finished within the deadline."""

    def line(self) -> str:
        """The one-line summary printed at the end of ``alphaengine run``."""
        rate = self.ticks_received / self.seconds if self.seconds > 0 else 0.0
        return (
            f"ticks received {self.ticks_received}, stored {self.ticks_stored}, bars {self.bars} "
            f"in {self.seconds:.1f} s ({rate:,.0f} ticks/s){'' if self.clean else ', stop deadline exceeded'}"
        )


def resolve_path(path: str) -> Path:
    """Configuration paths are relative to the working directory the engine was started in."""
    return Path(path).expanduser().resolve()


def resolve_config_paths(config: LoadedConfig) -> LoadedConfig:
    """A copy of the configuration with every embedded-state path made absolute."""
    import msgspec  # noqa: PLC0415

    app = config.app
    replace: dict[str, Any] = {
        "engine": msgspec.structs.replace(app.engine, data_dir=str(resolve_path(app.engine.data_dir))),
        "admin": msgspec.structs.replace(app.admin, socket=str(resolve_path(app.admin.socket))),
    }
    if isinstance(app.bus, LocalBusConfig):
        replace["bus"] = msgspec.structs.replace(app.bus, path=str(resolve_path(app.bus.path)))
    if isinstance(app.store, ChdbStoreConfig):
        replace["store"] = msgspec.structs.replace(app.store, path=str(resolve_path(app.store.path)))
    if isinstance(app.objectstore, LocalObjectStoreConfig):
        replace["objectstore"] = msgspec.structs.replace(
            app.objectstore, path=str(resolve_path(app.objectstore.path))
        )
    return LoadedConfig(config.source, msgspec.structs.replace(app, **replace), config.modules)


class Engine:
    """One engine process: ports, modules, supervisor, metrics and admin socket."""

    def __init__(self, config: LoadedConfig, *, clock: Clock | None = None) -> None:
        self.config = resolve_config_paths(config)
        self.clock = clock or LiveClock()
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._stop_reason = ""
        self._started_at = time.monotonic()
        self._reload_lock = asyncio.Lock()
        self.supervisor: Supervisor | None = None
        self.ready = asyncio.Event()
        """Set once every module has been started."""
        self.loop_lag = metrics.LoopLagProbe()
        """Event-loop lag samples of the last run (benchmarks report their quantiles)."""

    def request_stop(self, reason: str) -> None:
        """Ask for a graceful stop; a second request forces it."""
        if self._stop.is_set():
            log.warning("second stop request (%s): aborting what is left", reason)
            self._force.set()
            return
        log.info("stopping: %s", reason)
        self._stop_reason = reason
        self._stop.set()

    async def run(
        self,
        duration_s: float | None = None,
        *,
        until_sources_finish: bool = False,
        handle_signals: bool = True,
    ) -> RunSummary:
        """Run until a stop request; return what was done."""
        app = self.config.app
        base = {m: metrics.total(m) for m in (metrics.TICKS_RECEIVED, metrics.TICKS_STORED, metrics.BARS)}
        started = time.monotonic()
        data_dir = Path(app.engine.data_dir)
        await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
        store = build_store(app.store)
        bus = build_bus(app.bus)
        objects = build_objectstore(app.objectstore)
        await store.start()
        clean = True
        try:
            await bus.start()
            await objects.start()
            ctx = Context(bus, store, objects, self.clock, data_dir, app.engine.name)
            self.supervisor = Supervisor(ctx, app.engine.supervisor)
            for decl in self.config.modules:
                if decl.enabled:
                    self.supervisor.add(decl, resolve_module(decl.type))
            admin = AdminServer(
                Path(app.admin.socket), self._admin_handlers(), app.admin.token, self._module_commands
            )
            await admin.start()
            metrics_server = await self._start_metrics()
            probe = self.loop_lag
            probe.start()
            sampler = ResourceSampler(self.supervisor)
            sampler.start()
            reporter = asyncio.ensure_future(self._report(app.engine.report_interval_s))
            if handle_signals:
                self._install_signal_handlers()
            try:
                await self.supervisor.start_all()
                self.ready.set()
                log.info("engine %s running %d module(s)", app.engine.name, len(self.supervisor.slots))
                await self._wait_for_stop(duration_s, until_sources_finish)
                clean = await self._graceful_stop(app.engine.stop_deadline_s)
            finally:
                if handle_signals:
                    self._remove_signal_handlers()
                reporter.cancel()
                await probe.stop()
                await sampler.stop()
                if metrics_server is not None:
                    await metrics_server.close()
                await admin.close()
        finally:
            await objects.close()
            await bus.close()
            await store.close()
        return RunSummary(
            ticks_received=int(metrics.total(metrics.TICKS_RECEIVED) - base[metrics.TICKS_RECEIVED]),
            ticks_stored=int(metrics.total(metrics.TICKS_STORED) - base[metrics.TICKS_STORED]),
            bars=int(metrics.total(metrics.BARS) - base[metrics.BARS]),
            seconds=time.monotonic() - started,
            clean=clean,
        )

    async def _wait_for_stop(self, duration_s: float | None, until_sources_finish: bool) -> None:
        waiters: dict[asyncio.Future[Any], str] = {asyncio.ensure_future(self._stop.wait()): "stop requested"}
        if duration_s is not None:
            waiters[asyncio.ensure_future(asyncio.sleep(duration_s))] = f"--duration {duration_s:g} s elapsed"
        if until_sources_finish:
            waiters[asyncio.ensure_future(self._sources_finished())] = "every source finished"
        try:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if not self._stop.is_set():
            self.request_stop(waiters[next(iter(done))])

    async def _report(self, interval_s: float) -> None:
        """Log progress periodically, so an operator sees ticks flowing."""
        if interval_s <= 0:
            return
        counters = (metrics.TICKS_RECEIVED, metrics.TICKS_STORED, metrics.BARS)
        last = [metrics.total(c) for c in counters]
        while True:
            await asyncio.sleep(interval_s)
            now = [metrics.total(c) for c in counters]
            rates = [(n - p) / interval_s for n, p in zip(now, last, strict=True)]
            last = now
            log.info(
                "ticks received %d (%.0f/s), stored %d (%.0f/s), bars %d; event-loop lag %.1f ms",
                now[0],
                rates[0],
                now[1],
                rates[1],
                now[2],
                (self.loop_lag.samples[-1] if self.loop_lag.samples else 0.0) * 1e3,
            )

    async def _sources_finished(self) -> None:
        assert self.supervisor is not None
        while True:
            sources = [
                s.instance for s in self.supervisor.slots.values() if isinstance(s.instance, TickSource)
            ]
            if all(s.finished.is_set() for s in sources):
                return
            await asyncio.sleep(0.1)

    async def _graceful_stop(self, deadline_s: float) -> bool:
        assert self.supervisor is not None
        # Draining ends well before the deadline, leaving time to flush and commit what was read.
        drain_until = time.monotonic() + 0.6 * deadline_s
        stopping = asyncio.ensure_future(self.supervisor.stop_all(drain_until))
        forced = asyncio.ensure_future(self._force.wait())
        done, _ = await asyncio.wait(
            {stopping, forced}, timeout=deadline_s, return_when=asyncio.FIRST_COMPLETED
        )
        forced.cancel()
        if stopping in done:
            stopping.result()
            return True
        log.error("graceful stop did not finish within %.1f s: aborting the remaining modules", deadline_s)
        stopping.cancel()
        await asyncio.gather(stopping, return_exceptions=True)
        for slot in self.supervisor.slots.values():
            await slot.instance.abort()
        return False

    async def _start_metrics(self) -> Any:
        cfg = self.config.app.metrics
        if not cfg.enabled:
            return None
        from prometheus_async.aio.web import start_http_server  # noqa: PLC0415  (imports aiohttp)

        server = await start_http_server(addr=cfg.host, port=cfg.port)
        log.info("metrics on %s", server.url)
        return server

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, signal.Signals(sig).name)

    def _remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

    # -- admin ------------------------------------------------------------------------------------

    def _admin_handlers(self) -> dict[str, Any]:
        return {
            "status": self._cmd_status,
            "health": self._cmd_health,
            "query": self._cmd_query,
            "stop": self._cmd_stop,
            "reload": self._cmd_reload,
            "archive_pending": self._cmd_archive_pending,
            "archive_run": self._cmd_archive_run,
            "archive_list": self._cmd_archive_list,
            "archive_restore": self._cmd_archive_restore,
        }

    def _module_commands(self) -> dict[str, Any]:
        """The admin commands of the running module instances (a restarted module's new instance)."""
        if self.supervisor is None:
            return {}
        commands: dict[str, Any] = {}
        for slot in self.supervisor.slots.values():
            commands.update(slot.instance.commands())
        return commands

    async def _cmd_status(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self.supervisor is not None
        return {
            "engine": self.config.app.engine.name,
            "pid": os.getpid(),
            "config": self.config.source,
            "uptime_s": round(time.monotonic() - self._started_at, 3),
            "stopping": self._stop.is_set(),
            "ticks_received": int(metrics.total(metrics.TICKS_RECEIVED)),
            "ticks_stored": int(metrics.total(metrics.TICKS_STORED)),
            "bars": int(metrics.total(metrics.BARS)),
            "modules": self.supervisor.status(),
        }

    async def _cmd_health(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self.supervisor is not None
        modules = []
        for slot in self.supervisor.slots.values():
            modules.append(
                {
                    "module": slot.name,
                    "state": slot.state.value,
                    "detail": slot.instance.detail or slot.last_error,
                    "gave_up": slot.gave_up,
                    **slot.instance.health(),
                }
            )
        healthy = self.ready.is_set() and all(
            m["state"] in (ModuleState.RUNNING, ModuleState.DEGRADED) for m in modules
        )
        return {"healthy": healthy, "modules": modules}

    async def _cmd_query(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self.supervisor is not None
        sql = args.get("sql")
        if not isinstance(sql, str) or not sql.strip():
            raise ValueError('query needs {"sql": "<SELECT ...>"}')
        table: pa.Table = await self.supervisor.ctx.store.query(sql)
        return {"columns": table.column_names, "rows": [list(r.values()) for r in table.to_pylist()]}

    async def _cmd_stop(self, args: dict[str, Any]) -> dict[str, Any]:
        self.request_stop("admin stop command")
        return {"stopping": True}

    async def _cmd_reload(self, args: dict[str, Any]) -> dict[str, Any]:
        """``{"module": name}``: re-import the module's plugin code, re-read its section, swap it in."""
        assert self.supervisor is not None
        name = args.get("module")
        if name not in self.supervisor.slots:
            known = ", ".join(self.supervisor.slots)
            raise PluginError(f"reload needs a running module's name, not {name!r} (modules: {known})")
        if self._stop.is_set():
            raise PluginError("the engine is stopping: nothing is reloaded")
        async with self._reload_lock:
            began = time.monotonic()
            slot = self.supervisor.slots[name]
            cls = reload_module_type(slot.decl.type)
            decl = self._reread_module(name)
            if decl.type != slot.decl.type:
                cls = reload_module_type(decl.type)
                decl = self._reread_module(name)
            log.info("reloading module %s (%s from %s)", name, decl.type, inspect.getfile(cls))
            outcome = await self.supervisor.replace(name, cls, decl)
            seconds = time.monotonic() - began
            log.info("module %s reloaded in %.2f s, reading on from %s", name, seconds, outcome.resumed_from)
        return {
            "module": name,
            "type": decl.type,
            "file": inspect.getfile(cls),
            "seconds": round(seconds, 3),
            **asdict(outcome),
        }

    def _reread_module(self, name: str) -> ModuleConfig:
        """The module's declaration from the configuration file as it is now (with the current code)."""
        source = Path(self.config.source)
        if not source.is_file():
            raise PluginError(f"the configuration {self.config.source!r} is not a file to read again")
        decl = next((m for m in load(source).modules if m.name == name), None)
        if decl is None or not decl.enabled:
            raise PluginError(
                f"module {name} is no longer enabled in {source}: a reload cannot remove a module "
                "(restart the engine for that)"
            )
        return decl

    # `alphaengine archive` sends these while the engine holds the store (chDB: one process per
    # directory). Every Archive over the same store shares one lock with the archiver module's.

    def _archive(self) -> Archive:
        assert self.supervisor is not None
        ctx = self.supervisor.ctx
        return Archive(ctx.store, ctx.objects, ctx.data_dir / SCRATCH_DIR, ctx.clock)

    async def _cmd_archive_pending(self, args: dict[str, Any]) -> Any:
        """``{"cutoffs": {"<table>": "YYYY-MM-DD"}}``: the partitions older than their cutoff."""
        cutoffs = _archive_args(args.get("cutoffs"), dict[str, date])
        return msgspec.to_builtins(await self._archive().pending(cutoffs))

    async def _cmd_archive_run(self, args: dict[str, Any]) -> Any:
        """``{"table": ..., "day": "YYYY-MM-DD"}``: archive one day; its report, or null if it has no rows."""
        partition = _archive_args(args, PendingPartition)
        return msgspec.to_builtins(await self._archive().archive_day(partition.table, partition.day))

    async def _cmd_archive_list(self, args: dict[str, Any]) -> Any:
        """The archive manifest."""
        return msgspec.to_builtins(await self._archive().manifest())

    async def _cmd_archive_restore(self, args: dict[str, Any]) -> Any:
        """``{"table": ..., "day": "YYYY-MM-DD"}``: insert an archived day back; its entry and row count."""
        partition = _archive_args(args, PendingPartition)
        entry, rows = await self._archive().restore(partition.table, partition.day)
        return {"entry": msgspec.to_builtins(entry), "rows": rows}


def _archive_args(args: Any, kind: type[T]) -> T:
    try:
        return msgspec.convert(args, kind)
    except msgspec.ValidationError as exc:
        raise ArchiveError(f"bad arguments {args!r}: {exc}") from None
