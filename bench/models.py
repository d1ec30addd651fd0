"""Model benchmark: fit the five models of ``alphaengine.models.zoo`` on 3 million rows x 20 features.

The data imitates 7 days of 1-second bars for 5 symbols (604,800 rows each, symbol after symbol as
``features.training_frame`` lays them out): 20 float32 features, AR(1) series of varied persistence, and
a target with a weak planted signal (linear, non-linear and one lagged term; the signal explains about
1% of the target's variance). The last 10% of each symbol is held out.

Each model is fitted in its own fresh Python process, as the trainer's spawned workers do. For each
model the report gives: ``fit``, the wall time of ``Model.fit``, which includes importing the model's
library (the zoo imports scikit-learn, LightGBM and Keras with JAX lazily, on first use: about 1 s each);
``process``, the whole worker (Python start-up, reading the data, fitting, predicting); the worker's peak
RSS (``data alone``: its RSS once the data is loaded) and the peak RSS of the whole process tree (sampled
every 50 ms with psutil); what the fit used (rows, trees or epochs); and the out-of-sample correlation of
predictions with targets on the held-out tail, with the time taken to predict it, so that speed is not
bought with a model that learns nothing. The machine's load is printed before and after: on a shared
2-core machine, other people's work slows every figure here.

    .venv/bin/python bench/models.py
    .venv/bin/python bench/models.py --models lgbm,seq --rows 1000000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

SYMBOLS = 5
ROWS = 5 * 604_800
FEATURES = 20
HOLDOUT = 0.1


def make_data(rows: int, features: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Features, targets, symbols (blocks of rows, time order within a block), and the best possible IC
    (the correlation of the planted signal with the target)."""
    from scipy.signal import lfilter  # scipy comes with scikit-learn

    rng = np.random.default_rng(seed)
    per_symbol = rows // SYMBOLS
    rows = per_symbol * SYMBOLS
    x = rng.standard_normal((rows, features), dtype=np.float32)
    for s in range(SYMBOLS):
        block = slice(s * per_symbol, (s + 1) * per_symbol)
        for j, phi in enumerate(np.linspace(0.0, 0.99, features)):
            # AR(1) x[t] = phi x[t-1] + e[t], scaled to unit variance.
            x[block, j] = lfilter([np.sqrt(1 - phi**2)], [1.0, -phi], x[block, j])
    lagged = np.zeros(rows, dtype=np.float32)
    lagged[1:] = x[:-1, 4]
    lagged[::per_symbol] = 0.0  # the first row of a symbol has no predecessor
    signal = 0.06 * x[:, 0] - 0.04 * x[:, 10] + 0.05 * np.tanh(x[:, 1] * x[:, 2]) + 0.05 * lagged
    y = (signal + rng.standard_normal(rows, dtype=np.float32)).astype(np.float32)
    groups = np.repeat(np.arange(SYMBOLS, dtype=np.int64), per_symbol)
    return x, y, groups, float(np.corrcoef(signal, y)[0, 1])


def split(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows to fit on, and the held-out last ``HOLDOUT`` of each symbol."""
    fit, held = [], []
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        cut = len(rows) - int(len(rows) * HOLDOUT)
        fit.append(rows[:cut])
        held.append(rows[cut:])
    return np.concatenate(fit), np.concatenate(held)


def machine_load() -> str:
    """The load averages and the other processes busy over the last second."""
    one, five, fifteen = os.getloadavg()
    mine = {os.getpid()} | {child.pid for child in psutil.Process().children(recursive=True)}
    for proc in psutil.process_iter():  # the first cpu_percent of a process only starts its count
        with contextlib.suppress(psutil.Error):
            proc.cpu_percent()
    time.sleep(1.0)
    busy = []
    for proc in psutil.process_iter(["pid", "name", "cpu_percent", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["pid"] not in mine and (proc.info["cpu_percent"] or 0) >= 20:
                cmd = " ".join(proc.info["cmdline"] or [proc.info["name"]])[:70]
                busy.append(f"{proc.info['cpu_percent']:.0f}% {cmd}")
    others = f"; busy here: {', '.join(busy)}" if busy else ""
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores{others}"


class TreeSampler:
    """Peak RSS of this process and its descendants, sampled every ``interval_s``."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self.interval_s):
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
            self.peak_bytes = max(self.peak_bytes, total)


def worker(name: str, data: Path, params: dict[str, object]) -> None:
    """Fit one model on the data file and print one JSON line of results (run in a fresh process)."""
    arrays = np.load(data)
    x_fit, y_fit, g_fit = arrays["x_fit"], arrays["y_fit"], arrays["g_fit"]
    x_held, y_held, g_held = arrays["x_held"], arrays["y_held"], arrays["g_held"]
    data_mb = psutil.Process().memory_info().rss / 2**20

    from alphaengine.models.zoo import build_model

    started = time.perf_counter()
    model = build_model(name, **params).fit(x_fit, y_fit, g_fit)
    fit_s = time.perf_counter() - started
    started = time.perf_counter()
    pred = model.predict(x_held, g_held)
    predict_s = time.perf_counter() - started
    result = {
        "model": name,
        "fit_s": fit_s,
        "predict_s": predict_s,
        "held_rows": len(y_held),
        "ic": float(np.corrcoef(pred, y_held)[0, 1]),
        "fit": model.fit_info,
        "data_mb": data_mb,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(result), flush=True)


def run(args: argparse.Namespace) -> int:
    names = args.models.split(",")
    print(f"before: {machine_load()}")
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        data = Path(tmp) / "data.npz"
        started = time.perf_counter()
        x, y, groups, best_ic = make_data(args.rows, FEATURES, args.seed)
        fit, held = split(groups)
        np.savez(
            data,
            x_fit=x[fit],
            y_fit=y[fit],
            g_fit=groups[fit],
            x_held=x[held],
            y_held=y[held],
            g_held=groups[held],
        )
        print(
            f"data: {len(x):,} rows x {x.shape[1]} float32 features, {SYMBOLS} symbols, "
            f"best possible IC {best_ic:.4f}, made in {time.perf_counter() - started:.1f} s"
        )
        del x, y, groups
        results = []
        total_started = time.perf_counter()
        for name in names:
            params = json.loads(args.params).get(name, {})
            with TreeSampler() as sampler:
                started = time.perf_counter()
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--worker",
                        name,
                        "--data",
                        str(data),
                        "--params",
                        json.dumps(params),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                wall_s = time.perf_counter() - started
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result["process_s"] = wall_s
            result["tree_peak_mb"] = sampler.peak_bytes / 2**20
            results.append(result)
            print(
                f"{name:>6}: fit {result['fit_s']:6.1f} s (process {wall_s:5.1f} s), peak RSS worker "
                f"{result['peak_mb']:6.0f} MB (data alone {result['data_mb']:4.0f} MB), tree "
                f"{result['tree_peak_mb']:6.0f} MB; out-of-sample IC {result['ic']:+.4f} on "
                f"{result['held_rows']:,} rows (predicted in {result['predict_s']:.1f} s); {result['fit']}",
                flush=True,
            )
        total_wall = time.perf_counter() - total_started
    fit_total = sum(r["fit_s"] for r in results)
    print(
        f"total: fits {fit_total:.1f} s, processes {total_wall:.1f} s, "
        f"max tree peak {max(r['tree_peak_mb'] for r in results):.0f} MB"
    )
    print(f"after: {machine_load()}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="ridge,forest,lgbm,mlp,seq")
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", default="{}", help='JSON: {"lgbm": {"num_leaves": 15}, ...}')
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.data, json.loads(args.params))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
