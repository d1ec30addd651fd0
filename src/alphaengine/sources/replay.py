"""Replay of recorded market data as a source: raw Binance recordings and tick files.

Formats, chosen by file name:

* ``*.gz``, ``*.jsonl``, ``*.txt`` (except ``*.csv.gz``): raw Binance WebSocket recordings, one message a
  line as ``<local receive time, ns> <message JSON>`` (gzip-compressed for ``.gz``). Trades are parsed by
  :class:`~alphaengine.sources.binance.BinanceTradeParser`; other streams are ignored, bad lines rejected
  and counted.
* ``*.parquet``, ``*.csv``, ``*.csv.gz``: tick files with the columns of
  :data:`~alphaengine.domain.TICK_SCHEMA` (other columns are ignored; a missing one is an error). Rows
  with nulls, a non-finite or non-positive price or quantity, or a side outside -1/0/+1 are rejected.

Files are replayed in the order given (the files a glob matches in name order), each in record order.
Reading, decompressing and parsing happen in worker threads, one bounded chunk at a time, the next chunk
read while the current one is sent: memory stays bounded whatever the file size.

Pacing: with ``speed = "max"`` batches of ``batch_size`` ticks go out as fast as the bus takes them.
With a number, a tick is due when the injected clock has advanced by ``(ts_ns - first ts_ns) / speed``
since the first tick; times are taken as a running maximum, so data that goes back in time (a second
file covering the same period) is sent at once rather than waited for.

With ``loop = true`` the files are replayed again and again; each new pass is shifted forward in time
by the span of the data plus one second, and each symbol's trade ids by the span of its ids, so every
pass is new, contiguous data to the pipeline (ids and times stay unique per symbol).
"""

from __future__ import annotations

import asyncio
import glob
import gzip
import io
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Final, Literal, Protocol

import msgspec
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from alphaengine.clock import Clock
from alphaengine.domain import TICK_SCHEMA, TickBatch
from alphaengine.errors import AlphaEngineError
from alphaengine.kernel.module import Context, ModuleSettings
from alphaengine.sources.base import SourceSettings, TickSource
from alphaengine.sources.binance import BinanceTradeParser

MALFORMED_LINE: Final = "malformed_line"
"""A recording line that is not ``<integer receive time> <message>``."""
INVALID_ROW: Final = "invalid_row"
"""A tick-file row with a null, a non-finite or non-positive price or quantity, or an unknown side."""

_RECORDING_SUFFIXES: Final = (".gz", ".jsonl", ".txt")
_TICK_FILE_SUFFIXES: Final = (".parquet", ".csv", ".csv.gz")
_CHUNK_BYTES: Final = 1 << 20
_LOOP_GAP_NS: Final = 1_000_000_000
_TICK_COLUMNS: Final = TICK_SCHEMA.names


class ReplayError(AlphaEngineError):
    """A replay file that cannot be used: missing, of an unknown format, lacking columns, unreadable."""


# kw_only is restated so that type checkers accept the required ``files`` after the base's defaults.
class ReplaySettings(SourceSettings, frozen=True, kw_only=True):
    """Settings of the replay source."""

    files: Annotated[tuple[str, ...], msgspec.Meta(min_length=1)]
    """Files to replay, in order; glob patterns allowed (``data/*.gz``); relative to the working directory."""
    speed: Literal["max"] | Annotated[float, msgspec.Meta(gt=0.0)] = "max"
    """``"max"``: as fast as possible; a number: multiple of the recorded speed (1.0 = as recorded)."""
    batch_size: Annotated[int, msgspec.Meta(gt=0)] = 5_000
    """Most ticks per emitted batch."""
    loop: bool = False
    """Replay the files again and again, each pass shifted forward in time and trade ids."""


class _ChunkReader(Protocol):
    """Reads one file in bounded chunks; called from worker threads, one call at a time."""

    def read(self) -> pa.RecordBatch | None:
        """The next chunk of ticks (possibly empty), or None at the end of the file."""
        ...

    def close(self) -> None:
        """Release the file (idempotent; waits for a read in progress)."""
        ...


