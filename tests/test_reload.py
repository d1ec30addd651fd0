"""Hot reload: `admin reload <module>` swaps in edited plugin code and settings while ticks flow.

A consumer plugin is written to a temporary package, the engine runs it behind a synthetic source on the
local bus, and the test edits the plugin's file and its configuration section, reloads it through the
admin socket, and afterwards reads back everything the plugin published: every tick record was handled
exactly once, by the old code up to the reload and by the new code after it, and the state it handed over
continued without a break.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest

import alphaengine.pipeline.bar_builder
from alphaengine.bus import LocalBusConfig, build_bus
from alphaengine.bus.base import Record
from alphaengine.cli import _render_reload
from alphaengine.config import ModuleConfig, SupervisorConfig, load
from alphaengine.domain import TickBatch
from alphaengine.kernel import admin
from alphaengine.kernel.engine import Engine
from alphaengine.kernel.module import Context
from alphaengine.kernel.registry import reload_module_type, resolve_module
from alphaengine.kernel.supervisor import Supervisor
from alphaengine.pipeline.bar_builder import BarBuilder, BarBuilderSettings
from alphaengine.pipeline.sinks import SinkSettings
from tests.reference import assert_bars_equal, reference_bars
from tests.test_kernel import engine_config, eventually
from tests.test_pipeline import T0, make_ticks, publish
from tests.test_trading_e2e import keep_everything

PLUGIN = '''
"""A consumer that republishes where each tick record was and which code handled it."""

import asyncio
from typing import Any, ClassVar

import orjson

from alphaengine.bus.base import OffsetAndMetadata, Record, RecordMetadata, TopicPartition
from alphaengine.kernel.module import ModuleSettings
from alphaengine.pipeline.consumer import ConsumerModule, ConsumerSettings

VERSION = {version}


class EchoSettings(ConsumerSettings, frozen=True):
    tag: str = "unset"


class Echo(ConsumerModule[EchoSettings]):
    Config: ClassVar[type[ModuleSettings]] = EchoSettings

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.handled = 0
        self._pending: list[asyncio.Future[RecordMetadata]] = []
        self._next: dict[TopicPartition, int] = {{}}

    def topics(self) -> list[str]:
        return ["ticks"]

    async def on_start(self) -> None:
        {on_start}
        await super().on_start()

    async def handle(self, records: list[Record]) -> None:
        for record in records:
            seen = [record.partition, record.offset, VERSION, self.config.tag, self.handled]
            self._pending.append(await self.ctx.bus.send("seen", orjson.dumps(seen)))
            self._next[record.tp] = record.offset + 1
            self.handled += 1

    async def flush(self) -> dict[TopicPartition, OffsetAndMetadata]:
        await asyncio.gather(*self._pending)
        self._pending.clear()
        offsets, self._next = self._next, {{}}
        return {{tp: OffsetAndMetadata(offset) for tp, offset in offsets.items()}}

    def snapshot(self) -> dict[str, Any]:
        return {{"handled": self.handled}}

    def restore(self, state: dict[str, Any]) -> None:
        self.handled = state.get("handled", 0)
'''


def write_plugin(path: Path, version: int, on_start: str = "pass") -> None:
    # The padding changes the file's size with every version, so a bytecode cache written in the same
    # second as the edit can never be taken for the new source.
    path.write_text(PLUGIN.format(version=version, on_start=on_start) + "#" * version + "\n")


def write_config(path: Path, tmp_path: Path, package: str, tag: str) -> None:
    modules = f"""
[bus]
kind = "local"
path = "{tmp_path}/bus"
partitions = 2

[modules.source]
type = "synthetic"
symbols = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
rate_per_s = 2000

[modules.echo]
type = "{package}:Echo"
tag = "{tag}"
"""
    path.write_text(engine_config(tmp_path, modules))


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory on sys.path with a uniquely named plugin module (removed afterwards)."""
    package = f"reloadable_{uuid.uuid4().hex[:8]}"
    root = tmp_path / "plugins"
    root.mkdir()
    sys.path.insert(0, str(root))
    try:
        yield root / f"{package}.py", package
    finally:
        sys.path.remove(str(root))
        sys.modules.pop(package, None)


