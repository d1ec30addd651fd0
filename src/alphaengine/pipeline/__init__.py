"""The first pipeline: tick and bar sinks, the bar builder, and the consumer base they share."""

from alphaengine.pipeline.bar_builder import BarBuilder, BarBuilderSettings
from alphaengine.pipeline.consumer import ConsumerModule, ConsumerSettings
from alphaengine.pipeline.sinks import BarSink, SinkSettings, TableSink, TickSink

__all__ = [
    "BarBuilder",
    "BarBuilderSettings",
    "BarSink",
    "ConsumerModule",
    "ConsumerSettings",
    "SinkSettings",
    "TableSink",
    "TickSink",
]
