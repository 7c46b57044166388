"""Token batches read ahead by a child process (prefetch.py) and tokenized by threads (records.StreamSource): the
same batches, states and resumes as the inline reader, errors raised in the parent, and a child that outlives
neither its parent nor a stop."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_stream import trainer as trainer_module
from sae_stream.cli import main
from sae_stream.config import DataConfig, default_config_path
from sae_stream.corpus import embedded_documents
from sae_stream.data import ContextBatches, TokenContexts
from sae_stream.prefetch import PrefetchedBatches, training_batches
from sae_stream.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 documents of Python's docs as a .jsonl (a streamed source: shuffled, hash-split, tokenized)."""
    path = tmp_path_factory.mktemp("prefetch") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in embedded_documents()[:300]))
    return path


def _cfg(path: Path, **kw: object) -> DataConfig:
    return DataConfig(**{"source": str(path), "tokenizer": "byte", "context_len": 64, "shuffle_buffer": 16,
                         "heldout_fraction": 0.1, "seed": 3, **kw})


def _take(batches: object, n: int) -> list[torch.Tensor]:
    return list(itertools.islice(iter(batches), n))


def test_tokenizer__encode_array_is_encode() -> None:
    texts = ["Hello world", "a <|endoftext|> inside", "", "naïve ünïcode ✓ \n\n  spaces"]
    for name in ("gpt2", "byte"):
        tok = get_tokenizer(name)
        for text in texts:
            assert tok.encode_array(text).tolist() == tok.encode(text), (name, text)


