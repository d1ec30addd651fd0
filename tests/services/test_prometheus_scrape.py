"""A real Prometheus scrapes a running engine: every dashboard query and every alert selector has data.

The engine runs as users run it (``alphaengine run``, a subprocess) on the real Kafka, ClickHouse and S3
services with every module on: a live Binance source against the fake exchange (replaying real
recordings, dropped once so that a gap is backfilled), the synthetic market with a predictable
component, the sinks, bar builder, predictor with a ridge champion, trader, trainer, archiver and
monitor. Debian's Prometheus scrapes it every second with the repository's alert rules loaded. Then:

- every PromQL query of every Grafana dashboard panel returns at least one series;
- every alert rule evaluates without error, and every metric selector in its expression has series;
- every ClickHouse panel query of the dashboards returns rows from the engine's own database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import socket
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from alphaengine.config import ClickHouseStoreConfig, load
from alphaengine.store import ClickHouseStore
from alphaengine.testing.fake_binance import FakeBinance
from alphaengine.testing.tape import Tape
from tests.conftest import REPO, real_file
from tests.services.envfile import require
from tests.services.test_dashboards_clickhouse import clickhouse_targets, expand
from tests.test_trading_e2e import champion_in

DASHBOARDS = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))
RULES = REPO / "deploy" / "prometheus" / "rules"
RECORDINGS = ("btcusdt_20240808.gz", "ethusdt_20240808.gz")
# The recordings' symbols are renamed: the synthetic market trades BTCUSDT and ETHUSDT.
RENAME = {"BTCUSDT": "SOLUSDT", "ETHUSDT": "XRPUSDT"}
RUN_S = 75
"""How long the engine runs before the queries (rate windows need samples on both sides)."""
MACROS = {"$__rate_interval": "30s", "$__range": "5m", "$__interval": "5s"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def live_tape() -> Tape:
    """The recorded trades with their times moved to now, so that latency and idle times are real."""
    recorded = Tape.from_recordings(real_file(f"binance-spot-ws/{name}") for name in RECORDINGS)
    shift = time.time_ns() // 1_000_000 - int(recorded.time_ms[0])
    return Tape.from_columns(
        symbols=np.array([RENAME[recorded.symbols[i]] for i in recorded.symbol_index]),
        trade_ids=recorded.trade_id,
        prices=recorded.price,
        qtys=recorded.qty,
        times_ms=recorded.time_ms + shift,
        buyer_is_maker=recorded.buyer_is_maker,
    )


def engine_toml(root: Path, env: dict[str, str], fake: FakeBinance, metrics_port: int) -> str:
    suffix = uuid.uuid4().hex[:10]
    return f"""
[engine]
name = "scrape"
data_dir = "{root}/data"
stop_deadline_s = 20

[bus]
kind = "kafka"
bootstrap_servers = "{env["KAFKA_BOOTSTRAP_SERVERS"]}"
partitions = 2
journal_path = "{root}/data/journal"

[store]
kind = "clickhouse"
host = "{env["CLICKHOUSE_HOST"]}"
port = {env["CLICKHOUSE_PORT"]}
database = "scrape_{suffix}"
user = "default"
password = ""

[objectstore]
kind = "s3"
bucket = "scrape-{suffix}"
endpoint_url = "{env["S3_ENDPOINT_URL"]}"
region = "{env["AWS_REGION"]}"
access_key_id = "{env["AWS_ACCESS_KEY_ID"]}"
secret_access_key = "{env["AWS_SECRET_ACCESS_KEY"]}"

[metrics]
port = {metrics_port}
host = "127.0.0.1"

[admin]
socket = "{root}/data/admin.sock"

[modules.binance]
type = "binance"
ws_url = "{fake.ws_url}"
rest_url = "{fake.rest_url}"
symbols = {json.dumps(sorted(RENAME.values()))}
reconnect_initial_s = 0.2
gap_grace_s = 0.5
resume_from_store = false

[modules.synthetic]
type = "synthetic"
symbols = ["BTCUSDT", "ETHUSDT"]
rate_per_s = 400
predictability = 0.5
seed = 11

[modules.tick_sink]
type = "tick_sink"

[modules.bar_builder]
type = "bar_builder"
intervals_s = [1, 60]

[modules.bar_sink]
type = "bar_sink"

[modules.predictor]
type = "predictor"
models = ["ridge"]
refresh_s = 1

[modules.trader]
type = "trader"
snapshot_interval_s = 1
equity_interval_s = 2
[modules.trader.limits]
max_orders_per_minute = 60
[modules.trader.sizing]
min_edge_bps = 1
min_volatility_samples = 10
rebalance_fraction = 0.02

[modules.trainer]
type = "trainer"
models = ["ridge"]
first_cycle_s = 5
interval_s = 3600
min_bars = 1000
fee_bps = 1.0

[modules.archiver]
type = "archiver"
interval_s = 20

