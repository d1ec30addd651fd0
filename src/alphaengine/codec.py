"""Record encodings on the bus, versioned (see docs/encodings.md).

* ``ticks.v1`` / ``bars.v1``: one Arrow IPC stream per record holding one record batch of
  :data:`~alphaengine.domain.TICK_SCHEMA` / :data:`~alphaengine.domain.BAR_SCHEMA`; the schema carries
  ``alphaengine.schema`` and ``alphaengine.version`` metadata.
* events (``signal.v1``, ``order_intent.v1``, ``order.v1``, ``fill.v1``, ``position.v1``): one JSON
  object per record, tagged by ``type``.

Every record also carries a ``schema`` header (``b"ticks.v1"`` ...), so a consumer can route or reject
a record without parsing its value. Decoding failures raise :class:`~alphaengine.errors.DecodeError`
with the reason; consumers send such records to the dead-letter topic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, TypeVar

import msgspec
import pyarrow as pa

from alphaengine.domain import BAR_SCHEMA, TICK_SCHEMA, AnyEvent, BarBatch, Event, TickBatch
from alphaengine.errors import DecodeError

SCHEMA_HEADER: Final = "schema"
TICKS_V1: Final = b"ticks.v1"
BARS_V1: Final = b"bars.v1"

Headers = Sequence[tuple[str, bytes]]

_TICKS_META = {b"alphaengine.schema": b"ticks", b"alphaengine.version": b"1"}
_BARS_META = {b"alphaengine.schema": b"bars", b"alphaengine.version": b"1"}
_TICKS_SCHEMA_META = TICK_SCHEMA.with_metadata(_TICKS_META)
_BARS_SCHEMA_META = BAR_SCHEMA.with_metadata(_BARS_META)


def schema_of(headers: Headers) -> bytes | None:
    """The value of the ``schema`` header, if any."""
    for key, value in headers:
        if key == SCHEMA_HEADER:
            return value
    return None


def _encode_batch(batch: pa.RecordBatch, schema: pa.Schema) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch.replace_schema_metadata(schema.metadata))
    return bytes(sink.getvalue().to_pybytes())


def _decode_batch(value: bytes, expected: pa.Schema, meta: dict[bytes, bytes]) -> pa.RecordBatch:
    try:
        reader = pa.ipc.open_stream(value)
        table = reader.read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DecodeError(f"not an Arrow IPC stream: {exc}") from exc
    got = table.schema.metadata or {}
    for key, want in meta.items():
        if got.get(key) != want:
            raise DecodeError(f"schema metadata {key.decode()}={got.get(key)!r}, expected {want.decode()!r}")
    if not table.schema.equals(expected, check_metadata=False):
        raise DecodeError(f"columns {table.schema.names} do not match the expected {expected.names}")
    table = table.replace_schema_metadata(None)
    if table.num_rows == 0:
        return pa.RecordBatch.from_arrays([pa.array([], f.type) for f in expected], schema=expected)
    return table.combine_chunks().to_batches()[0]


def encode_ticks(batch: TickBatch) -> bytes:
    """Encode a tick batch as ``ticks.v1``."""
    return _encode_batch(batch.data, _TICKS_SCHEMA_META)


def decode_ticks(value: bytes) -> TickBatch:
    """Decode a ``ticks.v1`` record value; raises DecodeError with the reason."""
    return TickBatch(_decode_batch(value, TICK_SCHEMA, _TICKS_META))


def encode_bars(batch: BarBatch) -> bytes:
    """Encode a bar batch as ``bars.v1``."""
    return _encode_batch(batch.data, _BARS_SCHEMA_META)


def decode_bars(value: bytes) -> BarBatch:
    """Decode a ``bars.v1`` record value; raises DecodeError with the reason."""
    return BarBatch(_decode_batch(value, BAR_SCHEMA, _BARS_META))


_json_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(AnyEvent)

E = TypeVar("E", bound=Event)


def event_schema(event: Event) -> bytes:
    """The ``schema`` header value of an event record, e.g. ``b"fill.v1"``."""
    tag = type(event).__struct_config__.tag
    return f"{tag}.v1".encode()


def encode_event(event: Event) -> bytes:
    """Encode a signal, order intent, order, fill or position as a tagged JSON object."""
    return _json_encoder.encode(event)


def decode_event(value: bytes, expected: type[E]) -> E:
    """Decode an event record of the expected type; raises DecodeError with the reason."""
    try:
        event = _event_decoder.decode(value)
    except msgspec.DecodeError as exc:
        raise DecodeError(f"bad event record: {exc}") from exc
    if not isinstance(event, expected):
        raise DecodeError(f"expected a {expected.__name__} record, got {type(event).__name__}")
    return event
