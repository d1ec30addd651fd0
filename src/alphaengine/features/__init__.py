"""Features and targets over bars, defined once for training (batch) and live use (streaming).

* :func:`core_feature_set` / :class:`FeatureSet`: the features, versioned; ``compute`` (batch) and
  ``stream`` (a :class:`FeatureStream`).
* :class:`Targets`: forward log returns and their signs; ``purge_bars`` for the validation.
* :func:`training_frame`: features and targets, rows with nulls dropped.
* :func:`regularize`: the gap rule (each series on its regular time grid), shared by all of the above.
* :func:`bars_from_candles_csv`: bars from an OHLCV candle file.

See ``docs/features.md``.
"""

from alphaengine.features.candles import bars_from_candles_csv
from alphaengine.features.definitions import Feature, FeatureParams, core_features
from alphaengine.features.engine import (
    GRID_RULE,
    ROW_COLUMNS,
    FeatureSet,
    FeatureStream,
    Targets,
    core_feature_set,
    training_frame,
)
from alphaengine.features.grid import GRID_SCHEMA, KEY, regularize

__all__ = [
    "GRID_RULE",
    "GRID_SCHEMA",
    "KEY",
    "ROW_COLUMNS",
    "Feature",
    "FeatureParams",
    "FeatureSet",
    "FeatureStream",
    "Targets",
    "bars_from_candles_csv",
    "core_feature_set",
    "core_features",
    "regularize",
    "training_frame",
]
