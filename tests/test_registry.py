"""The model registry: versions, champion and challenger, promotion, demotion, rollback, fetch, prune."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from alphaengine.clock import SimClock
from alphaengine.models import build_model, load_model
from alphaengine.models.registry import ModelRegistry, RegistryError
from alphaengine.objectstore.base import ObjectStore
from alphaengine.objectstore.local import LocalObjectStore
from alphaengine.objectstore.memory import MemoryObjectStore

NS = 1_000_000_000
T0 = 1_764_000_000 * NS


def info(model: str = "ridge", end_ns: int = T0) -> dict[str, Any]:
    return {
        "model": model,
        "data": {
            "start_ns": end_ns - 3600 * NS,
            "end_ns": end_ns,
            "rows": 100,
            "symbols": ["SYNTH:BTCUSDT"],
            "interval_s": 1,
            "source": "store",
        },
        "feature_set": "core-000000000000",
        "feature_params": {},
        "features": ["a", "b", "c"],
        "target": "target_ret_60",
        "horizon_bars": 60,
        "params": {},
        "code_version": "0.1.0+test",
        "validation": {"candidate": {"ic": 0.1, "net_pnl": 0.2}},
        "decision": ["pass: everything"],
    }


def saved_ridge(directory: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((200, 3))
    y = x[:, 0] + rng.standard_normal(200)
    return build_model("ridge").fit(x, y).save(directory)


@pytest.fixture(params=["memory", "local"])
async def objects(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ObjectStore]:
    store: ObjectStore = (
        MemoryObjectStore() if request.param == "memory" else LocalObjectStore(tmp_path / "obj")
    )
    await store.start()
    yield store
    await store.close()


@pytest.fixture
def clock() -> SimClock:
    return SimClock(T0)


@pytest.fixture
def registry(objects: ObjectStore, clock: SimClock, tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(objects, clock, tmp_path / "cache")


async def register(registry: ModelRegistry, clock: SimClock, tmp_path: Path, seed: int) -> str:
    clock.advance(1.0)
    artifact = saved_ridge(tmp_path / f"artifact-{seed}", seed)
    return (await registry.register(artifact, info(end_ns=clock.now_ns()), max_age_s=600.0)).version


async def test_a_registered_version_is_the_challenger_and_reads_back(
    registry: ModelRegistry, clock: SimClock, tmp_path: Path
) -> None:
    version = await register(registry, clock, tmp_path, 1)
    state = await registry.state("ridge")
    assert (state.champion, state.challenger, state.earlier) == (None, version, [])
    stored = await registry.version("ridge", version)
    assert stored.model == "ridge"
    assert stored.created_ns == clock.now_ns()
    assert stored.expires_ns == clock.now_ns() + 600 * NS
    assert set(stored.files) == {"model.json", "model.pkl"}
    assert await registry.versions("ridge") == [version]
    assert await registry.versions("lgbm") == []
    assert not stored.expired(clock.now_ns() + 599 * NS)
    assert stored.expired(clock.now_ns() + 600 * NS)


async def test_promote_demote_and_rollback_keep_a_history(
    registry: ModelRegistry, clock: SimClock, tmp_path: Path
) -> None:
    first = await register(registry, clock, tmp_path, 1)
    state = await registry.promote("ridge", None, by="trainer", reason="beat the baselines")
    assert (state.champion, state.challenger) == (first, None)
    second = await register(registry, clock, tmp_path, 2)
    assert (await registry.state("ridge")).champion == first  # registering does not promote
    state = await registry.promote("ridge", second, by="operator", reason="by hand")
    assert (state.champion, state.earlier) == (second, [first])

    state = await registry.rollback("ridge", by="operator", reason="second looks wrong")
    assert (state.champion, state.earlier) == (first, [])
    state = await registry.demote("ridge", by="trainer", reason="recent IC 0")
    assert (state.champion, state.earlier) == (None, [first])
    state = await registry.rollback("ridge", by="operator", reason="undo the demotion")
    assert state.champion == first
    assert [(c.action, c.champion, c.previous, c.by) for c in state.history] == [
        ("promote", first, None, "trainer"),
        ("promote", second, first, "operator"),
        ("rollback", first, second, "operator"),
        ("demote", None, first, "trainer"),
        ("rollback", first, None, "operator"),
    ]
    assert (await registry.champion("ridge")).version == first  # type: ignore[union-attr]


async def test_impossible_changes_are_refused_with_a_reason(
    registry: ModelRegistry, clock: SimClock, tmp_path: Path
) -> None:
    with pytest.raises(RegistryError, match="no challenger"):
        await registry.promote("ridge", None, by="operator", reason="")
    with pytest.raises(RegistryError, match="no champion"):
        await registry.demote("ridge", by="operator", reason="")
    with pytest.raises(RegistryError, match="no earlier champion"):
        await registry.rollback("ridge", by="operator", reason="")
    with pytest.raises(RegistryError, match="no version"):
        await registry.promote("ridge", "20990101T000000Z-00000000", by="operator", reason="")
    with pytest.raises(RegistryError, match="unknown model"):
        await registry.state("prophet")
    version = await register(registry, clock, tmp_path, 1)
    await registry.promote("ridge", version, by="operator", reason="")
    with pytest.raises(RegistryError, match="already the champion"):
        await registry.promote("ridge", version, by="operator", reason="")


async def test_fetch_downloads_a_loadable_model_and_refuses_altered_files(
    registry: ModelRegistry, objects: ObjectStore, clock: SimClock, tmp_path: Path
) -> None:
    version = await register(registry, clock, tmp_path, 1)
    path = await registry.fetch("ridge", version)
    model = load_model(path)
    original = load_model(tmp_path / "artifact-1")
    x = np.random.default_rng(5).standard_normal((10, 3))
    np.testing.assert_array_equal(model.predict(x), original.predict(x))
    assert await registry.fetch("ridge", version) == path  # cached

    key = f"models/ridge/versions/{version}/model.pkl"
    await objects.put(key, (await objects.get(key)) + b"tampered")
    (path / "model.pkl").unlink()  # force a new download
    with pytest.raises(RegistryError, match="SHA-256"):
        await registry.fetch("ridge", version)


async def test_prune_spares_champion_challenger_earlier_and_newest(
    registry: ModelRegistry, objects: ObjectStore, clock: SimClock, tmp_path: Path
) -> None:
    versions = [await register(registry, clock, tmp_path, seed) for seed in range(6)]
    await registry.promote("ridge", versions[0], by="trainer", reason="")
    await registry.promote("ridge", versions[1], by="trainer", reason="")  # versions[0] is now earlier
    # An interrupted registration: artifact files without version.json.
    await objects.put("models/ridge/versions/20000101T000000Z-deadbeef/model.json", b"{}")
    deleted = await registry.prune("ridge", keep=2)
    assert sorted(deleted) == sorted([versions[2], versions[3], "20000101T000000Z-deadbeef"])
    assert await registry.versions("ridge") == [versions[0], versions[1], versions[4], versions[5]]
    assert not [o for o in await objects.list("models/ridge/versions/") if "deadbeef" in o.key]
