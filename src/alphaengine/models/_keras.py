"""The Keras side of the neural models: networks, mini-batch feeding, training, inference, artifacts.

Importing this module imports Keras and its backend, so :mod:`alphaengine.models.zoo` imports it only
when a neural model is fitted, used or loaded. The backend is ``$KERAS_BACKEND``, ``jax`` when unset; it
must be chosen before Keras is first imported in the process, which is why it is set here, above the
import.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

DIRECT_CALL_ROWS = 2048
"""Up to this many rows a prediction calls the network directly: ``Model.predict`` costs about 60 ms a
call in set-up alone (VERIFIED.md), a direct call a few milliseconds."""
SMALLEST_CALL_ROWS = 32
"""A direct call gets at least this many rows: see :func:`batch_rows`."""


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's global and the backend's generators (weights, dropout).

    This is process-global state; the trainer fits in worker processes, so that is harmless there.
    """
    keras.utils.set_random_seed(seed)


def mlp(n_features: int, hidden: tuple[int, ...], dropout: float, learning_rate: float) -> Any:
    """A compiled multilayer perceptron: ``hidden`` ReLU layers, each followed by dropout, then one output."""
    inputs = keras.Input((n_features,), name="features")
    h = inputs
    for units in hidden:
        h = keras.layers.Dense(units, activation="relu")(h)
        h = keras.layers.Dropout(dropout)(h)
    return _compiled(keras.Model(inputs, keras.layers.Dense(1)(h)), learning_rate)


def sequence_net(
    *,
    window: int,
    n_features: int,
    patch: int,
    filters: int,
    hidden: int,
    dropout: float,
    learning_rate: float,
) -> Any:
    """A compiled convolutional network over a window of ``window`` rows (oldest first) of one symbol.

    The window is cut into non-overlapping patches of ``patch`` rows, each embedded by a strided Conv1D
    (position within the patch matters, so "the previous row" is representable); a second Conv1D spanning
    all patches summarises the window. The last row (the one being predicted) also goes straight to the
    head, so the network starts from what a pointwise model sees. Measured on this CPU (2 cores, 100,000
    windows of 32 x 20), a GRU(32) trained 3.5 times and predicted 4 times slower than the strided
    convolutions, a stack of dilated causal convolutions 5 times slower.
    """
    inputs = keras.Input((window, n_features), name="window")
    patches = keras.layers.Conv1D(filters, patch, strides=patch, activation="relu")(inputs)
    summary = keras.layers.Conv1D(filters, window // patch, activation="relu")(patches)
    current = keras.layers.Cropping1D((window - 1, 0))(inputs)
    h = keras.layers.Concatenate()([keras.layers.Flatten()(summary), keras.layers.Flatten()(current)])
    h = keras.layers.Dense(hidden, activation="relu")(h)
    h = keras.layers.Dropout(dropout)(h)
    return _compiled(keras.Model(inputs, keras.layers.Dense(1)(h)), learning_rate)


def _compiled(net: Any, learning_rate: float) -> Any:
    net.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")
    return net


class Batches(keras.utils.PyDataset):  # type: ignore[misc]  # Keras is untyped
    """Mini-batches gathered by row number, so that inputs are never materialized whole.

    ``take(rows)`` returns the inputs of those rows (a copy of one batch: for the sequence model the
    windows are gathered from a strided view). With a generator the rows are reshuffled every epoch and
    an incomplete last batch is dropped (a batch of another shape would make JAX compile the training step
    again); without one they are served in order, every row once.
    """

    def __init__(
        self,
        take: Callable[[I64], F32],
        rows: I64,
        targets: F32 | None,
        batch_size: int,
        rng: np.random.Generator | None = None,
    ) -> None:
        super().__init__()
        self._take = take
        self._rows = rows
        self._targets = targets
        self._batch_size = max(1, min(batch_size, len(rows)))
        self._rng = rng
        if rng is not None:
            self._rows = rng.permutation(rows)

    def __len__(self) -> int:
        n = len(self._rows)
        if self._rng is not None:
            return n // self._batch_size
        return (n + self._batch_size - 1) // self._batch_size

    def __getitem__(self, index: int) -> Any:
        rows = self._rows[index * self._batch_size : (index + 1) * self._batch_size]
        inputs = self._take(rows)
        if self._targets is None:
            return (inputs,)
        return inputs, self._targets[rows]

    def on_epoch_end(self) -> None:
        """Reshuffle for the next epoch (training batches only)."""
        if self._rng is not None:
            self._rows = self._rng.permutation(self._rows)


def train(net: Any, batches: Batches, validation: Batches | None, epochs: int, patience: int) -> int:
    """Fit ``net``; returns the number of epochs run.

    With ``validation``, training stops after ``patience`` epochs without a lower validation loss, and the
    best epoch's weights are kept.
    """
    callbacks = []
    if validation is not None:
        callbacks.append(
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)
        )
    history = net.fit(batches, validation_data=validation, epochs=epochs, callbacks=callbacks, verbose=0)
    return len(history.history["loss"])


def batch_rows(n: int, batch_size: int) -> int:
    """How many rows the network is given to predict ``n``: ``n`` rounded up to a bounded set of sizes.

    The backend compiles the network once for every input shape it sees and keeps what it compiled, so a
    predictor that called it with every batch size it meets (a few bars, then a catch-up of hundreds)
    would compile hundreds of times, at tenths of a second each, and its memory would grow by gigabytes.
    Direct calls are padded to a power of two from :data:`SMALLEST_CALL_ROWS` to :data:`DIRECT_CALL_ROWS`
    (seven shapes); larger ones to a multiple of ``batch_size``, so every batch of ``Model.predict`` is
    full (one more shape).
    """
    if n <= DIRECT_CALL_ROWS:
        return max(SMALLEST_CALL_ROWS, 1 << (n - 1).bit_length())
    return -(-n // batch_size) * batch_size


def predict(net: Any, take: Callable[[I64], F32], n: int, batch_size: int) -> F32:
    """The network's output for rows ``0..n-1``, gathered by ``take``.

    The input is padded with copies of the last row to :func:`batch_rows` rows, whose outputs are
    dropped: the networks treat rows independently at inference.
    """
    if n == 0:
        return np.empty(0, dtype=np.float32)
    padded = batch_rows(n, batch_size)
    rows = np.minimum(np.arange(padded, dtype=np.int64), n - 1)
    if padded <= DIRECT_CALL_ROWS:
        out = keras.ops.convert_to_numpy(net(take(rows), training=False))
    else:
        out = net.predict(Batches(take, rows, None, batch_size), verbose=0)
    return np.asarray(out, dtype=np.float32).reshape(padded)[:n]


def save(net: Any, path: Path) -> None:
    """Write the network (architecture, weights, optimizer state) as a ``.keras`` archive."""
    net.save(path)


def load(path: Path) -> Any:
    """Read a network written by :func:`save`."""
    return keras.saving.load_model(path, compile=False)
