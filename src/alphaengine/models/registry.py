"""The model registry: versioned model artifacts in the object store, and a champion per model.

Layout under ``<prefix>/`` (``models`` by default) of the object store::

    <model>/versions/<version>/model.json       the model's description (alphaengine.models.zoo)
    <model>/versions/<version>/<artifact>       its artifact (pickle, LightGBM text, .keras)
    <model>/versions/<version>/version.json     what the registry knows of it (written last)
    <model>/state.json                          champion, challenger, earlier champions, history

A version exists once its ``version.json`` does: the artifact files go up first, each with its SHA-256
recorded in ``version.json``, so a process killed halfway leaves files that no reader takes for a version
(and :meth:`ModelRegistry.prune` removes). ``state.json`` is replaced whole (a put is atomic for readers).

Per model there is at most one **champion** (the version the engine trades on), the latest **challenger**
(the newest version the trainer registered and did not promote, which an operator may promote by hand),
and a stack of earlier champions that :meth:`~ModelRegistry.rollback` returns to. Every change of champion
is appended to the history with who made it and why.

The registry assumes one writer at a time (the trainer of one engine, or ``alphaengine train`` when no
engine runs): its own changes are serialized by a lock, but two processes changing one model's state
at once could lose one of the two changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

from alphaengine.clock import Clock
from alphaengine.errors import ModelError, ObjectNotFoundError
from alphaengine.models.zoo import MODEL_NAMES
from alphaengine.objectstore.base import ObjectStore

log = logging.getLogger("alphaengine.registry")

VERSION_FILE: Final = "version.json"
STATE_FILE: Final = "state.json"
HISTORY_LIMIT: Final = 200
"""Entries of a model's history kept in its state (the oldest are dropped)."""


class RegistryError(ModelError):
    """A registry operation that cannot be done as asked (unknown version, nothing to roll back to...)."""


class FileDigest(msgspec.Struct, frozen=True, kw_only=True):
    """Size and SHA-256 of one artifact file."""

    size: int
    sha256: str


class DataWindow(msgspec.Struct, frozen=True, kw_only=True):
    """The data a version was trained on: grid rows of 1 ``interval_s`` bars, first and last row time."""

    start_ns: int
    end_ns: int
    """Time of the last bar whose features the training read (targets reach ``horizon`` bars beyond)."""
    rows: int
    symbols: list[str]
    interval_s: int
    source: str
    """Where the bars came from: ``store`` or a file path."""


class VersionInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One registered version of a model (``version.json``)."""

    model: str
    version: str
    created_ns: int
    """When it was registered (engine clock)."""
    expires_ns: int | None
    """After this time its predictions are stale and must not be traded (None: never)."""
    data: DataWindow
    feature_set: str
    """The feature set's version: live features must have the same one."""
    feature_params: dict[str, Any]
    features: list[str]
    target: str
    horizon_bars: int
    params: dict[str, Any]
    code_version: str
    validation: dict[str, Any]
    """Out-of-sample scores of the walk-forward (candidate, baselines, folds, champion comparison)."""
    decision: list[str]
    """The promotion checks at registration, each ``pass: ...`` or ``fail: ...``."""
    files: dict[str, FileDigest]

    def expired(self, now_ns: int) -> bool:
        """Whether the version is past its age limit at ``now_ns``."""
        return self.expires_ns is not None and now_ns >= self.expires_ns


_Action = Literal["promote", "demote", "rollback"]


class Change(msgspec.Struct, frozen=True, kw_only=True):
    """One change of a model's champion."""

    at_ns: int
    action: _Action
    champion: str | None
    """The champion after the change."""
    previous: str | None
    """The champion before it."""
    by: str
    """``trainer`` or ``operator``."""
    reason: str


class ModelState(msgspec.Struct, frozen=True, kw_only=True):
    """Champion, challenger, earlier champions (most recent last) and history of one model."""

    champion: str | None = None
    challenger: str | None = None
    earlier: list[str] = msgspec.field(default_factory=list)
    history: list[Change] = msgspec.field(default_factory=list)


