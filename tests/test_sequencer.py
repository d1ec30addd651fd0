"""IdSequencer: each trade id emitted once and in order, gaps held, backfilled, or given up and recorded."""

from __future__ import annotations

import numpy as np

from alphaengine.domain import TickBatch
from alphaengine.sources.sequencer import OPEN_ENDED, BackfillRequest, IdSequencer, SequencerOutput

S = "BTCUSDT"
MS = 1_000_000


def ticks(ids: list[int] | range) -> TickBatch:
    n = len(ids)
    arr = np.asarray(list(ids), dtype=np.int64)
    return TickBatch.from_columns(
        venue=["BINANCE"] * n,
        symbol=[S] * n,
        trade_id=arr,
        ts_ns=1_700_000_000_000 * MS + arr * MS,
        recv_ns=np.zeros(n, dtype=np.int64),
        price=np.full(n, 100.0),
        qty=np.full(n, 1.0),
        side=np.ones(n, dtype=np.int8),
    )


def sequencer(**kw: int) -> IdSequencer:
    settings: dict[str, int] = {
        "grace_ns": 1_000 * MS,
        "max_hold_ns": 60_000 * MS,
        "max_pending": 10_000,
        "max_attempts": 3,
        "retry_ns": 0,
        "max_backfill": 100_000,
    } | kw
    return IdSequencer("BINANCE", [S], **settings)


def emitted(out: SequencerOutput) -> list[int]:
    return [int(i) for b in out.batches for i in b.np("trade_id")]


def test_contiguous_trades_pass_straight_through() -> None:
    seq = sequencer()

    assert emitted(seq.offer(S, ticks(range(10, 15)), 0)) == [10, 11, 12, 13, 14]
    assert emitted(seq.offer(S, ticks(range(15, 17)), 0)) == [15, 16]
    assert seq.next_id(S) == 17


def test_overlap_of_two_connections_is_dropped_by_id() -> None:
    seq = sequencer()
    seq.offer(S, ticks(range(1, 11)), 0)

    out = seq.offer(S, ticks(range(6, 14)), 0)

    assert emitted(out) == [11, 12, 13]
    assert seq.duplicates == 5


def test_a_gap_holds_later_trades_until_the_missing_ones_arrive_live() -> None:
    seq = sequencer()
    seq.offer(S, ticks(range(1, 4)), 0)

    held = seq.offer(S, ticks([6, 7]), 0)
    assert emitted(held) == []
    assert seq.held(S) == 2
    assert seq.due(500 * MS)[0] == []  # within the grace period: no backfill yet

    out = seq.offer(S, ticks([4, 5]), 600 * MS)  # the rotated connection delivers late
    assert emitted(out) == [4, 5, 6, 7]
    assert seq.held(S) == 0


def test_a_gap_past_the_grace_is_backfilled_and_recorded_as_filled() -> None:
    seq = sequencer()
    seq.offer(S, ticks(range(1, 4)), 0)
    seq.offer(S, ticks([9, 10]), 0)

    requests, _ = seq.due(1_000 * MS)
    assert requests == [BackfillRequest(S, 4, 8)]
    assert seq.due(1_100 * MS)[0] == []  # one request per gap at a time

    out = seq.backfilled(requests[0], ticks(range(4, 9)), 1_200 * MS)

    assert emitted(out) == [4, 5, 6, 7, 8, 9, 10]
    [gap] = out.gaps
    assert (gap.kind, gap.from_value, gap.to_value, gap.status, gap.ticks) == ("ids", 4, 8, "filled", 5)


def test_a_failed_backfill_is_retried_then_given_up_and_recorded_unfilled() -> None:
    seq = sequencer(max_attempts=2)
    seq.offer(S, ticks([1]), 0)
    seq.offer(S, ticks([5, 6]), 0)

    first, _ = seq.due(1_000 * MS)
    out = seq.backfilled(first[0], None, 1_000 * MS, "HTTP 503")
    assert emitted(out) == []
    assert out.gaps == []
    again, _ = seq.due(1_001 * MS)
    assert again == [BackfillRequest(S, 2, 4)]
    out = seq.backfilled(again[0], ticks([2]), 1_002 * MS)  # only part of the gap came back
    assert emitted(out) == [2]
    assert [(g.from_value, g.to_value, g.status) for g in out.gaps] == [(2, 2, "filled")]

    # Progress restarts the count (the partial answer is attempt 1 at the rest of the gap), and the new
    # head of the gap gets a fresh grace period; one more answer without the trades gives it up.
    assert seq.due(1_500 * MS)[0] == []
    requests, _ = seq.due(2_100 * MS)
    assert requests == [BackfillRequest(S, 3, 4)]
    out = seq.backfilled(requests[0], ticks([]), 2_100 * MS)

    assert emitted(out) == [5, 6]
    assert [(g.from_value, g.to_value, g.status) for g in out.gaps] == [(3, 4, "unfilled")]


