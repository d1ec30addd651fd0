"""The ``alphaengine`` command line."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import msgspec
import orjson
import uvloop

from alphaengine import __version__
from alphaengine.config import LoadedConfig, load
from alphaengine.errors import AlphaEngineError, ConfigError

if TYPE_CHECKING:
    from alphaengine.archive import Archive, DayReport, ManifestEntry, PendingPartition
    from alphaengine.models.trainer import CycleReport

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


@main.group()
def archive() -> None:
    """Parquet archives of old day partitions in the object store (docs/archive.md).

    While an engine runs on the same configuration, these commands go through its admin socket (it holds
    the store); otherwise they open the store and the object store themselves.
    """


_ARCHIVED_TABLE = click.Choice(["ticks", "bars"])
_DATE = click.DateTime(formats=["%Y-%m-%d"])


@archive.command("run")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--table",
    type=_ARCHIVED_TABLE,
    default=None,
    help="Only this table (default: the archiver's tables, both unless configured).",
)
@click.option(
    "--before",
    type=_DATE,
    default=None,
    help="Archive the days strictly before this date, YYYY-MM-DD (default: today (UTC) minus the "
    "archiver's archive_after_days for ticks and bars_after_days for bars).",
)
def archive_run(config_path: str, table: str | None, before: datetime | None) -> None:
    """Archive every day older than the cutoff now: export, upload, verify, record, drop.

    Stops at the first day that fails (nothing of it is dropped); a rerun carries on from there.
    """
    from alphaengine.archive import configured_settings, today_utc  # noqa: PLC0415
    from alphaengine.clock import LiveClock  # noqa: PLC0415

    loaded = _load_or_exit(config_path)
    cutoffs = configured_settings(loaded).cutoffs(
        today_utc(LiveClock()),
        tables=(table,) if table else None,
        before=before.date() if before else None,
    )
    try:
        _run_async(_archive_run(loaded, cutoffs))
    except AlphaEngineError as exc:
        click.echo(f"alphaengine: {exc}", err=True)
        sys.exit(1)


async def _archive_run(loaded: LoadedConfig, cutoffs: dict[str, date]) -> None:
    async with _open_archive(loaded) as archive:
        plan = await archive.pending(cutoffs)
        if not plan:
            limits = ", ".join(f"{table} before {day}" for table, day in cutoffs.items())
            click.echo(f"nothing to archive ({limits})")
            return
        reports: list[DayReport] = []
        started = time.monotonic()
        try:
            with click.progressbar(
                plan,
                label=f"archiving {len(plan)} partition(s)",
                file=sys.stderr,
                item_show_func=lambda p: f"{p.table} {p.day}" if p else None,
            ) as bar:
                for partition in bar:
                    report = await archive.archive_day(partition.table, partition.day)
                    if report is not None:
                        reports.append(report)
        finally:
            # Also after a failure: what was archived before it stays archived, and is worth saying.
            rows = sum(r.rows for r in reports)
            size = sum(r.bytes for r in reports)
            click.echo(
                f"archived {len(reports)} partition(s): {rows} rows, {size} bytes "
                f"in {time.monotonic() - started:.1f} s"
            )
            for r in reports:
                merged = "  (merged with an earlier archive)" if r.merged else ""
                click.echo(
                    f"  {r.table:<6} {r.day}  {r.rows:>10} rows  {r.bytes:>12} bytes  {r.seconds:6.2f} s  "
                    f"{r.object_key}{merged}"
                )


@archive.command("list")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
def archive_list(config_path: str) -> None:
    """The archive manifest: every archived day with its rows, size and object key."""
    loaded = _load_or_exit(config_path)
    try:
        entries = _run_async(_archive_manifest(loaded))
    except AlphaEngineError as exc:
        click.echo(f"alphaengine: {exc}", err=True)
        sys.exit(1)
    if not entries:
        click.echo("no archives")
        return
    click.echo(f"{'table':<6} {'date':<10} {'rows':>10} {'bytes':>12}  key")
    for e in entries:
        click.echo(f"{e.table:<6} {e.day} {e.rows:>10} {e.bytes:>12}  {e.object_key}")


async def _archive_manifest(loaded: LoadedConfig) -> list[ManifestEntry]:
    async with _open_archive(loaded) as archive:
        return await archive.manifest()


@archive.command("restore")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--table", type=_ARCHIVED_TABLE, default="ticks", show_default=True)
@click.argument("day", metavar="DATE", type=_DATE)
def archive_restore(config_path: str, table: str, day: datetime) -> None:
    """Insert an archived day (YYYY-MM-DD) back into the store, after checking the file's SHA-256.

    Idempotent: rows already in the store stay once. The day is then older than the cutoff again, so the
    archiver's next run archives it again (the same rows to the same object) and drops it.
    """
    loaded = _load_or_exit(config_path)
    try:
        entry, rows = _run_async(_archive_restore(loaded, table, day.date()))
    except AlphaEngineError as exc:
        click.echo(f"alphaengine: {exc}", err=True)
        sys.exit(1)
    click.echo(f"restored {rows} rows of {table} {entry.day} from {entry.object_key}")


async def _archive_restore(loaded: LoadedConfig, table: str, day: date) -> tuple[ManifestEntry, int]:
    async with _open_archive(loaded) as archive:
        return await archive.restore(table, day)


_ARCHIVE_DAY_TIMEOUT_S = 3600.0
"""How long the CLI waits for the engine to archive or restore one day (a big day takes minutes)."""


class _EngineArchive:
    """The operations of :class:`~alphaengine.archive.Archive` the CLI uses, sent to a running engine."""

    def __init__(self, socket_path: Path, token: str | None) -> None:
        self.socket_path = socket_path
        self.token = token

    async def _request(self, cmd: str, args: dict[str, Any], timeout_s: float = 30.0) -> Any:
        from alphaengine.kernel import admin  # noqa: PLC0415

        return await admin.request(self.socket_path, cmd, args, self.token, timeout_s)

    async def pending(self, cutoffs: dict[str, date]) -> list[PendingPartition]:
        from alphaengine.archive import PendingPartition  # noqa: PLC0415

        result = await self._request("archive_pending", {"cutoffs": msgspec.to_builtins(cutoffs)})
        return msgspec.convert(result, list[PendingPartition])

    async def archive_day(self, table: str, day: date) -> DayReport | None:
        from alphaengine.archive import DayReport  # noqa: PLC0415

        args = {"table": table, "day": day.isoformat()}
        result = await self._request("archive_run", args, _ARCHIVE_DAY_TIMEOUT_S)
        return None if result is None else msgspec.convert(result, DayReport)

    async def manifest(self) -> list[ManifestEntry]:
        from alphaengine.archive import ManifestEntry  # noqa: PLC0415

        return msgspec.convert(await self._request("archive_list", {}), list[ManifestEntry])

    async def restore(self, table: str, day: date) -> tuple[ManifestEntry, int]:
        from alphaengine.archive import ManifestEntry  # noqa: PLC0415

        args = {"table": table, "day": day.isoformat()}
        result = await self._request("archive_restore", args, _ARCHIVE_DAY_TIMEOUT_S)
        return msgspec.convert(result["entry"], ManifestEntry), int(result["rows"])


@contextlib.asynccontextmanager
async def _open_archive(loaded: LoadedConfig) -> AsyncIterator[Archive | _EngineArchive]:
    """The running engine's archive if one answers on the admin socket, else one over opened stores."""
    from alphaengine.archive import SCRATCH_DIR, Archive  # noqa: PLC0415
    from alphaengine.clock import LiveClock  # noqa: PLC0415
    from alphaengine.kernel import admin  # noqa: PLC0415
    from alphaengine.kernel.engine import resolve_config_paths, resolve_path  # noqa: PLC0415
    from alphaengine.objectstore import build_objectstore  # noqa: PLC0415
    from alphaengine.store import build_store  # noqa: PLC0415

    socket_path = resolve_path(loaded.app.admin.socket)
    if admin.is_engine_listening(socket_path):
        yield _EngineArchive(socket_path, loaded.app.admin.token)
        return
    app = resolve_config_paths(loaded).app
    store = build_store(app.store)
    objects = build_objectstore(app.objectstore)
    await store.start()
    try:
        await objects.start()
        try:
            yield Archive(store, objects, Path(app.engine.data_dir) / SCRATCH_DIR, LiveClock())
        finally:
            await objects.close()
    finally:
        await store.close()


