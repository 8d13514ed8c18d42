"""Tool processes started ahead of the first call (ToolRegistry.start), and ended (stop, and at
exit): the process starts in the background and loads its expert (Tool.warm), so the first
call runs in that process and does not start one; a call made before it is ready waits for
it; a failed or too-slow warm-up is logged and left to the first call, which starts the
process again; stop() ends an idle process by closing its pipe (it exits with 0) and kills a
busy one, whose call answers with that error; a stop() that comes before the warm-up started
the process leaves none. End to end: `visto chat --tools` and `visto serve --tools` start the
tool process before the first question (its warm-up ran, in a child of theirs), the first
call runs in it, and none is left after /quit, Ctrl-C, the server's shutdown, or the caller's
being killed.

The tools below are this module's functions, so that their process can import them by name."""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from test_serve_support import free_port, make_clipseg_checkpoint
from test_serve_tool_budget import PAINT, make_caller_checkpoint
from test_tool_process import CALLS, alive, in_callers_process, in_process, loaded, nap, pid, scene
from visto.tools import Tool, ToolRegistry
from visto.tools.registry import _ToolProcess

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]


def engine_loaded(image: Image.Image) -> dict:
    from visto.tools import ocr

    return {"engine": ocr._engine is not None}


def paint(image: Image.Image, **arguments) -> dict:
    return {"painted": arguments["colour"], "pid": os.getpid()}


def warm_paint() -> None:
    time.sleep(0.2)


# `--tools test_tool_process_start:LIFE` in this process's own chat and server
LIFE = Tool("paint", "Paint the square", paint, parameters=PAINT["function"]["parameters"],
            process="test-life", warm=warm_paint)  # fmt: skip


def warm_fails() -> None:
    raise RuntimeError("no model here")


def warm_exits() -> None:
    os._exit(3)


def warm_slowly() -> None:
    time.sleep(600)


@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory) -> Path:
    return make_clipseg_checkpoint(tmp_path_factory.mktemp("clipseg") / "checkpoint", scene())


class Starts(list):
    """The names of the tool processes started, in order, and their Popen objects."""

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[subprocess.Popen] = []


@pytest.fixture
def starts(monkeypatch) -> Starts:
    """Tool process starts, counted (the real start, in the real tool process)."""
    started = Starts()
    real = _ToolProcess._start

    def counted(self: _ToolProcess) -> None:
        real(self)
        started.append(self.name)
        started.processes.append(self.process)

    monkeypatch.setattr(_ToolProcess, "_start", counted)
    return started


