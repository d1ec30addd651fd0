"""The kernel: module lifecycle, supervisor restarts and FAULTED, registry, admin socket, engine health."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import msgspec
import pytest

from alphaengine.backoff import Backoff
from alphaengine.config import ModuleConfig, SupervisorConfig, loads
from alphaengine.errors import LifecycleError, PluginError
from alphaengine.kernel import admin
from alphaengine.kernel.engine import Engine
from alphaengine.kernel.module import Context, Module, ModuleSettings, ModuleState
from alphaengine.kernel.registry import available, resolve_module
from alphaengine.kernel.supervisor import Supervisor
from alphaengine.pipeline.sinks import TickSink
from tests import plugins

FAST = SupervisorConfig(backoff_initial_s=0.01, backoff_max_s=0.05, max_restarts=3, restart_window_s=60)


def decl(name: str, type_name: str, **settings: Any) -> ModuleConfig:
    cls = resolve_module(type_name)
    return ModuleConfig(name, type_name, True, cls.Config(**settings))


async def eventually(predicate: Any, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_lifecycle_states_and_illegal_transitions(ctx: Context) -> None:
    module = plugins.Ticker("t", ModuleSettings(), ctx)
    assert module.state is ModuleState.INITIALIZED
    await module.start()
    assert module.state is ModuleState.RUNNING
    module.set_degraded("slow store")
    assert (module.state, module.detail) == (ModuleState.DEGRADED, "slow store")
    module.set_healthy()
    assert module.state is ModuleState.RUNNING
    await module.stop()
    assert module.state is ModuleState.STOPPED
    await module.stop()  # idempotent
    with pytest.raises(LifecycleError):
        await module.start()


async def test_stop_cancels_every_owned_task(ctx: Context) -> None:
    module = Module("m", ModuleSettings(), ctx)
    never = asyncio.Event()
    await module.start()
    tasks = [module.spawn(never.wait(), f"wait{i}") for i in range(3)]
    await module.stop()
    assert all(t.cancelled() for t in tasks)


async def test_supervisor_restarts_a_crashing_module_and_leaves_others_alone(ctx: Context) -> None:
    supervisor = Supervisor(ctx, FAST)
    supervisor.add(decl("flaky", "tests.plugins:Flaky", fail_times=2), plugins.Flaky)
    ticker_slot = supervisor.add(decl("ticker", "tests.plugins:Ticker"), plugins.Ticker)
    ticker = ticker_slot.instance
    await supervisor.start_all()
    slot = supervisor.slots["flaky"]
    await eventually(lambda: slot.restarts == 2 and slot.state is ModuleState.RUNNING)
    assert slot.last_error == "RuntimeError: boom #2"
    assert not slot.gave_up
    assert supervisor.module("ticker") is ticker  # never restarted
    assert ticker.state is ModuleState.RUNNING
    assert ticker.count > 0
    await supervisor.stop_all()
    assert slot.state is ModuleState.STOPPED
    assert ticker.state is ModuleState.STOPPED


async def test_supervisor_gives_up_and_marks_faulted(ctx: Context) -> None:
    supervisor = Supervisor(ctx, FAST)
    supervisor.add(decl("bad", "tests.plugins:FailsToStart"), plugins.FailsToStart)
    supervisor.add(decl("ticker", "tests.plugins:Ticker"), plugins.Ticker)
    await supervisor.start_all()
    slot = supervisor.slots["bad"]
    await eventually(lambda: slot.gave_up)
    assert slot.state is ModuleState.FAULTED
    assert slot.restarts == FAST.max_restarts
    assert slot.last_error == "OSError: cannot bind"
    assert supervisor.module("ticker").state is ModuleState.RUNNING
    await supervisor.stop_all()


def test_backoff_is_capped_exponential_with_jitter() -> None:
    full = Backoff(0.5, 8.0, rng=random.Random(1))
    caps = []
    for _ in range(8):
        caps.append(full.cap())
        assert 0.0 <= full.next_delay() <= caps[-1]
    assert caps == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    equal = Backoff(1.0, 4.0, jitter="equal", rng=random.Random(2))
    delays = [equal.next_delay() for _ in range(4)]
    assert 0.5 <= delays[0] <= 1.0
    assert 2.0 <= delays[3] <= 4.0
    equal.reset()
    assert equal.cap() == 1.0


def test_registry_finds_builtins_and_import_paths() -> None:
    names = available()
    assert {"synthetic", "replay", "tick_sink", "bar_builder", "bar_sink"} <= set(names)
    assert resolve_module("tick_sink") is TickSink
    assert resolve_module("alphaengine.pipeline.sinks:TickSink") is TickSink
    with pytest.raises(PluginError, match="no module type 'nope'"):
        resolve_module("nope")
    with pytest.raises(PluginError, match="cannot import"):
        resolve_module("no.such.package:Thing")


def engine_config(tmp_path: Path, modules: str, token: str | None = None) -> str:
    token_line = f'token = "{token}"\n' if token else ""
    return f"""
