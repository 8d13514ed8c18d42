"""`visto compare` with extra overrides on one family's recipe, for measuring a lever before it
goes into the shipped `compare-<family>` recipe (bench/README.md, "BLIP-2 in compare").

    python bench/compare_with.py --recipe-set blip2 optim.lr=0.004 -- \\
        --families blip2 --out runs/b15/lr4 --threads 1 --eval-images 100 --tasks vqa

Everything after `--` is `visto compare`'s own arguments; the run is compare's code path (world,
shared tower, training, `visto eval` with the blind twin), except that `load_recipe` of
`compare-<family>` also applies the given `key=value` overrides (as `visto train --set`).
To reuse a vision stage, copy OUT/world and OUT/vision from an earlier run with the same
--n/--seed/--vision-steps into the new OUT first (the stages are skipped when their stamps match).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: compare_with.py --recipe-set FAMILY KEY=VALUE ... -- <visto compare args>")
    cut = argv.index("--")
    ours, theirs = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe-set", nargs="+", action="append", default=[],
                        metavar=("FAMILY", "KEY=VALUE"))  # fmt: skip
    args = parser.parse_args(ours)
    extra: dict[str, list[str]] = {}
    for family, *overrides in args.recipe_set:
        extra.setdefault(f"compare-{family}", []).extend(overrides)

    import visto.train.recipe as recipe_module

    original = recipe_module.load_recipe

    def load_recipe(name_or_path: str, overrides: list[str] | None = None):
        more = extra.get(str(name_or_path), [])
        if more:
            print(f"compare_with: {name_or_path} + {more}", flush=True)
        return original(name_or_path, [*(overrides or []), *more])

    recipe_module.load_recipe = load_recipe
    from visto.cli import main as visto_main

    return visto_main(["compare", *theirs])


if __name__ == "__main__":
    raise SystemExit(main())
