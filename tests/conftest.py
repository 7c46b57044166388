"""Tests run offline and CPU-sized: no hub downloads, no wandb, fixed seeds."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SAE_STREAM_TRITON_AUTOTUNE", "0")  # GPU tests: one config per dtype, no minutes of tuning

# fixtures shared by several test modules, made visible to all (imported once the environment above is set)
from tests._data_helpers import hf_tokenizer, txt_dir  # noqa: E402, F401
from tests._tiny_run import tiny_run  # noqa: E402, F401


@pytest.fixture
def one_thread():
    """Tiny tensors: extra threads only add contention on a shared 2-core machine (and one thread is bit-stable)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