def test_stream_source__tokenizer_threads_give_the_same_contexts_and_states(texts: Path) -> None:
    cfg = _cfg(texts, tokenizer="gpt2", context_len=256)
    per_epoch = sum(1 for _ in TokenContexts(dataclasses.replace(cfg, loop=False)))
    one = TokenContexts(dataclasses.replace(cfg, tokenizer_threads=1))
    three = TokenContexts(dataclasses.replace(cfg, tokenizer_threads=3))
    assert three._source.threads == 3
    for _ in range(per_epoch // 97 + 2):  # into the second epoch
        a, b = _take(one, 97), _take(three, 97)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        assert _same_state(one.state_dict(), three.state_dict())
    assert one.epoch == three.epoch == 1


def test_prefetched_batches__same_batches_states_and_resumes_as_inline(texts: Path) -> None:
    cfg = _cfg(texts, context_len=128)
    per_epoch = sum(1 for _ in ContextBatches(TokenContexts(dataclasses.replace(cfg, loop=False)), 16))
    inline, ahead = ContextBatches(TokenContexts(cfg), 16), PrefetchedBatches(cfg, 16, depth=3)
    try:
        a, b = iter(inline), iter(ahead)
        states, told = [], []
        for k in range(per_epoch + 20):  # into the second epoch: its start is told, at the same batch
            if k % 29 == 0:
                states.append((k, inline.state_dict(), ahead.state_dict()))
            (x, wx), (y, wy) = _next_warned(a), _next_warned(b)
            assert torch.equal(x, y) and wx == wy, k
            told += wx
        assert len(told) == 1 and "exhausted" in told[0]
        for k, s_inline, s_ahead in states:
            assert _same_state(s_inline, s_ahead), k
        # either reader goes on from the other's state; a load on a running reader restarts it there
        k, s_inline, s_ahead = states[2]
        inline2 = ContextBatches(TokenContexts(cfg), 16)
        inline2.load_state_dict(s_ahead)
        ahead.load_state_dict(s_inline)
        want = _take(inline2, 12)
        assert all(torch.equal(x, y) for x, y in zip(_take(ahead, 12), want, strict=True))
        assert _same_state(inline2.state_dict(), ahead.state_dict())
    finally:
        ahead.close()
    assert not ahead._proc.is_alive()


def _next_warned(it: object) -> tuple[torch.Tensor, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = next(it)
    return x, [str(w.message) for w in caught]


def _same_state(a: dict, b: dict) -> bool:
    def same(x: object, y: object) -> bool:
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(same(i, j) for i, j in zip(x, y))
        return x == y
    return same(a, b)


def test_prefetched_batches__errors_are_the_inline_ones_and_a_finite_stream_ends(texts: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    with pytest.raises(ValueError) as inline_error:
        TokenContexts(_cfg(empty))
    with pytest.raises(ValueError) as child_error:
        PrefetchedBatches(_cfg(empty), 8, depth=2)
    assert str(child_error.value) == str(inline_error.value)

    other_seed = TokenContexts(_cfg(texts, seed=4)).state_dict()
    ahead = PrefetchedBatches(_cfg(texts, loop=False), 8, depth=2)
    try:
        with pytest.raises(ValueError, match="seed=4.*resume with the same data settings"):
            ahead.load_state_dict(other_seed)
        n_inline = sum(1 for _ in ContextBatches(TokenContexts(_cfg(texts, loop=False)), 8))
        with pytest.warns(UserWarning, match="stream stops here"):
            assert sum(1 for _ in ahead) == n_inline > 0
    finally:
        ahead.close()


def test_prefetched_batches__child_ignores_group_signals_and_its_death_is_an_error(texts: Path) -> None:
    ahead = PrefetchedBatches(_cfg(texts), 8, depth=2)
    try:
        it = iter(ahead)
        first = next(it)
        for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C / a scheduler's stop reach the whole group
            os.kill(ahead._proc.pid, sig)
        time.sleep(0.3)
        assert ahead._proc.is_alive()
        assert ahead.state_dict()["contexts"] == len(first)  # still answering for the checkpoint
        ahead._proc.kill()
        ahead._proc.join()
        with pytest.raises(RuntimeError, match=r"the data process \(pid \d+\) ended with exit code -9"):
            for _ in range(10):  # (what was queued before the kill may still come)
                next(it)
    finally:
        ahead.close()


ORPHAN = """
import sys, time
from sae_stream.config import DataConfig
from sae_stream.prefetch import PrefetchedBatches
if __name__ == "__main__":
    ahead = PrefetchedBatches(DataConfig(source=sys.argv[1], tokenizer="byte", context_len=64), 4, depth=2)
    next(iter(ahead))
    print(ahead._proc.pid, flush=True)
    time.sleep(60)
"""


def test_prefetched_batches__child_exits_when_its_parent_is_killed(texts: Path, tmp_path: Path) -> None:
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN)
    parent = subprocess.Popen([sys.executable, str(script), str(texts)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        parent.kill()  # no atexit, no close(): the child finds itself orphaned
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child)
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie waits only for init to reap it
    except FileNotFoundError:
        return False


def test_training_batches__inline_on_cpu_prefetched_when_asked(texts: Path) -> None:
    cpu = torch.device("cpu")
    assert isinstance(training_batches(_cfg(texts), 8, cpu), ContextBatches)
    ahead = training_batches(dataclasses.replace(_cfg(texts), prefetch=2), 8, cpu)
    try:
        assert isinstance(ahead, PrefetchedBatches) and ahead.depth == 2
    finally:
        ahead.close()


LM_ARGS = ["--data.tokenizer=byte", "--data.context_len=32", "--lm.vocab_size=320", "--lm.d_model=32",
           "--lm.n_heads=2", "--lm.d_mlp=64", "--lm.n_ctx=32", "--lm_train.tokens=8192", "--lm_train.batch_size=16",
           "--lm_train.eval_every=100", "--lm_train.eval_tokens=1024", "--lm_train.checkpoint_every=4"]
SAE_ARGS = ["--data.tokenizer=byte", "--data.context_len=32", "--buffer.capacity=2048", "--buffer.lm_batch_size=16",
            "--sae.d_sae=64", "--train.batch_size=256", "--train.total_tokens=15360", "--train.log_every=10",
            "--train.checkpoint_every=10", "--train.density_window_tokens=4000", "--resample.at_steps=[30]",
            "--resample.pool_size=1024", "--resample.dead_window=10"]


class _Crash(Exception):
    pass


def test_train__prefetched_stream_trains_and_resumes_as_the_inline_one(texts: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       one_thread: None) -> None:
    """The LM and the SAE on a .jsonl read ahead by a child process: the same weights as read inline, and a run
    that crashed mid-way resumes (its data state asked from the child at each checkpoint) to the same bits."""
    source = [f"--data.source={texts}"]
    lms = {}
    for depth in (0, 3):
        lms[depth] = tmp_path / f"lm{depth}"
        assert main(["lm", "train", str(default_config_path()), "--out", str(lms[depth]), *LM_ARGS, *source,
                     f"--data.prefetch={depth}"]) == 0
    assert _same_files(lms[0] / "model.safetensors", lms[3] / "model.safetensors")

    ref, run = tmp_path / "inline", tmp_path / "ahead"
    assert main(["train", "--lm", str(lms[0]), "--out", str(ref), *SAE_ARGS, *source, "--data.prefetch=0"]) == 0
    step = trainer_module.Trainer._train_step

    def crash_at_35(self, x):  # past the checkpoints of steps 10, 20, 30 and the resampling at 30
        if self.step == 35:
            raise _Crash
        return step(self, x)

    monkeypatch.setattr(trainer_module.Trainer, "_train_step", crash_at_35)
    args = ["train", "--lm", str(lms[0]), "--out", str(run), *SAE_ARGS, *source, "--data.prefetch=3"]
    with pytest.raises(_Crash):
        main(args)
    monkeypatch.setattr(trainer_module.Trainer, "_train_step", step)
    assert main(["train", "--resume", str(run)]) == 0
    for name in ("sae_weights.safetensors", "sparsity.safetensors"):
        assert _same_files(run / "sae" / name, ref / "sae" / name), name


def _same_files(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_prefetched_batches__closing_while_the_child_tokenizes_prints_nothing(texts: Path, capfd) -> None:
    """A run's end closes its reader while the child's thread may be tokenizing on its pool: the child must go
    quietly (a 'cannot schedule new futures after interpreter shutdown' traceback on the user's terminal before)."""
    for _ in range(2):  # (a deep queue, barely read: the child is still tokenizing when told to stop)
        ahead = PrefetchedBatches(_cfg(texts, tokenizer="gpt2", tokenizer_threads=2, context_len=256), 8, depth=64)
        _take(ahead, 1)
        ahead.close()
    assert "Traceback" not in capfd.readouterr().err
