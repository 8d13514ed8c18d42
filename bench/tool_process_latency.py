"""segment/detect in the caller's process (a thread) vs in their tool process: first call, warm
calls (median of 20), RSS. Run once per mode in a fresh interpreter: MODE CKPT SIZE."""
import json
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

torch.set_num_threads(1)
from PIL import Image, ImageDraw  # noqa: E402

from visto.tools import ToolRegistry, load_tools  # noqa: E402
from visto.tools.registry import _ToolProcess  # noqa: E402

mode, ckpt, side = sys.argv[1], sys.argv[2], int(sys.argv[3])


def kib(pid, key):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key):
            return int(line.split()[1])


image = Image.new("RGB", (side, side * 3 // 4 if side > 128 else side), (245, 240, 230))
ImageDraw.Draw(image).ellipse((side // 4, side // 8, side // 2, side // 2), fill=(210, 40, 40))
tools = load_tools(f"segment={ckpt},detect={ckpt}")
if mode == "thread":
    tools = ToolRegistry(replace(tools.get(n), process=None) for n in tools.names)
rss0 = kib(os.getpid(), "VmRSS")
out = {"mode": mode, "ckpt": os.path.basename(os.path.dirname(ckpt)), "image": list(image.size)}
for name, args in [("segment", {"prompt": "the red star"}), ("detect", {"query": "red star"})]:
    t0 = time.perf_counter()
    assert tools.run(name, args, image).ok
    first = time.perf_counter() - t0
    warm = []
    for _ in range(20):
        t0 = time.perf_counter()
        tools.run(name, args, image)
        warm.append(time.perf_counter() - t0)
    out[name] = {"first_s": round(first, 3), "warm_ms": round(1000 * statistics.median(warm), 1)}
out["caller_rss_growth_mib"] = round((kib(os.getpid(), "VmRSS") - rss0) / 1024)
if mode == "process":
    worker = _ToolProcess.named("clipseg").process.pid
    out["worker_peak_rss_mib"] = round(kib(worker, "VmHWM") / 1024)
print(json.dumps(out))
