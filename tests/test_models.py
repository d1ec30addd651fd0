"""The five models: they learn a planted signal, find none in noise, round-trip through artifacts, repeat
themselves with a seed, and the sequence model reads each symbol's rows in order."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from alphaengine.errors import ConfigError, ModelError
from alphaengine.models.zoo import META_FILE, MODEL_NAMES, Model, build_model, load

# Keras 3.15 on JAX with NumPy 2 warns from inside Keras (Variable.__array__) when weights are copied.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SYMBOLS = 4
ROWS = 8_000
FEATURES = 6
HELD_OUT = 0.25

# The defaults are sized for millions of rows; on a few thousand, leaves need fewer rows and the networks
# more, smaller steps.
SMALL: dict[str, dict[str, object]] = {
    "ridge": {},
    "forest": {"min_samples_leaf": 40},
    "lgbm": {"min_data_in_leaf": 40, "learning_rate": 0.1},
    "mlp": {"batch_size": 256, "epochs": 12, "patience": 2, "learning_rate": 3e-3},
    "seq": {"batch_size": 256, "epochs": 12, "patience": 2, "learning_rate": 3e-3, "window": 8, "patch": 2},
}


def small(name: str, **params: object) -> Model:
    return build_model(name, **{**SMALL[name], **params})


def corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0 for a constant prediction (a model that learned nothing)."""
    if np.std(a) == 0 or np.std(b) == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def interleaved(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, a noise column and symbols, the symbols' rows interleaved (row i is symbol i % SYMBOLS)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, FEATURES), dtype=np.float32)
    noise = rng.standard_normal(rows).astype(np.float32)
    return x, noise, np.arange(rows, dtype=np.int64) % SYMBOLS


def held_out(groups: np.ndarray) -> np.ndarray:
    """True on the last HELD_OUT of each symbol's rows."""
    out = np.zeros(len(groups), dtype=bool)
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        out[rows[len(rows) - int(len(rows) * HELD_OUT) :]] = True
    return out


class Dataset:
    def __init__(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> None:
        self.x, self.y, self.groups = x, y, groups
        test = held_out(groups)
        self.fit_rows, self.test_rows = np.flatnonzero(~test), np.flatnonzero(test)

    def fit(self, model: Model) -> Model:
        rows = self.fit_rows
        return model.fit(self.x[rows], self.y[rows], self.groups[rows])

    def predict(self, model: Model) -> np.ndarray:
        rows = self.test_rows
        return model.predict(self.x[rows], self.groups[rows])

    def score(self, model: Model) -> float:
        return corr(self.predict(model), self.y[self.test_rows])


@pytest.fixture(scope="module")
def planted() -> Dataset:
    """A linear and a non-linear term in noise: the best possible correlation is about 0.55."""
    x, noise, groups = interleaved(ROWS, seed=1)
    y = 0.5 * x[:, 0] - 0.3 * x[:, 3] + 0.6 * np.tanh(2 * x[:, 1] * x[:, 2]) + noise
    return Dataset(x, y.astype(np.float32), groups)


@pytest.fixture(scope="module")
def fitted(planted: Dataset) -> dict[str, Model]:
    return {name: planted.fit(small(name)) for name in MODEL_NAMES}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_learns_a_planted_signal_out_of_sample(name: str, planted: Dataset, fitted: dict[str, Model]) -> None:
    model = fitted[name]
    assert model.fit_info["train_rows"] > 0
    assert planted.score(model) > 0.3


@pytest.mark.parametrize("name", ["forest", "lgbm", "mlp", "seq"])
def test_non_linear_models_beat_ridge_on_the_non_linear_term(
    name: str, planted: Dataset, fitted: dict[str, Model]
) -> None:
    assert planted.score(fitted[name]) > planted.score(fitted["ridge"]) + 0.04


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_finds_nothing_in_noise(name: str) -> None:
    x, noise, groups = interleaved(ROWS, seed=2)
    data = Dataset(x, noise, groups)
    assert abs(data.score(data.fit(small(name)))) < 0.08


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_save_and_load_give_the_same_predictions(
    name: str, planted: Dataset, fitted: dict[str, Model], tmp_path: Path
) -> None:
    model = fitted[name]
    directory = model.save(tmp_path / name)
    meta = orjson.loads((directory / META_FILE).read_bytes())
    assert meta["name"] == name
    assert meta["params"] == model.params
    assert (directory / meta["artifact"]).is_file()

    for path in (directory, directory / META_FILE):
        loaded = load(path)
        assert type(loaded) is type(model)
        assert loaded.params == model.params
        assert loaded.fit_info == model.fit_info
        np.testing.assert_array_equal(planted.predict(loaded), planted.predict(model))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_seed_makes_a_fit_repeatable(name: str, planted: Dataset, fitted: dict[str, Model]) -> None:
    again = planted.fit(small(name))
    np.testing.assert_array_equal(planted.predict(again), planted.predict(fitted[name]))


# forest draws nothing at random on so few rows (bin edges come from a sample only above 200,000 rows).
@pytest.mark.parametrize("name", ["lgbm", "mlp", "seq"])
def test_another_seed_gives_another_fit(name: str, planted: Dataset, fitted: dict[str, Model]) -> None:
    other = planted.fit(small(name, seed=7))
    assert not np.array_equal(planted.predict(other), planted.predict(fitted[name]))


def test_params_are_checked() -> None:
    assert build_model("lgbm", num_leaves=15).params["num_leaves"] == 15
    with pytest.raises(ConfigError, match="unknown model 'xgb'"):
        build_model("xgb")
    with pytest.raises(ConfigError, match="num_leafs"):
        build_model("lgbm", num_leafs=15)
    with pytest.raises(ConfigError, match="Expected `int`"):
        build_model("forest", max_iter="many")
    with pytest.raises(ConfigError, match="multiple of patch"):
        build_model("seq", window=30, patch=4)


def test_bad_input_is_refused(fitted: dict[str, Model]) -> None:
    x = np.ones((10, FEATURES), dtype=np.float32)
    x[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_model("ridge").fit(x, np.zeros(10, dtype=np.float32))
    with pytest.raises(ValueError, match="y has shape"):
        build_model("ridge").fit(np.ones((10, 2)), np.zeros(9))
    with pytest.raises(ValueError, match="groups"):
        fitted["ridge"].predict(np.ones((10, FEATURES)), groups=np.zeros(9, dtype=np.int64))
    with pytest.raises(ValueError, match="5 features"):
        fitted["ridge"].predict(np.ones((10, 5)))
    with pytest.raises(ModelError, match="not fitted"):
        build_model("mlp").predict(np.ones((10, FEATURES)))


def test_load_refuses_what_is_not_a_model(fitted: dict[str, Model], tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read"):
        load(tmp_path / "missing")
    (tmp_path / META_FILE).write_bytes(orjson.dumps({"format": 1, "class": "os.system", "params": {}}))
    with pytest.raises(ModelError, match="unknown model class"):
        load(tmp_path)
    meta = {"format": 1, "class": "alphaengine.models.zoo.LgbmModel", "params": {}, "artifact": "model.txt"}
    (tmp_path / META_FILE).write_bytes(orjson.dumps(meta))
    with pytest.raises(ModelError, match="incomplete model description, no fit, n_features, state"):
        load(tmp_path)
    saved = fitted["lgbm"].save(tmp_path / "lgbm")
    (saved / "model.txt").unlink()
    with pytest.raises(ModelError, match=r"'model\.txt' is missing"):
        load(saved)


def lagged(rows: int, seed: int) -> Dataset:
    """The target is the previous row's feature 0 *of the same symbol*; symbols in random order."""
    x, noise, _ = interleaved(rows, seed)
    groups = np.random.default_rng(seed).integers(0, SYMBOLS, rows)
    previous = np.zeros(rows, dtype=np.float32)
    for g in range(SYMBOLS):
        rows_of_g = np.flatnonzero(groups == g)
        previous[rows_of_g[1:]] = x[rows_of_g[:-1], 0]
    return Dataset(x, previous + 0.5 * noise, groups)


def test_the_sequence_model_reads_each_symbols_rows_in_order() -> None:
    data = lagged(ROWS, seed=3)
    grouped = data.score(data.fit(small("seq")))
    assert grouped > 0.7
    # A pointwise model cannot see the previous row; seq, told nothing of the symbols, reads the rows
    # of all symbols as one series and can only guess which earlier row is the same symbol's.
    assert abs(data.score(data.fit(small("mlp")))) < 0.1
    mixed = Dataset(data.x, data.y, np.zeros(ROWS, dtype=np.int64))
    assert mixed.score(mixed.fit(small("seq"))) < grouped - 0.2


def test_sequence_predictions_depend_on_each_symbols_rows_not_on_the_layout(fitted: dict[str, Model]) -> None:
    seq = fitted["seq"]
    x, _, groups = interleaved(400, seed=4)
    expected = seq.predict(x, groups)
    blocks = np.argsort(groups, kind="stable")  # the same rows symbol after symbol
    np.testing.assert_allclose(seq.predict(x[blocks], groups[blocks]), expected[blocks], rtol=1e-5, atol=1e-6)


def test_sequence_context_is_the_last_window_of_the_symbol(fitted: dict[str, Model]) -> None:
    seq = fitted["seq"]
    assert seq.context_rows == 8
    assert fitted["mlp"].context_rows == 1
    x, _, _ = interleaved(3_000, seed=5)
    full = seq.predict(x)  # batched through Keras' predict; the small calls below call the network directly
    # The last row needs only its window; the first row is predicted from a padded window either way.
    np.testing.assert_allclose(seq.predict(x[-8:])[-1], full[-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(seq.predict(x[:1])[0], full[0], rtol=1e-5, atol=1e-6)
    assert not np.isclose(seq.predict(x[-7:])[-1], full[-1], rtol=1e-4, atol=1e-5)


class RecordingNet:
    """Passes calls on to a Keras network and records the batch sizes it was given."""

    def __init__(self, net: Any) -> None:
        self.net = net
        self.batch_sizes: set[int] = set()

    def __call__(self, x: Any, training: bool) -> Any:
        self.batch_sizes.add(len(x))
        return self.net(x, training=training)

    def predict(self, batches: Any, verbose: int) -> Any:
        self.batch_sizes.update(len(batches[i][0]) for i in range(len(batches)))
        return self.net.predict(batches, verbose=verbose)


@pytest.mark.parametrize("name", ["mlp", "seq"])
def test_neural_predictions_of_any_size_reach_the_network_in_a_few_batch_sizes(
    fitted: dict[str, Model], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backend compiles the network for every batch size it sees and keeps it: a predictor called
    with every size from 1 to 2,000 would compile that often and grow by gigabytes."""
    from alphaengine.models import _keras

    model = fitted[name]
    x, _, groups = interleaved(3_000, seed=6)
    sizes = (1, 2, 5, 31, 32, 33, 47, 100, 129, 700, 2_048, 2_049, 2_600)
    with monkeypatch.context() as unpadded:
        unpadded.setattr(_keras, "batch_rows", lambda n, batch_size: n)
        expected = {n: model.predict(x[-n:], groups[-n:]) for n in sizes}
    recording = RecordingNet(model._net)  # type: ignore[attr-defined]
    monkeypatch.setattr(model, "_net", recording)
    for n in sizes:
        np.testing.assert_allclose(model.predict(x[-n:], groups[-n:]), expected[n], rtol=1e-5, atol=1e-6)
    batch_size = SMALL[name]["batch_size"]
    assert recording.batch_sizes <= {32, 64, 128, 256, 512, 1_024, 2_048, batch_size}


def test_importing_the_zoo_imports_no_ml_library_and_keras_runs_on_jax() -> None:
    script = (
        "import sys\n"
        "import alphaengine.models.zoo as zoo\n"
        "heavy = {'keras', 'jax', 'sklearn', 'lightgbm'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "import numpy as np\n"
        "zoo.build_model('mlp', epochs=1).fit(np.ones((64, 2), np.float32), np.ones(64, np.float32))\n"
        "import keras\n"
        "print(keras.backend.backend())\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "KERAS_BACKEND"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "jax"
