"""The first and warm calls of tools, by where they run: in the caller's process (a thread), in
their tool process started by the first call (as before ToolRegistry.start), or started ahead
by `tools.start()` (as `visto chat --tools` / `visto serve --tools` do now). One mode per fresh
interpreter; one JSON line out. Wall and CPU seconds (the caller's, and the tool process's
own from /proc), and the load average.

    python bench/tool_process_latency.py MODE [--ckpt CKPT] [--side 128] [--tools segment,detect]

MODE: thread | process (started by the first call) | started (start(), ready(), then the first
call: a user who asks once the program is up) | started-now (start(), then the first call at
once: the worst case, it waits on what is left of the start). --tools ocr times the OCR tool.
"""

import argparse
import json
import os
import statistics
import time
from dataclasses import replace

import torch

torch.set_num_threads(1)
from PIL import Image, ImageDraw  # noqa: E402

from visto.tools import ToolRegistry, load_tools  # noqa: E402
from visto.tools.registry import _ToolProcess  # noqa: E402

ARGS = {"segment": {"prompt": "the red star"}, "detect": {"query": "red star"}, "ocr": {}}
MODES = ("thread", "process", "started", "started-now")

parser = argparse.ArgumentParser()
parser.add_argument("mode", choices=MODES)
parser.add_argument("--ckpt", help="a clipseg checkpoint (bench/tool_process_ckpts.py)")
parser.add_argument("--side", type=int, default=128)
parser.add_argument("--tools", default="segment,detect", help="segment,detect or ocr")
parser.add_argument("--warm", type=int, default=20, help="warm calls per tool (median)")
args = parser.parse_args()
names = args.tools.split(",")
if set(names) - set(ARGS):
    parser.error(f"--tools: choose from {', '.join(ARGS)}")
if {"segment", "detect"} & set(names) and not args.ckpt:
    parser.error("segment and detect need --ckpt")


def kib(pid, key):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key):
            return int(line.split()[1])


def cpu_s(pid):
    """user + system CPU seconds of a process so far."""
    fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


side = args.side
image = Image.new("RGB", (side, side * 3 // 4 if side > 128 else side), (245, 240, 230))
draw = ImageDraw.Draw(image)
draw.ellipse((side // 4, side // 8, side // 2, side // 2), fill=(210, 40, 40))
draw.text((side // 8, side * 5 // 8), "SALE 50", fill=(0, 0, 0))
spec = ",".join(f"{n}={args.ckpt}" if n in ("segment", "detect") else n for n in names)
tools = load_tools(spec)
if args.mode == "thread":
    tools = ToolRegistry(replace(tools.get(n), process=None) for n in tools.names)
rss0 = kib(os.getpid(), "VmRSS")
out = {"mode": args.mode, "tools": names, "image": list(image.size),
       "ckpt": os.path.basename(os.path.dirname(args.ckpt)) if args.ckpt else None,
       "load": os.getloadavg()[0]}  # fmt: skip
if args.mode.startswith("started"):
    t0, c0 = time.perf_counter(), time.process_time()
    tools.start()
    out["start_returns_ms"] = round(1000 * (time.perf_counter() - t0), 2)
    out["start_cpu_ms"] = round(1000 * (time.process_time() - c0), 2)
    if args.mode == "started":
        assert tools.ready(300)
        out["ready_s"] = round(time.perf_counter() - t0, 3)
for name in names:
    process = None if args.mode == "thread" else _ToolProcess.named(tools.get(name).process)
    # the tool process's CPU before the call: 0 where the call starts it
    w0 = cpu_s(process.process.pid) if process is not None and process.process else 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    result = tools.run(name, ARGS[name], image)
    assert result.ok, result.output
    first = {"first_s": round(time.perf_counter() - t0, 3),
             "first_cpu_s": round(time.process_time() - c0, 3)}  # fmt: skip
    if process is not None:  # CPU the tool process spent in the call (and its start, if it did)
        first["first_worker_cpu_s"] = round(cpu_s(process.process.pid) - w0, 3)
        first["worker_cpu_before_s"] = round(w0, 3)
    warm = []
    for _ in range(args.warm):
        t0 = time.perf_counter()
        tools.run(name, ARGS[name], image)
        warm.append(time.perf_counter() - t0)
    out[name] = {**first, "warm_ms": round(1000 * statistics.median(warm), 1)}
out["caller_rss_growth_mib"] = round((kib(os.getpid(), "VmRSS") - rss0) / 1024)
if args.mode != "thread":
    worker = _ToolProcess.named(tools.get(names[0]).process).process.pid
    out["worker_peak_rss_mib"] = round(kib(worker, "VmHWM") / 1024)
    t0 = time.perf_counter()
    tools.stop()
    out["stop_s"] = round(time.perf_counter() - t0, 3)
    try:
        os.kill(worker, 0)
        out["worker_left"] = True
    except ProcessLookupError:
        out["worker_left"] = False
print(json.dumps(out))
