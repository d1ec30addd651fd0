"""The live Binance source: spot ``<symbol>@trade`` combined streams, with REST backfill of every gap.

Streams (``<symbol>@trade``, or ``<symbol>@aggTrade`` with ``stream = "aggTrade"``) are subscribed in
the connection URL (``/stream?streams=btcusdt@trade/...``), so the source sends no subscribe messages at
all: the only messages it sends are one pong per server ping (echoing its payload) and a ping of its own
when a connection has been quiet for ``heartbeat_s``, far below Binance's 5 incoming messages per second.
Symbols are spread over connections of at most ``streams_per_connection`` streams (Binance allows 1024).

Each connection is *rotated* make-before-break: before the 24-hour cut (``max_connection_age_s``) and when
the server announces ``serverShutdown``, a new connection is opened, and the old one is closed only once the
new one delivers. The overlap is deduplicated by trade id (see :mod:`alphaengine.sources.sequencer`), and
a lost connection is caught up through REST (``historicalTrades`` by ``fromId``) from the first trade id
not yet emitted, so that no trade is missing and none is emitted twice. With ``resume_from_store`` the
source starts from the highest trade id already stored per symbol and catches up what happened while it
was down.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Annotated, Any, ClassVar, Literal

import msgspec
import pyarrow as pa
import pyarrow.compute as pc

from alphaengine.domain import TickBatch
from alphaengine.errors import FeedError, RestError
from alphaengine.kernel.module import Context, ModuleSettings
from alphaengine.metrics import FEED_BACKFILLED, FEED_SYMBOL_IDLE, FEED_UNFILLED_TRADES
from alphaengine.sources.binance import VENUE, BinanceTradeParser
from alphaengine.sources.binance_rest import BinanceRestClient
from alphaengine.sources.feed import (
    MAX_AGE,
    PROVIDER_ERROR,
    SERVER_SHUTDOWN,
    STOPPING,
    UNKNOWN_SYMBOL,
    Connector,
    FeedConnection,
    FeedSettings,
)
from alphaengine.sources.live import LiveSource
from alphaengine.sources.sequencer import OPEN_ENDED, BackfillRequest, IdSequencer, SequencerOutput

_SHUTDOWN_MARK = b"serverShutdown"
_ERROR_MARK = b'"code"'


class BinanceSettings(FeedSettings, frozen=True, kw_only=True):
    """Settings of the live Binance source (``type = "binance"``)."""

    ws_url: str = "wss://data-stream.binance.vision"
    """Market-data WebSocket base; ``/stream?streams=...`` is appended."""
    rest_url: str = "https://api.binance.com"
    """REST base for backfill (``/api/v3/historicalTrades``)."""
    stream: Literal["trade", "aggTrade"] = "trade"
    """``trade``: every trade (``<symbol>@trade``, backfilled by ``historicalTrades``); ``aggTrade``:
    aggregate trades (``<symbol>@aggTrade``, fewer messages; backfilled by ``aggTrades``), stored with the
    aggregate id as ``trade_id``. Do not switch an existing store between the two: the ids differ."""
    api_key: str | None = None
    """Sent as ``X-MBX-APIKEY`` to REST when set (from an environment variable, never logged)."""
    streams_per_connection: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 200
    """Streams per WebSocket connection (Binance allows 1024)."""
    max_connection_age_s: Annotated[float, msgspec.Meta(gt=0.0)] = 23.5 * 3600
    """Rotate a connection after this long, before Binance cuts it at 24 hours."""
    rotation_overlap_s: Annotated[float, msgspec.Meta(gt=0.0)] = 5.0
    """During a rotation, close the old connection once the new one delivered, or after this long."""
    gap_grace_s: Annotated[float, msgspec.Meta(ge=0.0)] = 1.0
    """How long a gap may close by itself (late frames of a rotated connection) before a backfill."""
    max_gap_hold_s: Annotated[float, msgspec.Meta(gt=0.0)] = 120.0
    """Give up a gap (recorded as unfilled) when trades have waited behind it this long."""
    max_held_trades: Annotated[int, msgspec.Meta(gt=0)] = 500_000
    """Give up a gap when more trades than this wait behind it."""
    max_backfill_trades: Annotated[int, msgspec.Meta(gt=0)] = 200_000
    """Most trades one backfill fetches; the older part of a wider gap is recorded as unfilled."""
    backfill_attempts: Annotated[int, msgspec.Meta(gt=0)] = 5
    """Backfills of one gap before it is given up."""
    backfill_retry_s: Annotated[float, msgspec.Meta(ge=0.0)] = 2.0
    """Wait between backfills of the same gap."""
    rest_weight_limit_per_min: Annotated[int, msgspec.Meta(gt=0)] = 5000
    """REST request weight per minute the source allows itself (Binance's limit is 6000)."""
    resume_from_store: bool = True
    """Start each symbol from its highest stored trade id and catch up the trades missed while down."""


class BinanceSource(LiveSource[BinanceSettings]):
    """Live Binance spot trades (see the module docstring)."""

    Config: ClassVar[type[ModuleSettings]] = BinanceSettings
    parser: BinanceTradeParser

    def __init__(self, name: str, config: BinanceSettings, ctx: Context) -> None:
        super().__init__(name, config, ctx)
        self.symbols = tuple(s.upper() for s in config.symbols)
        self.parser = BinanceTradeParser(
            name, clock=ctx.clock, log=self.log, log_interval_s=config.log_interval_s, event=config.stream
        )
        self._known = frozenset(self.symbols)
        self._connections: dict[int, FeedConnection] = {}
        self._sequencer: IdSequencer | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """The REST client, and where each symbol resumes."""
        cfg = self.config
        for symbol in self.symbols:  # zeros from the start, for rates and alerts
            FEED_BACKFILLED.labels(self.name, symbol)
            FEED_UNFILLED_TRADES.labels(self.name, symbol)
        self.rest = BinanceRestClient(
            cfg.rest_url,
            source=self.name,
            session=self.session,
            api_key=cfg.api_key,
            weight_limit_per_min=cfg.rest_weight_limit_per_min,
            clock=self.ctx.clock,
        )
        resume = await self._resume_points() if cfg.resume_from_store else {}
        self._sequencer = IdSequencer(
            VENUE,
            self.symbols,
            grace_ns=int(cfg.gap_grace_s * 1e9),
            max_hold_ns=int(cfg.max_gap_hold_s * 1e9),
            max_pending=cfg.max_held_trades,
            max_attempts=cfg.backfill_attempts,
            retry_ns=int(cfg.backfill_retry_s * 1e9),
            max_backfill=cfg.max_backfill_trades,
            resume=resume,
        )

    def at_stop(self) -> None:
        """Trades held behind gaps wait for the next start (see IdSequencer.drop_held)."""
        dropped = self._require_sequencer().drop_held()
        if dropped:
            self.log.info("%s: %d trades held behind open gaps left for the next start", self.name, dropped)

    async def _resume_points(self) -> dict[str, int]:
        """The highest stored trade id per configured symbol."""
        listed = ", ".join(f"'{s}'" for s in self.symbols)
        rows = await self.stored_max_ids(f"venue = '{VENUE}' AND symbol IN ({listed})")
        points = {str(r["symbol"]): int(r["last_id"]) for r in rows}
        if points:
            self.log.info("%s: resuming after stored trade ids %s", self.name, points)
        return points

    # -- output -----------------------------------------------------------------------------------

    def _emit(self, out: SequencerOutput) -> None:
        """Queue sequenced batches (synchronously, so that each symbol's order is kept) and record gaps."""
        for batch in out.batches:
            self.queue(batch)
        for gap in out.gaps:
            self.gaps.record(gap)
            if gap.status == "filled":
                FEED_BACKFILLED.labels(self.name, gap.symbol).inc(gap.ticks)
            elif gap.kind == "ids":
                FEED_UNFILLED_TRADES.labels(self.name, gap.symbol).inc(gap.to_value - gap.from_value + 1)

    # -- the feed ---------------------------------------------------------------------------------

    async def run_feed(self) -> None:
        """One task per group of streams, one parser for all, and the housekeeping."""
        per = self.config.streams_per_connection
        streams = [f"{s.lower()}@{self.config.stream}" for s in self.symbols]
        groups = [streams[i : i + per] for i in range(0, len(streams), per)]
        # Owned by the module: if one of them raises, the module fails and the supervisor restarts it.
        processor = self.spawn(self._process(), "parse")
        housekeeping = self.spawn(self._housekeeping(), "housekeeping")
        try:
            await asyncio.gather(*(self._run_slot(group) for group in groups))
            await self.buffer.drained()
        finally:
            processor.cancel()
            housekeeping.cancel()
            await asyncio.gather(processor, housekeeping, return_exceptions=True)

    async def _run_slot(self, streams: list[str]) -> None:
        """Keep one group of streams connected: reconnect after losses, rotate before cuts."""
        connector = self._connector()
        url = f"{self.config.ws_url.rstrip('/')}/stream?streams={'/'.join(streams)}"
        conn = await connector.connect(url, first=True)
        if conn is None:
            return
        rotate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        reader = self._start_reader(conn, rotate)
        while True:
            age_left = (
                self.config.max_connection_age_s - (self.ctx.clock.now_ns() - conn.health.opened_ns) / 1e9
            )
            aged = asyncio.ensure_future(self.ctx.clock.sleep(max(0.0, age_left)))
            stop = asyncio.ensure_future(self.stopping.wait())
            try:
                await asyncio.wait((reader, rotate, aged, stop), return_when=asyncio.FIRST_COMPLETED)
            finally:
                aged.cancel()
                stop.cancel()
            if self.stopping.is_set():
                await self._finish(conn, reader, STOPPING)
                return
            if reader.done():
                self._closed(conn, reader.result())
                lost: FeedConnection | None = await connector.connect(url)
                if lost is None:
                    return
                conn = lost
                self._require_sequencer().reconnected(self.ctx.clock.now_ns())
            else:
                # Make-before-break: the new connection reads into the same buffer at once (the sequencer
                # drops the overlap by trade id); the old one closes once the new one has delivered.
                why = rotate.result() if rotate.done() else MAX_AGE
                self.log.info("%s: rotating connection %d (%s)", self.name, conn.health.id, why)
                new = await connector.connect(url, first=True)
                if new is None:
                    await self._finish(conn, reader, STOPPING)
                    return
                new_rotate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
                new_reader = self._start_reader(new, new_rotate)
                await self._until_delivering(new, new_reader, reader)
                if reader.done():  # the old one was lost before the new one delivered: catch up
                    self._require_sequencer().reconnected(self.ctx.clock.now_ns())
                await self._finish(conn, reader, why)
                conn, reader, rotate = new, new_reader, new_rotate
                continue
            rotate = asyncio.get_running_loop().create_future()
            reader = self._start_reader(conn, rotate)

    async def _until_delivering(
        self, new: FeedConnection, new_reader: asyncio.Future[str], old_reader: asyncio.Future[str]
    ) -> None:
        """Wait until ``new`` received a data frame, either connection ended, or the overlap bound passed."""
        delivering = asyncio.ensure_future(new.delivering.wait())
        bound = asyncio.ensure_future(self.ctx.clock.sleep(self.config.rotation_overlap_s))
        try:
            await asyncio.wait(
                (delivering, bound, new_reader, old_reader), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            delivering.cancel()
            bound.cancel()

    def _start_reader(self, conn: FeedConnection, rotate: asyncio.Future[str]) -> asyncio.Future[str]:
        self._connections[conn.health.id] = conn
        return asyncio.ensure_future(self._read(conn, rotate))

    def _closed(self, conn: FeedConnection, reason: str) -> None:
        self._connector().closed(conn, reason)
        self._connections.pop(conn.health.id, None)

    async def _finish(self, conn: FeedConnection, reader: asyncio.Future[str], reason: str) -> None:
        await conn.close(reason)
        with contextlib.suppress(Exception):
            await reader
        self._closed(conn, reason)

    async def _read(self, conn: FeedConnection, rotate: asyncio.Future[str]) -> str:
        def on_frame(frame: bytes) -> None:
            # A cheap substring test on every frame; only a frame that mentions it is parsed here.
            if _SHUTDOWN_MARK in frame and not rotate.done():
                with contextlib.suppress(msgspec.DecodeError, TypeError, KeyError):
                    obj = msgspec.json.decode(frame)
                    data = obj.get("data", obj) if isinstance(obj, dict) else None
                    if isinstance(data, dict) and data.get("e") == "serverShutdown":
                        rotate.set_result(SERVER_SHUTDOWN)

        return await conn.run(self.buffer, on_binary=self.binary_frame, on_frame=on_frame)

    async def _process(self) -> None:
        """Parse buffered frames in bulk and sequence the trades (one task for every connection)."""
        parser = self.parser
        sequencer = self._require_sequencer()
        clock = self.ctx.clock
        while True:
            frames, recv_ns = await self.take_frames()
            if any(_ERROR_MARK in f for f in frames):
                frames, recv_ns = self._without_errors(frames, recv_ns)
            batch = parser.parse(frames, recv_ns)
            if not len(batch):
                continue
            batch = self._known_symbols(batch)
            self.latency.observe(batch.np("recv_ns"), batch.np("ts_ns"))
            now = clock.now_ns()
            for symbol, part in batch.split_by_symbol():
                self.last_live_ns[symbol] = now
                self._emit(sequencer.offer(symbol, part, now))

    def _without_errors(self, frames: list[bytes], recv_ns: list[int]) -> tuple[list[bytes], list[int]]:
        """The frames that are not provider error answers (those are counted and logged)."""
        kept = [(f, r) for f, r in zip(frames, recv_ns, strict=True) if not self._provider_error(f)]
        return [f for f, _ in kept], [r for _, r in kept]

    def _provider_error(self, frame: bytes) -> bool:
        """Whether ``frame`` is an error answer (``{"code": .., "msg": ..}``); counted and logged if so."""
        if _ERROR_MARK not in frame:
            return False
        try:
            obj = msgspec.json.decode(frame)
        except msgspec.DecodeError:
            return False
        if isinstance(obj, dict) and "code" in obj and "msg" in obj and "e" not in obj:
            self.parser.reject(PROVIDER_ERROR, f"code {obj['code']!r}: {str(obj['msg'])[:200]}")
            return True
        return False

    def _known_symbols(self, batch: TickBatch) -> TickBatch:
        known = pc.is_in(batch.data.column("symbol"), value_set=pa.array(sorted(self._known)))
        if pc.all(known).as_py():
            return batch
        unknown = pc.invert(known)
        first = batch.data.filter(unknown).column("symbol")[0].as_py()
        self.parser.reject(UNKNOWN_SYMBOL, f"symbol {first!r}", int(pc.sum(unknown.cast(pa.int64())).as_py()))
        return TickBatch(batch.data.filter(known))

    async def _housekeeping(self) -> None:
        """Start due backfills, release hopeless gaps and publish per-symbol idleness, ten times a second."""
        sequencer = self._require_sequencer()
        clock = self.ctx.clock
        while True:
            now = clock.now_ns()
            requests, out = sequencer.due(now)
            self._emit(out)
            for request in requests:
                self.start_backfill(self._backfill(request))
            for symbol in self.symbols:
                last = self.last_live_ns.get(symbol)
                if last is not None:
                    FEED_SYMBOL_IDLE.labels(self.name, symbol).set((now - last) / 1e9)
            await clock.sleep(0.1)

    async def _backfill(self, request: BackfillRequest) -> None:
        rest = self.rest
        assert rest is not None
        sequencer = self._require_sequencer()
        last = request.last_id
        if last == OPEN_ENDED:
            last = request.first_id + self.config.max_backfill_trades - 1
        batch: TickBatch | None = None
        error = ""
        try:
            if self.config.stream == "trade":
                batch = await rest.trades_between_ids(request.symbol, request.first_id, last)
            else:
                batch = await rest.aggregates_between_ids(request.symbol, request.first_id, last)
        except (RestError, FeedError) as exc:
            error = str(exc)
            self.log.warning("%s: backfill of %s failed: %s", self.name, request, exc)
        except Exception as exc:  # a bug must not leave the gap waiting forever on a dead request
            error = f"{type(exc).__name__}: {exc}"
            self.log.exception("%s: backfill of %s failed unexpectedly", self.name, request)
        self._emit(sequencer.backfilled(request, batch, self.ctx.clock.now_ns(), error))

    # -- introspection ----------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """Connections, per-symbol sequencing state, gaps, latency and reconnect figures."""
        now = self.ctx.clock.now_ns()
        sequencer = self._sequencer
        connector = self.connector
        symbols: dict[str, Any] = {}
        for symbol in self.symbols:
            last = self.last_live_ns.get(symbol)
            symbols[symbol] = {
                "next_id": sequencer.next_id(symbol) if sequencer else None,
                "held": sequencer.held(symbol) if sequencer else 0,
                "idle_s": None if last is None else round((now - last) / 1e9, 3),
            }
        return {
            "connections": [c.health.as_dict(now) for c in self._connections.values()],
            "connect_attempts": connector.attempts if connector else 0,
            "max_reconnect_delay_s": connector.max_delay_s if connector else 0.0,
            "symbols": symbols,
            "recent_gaps": [dataclasses.asdict(g) for g in self.gaps.recorded[-20:]],
            "min_latency_s": self.latency.min_latency_s,
            "duplicates_dropped": sequencer.duplicates if sequencer else 0,
            "rejected": dict(self.parser.stats.rejected),
        }

    def _require_sequencer(self) -> IdSequencer:
        assert self._sequencer is not None, "the source is not started"
        return self._sequencer

    def _connector(self) -> Connector:
        assert self.connector is not None, "the source is not started"
        return self.connector
