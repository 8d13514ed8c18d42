"""visto's generation engine against transformers' `generate`: same weights, same prompts, greedy.

    .venv/bin/python bench/generate_vs_hf.py                  # LLaVA with an image, batch 1 and 8
    .venv/bin/python bench/generate_vs_hf.py --family llava --preset tiny
    .venv/bin/python bench/generate_vs_hf.py --family decoder --hidden 512 --layers 8
    .venv/bin/python bench/generate_vs_hf.py --threads 1 --repeats 7 --json bench/out/gen.json

--family llava (default): a visto LLaVA (`--preset small`, the quickstart's size) with random
weights is exported by `visto.models.llava.export_hf` and loaded as transformers'
`LlavaForConditionalGeneration`. Each timed call starts from the chat messages and a PIL image,
so preprocessing is included on both sides: ours `Llava.prompt_batch` (our processor), theirs
`LlavaProcessor` (chat template, `CLIPImageProcessorPil`, tokenizer) then `generate`.
Batch 8 asks 8 different questions about the image (prompt lengths differ: left padding); the
engine then runs the image and the prompt's shared prefix once (issue 19). --distinct-images
gives each row an image of its own (the test image with its values shifted per row), where
nothing is shared.

--family decoder: a random Llama built with transformers, saved, and loaded into visto's
DecoderLM through `from_pretrained` (the same path a real checkpoint takes); token prompts.

Both sides generate greedily. The script asserts that the generated tokens are identical and
prints, per batch size:

    ttft       time to first token: a generate call with max_new_tokens=1 (prefill + 1 token,
               preprocessing included for llava)
    tok/s      decode throughput: B * (N - 1) / (time(N tokens) - time(1 token)), all rows
    ratio      ours / transformers (> 1: we are faster for tok/s; < 1: faster for ttft)

Each figure is the median of --repeats runs after a warm-up, the two sides taking turns; the
same figures from process CPU time (steadier than wall time on a shared machine) are printed
beside them. --json FILE writes them: {"batch": {"1": {"ttft_ratio", "tokps_ratio" (wall,
ours / transformers), "ttft_ratio_cpu", "tokps_ratio_cpu", "ttft_ms", "tokps"}, "8": ...},
"load": [before, after]}. The weights are drawn wider than the usual init so that greedy choices are not
near-ties that float noise could flip. The machine load (`uptime`) is printed before and after.

--against SRC (llava) adds a third side: the visto package of another source tree, e.g. the
commit before a change (`git archive REV src | tar -x -C /tmp/before`, then `--against
/tmp/before/src`), imported beside this one (`import_tree`: its own `import visto...` read its
own modules) with the same weights, its own processor, model code and engine. The three sides
take turns in one process (the two trees swap places every other turn), so before and after
see the same load; rows `against` and `this/against` are printed, and the JSON's batch
entries gain "against" (its figures and ratios to transformers) and "vs_against" (this tree /
SRC; its tokens are checked equal too).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def interleaved_medians(fns: dict, repeats: int, orders: list[list] | None = None
                        ) -> tuple[dict, dict]:  # fmt: skip
    """Median wall and CPU seconds of each function, run in turns (A, B, A, B, ...) after one
    warm-up each, so that the load drift of a shared machine hits both sides alike. `orders`:
    the turn's order of the names, cycled repeat by repeat (default: the dict's order)."""
    for fn in fns.values():
        fn()
    wall: dict = {name: [] for name in fns}
    cpu: dict = {name: [] for name in fns}
    orders = orders or [list(fns)]
    for r in range(repeats):
        for name in orders[r % len(orders)]:
            fn = fns[name]
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    med = statistics.median
    return {n: med(t) for n, t in wall.items()}, {n: med(t) for n, t in cpu.items()}


def report(B: int, N: int, wall: dict, cpu: dict, sides: tuple[str, str],
           rows: tuple[str, ...] | None = None, label: str = "ratio") -> dict:  # fmt: skip
    """Rows of ttft and tok/s per side (wall, then CPU time; `rows`: which sides to print, all
    by default), and the ratio of the first side to the second; returns the batch's entry of
    the --json file."""
    figures = {}
    for side in sides:
        row = []
        for t in (wall, cpu):
            ttft = t[(side, 1)]
            row += [ttft, B * (N - 1) / max(t[(side, N)] - ttft, 1e-9)]
        figures[side] = row
        if rows is None or side in rows:
            print(f"{B:>5} {side:>12} {row[0] * 1e3:>9.1f} {row[1]:>9.1f} {row[2] * 1e3:>11.1f} "
                  f"{row[3]:>10.1f}")  # fmt: skip
    o, h = figures[sides[0]], figures[sides[1]]
    print(
        f"{B:>5} {label:>12} {o[0] / h[0]:>9.3f} {o[1] / h[1]:>9.2f} {o[2] / h[2]:>11.3f} "
        f"{o[3] / h[3]:>10.2f}   ({sides[0]} / {sides[1]}; ttft: lower is better, tok/s: "
        "higher); tokens identical"
    )
    return {
        "ttft_ratio": o[0] / h[0], "tokps_ratio": o[1] / h[1],
        "ttft_ratio_cpu": o[2] / h[2], "tokps_ratio_cpu": o[3] / h[3],
        "ttft_ms": {side: figures[side][0] * 1e3 for side in sides},
        "tokps": {side: figures[side][1] for side in sides},
    }  # fmt: skip


def import_tree(src: str | Path, alias: str = "visto_against"):
    """The `visto` package under `src` (another source tree), imported as `alias` beside the
    one this process runs: each of its modules gets an `__import__` that reads `visto...` as
    `alias...`, so the tree's own imports stay inside it. Returns the package module."""
    import builtins
    import importlib.abc
    import importlib.machinery
    import importlib.util
    import sys

    root = Path(src).resolve() / "visto"
    if not (root / "__init__.py").is_file():
        raise SystemExit(f"--against {src}: no visto package there ({root}/__init__.py)")
    if alias in sys.modules:
        return sys.modules[alias]
    real_import = builtins.__import__

    def aliased_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and (name == "visto" or name.startswith("visto.")):
            name = alias + name[len("visto"):]
        return real_import(name, globals, locals, fromlist, level)

    own_builtins = dict(builtins.__dict__, __import__=aliased_import)

    class Loader(importlib.machinery.SourceFileLoader):
        def exec_module(self, module):
            module.__dict__["__builtins__"] = own_builtins
            super().exec_module(module)

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname != alias and not fullname.startswith(alias + "."):
                return None
            base = root.joinpath(*fullname.split(".")[1:])
            if (base / "__init__.py").is_file():
                file, search = base / "__init__.py", [str(base)]
            elif base.with_suffix(".py").is_file():
                file, search = base.with_suffix(".py"), None
            else:
                return None
            return importlib.util.spec_from_file_location(
                fullname, file, loader=Loader(fullname, str(file)),
                submodule_search_locations=search,
            )  # fmt: skip

    sys.meta_path.insert(0, Finder())
    return importlib.import_module(alias)


