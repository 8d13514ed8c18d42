"""Tools that run in a process of their own (visto.tools.Tool.process): the process is kept
between calls, and a call that runs past its timeout, or that kills it, costs that call only:
the process is killed and the next call runs on a fresh one. End to end with the OCR expert: an
OCR process stuck in the engine (a page too long to read in time, or a call that sleeps holding
the engine's lock) is killed, and the next OCR call reads the label right. And with the segment
and detect experts (a clipseg checkpoint, loaded by path in their process): the masks, boxes,
scores and PNGs equal those of the caller's own process, and a segment call killed at its
timeout leaves the next call answering right.

The tools below are this module's functions, so that their process can import them by name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from test_serve_support import make_clipseg_checkpoint
from test_tools import photo_label
from visto.errors import UserError
from visto.tools import Tool, ToolRegistry, default_registry

pytestmark = pytest.mark.timeout(300)
SECONDS = {"type": "object", "properties": {"seconds": {"type": "number"}}, "required": ["seconds"]}
LABEL = [("SALE 50% OFF", 36), ("Best before 2026", 26)]


def nap(image: Image.Image, seconds: float) -> dict:
    time.sleep(seconds)
    return {"slept": seconds}


def pid(image: Image.Image) -> dict:
    return {"pid": os.getpid()}


def size(image: Image.Image) -> dict:
    return {"size": list(image.size), "mode": image.mode}


def exit_with_3(image: Image.Image) -> dict:
    os._exit(3)


def kill_self(image: Image.Image) -> dict:
    os.kill(os.getpid(), signal.SIGKILL)
    return {}


def fails(image: Image.Image) -> dict:
    raise ValueError("no pixels today")


def refuses(image: Image.Image) -> dict:
    raise UserError("the image is too small to read")


def returns_a_lock(image: Image.Image) -> dict:
    return {"lock": threading.Lock()}  # cannot be pickled back to the caller


def returns_the_image(image: Image.Image) -> dict:
    return {"image": image}  # comes back, but is no JSON


def hang_in_ocr(image: Image.Image, seconds: float) -> dict:
    """An OCR call that hangs: it holds the engine's lock, as a stuck engine call does."""
    from visto.tools import ocr

    with ocr._engine_lock:
        time.sleep(seconds)
    return {}


def hang_in_clipseg(image: Image.Image, seconds: float) -> dict:
    """A segment or detect call that hangs: it holds the models' lock, as a stuck call does."""
    from visto.tools import clipseg

    with clipseg._lock:
        time.sleep(seconds)
    return {}


def loaded(image: Image.Image) -> dict:
    """The checkpoints its process holds."""
    from visto.tools import clipseg

    return {"loaded": sorted(clipseg._models)}


def threads(image: Image.Image, path: str) -> dict:
    return {"threads": torch.get_num_threads(), "path": path}


def alive(pid_: int) -> bool:
    try:
        os.kill(pid_, 0)
    except ProcessLookupError:
        return False
    return True


def in_process(name: str, *tools: tuple) -> ToolRegistry:
    """A registry of this module's functions as tools in process `name`: (fn, timeout_s)."""
    return ToolRegistry(Tool(fn.__name__, fn.__name__, fn, SECONDS if "seconds" in
                             fn.__code__.co_varnames else {"type": "object"}, timeout, process=name)
                        for fn, timeout in tools)  # fmt: skip


def test_a_hung_call_costs_its_timeout_and_the_next_call_runs_in_a_fresh_process() -> None:
    tools = in_process("test-hang", (pid, 60), (nap, 0.5), (size, 60))
    image = Image.new("RGB", (3, 2), "red")
    first = tools.run("pid", "{}", image).output["pid"]
    assert first != os.getpid() and alive(first)
    assert tools.run("pid", "{}", image).output["pid"] == first  # kept between calls
    assert tools.run("nap", '{"seconds": 0}', image).output == {"slept": 0}
    started = time.monotonic()
    hung = tools.run("nap", '{"seconds": 600}', image)
    assert not hung.ok and hung.output == {"error": "the tool took longer than its 0.5 s"}
    assert time.monotonic() - started < 3
    assert not alive(first)  # killed, and what it held with it
    second = tools.run("pid", "{}", image).output["pid"]
    assert second not in (first, os.getpid())
    assert tools.run("size", "{}", image.convert("P")).output == {"size": [3, 2], "mode": "P"}


def test_a_process_that_dies_is_a_clear_error_and_the_next_call_works() -> None:
    tools = in_process("test-die", (pid, 60), (exit_with_3, 60), (kill_self, 60))
    image = Image.new("RGB", (4, 4))
    for tool, how in [
        ("exit_with_3", "exited with code 3"),
        ("kill_self", "was killed by SIGKILL"),
    ]:
        before = tools.run("pid", "{}", image).output["pid"]
        assert tools.run(tool, "{}", image).output == {
            "error": f"the tool's process {how} before it answered; the next call starts a new one"
        }
        assert tools.run("pid", "{}", image).output["pid"] != before


