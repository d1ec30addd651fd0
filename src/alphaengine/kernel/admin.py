"""The admin socket: a Unix socket (mode 0600) speaking JSON lines.

A request is one JSON object per line, ``{"cmd": "status", "args": {...}, "token": "..."}``; the answer is
one line, ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``. Only the socket's owner
can connect (file mode 0600, and the peer's user id is checked as well), and when a token is configured
every request must carry it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from alphaengine.errors import AlphaEngineError

log = logging.getLogger("alphaengine.admin")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
MAX_LINE_BYTES = 1 << 20


class AdminError(AlphaEngineError):
    """The admin socket could not be served or reached, or refused a request."""


class AdminServer:
    """Serves admin commands on a Unix socket until closed."""

    def __init__(
        self,
        path: Path,
        handlers: Mapping[str, Handler],
        token: str | None = None,
        extra: Callable[[], Mapping[str, Handler]] | None = None,
    ) -> None:
        self.path = path
        self.handlers = dict(handlers)
        self.extra = extra
        """Commands looked up at each request (those of the running modules)."""
        self.token = token or None
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Bind the socket (refusing to steal one a live engine is serving) with mode 0600."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            if _is_served(self.path):
                raise AdminError(f"admin socket {self.path} is in use: is another engine running?")
            self.path.unlink()
        # The umask makes the socket 0600 from the moment it exists, not only after a chmod.
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_LINE_BYTES
            )
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        """Stop serving and remove the socket file (idempotent)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid = _peer_uid(writer)
        if uid not in (os.geteuid(), 0):
            # The file mode keeps other users out; this holds even if the mode or directory is loosened.
            log.warning("admin connection refused: peer uid %s is not the engine's user", uid)
            writer.write(
                orjson.dumps({"ok": False, "error": f"unauthorized: uid {uid} is not the engine's user"})
            )
            writer.write(b"\n")
            writer.close()
            return
        try:
            while line := await reader.readline():
                answer = await self._answer(line)
                writer.write(orjson.dumps(answer, default=str) + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError) as exc:
            log.warning("admin client dropped: %r", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            return {"ok": False, "error": f"not a JSON line: {exc}"}
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": 'expected {"cmd": "<command>", "args": {...}}'}
        if self.token is not None and not hmac.compare_digest(
            str(request.get("token", "")).encode(), self.token.encode()
        ):
            log.warning("admin request refused: bad or missing token")
            return {"ok": False, "error": "unauthorized: a valid token is required"}
        handlers = {**(self.extra() if self.extra is not None else {}), **self.handlers}
        handler = handlers.get(request["cmd"])
        if handler is None:
            known = ", ".join(sorted(handlers))
            return {"ok": False, "error": f"unknown command {request['cmd']!r} (commands: {known})"}
        args = request.get("args") or {}
        try:
            return {"ok": True, "result": await handler(args)}
        except AlphaEngineError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("admin command %s failed", request["cmd"])
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def _peer_uid(writer: asyncio.StreamWriter) -> int:
    """The user id of the process at the other end of a Unix socket (``SO_PEERCRED``, Linux)."""
    sock = writer.get_extra_info("socket")
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _is_served(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


async def request(
    path: Path,
    cmd: str,
    args: Mapping[str, Any] | None = None,
    token: str | None = None,
    timeout_s: float = 30.0,
) -> Any:
    """Send one command to an engine's admin socket and return its result; raises AdminError."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path), limit=MAX_LINE_BYTES), timeout_s
        )
    except (OSError, TimeoutError) as exc:
        raise AdminError(f"cannot reach the engine's admin socket {path}: {exc}") from exc
    try:
        message: dict[str, Any] = {"cmd": cmd, "args": dict(args or {})}
        if token:
            message["token"] = token
        writer.write(orjson.dumps(message) + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout_s)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    if not line:
        raise AdminError(f"the engine closed the admin connection on {path} without answering")
    answer = orjson.loads(line)
    if not answer.get("ok"):
        raise AdminError(str(answer.get("error", "unknown error")))
    return answer.get("result")


def is_engine_listening(path: Path) -> bool:
    """Whether a live engine serves this admin socket."""
    return path.exists() and _is_served(path)
