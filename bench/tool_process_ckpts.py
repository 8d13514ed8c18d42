"""The checkpoints: the tests' tiny clipseg, and one of the clipseg-synth recipe's size."""
import json
import sys
from pathlib import Path

sys.path.insert(0, "tests")  # run from the repository root

from test_serve_support import corpus, make_clipseg_checkpoint  # noqa: E402
from test_tool_process import scene  # noqa: E402
from visto.checkpoint import save_checkpoint  # noqa: E402
from visto.config import from_dict  # noqa: E402
from visto.data.processor import Processor, ProcessorConfig  # noqa: E402
from visto.data.tokenizer import train_tokenizer  # noqa: E402
from visto.models import build_model  # noqa: E402
from visto.models.clip import CLIPConfig  # noqa: E402
from visto.models.clipseg import CLIPSegConfig  # noqa: E402

out = Path(sys.argv[1])
make_clipseg_checkpoint(out / "tiny" / "checkpoint", scene())
clip = from_dict(CLIPConfig, json.load(open("src/visto/train/recipes/clip-synth.json"))["model"]["config"])
heads = json.load(open("src/visto/train/recipes/clipseg-synth.json"))["model"]["config"]
config = CLIPSegConfig(clip=clip, **{k: v for k, v in heads.items() if k != "clip_init"})
model = build_model("clipseg", config, seed=0).eval()
model.processor = Processor(ProcessorConfig(image_size=128, resize_mode="resize", vocab_size=1024),
                            train_tokenizer(corpus(), 1024, min_frequency=1))
save_checkpoint(model, out / "recipe" / "checkpoint")
print(sum(p.numel() for p in model.parameters()))