def tool_children(parent: int) -> list[int]:
    """The tool processes (visto.tools.registry's child) whose parent is `parent`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(status.split("PPid:")[1].split()[0])
        if ppid == parent and b"visto.tools.registry" in cmdline and "zombie" not in status:
            found.append(int(entry.name))
    return found


def test_start_loads_the_checkpoint_ahead_and_the_first_call_runs_in_that_process(
    seg_checkpoint, starts
) -> None:
    from visto.tools import load_tools

    tools = in_callers_process(load_tools(f"segment={seg_checkpoint},detect={seg_checkpoint}"),
                               "test-start")  # fmt: skip
    probe = in_process("test-start", (pid, 60), (loaded, 60))
    started = time.monotonic()
    tools.start()
    assert time.monotonic() - started < 1  # in the background: the caller goes on at once
    assert tools.ready(120)
    assert starts == ["test-start"]
    worker = _ToolProcess.named("test-start").process.pid
    assert alive(worker) and worker in tool_children(os.getpid())
    # its warm-up loaded the checkpoint before any call of segment or detect
    assert probe.run("loaded", "{}", scene()).output == {"loaded": [str(seg_checkpoint)]}
    here = in_callers_process(tools)
    for name, args in CALLS:
        there = tools.run(name, args, scene())
        assert there.ok and (there.output, there.files) == (here.run(name, args, scene()).output,
                                                            here.run(name, args, scene()).files)  # fmt: skip
    assert probe.run("pid", "{}", scene()).output["pid"] == worker
    assert starts == ["test-start"]  # no call started a process
    tools.start()  # running and warm: nothing to do
    assert tools.ready(5) and starts == ["test-start"]
    tools.stop()
    assert not alive(worker) and worker not in tool_children(os.getpid())


def test_a_call_before_the_process_is_ready_waits_for_it_and_starts_none(starts) -> None:
    tools = in_process("test-early", (pid, 60))
    image = Image.new("RGB", (3, 2))
    tools.start()
    assert tools.run("pid", "{}", image).ok  # at once: it waits on the start under way
    assert tools.ready(60) and starts == ["test-early"]
    tools.stop()


def test_the_ocr_tool_process_loads_its_engine_ahead() -> None:
    from visto.tools import default_registry

    tools = ToolRegistry([default_registry().get("ocr")])
    tools.stop()  # whatever an earlier test left: a fresh process
    probe = in_process("ocr", (engine_loaded, 60))
    tools.start()
    assert tools.ready(120)
    assert probe.run("engine_loaded", "{}", Image.new("RGB", (4, 4))).output == {"engine": True}
    tools.stop()


def test_stop_ends_an_idle_process_by_itself_and_kills_a_busy_one(starts) -> None:
    tools = in_process("test-stop", (pid, 60), (nap, 60))
    image = Image.new("RGB", (3, 2))
    tools.start()
    assert tools.ready(60)
    process = _ToolProcess.named("test-stop").process
    tools.stop()
    assert process.returncode == 0  # it read the closed pipe and exited, not killed
    assert _ToolProcess.named("test-stop").process is None

    first = tools.run("pid", "{}", image).output["pid"]  # a call starts it again
    assert starts == ["test-stop", "test-stop"]
    answer: dict = {}
    napping = threading.Thread(target=lambda: answer.update(
        r=tools.run("nap", '{"seconds": 600}', image)))  # fmt: skip
    napping.start()
    time.sleep(0.5)
    started = time.monotonic()
    tools.stop()
    assert time.monotonic() - started < 5 and not alive(first)
    napping.join(10)
    assert answer["r"].output == {"error": "the tool's process was killed by SIGKILL before it "
                                           "answered; the next call starts a new one"}  # fmt: skip
    second = tools.run("pid", "{}", image).output["pid"]
    assert second != first and alive(second)
    tools.stop()


def test_a_stop_before_the_warm_up_started_the_process_leaves_none(starts) -> None:
    tools = in_process("test-stop-early", (pid, 60))
    for _ in range(5):
        tools.start()
        tools.stop()
        assert tools.ready(30)
        assert _ToolProcess.named("test-stop-early").process is None
    # a warm-up that saw the stop first started none; one that was starting it ended it
    assert len(starts.processes) <= 5
    assert all(p.poll() is not None for p in starts.processes)
    assert not set(tool_children(os.getpid())) & {p.pid for p in starts.processes}


def test_a_failed_warm_up_is_logged_and_left_to_the_first_call(caplog, starts) -> None:
    image = Image.new("RGB", (3, 2))
    caplog.set_level(logging.WARNING, logger="visto.tools")
    fails = ToolRegistry([Tool("pid", "", pid, process="test-warm-fails", warm=warm_fails)])
    fails.start()
    assert fails.ready(60)
    assert "tool process 'test-warm-fails' could not warm up: the tool failed: RuntimeError: " \
           "no model here" in caplog.text  # fmt: skip
    worker = _ToolProcess.named("test-warm-fails").process.pid
    assert fails.run("pid", "{}", image).output == {"pid": worker}  # the process stayed up
    fails.stop()

    exits = ToolRegistry([Tool("pid", "", pid, process="test-warm-exits", warm=warm_exits)])
    exits.start()
    assert exits.ready(60)
    assert "tool process 'test-warm-exits' exited with code 3 while starting" in caplog.text
    assert _ToolProcess.named("test-warm-exits").process is None
    assert exits.run("pid", "{}", image).ok  # the first call starts it again
    assert starts.count("test-warm-exits") == 2
    exits.stop()

    slow = ToolRegistry([Tool("pid", "", pid, timeout_s=1.5, process="test-warm-slow",
                              warm=warm_slowly)])  # fmt: skip
    slow.start()
    assert slow.ready(30)
    assert "tool process 'test-warm-slow' was not ready within 1.5 s" in caplog.text
    assert _ToolProcess.named("test-warm-slow").process is None
    patient = in_process("test-warm-slow", (pid, 60))  # its start may take more than 1.5 s
    assert patient.run("pid", "{}", image).ok  # the first call starts it again
    slow.stop()


def test_a_tool_whose_warm_cannot_be_sent_to_its_process_is_refused() -> None:
    from visto.errors import UserError

    with pytest.raises(UserError, match="so its warm must be a function a module defines"):
        ToolRegistry([Tool("pid", "", pid, process="x", warm=lambda: None)])


def test_tools_without_a_process_have_nothing_to_start(starts) -> None:
    tool = replace(Tool("pid", "", pid, process="x", warm=warm_fails), process=None)
    tools = ToolRegistry([tool])
    tools.start()
    assert tools.ready(0) and starts == []
    tools.stop()


# ------------------------------------------------------------------ end to end, through the CLI

WARM_PAINT = f"""
import os
from visto.tools import Tool

