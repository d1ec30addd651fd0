"""Models: the five model kinds, walk-forward validation, scores, baselines and promotion rules.

The models share one interface (:class:`Model`, :func:`build_model`, :func:`load_model`); see
``docs/validation.md`` for the validation. The engine's side lives in submodules that this package does
not import, so that a training worker (which imports :mod:`alphaengine.models.worker`) loads only what it
runs: :mod:`~alphaengine.models.trainer` (the ``trainer`` module and its cycle),
:mod:`~alphaengine.models.registry` (versions and champions in the object store),
:mod:`~alphaengine.models.pool` (the worker processes), :mod:`~alphaengine.models.predictor` (the
``predictor`` module) and :mod:`~alphaengine.models.report` (readable reports); see ``docs/models.md``.
"""

from alphaengine.models.validation import (
    BASELINES,
    DEFAULT_RULE,
    YEAR_NS,
    Decision,
    Demotion,
    Evaluation,
    Fold,
    PromotionRule,
    Scores,
    TradingSpec,
    baseline_predictions,
    beats,
    evaluate,
    evaluate_baselines,
    hit_rate,
    pearson,
    score,
    should_demote,
    spearman,
    walk_forward,
)
from alphaengine.models.zoo import (
    META_FILE,
    MODEL_NAMES,
    ForestModel,
    ForestParams,
    LgbmModel,
    LgbmParams,
    MlpModel,
    MlpParams,
    Model,
    RidgeModel,
    RidgeParams,
    SeqModel,
    SeqParams,
    build_model,
)
from alphaengine.models.zoo import load as load_model

__all__ = [
    "BASELINES",
    "DEFAULT_RULE",
    "META_FILE",
    "MODEL_NAMES",
    "YEAR_NS",
    "Decision",
    "Demotion",
    "Evaluation",
    "Fold",
    "ForestModel",
    "ForestParams",
    "LgbmModel",
    "LgbmParams",
    "MlpModel",
    "MlpParams",
    "Model",
    "PromotionRule",
    "RidgeModel",
    "RidgeParams",
    "Scores",
    "SeqModel",
    "SeqParams",
    "TradingSpec",
    "baseline_predictions",
    "beats",
    "build_model",
    "evaluate",
    "evaluate_baselines",
    "hit_rate",
    "load_model",
    "pearson",
    "score",
    "should_demote",
    "spearman",
    "walk_forward",
]