def new_version_id(created_ns: int, digest: str) -> str:
    """``YYYYMMDDTHHMMSSZ-<8 hex>``: sortable by registration time, unique by content."""
    stamp = datetime.fromtimestamp(created_ns / 1e9, tz=UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{digest[:8]}"


def _file_digest(path: Path) -> FileDigest:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return FileDigest(size=path.stat().st_size, sha256=sha.hexdigest())


class ModelRegistry:
    """Versions, champions and artifacts of the models, kept in an :class:`ObjectStore`.

    ``cache_dir`` is where :meth:`fetch` keeps downloaded artifacts (verified against their SHA-256).
    """

    def __init__(self, objects: ObjectStore, clock: Clock, cache_dir: Path, prefix: str = "models") -> None:
        self.objects = objects
        self.clock = clock
        self.cache_dir = cache_dir
        self.prefix = prefix.strip("/")
        self._lock = asyncio.Lock()

    # -- keys -------------------------------------------------------------------------------------

    def _model_key(self, model: str) -> str:
        if model not in MODEL_NAMES:
            raise RegistryError(f"unknown model {model!r}: expected one of {', '.join(MODEL_NAMES)}")
        return f"{self.prefix}/{model}"

    def _version_key(self, model: str, version: str) -> str:
        return f"{self._model_key(model)}/versions/{version}"

    # -- versions ---------------------------------------------------------------------------------

    async def register(
        self, artifact_dir: Path, info: dict[str, Any], *, max_age_s: float | None
    ) -> VersionInfo:
        """Upload a saved model (``artifact_dir``, as :meth:`Model.save` wrote it) as a new version.

        ``info`` holds every :class:`VersionInfo` field but ``version``, ``created_ns``, ``expires_ns`` and
        ``files``, which the registry sets. The new version is made the model's challenger.
        """
        files = await asyncio.to_thread(lambda: sorted(p for p in artifact_dir.iterdir() if p.is_file()))
        if not files:
            raise RegistryError(f"{artifact_dir}: no artifact files to register")
        digests = await asyncio.to_thread(lambda: {p.name: _file_digest(p) for p in files})
        content = hashlib.sha256(
            "".join(f"{name}:{d.sha256};" for name, d in sorted(digests.items())).encode()
        ).hexdigest()
        created = self.clock.now_ns()
        version = new_version_id(created, content)
        expires = None if max_age_s is None else created + int(max_age_s * 1e9)
        try:
            record = msgspec.convert(
                {**info, "version": version, "created_ns": created, "expires_ns": expires, "files": digests},
                VersionInfo,
            )
        except msgspec.ValidationError as exc:
            raise RegistryError(f"incomplete version description: {exc}") from None
        base = self._version_key(record.model, version)
        for path in files:
            await self.objects.put_file(f"{base}/{path.name}", path)
        await self.objects.put(f"{base}/{VERSION_FILE}", msgspec.json.encode(record))
        async with self._lock:
            state = await self.state(record.model)
            await self._save_state(record.model, msgspec.structs.replace(state, challenger=version))
        log.info("registered %s %s", record.model, version)
        return record

    async def version(self, model: str, version: str) -> VersionInfo:
        """The description of one version; raises RegistryError if there is no such version."""
        try:
            raw = await self.objects.get(f"{self._version_key(model, version)}/{VERSION_FILE}")
        except ObjectNotFoundError:
            raise RegistryError(f"model {model!r} has no version {version!r}") from None
        return msgspec.json.decode(raw, type=VersionInfo)

    async def versions(self, model: str) -> list[str]:
        """Every complete version of ``model``, oldest first."""
        prefix = f"{self._model_key(model)}/versions/"
        found = [
            info.key[len(prefix) :].partition("/")[0]
            for info in await self.objects.list(prefix)
            if info.key.endswith(f"/{VERSION_FILE}")
        ]
        return sorted(found)

    async def fetch(self, model: str, version: str) -> Path:
        """A local directory holding the version's files (downloaded once, checked against SHA-256)."""
        info = await self.version(model, version)
        target = self.cache_dir / model / version
        if await asyncio.to_thread(_matches, target, info.files):
            return target
        partial = target.with_name(f".{version}.partial")
        await asyncio.to_thread(shutil.rmtree, partial, True)
        await asyncio.to_thread(partial.mkdir, parents=True)
        base = self._version_key(model, version)
        for name in info.files:
            await self.objects.get_file(f"{base}/{name}", partial / name)
        if not await asyncio.to_thread(_matches, partial, info.files):
            raise RegistryError(f"{model} {version}: downloaded files do not match their SHA-256")
        await asyncio.to_thread(shutil.rmtree, target, True)
        await asyncio.to_thread(partial.rename, target)
        return target

    async def prune(self, model: str, keep: int) -> list[str]:
        """Delete versions beyond the ``keep`` newest, sparing the champion, challenger and earlier ones.

        Their downloaded copies in the cache go too. Also removes files of versions whose
        ``version.json`` was never written (an interrupted registration) once they are not among the
        newest. Returns the deleted versions.
        """
        async with self._lock:
            state = await self.state(model)
            prefix = f"{self._model_key(model)}/versions/"
            objects = await self.objects.list(prefix)
            every = sorted({o.key[len(prefix) :].partition("/")[0] for o in objects})
            spared = {state.champion, state.challenger, *state.earlier, *every[-keep:]} if keep else set()
            doomed = [v for v in every if v not in spared]
            for o in objects:
                if o.key[len(prefix) :].partition("/")[0] in doomed:
                    await self.objects.delete(o.key)
            for version in doomed:
                await asyncio.to_thread(shutil.rmtree, self.cache_dir / model / version, True)
        if doomed:
            log.info("pruned %d version(s) of %s", len(doomed), model)
        return doomed

    # -- state ------------------------------------------------------------------------------------

    async def state(self, model: str) -> ModelState:
        """The model's champion, challenger and history (empty for a model never registered)."""
        try:
            raw = await self.objects.get(f"{self._model_key(model)}/{STATE_FILE}")
        except ObjectNotFoundError:
            return ModelState()
        return msgspec.json.decode(raw, type=ModelState)

    async def _save_state(self, model: str, state: ModelState) -> None:
        trimmed = msgspec.structs.replace(state, history=state.history[-HISTORY_LIMIT:])
        await self.objects.put(f"{self._model_key(model)}/{STATE_FILE}", msgspec.json.encode(trimmed))

    async def promote(self, model: str, version: str | None, *, by: str, reason: str) -> ModelState:
        """Make ``version`` (default: the challenger) the champion; the old one joins the earlier ones."""
        async with self._lock:
            state = await self.state(model)
            target = version or state.challenger
            if target is None:
                raise RegistryError(f"model {model!r} has no challenger to promote")
            await self.version(model, target)  # must exist
            if target == state.champion:
                raise RegistryError(f"{model} {target} is already the champion")
            earlier = [v for v in state.earlier if v != target]
            if state.champion is not None:
                earlier.append(state.champion)
            new = msgspec.structs.replace(
                state,
                champion=target,
                challenger=None if state.challenger == target else state.challenger,
                earlier=earlier,
                history=[*state.history, self._change("promote", target, state.champion, by, reason)],
            )
            await self._save_state(model, new)
        log.info("%s: %s promoted (was %s) by %s: %s", model, target, state.champion, by, reason)
        return new

    async def demote(self, model: str, *, by: str, reason: str) -> ModelState:
        """Stop trading on the champion: no champion until the next promotion (or a rollback)."""
        async with self._lock:
            state = await self.state(model)
            if state.champion is None:
                raise RegistryError(f"model {model!r} has no champion to demote")
            new = msgspec.structs.replace(
                state,
                champion=None,
                earlier=[*state.earlier, state.champion],
                history=[*state.history, self._change("demote", None, state.champion, by, reason)],
            )
            await self._save_state(model, new)
        log.warning("%s: champion %s demoted by %s: %s", model, state.champion, by, reason)
        return new

    async def rollback(self, model: str, *, by: str, reason: str) -> ModelState:
        """Return to the most recent earlier champion; the current champion (if any) is set aside."""
        async with self._lock:
            state = await self.state(model)
            if not state.earlier:
                raise RegistryError(f"model {model!r} has no earlier champion to roll back to")
            *rest, target = state.earlier
            new = msgspec.structs.replace(
                state,
                champion=target,
                earlier=rest,
                history=[*state.history, self._change("rollback", target, state.champion, by, reason)],
            )
            await self._save_state(model, new)
        log.warning("%s: rolled back from %s to %s by %s: %s", model, state.champion, target, by, reason)
        return new

    def _change(
        self,
        action: _Action,
        new: str | None,
        old: str | None,
        by: str,
        why: str,
    ) -> Change:
        return Change(at_ns=self.clock.now_ns(), action=action, champion=new, previous=old, by=by, reason=why)

    async def champion(self, model: str) -> VersionInfo | None:
        """The champion's description, or None."""
        state = await self.state(model)
        return None if state.champion is None else await self.version(model, state.champion)


def _matches(directory: Path, files: dict[str, FileDigest]) -> bool:
    if not directory.is_dir():
        return False
    for name, digest in files.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != digest.size or _file_digest(path) != digest:
            return False
    return True
