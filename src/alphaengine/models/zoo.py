"""The five models behind one interface: ``ridge``, ``forest``, ``lgbm``, ``mlp`` and ``seq``.

Every model is a :class:`Model`: built by name with :func:`build_model` (unknown or ill-typed parameters
raise :class:`~alphaengine.errors.ConfigError`), fitted with ``fit(X, y, groups)``, used with
``predict(X, groups)``, written with ``save(directory)`` and read back with :func:`load`.

Inputs
    ``X`` is float32 ``[n, f]`` (other float dtypes are converted, at the cost of a copy), ``y`` float32
    ``[n]``, ``groups`` an optional int ``[n]``: the series (symbol) of each row. Within a group rows are
    in time order; groups may come in blocks or interleaved. Inputs must be finite: callers drop rows
    with nulls (``features.training_frame`` does); a NaN or an infinity raises ``ValueError``.
Validation tail
    The models that stop early (all but ``ridge``) hold out the last ``val_fraction`` of each group's rows,
    its most recent ones whatever the layout, and stop when the loss on them stops falling. These are
    in-sample choices of the number of trees or epochs; honest out-of-sample scores are the job of
    :mod:`alphaengine.models.validation`. The rows just before the tail are not purged: the overlap of
    their forward-return targets with the tail's only makes early stopping slightly optimistic.
Subsampling
    ``max_train_rows`` (and ``max_val_rows`` for the networks) cap the rows used, drawn at random from the
    training part: what makes five models on 3 million rows fit in two minutes on two cores
    (``bench/models.py``).
Standardization
    ``ridge`` and the networks standardize inputs with means and deviations of their training rows,
    stored in the artifact; the networks also clip standardized inputs and targets to ``+-clip`` (fat
    tails would otherwise dominate a squared loss) and un-standardize their output.
Determinism
    A model fitted twice on the same data with the same ``seed`` predicts the same values. The Keras
    models seed Python's, NumPy's global and the backend's generators (process-global state).
Artifacts
    ``save(directory)`` writes ``model.json`` (class, parameters, feature count, scalers, fit summary) and
    one artifact: a pickle for scikit-learn (load only artifacts this engine wrote: unpickling runs
    code), LightGBM's text model, a ``.keras`` archive. Keras and its backend (``$KERAS_BACKEND``,
    ``jax`` by default) are imported only when a Keras model is fitted, used or loaded.
"""

from __future__ import annotations

import os
import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Final, Self, TypeVar

import msgspec
import numpy as np
import numpy.typing as npt
import orjson

from alphaengine.config import Strict
from alphaengine.errors import ConfigError, ModelError

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

META_FILE: Final = "model.json"
"""The file of a saved model that :func:`load` reads first."""
_FORMAT: Final = 1

_PREDICT_CHUNK_ROWS: Final = 1 << 18
"""scikit-learn's tree models convert inputs to float64: predicting in chunks bounds that copy."""

_SCALER_CHUNK_ROWS: Final = 1 << 16

_Positive = Annotated[int, msgspec.Meta(ge=1)]
_PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
_NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
_Fraction = Annotated[float, msgspec.Meta(gt=0, le=1)]
_ValFraction = Annotated[float, msgspec.Meta(ge=0, lt=1)]


# --------------------------------------------------------------------------------------------- params


class RidgeParams(Strict, frozen=True):
    """Parameters of ``ridge``: standardized least squares with an L2 penalty."""

    alpha: _NonNegativeFloat = 1.0
    max_train_rows: _Positive | None = None
    seed: int = 0


class ForestParams(Strict, frozen=True):
    """Parameters of ``forest`` (scikit-learn's ``HistGradientBoostingRegressor``)."""

    learning_rate: _PositiveFloat = 0.1
    max_iter: _Positive = 200
    max_leaf_nodes: Annotated[int, msgspec.Meta(ge=2)] = 31
    min_samples_leaf: _Positive = 1000
    l2_regularization: _NonNegativeFloat = 1.0
    max_bins: Annotated[int, msgspec.Meta(ge=2, le=255)] = 63
    n_iter_no_change: _Positive = 10
    val_fraction: _ValFraction = 0.1
    max_train_rows: _Positive | None = 1_000_000
    seed: int = 0


