"""The engine as users run it: the `alphaengine` command on the embedded stack (local bus, chDB)."""

from __future__ import annotations

import csv
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import real_file
from tests.reference import assert_bars_equal, reference_bars

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, source: str, metrics_port: int | None = None) -> Path:
    metrics = f"port = {metrics_port}" if metrics_port else "port = 0\nenabled = false"
    path = tmp_path / "engine.toml"
    path.write_text(
        f"""
[engine]
name = "test"
data_dir = "{tmp_path}/var"
stop_deadline_s = 20
[bus]
kind = "local"
path = "{tmp_path}/var/bus"
[store]
kind = "chdb"
path = "{tmp_path}/var/chdb"
[objectstore]
kind = "local"
path = "{tmp_path}/var/objects"
[metrics]
{metrics}
[admin]
socket = "{tmp_path}/var/admin.sock"
{source}
[modules.tick_sink]
type = "tick_sink"
[modules.bar_builder]
type = "bar_builder"
intervals_s = [1, 60]
[modules.bar_sink]
type = "bar_sink"
"""
    )
    return path


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alphaengine", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def query(config: Path, sql: str) -> pl.DataFrame:
    done = cli("db", "query", "--config", str(config), sql)
    assert done.returncode == 0, done.stderr
    return pl.read_csv(io.StringIO(done.stdout), infer_schema_length=None)


def summary_ticks(stdout: str) -> int:
    line = stdout.strip().splitlines()[-1]
    assert line.startswith("ticks received "), stdout
    return int(line.split()[2].rstrip(","))


def start_engine(config: Path) -> subprocess.Popen[str]:
    """Start `alphaengine run` in the background and return once its health check passes."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "alphaengine", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while cli("admin", "--config", str(config), "health").returncode != 0:
        if proc.poll() is not None:
            pytest.fail(f"engine exited early: {proc.communicate()[1]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("engine did not become healthy within 60 s")
        time.sleep(0.2)
    return proc


def stored_ticks(config: Path) -> pl.DataFrame:
    return query(config, "SELECT venue, symbol, trade_id, ts_ns, price, qty, side FROM ticks FINAL")


def check_bars(config: Path, ticks: pl.DataFrame) -> None:
    bars = query(config, "SELECT * FROM bars FINAL")
    for interval in (1, 60):
        assert_bars_equal(bars.filter(pl.col("interval_s") == interval), reference_bars(ticks, interval))


SYNTHETIC = """
[modules.source]
type = "synthetic"
rate_per_s = 5000
seed = 7
"""


def test_run_with_duration_stores_every_tick_once_and_restart_adds_without_duplicates(tmp_path: Path) -> None:
    config = write_config(tmp_path, SYNTHETIC)
    first = cli("run", "--config", str(config), "--duration", "6")
    assert first.returncode == 0, first.stderr
    emitted = summary_ticks(first.stdout)
    assert emitted > 10_000
    counts = query(config, "SELECT count() AS raw, uniqExact(venue, symbol, trade_id) AS uniq FROM ticks")
    assert counts["raw"][0] == counts["uniq"][0] == emitted

    second = cli("run", "--config", str(config), "--duration", "4")
    assert second.returncode == 0, second.stderr
    emitted += summary_ticks(second.stdout)
    counts = query(config, "SELECT count() AS raw, uniqExact(venue, symbol, trade_id) AS uniq FROM ticks")
    assert counts["raw"][0] == counts["uniq"][0] == emitted
    check_bars(config, stored_ticks(config))


def test_running_engine_serves_admin_metrics_and_queries_then_stops_on_sigint(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, SYNTHETIC, metrics_port=port)
    proc = start_engine(config)
    try:
        status = cli("admin", "--config", str(config), "status")
        assert status.returncode == 0
        assert "tick_sink" in status.stdout
        assert "RUNNING" in status.stdout
        time.sleep(2)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        for name in (
            'alphaengine_ticks_received_total{source="source",symbol="BTCUSDT"}',
            'alphaengine_ticks_stored_total{symbol="BTCUSDT"}',
            'alphaengine_bars_total{interval="1s",symbol="BTCUSDT"}',
            "alphaengine_event_loop_lag_seconds",
            'alphaengine_module_state{module="tick_sink",state="RUNNING"} 1.0',
        ):
            assert name in body, name
        # chDB lets one process open the directory: the query goes through the running engine.
        live = query(config, "SELECT count() AS n FROM ticks")
        assert live["n"][0] > 0
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    emitted = summary_ticks(out)
    assert query(config, "SELECT count() AS n FROM ticks FINAL")["n"][0] == emitted


def test_admin_help_lists_one_command_a_line() -> None:
    from click.testing import CliRunner

    from alphaengine.cli import main

    help_text = CliRunner().invoke(main, ["admin", "--help"]).output
    assert "\n  rollback MODEL                  return to the previous champion\n" in help_text


def replay_source(*files: Path, speed: str = '"max"') -> str:
    names = ", ".join(f'"{f}"' for f in files)
    return f'[modules.source]\ntype = "replay"\nfiles = [{names}]\nspeed = {speed}\n'


@pytest.mark.parametrize(
    ("name", "trades"),
    [("btcusdt_20240808.gz", 9_757), ("btcusdt_20240809.gz", 10_147), ("ethusdt_20240808.gz", 6_106)],
)
def test_real_recordings_replayed_through_the_engine(tmp_path: Path, name: str, trades: int) -> None:
    config = write_config(tmp_path, replay_source(real_file(f"binance-spot-ws/{name}")))
    done = cli("run", "--config", str(config), "--until-sources-finish")
    assert done.returncode == 0, done.stderr
    assert summary_ticks(done.stdout) == trades
    ticks = stored_ticks(config)
    assert ticks.height == trades
    ids = ticks["trade_id"].sort()
    assert ids.diff().drop_nulls().eq(1).all()
    assert ids[-1] - ids[0] + 1 == trades
    check_bars(config, ticks)


def test_sigkill_mid_replay_then_restart_stores_every_trade_exactly_once(tmp_path: Path) -> None:
    files = (
        real_file("binance-spot-ws/btcusdt_20240808.gz"),
        real_file("binance-spot-ws/btcusdt_20240809.gz"),
    )
    config = write_config(tmp_path, replay_source(*files, speed="30.0"))
    proc = start_engine(config)
    try:
        time.sleep(3)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = query(config, "SELECT count() AS n FROM ticks FINAL")["n"][0]
    assert 0 < partial < 19_904
    again = cli("run", "--config", str(config), "--until-sources-finish", timeout=300)
    assert again.returncode == 0, again.stderr
    ticks = stored_ticks(config)
    assert ticks.height == 19_904
    assert ticks["trade_id"].n_unique() == 19_904
    assert ticks["trade_id"].min() == 3_735_683_259
    assert ticks["trade_id"].max() == 3_735_703_162
    check_bars(config, ticks)


def test_bad_config_starts_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path, SYNTHETIC.replace("rate_per_s = 5000", 'rate_per_s = "fast"'))
    done = cli("run", "--config", str(config), "--duration", "1")
    assert done.returncode == 2
    assert "modules.source.rate_per_s" in done.stderr
    assert not (tmp_path / "var").exists()


def test_csv_output_has_a_header(tmp_path: Path) -> None:
    config = write_config(tmp_path, SYNTHETIC)
    done = cli("db", "query", "--config", str(config), "SELECT 1 AS one, 'a' AS letter")
    assert done.returncode == 0, done.stderr
    assert list(csv.reader(io.StringIO(done.stdout))) == [["one", "letter"], ["1", "a"]]