def test_what_a_tool_in_a_process_gets_wrong_is_an_error_result_and_the_process_stays() -> None:
    tools = in_process("test-errors", (pid, 60), (fails, 60), (refuses, 60),
                       (returns_a_lock, 60), (returns_the_image, 60))  # fmt: skip
    image = Image.new("RGB", (4, 4))
    before = tools.run("pid", "{}", image).output["pid"]
    errors = {name: tools.run(name, "{}", image).output["error"] for name in
              ["fails", "refuses", "returns_a_lock", "returns_the_image"]}  # fmt: skip
    assert errors["fails"] == "the tool failed: ValueError: no pixels today"
    assert errors["refuses"] == "the image is too small to read"  # a UserError's own words
    assert errors["returns_a_lock"].startswith("the tool failed: its result cannot leave its "
                                               "process: cannot pickle '_thread.lock'")  # fmt: skip
    assert "its result is not JSON" in errors["returns_the_image"]
    assert tools.run("pid", "{}", image).output["pid"] == before  # none of it killed the process
    assert "no image" in tools.run("pid", "{}", None).output["error"]  # checked before it is sent


def test_calls_to_one_process_take_turns_and_the_wait_counts_against_the_timeout() -> None:
    long, short = in_process("test-turns", (nap, 30)), in_process("test-turns", (pid, 0.5))
    image = Image.new("RGB", (4, 4))
    short.run("pid", "{}", image)  # started
    results = {}
    waiting = threading.Thread(target=lambda: results.update(
        nap=long.run("nap", '{"seconds": 2.5}', image)))  # fmt: skip
    waiting.start()
    time.sleep(0.5)
    started = time.monotonic()
    assert short.run("pid", "{}", image).output == {"error": "the tool took longer than its 0.5 s"}
    assert time.monotonic() - started < 1.5  # it gave up waiting; it killed nothing
    waiting.join()
    assert results["nap"].output == {"slept": 2.5}


