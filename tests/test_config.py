"""Configuration: strict typed decoding, environment interpolation and complete error lists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from alphaengine.config import (
    ChdbStoreConfig,
    ClickHouseStoreConfig,
    KafkaBusConfig,
    LocalBusConfig,
    MemoryBusConfig,
    load,
    loads,
)
from alphaengine.errors import ConfigError
from alphaengine.pipeline.bar_builder import BarBuilderSettings

REPO = Path(__file__).resolve().parents[1]

MINIMAL = """
[metrics]
port = 9464
[admin]
socket = "var/admin.sock"
"""


def problems(text: str, **env: str) -> list[str]:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        with pytest.raises(ConfigError) as info:
            loads(text, source="test.toml")
    return info.value.problems


def test_shipped_configs_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    dev = load(REPO / "config" / "dev.toml")
    assert isinstance(dev.app.bus, LocalBusConfig)
    assert isinstance(dev.app.store, ChdbStoreConfig)
    modules = [
        "source",
        "tick_sink",
        "bar_builder",
        "bar_sink",
        "predictor",
        "trader",
        "archiver",
        "trainer",
        "monitor",
    ]
    assert [m.name for m in dev.modules] == modules
    for name in ("CLICKHOUSE_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "secret")
    for name in (
        "CLICKHOUSE_PORT",
        "KAFKA_PARTITIONS",
        "ALPHAENGINE_METRICS_PORT",
        "CLICKHOUSE_SECURE",
        "ALPHAENGINE_BINANCE",
        "ALPHAENGINE_FINNHUB",
        "ALPHAENGINE_SYNTHETIC",
        "ALPHAENGINE_TRAINER",
    ):
        monkeypatch.delenv(name, raising=False)
    prod = load(REPO / "config" / "prod.toml")
    assert isinstance(prod.app.bus, KafkaBusConfig)
    assert isinstance(prod.app.store, ClickHouseStoreConfig)
    assert (prod.app.store.port, prod.app.store.secure, prod.app.bus.partitions) == (9000, False, 12)
    assert prod.app.metrics.port == 9464
    assert prod.app.admin.socket
    sources = ["binance", "finnhub", "synthetic"]
    assert [m.name for m in prod.modules] == sources + modules[1:]
    # Live Binance by default; the others are there to be switched on from the environment.
    assert [m.name for m in prod.modules if m.enabled] == ["binance", *modules[1:]]

    monkeypatch.setenv("CLICKHOUSE_PORT", "19000")
    monkeypatch.setenv("KAFKA_PARTITIONS", "3")
    monkeypatch.setenv("ALPHAENGINE_METRICS_PORT", "0")
    monkeypatch.setenv("ALPHAENGINE_BINANCE", "false")
    monkeypatch.setenv("ALPHAENGINE_SYNTHETIC", "true")
    prod = load(REPO / "config" / "prod.toml")
    assert [m.name for m in prod.modules if m.enabled] == ["synthetic", *modules[1:]]
    assert isinstance(prod.app.store, ClickHouseStoreConfig)
    assert isinstance(prod.app.bus, KafkaBusConfig)
    assert (prod.app.store.port, prod.app.bus.partitions, prod.app.metrics.port) == (19000, 3, 0)

    monkeypatch.setenv("ALPHAENGINE_TRAINER", "false")
    prod = load(REPO / "config" / "prod.toml")
    assert "trainer" not in [m.name for m in prod.modules if m.enabled]


def test_defaults_and_module_settings_are_typed() -> None:
    cfg = loads(MINIMAL + '[modules.bars]\ntype = "bar_builder"\nintervals_s = [5, 60]\n')
    assert isinstance(cfg.app.bus, MemoryBusConfig)
    settings = cfg.module("bars").settings
    assert isinstance(settings, BarBuilderSettings)
    assert settings.intervals_s == (5, 60)
    with pytest.raises(AttributeError):
        settings.intervals_s = (1,)  # type: ignore[misc]


def test_unknown_key_is_named_with_its_path() -> None:
    found = problems(MINIMAL + "[engine]\nnmae = 'x'\n")
    assert len(found) == 1
    assert found[0].startswith("engine.nmae: unknown key")


def test_wrong_type_is_named_with_its_path() -> None:
    found = problems('[metrics]\nport = "http"\n[admin]\nsocket = "a.sock"\n')
    assert found == ["metrics.port: expected int, got str"]


def test_missing_required_value() -> None:
    found = problems("[metrics]\nport = 1\n")
    assert found == ["admin: missing required value (AdminConfig)"]
    found = problems("[metrics]\n[admin]\nsocket = 'a'\n")
    assert found == ["metrics.port: missing required value (int)"]


def test_unset_environment_variable_is_named() -> None:
    text = MINIMAL + '[store]\nkind = "clickhouse"\npassword = "${AE_TEST_UNSET_PASSWORD}"\n'
    assert problems(text) == ["store.password: environment variable AE_TEST_UNSET_PASSWORD is not set"]


def test_environment_interpolation_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AE_TEST_HOST", "db.internal")
    cfg = loads(
        MINIMAL + '[store]\nkind = "clickhouse"\nhost = "${AE_TEST_HOST}"\nuser = "${AE_TEST_NOPE:-reader}"\n'
    )
    assert cfg.app.store.host == "db.internal"  # type: ignore[union-attr]
    assert cfg.app.store.user == "reader"  # type: ignore[union-attr]


def test_interpolated_values_take_the_type_of_their_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AE_TEST_PORT", "19000")
    monkeypatch.setenv("AE_TEST_SECURE", "true")
    monkeypatch.setenv("AE_TEST_PASSWORD", "12345")
    monkeypatch.setenv("AE_TEST_INTERVAL", " 5 ")
    cfg = loads(
        """