def build_against(pair: dict, src: str) -> dict:
    """`build_llava`'s model built by the visto of `src` (`import_tree`), with the same config,
    tokenizer and weights, and its engine."""
    import importlib

    from visto.config import to_dict

    import_tree(src)
    pkg = {name: importlib.import_module(f"visto_against.{name}")
           for name in ("config", "models", "models.llava", "infer", "data.sample")}  # fmt: skip
    config = pkg["config"].from_dict(pkg["models.llava"].LlavaConfig, to_dict(pair["config"]))
    model = pkg["models"].build_model("llava", config, seed=0).eval()
    model.load_state_dict(pair["model"].state_dict())
    engine = pkg["infer"].Engine(model, model.processor.tokenizer, eos_token_ids=[])
    return dict(model=model, engine=engine, Sample=pkg["data.sample"].Sample,
                Turn=pkg["data.sample"].Turn, SamplingParams=pkg["infer"].SamplingParams)  # fmt: skip


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


HEADER = f"{'batch':>5} {'side':>12} {'ttft ms':>9} {'tok/s':>9} {'cpu ttft ms':>11} {'cpu tok/s':>10}"

QUESTIONS = [
    "what is in the image?",
    "is the red square left of the circle?",
    "what",
    "the blue triangle is",
    "what is left of the green circle",
    "red",
    "is it blue",
    "what colour is the square in the image",
]


