"""Backtests: the live modules on a simulated clock over recorded or stored trades, and their reports."""

from alphaengine.backtest.runner import (
    Backtest,
    BacktestError,
    BacktestRun,
    Progress,
    file_batches,
    store_batches,
)

__all__ = ["Backtest", "BacktestError", "BacktestRun", "Progress", "file_batches", "store_batches"]