_ADMIN_COMMANDS = (
    "status",
    "health",
    "stop",
    "reload",
    "models",
    "retrain",
    "promote",
    "rollback",
    "demote",
    "positions",
    "risk",
    "set-limits",
    "pause",
    "resume",
)
_MODEL_COMMANDS = ("promote", "rollback", "demote")


@main.command("admin")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON answer.")
@click.option("--version", "version", default=None, help="promote: this version (default: the challenger).")
@click.option("--reason", default=None, help="promote, rollback, demote: why (kept in the model's history).")
@click.option("--wait", is_flag=True, help="retrain: wait for the cycle and print its report.")
@click.option("--reducing-only", is_flag=True, help="pause: let orders that shrink a position through.")
@click.argument("command", type=click.Choice(_ADMIN_COMMANDS))
@click.argument("models", nargs=-1)
def admin_command(  # noqa: PLR0917  (click passes every option)
    config_path: str,
    as_json: bool,
    version: str | None,
    reason: str | None,
    wait: bool,
    reducing_only: bool,
    command: str,
    models: tuple[str, ...],
) -> None:
    """Talk to a running engine's admin socket. ``health`` exits 1 when the engine is unhealthy.

    \b
    status | health | stop
    reload MODULE                   re-import the module's plugin code and settings, hand its state over
    models                          champions, challengers and earlier champions of the models
    retrain [MODEL...] [--wait]     a training cycle now (default: every configured model)
    promote MODEL [--version V]     make the challenger (or version V) the champion
    rollback MODEL                  return to the previous champion
    demote MODEL                    stop trading on the champion
    positions                       positions, cash, PnL and open orders of the paper account
    risk                            the trading mode and the risk limits in force
    set-limits KEY=VALUE...         change risk limits (e.g. max_order_notional_usd=1000)
    pause [--reducing-only]         halt trading (or allow only reducing orders)
    resume                          trade again (the drawdown starts over from the equity now)
    """  # noqa: D301  (click keeps a paragraph after a backspace line as it is written)
    from alphaengine.kernel import admin  # noqa: PLC0415
    from alphaengine.kernel.engine import resolve_path  # noqa: PLC0415

    loaded = _load_or_exit(config_path)
    socket_path = resolve_path(loaded.app.admin.socket)
    args: dict[str, Any] = {}
    timeout_s = 30.0
    if command in _MODEL_COMMANDS:
        if len(models) != 1:
            raise click.UsageError(f"{command} takes one MODEL")
        args = {"model": models[0], "version": version, "reason": reason}
    elif command == "reload":
        if len(models) != 1:
            raise click.UsageError("reload takes one MODULE (its name in the configuration)")
        args = {"module": models[0]}
        timeout_s = 120.0
    elif command == "retrain":
        args = {"models": list(models), "wait": wait}
        timeout_s = _TRAIN_TIMEOUT_S
    elif command == "set-limits":
        args = _limit_args(models)
    elif command == "pause" and not models:
        args = {"reducing_only": reducing_only, "reason": reason}
    elif models:
        raise click.UsageError(f"{command} takes no MODEL")
    try:
        result = _run_async(admin.request(socket_path, command, args, loaded.app.admin.token, timeout_s))
    except AlphaEngineError as exc:
        click.echo(f"alphaengine: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(_render(command, args, result))
    if command == "health" and not result.get("healthy"):
        sys.exit(1)


def _limit_args(pairs: tuple[str, ...]) -> dict[str, float]:
    """``KEY=VALUE`` pairs of ``set-limits`` as numbers (the engine checks names and ranges)."""
    if not pairs:
        raise click.UsageError("set-limits takes KEY=VALUE pairs, e.g. max_order_notional_usd=1000")
    out: dict[str, float] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not key or not math.isfinite(number):
            raise click.UsageError(f"set-limits: {pair!r} is not KEY=NUMBER")
        out[key] = int(number) if number.is_integer() and key == "max_orders_per_minute" else number
    return out


def _render(command: str, args: dict[str, Any], result: Any) -> str:
    if command in ("positions", "risk", "set-limits", "pause", "resume"):
        from alphaengine.trading.report import render_positions, render_risk  # noqa: PLC0415

        return render_positions(result) if command == "positions" else render_risk(result)
    if command == "models":
        from alphaengine.models.report import render_models  # noqa: PLC0415

        return render_models(result)
    if command == "retrain":
        if "status" in result:
            return _render_cycle(result)
        return f"training cycle scheduled for {', '.join(result['models'])}"
    if command in _MODEL_COMMANDS:
        return _render_model_change(args["model"], result)
    if command == "reload":
        return _render_reload(result)
    if command == "stop":
        return "the engine is stopping (gracefully: sources first, then every sink flushes and commits)"
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


def _render_model_change(model: str, result: dict[str, Any]) -> str:
    """A model's state after promote, rollback or demote: its champion now, and the change made."""
    lines = [f"{model}: champion {result['champion'] or 'none'}"]
    if result["history"]:
        last = result["history"][-1]
        was = last["previous"] or "none"
        why = f": {last['reason']}" if last.get("reason") else ""
        lines.append(f"  {last['action']} by {last['by']} (was {was}){why}")
    if result["earlier"]:
        lines.append(f"  earlier champions, newest first: {', '.join(reversed(result['earlier']))}")
    return "\n".join(lines)


def _render_reload(result: dict[str, Any]) -> str:
    lines = [
        f"reloaded {result['module']} ({result['type']}) from {result['file']} in {result['seconds']:.2f} s"
    ]
    if result["state_keys"]:
        lines.append(f"  state handed over: {', '.join(result['state_keys'])}")
    for where, offset in result["resumed_from"].items():
        stopped = result["stopped_at"].get(where)
        same = "" if stopped == offset else f"  (the old instance stopped at {stopped})"
        lines.append(f"  {where:<24} reads on from offset {offset}{same}")
    return "\n".join(lines)


def _render_cycle(raw: dict[str, Any]) -> str:
    from alphaengine.models.report import render_cycle  # noqa: PLC0415
    from alphaengine.models.trainer import CycleReport  # noqa: PLC0415

    return render_cycle(msgspec.convert(raw, CycleReport))


_TRAIN_TIMEOUT_S = 6 * 3600.0
"""How long the CLI waits for a running engine's training cycle."""


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--model", "models", multiple=True, help="Only this model (repeatable; default: the trainer's models)."
)
@click.option(
    "--candles",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Train on an OHLCV candle CSV (timestamp,open,high,low,close,volume) instead of the store's bars.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def train(config_path: str, models: tuple[str, ...], candles: Path | None, as_json: bool) -> None:
    """One training cycle now, with the trainer's settings from the configuration; prints its report.

    Each model is validated walk-forward out of sample against the baselines, fitted on the whole
    window, registered, and promoted if it passes the rules (docs/models.md). While an engine runs on
    the same configuration (and no --candles is given) the cycle runs in that engine. Exit status 1 when
    the cycle or a model's training failed.
    """
    from alphaengine.kernel import admin  # noqa: PLC0415
    from alphaengine.kernel.engine import resolve_path  # noqa: PLC0415
    from alphaengine.models.trainer import CycleReport  # noqa: PLC0415

    loaded = _load_or_exit(config_path)
    _setup_logging("WARNING")
    socket_path = resolve_path(loaded.app.admin.socket)
    try:
        if candles is None and admin.is_engine_listening(socket_path):
            args = {"models": list(models), "wait": True}
            raw = _run_async(
                admin.request(socket_path, "retrain", args, loaded.app.admin.token, _TRAIN_TIMEOUT_S)
            )
            report = msgspec.convert(raw, CycleReport)
        else:
            report = _run_async(_train_here(loaded, list(models), candles))
    except AlphaEngineError as exc:
        click.echo(f"alphaengine: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(report)).decode())
    else:
        from alphaengine.models.report import render_cycle  # noqa: PLC0415

        click.echo(render_cycle(report))
    failed = report.status == "failed" or any(m.status == "failed" for m in report.models)
    sys.exit(1 if failed else 0)


async def _train_here(loaded: LoadedConfig, models: list[str], candles: Path | None) -> CycleReport:
    from alphaengine.clock import LiveClock  # noqa: PLC0415
    from alphaengine.kernel.engine import resolve_config_paths  # noqa: PLC0415
    from alphaengine.models.trainer import Retrainer, trainer_settings  # noqa: PLC0415
    from alphaengine.objectstore import build_objectstore  # noqa: PLC0415
    from alphaengine.store import build_store  # noqa: PLC0415

    app = resolve_config_paths(loaded).app
    store = None if candles is not None else build_store(app.store)
    objects = build_objectstore(app.objectstore)
    if store is not None:
        await store.start()
    try:
        await objects.start()
        retrainer = Retrainer(
            trainer_settings(loaded),
            store=store,
            objects=objects,
            clock=LiveClock(),
            data_dir=Path(app.engine.data_dir),
            candles=candles,
        )
        try:
            return await retrainer.cycle(models or None, reason="alphaengine train")
        finally:
            await retrainer.close()
            await objects.close()
    finally:
        if store is not None:
            await store.close()


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--files", "files", multiple=True, help="Recording or tick files to replay (globs allowed; repeatable)."
)
@click.option(
    "--from", "first", type=click.DateTime(["%Y-%m-%d"]), default=None, help="First day from the store."
)
@click.option(
    "--to", "last", type=click.DateTime(["%Y-%m-%d"]), default=None, help="Last day (default: --from)."
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where to write the files (default: <data_dir>/backtest).",
)
@click.option(
    "--step", "step_s", type=click.IntRange(1), default=60, show_default=True, help="Seconds a step."
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def backtest(  # noqa: PLR0917  (click passes every option)
    config_path: str,
    files: tuple[str, ...],
    first: datetime | None,
    last: datetime | None,
    out_dir: Path | None,
    step_s: int,
    no_progress: bool,
) -> None:
    """Replay trades through the configured bar builder, predictor and trader on a simulated clock.

    The trades come from recording or tick files (--files), or from the store's ticks table (--from,
    --to; restore archived days first with `alphaengine archive restore`). The champions of the
    configured registry predict. Writes fills.csv, orders.csv, equity.csv, summary.json and
    tearsheet.html; two runs on the same data give the same fills.csv to the byte (docs/trading.md).
    """
    from alphaengine.backtest.command import run_backtest  # noqa: PLC0415
    from alphaengine.kernel.engine import resolve_path  # noqa: PLC0415

    loaded = _load_or_exit(config_path)
    _setup_logging("WARNING")
    if first is None and last is not None:
        raise click.UsageError("--to needs --from")
    days = None if first is None else (first.date(), (last or first).date())
    target = out_dir or resolve_path(str(Path(loaded.app.engine.data_dir) / "backtest"))
    try:
        summary, written = _run_async(
            run_backtest(
                loaded, files=files, days=days, out_dir=target, step_s=step_s, show_progress=not no_progress
            )
        )
    except AlphaEngineError as exc:
        click.echo(f"alphaengine: {exc}", err=True)
        sys.exit(1)
    perf = summary["performance"]
    click.echo(
        f"{summary['data']['ticks']:,} trades from {summary['data']['first']} to {summary['data']['last']} "
        f"in {summary['run']['wall_s']:.1f} s ({summary['run']['ticks_per_s'] or 0:,} trades/s)"
    )
    click.echo(
        f"equity {summary['equity']['initial_usd']:,.2f} -> {summary['equity']['final_usd']:,.2f} USD, "
        f"{perf['fills']} fills, fees {perf['fees_usd']:,.2f} USD, "
        f"max drawdown {perf['max_drawdown'] or 0:.2%}"
    )
    click.echo(f"models: {summary['models'] or 'none traded'}; rejections: {summary['rejections'] or 'none'}")
    for name, path in written.items():
        click.echo(f"  {name:<10} {path}")


if __name__ == "__main__":  # pragma: no cover
    main()