class _RecordingReader:
    """A raw Binance recording, ``<recv_ns> <json>`` per line, optionally gzip-compressed."""

    def __init__(self, path: Path, parser: BinanceTradeParser) -> None:
        self.path = path
        self.parser = parser
        self._lock = threading.Lock()
        # The reader owns the file across many read() calls in worker threads; close() releases it.
        self._file: gzip.GzipFile | io.BufferedReader
        if path.name.endswith(".gz"):
            self._file = gzip.GzipFile(path, "rb")
        else:
            self._file = path.open("rb")

    def read(self) -> pa.RecordBatch | None:
        with self._lock:
            if self._file.closed:
                return None
            try:
                lines = self._file.readlines(_CHUNK_BYTES)
            except (OSError, EOFError) as exc:  # a truncated or corrupt gzip stream
                raise ReplayError(f"{self.path}: cannot read: {exc}") from exc
        if not lines:
            return None
        messages: list[bytes] = []
        received: list[int] = []
        for line in lines:
            head, _, message = line.partition(b" ")
            try:
                recv = int(head)
            except ValueError:
                if line.strip():
                    self.parser.reject(MALFORMED_LINE, f"{self.path.name}: {line[:200]!r}")
                continue
            messages.append(message)
            received.append(recv)
        return self.parser.parse(messages, received).data

    def close(self) -> None:
        with self._lock:
            self._file.close()


class _TickFileReader:
    """A Parquet or CSV file with the tick columns, read in record batches and checked row by row."""

    def __init__(self, path: Path, parser: BinanceTradeParser, batch_size: int) -> None:
        self.path = path
        self.parser = parser
        self._lock = threading.Lock()
        self._closed = False
        try:
            if path.name.endswith(".parquet"):
                parquet = pq.ParquetFile(path)
                self._close_source = parquet.close
                names = parquet.schema_arrow.names
                # A generator: nothing is read (or found missing) before the column check below.
                self._batches: Iterator[pa.RecordBatch] = parquet.iter_batches(
                    batch_size=batch_size, columns=list(_TICK_COLUMNS)
                )
            else:
                types = {f.name: f.type for f in TICK_SCHEMA}
                csv = pacsv.open_csv(path, convert_options=pacsv.ConvertOptions(column_types=types))
                self._close_source = csv.close
                names = csv.schema.names
                self._batches = iter(csv)
        except (pa.ArrowException, OSError) as exc:
            raise ReplayError(f"{path}: cannot read: {exc}") from exc
        missing = [c for c in _TICK_COLUMNS if c not in names]
        if missing:
            self.close()
            raise ReplayError(
                f"{path}: missing tick column(s) {', '.join(missing)} "
                f"(a tick file needs {', '.join(_TICK_COLUMNS)})"
            )

    def read(self) -> pa.RecordBatch | None:
        with self._lock:
            if self._closed:
                return None
            try:
                raw = next(self._batches, None)
            except (pa.ArrowException, OSError) as exc:
                raise ReplayError(f"{self.path}: cannot read: {exc}") from exc
        if raw is None:
            return None
        return self._checked(raw)

    def _checked(self, raw: pa.RecordBatch) -> pa.RecordBatch:
        try:
            arrays = [raw.column(f.name).cast(f.type) for f in TICK_SCHEMA]
        except pa.ArrowException as exc:
            raise ReplayError(f"{self.path}: a column does not convert to the tick schema: {exc}") from exc
        price, qty, side = arrays[5], arrays[6], arrays[7]
        valid = pc.and_(
            pc.and_(pc.greater(price, 0.0), pc.greater(qty, 0.0)),
            pc.and_(pc.is_finite(price), pc.is_finite(qty)),
        )
        valid = pc.and_(valid, pc.is_in(side, pa.array([-1, 0, 1], type=pa.int8())))
        for array in arrays:
            valid = pc.and_(valid, pc.is_valid(array))
        valid = pc.fill_null(valid, False)
        bad = len(valid) - pc.sum(valid).as_py() if len(valid) else 0
        if bad:
            first = pc.index(valid, False).as_py()
            example = {f.name: a[first].as_py() for f, a in zip(TICK_SCHEMA, arrays, strict=True)}
            self.parser.reject(INVALID_ROW, f"{self.path.name}: {example}", bad)
            arrays = [a.filter(valid) for a in arrays]
        return pa.RecordBatch.from_arrays(arrays, schema=TICK_SCHEMA)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._close_source()