LOG = os.environ["WARM_PAINT_LOG"]


def note(what):
    with open(LOG, "a") as f:
        f.write(f"{{what}} {{os.getpid()}} {{os.getppid()}}\\n")


def warm():
    note("warm")


def paint(image, **arguments):
    note("call")
    return {{"painted": arguments["colour"]}}


paint_tool = Tool("paint", "Paint the square", paint, parameters={PAINT["function"]["parameters"]!r},
                  process="warm-paint", warm=warm)
"""


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    root = tmp_path_factory.mktemp("tool-start-cli")
    ckpt = make_caller_checkpoint(root / "caller" / "checkpoint")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(root / "square.png")
    (root / "warm_paint.py").write_text(WARM_PAINT)
    return root, ckpt


def launch(cli, log: Path, *argv: str) -> subprocess.Popen:
    root, _ = cli
    env = {**os.environ, "WARM_PAINT_LOG": str(log), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), str(REPO / "src"),
                                          os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    # SIGINT as a terminal delivers it (a shell's background job, CI's included, may run with
    # SIGINT ignored, which the command would inherit: the Ctrl-C test then waits forever)
    return subprocess.Popen([sys.executable, "-m", "visto.cli", *argv], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def notes(log: Path, what: str, timeout: float = 120.0) -> list[tuple[int, int]]:
    """(pid, parent pid) of each `what` line in the log, once there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = log.read_text().split("\n") if log.exists() else []
        found = [tuple(map(int, line.split()[1:])) for line in lines if line.startswith(what)]
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {what!r} in {log} within {timeout} s")


def gone(pid_: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid_) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid_)


def chat_argv(cli) -> list[str]:
    root, ckpt = cli
    return ["chat", "--model", str(ckpt), str(root / "square.png"), "--tools",
            "warm_paint:paint_tool", "--tool-choice", "paint", "--max-tokens", "120",
            "--interactive", "--json"]  # fmt: skip


def test_visto_chat_starts_the_tool_process_before_the_first_question(cli, tmp_path) -> None:
    """Before: the first call of the chat started the tool process (no warm line before it)."""
    log = tmp_path / "log"
    chat = launch(cli, log, *chat_argv(cli))
    try:
        [(worker, parent)] = notes(log, "warm")  # no question asked yet
        assert parent == chat.pid and alive(worker)
        chat.stdin.write("Paint the square red.\n")
        chat.stdin.flush()
        reply = json.loads(chat.stdout.readline())
        runs = reply["tool_runs"]  # the model calls paint in every round it may
        assert runs and all(r["name"] == "paint" and r["ok"] for r in runs), reply
        # the calls ran in the process started ahead: the first call started none
        assert set(notes(log, "call")) == {(worker, chat.pid)}
        chat.stdin.write("/quit\n")
        chat.stdin.flush()
        assert chat.wait(60) == 0, chat.stderr.read()
    finally:
        chat.kill()
    assert gone(worker)  # ended with the chat, not left behind


