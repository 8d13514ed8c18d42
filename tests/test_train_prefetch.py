"""Training data read ahead in a worker process (`visto.train.data.PrefetchedBatches`,
recipe `data.prefetch`): the same batches as the stream read in the training process, from a
real format on disk through a real processor; the same position for checkpoints; the same
training run; errors as the stream raises them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from test_serve_support import make_llava_checkpoint
from test_train import read_rows, tiny_recipe
from test_train_fixture import tiny_family, tiny_source  # noqa: F401
from visto.data.formats import read_samples, write_samples
from visto.data.sample import Sample, Turn
from visto.errors import UserError
from visto.train.data import BatchStream, PrefetchedBatches
from visto.train.loop import train
from visto.train.recipe import recipe_from_dict


@pytest.fixture(scope="module")
def parquet_source(tmp_path_factory):
    """(source, collate): 7 LLaVA conversations about PNG images in a parquet file on disk,
    decoded by the reader and transformed by a tiny LLaVA's processor."""
    import visto

    root = tmp_path_factory.mktemp("prefetch")
    rng = np.random.default_rng(0)
    samples = [
        Sample(f"s{i}", [Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8))],
               [Turn("user", "<image>\nWhat colour is the circle?"), Turn("assistant", "red " * (1 + i % 3))])
        for i in range(7)
    ]  # fmt: skip
    write_samples(samples, root / "data", "parquet")
    model = visto.load(make_llava_checkpoint(root / "tiny"))
    return (lambda role: read_samples(root / "data", "parquet")), model.collate


def stream(source, collate, state=None) -> BatchStream:
    return BatchStream(source, "train", collate, 3, seed=5, shuffle_buffer=4, state=state)


def assert_same_batch(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_prefetched_batches_are_the_streams_and_resume_from_the_last_one_handed_out(parquet_source):
    source, collate = parquet_source
    inline, ahead = stream(source, collate), PrefetchedBatches(stream(source, collate), prefetch=2)
    rng_before = torch.get_rng_state()
    try:
        for _ in range(6):  # 18 samples: across two epoch boundaries of 7
            assert_same_batch(next(ahead), next(inline))
            # The position of the batch handed out, though the worker has read further.
            assert ahead.state() == inline.state()
        assert inline.state()["epoch"] == 2
        # The worker's seed comes from its own generator: the training run's RNG is untouched.
        assert torch.equal(torch.get_rng_state(), rng_before)
        resumed = PrefetchedBatches(stream(source, collate, state=ahead.state()), prefetch=3)
        for _ in range(3):
            assert_same_batch(next(resumed), next(inline))
        resumed.close()
    finally:
        ahead.close()
    with pytest.raises(AssertionError, match="closed"):
        next(ahead)


def test_an_error_in_the_worker_is_the_streams_error(parquet_source):
    _, collate = parquet_source
    empty = PrefetchedBatches(stream(lambda role: iter([]), collate), prefetch=2)
    with pytest.raises(UserError) as error:
        next(empty)
    assert str(error.value) == "split 'train' has no samples"  # the message, no traceback
    empty.close()


def test_a_run_with_prefetch_trains_as_one_without(tmp_path, tiny_family):  # noqa: F811
    curves = {}
    for prefetch in (0, 2):
        recipe = tiny_recipe(max_steps=6, eval_every=3, **{"data.prefetch": prefetch})
        train(recipe, tmp_path / str(prefetch), source=tiny_source(n_train=20), show_progress=False)
        curves[prefetch] = [{k: v for k, v in r.items() if k not in ("samples_per_s", "elapsed_s")}
                            for r in read_rows(tmp_path / str(prefetch))]  # fmt: skip
    assert curves[0] == curves[2] and len(curves[0]) > 6


def test_prefetch_must_not_be_negative():
    with pytest.raises(UserError, match="data.prefetch"):
        recipe_from_dict({"model": {"family": "tiny"}, "data": {"source": "x", "prefetch": -1}})
    assert json.loads(json.dumps(recipe_from_dict({"model": {"family": "tiny"}}).data.prefetch)) == 2
