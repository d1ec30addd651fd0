"""`alphaengine run --config config/prod.toml` against the local services, as README.md shows it.

The shipped production file, unchanged, with its environment taken from the services' env file (Kafka,
ClickHouse, S3) plus what README.md says to set: a data directory, the ClickHouse user, a free metrics
port, and the synthetic market in place of the live feed. The test's own ClickHouse database and S3
bucket keep it apart from other runs on the same services.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid
from pathlib import Path

import polars as pl

from tests.services.envfile import require

REPO = Path(__file__).resolve().parents[2]
PROD = REPO / "config" / "prod.toml"


def prod_env(services_env: dict[str, str], data_dir: Path) -> dict[str, str]:
    require(services_env, "KAFKA_BOOTSTRAP_SERVERS", "CLICKHOUSE_HOST", "CLICKHOUSE_PORT", "S3_ENDPOINT_URL")
    suffix = uuid.uuid4().hex[:12]
    return {
        **os.environ,
        **services_env,
        "ALPHAENGINE_DATA_DIR": str(data_dir),
        "CLICKHOUSE_USER": "default",
        "CLICKHOUSE_PASSWORD": "",
        "CLICKHOUSE_DATABASE": f"prod_test_{suffix}",
        "S3_BUCKET": f"prod-test-{suffix}",
        "ALPHAENGINE_METRICS_PORT": "0",
        "ALPHAENGINE_METRICS_HOST": "127.0.0.1",
        # No internet here: the synthetic market stands in for the live Binance feed, as README.md says.
        "ALPHAENGINE_BINANCE": "false",
        "ALPHAENGINE_SYNTHETIC": "true",
    }


def cli(env: dict[str, str], *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alphaengine", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def query(env: dict[str, str], sql: str) -> pl.DataFrame:
    done = cli(env, "db", "query", "--config", str(PROD), sql, timeout=60)
    assert done.returncode == 0, done.stderr
    return pl.read_csv(io.StringIO(done.stdout), infer_schema_length=None)


def test_prod_config_stores_every_emitted_tick_once_in_clickhouse(
    services_env: dict[str, str], tmp_path: Path
) -> None:
    env = prod_env(services_env, tmp_path / "data")
    run = cli(env, "run", "--config", str(PROD), "--duration", "15", timeout=240)
    assert run.returncode == 0, run.stderr[-5000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert summary.startswith("ticks received "), run.stdout
    emitted = int(summary.split()[2].rstrip(","))
    assert emitted > 5_000  # the synthetic market of prod.toml emits 2,000 trades a second

    counts = query(env, "SELECT count() AS raw, uniqExact(venue, symbol, trade_id) AS uniq FROM ticks FINAL")
    assert counts["raw"][0] == counts["uniq"][0] == emitted

    # The bar builder resumes at its open bars, so bars of an earlier run on the same topic may appear.
    first_ns = query(env, "SELECT min(ts_ns) AS t FROM ticks")["t"][0]
    bars = query(env, "SELECT ts_ns, trade_count FROM bars FINAL WHERE interval_s = 1").filter(
        pl.col("ts_ns") >= first_ns - first_ns % 1_000_000_000
    )
    assert bars.height > 0
    assert 0 < bars["trade_count"].sum() <= emitted  # the bars still open at the stop are not written

    stored = query(env, "SELECT sum(value) AS n FROM diagnostics FINAL WHERE metric = 'ticks_stored'")
    assert stored["n"][0] == emitted
    lag = query(env, "SELECT count() AS n FROM diagnostics FINAL WHERE metric = 'consumer_lag_records'")
    assert lag["n"][0] > 0
