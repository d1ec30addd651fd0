"""The exception tree of alphaengine.

Every error the engine raises on purpose derives from :class:`AlphaEngineError`. Each class says whether
retrying the same operation can succeed (``retriable``), so retry loops ask the error instead of
pattern-matching messages::

    AlphaEngineError
    ├── ConfigError            bad configuration (never retriable)
    ├── PluginError            a module could not be found or built
    ├── LifecycleError         an illegal module state transition
    ├── DecodeError            a record or frame that cannot be decoded (goes to a dead-letter topic)
    ├── BusError               the message bus (retriable unless stated otherwise)
    │   └── OffsetOutOfRangeError
    ├── StoreError             the table store (retriable unless stated otherwise)
    │   └── StoreLockedError   the embedded store directory is held by another process
    ├── ObjectStoreError       the object store
    │   └── ObjectNotFoundError
    ├── FeedError              a market-data feed (WebSocket or REST) failed; reconnecting may help
    │   ├── FeedAuthError      the provider refused the credentials (401/403): retrying cannot help
    │   └── RestError          a REST request failed after its retries
    └── ModelError             a model used before it was fitted, or an artifact that cannot be loaded
"""

from __future__ import annotations

from typing import ClassVar


class AlphaEngineError(Exception):
    """Root of every error alphaengine raises on purpose."""

    retriable: ClassVar[bool] = False


class ConfigError(AlphaEngineError):
    """A configuration file that cannot be used; carries every problem found, each naming its key path."""

    def __init__(self, problems: list[str], source: str = "<config>") -> None:
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} configuration error(s):\n{lines}")


class PluginError(AlphaEngineError):
    """A module type that cannot be found, imported or built."""


class LifecycleError(AlphaEngineError):
    """A module was asked for a state transition its state table does not allow."""


class DecodeError(AlphaEngineError):
    """A record or frame that cannot be decoded; the reason is the message."""


class BusError(AlphaEngineError):
    """The message bus failed; retrying may succeed."""

    retriable = True


class OffsetOutOfRangeError(BusError):
    """A consumer position that no longer (or not yet) exists in a partition."""

    retriable = False


class StoreError(AlphaEngineError):
    """The table store failed; retrying may succeed."""

    retriable = True


class StoreLockedError(StoreError):
    """The embedded store's directory is held by another process (one process per chDB directory)."""

    retriable = False


class ObjectStoreError(AlphaEngineError):
    """The object store failed; retrying may succeed."""

    retriable = True


class ObjectNotFoundError(ObjectStoreError):
    """No object under the requested key."""

    retriable = False


class FeedError(AlphaEngineError):
    """A market-data feed failed (connection lost, protocol violation); reconnecting may help."""

    retriable = True


class FeedAuthError(FeedError):
    """The provider refused the credentials (HTTP 401/403 at connect): retrying cannot succeed."""

    retriable = False


class RestError(FeedError):
    """A REST request to an exchange failed after its retries; ``status`` and ``code`` as answered."""

    retriable = True

    def __init__(self, message: str, *, status: int | None = None, code: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ModelError(AlphaEngineError):
    """A model used before it was fitted, or an artifact that cannot be loaded."""