def resolve_files(patterns: Sequence[str], key: str = "files") -> list[Path]:
    """Expand the configured files and globs in order; raise ReplayError naming ``key`` on a problem."""
    paths: list[Path] = []
    for pattern in patterns:
        expanded = str(Path(pattern).expanduser())
        if any(c in expanded for c in "*?["):
            matches = sorted(glob.glob(expanded, recursive=True))
            if not matches:
                raise ReplayError(f"{key}: {pattern!r} matches no file")
            found = [Path(m) for m in matches if Path(m).is_file()]
        else:
            found = [Path(expanded)]
            if not found[0].is_file():
                raise ReplayError(f"{key}: no such file {pattern!r}")
        for path in found:
            if not path.name.endswith(_RECORDING_SUFFIXES + _TICK_FILE_SUFFIXES):
                raise ReplayError(
                    f"{key}: {str(path)!r} is of an unknown format (expected a recording "
                    f"{'/'.join(_RECORDING_SUFFIXES)} or a tick file {'/'.join(_TICK_FILE_SUFFIXES)})"
                )
        paths.extend(found)
    return paths


def open_reader(path: Path, parser: BinanceTradeParser, batch_size: int) -> _ChunkReader:
    """A chunk reader for one file, by its name (see the module docstring)."""
    if path.name.endswith(_TICK_FILE_SUFFIXES):
        return _TickFileReader(path, parser, batch_size)
    return _RecordingReader(path, parser)


@dataclass(slots=True)
class _LoopShift:
    """What a replay pass adds to times and trade ids so that every pass is new data."""

    min_ts: int = np.iinfo(np.int64).max
    max_ts: int = np.iinfo(np.int64).min
    ids: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Lowest and highest trade id per symbol seen in the first pass."""

    def observe(self, batch: TickBatch) -> None:
        """Record the span of a batch of the first pass."""
        if not len(batch):
            return
        ts = batch.np("ts_ns")
        self.min_ts = min(self.min_ts, int(ts.min()))
        self.max_ts = max(self.max_ts, int(ts.max()))
        for symbol, part in batch.split_by_symbol():
            ids = part.np("trade_id")
            low, high = self.ids.get(symbol, (int(ids.min()), int(ids.max())))
            self.ids[symbol] = (min(low, int(ids.min())), max(high, int(ids.max())))

    def apply(self, batch: TickBatch, n_pass: int) -> TickBatch:
        """The batch as it appears in pass ``n_pass`` (0 is the data itself)."""
        if n_pass == 0 or not len(batch):
            return batch
        time_shift = n_pass * (self.max_ts - self.min_ts + _LOOP_GAP_NS)
        encoded = pc.dictionary_encode(batch.data.column("symbol"))
        id_span = np.array(
            [self.ids[s][1] - self.ids[s][0] + 1 for s in encoded.dictionary.to_pylist()], dtype=np.int64
        )
        id_shift = n_pass * id_span[encoded.indices.to_numpy(zero_copy_only=False)]
        columns = dict(zip(TICK_SCHEMA.names, batch.data.columns, strict=True))
        columns["trade_id"] = pa.array(batch.np("trade_id") + id_shift)
        columns["ts_ns"] = pa.array(batch.np("ts_ns") + time_shift)
        columns["recv_ns"] = pa.array(batch.np("recv_ns") + time_shift)
        return TickBatch(pa.RecordBatch.from_arrays(list(columns.values()), schema=TICK_SCHEMA))


class _Pacer:
    """When each tick is due: clock start + (running max of ts_ns - first ts_ns) / speed."""

    def __init__(self, clock: Clock, speed: float) -> None:
        self.clock = clock
        self.speed = speed
        self._origin: tuple[int, int] | None = None
        self._high_ts = np.iinfo(np.int64).min

    def due_ns(self, ts_ns: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Clock times at which the ticks of a chunk are due (non-decreasing)."""
        if self._origin is None:
            self._origin = (int(ts_ns[0]), self.clock.now_ns())
        first_ts, start_ns = self._origin
        pace = np.maximum.accumulate(np.maximum(ts_ns, self._high_ts))
        self._high_ts = int(pace[-1])
        due: npt.NDArray[np.int64] = start_ns + ((pace - first_ts) / self.speed).astype(np.int64)
        return due