class LgbmParams(Strict, frozen=True):
    """Parameters of ``lgbm`` (LightGBM's regression objective)."""

    learning_rate: _PositiveFloat = 0.05
    num_boost_round: _Positive = 300
    num_leaves: Annotated[int, msgspec.Meta(ge=2)] = 31
    min_data_in_leaf: _Positive = 1000
    feature_fraction: _Fraction = 0.8
    bagging_fraction: _Fraction = 0.5
    lambda_l2: _NonNegativeFloat = 1.0
    max_bin: Annotated[int, msgspec.Meta(ge=2)] = 63
    early_stopping_rounds: _Positive = 20
    num_threads: _Positive = 2
    val_fraction: _ValFraction = 0.1
    max_train_rows: _Positive | None = 1_000_000
    seed: int = 0


class MlpParams(Strict, frozen=True):
    """Parameters of ``mlp`` (Keras)."""

    hidden: tuple[_Positive, ...] = (64, 32)
    dropout: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.1
    learning_rate: _PositiveFloat = 1e-3
    batch_size: _Positive = 2048
    epochs: _Positive = 5
    patience: _Positive = 1
    clip: _PositiveFloat = 5.0
    val_fraction: _ValFraction = 0.1
    max_train_rows: _Positive | None = 1_000_000
    max_val_rows: _Positive | None = 200_000
    seed: int = 0


class SeqParams(Strict, frozen=True):
    """Parameters of ``seq`` (Keras): a convolutional network over the last ``window`` rows of a group."""

    window: Annotated[int, msgspec.Meta(ge=2)] = 32
    patch: _Positive = 4
    filters: _Positive = 32
    hidden: _Positive = 32
    dropout: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.1
    learning_rate: _PositiveFloat = 1e-3
    batch_size: _Positive = 1024
    epochs: _Positive = 5
    patience: _Positive = 1
    clip: _PositiveFloat = 5.0
    val_fraction: _ValFraction = 0.1
    max_train_rows: _Positive | None = 400_000
    max_val_rows: _Positive | None = 50_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.window % self.patch:
            raise ValueError(f"window ({self.window}) must be a multiple of patch ({self.patch})")


S = TypeVar("S", bound=Strict)


def _settings(kind: type[S], params: Mapping[str, Any], name: str) -> S:
    try:
        return msgspec.convert(dict(params), kind)
    except msgspec.ValidationError as exc:
        raise ConfigError([str(exc)], source=f"parameters of model {name!r}") from None


# ----------------------------------------------------------------------------------------- the model