[metrics]
port = "${AE_TEST_NOPE:-9464}"
enabled = "${AE_TEST_NOPE:-false}"
[admin]
socket = "var/admin.sock"
[store]
kind = "clickhouse"
port = "${AE_TEST_PORT}"
secure = "${AE_TEST_SECURE}"
password = "${AE_TEST_PASSWORD}"
user = "${AE_TEST_PORT}"
backoff_initial_s = "${AE_TEST_NOPE:-0.25}"
[modules.bars]
type = "bar_builder"
intervals_s = ["${AE_TEST_INTERVAL}", 60]
"""
    )
    assert (cfg.app.metrics.port, cfg.app.metrics.enabled) == (9464, False)
    store = cfg.app.store
    assert isinstance(store, ClickHouseStoreConfig)
    assert (store.port, store.secure, store.backoff_initial_s) == (19000, True, 0.25)
    # A string key stays a string, whatever it looks like.
    assert (store.password, store.user) == ("12345", "19000")
    settings = cfg.module("bars").settings
    assert isinstance(settings, BarBuilderSettings)
    assert settings.intervals_s == (5, 60)


def test_a_quoted_number_written_in_the_file_is_still_an_error() -> None:
    assert problems('[metrics]\nport = "9464"\n[admin]\nsocket = "a.sock"\n') == [
        "metrics.port: expected int, got str"
    ]


def test_a_failed_conversion_names_the_key_the_variable_and_what_was_expected() -> None:
    text = """
[metrics]
port = "${AE_TEST_PORT}"
[admin]
socket = "a.sock"
[store]
kind = "clickhouse"
secure = "${AE_TEST_SECURE}"
pool_size = "${AE_TEST_NOPE:-four}"
[modules.bars]
type = "bar_builder"
intervals_s = ["${AE_TEST_INTERVAL}"]
"""
    found = problems(text, AE_TEST_PORT="http", AE_TEST_SECURE="yes", AE_TEST_INTERVAL="0")
    assert found == [
        "metrics.port: expected int, got 'http' from environment variable AE_TEST_PORT",
        "store.secure: expected bool, got 'yes' from environment variable AE_TEST_SECURE",
        "store.pool_size: expected int, got 'four' from the default of ${AE_TEST_NOPE:-four}",
        "modules.bars.intervals_s[0]: expected int >= 1, got '0' from environment variable AE_TEST_INTERVAL",
    ]


def test_an_unset_variable_of_a_typed_key_is_one_problem() -> None:
    found = problems('[metrics]\nport = "${AE_TEST_UNSET_PORT}"\n[admin]\nsocket = "a.sock"\n')
    assert found == ["metrics.port: environment variable AE_TEST_UNSET_PORT is not set"]


def test_every_error_is_reported_at_once() -> None:
    text = """
[metrics]
port = "x"
[admin]
sock = "a"
[bus]
kind = "carrier-pigeon"
[modules.bars]
type = "bar_builder"
intervals_s = [0]
colour = "red"
[modules.mystery]
type = "no_such_plugin"
"""
    found = problems(text)
    assert "metrics.port: expected int, got str" in found
    assert any(p.startswith("admin.sock: unknown key") for p in found)
    assert "admin.socket: missing required value (str)" in found
    assert any(p.startswith("bus.kind: expected one of ['kafka', 'local', 'memory']") for p in found)
    assert any(p.startswith("modules.bars.intervals_s[0]: expected int >= 1") for p in found)
    assert any(p.startswith("modules.bars.colour: unknown key") for p in found)
    assert any(p.startswith("modules.mystery.type: cannot load module type 'no_such_plugin'") for p in found)
    assert len(found) == 7


def test_module_by_import_path() -> None:
    cfg = loads(MINIMAL + '[modules.sink]\ntype = "alphaengine.pipeline.sinks:TickSink"\n')
    assert cfg.module("sink").type == "alphaengine.pipeline.sinks:TickSink"
    found = problems(MINIMAL + '[modules.sink]\ntype = "alphaengine.domain:TickBatch"\n')
    assert found[0].startswith("modules.sink.type: cannot load module type")
    assert "not an alphaengine Module subclass" in found[0]


def test_config_check_command_exit_codes(tmp_path: Path) -> None:
    good = subprocess.run(
        [sys.executable, "-m", "alphaengine", "config", "check", str(REPO / "config" / "dev.toml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert good.returncode == 0, good.stderr
    bad_file = tmp_path / "bad.toml"
    bad_file.write_text('[metrics]\nport = "x"\n[admin]\nsocket = "a"\n[engine]\nstop_deadline = 3\n')
    bad = subprocess.run(
        [sys.executable, "-m", "alphaengine", "config", "check", str(bad_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert f"{bad_file}: metrics.port: expected int, got str" in lines
    assert any(line.startswith(f"{bad_file}: engine.stop_deadline: unknown key") for line in lines)