[engine]
data_dir = "{tmp_path}/data"
stop_deadline_s = 5
[engine.supervisor]
backoff_initial_s = 0.01
backoff_max_s = 0.05
max_restarts = 2
[metrics]
port = 0
enabled = false
[admin]
socket = "{tmp_path}/admin.sock"
{token_line}
{modules}
"""


async def test_engine_health_reports_a_faulted_module(tmp_path: Path) -> None:
    cfg = loads(
        engine_config(
            tmp_path,
            '[modules.bad]\ntype = "tests.plugins:FailsToStart"\n'
            '[modules.ok]\ntype = "tests.plugins:Ticker"\n',
        )
    )
    engine = Engine(cfg)
    run = asyncio.ensure_future(engine.run(handle_signals=False))
    sock = tmp_path / "admin.sock"
    await eventually(engine.ready.is_set)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600

    async def bad_gave_up() -> bool:
        health = await admin.request(sock, "health")
        return any(m["module"] == "bad" and m["gave_up"] for m in health["modules"])

    async with asyncio.timeout(5):
        while not await bad_gave_up():
            await asyncio.sleep(0.02)
    health = await admin.request(sock, "health")
    assert health["healthy"] is False
    states = {m["module"]: m["state"] for m in health["modules"]}
    assert states == {"bad": "FAULTED", "ok": "RUNNING"}
    status = await admin.request(sock, "status")
    assert [m["module"] for m in status["modules"]] == ["bad", "ok"]
    await admin.request(sock, "stop")
    summary = await asyncio.wait_for(run, 10)
    assert summary.clean
    assert not sock.exists()


async def test_admin_socket_refuses_a_wrong_token(tmp_path: Path) -> None:
    cfg = loads(engine_config(tmp_path, '[modules.ok]\ntype = "tests.plugins:Ticker"\n', token="s3cret"))
    engine = Engine(cfg)
    run = asyncio.ensure_future(engine.run(handle_signals=False))
    await eventually(engine.ready.is_set)
    sock = tmp_path / "admin.sock"
    with pytest.raises(admin.AdminError, match="unauthorized"):
        await admin.request(sock, "status")
    with pytest.raises(admin.AdminError, match="unauthorized"):
        await admin.request(sock, "status", token="guess")
    health = await admin.request(sock, "health", token="s3cret")
    assert health["healthy"] is True
    with pytest.raises(admin.AdminError, match="unknown command"):
        await admin.request(sock, "launch", token="s3cret")
    engine.request_stop("test over")
    assert (await asyncio.wait_for(run, 10)).clean


OTHER_USER_CLIENT = """
import socket, sys
client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    client.connect(sys.argv[1])
except OSError as exc:
    print(type(exc).__name__)
    sys.exit(0)
client.sendall(b'{"cmd": "status"}\\n')
print(client.makefile().readline().strip())
"""


async def test_admin_socket_refuses_another_user(tmp_path: Path) -> None:
    """Mode 0600 keeps another user out; with the mode loosened, the peer's uid is still refused."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root, which this test needs to act as another user")
        pytest.skip("acting as another user needs root")
    # A directory another user may traverse, so that only the socket's own mode is in the way.
    shared = Path(tempfile.mkdtemp(prefix="alphaengine-admin-"))
    os.chmod(shared, 0o755)
    sock = shared / "admin.sock"
    cfg = loads(engine_config(tmp_path, '[modules.ok]\ntype = "tests.plugins:Ticker"\n'))
    cfg = dataclasses.replace(
        cfg,
        app=msgspec.structs.replace(cfg.app, admin=msgspec.structs.replace(cfg.app.admin, socket=str(sock))),
    )
    engine = Engine(cfg)
    run = asyncio.ensure_future(engine.run(handle_signals=False))
    try:
        await eventually(engine.ready.is_set)

        async def as_nobody() -> str:
            proc = await asyncio.create_subprocess_exec(
                "/usr/bin/python3",
                "-c",
                OTHER_USER_CLIENT,
                str(sock),
                user=65534,
                group=65534,
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await proc.communicate()
            return out.decode().strip()

        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        assert await as_nobody() == "PermissionError"
        os.chmod(sock, 0o666)
        answer = await as_nobody()
        assert "unauthorized: uid 65534 is not the engine's user" in answer
        assert (await admin.request(sock, "health"))["healthy"]  # the owner still gets in
    finally:
        engine.request_stop("test over")
        await asyncio.wait_for(run, 10)
        shutil.rmtree(shared, ignore_errors=True)


async def test_second_engine_on_the_same_socket_is_refused(tmp_path: Path) -> None:
    cfg = loads(engine_config(tmp_path, '[modules.ok]\ntype = "tests.plugins:Ticker"\n'))
    first = Engine(cfg)
    run = asyncio.ensure_future(first.run(handle_signals=False))
    await eventually(first.ready.is_set)
    with pytest.raises(admin.AdminError, match="is in use"):
        await Engine(cfg).run(handle_signals=False)
    first.request_stop("test over")
    await asyncio.wait_for(run, 10)