def build_llava(args) -> dict:
    """The comparison's pair: a visto LLaVA (`--preset`, random weights drawn wide), the same
    weights as transformers' LlavaForConditionalGeneration with its processor, the test image
    and visto's engine. Also what bench/ttft_profile.py profiles."""
    import transformers
    from PIL import Image

    from visto.data.processor import ProcessorConfig
    from visto.data.tokenizer import train_tokenizer
    from visto.infer import Engine
    from visto.models import build_model
    from visto.models.llava import LlavaConfig, export_hf

    words = " ".join(QUESTIONS).replace("?", "").split()
    texts = [" ".join(words[(i * k) % len(words)] for k in range(1, 9)) for i in range(400)]
    tmp = tempfile.mkdtemp()
    tokenizer = train_tokenizer(texts, vocab_size=args.vocab, loc_bins=32, min_frequency=1)
    tokenizer.save(f"{tmp}/tokenizer.json")
    base = LlavaConfig.preset(args.preset)
    # "resize" (not LLaVA's "pad"): transformers' CLIP image processor resizes plainly.
    processor = ProcessorConfig(
        image_size=base.vision.image_size, image_tokens=base.image_tokens, resize_mode="resize",
        image_delimiters=False, vocab_size=tokenizer.vocab_size, loc_bins=32,
    )  # fmt: skip
    decoder = replace(base.decoder, vocab_size=tokenizer.vocab_size)
    config = replace(base, processor=processor, decoder=decoder, tokenizer_dir=tmp)
    model = build_model("llava", config, seed=args.seed).eval()
    with torch.no_grad():  # wider than the init: peaked logits, no near-ties
        g = torch.Generator().manual_seed(args.seed)
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    export_hf(model, f"{tmp}/hf")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(f"{tmp}/hf").eval()
    hf_processor = transformers.AutoProcessor.from_pretrained(f"{tmp}/hf")
    hf_processor.tokenizer.padding_side = "left"
    size = base.vision.image_size * 3 // 2  # both sides resize it (PIL bicubic)
    image = Image.new("RGB", (size, size), (200, 40, 40))
    for x in range(0, size, 7):
        for y in range(0, size, 5):
            image.putpixel((x, y), ((x * 3) % 255, (y * 5) % 255, 90))
    engine = Engine(model, model.processor.tokenizer, eos_token_ids=[])
    return dict(model=model, hf=hf, hf_processor=hf_processor, image=image, engine=engine,
                tokenizer=tokenizer, config=config)  # fmt: skip


def bench_llava(args) -> dict:
    """Ours (processor + engine) against transformers (LlavaProcessor + generate)."""
    import transformers

    from visto.data.sample import Sample, Turn
    from visto.infer import SamplingParams

    pair = build_llava(args)
    against = build_against(pair, args.against) if args.against else None
    model, hf, hf_processor = pair["model"], pair["hf"], pair["hf_processor"]
    image, engine = pair["image"], pair["engine"]
    tokenizer, config = pair["tokenizer"], pair["config"]
    print(f"uptime: {os.popen('uptime').read().strip()}")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, threads "
        f"{torch.get_num_threads()}, LLaVA preset {args.preset}: "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
        f"{config.image_tokens} visual tokens, image processor "
        f"{type(hf_processor.image_processor).__name__}, new tokens {args.new_tokens}, "
        f"median of {args.repeats}" + (f"; against the visto of {args.against}" if against else "")
    )
    print(HEADER)
    N = args.new_tokens
    results = {}
    for B in args.batches:
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(B)]
        images = [image] * B
        if args.distinct_images:
            images = [image.point(lambda v, i=i: (v + 37 * i) % 256) for i in range(B)]

        def run_ours(n: int, questions=questions, images=images) -> list[list[int]]:
            samples = [Sample("q", [im], [Turn("user", "<image>\n" + q)])
                       for q, im in zip(questions, images, strict=True)]  # fmt: skip
            done = engine.generate_batch(model.prompt_batch(samples), SamplingParams(max_new_tokens=n))
            return [c.token_ids for c in done]

        def run_hf(n: int, questions=questions, images=images) -> list[list[int]]:
            texts = [
                hf_processor.apply_chat_template(
                    [{"role": "user", "content": "<image>\n" + q}],
                    add_generation_prompt=True, tokenize=False,
                )
                for q in questions
            ]  # fmt: skip
            inputs = hf_processor(
                text=texts, images=images, padding=True, return_tensors="pt"
            )
            with torch.no_grad():
                out = hf.generate(
                    **inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    pad_token_id=tokenizer.pad_id, eos_token_id=None,
                )  # fmt: skip
            return out[:, inputs["input_ids"].shape[1] :].tolist()

        sides = [("visto", run_ours), ("transformers", run_hf)]
        if against is not None:

            def run_against(n: int, questions=questions, images=images, a=against) -> list[list[int]]:
                samples = [a["Sample"]("q", [im], [a["Turn"]("user", "<image>\n" + q)])
                           for q, im in zip(questions, images, strict=True)]  # fmt: skip
                done = a["engine"].generate_batch(a["model"].prompt_batch(samples),
                                                  a["SamplingParams"](max_new_tokens=n))  # fmt: skip
                return [c.token_ids for c in done]

            sides.insert(1, ("against", run_against))
            check_same(run_ours(N), run_against(N))
        check_same(run_ours(N), run_hf(N))
        fns = {}
        for side, fn in sides:
            fns[(side, 1)] = lambda fn=fn: fn(1)
            fns[(side, N)] = lambda fn=fn: fn(N)
        # With --against the two visto trees swap places every other turn (each runs after
        # transformers as often as after the other tree: what ran just before warms or evicts
        # a call's code and data), transformers last in each turn as in the two-sided runs.
        swapped = [("against", 1), ("against", N), ("visto", 1), ("visto", N),
                   ("transformers", 1), ("transformers", N)]  # fmt: skip
        orders = [list(fns), swapped] if against is not None else None
        wall, cpu = interleaved_medians(fns, args.repeats, orders)
        results[str(B)] = report(B, N, wall, cpu, ("visto", "transformers"))
        if against is not None:
            results[str(B)]["against"] = report(B, N, wall, cpu, ("against", "transformers"),
                                                rows=("against",))  # fmt: skip
            results[str(B)]["vs_against"] = report(B, N, wall, cpu, ("visto", "against"),
                                                    rows=(), label="this/against")  # fmt: skip
    print(f"uptime: {os.popen('uptime').read().strip()}")
    return results


