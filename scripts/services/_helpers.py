"""Small helpers for scripts/services/*.sh (standard library only, except `kafka-ready`).

Commands:
  free-ports N                      N distinct free TCP ports on 127.0.0.1
  port-free PORT                    exit 0 if nothing accepts connections on 127.0.0.1:PORT
  clickhouse-config SRC_DIR ETC_DIR DATA_DIR LOG_DIR HOST TCP_PORT HTTP_PORT
                                    writes ETC_DIR/config.xml and users.xml from the system ones
  kafka-ready BOOTSTRAP PID TIMEOUT wait until the broker answers a metadata request (aiokafka)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(n: int) -> list[int]:
    """N free ports below the kernel's ephemeral range.

    Outside the ephemeral range, so an outgoing connection never takes the port between a service's
    stop and its restart on the same port.
    """
    lo_eph, hi_eph = _ephemeral_range()
    lo, hi = (20000, lo_eph) if lo_eph - 20000 >= 1000 else (hi_eph + 1, 65535)
    rng = random.Random()
    chosen: list[int] = []
    socks = []
    try:
        for _ in range(200 * n):
            if len(chosen) == n:
                break
            port = rng.randrange(lo, hi)
            if port in chosen:
                continue
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
            chosen.append(port)
    finally:
        for s in socks:
            s.close()
    if len(chosen) < n:
        raise SystemExit(f"free-ports: found only {len(chosen)} of {n} free ports in {lo}-{hi}")
    return chosen


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) != 0


def _set(root: ET.Element, tag: str, value: str) -> None:
    el = root.find(tag)
    if el is None:
        el = ET.SubElement(root, tag)
    el.text = value


def clickhouse_config(
    src: Path, *, etc: Path, data: Path, logdir: Path, host: str, tcp_port: int, http_port: int
) -> None:
    """Copy of the system config with every path in our directories and only loopback listeners.

    Only `host` is listened on (so `::1` never appears, whether IPv6 is on or off); the secure,
    interserver and MySQL ports are dropped so nothing else is bound.
    """
    tree = ET.parse(src / "config.xml")
    root = tree.getroot()
    for sub in ("tmp", "user_files", "format_schemas"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    logdir.mkdir(parents=True, exist_ok=True)
    etc.mkdir(parents=True, exist_ok=True)

    logger = root.find("logger")
    if logger is None:
        logger = ET.SubElement(root, "logger")
    _set(logger, "level", os.environ.get("CLICKHOUSE_LOG_LEVEL", "information"))
    _set(logger, "log", str(logdir / "clickhouse-server.log"))
    _set(logger, "errorlog", str(logdir / "clickhouse-server.err.log"))
    _set(logger, "size", "100M")
    _set(logger, "count", "2")

    _set(root, "path", f"{data}/")
    _set(root, "tmp_path", f"{data}/tmp/")
    _set(root, "user_files_path", f"{data}/user_files/")
    _set(root, "format_schema_path", f"{data}/format_schemas/")
    _set(root, "users_config", str(etc / "users.xml"))
    _set(root, "tcp_port", str(tcp_port))
    _set(root, "http_port", str(http_port))
    for tag in ("https_port", "tcp_port_secure", "interserver_http_port", "mysql_port", "postgresql_port"):
        for el in root.findall(tag):
            root.remove(el)
    for el in root.findall("listen_host"):
        root.remove(el)
    _set(root, "listen_host", host)
    # keep the server small on a 2-core machine: caches are allocated lazily, but cap them anyway
    _set(root, "mark_cache_size", str(256 * 1024 * 1024))
    _set(root, "uncompressed_cache_size", str(256 * 1024 * 1024))
    tree.write(etc / "config.xml", encoding="utf-8", xml_declaration=True)

    users = ET.parse(src / "users.xml")
    users.write(etc / "users.xml", encoding="utf-8", xml_declaration=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _kafka_ready(bootstrap: str, pid: int, wait_s: float) -> int:
    """0 once the broker answers metadata requests; 2 if its process exits; 1 after wait_s seconds."""
    from aiokafka.admin import AIOKafkaAdminClient  # noqa: PLC0415 - the only non-stdlib import

    deadline = time.monotonic() + wait_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if not _alive(pid):
            print(f"kafka-ready: broker process {pid} exited", file=sys.stderr)
            return 2
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
        try:
            await asyncio.wait_for(admin.start(), 5)
            await asyncio.wait_for(admin.list_topics(), 5)
            cluster = await asyncio.wait_for(admin.describe_cluster(), 5)
            if cluster.get("controller_id", -1) >= 0 or cluster.get("brokers"):
                return 0
        except Exception as exc:
            last = exc
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
        await asyncio.sleep(0.3)
    print(f"kafka-ready: no metadata answer from {bootstrap} in {wait_s}s: {last!r}", file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "free-ports":
        print(" ".join(map(str, free_ports(int(args[0])))))
        return 0
    if cmd == "port-free":
        return 0 if port_free(int(args[0])) else 1
    if cmd == "clickhouse-config":
        src, etc, data, logdir = (Path(a) for a in args[:4])
        clickhouse_config(
            src,
            etc=etc,
            data=data,
            logdir=logdir,
            host=args[4],
            tcp_port=int(args[5]),
            http_port=int(args[6]),
        )
        return 0
    if cmd == "kafka-ready":
        logging.basicConfig(level=logging.CRITICAL)
        return asyncio.run(_kafka_ready(args[0], int(args[1]), float(args[2])))
    print(f"unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
