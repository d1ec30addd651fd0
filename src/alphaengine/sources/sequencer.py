"""Gap-free, duplicate-free trade streams from a venue with contiguous trade ids (Binance).

:class:`IdSequencer` receives the trades of every connection (live and overlapping during a rotation) and
of the REST backfill, and emits, per symbol, each trade id exactly once and in id order:

* a trade whose id was already emitted is a duplicate (an overlap of two connections, a backfill that
  reached into live data) and is dropped;
* a trade beyond the next expected id is *held*: the ids before it are a gap. For ``grace_ns`` the gap may
  still close by itself (the old connection of a rotation delivering late); after that a backfill of the
  missing ids is requested. Once the missing trades arrive, the held ones follow in order;
* after a reconnection, every symbol asks for a *catch-up*: the trades from the next expected id up to
  the first trade the new connection delivers (or, if none comes within ``grace_ns``, up to whatever the
  exchange has), so that a disconnection at a quiet moment (or at the very end of the data) loses nothing
  even when no later live trade reveals the gap;
* a gap that cannot be filled (``max_attempts`` failed backfills, held longer than ``max_hold_ns`` or more
  than ``max_pending`` trades held) is given up: recorded as unfilled and the held trades are released.

Holding back instead of emitting out of order keeps every downstream consumer simple: the bar builder
sees each symbol's trades in id (and so time) order, and a restarted engine can resume from the highest
stored id. The class is pure logic (no I/O, time passed in), so it is tested without a network.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from alphaengine.domain import TickBatch
from alphaengine.sources.feed import Gap

OPEN_ENDED = -1
"""``last_id`` of a catch-up request: up to the newest trade the exchange has."""


@dataclass(frozen=True, slots=True)
class BackfillRequest:
    """Trades ``first_id`` .. ``last_id`` (inclusive; :data:`OPEN_ENDED` for a catch-up) of ``symbol``."""

    symbol: str
    first_id: int
    last_id: int


@dataclass(slots=True)
class _Symbol:
    next_id: int | None
    pending: pa.RecordBatch | None = None
    held_since_ns: int | None = None
    catchup: bool = False
    catchup_since_ns: int = 0
    inflight: BackfillRequest | None = None
    attempts: int = 0
    not_before_ns: int = 0


@dataclass(slots=True)
class SequencerOutput:
    """What one call produced: trades to emit (in order) and interruptions to record."""

    batches: list[TickBatch] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)

    def extend(self, other: SequencerOutput) -> None:
        """Append ``other``'s batches and gaps."""
        self.batches.extend(other.batches)
        self.gaps.extend(other.gaps)


