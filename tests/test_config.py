"""Configuration: strict typed decoding, environment interpolation and complete error lists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from alphaengine.config import ChdbStoreConfig, KafkaBusConfig, LocalBusConfig, MemoryBusConfig, load, loads
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
    assert [m.name for m in dev.modules] == ["source", "tick_sink", "bar_builder", "bar_sink", "archiver"]
    for name in ("CLICKHOUSE_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "secret")
    prod = load(REPO / "config" / "prod.toml")
    assert isinstance(prod.app.bus, KafkaBusConfig)
    assert prod.app.metrics.port == 9464
    assert prod.app.admin.socket


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