@pytest.mark.parametrize("how", ["ctrl-c", "killed"])
def test_visto_chat_leaves_no_tool_process_when_interrupted_or_killed(cli, tmp_path, how) -> None:
    log = tmp_path / "log"
    chat = launch(cli, log, *chat_argv(cli))
    try:
        [(worker, parent)] = notes(log, "warm")
        assert parent == chat.pid
        if how == "ctrl-c":  # the tool process ignores SIGINT; the chat ends it
            chat.send_signal(signal.SIGINT)
            assert chat.wait(60) == 130
            assert gone(worker, 5)
        else:  # no atexit: the tool process reads its pipe closed and ends by itself
            chat.kill()
            chat.wait(60)
            assert gone(worker, 30)
    finally:
        chat.kill()


def test_visto_serve_starts_the_tool_process_and_ends_it_at_shutdown(cli, tmp_path) -> None:
    import httpx

    root, ckpt = cli
    log = tmp_path / "log"
    port = free_port()
    serve = launch(cli, log, "serve", "--model", str(ckpt), "--tools", "warm_paint:paint_tool",
                   "--port", str(port))  # fmt: skip
    try:
        [(worker, parent)] = notes(log, "warm")
        assert parent == serve.pid
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).raise_for_status()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and serve.poll() is None, serve.stderr.read()
                time.sleep(0.1)
        image = base64.b64encode((root / "square.png").read_bytes()).decode()
        body = {"model": "caller", "tool_choice": {"type": "function", "function": {"name": "paint"}},
                "max_tokens": 120, "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                    {"type": "text", "text": "Paint the square red."}]}]}  # fmt: skip
        done = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120)
        assert done.status_code == 200, done.text
        runs = done.json()["choices"][0]["tool_runs"]
        assert runs and all(r["name"] == "paint" and r["ok"] for r in runs), runs
        assert set(notes(log, "call")) == {(worker, serve.pid)}  # in the process started ahead
        serve.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown: the app's lifespan
        assert serve.wait(60) == 0, serve.stderr.read()
    finally:
        serve.kill()
    assert gone(worker, 5)


def test_chat_and_serve_stop_the_tool_process_they_started(cli, starts) -> None:
    """In this process (which lives on): `visto chat` stops its tools' process when it ends,
    and an app of `visto serve` at its shutdown (lifespan), instead of leaving them to exit."""
    import httpx

    from test_serve_support import running
    from visto.cli import build_parser, main
    from visto.commands.serve import build_app

    root, ckpt = cli
    life = _ToolProcess.named("test-life")
    code = main(["chat", "--model", str(ckpt), str(root / "square.png"), "Paint it red.",
                 "--tools", "test_tool_process_start:LIFE", "--tool-choice", "paint",
                 "--max-tokens", "120"])  # fmt: skip
    assert code == 0 and starts == ["test-life"]
    [process] = starts.processes
    assert process.returncode == 0 and life.process is None  # ended when the chat did

    app = build_app(build_parser().parse_args(["serve", "--model", str(ckpt), "--tools",
                                               "test_tool_process_start:LIFE"]))  # fmt: skip
    assert ToolRegistry([LIFE]).ready(120) and starts == ["test-life"] * 2  # before it serves
    with running(app) as base:
        image = base64.b64encode((root / "square.png").read_bytes()).decode()
        body = {"model": "caller", "max_tokens": 120, "tool_choice": "required",
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                    {"type": "text", "text": "Paint it red."}]}]}  # fmt: skip
        done = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
        assert done.status_code == 200, done.text
        runs = done.json()["choices"][0]["tool_runs"]
        assert runs and {r["result"]["pid"] for r in runs} == {starts.processes[1].pid}
    assert starts == ["test-life"] * 2  # the calls started none
    assert starts.processes[1].returncode == 0 and life.process is None  # ended at shutdown