class IdSequencer:
    """Per-symbol id sequencing with gap holding and backfill bookkeeping (see the module docstring)."""

    def __init__(
        self,
        venue: str,
        symbols: Iterable[str],
        *,
        grace_ns: int,
        max_hold_ns: int,
        max_pending: int,
        max_attempts: int,
        retry_ns: int,
        max_backfill: int,
        resume: Mapping[str, int] | None = None,
    ) -> None:
        self.venue = venue
        self.grace_ns = grace_ns
        self.max_hold_ns = max_hold_ns
        self.max_pending = max_pending
        self.max_attempts = max_attempts
        self.retry_ns = retry_ns
        self.max_backfill = max_backfill
        self.duplicates = 0
        resume = resume or {}
        self._symbols = {
            s: _Symbol(next_id=resume[s] + 1 if s in resume else None, catchup=s in resume) for s in symbols
        }

    def next_id(self, symbol: str) -> int | None:
        """The first id of ``symbol`` not emitted yet (None before its first trade)."""
        return self._symbols[symbol].next_id

    def held(self, symbol: str) -> int:
        """How many trades of ``symbol`` wait behind a gap."""
        pending = self._symbols[symbol].pending
        return 0 if pending is None else pending.num_rows

    def offer(self, symbol: str, batch: TickBatch, now_ns: int) -> SequencerOutput:
        """Take trades of ``symbol`` (live or backfilled, any order); return what can be emitted now."""
        out = SequencerOutput()
        state = self._symbols[symbol]
        data = batch.data
        if not data.num_rows:
            return out
        ids = batch.np("trade_id")
        if state.next_id is None:
            state.next_id = int(ids.min())
        if (
            state.pending is None
            and ids[0] == state.next_id
            and (len(ids) == 1 or bool((np.diff(ids) == 1).all()))
        ):
            state.next_id = int(ids[-1]) + 1
            out.batches.append(batch)
            return out
        self._merge(state, data, now_ns, out)
        if state.pending is not None and state.pending.num_rows > self.max_pending:
            self._give_up(symbol, state, now_ns, out, f"more than {self.max_pending} trades held")
        return out

    def _merge(self, state: _Symbol, data: pa.RecordBatch, now_ns: int, out: SequencerOutput) -> None:
        assert state.next_id is not None
        parts = [data] if state.pending is None else [state.pending, data]
        table = pa.Table.from_batches(parts).combine_chunks()
        ids = table.column("trade_id").to_numpy()
        # Stable sort so that, of two copies of an id, the one held earlier (live) is kept.
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        keep = ids >= state.next_id
        keep[1:] &= ids[1:] != ids[:-1]
        self.duplicates += int(len(ids) - keep.sum())
        order, ids = order[keep], ids[keep]
        if not len(ids):
            state.pending = None
            state.held_since_ns = None
            return
        run = ids - state.next_id == np.arange(len(ids))
        ready = len(ids) if run.all() else int(np.argmin(run))
        sorted_rows = table.take(pa.array(order))
        if ready:
            out.batches.append(TickBatch(_one_batch(sorted_rows.slice(0, ready))))
            state.next_id = int(ids[ready - 1]) + 1
            state.attempts = 0
        if ready == len(ids):
            state.pending = None
            state.held_since_ns = None
        else:
            state.pending = _one_batch(sorted_rows.slice(ready))
            if ready or state.held_since_ns is None:
                state.held_since_ns = now_ns

    def reconnected(self, now_ns: int) -> None:
        """A connection was lost and a new one opened: every symbol with history catches up.

        The catch-up waits ``grace_ns`` for the new connection's first trade: then it is bounded by it
        and fetches only what is missing, instead of paging on to the newest trade (which the new
        connection delivers anyway) while a busy symbol keeps trading.
        """
        for state in self._symbols.values():
            if state.next_id is not None:
                state.catchup = True
                state.catchup_since_ns = now_ns

    def due(self, now_ns: int) -> tuple[list[BackfillRequest], SequencerOutput]:
        """Backfills to start now, and what giving up on hopeless gaps released."""
        requests: list[BackfillRequest] = []
        out = SequencerOutput()
        for symbol, state in self._symbols.items():
            if state.inflight is not None or state.next_id is None or now_ns < state.not_before_ns:
                continue
            if state.pending is not None:
                assert state.held_since_ns is not None
                if now_ns - state.held_since_ns >= self.max_hold_ns:
                    self._give_up(symbol, state, now_ns, out, "held too long")
                    continue
                if now_ns - state.held_since_ns < self.grace_ns and not state.catchup:
                    continue
                first_held = int(state.pending.column("trade_id")[0].as_py())
                request = self._bounded(symbol, state, first_held - 1, now_ns, out)
            elif state.catchup:
                if now_ns - state.catchup_since_ns < self.grace_ns:
                    continue
                request = BackfillRequest(symbol, state.next_id, OPEN_ENDED)
            else:
                continue
            state.catchup = False
            state.inflight = request
            requests.append(request)
        return requests, out

    def _bounded(
        self, symbol: str, state: _Symbol, last_id: int, now_ns: int, out: SequencerOutput
    ) -> BackfillRequest:
        """A request for ``next_id .. last_id``; a gap wider than ``max_backfill`` loses its oldest part."""
        assert state.next_id is not None
        first = state.next_id
        if last_id - first + 1 > self.max_backfill:
            skipped_to = last_id - self.max_backfill
            out.gaps.append(
                Gap(self.venue, symbol, "ids", first, skipped_to, "unfilled", 0, "beyond max_backfill_trades")
            )
            state.next_id = first = skipped_to + 1
        return BackfillRequest(symbol, first, last_id)

    def backfilled(
        self, request: BackfillRequest, batch: TickBatch | None, now_ns: int, error: str = ""
    ) -> SequencerOutput:
        """The result of ``request`` (None after an error); returns what can be emitted now."""
        symbol = request.symbol
        state = self._symbols[symbol]
        state.inflight = None
        out = SequencerOutput()
        before = state.next_id
        assert before is not None
        recovered = 0
        if batch is not None and batch.data.num_rows:
            ids = np.unique(batch.np("trade_id"))
            top = request.last_id if request.last_id != OPEN_ENDED else np.iinfo(np.int64).max
            recovered = int(np.count_nonzero((ids >= before) & (ids <= top)))
            out.extend(self.offer(symbol, batch, now_ns))
        after = state.next_id
        assert after is not None
        # Filled: nothing waits behind a gap any more, or the emitted ids went past the requested range.
        filled = state.pending is None or (request.last_id != OPEN_ENDED and after > request.last_id)
        if recovered and (filled or after > before):
            last = after - 1 if request.last_id == OPEN_ENDED else min(request.last_id, after - 1)
            out.gaps.append(Gap(self.venue, symbol, "ids", before, last, "filled", recovered))
        if state.pending is not None and not filled:
            state.attempts += 1
            state.not_before_ns = now_ns + self.retry_ns
            if state.attempts >= self.max_attempts:
                self._give_up(symbol, state, now_ns, out, error or "the exchange did not return the trades")
        return out

    def _give_up(self, symbol: str, state: _Symbol, now_ns: int, out: SequencerOutput, why: str) -> None:
        """Record the head gap as unfilled and release the held trades up to the next gap."""
        assert state.pending is not None
        assert state.next_id is not None
        first_held = int(state.pending.column("trade_id")[0].as_py())
        out.gaps.append(Gap(self.venue, symbol, "ids", state.next_id, first_held - 1, "unfilled", 0, why))
        state.next_id = first_held
        state.attempts = 0
        pending, state.pending, state.held_since_ns = state.pending, None, None
        self._merge(state, pending, now_ns, out)

    def drop_held(self) -> int:
        """Forget the trades held behind gaps (at stop) and return how many there were.

        They are not emitted: emitting them would put ids beyond an open gap into the store, and a restart
        resuming from the highest stored id would then never see that gap. Dropped, they are caught up in
        order by the next start.
        """
        dropped = 0
        for state in self._symbols.values():
            if state.pending is not None:
                dropped += state.pending.num_rows
                state.pending = None
                state.held_since_ns = None
        return dropped


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    """A non-empty table as one record batch."""
    return table.combine_chunks().to_batches()[0]