class Model(ABC):
    """A regressor of a forward return on one row of features (``seq``: on a window of a group's rows).

    Subclasses implement ``_fit``, ``_predict``, ``_save_artifact`` and ``_load_artifact``; the public
    methods check inputs and state, so every model rejects the same bad input the same way.
    """

    name: ClassVar[str]
    """The registry name (one of :data:`MODEL_NAMES`)."""
    kind: ClassVar[str]
    """The library behind it: ``sklearn``, ``lightgbm`` or ``keras``."""
    settings: Strict

    def __init__(self) -> None:
        self.n_features: int | None = None
        """Columns of ``X`` at fit time; ``None`` until fitted."""
        self.fit_info: dict[str, int] = {}
        """What the last fit used: ``train_rows``, ``val_rows``, and ``iterations`` or ``epochs`` run."""

    @property
    def params(self) -> dict[str, Any]:
        """Every parameter, defaults included, as JSON-ready values."""
        params: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(self.settings))
        return params

    @property
    def context_rows(self) -> int:
        """Rows of a group's history ``predict`` uses for one row's prediction, the row included.

        1 for the pointwise models. To predict the latest row of each symbol with full context, pass at
        least this many most recent rows of each symbol.
        """
        return 1

    def fit(self, X: npt.ArrayLike, y: npt.ArrayLike, groups: npt.ArrayLike | None = None) -> Self:
        """Fit on rows ``X`` with targets ``y``; ``groups`` is the series of each row (see module doc)."""
        x = _features(X)
        target = np.ascontiguousarray(y, dtype=np.float32)
        if target.shape != (len(x),):
            raise ValueError(f"y has shape {target.shape}, expected ({len(x)},)")
        if not np.isfinite(target).all():
            raise ValueError("y has NaN or infinite values: drop rows with nulls before fitting")
        if len(x) == 0:
            raise ValueError("no rows to fit on")
        self.fit_info = self._fit(x, target, _groups(groups, len(x)))
        self.n_features = x.shape[1]
        return self

    def predict(self, X: npt.ArrayLike, groups: npt.ArrayLike | None = None) -> F32:
        """Predictions for the rows of ``X``, float32 ``[n]`` in the same order."""
        if self.n_features is None:
            raise ModelError(f"model {self.name!r} is not fitted")
        x = _features(X)
        if x.shape[1] != self.n_features:
            raise ValueError(f"X has {x.shape[1]} features, the model was fitted on {self.n_features}")
        return np.asarray(self._predict(x, _groups(groups, len(x))), dtype=np.float32).reshape(len(x))

    def save(self, directory: Path) -> Path:
        """Write the fitted model into ``directory`` (created if missing); returns ``directory``."""
        if self.n_features is None:
            raise ModelError(f"model {self.name!r} is not fitted")
        directory.mkdir(parents=True, exist_ok=True)
        artifact, state = self._save_artifact(directory)
        meta = {
            "format": _FORMAT,
            "class": _qualified_name(type(self)),
            "name": self.name,
            "kind": self.kind,
            "params": self.params,
            "n_features": self.n_features,
            "artifact": artifact,
            "state": state,
            "fit": self.fit_info,
        }
        (directory / META_FILE).write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
        return directory

    @classmethod
    def _restore(cls, directory: Path, meta: Mapping[str, Any]) -> Model:
        model = cls(**meta["params"])
        model._load_artifact(directory / meta["artifact"], meta["state"])
        model.n_features = int(meta["n_features"])
        model.fit_info = dict(meta["fit"])
        return model

    @abstractmethod
    def _fit(self, x: F32, y: F32, groups: I64 | None) -> dict[str, int]:
        """Fit; returns the fit summary."""

    @abstractmethod
    def _predict(self, x: F32, groups: I64 | None) -> F32:
        """Predict (inputs checked)."""

    @abstractmethod
    def _save_artifact(self, directory: Path) -> tuple[str, dict[str, Any]]:
        """Write the artifact; returns its file name and the JSON-ready state ``model.json`` keeps."""

    @abstractmethod
    def _load_artifact(self, path: Path, state: Mapping[str, Any]) -> None:
        """Read what :meth:`_save_artifact` wrote."""


# --------------------------------------------------------------------------------------------- inputs


def _features(X: npt.ArrayLike) -> F32:
    x = np.ascontiguousarray(X, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"X has shape {x.shape}, expected (rows, features)")
    if not np.isfinite(x).all():
        raise ValueError("X has NaN or infinite values: drop rows with nulls first")
    return x


def _groups(groups: npt.ArrayLike | None, n: int) -> I64 | None:
    if groups is None:
        return None
    g = np.asarray(groups)
    if g.shape != (n,) or not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"groups must be integers of shape ({n},), got {g.dtype} {g.shape}")
    return g.astype(np.int64, copy=False)


@dataclass(frozen=True, slots=True)
class _Layout:
    """Rows by group, time order kept within a group: group ``j`` is ``order[starts[j]:][:sizes[j]]``."""

    order: I64
    starts: I64
    sizes: I64

    @classmethod
    def of(cls, groups: I64 | None, n: int) -> _Layout:
        if groups is None:
            return cls(np.arange(n, dtype=np.int64), np.zeros(1, np.int64), np.full(1, n, np.int64))
        order = np.argsort(groups, kind="stable").astype(np.int64, copy=False)
        sorted_groups = groups[order]
        starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]]).astype(np.int64)
        return cls(order, starts, np.diff(np.r_[starts, n]).astype(np.int64))


