"""alphaengine: a fault-tolerant, real-time crypto trading engine."""

__version__ = "0.1.0"