async def read_topic(bus_dir: Path, topic: str) -> list[Record]:
    """Everything written to ``topic``, read with the group :func:`keep_everything` registered."""
    bus = build_bus(LocalBusConfig(path=str(bus_dir), partitions=2))
    await bus.start()
    try:
        consumer = bus.consumer(f"verify-{topic}", [topic])
        await consumer.start()
        records: list[Record] = []
        while batch := await consumer.getmany(10_000, 0.2):
            records.extend(batch)
        assert await consumer.lag() == 0
        await consumer.close()
        return records
    finally:
        await bus.close()


async def handled(bus_dir: Path) -> tuple[list[tuple[int, int]], list[list[Any]]]:
    """The (partition, offset) of every tick record, sorted, and everything the plugin published."""
    ticks = await read_topic(bus_dir, "ticks")
    seen = [orjson.loads(r.value) for r in await read_topic(bus_dir, "seen")]
    return sorted((r.partition, r.offset) for r in ticks), seen


async def seen_count(sock: Path) -> int:
    status = await admin.request(sock, "status")
    return int(status["ticks_received"])


@contextlib.asynccontextmanager
async def echo_engine(tmp_path: Path, plugin: Path, package: str) -> AsyncIterator[tuple[Engine, Path]]:
    """An engine running version 1 of the plugin (tag "before"); yields it and its config file.

    On leaving, the engine is stopped and must have stopped cleanly.
    """
    config = tmp_path / "engine.toml"
    write_plugin(plugin, version=1)
    write_config(config, tmp_path, package, tag="before")
    await keep_everything(tmp_path / "bus", ("ticks", "seen"), partitions=2)
    engine = Engine(load(config))
    run = asyncio.ensure_future(engine.run(handle_signals=False))
    await eventually(engine.ready.is_set, 30)
    yield engine, config
    engine.request_stop("test over")
    assert (await asyncio.wait_for(run, 30)).clean


async def test_reload_under_load_swaps_code_and_settings_losing_and_repeating_nothing(
    tmp_path: Path, plugin_dir: tuple[Path, str]
) -> None:
    plugin, package = plugin_dir
    sock = tmp_path / "admin.sock"
    async with echo_engine(tmp_path, plugin, package) as (_, config):
        start = await seen_count(sock)
        await asyncio.sleep(1.0)

        write_plugin(plugin, version=2)
        write_config(config, tmp_path, package, tag="after")
        result = await admin.request(sock, "reload", {"module": "echo"})
        assert result["module"] == "echo"
        assert result["file"] == str(plugin)
        assert result["state_keys"] == ["handled"]
        # The new instance reads on exactly where the old one stopped, on every partition.
        assert result["resumed_from"] == result["stopped_at"]
        assert set(result["resumed_from"]) == {"ticks/0", "ticks/1"}
        assert "reads on from offset" in _render_reload(result)
        await asyncio.sleep(1.0)
        assert await seen_count(sock) > start  # ticks kept flowing across the reload
        health = await admin.request(sock, "health")
        assert health["healthy"], health

    ticks, seen = await handled(tmp_path / "bus")
    # Every tick record handled exactly once: nothing lost, nothing twice.
    assert sorted((p, o) for p, o, *_ in seen) == ticks
    # The old code with the old settings up to the reload, the new code with the new settings after.
    versions = {(v, tag) for *_, v, tag, _ in seen}
    assert versions == {(1, "before"), (2, "after")}
    for partition in (0, 1):
        in_order = sorted((o, v) for p, o, v, *_ in seen if p == partition)
        cut = result["resumed_from"][f"ticks/{partition}"]
        assert all(v == (1 if o < cut else 2) for o, v in in_order)
    # The handed-over counter continued: 0..n-1, each once.
    assert sorted(count for *_, count in seen) == list(range(len(seen)))