def _time_split(n: int, groups: I64 | None, val_fraction: float) -> tuple[I64, I64]:
    """Row numbers (ascending) to train on and to validate on: the last ``val_fraction`` of each group."""
    layout = _Layout.of(groups, n)
    rank = np.arange(n, dtype=np.int64) - np.repeat(layout.starts, layout.sizes)
    train_size = layout.sizes - (layout.sizes * val_fraction).astype(np.int64)
    in_train = rank < np.repeat(train_size, layout.sizes)
    return np.sort(layout.order[in_train]), np.sort(layout.order[~in_train])


def _subsample(rows: I64, max_rows: int | None, rng: np.random.Generator) -> I64:
    """At most ``max_rows`` of ``rows`` drawn without replacement, ascending."""
    if max_rows is None or len(rows) <= max_rows:
        return rows
    return np.sort(rng.choice(rows, size=max_rows, replace=False))


@dataclass(frozen=True, slots=True)
class _Scaler:
    """Per-column standardization, clipped to ``+-clip``; columns without spread are only centred."""

    mean: F32
    std: F32
    clip: float

    @classmethod
    def fit(cls, x: F32, clip: float) -> _Scaler:
        # float64 accumulators, a chunk of rows at a time: a float32 running sum over millions of rows
        # loses digits, and a float64 copy of the whole of x would double the memory of a fit.
        chunks = range(0, len(x), _SCALER_CHUNK_ROWS)
        total = np.zeros(x.shape[1], dtype=np.float64)
        for begin in chunks:
            total += x[begin : begin + _SCALER_CHUNK_ROWS].sum(axis=0, dtype=np.float64)
        mean = total / len(x)
        squares = np.zeros(x.shape[1], dtype=np.float64)
        for begin in chunks:
            deviation = x[begin : begin + _SCALER_CHUNK_ROWS] - mean
            squares += np.einsum("ij,ij->j", deviation, deviation)
        std = np.sqrt(squares / len(x))
        std[std == 0] = 1.0
        return cls(mean.astype(np.float32), std.astype(np.float32), clip)

    def apply(self, x: F32) -> F32:
        """Standardize ``x`` in place and return it."""
        x -= self.mean
        x /= self.std
        np.clip(x, -self.clip, self.clip, out=x)
        return x

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "clip": self.clip}

    @classmethod
    def from_json(cls, state: Mapping[str, Any]) -> _Scaler:
        return cls(
            np.asarray(state["mean"], dtype=np.float32),
            np.asarray(state["std"], dtype=np.float32),
            float(state["clip"]),
        )


@dataclass(frozen=True, slots=True)
class _Windows:
    """For every row, the standardized last ``window`` rows of its group (itself last), as a strided view.

    ``padded`` holds each group's rows after ``window - 1`` rows of zeros (the feature means, once
    standardized); ``starts[i]`` is where row ``i``'s window begins in it. A row with fewer than
    ``window - 1`` predecessors in its group thus sees zeros in place of the missing history.
    """

    padded: F32
    starts: I64
    window: int

    @classmethod
    def build(cls, x: F32, groups: I64 | None, scaler: _Scaler, window: int) -> _Windows:
        layout = _Layout.of(groups, len(x))
        pad = window - 1
        padded = np.empty((len(x) + pad * len(layout.starts), x.shape[1]), dtype=np.float32)
        starts = np.empty(len(x), dtype=np.int64)
        for j, (start, size) in enumerate(zip(layout.starts.tolist(), layout.sizes.tolist(), strict=True)):
            base = start + j * pad
            rows = layout.order[start : start + size]
            # Padding with the means makes it exactly zero after standardization.
            padded[base : base + pad] = scaler.mean
            padded[base + pad : base + pad + size] = x[rows]
            starts[rows] = np.arange(base, base + size, dtype=np.int64)
        return cls(scaler.apply(padded), starts, window)

    def take(self, rows: I64) -> F32:
        """The windows of ``rows``: a new float32 array ``[len(rows), window, features]``."""
        # [m, 1, window, f] view: no window is copied until gathered here.
        view = np.lib.stride_tricks.sliding_window_view(self.padded, (self.window, self.padded.shape[1]))
        return np.ascontiguousarray(view[self.starts[rows], 0])


