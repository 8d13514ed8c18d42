"""Tools a model can call: a name, a JSON schema of its arguments, and a function over an image.

    from visto.tools import ToolRegistry, default_registry

    tools = default_registry()                     # the built-in experts (ocr)

    @tools.tool("brightness", "Mean brightness of the image, 0..255")
    def brightness(image):
        return {"mean": sum(image.convert("L").getdata()) / (image.width * image.height)}

    tools.openai(["ocr", "brightness"])            # the `tools` list of an OpenAI request
    tools.run("brightness", '{}', image)           # -> ToolResult: JSON text for the model

`run` never raises for what a model or an image can get wrong: unknown tool, arguments that are
not a JSON object or break the schema, an image the expert cannot read, a tool that raises or
runs past its timeout. Each comes back as `{"error": "..."}`, the tool result the model reads
next, so a bad call costs one turn and never the conversation (or the server).

A call runs in a thread of its own, given up after the tool's `timeout_s`; the thread runs on,
holding whatever it holds. A tool that names a `process` runs there instead, in a process
spawned on its first call and kept for the next ones (a model loaded once); a call past its
timeout, or one that kills the process, stops it, and the next call starts a fresh one:

    Tool("ocr", ..., run=run_ocr, process="ocr")   # a hung engine call does not block the next

A model such a process loads is loaded there by what `run` names, not sent: segment and detect
(visto.tools.clipseg) send a small object holding their checkpoint's path (OnCheckpoint).

Starting that process (a Python that imports torch) and loading its model take seconds. A
program that knows it will call its tools starts their processes ahead, in the background, and
ends them when it is done (`visto chat --tools` and `visto serve --tools` do):

    tools.start()     # returns at once; each process starts and runs its tools' `warm`
    tools.ready(30)   # (optional) wait for that; the first call otherwise waits on what is left
    tools.stop()      # an idle process is told to end (its pipe closed), a busy one killed

A process that dies or is stopped after that is started again by the next call, as always; at
the interpreter's exit every tool process is ended the same way (Ctrl-C included).
"""

from __future__ import annotations

import atexit
import inspect
import json
import logging
import multiprocessing
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from PIL import Image

from visto.data.tool_calls import NAME_RE, compact_json
from visto.errors import UserError

