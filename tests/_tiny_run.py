"""The tiny byte-level run (LM + SAE + eval + dashboard) that the CLI, sweep, compare and distributed tests share:
its arguments and the module-scoped fixture that runs it (conftest.py makes `tiny_run` visible to every test)."""

from pathlib import Path

import pytest

from sae_stream.cli import main

# A byte-level model small enough that LM + SAE + eval + dashboard take seconds on 2 cores.
TINY = [
    "--data.tokenizer=byte", "--data.context_len=32", "--lm.vocab_size=320", "--lm.d_model=32", "--lm.n_heads=2",
    "--lm.d_mlp=64", "--lm.n_ctx=32", "--lm_train.lr=0.01", "--lm_train.tokens=200000", "--lm_train.batch_size=16",
    "--lm_train.eval_every=200", "--lm_train.eval_tokens=2048", "--lm_train.warmup_steps=5",
    "--buffer.capacity=4096", "--buffer.lm_batch_size=16", "--sae.d_sae=128", "--sae.l1_coeff=0.0003",
    "--train.total_tokens=40960", "--train.batch_size=512", "--train.log_every=10", "--train.checkpoint_every=40",
    "--train.density_window_tokens=20000", "--resample.at_steps=[30]", "--resample.pool_size=2048",
    "--resample.dead_window=20", "--eval.tokens=2048", "--analysis.tokens=2048", "--analysis.features=8",
    "--analysis.top_k=4",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["run", "--out", str(out), *TINY]) == 0
    return out
