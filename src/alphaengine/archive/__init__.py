"""Archiving: old day partitions to verified Parquet files in the object store (docs/archive.md).

:class:`Archive` does the work (export, upload, verify, record, drop; and restore); :class:`Archiver` is
the module that runs it on a schedule; :mod:`alphaengine.archive.checksum` is the content checksum that
proves an archive holds exactly the rows of the store.
"""

from alphaengine.archive.checksum import ALGORITHM, ContentChecksum
from alphaengine.archive.core import (
    ARCHIVED_TABLES,
    SCRATCH_DIR,
    Archive,
    ArchiveError,
    DayReport,
    ManifestEntry,
    PendingPartition,
    object_key,
    today_utc,
)
from alphaengine.archive.module import Archiver, ArchiverSettings, configured_settings

__all__ = [
    "ALGORITHM",
    "ARCHIVED_TABLES",
    "SCRATCH_DIR",
    "Archive",
    "ArchiveError",
    "Archiver",
    "ArchiverSettings",
    "ContentChecksum",
    "DayReport",
    "ManifestEntry",
    "PendingPartition",
    "configured_settings",
    "object_key",
    "today_utc",
]
