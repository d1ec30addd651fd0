"""The ``alphaengine`` command line."""

from __future__ import annotations

import asyncio
import csv
import logging
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import click
import orjson
import uvloop

from alphaengine import __version__
from alphaengine.config import LoadedConfig, load
from alphaengine.errors import AlphaEngineError, ConfigError

T = TypeVar("T")

EXIT_CONFIG = 2
"""Exit status for configuration errors (``config check``, ``run`` with a bad file)."""


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _load_or_exit(path: str) -> LoadedConfig:
    try:
        return load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"{exc.source}: {problem}", err=True)
        sys.exit(EXIT_CONFIG)


@click.group()
@click.version_option(__version__, prog_name="alphaengine")
def main() -> None:
    """alphaengine: a fault-tolerant, real-time crypto trading engine."""


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="TOML file.")
@click.option("--duration", type=float, default=None, help="Stop gracefully after this many seconds.")
@click.option("--until-sources-finish", is_flag=True, help="Stop once every source has run out of data.")
def run(config_path: str, duration: float | None, until_sources_finish: bool) -> None:
    """Run the engine until SIGTERM/SIGINT (or --duration); prints a one-line summary."""
    from alphaengine.kernel.engine import Engine  # noqa: PLC0415  (keeps `config check` light)

    config = _load_or_exit(config_path)
    _setup_logging(config.app.engine.log_level)
    try:
        summary = _run_async(Engine(config).run(duration, until_sources_finish=until_sources_finish))
    except AlphaEngineError as exc:
        click.echo(f"alphaengine: {exc}", err=True)
        sys.exit(1)
    click.echo(summary.line())
    sys.exit(0 if summary.clean else 1)


@main.group()
def config() -> None:
    """Configuration files."""


@config.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
def config_check(path: str) -> None:
    """Validate a configuration file: exit 0, or exit 2 listing every error by key path."""
    loaded = _load_or_exit(path)
    names = ", ".join(f"{m.name} ({m.type})" for m in loaded.modules) or "none"
    click.echo(f"{path}: ok; modules: {names}")


@main.group()
def db() -> None:
    """The configured store."""


@db.command("query")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.argument("sql")
def db_query(config_path: str, sql: str) -> None:
    """Run SQL on the configured store and print CSV with a header.

    While an engine runs on the same configuration, the query goes through its admin socket (an
    embedded store can be opened by one process only); otherwise the store is opened directly.
    """
    from alphaengine.kernel import admin  # noqa: PLC0415
    from alphaengine.kernel.engine import resolve_path  # noqa: PLC0415

    loaded = _load_or_exit(config_path)
    socket_path = resolve_path(loaded.app.admin.socket)
    try:
        if admin.is_engine_listening(socket_path):
            result = _run_async(admin.request(socket_path, "query", {"sql": sql}, loaded.app.admin.token))
            columns, rows = result["columns"], result["rows"]
        else:
            columns, rows = _run_async(_query_directly(loaded, sql))
    except AlphaEngineError as exc:
        click.echo(f"alphaengine: {exc}", err=True)
        sys.exit(1)
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)


async def _query_directly(loaded: LoadedConfig, sql: str) -> tuple[list[str], list[list[Any]]]:
    from alphaengine.kernel.engine import resolve_config_paths  # noqa: PLC0415
    from alphaengine.store import build_store  # noqa: PLC0415

    store = build_store(resolve_config_paths(loaded).app.store)
    await store.start()
    try:
        table = await store.query(sql)
    finally:
        await store.close()
    return table.column_names, [list(row.values()) for row in table.to_pylist()]


@main.command("admin")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON answer.")
@click.argument("command", type=click.Choice(["status", "health", "stop"]))
def admin_command(config_path: str, as_json: bool, command: str) -> None:
    """Talk to a running engine's admin socket. ``health`` exits 1 when the engine is unhealthy."""
    from alphaengine.kernel import admin  # noqa: PLC0415
    from alphaengine.kernel.engine import resolve_path  # noqa: PLC0415

    loaded = _load_or_exit(config_path)
    socket_path = resolve_path(loaded.app.admin.socket)
    try:
        result = _run_async(admin.request(socket_path, command, {}, loaded.app.admin.token))
    except AlphaEngineError as exc:
        click.echo(f"alphaengine: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(_render(command, result))
    if command == "health" and not result.get("healthy"):
        sys.exit(1)


def _render(command: str, result: dict[str, Any]) -> str:
    lines: list[str] = []
    if command == "status":
        lines.append(
            f"engine {result['engine']} pid {result['pid']} up {result['uptime_s']:.0f} s: "
            f"ticks received {result['ticks_received']}, stored {result['ticks_stored']}, "
            f"bars {result['bars']}"
        )
    elif command == "health":
        lines.append("healthy" if result["healthy"] else "UNHEALTHY")
    else:
        return orjson.dumps(result).decode()
    for m in result["modules"]:
        extra = f"  {m['detail']}" if m.get("detail") else ""
        restarts = f"  restarts {m['restarts']}" if m.get("restarts") else ""
        lines.append(f"  {m['module']:<16} {m['state']:<10}{restarts}{extra}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    main()
