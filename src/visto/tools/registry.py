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
"""

from __future__ import annotations

import atexit
import inspect
import json
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

NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
DEFAULT_TIMEOUT_S = 60.0
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
        if tool.process is not None and (problem := _unsendable(tool.run)):
            raise UserError(f"tool {tool.name!r} runs in process {tool.process!r}, so its run "
                            f"must be a function a module defines: {problem}")  # fmt: skip
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
        self.lock = threading.Lock()
        self.process: subprocess.Popen[bytes] | None = None
        self.conn: Connection | None = None

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
                self.conn.send((tool.run, image, args))
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
        self.conn = conn
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
    def kill_all(cls) -> None:
        """At exit: a call still running would otherwise run on (an idle process just ends)."""
        for each in cls._all.values():
            if each.process is not None:
                each.process.kill()


atexit.register(_ToolProcess.kill_all)
_CHILD = ("import sys; from multiprocessing.connection import Connection; "
          "conn = Connection(int(sys.argv[1])); sys.path[:] = conn.recv(); "
          "from visto.tools.registry import _serve; _serve(conn)")  # fmt: skip


def _serve(conn: Connection) -> None:
    """A tool process: a call in, (output, None) or (None, failure) out, until the caller goes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's, who stops us
    while True:
        try:
            run, image, args = conn.recv()
        except (EOFError, OSError):
            return
        except Exception as e:  # the message was read whole: the next one reads fine
            reply = (None, f"the tool failed: its process cannot load its function ({e}); "
                           "it has the caller's sys.path of when it started")  # fmt: skip
        else:
            try:
                reply = (run(image, **args), None)
            except BaseException as e:
                reply = (None, _failure(e))
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return
        except Exception as e:  # pickling the output failed before a byte was sent
            conn.send((None, f"the tool failed: its result cannot leave its process: {e}"))
