"""Test-wide settings.

Under `pytest -n 2` two workers share our two cores: one torch thread each avoids
oversubscription, which made the suite ~10x slower on a loaded machine.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
