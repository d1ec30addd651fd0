"""Every ClickHouse panel of the Grafana dashboards runs on the ClickHouse server and returns rows.

The trader and the tick sink write their tables (signals, fills, orders, equity; ticks) into a fresh
database on the real server (18.16 in this tier), as they do in production; each panel's SQL then runs
there with the Grafana macros expanded as the grafana-clickhouse-datasource plugin expands them. (The
model registry lives in the object store, not in a table: the models dashboard reads the model versions
from the signals.)
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from alphaengine.bus.memory import MemoryBus
from alphaengine.clock import LiveClock
from alphaengine.config import ClickHouseStoreConfig
from alphaengine.kernel.module import Context
from alphaengine.objectstore.memory import MemoryObjectStore
from alphaengine.pipeline.sinks import SinkSettings, TickSink
from alphaengine.store import ClickHouseStore
from alphaengine.trading.module import Trader
from tests.services.envfile import require
from tests.test_pipeline import drained
from tests.test_trader import publish, settle, trader_settings
from tests.trading_market import NS, SECONDS, T0

DASHBOARDS = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards"


def clickhouse_targets() -> list[tuple[str, str]]:
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                if target.get("datasource", {}).get("type") == "grafana-clickhouse-datasource":
                    out.append((f"{path.stem}: {panel['title']}", target["rawSql"]))
    return out


def expand(sql: str, database: str, start_s: int, end_s: int) -> str:
    """A panel's SQL as Grafana's ClickHouse plugin sends it, over ``database`` and a time range."""
    return re.sub(
        r"\$__timeFilter\((\w+)\)",
        lambda m: f"{m[1]} >= toDateTime({start_s}) AND {m[1]} <= toDateTime({end_s})",
        sql,
    ).replace("alphaengine.", f"{database}.")


@pytest.fixture
async def ctx(services_env: dict[str, str], tmp_path: Path) -> AsyncIterator[Context]:
    host, port = require(services_env, "CLICKHOUSE_HOST", "CLICKHOUSE_PORT")
    database = f"test_{uuid.uuid4().hex[:16]}"
    store = ClickHouseStore(ClickHouseStoreConfig(host=host, port=int(port), database=database))
    bus, objects = MemoryBus(), MemoryObjectStore()
    for part in (bus, store, objects):
        await part.start()
    yield Context(bus=bus, store=store, objects=objects, clock=LiveClock(), data_dir=tmp_path)
    await store.query(f"DROP DATABASE IF EXISTS `{database}`")  # the store's own connection
    for part in (objects, store, bus):
        await part.close()


def test_the_dashboards_have_clickhouse_panels() -> None:
    dashboards = {title.split(":")[0] for title, _ in clickhouse_targets()}
    assert {"alphaengine-trading", "alphaengine-models", "alphaengine-ticks"} <= dashboards


async def test_every_clickhouse_panel_returns_rows(ctx: Context) -> None:
    store = ctx.store
    assert isinstance(store, ClickHouseStore)
    for topic in ("ticks", "predictions"):
        await ctx.bus.create_topic(topic)
    trader = Trader("trader", trader_settings(), ctx)
    sink = TickSink("tick_sink", SinkSettings(flush_interval_s=0.05), ctx)
    for module in (trader, sink):
        await module.start()
    await publish(ctx, 0, SECONDS)
    await settle(trader, T0 + (SECONDS - 10) * NS)
    await drained(ctx, sink, "ticks")
    for module in (trader, sink):
        await module.stop()

    database = store.config.database
    for title, sql in clickhouse_targets():
        expanded = expand(sql, database, T0 // NS, T0 // NS + SECONDS)
        table = await store.query(expanded)
        assert table.num_rows > 0, f"{title}: no rows from {expanded}"