def check_same(ours: list[list[int]], theirs: list[list[int]]) -> None:
    if ours == theirs:
        return
    for row, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a != b:
            step = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
            print(f"row {row} differs from step {step}: ours {a[step:][:5]} hf {b[step:][:5]}")
    raise SystemExit("greedy tokens differ between visto and transformers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["llava", "decoder"], default="llava")
    parser.add_argument("--preset", choices=["tiny", "small"], default="small", help="llava size")
    parser.add_argument("--vocab", type=int, default=None, help="default 1024 llava, 2048 decoder")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distinct-images", action="store_true",
                        help="llava: a different image in every row (nothing shared)")  # fmt: skip
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    parser.add_argument("--against", default=None, metavar="SRC",
                        help="llava: also time the visto package of this source tree (its src "
                             "directory), in turns in this process")  # fmt: skip
    args = parser.parse_args()
    if args.against and args.family != "llava":
        parser.error("--against compares LLaVA pipelines (--family llava)")

    if args.threads:
        torch.set_num_threads(args.threads)
    args.vocab = args.vocab or (1024 if args.family == "llava" else 2048)
    load_before = load_average()
    results = bench_llava(args) if args.family == "llava" else bench_decoder(args)
    if args.json:
        from visto.utils.io import atomic_write_json

        atomic_write_json(args.json, {
            "family": args.family, "threads": torch.get_num_threads(), "repeats": args.repeats,
            "new_tokens": args.new_tokens, "load": [load_before, load_average()], "batch": results,
            "distinct_images": args.distinct_images, "against": args.against,
        })  # fmt: skip
        print(f"wrote {args.json}")


def bench_decoder(args) -> dict:
    import transformers

    from visto.infer import Engine, PromptBatch, SamplingParams
    from visto.nn.language import DecoderLM

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    hf_config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = DecoderLM.from_pretrained(tmp)
    hf.to(device)
    ours.to(device)

    class IdsAsText:  # random weights have no vocabulary: text is the ids, space-separated
        def encode(self, text: str) -> list[int]:
            return [int(t) for t in text.split()]

        def decode(self, ids: list[int]) -> str:
            return " ".join(map(str, ids))

    engine = Engine(ours, IdsAsText(), eos_token_ids=[], pad_id=0, device=device)
    print(f"uptime: {os.popen('uptime').read().strip()}")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}, "
        f"threads {torch.get_num_threads()}, model {sum(p.numel() for p in ours.parameters()) / 1e6:.2f}M "
        f"params (hidden {args.hidden}, layers {args.layers}, vocab {args.vocab}), "
        f"prompt {args.prompt_len}, new tokens {args.new_tokens}, median of {args.repeats}"
    )
    gen = torch.Generator().manual_seed(args.seed + 1)
    print(HEADER)
    results = {}
    for B in args.batches:
        # Batch 8 mixes lengths: row i has prompt_len - 3 * i tokens (left-padded).
        lengths = [max(1, args.prompt_len - 3 * i) for i in range(B)]
        prompts = [torch.randint(1, args.vocab, (n,), generator=gen).tolist() for n in lengths]
        batch = PromptBatch.left_padded(prompts, pad_id=0, device=device)
        N = args.new_tokens

        def run_ours(n: int, batch=batch):
            return engine.generate_batch(batch, SamplingParams(max_new_tokens=n))

        def run_hf(n: int, batch=batch):
            with torch.no_grad():
                return hf.generate(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                    eos_token_id=None,
                )

        ours_tokens = [c.token_ids for c in run_ours(N)]
        check_same(ours_tokens, run_hf(N)[:, batch.input_ids.shape[1] :].tolist())
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        fns = {}
        for side, fn in (("visto", run_ours), ("transformers", run_hf)):
            fns[(side, 1)] = lambda fn=fn, sync=sync: (fn(1), sync())
            fns[(side, N)] = lambda fn=fn, sync=sync, N=N: (fn(N), sync())
        wall, cpu = interleaved_medians(fns, args.repeats)
        results[str(B)] = report(B, N, wall, cpu, ("visto", "transformers"))
    print(f"uptime: {os.popen('uptime').read().strip()}")
    return results


if __name__ == "__main__":
    main()