def test_a_gap_held_too_long_is_given_up() -> None:
    seq = sequencer(max_hold_ns=5_000 * MS)
    seq.offer(S, ticks([1]), 0)
    seq.offer(S, ticks([3]), 0)
    requests, _ = seq.due(1_000 * MS)
    assert requests

    _, out = seq.due(6_000 * MS)  # the request is still in flight: nothing happens meanwhile
    assert out.batches == []
    seq.backfilled(requests[0], None, 6_000 * MS)
    _, out = seq.due(6_001 * MS)

    assert emitted(out) == [3]
    assert [(g.from_value, g.to_value, g.status) for g in out.gaps] == [(2, 2, "unfilled")]


def test_reconnection_asks_for_an_open_ended_catch_up_when_no_live_trade_comes() -> None:
    seq = sequencer()
    seq.offer(S, ticks(range(1, 6)), 0)

    seq.reconnected(0)
    assert seq.due(500 * MS)[0] == []  # waiting for the new connection's first trade
    requests, _ = seq.due(1_000 * MS)
    assert requests == [BackfillRequest(S, 6, OPEN_ENDED)]

    out = seq.backfilled(requests[0], ticks(range(6, 9)), 0)  # trades that happened while disconnected
    assert emitted(out) == [6, 7, 8]
    assert [(g.from_value, g.to_value, g.status, g.ticks) for g in out.gaps] == [(6, 8, "filled", 3)]


def test_catch_up_is_bounded_by_the_first_live_trade_after_the_reconnection() -> None:
    seq = sequencer()
    seq.offer(S, ticks(range(1, 6)), 0)
    seq.reconnected(0)

    assert emitted(seq.offer(S, ticks(range(9, 12)), 100 * MS)) == []  # live after the reconnection: held
    requests, _ = seq.due(100 * MS)  # no need to wait for the grace: the gap is known
    assert requests == [BackfillRequest(S, 6, 8)]
    out = seq.backfilled(requests[0], ticks(range(6, 11)), 200 * MS)  # REST reaches into live data

    assert emitted(out) == [6, 7, 8, 9, 10, 11]
    assert seq.duplicates == 2


def test_resume_point_from_the_store_starts_with_a_catch_up() -> None:
    seq = IdSequencer(
        "BINANCE",
        [S],
        grace_ns=0,
        max_hold_ns=10**12,
        max_pending=10,
        max_attempts=3,
        retry_ns=0,
        max_backfill=100,
        resume={S: 41},
    )

    assert seq.next_id(S) == 42
    assert seq.due(0)[0] == [BackfillRequest(S, 42, OPEN_ENDED)]


def test_a_gap_wider_than_the_backfill_bound_loses_only_its_oldest_part() -> None:
    seq = sequencer(max_backfill=10)
    seq.offer(S, ticks([1]), 0)
    seq.offer(S, ticks([100]), 0)

    requests, out = seq.due(1_000 * MS)

    assert requests == [BackfillRequest(S, 90, 99)]
    assert [(g.from_value, g.to_value, g.status) for g in out.gaps] == [(2, 89, "unfilled")]


def test_too_many_held_trades_give_the_gap_up() -> None:
    seq = sequencer(max_pending=3)
    seq.offer(S, ticks([1]), 0)

    out = seq.offer(S, ticks([10, 11, 12, 13]), 0)

    assert emitted(out) == [10, 11, 12, 13]
    assert [(g.from_value, g.to_value, g.status) for g in out.gaps] == [(2, 9, "unfilled")]


def test_held_trades_are_dropped_at_stop_for_the_next_start_to_catch_up() -> None:
    seq = sequencer()
    seq.offer(S, ticks([1]), 0)
    seq.offer(S, ticks([3, 4]), 0)

    assert seq.drop_held() == 2
    assert seq.next_id(S) == 2