def _passive_openmp() -> None:
    """Make OpenMP threads sleep, not spin, while they wait for work (before the first OpenMP import).

    The models share two cores with the engine: spinning threads take CPU from its event loop, and
    under load LightGBM's own threads spin against each other (measured with other work on the
    machine: one fit took 10 to 35 s with OpenMP's default policy, 11.5 s each time with ``PASSIVE``).
    A policy set in the environment is left alone.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _predict_in_chunks(predict: Callable[[F32], Any], x: F32) -> F32:
    out = np.empty(len(x), dtype=np.float32)
    for begin in range(0, len(x), _PREDICT_CHUNK_ROWS):
        out[begin : begin + _PREDICT_CHUNK_ROWS] = predict(x[begin : begin + _PREDICT_CHUNK_ROWS])
    return out


# ------------------------------------------------------------------------------------ scikit-learn


class _SklearnModel(Model):
    """A scikit-learn estimator (or pipeline) in ``_estimator``, predicted in chunks, pickled whole."""

    kind = "sklearn"

    def __init__(self) -> None:
        super().__init__()
        self._estimator: Any = None

    def _predict(self, x: F32, groups: I64 | None) -> F32:
        return _predict_in_chunks(self._estimator.predict, x)

    def _save_artifact(self, directory: Path) -> tuple[str, dict[str, Any]]:
        (directory / "model.pkl").write_bytes(pickle.dumps(self._estimator, protocol=5))
        return "model.pkl", {}

    def _load_artifact(self, path: Path, state: Mapping[str, Any]) -> None:
        _passive_openmp()  # unpickling imports scikit-learn
        self._estimator = pickle.loads(path.read_bytes())  # only artifacts this engine wrote


class RidgeModel(_SklearnModel):
    """``ridge``: scikit-learn's ``StandardScaler`` then ``Ridge``, on every row by default.

    The closed-form solution over ``f x f`` normal equations takes about a second on 3 million rows.
    """

    name = "ridge"
    settings: RidgeParams

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.settings = _settings(RidgeParams, params, self.name)

    def _fit(self, x: F32, y: F32, groups: I64 | None) -> dict[str, int]:
        _passive_openmp()
        from sklearn.linear_model import Ridge  # noqa: PLC0415  (scikit-learn is imported when used)
        from sklearn.pipeline import make_pipeline  # noqa: PLC0415
        from sklearn.preprocessing import StandardScaler  # noqa: PLC0415

        s = self.settings
        rows = _subsample(np.arange(len(x), dtype=np.int64), s.max_train_rows, np.random.default_rng(s.seed))
        if len(rows) < len(x):
            x, y = x[rows], y[rows]
        # Cholesky on the normal equations: deterministic, and the fastest solver for few columns.
        self._estimator = make_pipeline(StandardScaler(), Ridge(alpha=s.alpha, solver="cholesky"))
        self._estimator.fit(x, y)
        return {"train_rows": len(rows), "val_rows": 0}


class ForestModel(_SklearnModel):
    """``forest``: scikit-learn's ``HistGradientBoostingRegressor``, early-stopped on the validation tail.

    Chosen over ``ExtraTreesRegressor`` for speed on millions of rows: features are binned once (at most
    ``max_bins`` values) and each iteration costs one pass over the binned rows on all cores; measured on
    2.7 million x 20 rows on this machine, 60 iterations took 7.5 s where 50 extra trees of depth 12 on a
    500,000-row subsample took 19 s. It also takes an explicit validation set, so it stops on the
    time-ordered tail rather than on a random (look-ahead) split, and its artifact does not grow with
    the data. The cost: ``forest`` and ``lgbm`` are both boosted trees and will predict alike.
    """

    name = "forest"
    settings: ForestParams

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.settings = _settings(ForestParams, params, self.name)

    def _fit(self, x: F32, y: F32, groups: I64 | None) -> dict[str, int]:
        _passive_openmp()
        from sklearn.ensemble import HistGradientBoostingRegressor  # noqa: PLC0415

        s = self.settings
        train, val = _time_split(len(x), groups, s.val_fraction)
        train = _subsample(train, s.max_train_rows, np.random.default_rng(s.seed))
        self._estimator = HistGradientBoostingRegressor(
            learning_rate=s.learning_rate,
            max_iter=s.max_iter,
            max_leaf_nodes=s.max_leaf_nodes,
            min_samples_leaf=s.min_samples_leaf,
            l2_regularization=s.l2_regularization,
            max_bins=s.max_bins,
            early_stopping=len(val) > 0,
            n_iter_no_change=s.n_iter_no_change,
            random_state=s.seed,
        )
        if len(val):
            self._estimator.fit(x[train], y[train], X_val=x[val], y_val=y[val])
        else:
            self._estimator.fit(x[train], y[train])
        return {"train_rows": len(train), "val_rows": len(val), "iterations": int(self._estimator.n_iter_)}


# ---------------------------------------------------------------------------------------- LightGBM


class LgbmModel(Model):
    """``lgbm``: LightGBM gradient-boosted trees, early-stopped on the validation tail.

    Row bagging (``bagging_fraction``) halves the cost of an iteration; ``deterministic`` with
    ``force_col_wise`` makes a fit repeatable with a fixed ``seed`` and thread count.
    """

    name = "lgbm"
    kind = "lightgbm"
    settings: LgbmParams

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.settings = _settings(LgbmParams, params, self.name)
        self._booster: Any = None

    def _fit(self, x: F32, y: F32, groups: I64 | None) -> dict[str, int]:
        _passive_openmp()
        import lightgbm  # noqa: PLC0415  (LightGBM is imported when used)

        s = self.settings
        train, val = _time_split(len(x), groups, s.val_fraction)
        train = _subsample(train, s.max_train_rows, np.random.default_rng(s.seed))
        params = {
            "objective": "regression",
            "learning_rate": s.learning_rate,
            "num_leaves": s.num_leaves,
            "min_data_in_leaf": s.min_data_in_leaf,
            "feature_fraction": s.feature_fraction,
            "bagging_fraction": s.bagging_fraction,
            "bagging_freq": 1 if s.bagging_fraction < 1 else 0,
            "lambda_l2": s.lambda_l2,
            "max_bin": s.max_bin,
            "num_threads": s.num_threads,
            "seed": s.seed,
            "deterministic": True,
            "force_col_wise": True,
            "verbosity": -1,
        }
        train_set = lightgbm.Dataset(x[train], y[train], params={"max_bin": s.max_bin, "verbosity": -1})
        valid_sets = [lightgbm.Dataset(x[val], y[val], reference=train_set)] if len(val) else []
        callbacks: list[Callable[..., Any]] = []
        if len(val):
            callbacks.append(lightgbm.early_stopping(s.early_stopping_rounds, verbose=False))
        booster = lightgbm.train(
            params, train_set, s.num_boost_round, valid_sets=valid_sets, callbacks=callbacks
        )
        iterations = booster.best_iteration or booster.current_iteration()
        # Keep only the trees up to the best iteration: the model in memory is then the one saved.
        self._booster = lightgbm.Booster(model_str=booster.model_to_string(num_iteration=iterations))
        return {"train_rows": len(train), "val_rows": len(val), "iterations": int(iterations)}

    def _predict(self, x: F32, groups: I64 | None) -> F32:
        return np.asarray(self._booster.predict(x, num_threads=self.settings.num_threads), dtype=np.float32)

    def _save_artifact(self, directory: Path) -> tuple[str, dict[str, Any]]:
        self._booster.save_model(directory / "model.txt")
        return "model.txt", {}

    def _load_artifact(self, path: Path, state: Mapping[str, Any]) -> None:
        _passive_openmp()
        import lightgbm  # noqa: PLC0415

        self._booster = lightgbm.Booster(model_file=path)


# ------------------------------------------------------------------------------------------- Keras


class _NeuralModel(Model):
    """What the Keras models share: scalers, the network, and how they are saved."""

    kind = "keras"
    settings: MlpParams | SeqParams

    def __init__(self) -> None:
        super().__init__()
        self._net: Any = None
        self._scaler: _Scaler | None = None
        self._target_mean = 0.0
        self._target_std = 1.0

    def _standardized_targets(self, y: F32, train: I64) -> F32:
        """``y`` standardized with the moments of its ``train`` rows, clipped to ``+-clip``."""
        self._target_mean = float(y[train].mean(dtype=np.float64))
        self._target_std = float(y[train].std(dtype=np.float64)) or 1.0
        z = (y - np.float32(self._target_mean)) / np.float32(self._target_std)
        return np.asarray(np.clip(z, -self.settings.clip, self.settings.clip), dtype=np.float32)

    def _output(self, z: F32) -> F32:
        return (z * np.float32(self._target_std) + np.float32(self._target_mean)).astype(np.float32)

    def _save_artifact(self, directory: Path) -> tuple[str, dict[str, Any]]:
        from alphaengine.models import _keras  # noqa: PLC0415  (imports Keras and its backend)

        assert self._scaler is not None
        _keras.save(self._net, directory / "model.keras")
        state = {
            "scaler": self._scaler.to_json(),
            "target_mean": self._target_mean,
            "target_std": self._target_std,
        }
        return "model.keras", state

    def _load_artifact(self, path: Path, state: Mapping[str, Any]) -> None:
        from alphaengine.models import _keras  # noqa: PLC0415

        self._net = _keras.load(path)
        self._scaler = _Scaler.from_json(state["scaler"])
        self._target_mean = float(state["target_mean"])
        self._target_std = float(state["target_std"])


class MlpModel(_NeuralModel):
    """``mlp``: a Keras multilayer perceptron (ReLU, dropout, Adam) on a row of standardized features."""

    name = "mlp"
    settings: MlpParams

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.settings = _settings(MlpParams, params, self.name)

    def _fit(self, x: F32, y: F32, groups: I64 | None) -> dict[str, int]:
        from alphaengine.models import _keras  # noqa: PLC0415

        s = self.settings
        rng = np.random.default_rng(s.seed)
        train, val = _time_split(len(x), groups, s.val_fraction)
        train = _subsample(train, s.max_train_rows, rng)
        val = _subsample(val, s.max_val_rows, rng)
        used = np.concatenate([train, val])
        inputs = x[used]
        self._scaler = _Scaler.fit(inputs[: len(train)], s.clip)
        inputs = self._scaler.apply(inputs)
        targets = self._standardized_targets(y[used], np.arange(len(train)))
        _keras.set_seed(s.seed)
        self._net = _keras.mlp(x.shape[1], s.hidden, s.dropout, s.learning_rate)
        positions = np.arange(len(used), dtype=np.int64)

        def take(rows: I64) -> F32:
            return inputs[rows]

        epochs = _keras.train(
            self._net,
            _keras.Batches(take, positions[: len(train)], targets, s.batch_size, rng),
            _keras.Batches(take, positions[len(train) :], targets, s.batch_size) if len(val) else None,
            s.epochs,
            s.patience,
        )
        return {"train_rows": len(train), "val_rows": len(val), "epochs": epochs}

    def _predict(self, x: F32, groups: I64 | None) -> F32:
        from alphaengine.models import _keras  # noqa: PLC0415

        assert self._scaler is not None
        inputs = self._scaler.apply(x.copy())

        def take(rows: I64) -> F32:
            return inputs[rows]

        return self._output(_keras.predict(self._net, take, len(x), self.settings.batch_size))


class SeqModel(_NeuralModel):
    """``seq``: a Keras convolutional network over the last ``window`` rows of the row's group.

    The windows are strided views of one standardized copy of ``X`` laid out group by group; a batch of
    windows is gathered only when the network asks for it. Rows with fewer than ``window - 1``
    predecessors in ``X`` (a group's first rows) are predicted from a window zero-padded at the front
    (zero being the training mean of each feature), both in training and in prediction. Gaps in time are
    not seen: the previous row of a group is whatever row of that group came before it in ``X``.
    """

    name = "seq"
    settings: SeqParams

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.settings = _settings(SeqParams, params, self.name)

    @property
    def context_rows(self) -> int:
        """The window: predict the latest row of a symbol from at least this many of its last rows."""
        return self.settings.window

    def _fit(self, x: F32, y: F32, groups: I64 | None) -> dict[str, int]:
        from alphaengine.models import _keras  # noqa: PLC0415

        s = self.settings
        rng = np.random.default_rng(s.seed)
        train, val = _time_split(len(x), groups, s.val_fraction)
        train = _subsample(train, s.max_train_rows, rng)
        val = _subsample(val, s.max_val_rows, rng)
        self._scaler = _Scaler.fit(x[train], s.clip)
        windows = _Windows.build(x, groups, self._scaler, s.window)
        targets = self._standardized_targets(y, train)
        _keras.set_seed(s.seed)
        self._net = _keras.sequence_net(
            window=s.window,
            n_features=x.shape[1],
            patch=s.patch,
            filters=s.filters,
            hidden=s.hidden,
            dropout=s.dropout,
            learning_rate=s.learning_rate,
        )
        epochs = _keras.train(
            self._net,
            _keras.Batches(windows.take, train, targets, s.batch_size, rng),
            _keras.Batches(windows.take, val, targets, s.batch_size) if len(val) else None,
            s.epochs,
            s.patience,
        )
        return {"train_rows": len(train), "val_rows": len(val), "epochs": epochs}

    def _predict(self, x: F32, groups: I64 | None) -> F32:
        from alphaengine.models import _keras  # noqa: PLC0415

        assert self._scaler is not None
        windows = _Windows.build(x, groups, self._scaler, self.settings.window)
        return self._output(_keras.predict(self._net, windows.take, len(x), self.settings.batch_size))


# ---------------------------------------------------------------------------------------- registry

MODEL_NAMES: Final = ("ridge", "forest", "lgbm", "mlp", "seq")
"""The five models, in the order reports list them."""

_MODELS: Final[dict[str, type[Model]]] = {
    cls.name: cls for cls in (RidgeModel, ForestModel, LgbmModel, MlpModel, SeqModel)
}
_BY_CLASS: Final[dict[str, type[Model]]] = {_qualified_name(cls): cls for cls in _MODELS.values()}


def build_model(name: str, **params: Any) -> Model:
    """A new, unfitted model of one of :data:`MODEL_NAMES`, with ``params`` over its defaults."""
    try:
        cls = _MODELS[name]
    except KeyError:
        raise ConfigError([f"unknown model {name!r}: expected one of {', '.join(MODEL_NAMES)}"]) from None
    return cls(**params)


def load(path: Path) -> Model:
    """Read a model written by :meth:`Model.save`; ``path`` is its directory or the ``model.json`` in it."""
    meta_path = path if path.name == META_FILE else path / META_FILE
    try:
        meta = orjson.loads(meta_path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ModelError(f"{meta_path}: cannot read the model description: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ModelError(f"{meta_path}: not a model description of format {_FORMAT}")
    cls = _BY_CLASS.get(str(meta.get("class")))
    if cls is None:
        raise ModelError(f"{meta_path}: unknown model class {meta.get('class')!r}")
    missing = {"params", "n_features", "artifact", "state", "fit"} - meta.keys()
    if missing:
        raise ModelError(f"{meta_path}: incomplete model description, no {', '.join(sorted(missing))}")
    if not (meta_path.parent / str(meta["artifact"])).is_file():
        raise ModelError(f"{meta_path}: the artifact {meta['artifact']!r} is missing")
    return cls._restore(meta_path.parent, meta)