def test_a_tool_its_process_could_not_import_is_refused_when_added(monkeypatch, tmp_path) -> None:
    def inner(image):
        return {}

    for fn, name in [(lambda image: {}, "<lambda>"), (inner, "inner")]:
        with pytest.raises(UserError, match=f"so its run must be a function a module defines: "
                           f"test_.*<locals>.{name} is not defined at its module's top level"):  # fmt: skip
            ToolRegistry([Tool("local", "local", fn, process="p")])

    def script_tool(image):
        return {}

    script_tool.__module__ = "__main__"
    with pytest.raises(UserError, match=r"defined in the script run \(__main__\)"):
        ToolRegistry([Tool("script", "in __main__", script_tool, process="p")])
    # a module on the caller's sys.path (not the tool process's own) imports there
    (tmp_path / "my_process_tools.py").write_text(
        "from visto.tools import ToolRegistry\ntools = ToolRegistry()\n"
        "@tools.tool('width', 'Image width', process='test-user')\n"
        "def width(image):\n    return {'w': image.width}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from my_process_tools import tools, width

    assert tools.run("width", "{}", Image.new("RGB", (7, 1))).output == {"w": 7}
    # ... as of when that process started: a module on a path added later does not
    (tmp_path / "later" / "late_tools.py").parent.mkdir()
    (tmp_path / "later" / "late_tools.py").write_text(
        "def height(image):\n    return {'h': image.height}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "later"))
    from late_tools import height

    tools.add(Tool("height", "Image height", height, process="test-user"))
    assert tools.run("height", "{}", Image.new("RGB", (7, 1))).output == {
        "error": "the tool failed: its process cannot load its function (No module named "
        "'late_tools'); it has the caller's sys.path of when it started"
    }
    assert tools.run("width", "{}", Image.new("RGB", (7, 1))).output == {"w": 7}  # still there
    sys.modules.pop("late_tools", None)
    sys.modules.pop("my_process_tools", None)  # imported again, its `width` is another function
    assert tools.run("width", "{}", Image.new("RGB", (7, 1))).output == {
        "error": "the tool failed: its call or result cannot pass between processes: Can't "
        f"pickle {width!r}: it's not the same object as my_process_tools.width"
    }
    sys.modules.pop("my_process_tools", None)


def test_a_call_running_when_the_caller_exits_does_not_outlive_it(tmp_path) -> None:
    script = (
        "import threading, time\n"
        "from PIL import Image\n"
        "from test_tool_process import in_process, nap\n"
        "from visto.tools.registry import _ToolProcess\n"
        "tools = in_process('test-exit', (nap, 600))\n"
        "threading.Thread(target=tools.run, args=('nap', '{\"seconds\": 600}', Image.new('RGB', "
        "(1, 1))), daemon=True).start()\n"
        "while _ToolProcess.named('test-exit').process is None: time.sleep(0.05)\n"
        "time.sleep(1)\n"
        "print(_ToolProcess.named('test-exit').process.pid)\n"
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    child = int(done.stdout)
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child)


def page(lines: int = 40) -> Image.Image:
    """A page of printed lines, far more than OCR reads in a tenth of a second."""
    image = Image.new("RGB", (1600, 40 * lines + 40), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=24)
    for i in range(lines):
        draw.text((30, 20 + 40 * i), f"Line {i} of a long page that keeps the reader busy", 
                  fill="black", font=font)  # fmt: skip
    return image


@pytest.mark.slow
def test_a_hung_ocr_call_is_killed_and_the_next_ocr_call_reads_the_label() -> None:
    """Before: the OCR tool ran in a thread that held the engine's lock past its timeout, and
    every later OCR call waited on that lock and timed out too while the hung call lived."""
    from visto.tools.ocr import ocr_tool, run_ocr

    label, _ = photo_label(LABEL)
    expected = run_ocr(label)  # read in this process, as read_words does
    assert expected["text"] == "SALE 50% OFF\nBest before 2026"
    tools = default_registry()
    ocr_pid = in_process("ocr", (pid, 60), (hang_in_ocr, 1))  # tools in the OCR tool's process
    impatient = ToolRegistry([Tool("ocr", "", ocr_tool.run, ocr_tool.parameters, timeout_s=0.1,
                                   process="ocr")])  # fmt: skip
    assert tools.run("ocr", "{}", label).output == expected  # the same words, boxes, confidences
    first = ocr_pid.run("pid", "{}", label).output["pid"]

    # an OCR call still in the engine at its timeout
    result = impatient.run("ocr", "{}", page())
    assert result.output == {"error": "the tool took longer than its 0.1 s"}
    assert not alive(first)
    started = time.monotonic()
    assert tools.run("ocr", "{}", label).output == expected
    assert time.monotonic() - started < 30  # a fresh process loads the engine: seconds
    second = ocr_pid.run("pid", "{}", label).output["pid"]
    assert second != first

    # an OCR call that never ends, holding the engine's lock
    started = time.monotonic()
    result = ocr_pid.run("hang_in_ocr", '{"seconds": 600}', label)
    assert result.output == {"error": "the tool took longer than its 1 s"}
    assert time.monotonic() - started < 5 and not alive(second)
    started = time.monotonic()
    assert tools.run("ocr", '{"detail": "text"}', label).output == {"text": expected["text"]}
    assert time.monotonic() - started < 30


def scene(size=(160, 120)) -> Image.Image:
    image = Image.new("RGB", size, (245, 240, 230))
    draw = ImageDraw.Draw(image)
    draw.polygon([(40, 15), (52, 50), (20, 30), (60, 30), (28, 50)], fill=(210, 40, 40))
    draw.ellipse((90, 60, 140, 110), fill=(40, 60, 200))
    return image


@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory) -> Path:
    """A tiny clipseg (visto.models.clipseg) saved as a checkpoint: random heads, masks about
    30% of the scene whatever the prompt, boxes and scores from its random detection head."""
    return make_clipseg_checkpoint(tmp_path_factory.mktemp("clipseg") / "checkpoint", scene())


def in_callers_process(tools: ToolRegistry, process: str | None = None) -> ToolRegistry:
    """The same tools, run in a thread of this process (the way they ran before), or in the
    tool process `process` (one of this test's own, which no other test's calls reach)."""
    return ToolRegistry(replace(tools.get(name), process=process) for name in tools.names)


CALLS = [("segment", {"prompt": "the red star"}), ("segment", {"prompt": "all circles"}),
         ("detect", {"query": "red star"}), ("detect", {"query": "blue circle"})]  # fmt: skip


def test_segment_and_detect_answer_from_their_process_as_in_the_callers(seg_checkpoint) -> None:
    from visto.tools import clipseg, load_tools

    tools = load_tools(f"segment={seg_checkpoint},detect={seg_checkpoint}")
    assert {tools.get(n).process for n in tools.names} == {clipseg.PROCESS}
    tools = in_callers_process(tools, "test-clipseg")
    probe = in_process("test-clipseg", (pid, 60), (loaded, 60))
    clipseg._models.pop(str(seg_checkpoint), None)
    images = [scene(), scene((333, 201)).convert("P"), scene((64, 64)).convert("L")]
    there = [tools.run(name, args, image) for image in images for name, args in CALLS]
    worker = probe.run("pid", "{}", images[0]).output["pid"]
    assert worker != os.getpid()
    # both tools ran in that one process, on one copy of the checkpoint, loaded by its path;
    # this process loaded none
    assert probe.run("loaded", "{}", images[0]).output == {"loaded": [str(seg_checkpoint)]}
    assert str(seg_checkpoint) not in clipseg._models
    here = [in_callers_process(tools).run(name, args, image)
            for image in images for name, args in CALLS]  # fmt: skip
    assert str(seg_checkpoint) in clipseg._models
    for a, b in zip(there, here, strict=True):
        assert a.ok and b.ok, (a.output, b.output)
        assert a.output == b.output and a.files == b.files  # masks, boxes, scores, PNG bytes
    assert any(r.output.get("found") for r in there[:2])
    assert any(r.output.get("objects") for r in there)
    assert probe.run("pid", "{}", images[0]).output["pid"] == worker  # kept between calls

    # the process computes with the torch threads of the caller at each call
    counted = ToolRegistry([Tool("threads", "", clipseg.OnCheckpoint(threads, "/some/ckpt"),
                                 process="test-clipseg")])  # fmt: skip
    before = torch.get_num_threads()
    try:
        for n in (2, 1):
            torch.set_num_threads(n)
            assert counted.run("threads", "{}", images[0]).output == {"threads": n,
                                                                       "path": "/some/ckpt"}  # fmt: skip
    finally:
        torch.set_num_threads(before)


def test_a_missing_checkpoint_is_the_tool_result_error_it_was(tmp_path) -> None:
    from visto.tools.clipseg import segment_tool

    tool = segment_tool(str(tmp_path / "none"))  # not checked until called, as before
    there = ToolRegistry([tool]).run("segment", {"prompt": "x"}, scene())
    here = in_callers_process(ToolRegistry([tool])).run("segment", {"prompt": "x"}, scene())
    assert not there.ok and there.output == here.output
    assert there.output["error"].startswith("the segment and detect tools read a clipseg "
                                            f"checkpoint; there is none at {tmp_path / 'none'}")  # fmt: skip


@pytest.mark.slow
def test_a_segment_call_past_its_timeout_is_killed_and_the_next_call_answers_right(
    seg_checkpoint,
) -> None:
    """Before: segment and detect ran in a thread, which no timeout stops: a call that hung
    holding the models' lock made every later call wait on it and time out too."""
    from visto.tools import clipseg, load_tools

    tools = in_callers_process(load_tools(f"segment={seg_checkpoint},detect={seg_checkpoint}"),
                               "test-clipseg-hang")  # fmt: skip
    impatient = ToolRegistry([replace(tools.get("segment"), timeout_s=0.01)])
    probe = in_process("test-clipseg-hang", (pid, 60), (hang_in_clipseg, 0.5))
    small, big = scene(), scene((2400, 1800))
    local = in_callers_process(tools)
    expected = {(name, str(args)): local.run(name, args, small) for name, args in CALLS}
    started = time.monotonic()
    assert local.run("segment", {"prompt": "the red star"}, big).ok
    assert time.monotonic() - started > 0.1  # the call below is cut short inside the model

    def answers_right() -> None:
        for name, args in CALLS:
            result = tools.run(name, args, small)
            want = expected[(name, str(args))]
            assert (result.output, result.files) == (want.output, want.files)

    answers_right()
    first = probe.run("pid", "{}", small).output["pid"]
    # a real segment call, on the warm process, past a timeout of 0.01 s
    started = time.monotonic()
    result = impatient.run("segment", {"prompt": "the red star"}, big)
    assert result.output == {"error": "the tool took longer than its 0.01 s"}
    assert time.monotonic() - started < 1 and not alive(first)
    answers_right()  # a fresh process, which loaded the checkpoint again
    second = probe.run("pid", "{}", small).output["pid"]
    assert second != first

    # ... and on a process still starting (the first call of a fresh one)
    assert not probe.run("hang_in_clipseg", '{"seconds": 600}', small).ok
    assert not alive(second)
    assert impatient.run("segment", {"prompt": "x"}, small).output == {
        "error": "the tool took longer than its 0.01 s"
    }
    answers_right()

    # the way it was: a hung call in a thread holds this process's lock past its timeout ...
    hung = in_callers_process(in_process("test-clipseg-hang", (hang_in_clipseg, 0.5)))
    assert not hung.run("hang_in_clipseg", '{"seconds": 3}', small).ok
    slow_local = ToolRegistry([replace(local.get("segment"), timeout_s=1)])
    assert slow_local.run("segment", {"prompt": "x"}, small).output == {
        "error": "the tool took longer than its 1 s"
    }
    answers_right()  # ... while the tool process answers on
    with clipseg._lock:  # the hung thread is done with it
        pass