class ReplaySource(TickSource[ReplaySettings]):
    """Replays recorded files as ticks (see :mod:`alphaengine.sources.replay`)."""

    Config: ClassVar[type[ModuleSettings]] = ReplaySettings

    def __init__(self, name: str, config: ReplaySettings, ctx: Context) -> None:
        super().__init__(name, config, ctx)
        self.parser = BinanceTradeParser(name, clock=self.ctx.clock, log=self.log)
        self._paths: list[Path] = []

    async def on_start(self) -> None:
        """Resolve the files (so a bad path fails the start, not the replay), then start pumping."""
        self._paths = await asyncio.to_thread(resolve_files, self.config.files, f"modules.{self.name}.files")
        for path in self._paths:
            reader = await asyncio.to_thread(open_reader, path, self.parser, self.config.batch_size)
            await asyncio.to_thread(reader.close)
        await super().on_start()

    def health(self) -> dict[str, Any]:
        """Files, ticks emitted and the parser's counts."""
        stats = self.parser.stats
        return {
            "files": [str(p) for p in self._paths],
            "ticks_emitted": self.ticks_emitted,
            "ignored": stats.ignored,
            "rejected": stats.rejected_total,
        }

    async def batches(self) -> AsyncIterator[TickBatch]:
        """Every file's ticks in order, paced by ``speed``; ends after the last file unless ``loop``."""
        cfg = self.config
        pacer = None if cfg.speed == "max" else _Pacer(self.ctx.clock, cfg.speed)
        shift = _LoopShift()
        n_pass = 0
        while True:
            carry: list[pa.RecordBatch] = []
            async for chunk in self._chunks():
                batch = TickBatch(chunk)
                if cfg.loop and n_pass == 0:
                    shift.observe(batch)
                batch = shift.apply(batch, n_pass)
                if pacer is None:
                    carry.append(batch.data)
                    while sum(b.num_rows for b in carry) >= cfg.batch_size:
                        out, carry = _take(carry, cfg.batch_size)
                        yield TickBatch(out)
                else:
                    async for part in self._paced(batch, pacer):
                        yield part
                if self.stopping.is_set():
                    return
            if carry:
                yield TickBatch(pa.concat_batches(carry))
            n_pass += 1
            if not cfg.loop or self.stopping.is_set() or not shift.ids:
                return

    async def _paced(self, batch: TickBatch, pacer: _Pacer) -> AsyncIterator[TickBatch]:
        if not len(batch):
            return
        clock = self.ctx.clock
        due = pacer.due_ns(batch.np("ts_ns"))
        pos, n = 0, len(batch)
        while pos < n and not self.stopping.is_set():
            now = clock.now_ns()
            ready = int(np.searchsorted(due, now, side="right"))
            if ready <= pos:
                await self.sleep_until(int(due[pos]))
                continue
            end = min(ready, pos + self.config.batch_size)
            yield TickBatch(batch.data.slice(pos, end - pos))
            pos = end

    async def _chunks(self) -> AsyncIterator[pa.RecordBatch]:
        """Chunks of every file in order, the next one read in a worker thread while this one is used."""
        for path in self._paths:
            reader = await asyncio.to_thread(open_reader, path, self.parser, self.config.batch_size)
            ahead = asyncio.ensure_future(asyncio.to_thread(reader.read))
            try:
                while (chunk := await ahead) is not None:
                    ahead = asyncio.ensure_future(asyncio.to_thread(reader.read))
                    if chunk.num_rows:
                        yield chunk
                    if self.stopping.is_set():
                        return
            finally:
                # A read still running in its thread finishes there and its result is dropped; close()
                # waits for it before the file goes away.
                if not ahead.cancel() and not ahead.cancelled():
                    ahead.exception()
                await asyncio.to_thread(reader.close)


def _take(batches: list[pa.RecordBatch], n: int) -> tuple[pa.RecordBatch, list[pa.RecordBatch]]:
    """The first ``n`` rows of a list of batches, and the rest."""
    merged = pa.concat_batches(batches)
    rest = merged.slice(n)
    return merged.slice(0, n), [rest] if rest.num_rows else []
