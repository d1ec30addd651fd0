"""Capped exponential backoff with jitter, shared by the supervisor and the network sources."""

from __future__ import annotations

import random
from typing import Literal


class Backoff:
    """Delays that double (``multiplier``) from ``initial_s`` up to ``max_s``, with jitter.

    ``jitter="full"`` draws uniformly from ``[0, cap]`` (spreads reconnect storms best); ``"equal"`` draws
    from ``[cap/2, cap]`` (keeps a floor, for restarts that must not spin).
    """

    def __init__(
        self,
        initial_s: float,
        max_s: float,
        *,
        multiplier: float = 2.0,
        jitter: Literal["full", "equal"] = "full",
        rng: random.Random | None = None,
    ) -> None:
        if initial_s <= 0 or max_s < initial_s:
            raise ValueError(f"need 0 < initial_s <= max_s, got {initial_s}, {max_s}")
        self.initial_s = initial_s
        self.max_s = max_s
        self.multiplier = multiplier
        self.jitter = jitter
        self.attempt = 0
        self._rng = rng or random.Random()

    def cap(self) -> float:
        """The ceiling of the next delay, before jitter."""
        return min(self.max_s, self.initial_s * self.multiplier**self.attempt)

    def next_delay(self) -> float:
        """The next delay in seconds; each call moves one attempt further."""
        cap = self.cap()
        self.attempt += 1
        if self.jitter == "full":
            return self._rng.uniform(0.0, cap)
        return self._rng.uniform(cap / 2.0, cap)

    def reset(self) -> None:
        """Start again from ``initial_s`` (after a success)."""
        self.attempt = 0
