"""The live Finnhub source: trades over Finnhub's WebSocket, with disconnected windows backfilled.

One connection (Finnhub allows one per API key) to ``wss://ws.finnhub.io?token=...``; the token comes from
the configuration (an environment variable in practice) and is never logged (URLs are shown redacted). A
``subscribe`` message per symbol is sent after every connection, since a new connection starts with none.
``{"type":"ping"}`` messages and protocol pings keep the watchdog fed; ``v = 0`` entries are price updates,
not trades; provider errors are counted and logged, and "Subscribing to too many symbols" marks the module
DEGRADED.

Trade ids: Finnhub sends none, so the source assigns them per symbol, increasing in emission order:
``max(t_ms * 65536, previous id + 1)``. Identical trades in the same millisecond (legal) get distinct ids;
with ``resume_from_store`` numbering continues above the highest stored id, so a restart never reuses an
id. Ids of this source are therefore not the venue's: do not feed the same symbols from the Binance source
into the same store.

Disconnected windows: when a connection is lost, each symbol's window opens at the exchange time of its last
trade received; after the reconnection it closes at the time of the symbol's first live trade (or at the
reconnection time if none comes within ``window_close_s``). Live trades of the symbol are held meanwhile.
Where the venue is Binance, the window is backfilled from Binance's REST API by time range
(:meth:`~alphaengine.sources.binance_rest.BinanceRestClient.trades_between_times`) and deduplicated *with
multiplicity* against the live trades at its two edges, keyed by ``(time, price, quantity)``: two identical
trades in one millisecond are two trades, and only as many copies as REST has beyond the live ones are
added. Every window is recorded in ``feed_gaps`` (kind ``time``) as filled or unfilled.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

import aiohttp
import msgspec
import numpy as np
import orjson
import pyarrow as pa
from yarl import URL

from alphaengine.domain import TICK_SCHEMA, TickBatch
from alphaengine.errors import FeedAuthError, FeedError
from alphaengine.kernel.module import Context, ModuleSettings
from alphaengine.metrics import FEED_BACKFILLED, FEED_SYMBOL_IDLE
from alphaengine.sources.binance_rest import BinanceRestClient
from alphaengine.sources.feed import (
    STOPPING,
    FeedConnection,
    FeedSettings,
    Gap,
)
from alphaengine.sources.finnhub_parser import DEFAULT_VENUE, FinnhubParser
from alphaengine.sources.live import LiveSource

_ID_SHIFT = 16
"""Room for 65,536 trades per millisecond per symbol before ids borrow from the next millisecond."""
_MS = 1_000_000
_TOO_MANY = "too many symbols"

_TradeKey = tuple[int, float, float]


class FinnhubSettings(FeedSettings, frozen=True, kw_only=True):
    """Settings of the live Finnhub source (``type = "finnhub"``)."""

    ws_url: str = "wss://ws.finnhub.io"
    """WebSocket endpoint; ``?token=`` is appended."""
    token: str
    """The API key (``token = "${FINNHUB_TOKEN}"``; never logged). May be empty in a file where the
    module is disabled; an enabled module with an empty token fails at start."""
    binance_rest_url: str | None = "https://api.binance.com"
    """Where ``BINANCE:`` symbols' disconnected windows are backfilled from; empty or None: not at all."""
    heartbeat_s: Annotated[float, msgspec.Meta(gt=0.0)] = 15.0
    idle_timeout_s: Annotated[float, msgspec.Meta(gt=0.0)] = 45.0
    window_close_s: Annotated[float, msgspec.Meta(gt=0.0)] = 2.0
    """After a reconnection, how long a symbol's first live trade may take to close its window."""
    max_gap_hold_s: Annotated[float, msgspec.Meta(gt=0.0)] = 120.0
    """Give a window up (recorded as unfilled, held trades released) after holding trades this long."""
    backfill_attempts: Annotated[int, msgspec.Meta(gt=0)] = 3
    """Backfills of one window before it is given up."""
    max_backfill_window_s: Annotated[float, msgspec.Meta(gt=0.0)] = 6 * 3600.0
    """Longer windows are backfilled for their last part only and recorded as partial."""
    rest_weight_limit_per_min: Annotated[int, msgspec.Meta(gt=0)] = 5000
    """Binance REST request weight per minute the backfill allows itself."""
    resume_from_store: bool = True
    """Continue each symbol's trade-id numbering above its highest stored id."""


