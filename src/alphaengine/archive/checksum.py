"""A checksum of a table's content that does not depend on how the rows are encoded or chunked.

The archiver computes it twice for every archived day: over the rows as the store returned them, and over
the rows decoded from the Parquet file read back from the object store. Equal checksums prove that the file
holds exactly the rows of the store, value for value and in the same order, whatever Parquet did to them on
the way (compression, dictionary or delta encodings, page and row-group sizes, the millisecond timestamps
Parquet stores for a column of seconds).

How: the rows are first cast to one canonical Arrow schema (the table's own). Each column is then fed, as
it arrives chunk after chunk, into its own SHA-256 streams: fixed-width values as their little-endian bytes;
strings as two streams, their lengths (int64) and their concatenated UTF-8 bytes. Each stream is a plain
concatenation over the rows, so how the rows were split into chunks or row groups cannot change it, and
lengths plus bytes decode to exactly one sequence of strings, so two different columns cannot give the same
streams. The digest is SHA-256 over a version tag, the row count, and each column's name, type and stream
digests. A collision would need a SHA-256 collision.

Alternatives that were rejected: a hash of the sorted key columns only proves the keys, not the prices and
quantities; a sum of per-row hashes computed in SQL (``sum(cityHash64(...))``) needs the same 64-bit hash
in ClickHouse and in Python (the in-memory store and pyarrow have none), and an order-independent sum of
64-bit values is a much weaker fingerprint than a cryptographic hash. The order dependence is deliberate:
archives are written sorted by the table key, and readers may rely on it.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ALGORITHM = "columns-sha256-v1"
"""Names the canonical form above; stored with every archive so that a future form can coexist."""


def _bytes_of(stream: str) -> bytes:
    data = stream.encode()
    return struct.pack("<Q", len(data)) + data


class ContentChecksum:
    """Accumulates :data:`ALGORITHM` over rows given in one or more chunks of the same schema.

    ``schema`` is the canonical schema: every chunk is cast to it (an exact, lossless cast, or an error)
    before it is hashed, so rows of ``timestamp[ms]`` read from Parquet hash like the ``timestamp[s]`` rows
    the store returned. Its columns must be fixed-width (integers, floats, timestamps) or strings.
    """

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.rows = 0
        self._streams: list[list[hashlib._Hash]] = []
        for f in schema:
            if pa.types.is_string(f.type):
                self._streams.append([hashlib.sha256(), hashlib.sha256()])
            elif pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_timestamp(f.type):
                self._streams.append([hashlib.sha256()])
            else:
                raise TypeError(f"column {f.name!r}: no canonical form for {f.type}")

    def update(self, rows: pa.Table) -> None:
        """Add the next rows (any chunking; columns by name, extra columns are an error)."""
        canonical = rows.select(self.schema.names).cast(self.schema)
        for f, column, streams in zip(self.schema, canonical.columns, self._streams, strict=True):
            array = column.combine_chunks()
            if pa.types.is_string(f.type):
                lengths = pc.binary_length(array).cast(pa.int64()).to_numpy(zero_copy_only=False)
                streams[0].update(np.ascontiguousarray(lengths, dtype="<i8").data)
                streams[1].update(_string_bytes(array))
            else:
                if pa.types.is_timestamp(f.type):
                    array = array.cast(pa.int64())
                values = array.to_numpy(zero_copy_only=False)
                streams[0].update(np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).data)
        self.rows += canonical.num_rows

    def hexdigest(self) -> str:
        """The checksum of every row added so far, as 64 hex digits."""
        final = hashlib.sha256(_bytes_of(ALGORITHM) + struct.pack("<Q", self.rows))
        for f, streams in zip(self.schema, self._streams, strict=True):
            final.update(_bytes_of(f.name) + _bytes_of(str(f.type)))
            for stream in streams:
                final.update(stream.digest())
        return final.hexdigest()


def _string_bytes(array: pa.Array) -> memoryview:
    """The UTF-8 bytes of every value of a ``string`` array, concatenated (no copy)."""
    if len(array) == 0:
        return memoryview(b"")
    _, offsets_buffer, data_buffer = array.buffers()
    # A sliced array starts at array.offset within shared buffers: take only its own values' bytes.
    offsets = np.frombuffer(offsets_buffer, dtype="<i4")[array.offset : array.offset + len(array) + 1]
    if data_buffer is None:  # every value is empty
        return memoryview(b"")
    return memoryview(data_buffer)[int(offsets[0]) : int(offsets[-1])]


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