[modules.monitor]
type = "monitor"
interval_s = 2
"""


@contextlib.asynccontextmanager
async def prometheus(root: Path, target: str) -> AsyncIterator[str]:
    """Debian's Prometheus scraping ``target`` every second with the repository's rules; yields its URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: scripts/services/all.sh installs it", pytrace=False)
    port = free_port()
    config = root / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f'rule_files: ["{RULES}/*.yml"]\n'
        "scrape_configs:\n  - job_name: alphaengine\n"
        f'    static_configs: [{{targets: ["{target}"]}}]\n'
    )
    log = (root / "prometheus.log").open("w")
    proc = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={root / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with asyncio.timeout(60):
            while not await asyncio.to_thread(_ready, url):
                assert proc.returncode is None, (root / "prometheus.log").read_text()[-3000:]
                await asyncio.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        await proc.wait()
        log.close()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def api(url: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{url}/api/v1/{path}{query}", timeout=30) as answer:
        body = json.load(answer)
    assert body["status"] == "success", body
    return body["data"]


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every Prometheus target of every dashboard, with Grafana's macros expanded."""
    found = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                if target.get("datasource", {}).get("type") != "prometheus":
                    continue
                expr = target["expr"]
                for macro, value in MACROS.items():
                    expr = expr.replace(macro, value)
                found.append((f"{path.name} panel {panel['id']} {panel.get('title')!r}", expr))
    return found


SELECTOR = re.compile(r"\b((?:alphaengine|process)_[a-z0-9_]+|up)\b(\{[^}]*\})?")


def alert_selectors(rules: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(alert, metric selector) of every metric selector in every alert expression."""
    found = []
    for rule in rules:
        for name, labels in SELECTOR.findall(rule["query"]):
            found.append((rule["name"], name + labels))
    return found


async def test_prometheus_scrapes_the_engine_and_every_query_has_data(
    services_env: dict[str, str], tmp_path: Path
) -> None:
    require(services_env, "KAFKA_BOOTSTRAP_SERVERS", "CLICKHOUSE_HOST", "CLICKHOUSE_PORT", "S3_ENDPOINT_URL")
    assert len(DASHBOARDS) >= 2
    metrics_port = free_port()
    started_s = int(time.time())
    async with FakeBinance(live_tape(), speed=1.0) as fake:
        config = tmp_path / "engine.toml"
        config.write_text(engine_toml(tmp_path, services_env, fake, metrics_port))
        await champion_in(config)
        log = (tmp_path / "engine.log").open("w")
        engine = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "alphaengine", "run", "--config", str(config), stdout=log, stderr=log
        )
        try:
            async with prometheus(tmp_path, f"127.0.0.1:{metrics_port}") as url:
                await asyncio.sleep(RUN_S / 2)
                assert engine.returncode is None, (tmp_path / "engine.log").read_text()[-5000:]
                assert fake.drop_all() >= 1  # a dropped connection: reconnect, gap, backfill
                await asyncio.sleep(RUN_S / 2)
                assert engine.returncode is None, (tmp_path / "engine.log").read_text()[-5000:]

                empty = [
                    f"{where}: {expr}"
                    for where, expr in dashboard_queries()
                    if not (await asyncio.to_thread(api, url, "query", query=expr))["result"]
                ]
                rules = [
                    rule
                    for group in (await asyncio.to_thread(api, url, "rules"))["groups"]
                    for rule in group["rules"]
                ]
                alerts = [r for r in rules if r["type"] == "alerting"]
                assert len(alerts) >= 6
                unhealthy = [f"{r['name']}: {r.get('lastError')}" for r in alerts if r["health"] != "ok"]
                no_series = [
                    f"{alert}: {selector}"
                    for alert, selector in alert_selectors(alerts)
                    if not (await asyncio.to_thread(api, url, "query", query=f"count({selector})"))["result"]
                ]
                firing = sorted({a["labels"]["alertname"] for r in alerts for a in r.get("alerts", [])})
        finally:
            engine.terminate()
            await asyncio.wait_for(engine.wait(), 60)
            log.close()
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    assert not unhealthy, "alert rules that failed to evaluate:\n" + "\n".join(unhealthy)
    assert not no_series, "alert selectors without series:\n" + "\n".join(no_series)
    # A healthy engine raises none of the critical alerts (pending ones count: none should even start).
    assert "AlphaEngineModuleFaulted" not in firing, firing
    assert "AlphaEngineDown" not in firing, firing
    assert engine.returncode == 0, (tmp_path / "engine.log").read_text()[-5000:]

    # The ClickHouse panels over what the engine itself stored.
    app = load(config).app
    assert isinstance(app.store, ClickHouseStoreConfig)
    store = ClickHouseStore(app.store)
    await store.start()
    try:
        no_rows = []
        for title, sql in clickhouse_targets():
            expanded = expand(sql, app.store.database, started_s - 600, int(time.time()) + 60)
            if not (await store.query(expanded)).num_rows:
                no_rows.append(f"{title}: {expanded}")
    finally:
        await store.query(f"DROP DATABASE IF EXISTS `{app.store.database}`")
        await store.close()
    assert not no_rows, "ClickHouse panels without rows:\n" + "\n".join(no_rows)
