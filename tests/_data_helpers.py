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


def make_hf_tokenizer(directory, vocab_size: int = 300, eos: str = "<|endoftext|>", truncate: int | None = None
                      ) -> str:
    """A small byte-level BPE tokenizer trained here (offline) and saved as a Hugging Face tokenizer directory;
    returns its `data.tokenizer` spec, 'hf:DIR'. End-of-text: `eos` ('<|endoftext|>' is id 0); `truncate` saves a
    truncation length in its tokenizer.json (as one saved after a truncating call)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|eot|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    words = ["the", "cat", "sat", "on", "a", "mat", "function", "returns", "list", "of", "strings", "value"]
    tok.train_from_iterator([" ".join(words[(i * 7 + j) % len(words)] for j in range(30)) for i in range(200)], trainer)
    if truncate is not None:
        tok.enable_truncation(truncate)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos).save_pretrained(str(directory))
    return f"hf:{directory}"


@pytest.fixture(scope="session")
def hf_tokenizer(tmp_path_factory) -> str:
    return make_hf_tokenizer(tmp_path_factory.mktemp("hf_tokenizer"))
