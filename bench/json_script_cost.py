"""What `copy_json` costs a quickstart stage-2 training step: the connector writing each
image's JSON (connectors.script), the teacher-forced script cursors (pointer.script_cursors)
and the pointer's script column, against the same step without them, in turns on the same
batches and weights (forward + backward, no optimizer step), CPU time per step.

    .venv/bin/python bench/json_script_cost.py --run runs/z0 --out runs/json-cost --steps 4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a quickstart run with stage1/checkpoint (read only)")
    ap.add_argument("--out", type=Path, required=True, help="scratch directory")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from quickstart_time import stage_state

    cfg = json.loads((a.run / "config.json").read_text())
    state = stage_state(a.run, "stage2", a.out, cfg)
    model = state.model
    connector = model.multi_modal_projector
    if not connector.copy_json:
        raise SystemExit(f"{a.run}'s model has no copy_json")
    batches = [next(state.stream) for _ in range(a.steps)]
    times: dict[str, list[float]] = {"with copy_json": [], "without": []}
    for r in range(a.rounds):
        for way in (times if r % 2 == 0 else reversed(list(times))):
            connector.copy_json = way == "with copy_json"
            for batch in batches:
                model.zero_grad(set_to_none=True)
                start = time.process_time()
                model(batch)["loss"].backward()
                times[way].append(time.process_time() - start)
    connector.copy_json = True
    med = {k: round(statistics.median(v), 4) for k, v in times.items()}
    print(json.dumps({"cpu_s_per_step_median": med, "ratio": round(med["with copy_json"] / med["without"], 3),
                      "steps": a.steps, "rounds": a.rounds, "load": os.getloadavg()}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