@dataclass(slots=True)
class _Lane:
    """One subscribed symbol: id numbering, the last millisecond's trades, and an open window if any."""

    finnhub_symbol: str
    venue: str
    symbol: str
    last_id: int = 0
    last_t_ms: int | None = None
    edge: collections.Counter[_TradeKey] = field(default_factory=collections.Counter)
    """Multiset of the emitted live trades of millisecond ``last_t_ms``."""
    window_from_ms: int | None = None
    window_to_ms: int | None = None
    reconnected_ns: int | None = None
    held: list[TickBatch] = field(default_factory=list)
    held_since_ns: int | None = None
    backfilling: bool = False
    attempts: int = 0
    disconnects: int = 0
    """Counts lost connections, so that a backfill started before the latest one is known to be stale."""

    @property
    def in_window(self) -> bool:
        return self.window_from_ms is not None


class FinnhubSource(LiveSource[FinnhubSettings]):
    """Live trades from Finnhub (see the module docstring)."""

    Config: ClassVar[type[ModuleSettings]] = FinnhubSettings
    parser: FinnhubParser

    def __init__(self, name: str, config: FinnhubSettings, ctx: Context) -> None:
        super().__init__(name, config, ctx)
        self.parser = FinnhubParser(
            name, config.symbols, clock=ctx.clock, log=self.log, log_interval_s=config.log_interval_s
        )
        self.lanes = {s: _lane(s) for s in config.symbols}
        self._by_pair = {(lane.venue, lane.symbol): lane for lane in self.lanes.values()}
        self._connection: FeedConnection | None = None
        self.provider_errors: list[str] = []

    # -- lifecycle --------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Check the token, make the backfill client, continue id numbering from the store."""
        cfg = self.config
        for each in self.lanes.values():  # zeros from the start, for rates
            FEED_BACKFILLED.labels(self.name, each.finnhub_symbol)
        if not cfg.token:
            raise FeedAuthError(f"{self.name}: token is empty: set it (FINNHUB_TOKEN in config/prod.toml)")
        if cfg.binance_rest_url:
            self.rest = BinanceRestClient(
                cfg.binance_rest_url,
                source=self.name,
                session=self.session,
                weight_limit_per_min=cfg.rest_weight_limit_per_min,
                clock=self.ctx.clock,
            )
        if cfg.resume_from_store:
            pairs = " OR ".join(f"(venue = '{v}' AND symbol = '{s}')" for v, s in self._by_pair)
            for row in await self.stored_max_ids(pairs):
                lane = self._by_pair.get((str(row["venue"]), str(row["symbol"])))
                if lane is not None:
                    lane.last_id = int(row["last_id"])

    # -- output -----------------------------------------------------------------------------------

    def _emit(self, lane: _Lane, batch: TickBatch) -> None:
        """Number ``batch`` (one symbol's trades, in order) and queue it."""
        n = len(batch)
        if not n:
            return
        t_ms = batch.np("ts_ns") // _MS
        base = t_ms << _ID_SHIFT
        # id_i = max(base_i, id_{i-1} + 1): subtracting i turns it into a running maximum.
        steps = np.arange(n, dtype=np.int64)
        ids = np.maximum.accumulate(np.r_[lane.last_id + 1, base - steps])[1:] + steps
        lane.last_id = int(ids[-1])
        top = int(t_ms.max())
        at_top = t_ms == top
        keys = zip(
            t_ms[at_top].tolist(),
            batch.np("price")[at_top].tolist(),
            batch.np("qty")[at_top].tolist(),
            strict=True,
        )
        if lane.last_t_ms is None or top > lane.last_t_ms:
            lane.last_t_ms = top
            lane.edge = collections.Counter(keys)
        elif top == lane.last_t_ms:
            lane.edge.update(keys)
        self.queue(TickBatch(batch.data.set_column(2, TICK_SCHEMA.field("trade_id"), pa.array(ids))))

    # -- the feed ---------------------------------------------------------------------------------

    async def run_feed(self) -> None:
        """The connection loop, the parser and the housekeeping."""
        # Owned by the module: if one of them raises, the module fails and the supervisor restarts it.
        processor = self.spawn(self._process(), "parse")
        housekeeping = self.spawn(self._housekeeping(), "housekeeping")
        try:
            await self._connect_loop()
            await self.buffer.drained()
        finally:
            processor.cancel()
            housekeeping.cancel()
            await asyncio.gather(processor, housekeeping, return_exceptions=True)

    async def _connect_loop(self) -> None:
        connector = self.connector
        assert connector is not None
        url = str(URL(self.config.ws_url).update_query(token=self.config.token))
        first = True
        while True:
            conn = await connector.connect(url, first=first)
            if conn is None:
                return
            if not first:
                self._reconnected()
            first = False
            self._connection = conn
            reader = asyncio.ensure_future(conn.run(self.buffer, on_binary=self.binary_frame))
            try:
                for symbol in self.config.symbols:
                    await conn.send_str(orjson.dumps({"type": "subscribe", "symbol": symbol}).decode())
            except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
                self.log.warning("%s: subscribing failed: %s", self.name, exc)
            stop = asyncio.ensure_future(self.stopping.wait())
            try:
                await asyncio.wait((reader, stop), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
            if self.stopping.is_set():
                await conn.close(STOPPING)
                await asyncio.gather(reader, return_exceptions=True)
                connector.closed(conn, STOPPING)
                return
            connector.closed(conn, reader.result())
            self._connection = None
            self._disconnected(conn.health.last_frame_ns)

    def _disconnected(self, last_frame_ns: int) -> None:
        """Open a window on every symbol (keeping one already open: the reconnection failed again)."""
        for lane in self.lanes.values():
            if lane.window_from_ms is None:
                lane.window_from_ms = (
                    lane.last_t_ms if lane.last_t_ms is not None else self._exchange_ms(last_frame_ns)
                )
            lane.window_to_ms = None
            lane.reconnected_ns = None
            lane.disconnects += 1

    def _reconnected(self) -> None:
        now = self.ctx.clock.now_ns()
        for lane in self.lanes.values():
            if lane.in_window:
                lane.reconnected_ns = now
                lane.held_since_ns = lane.held_since_ns or now

    async def _process(self) -> None:
        """Parse buffered messages in bulk; route trades to their symbols."""
        parser = self.parser
        clock = self.ctx.clock
        while True:
            frames, recv_ns = await self.take_frames()
            parsed = parser.parse(frames, recv_ns)
            for message in parsed.errors:
                self._provider_error(message)
            batch = parsed.trades
            if not len(batch):
                continue
            self.latency.observe(batch.np("recv_ns"), batch.np("ts_ns"))
            now = clock.now_ns()
            for symbol, part in batch.split_by_symbol():
                lane = self._by_pair.get((str(part.data.column("venue")[0].as_py()), symbol))
                if lane is None:  # the parser only passes subscribed symbols
                    continue
                self.last_live_ns[lane.finnhub_symbol] = now
                if lane.in_window:
                    lane.held.append(part)
                    if lane.window_to_ms is None and lane.reconnected_ns is not None:
                        lane.window_to_ms = int(part.np("ts_ns")[0] // _MS)
                else:
                    self._emit(lane, part)

    def _provider_error(self, message: str) -> None:
        self.provider_errors.append(message)
        del self.provider_errors[:-100]
        if _TOO_MANY in message.lower():
            self.set_degraded(f"Finnhub refused the subscriptions: {message}")

    async def _housekeeping(self) -> None:
        """Close windows whose symbol stayed quiet, start backfills, give up hopeless windows."""
        clock = self.ctx.clock
        close_ns = int(self.config.window_close_s * 1e9)
        hold_ns = int(self.config.max_gap_hold_s * 1e9)
        while True:
            now = clock.now_ns()
            for lane in self.lanes.values():
                last = self.last_live_ns.get(lane.finnhub_symbol)
                if last is not None:
                    FEED_SYMBOL_IDLE.labels(self.name, lane.finnhub_symbol).set((now - last) / 1e9)
                if not lane.in_window or lane.reconnected_ns is None or lane.backfilling:
                    continue
                if lane.window_to_ms is None and now - lane.reconnected_ns >= close_ns:
                    lane.window_to_ms = self._exchange_ms(now)
                if lane.window_to_ms is None:
                    continue
                if lane.held_since_ns is not None and now - lane.held_since_ns >= hold_ns:
                    self._close_window(lane, None, "held too long")
                elif self.rest is None or lane.venue != "BINANCE":
                    self._close_window(lane, None, "no backfill for this venue")
                else:
                    lane.backfilling = True
                    self.start_backfill(self._backfill(lane))
            await clock.sleep(0.1)

    def _exchange_ms(self, local_ns: int) -> int:
        """The exchange's time at local time ``local_ns``, as well as the latency envelope tells it."""
        offset_s = self.latency.min_latency_s or 0.0
        return (local_ns - int(offset_s * 1e9)) // _MS

    async def _backfill(self, lane: _Lane) -> None:
        rest = self.rest
        assert rest is not None
        assert lane.window_from_ms is not None
        assert lane.window_to_ms is not None
        start_ms = max(lane.window_from_ms, lane.window_to_ms - int(self.config.max_backfill_window_s * 1000))
        generation = lane.disconnects
        try:
            fetched = await rest.trades_between_times(lane.symbol, start_ms, lane.window_to_ms)
        except Exception as exc:  # REST errors, and a bug must not leave the window open forever
            lane.backfilling = False
            if generation != lane.disconnects:
                return
            lane.attempts += 1
            self.log.warning(
                "%s: backfill of %s failed: %s",
                self.name,
                lane.finnhub_symbol,
                exc,
                exc_info=not isinstance(exc, FeedError),
            )
            if lane.attempts >= self.config.backfill_attempts:
                self._close_window(lane, None, str(exc))
            return
        lane.backfilling = False
        if generation != lane.disconnects:
            # The connection was lost again meanwhile: the window now reaches further; fetch it again
            # once the next connection has said where it ends.
            return
        partial = start_ms > lane.window_from_ms
        self._close_window(lane, fetched, "window longer than max_backfill_window_s" if partial else "")

    def _close_window(self, lane: _Lane, fetched: TickBatch | None, detail: str) -> None:
        """Record the window; emit the missed trades and the held ones together, in time order.

        Missed: what REST returned minus what was seen live, with multiplicity (:meth:`_unseen`).
        """
        assert lane.window_from_ms is not None
        window_to = lane.window_to_ms if lane.window_to_ms is not None else lane.window_from_ms
        parts = [b.data for b in lane.held]
        recovered = 0
        if fetched is not None and len(fetched):
            missed = self._unseen(lane, fetched)
            recovered = len(missed)
            parts.append(missed.data)
            FEED_BACKFILLED.labels(self.name, lane.finnhub_symbol).inc(recovered)
        status = "unfilled" if fetched is None else ("partial" if detail else "filled")
        self.gaps.record(
            Gap(
                lane.venue,
                lane.symbol,
                "time",
                lane.window_from_ms * _MS,
                window_to * _MS,
                status,
                recovered,
                detail,
            )
        )
        if parts:
            merged = pa.Table.from_batches(parts).combine_chunks()
            # Stable: trades of one millisecond keep the order they were received or listed in.
            order = np.argsort(merged.column("ts_ns").to_numpy(), kind="stable")
            merged = merged.take(pa.array(order))
            if merged.num_rows:
                self._emit(lane, TickBatch(merged.to_batches()[0]))
        lane.held = []
        lane.window_from_ms = lane.window_to_ms = lane.reconnected_ns = lane.held_since_ns = None
        lane.attempts = 0

    def _unseen(self, lane: _Lane, fetched: TickBatch) -> TickBatch:
        """The fetched trades not seen live, counting identical trades as many times as they occur.

        Seen live: the emitted trades of the window's first millisecond (``lane.edge``) and the held trades
        of the reconnection side. Everything else in the window was missed.
        """
        seen: collections.Counter[_TradeKey] = collections.Counter()
        if lane.last_t_ms is not None and lane.last_t_ms == lane.window_from_ms:
            seen.update(lane.edge)
        for part in lane.held:
            seen.update(_keys(part))
        if not seen:
            return fetched
        keep = np.ones(len(fetched), dtype=bool)
        for i, key in enumerate(_keys(fetched)):
            if seen[key] > 0:
                seen[key] -= 1
                keep[i] = False
        return TickBatch(fetched.data.filter(pa.array(keep)))

    def at_stop(self) -> None:
        """At stop, windows still open are recorded unfilled and their held trades emitted."""
        for lane in self.lanes.values():
            if lane.in_window:
                self._close_window(lane, None, "stopped before the window was backfilled")

    # -- introspection ----------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """The connection, per-symbol windows and idleness, provider errors, latency, reconnect figures."""
        now = self.ctx.clock.now_ns()
        conn = self._connection
        connector = self.connector
        symbols: dict[str, Any] = {}
        for name, lane in self.lanes.items():
            last = self.last_live_ns.get(name)
            symbols[name] = {
                "in_window": lane.in_window,
                "held": sum(len(b) for b in lane.held),
                "idle_s": None if last is None else round((now - last) / 1e9, 3),
            }
        return {
            "connection": None if conn is None else conn.health.as_dict(now),
            "connect_attempts": connector.attempts if connector else 0,
            "max_reconnect_delay_s": connector.max_delay_s if connector else 0.0,
            "symbols": symbols,
            "recent_gaps": [dataclasses.asdict(g) for g in self.gaps.recorded[-20:]],
            "provider_errors": self.provider_errors[-10:],
            "min_latency_s": self.latency.min_latency_s,
            "rejected": dict(self.parser.stats.rejected),
        }


def _lane(finnhub_symbol: str) -> _Lane:
    venue, sep, symbol = finnhub_symbol.partition(":")
    if not sep:
        venue, symbol = DEFAULT_VENUE, finnhub_symbol
    return _Lane(finnhub_symbol, venue, symbol)


def _keys(batch: TickBatch) -> list[_TradeKey]:
    t_ms = (batch.np("ts_ns") // _MS).tolist()
    return list(zip(t_ms, batch.np("price").tolist(), batch.np("qty").tolist(), strict=True))
