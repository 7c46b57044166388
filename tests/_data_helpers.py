"""Shared by test_data.py and test_data_resume.py: a byte-tokenizer DataConfig, taking n contexts, and the
`txt_dir` fixture (made visible to every test by conftest.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from sae_stream.config import DataConfig


def byte_cfg(**kw) -> DataConfig:
    return DataConfig(**{"tokenizer": "byte", "context_len": 64, "loop": False, "shuffle_buffer": 8, **kw})


def take(contexts, n: int) -> list[torch.Tensor]:
    return list(itertools.islice(contexts, n))


@pytest.fixture
def txt_dir(tmp_path):
    """60 small .txt documents with distinct text (one document per file)."""
    root = tmp_path / "txt"
    (root / "sub").mkdir(parents=True)
    for i in range(60):
        folder = root / "sub" if i % 3 else root
        (folder / f"doc{i:02d}.txt").write_text(f"Document {i}. " + "word " * (5 + i % 17) + "end.")
    return root