async def test_a_reload_that_fails_keeps_the_previous_code_running(
    tmp_path: Path, plugin_dir: tuple[Path, str]
) -> None:
    plugin, package = plugin_dir
    sock = tmp_path / "admin.sock"
    async with echo_engine(tmp_path, plugin, package) as (engine, config):
        plugin.write_text("this is not python\n")
        with pytest.raises(admin.AdminError, match="cannot reload"):
            await admin.request(sock, "reload", {"module": "echo"})
        write_plugin(plugin, version=2, on_start='raise RuntimeError("new code is broken")')
        with pytest.raises(
            admin.AdminError, match=r"new code is broken.*previous code and settings run again"
        ):
            await admin.request(sock, "reload", {"module": "echo"})
        write_config(config, tmp_path, package, tag="after")
        config.write_text(config.read_text().replace('tag = "after"', "tag = 7"))
        with pytest.raises(admin.AdminError, match="tag"):
            await admin.request(sock, "reload", {"module": "echo"})
        with pytest.raises(admin.AdminError, match="modules: source, echo"):
            await admin.request(sock, "reload", {"module": "nope"})
        health = await admin.request(sock, "health")
        assert health["healthy"], health
        await asyncio.sleep(0.5)

    ticks, seen = await handled(tmp_path / "bus")
    assert sorted((p, o) for p, o, *_ in seen) == ticks
    # Only the first code ever handled a record: the broken versions never took over.
    assert {v for _, _, v, *_ in seen} == {1}
    assert engine.supervisor is not None
    assert engine.supervisor.slots["echo"].decl.settings.tag == "before"  # type: ignore[attr-defined]


@pytest.fixture
def restore_bar_builder_module() -> Iterator[None]:
    """Put the original bar builder module back: other tests hold its classes."""
    name = "alphaengine.pipeline.bar_builder"
    original = sys.modules[name]
    try:
        yield
    finally:
        sys.modules[name] = original
        alphaengine.pipeline.bar_builder = original


async def test_reloading_the_bar_builder_mid_stream_keeps_every_bar_exact(
    ctx: Context, restore_bar_builder_module: None
) -> None:
    """The built-in bar builder hands its open bars over through its commit: the bars stay exact."""
    await ctx.bus.create_topic("ticks")
    supervisor = Supervisor(ctx, SupervisorConfig())
    builder = ModuleConfig("bar_builder", "bar_builder", True, BarBuilderSettings(intervals_s=(1, 5)))
    supervisor.add(builder, resolve_module("bar_builder"))
    supervisor.add(ModuleConfig("bar_sink", "bar_sink", True, SinkSettings()), resolve_module("bar_sink"))
    await supervisor.start_all()
    batches = [make_ticks("AAAUSDT", 4000, 1, T0, 5), make_ticks("BBBUSDT", 4000, 1, T0, 6)]
    ticks = pl.concat([pl.from_arrow(b.data) for b in batches])  # type: ignore[misc]

    async def trickle() -> None:
        for start in range(0, 4000, 40):
            await publish(ctx, [TickBatch(b.data.slice(start, 40)) for b in batches])
            await asyncio.sleep(0.002)

    publishing = asyncio.ensure_future(trickle())
    try:
        await asyncio.sleep(0.1)
        assert not publishing.done()  # the reload happens while ticks flow
        fresh = reload_module_type("bar_builder")
        assert fresh is not BarBuilder
        outcome = await supervisor.replace("bar_builder", fresh, builder)
        assert not publishing.done()
        assert outcome.resumed_from == outcome.stopped_at
        assert type(supervisor.module("bar_builder")) is fresh
        await publishing
    finally:
        await supervisor.stop_all()
    bars = pl.from_arrow(await ctx.store.query("SELECT * FROM bars FINAL"))
    for interval in (1, 5):
        # Bars still open at the stop stay open (the next start completes them): compare the closed ones.
        expected = reference_bars(ticks, interval)
        done = bars.filter(pl.col("interval_s") == interval)  # type: ignore[union-attr]
        assert len(done) >= len(expected) - 2
        assert_bars_equal(done, expected.head(len(done)))