log = logging.getLogger("visto.tools")
NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
DEFAULT_TIMEOUT_S = 60.0
STOP_WAIT_S = 2.0  # how long an idle tool process is given to end by itself before it is killed
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list,), "object": (dict,), "null": (type(None),),
}  # fmt: skip


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    run: Callable[..., Any]  # run(image, **arguments) -> anything json.dumps takes, or a ToolOutput
    parameters: dict[str, Any] = field(default_factory=lambda: dict(NO_ARGUMENTS))
    timeout_s: float = DEFAULT_TIMEOUT_S
    # The name of a process to run in instead of a thread (module doc): for a tool whose calls
    # cannot be interrupted (native code) or hold a lock. Tools naming the same process share
    # it, one call at a time; `run` must then be a function a module defines (it is sent by
    # name) or an object that pickles (clipseg.OnCheckpoint), and its arguments and result
    # picklable.
    process: str | None = None
    # What its process runs, with no arguments, when it is started ahead of the first call
    # (ToolRegistry.start): load the model, so that the first call does not. Sent as `run` is;
    # what it returns is dropped. None: the process imports `run`'s module and nothing more.
    # A tool without a process has nothing started ahead, and its warm is not run.
    warm: Callable[[], Any] | None = None

    def openai(self) -> dict[str, Any]:
        """This tool as an entry of an OpenAI request's `tools`."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}  # fmt: skip


@dataclass(frozen=True)
class ToolOutput:
    """What a tool may return instead of plain JSON: the JSON the model reads, and files for
    the user beside it (name -> bytes, e.g. a mask as PNG) that the model never sees."""

    data: Any
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class ToolResult:
    name: str
    arguments: dict[str, Any]
    output: Any  # what the tool returned, or {"error": message}
    ok: bool
    files: dict[str, bytes] = field(default_factory=dict)  # a ToolOutput's files

    @property
    def text(self) -> str:
        """The result as the model reads it in a tool message."""
        return compact_json(self.output)


def argument_problems(schema: dict[str, Any], arguments: dict[str, Any]) -> list[str]:
    """What is wrong with `arguments` under an object schema, at its top level: missing required
    keys, keys it does not allow, values of the wrong JSON type, outside an enum, or past their
    bounds (minLength/maxLength, minItems/maxItems, minimum/maximum)."""
    properties = schema.get("properties", {})
    problems = [f"missing required argument {k!r}" for k in schema.get("required", [])
                if k not in arguments]  # fmt: skip
    for key, value in arguments.items():
        spec = properties.get(key)
        if spec is None:
            if schema.get("additionalProperties") is False:
                problems.append(f"unknown argument {key!r} (allowed: {sorted(properties)})")
            continue
        types = spec.get("type")
        types = [types] if isinstance(types, str) else types or []
        if types and not any(isinstance(value, _JSON_TYPES.get(t, ())) and
                             not (t in ("integer", "number") and isinstance(value, bool))
                             for t in types):  # fmt: skip
            problems.append(f"argument {key!r} must be {' or '.join(types)}, got {value!r}")
        elif "enum" in spec and value not in spec["enum"]:
            problems.append(f"argument {key!r} must be one of {spec['enum']}, got {value!r}")
        else:
            problems += _bound_problems(key, spec, value)
    return problems


# (schema keyword, the value's type, its measure, what it bounds, at least or at most)
_BOUNDS = [("minLength", str, len, "characters", min), ("maxLength", str, len, "characters", max),
           ("minItems", list, len, "items", min), ("maxItems", list, len, "items", max),
           ("minimum", (int, float), float, "", min), ("maximum", (int, float), float, "", max)]  # fmt: skip


def _bound_problems(key: str, spec: dict[str, Any], value: Any) -> list[str]:
    """A value's lengths and sizes against its schema's bounds (the grammar keeps the model's
    calls within them; a call from Python may not be)."""
    problems = []
    for word, kind, measure, unit, side in _BOUNDS:
        bound = spec.get(word)
        if bound is None or not isinstance(value, kind) or isinstance(value, bool):
            continue
        if (measure(value) < bound) if side is min else (measure(value) > bound):
            least = "at least" if side is min else "at most"
            what = f"{least} {bound} {unit}".rstrip()
            got = f"{measure(value):g} {unit}".rstrip() if unit else repr(value)
            problems.append(f"argument {key!r} must be {what}, got {got}")
    return problems


class ToolRegistry:
    """Named tools; `run` calls one on an image with the model's arguments."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        self._lock = threading.Lock()
        for tool in tools:
            self.add(tool)

    def add(self, tool: Tool) -> Tool:
        if not NAME_RE.match(tool.name):
            raise UserError(f"tool name {tool.name!r}: use 1-64 letters, digits, '_' or '-'")
        if tool.parameters.get("type") != "object":
            raise UserError(f"tool {tool.name!r}: parameters must be a JSON Schema of an object")
        for what, fn in (("run", tool.run), ("warm", tool.warm)):
            if tool.process is not None and fn is not None and (problem := _unsendable(fn)):
                raise UserError(f"tool {tool.name!r} runs in process {tool.process!r}, so its "
                                f"{what} must be a function a module defines: {problem}")  # fmt: skip
        with self._lock:
            self._tools[tool.name] = tool
        return tool

    def tool(self, name: str, description: str, parameters: dict[str, Any] | None = None,
             timeout_s: float = DEFAULT_TIMEOUT_S,
             process: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:  # fmt: skip
        """Decorator: register `fn(image, **arguments)` as a tool; returns `fn` unchanged."""

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.add(Tool(name, description, fn, parameters or dict(NO_ARGUMENTS), timeout_s,
                          process))  # fmt: skip
            return fn

        return register

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def __contains__(self, name: str) -> bool:
        return name in self._tools

    def get(self, name: str) -> Tool:
        if name not in self._tools:
            raise UserError(
                f"unknown tool {name!r}; the tools are: {', '.join(self.names) or 'none'}"
            )
        return self._tools[name]

    def openai(self, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        return [self.get(n).openai() for n in (self.names if names is None else names)]

    def _processes(self) -> dict[str, list[Tool]]:
        """The tool processes these tools run in, each with its tools."""
        named: dict[str, list[Tool]] = {}
        for tool in self._tools.values():
            if tool.process is not None:
                named.setdefault(tool.process, []).append(tool)
        return named

    def start(self) -> None:
        """Start these tools' processes now, in the background, and have each run its tools'
        `warm` (load their models); returns at once. A call made before a process is ready
        waits for it (its timeout counts the wait, as it counts a start); a process that fails
        to start or to warm is logged (logger "visto.tools") and left to the first call, which
        starts it again and says what went wrong. Tools without a process have nothing to
        start. Starting a process that is running only warms what it has not loaded."""
        for name, tools in self._processes().items():
            calls = [(t.warm, (), {}) if t.warm is not None else (_imported, (t.run,), {})
                     for t in tools]  # fmt: skip
            _ToolProcess.named(name).start_soon(calls, max(t.timeout_s for t in tools))

    def ready(self, timeout_s: float | None = None) -> bool:
        """Wait for the processes `start` started to be ready (or to have failed); True when
        none is still starting."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for name in self._processes():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not _ToolProcess.named(name).wait_warm(left):
                return False
        return True

    def stop(self, timeout_s: float = STOP_WAIT_S) -> None:
        """End these tools' processes (a server's shutdown): an idle one is told to, and exits
        by itself (killed if it has not within `timeout_s`); one running a call is killed, and
        that call answers with the error of a process that died. A later call starts a fresh
        process, as after any stop."""
        for name in self._processes():
            _ToolProcess.named(name).stop(timeout_s)

    def run(
        self, name: str, arguments: str | dict[str, Any], image: Image.Image | None
    ) -> ToolResult:
        """Call tool `name` on `image`; any failure is an `{"error": ...}` result (module doc)."""
        args: Any = arguments
        if isinstance(arguments, str):
            try:
                args = json.loads(arguments)
            except json.JSONDecodeError as e:
                return _failed(name, {}, f"the arguments are not JSON ({e}); send a JSON object")
        if not isinstance(args, dict):
            return _failed(name, {}, "the arguments must be a JSON object")
        if name not in self._tools:
            return _failed(name, args, f"no tool named {name!r}; the tools are: {self.names}")
        tool = self._tools[name]
        problems = argument_problems(tool.parameters, args)
        if problems:
            return _failed(name, args, "; ".join(problems))
        if image is None:
            return _failed(name, args, "there is no image in the conversation to run it on")
        if tool.process is None:
            output, failure = _run_in_thread(tool, image, args)
        else:
            output, failure = _ToolProcess.named(tool.process).run(tool, image, args)
        if failure is not None:
            return _failed(name, args, failure)
        files: dict[str, bytes] = {}
        if isinstance(output, ToolOutput):
            output, files = output.data, dict(output.files)
        try:
            compact_json(output)  # the model reads it as JSON: fail here, not later
        except (TypeError, ValueError) as e:
            return _failed(name, args, f"the tool failed: its result is not JSON: {e}")
        return ToolResult(name, args, output, ok=True, files=files)


def _failed(name: str, arguments: dict[str, Any], message: str) -> ToolResult:
    return ToolResult(name, arguments, {"error": message}, ok=False)


def _unsendable(run: Callable[..., Any]) -> str | None:
    """Why a tool process could not load `run`, or None. A function is sent by its name (it
    may not be bound to it yet: ToolRegistry.tool decorates it), anything else pickled."""
    if getattr(run, "__module__", None) == "__main__":  # the tool process does not run it
        return "it is defined in the script run (__main__); move it to a module"
    if inspect.isfunction(run):
        if "<" in run.__qualname__:
            return f"{run.__qualname__} is not defined at its module's top level"
        return None
    try:
        pickle.dumps(run)
    except (pickle.PicklingError, AttributeError, TypeError) as e:
        return str(e)
    return None


def _failure(error: BaseException) -> str:
    """What the model hears of a tool that raised."""
    if isinstance(error, UserError):  # the tool's own message for bad input
        return str(error)
    said = f": {error}" if str(error) else " (no message)"
    return f"the tool failed: {type(error).__name__}{said}"


def _too_slow(tool: Tool) -> str:
    return f"the tool took longer than its {tool.timeout_s:g} s"


def _run_in_thread(tool: Tool, image: Image.Image, args: dict[str, Any]) -> tuple[Any, str | None]:
    """(output, None) or (None, failure). A daemon thread of its own: a tool that hangs costs
    its timeout, not the caller's thread, and does not keep the process alive at exit."""
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["output"] = tool.run(image, **args)
        except BaseException as e:  # whatever a tool does wrong, the model hears it
            outcome["failure"] = _failure(e)

    worker = threading.Thread(target=call, name=f"tool-{tool.name}", daemon=True)
    worker.start()
    worker.join(tool.timeout_s)
    if worker.is_alive():
        return None, _too_slow(tool)
    return outcome.get("output"), outcome.get("failure")


class _ToolProcess:
    """The process that runs the calls of the tools naming it (Tool.process), one at a time."""

    _all: dict[str, _ToolProcess] = {}  # one per name, for all registries: loaded models stay

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()  # one call (or warm-up) at a time
        self.process: subprocess.Popen[bytes] | None = None
        self.conn: Connection | None = None
        self.epoch = 0  # counts stop()s: a warm-up asked for before one does not start it again
        self.warming: threading.Thread | None = None
        self.warmed: set[Any] = set()  # the warm-ups the running process has done

    @classmethod
    def named(cls, name: str) -> _ToolProcess:
        return cls._all.setdefault(name, cls(name))

    def run(self, tool: Tool, image: Image.Image, args: dict[str, Any]) -> tuple[Any, str | None]:
        """(output, None) or (None, failure); the timeout counts the wait for a call before."""
        deadline = time.monotonic() + tool.timeout_s
        if not self.lock.acquire(timeout=tool.timeout_s):
            return None, _too_slow(tool)
        try:
            if self.process is not None and self.process.poll() is not None:
                self._stop()  # it ended between calls (the kernel's OOM killer, say)
            try:
                if self.process is None:
                    self._start()
                assert self.conn is not None
                self.conn.send((tool.run, (image,), args))
                if not self.conn.poll(max(0.0, deadline - time.monotonic())):
                    self._stop()  # and whatever it holds; the next call starts a fresh one
                    return None, _too_slow(tool)
                output, failure = self.conn.recv()
            except (EOFError, OSError):  # it died before it answered
                return None, (f"the tool's process {self._stop()} before it answered; "
                              "the next call starts a new one")  # fmt: skip
            except (pickle.PickleError, AttributeError, TypeError, ImportError) as e:
                # a message pickles whole before it is written: the process waits, as it was
                why = f"its call or result cannot pass between processes: {e}"
                return None, f"the tool failed: {why}"
            return output, failure
        finally:
            self.lock.release()

    def start_soon(self, calls: list[tuple[Any, tuple, dict[str, Any]]], timeout_s: float) -> None:
        """Start the process in a thread of its own, unless one is starting it, and run `calls`
        there (ToolRegistry.start)."""
        with _bookkeeping:
            if self.warming is not None and self.warming.is_alive():
                return
            if (self.process is not None and self.process.poll() is None
                    and {_key(c) for c in calls} <= self.warmed):  # fmt: skip
                return  # running and warm
            self.warming = threading.Thread(target=self._warm, args=(calls, timeout_s, self.epoch),
                                            name=f"tool-process-{self.name}", daemon=True)  # fmt: skip
            self.warming.start()

    def wait_warm(self, timeout_s: float | None) -> bool:
        warming = self.warming
        if warming is not None:
            warming.join(timeout_s)
        return warming is None or not warming.is_alive()

    def _warm(self, calls: list[tuple[Any, tuple, dict[str, Any]]], timeout_s: float,
              epoch: int) -> None:  # fmt: skip
        """Start the process and run `calls` in it, within `timeout_s` (the tools' longest
        timeout): past it, the process is stopped and left to the first call."""
        deadline = time.monotonic() + timeout_s
        if not self.lock.acquire(timeout=timeout_s):
            return  # a call has it; it started the process
        try:
            if self.epoch != epoch:
                return  # stopped since start_soon was called
            if self.process is not None and self.process.poll() is not None:
                self._stop()
            try:
                if self.process is None:
                    self._start()
                for call in calls:
                    if self.epoch != epoch:  # stop() came while this started it
                        self._stop()
                        return
                    if _key(call) in self.warmed:
                        continue
                    assert self.conn is not None
                    self.conn.send(call)
                    if not self.conn.poll(max(0.0, deadline - time.monotonic())):
                        self._stop()
                        log.warning("tool process %r was not ready within %g s; stopped, the "
                                    "first call starts it again", self.name, timeout_s)  # fmt: skip
                        return
                    failure = self.conn.recv()[1]
                    if failure is not None:
                        log.warning("tool process %r could not warm up: %s", self.name, failure)
                    else:
                        self.warmed.add(_key(call))
                if self.epoch != epoch:
                    self._stop()
            except (EOFError, OSError):
                log.warning("tool process %r %s while starting; the first call starts a new one",
                            self.name, self._stop())  # fmt: skip
            except (pickle.PickleError, AttributeError, TypeError, ImportError) as e:
                log.warning("tool process %r could not be sent its warm-up: %s", self.name, e)
        finally:
            self.lock.release()

    def stop(self, timeout_s: float) -> None:
        """End the process (ToolRegistry.stop): an idle one by closing its pipe, where it waits
        for a call (it exits by itself; killed after `timeout_s`), a busy one by killing it
        (the call or warm-up that holds it then hears it died, and cleans up)."""
        with _bookkeeping:
            self.epoch += 1
        if self.lock.acquire(blocking=False):
            try:
                process, conn = self.process, self.conn
                self.process = self.conn = None
                if conn is not None:
                    conn.close()
                if process is not None:
                    try:
                        process.wait(timeout_s)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()
            finally:
                self.lock.release()
        else:
            process = self.process
            if process is not None:
                process.kill()
                process.wait()
        warming = self.warming
        if warming is not None and warming is not threading.current_thread():
            warming.join(timeout_s)  # a warm-up that was starting it ends it (the epoch)

    def _start(self) -> None:
        # A fresh interpreter, neither a fork of the caller (whose other threads may hold locks:
        # torch's, a server's) nor multiprocessing's spawn, which re-runs the caller's script
        # (all of it, where it has no `if __name__ == "__main__"`) before the first call.
        conn, child = multiprocessing.Pipe()
        try:
            self.process = subprocess.Popen([sys.executable, "-c", _CHILD, str(child.fileno())],
                                            pass_fds=[child.fileno()], stdin=subprocess.DEVNULL)  # fmt: skip
        finally:
            child.close()
        self.conn, self.warmed = conn, set()
        conn.send(sys.path)  # the caller's modules (its tools) import there too, as of now

    def _stop(self) -> str:
        """Kill the process; how it ended, for a message."""
        code = None
        if self.process is not None:
            self.process.kill()
            code = self.process.wait()
        if self.conn is not None:
            self.conn.close()
        self.process = self.conn = None
        if code is None:
            return "did not start"
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"

    @classmethod
    def stop_all(cls, timeout_s: float = STOP_WAIT_S) -> None:
        """At exit (normal, Ctrl-C, an uncaught error): every tool process ends, idle ones by
        themselves, busy ones killed, before this interpreter does; none outlives it."""
        for each in list(cls._all.values()):
            each.stop(timeout_s)


_bookkeeping = threading.Lock()  # _ToolProcess.warming and .epoch
atexit.register(_ToolProcess.stop_all)
# When the caller has gone, the process ends at once (os._exit, after flushing what a tool
# printed), not through the interpreter's teardown of torch and the models.
_CHILD = ("import os, sys; from multiprocessing.connection import Connection; "
          "conn = Connection(int(sys.argv[1])); sys.path[:] = conn.recv(); "
          "from visto.tools.registry import _serve; _serve(conn); "
          "sys.stdout.flush(); sys.stderr.flush(); os._exit(0)")  # fmt: skip


def _key(call: tuple[Any, tuple, dict[str, Any]]) -> Any:
    """What a warm-up call is known by: its function, or the tool's run it imports."""
    fn = call[1][0] if call[0] is _imported else call[0]
    try:
        hash(fn)
    except TypeError:
        return id(fn)
    return fn


def _imported(run: Callable[..., Any]) -> None:
    """The warm-up of a tool without `warm`: receiving its `run` imported its module."""


def _serve(conn: Connection) -> None:
    """A tool process: a call in, (output, None) or (None, failure) out, until the caller goes
    (closes its end of the pipe, or dies). A call is (function, positional, keyword arguments):
    a tool's run (image, arguments) or warm ((), {})."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's, who stops us
    while True:
        try:
            run, positional, args = conn.recv()
        except (EOFError, OSError):
            return
        except Exception as e:  # the message was read whole: the next one reads fine
            reply = (None, f"the tool failed: its process cannot load its function ({e}); "
                           "it has the caller's sys.path of when it started")  # fmt: skip
        else:
            try:
                reply = (run(*positional, **args), None)
            except BaseException as e:
                reply = (None, _failure(e))
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return
        except Exception as e:  # pickling the output failed before a byte was sent
            conn.send((None, f"the tool failed: its result cannot leave its process: {e}"))
