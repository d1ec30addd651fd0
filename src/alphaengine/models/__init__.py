"""Models: walk-forward validation, out-of-sample scores, baselines and the promotion rules.

See ``docs/validation.md``.
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

__all__ = [
    "BASELINES",
    "DEFAULT_RULE",
    "YEAR_NS",
    "Decision",
    "Demotion",
    "Evaluation",
    "Fold",
    "PromotionRule",
    "Scores",
    "TradingSpec",
    "baseline_predictions",
    "beats",
    "evaluate",
    "evaluate_baselines",
    "hit_rate",
    "pearson",
    "score",
    "should_demote",
    "spearman",
    "walk_forward",
]
