"""Interrupted training resumes exactly: SIGTERM / SIGINT / SIGKILL / a torn checkpoint, then `train --resume`
must end on the same bits as one uninterrupted run.

Determinism: the checkpoint carries the SAE, Adam, step, trainer metrics/firing state, the resampling
generator, torch's global RNG and the buffer (ring, unread order, its RNG, the activation and text stream
positions); nothing else is needed on CPU. Threads: at these sizes 1 (subprocesses, OMP_NUM_THREADS=1) and 2
(this process) intra-op threads gave the same bits; all runs are pinned to 1 anyway, since a BLAS may split a
reduction by thread count at larger sizes. The signal-receiving runs are subprocesses through the real CLI; the
others run the same CLI `main` in-process, which spares a ~5 s import per run. (Checkpoint files and the background
checkpoint writer: test_checkpoint_writer.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_stream.cli import main
from sae_stream.config import config_from_dict, default_config_path
from sae_stream.process import TrainingInterrupted
from sae_stream.trainer import Trainer
from tests._reliability_helpers import _batches_raising, _NullLog, _steps

LM_ARGS = [
    "--data.tokenizer=byte", "--data.context_len=32", "--lm.vocab_size=320", "--lm.d_model=32", "--lm.n_heads=2",
    "--lm.d_mlp=64", "--lm.n_ctx=32", "--lm_train.lr=0.01", "--lm_train.tokens=20000", "--lm_train.batch_size=16",
    "--lm_train.eval_every=200", "--lm_train.eval_tokens=2048", "--lm_train.warmup_steps=5",
]


# 120 steps; every 10th checkpointed (3 kept, so a torn newest one leaves good ones); the ring (4096 rows) refills
# every ~16 steps; resampling at step 60 draws a pool from the buffer and uses the trainer's generator.
SAE_ARGS = [
    "--data.tokenizer=byte", "--data.context_len=32", "--buffer.capacity=4096", "--buffer.lm_batch_size=16",
    "--sae.d_sae=128", "--sae.l1_coeff=0.0003", "--train.batch_size=256", "--train.total_tokens=30720",
    "--train.log_every=10", "--train.checkpoint_every=10", "--train.keep_checkpoints=3",
    "--train.density_window_tokens=5000", "--resample.at_steps=[60]", "--resample.pool_size=2048",
    "--resample.dead_window=20",
]


TOTAL_STEPS = 30720 // 256


# The real CLI, held before step HOLD_AT+1 while the file GATE exists (it writes GATE.held when it gets there),
# so the parent lands its signal at a known step instead of racing a fast run with sleeps. Under torchrun rank 0
# holds (the others wait in the gradient all-reduce), and each rank writes its pid (GATE.rankR.pid): torchrun
# starts its workers in sessions of their own, beyond a kill of the launcher's process group.
GATED_CLI = """
import os, sys, time
from pathlib import Path
from sae_stream import trainer
gate, hold_at, step = Path(os.environ["GATE"]), int(os.environ["HOLD_AT"]), trainer.Trainer._train_step
rank = os.environ.get("RANK", "0")
Path(str(gate) + f".rank{rank}.pid").write_text(str(os.getpid()))
def gated(self, x):
    if self.step == hold_at and gate.exists():
        self.writer.wait()  # checkpoints are written in the background: the held run's are all on disk
        Path(str(gate) + (".held" if rank == "0" else f".rank{rank}.held")).touch()
        while gate.exists():
            time.sleep(0.005)
    return step(self, x)
trainer.Trainer._train_step = gated
from sae_stream.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rel") / "lm"
    assert main(["lm", "train", str(default_config_path()), "--out", str(out), *LM_ARGS]) == 0
    return out


def _start(lm: Path, run: Path, hold_at: int) -> subprocess.Popen:
    gate = run.with_suffix(".gate")
    gate.touch()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GATE": str(gate), "HOLD_AT": str(hold_at)}
    return subprocess.Popen([sys.executable, "-c", GATED_CLI, "train", "--lm", str(lm), "--out", str(run), *SAE_ARGS],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_until_held(proc: subprocess.Popen, run: Path, timeout: float = 120.0) -> None:
    """Poll for the gate's marker (the run sits before step HOLD_AT+1, its checkpoints up to there written)."""
    held = Path(str(run.with_suffix(".gate")) + ".held")
    deadline = time.monotonic() + timeout
    while not held.is_file():
        assert proc.poll() is None, f"run ended before its hold: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"{run} not held after {timeout}s"
        time.sleep(0.005)


def _assert_same_sae(run: Path, reference: Path) -> None:
    for name in ("sae_weights.safetensors", "sparsity.safetensors"):
        got, want = load_file(run / "sae" / name), load_file(reference / "sae" / name)
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}:{key} differs from the uninterrupted run"


def test_train__interrupted_runs_resume_bit_identical(lm_dir: Path, tmp_path: Path, one_thread: None) -> None:
    term_run, kill_run = tmp_path / "term", tmp_path / "kill"
    term, kill = _start(lm_dir, term_run, 35), _start(lm_dir, kill_run, 55)  # both start while run A trains
    try:
        ref = tmp_path / "A"
        assert main(["train", "--lm", str(lm_dir), "--out", str(ref), *SAE_ARGS]) == 0
        assert _steps(ref)[-1] == TOTAL_STEPS

        # (a) SIGTERM mid-run: the step in flight finishes, is checkpointed, exit 143 with the resume command
        _wait_until_held(term, term_run)
        term.send_signal(signal.SIGTERM)  # lands before step 36 runs
        term_run.with_suffix(".gate").unlink()
        _, err = term.communicate(timeout=60)
        assert term.returncode == 143, err[-2000:]
        msg = err.strip().splitlines()[-1]
        assert f"sae-stream train --resume {term_run}" in msg and "SIGTERM at step" in msg
        stopped = int(msg.split("SIGTERM at step ")[1].split(",")[0])
        assert stopped == 36 and _steps(term_run) == [20, 30, 36]
        assert not (term_run / "sae").exists()  # no export of a half-trained SAE

        # (b) SIGKILL at an arbitrary point once checkpoints exist: resume from the newest valid one
        _wait_until_held(kill, kill_run)
        kill.kill()  # 5 steps past the newest checkpoint
        kill.communicate(timeout=60)
        assert kill.returncode == -signal.SIGKILL
        assert _steps(kill_run) == [30, 40, 50]
        torn = tmp_path / "torn"
        shutil.copytree(kill_run, torn)
    finally:
        for proc in (term, kill):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()

    assert main(["train", "--resume", str(term_run)]) == 0
    _assert_same_sae(term_run, ref)
    assert not (term_run / "eval.json").exists()  # a `train` run: its resume trains, as `train` did, no more
    assert main(["train", "--resume", str(kill_run)]) == 0
    _assert_same_sae(kill_run, ref)

    # (c) killed while writing a checkpoint: the newest one is torn and a staging dir is left behind
    newest = torn / "checkpoints" / f"step_{_steps(torn)[-1]:08d}"
    with open(newest / "state.pt", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    (torn / "checkpoints" / f".step_{_steps(torn)[-1] + 10:08d}.partial").mkdir()
    stray = torn / "checkpoints" / "step_00009990"  # a torn one past the run's end: an abandoned history
    shutil.copytree(newest, stray)
    with pytest.warns(UserWarning, match="falling back to the previous checkpoint"):
        assert main(["train", "--resume", str(torn)]) == 0
    _assert_same_sae(torn, ref)
    assert not list((torn / "checkpoints").glob(".*.partial"))  # the killed write's staging dir is cleared
    assert not stray.exists()  # removed by the resume: it could not win a later one
    # step 50 was logged before the kill and again after resuming from 40: the log keeps it once, as in run A
    for run in (kill_run, torn):
        assert _logged(run) == _logged(ref)


def _logged(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["mse"]) for r in rows]


# ---------------------------------------------------------------------------------------------- in-process signals


def _tiny_trainer(tmp_path: Path) -> Trainer:
    from sae_stream.sae import build_sae

    cfg = config_from_dict({"sae": {"d_sae": 16, "architecture": "anthropic"},
                            "train": {"total_tokens": 64 * 20, "batch_size": 64, "log_every": 5,
                                      "checkpoint_every": 5},
                            "resample": {"enabled": False}})
    return Trainer(build_sae(cfg.sae, 8, seed=0), cfg, tmp_path, _NullLog())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_trainer__signal_stops_after_step_with_checkpoint(tmp_path: Path, signum: int) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    trainer = _tiny_trainer(tmp_path)
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit(_batches_raising(signum, at=7))
    assert (info.value.signum, info.value.step, info.value.exit_code) == (signum, 8, 128 + signum)
    assert _steps(tmp_path) == [5, 8]  # the regular one and the one at the interrupted step
    assert {s: signal.getsignal(s) for s in before} == before  # the previous handlers are back
    again = _tiny_trainer(tmp_path)
    again.resume(tmp_path)
    assert again.step == 8 and all(torch.equal(a, b) for a, b in zip(again.sae.parameters(),
                                                                        trainer.sae.parameters()))


def test_trainer__signal_on_checkpoint_step_saves_once(tmp_path: Path) -> None:
    trainer = _tiny_trainer(tmp_path)
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit(_batches_raising(signal.SIGTERM, at=4))
    assert info.value.step == 5 and _steps(tmp_path) == [5]


def test_trainer__second_signal_aborts_at_once(tmp_path: Path) -> None:
    def twice() -> Iterator[torch.Tensor]:
        yield torch.randn(64, 8)
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)
        yield torch.randn(64, 8)

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    trainer = _tiny_trainer(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(twice())
    assert trainer.step == 1 and _steps(tmp_path) == []
    assert {s: signal.getsignal(s) for s in before} == before


def test_cli__sigint_exit_130_names_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    from sae_stream import pipeline

    def interrupted(*args: object, **kwargs: object) -> None:
        raise TrainingInterrupted(signal.SIGINT, 12, tmp_path)

    monkeypatch.setattr(pipeline, "train_resume", interrupted)
    assert main(["train", "--resume", str(tmp_path)]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"sae-stream train --resume {tmp_path}" in err and "SIGINT" in err


def test_run__sae_stage_sigint_exits_130_and_resumes(lm_dir: Path, tmp_path: Path, one_thread: None,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    step = Trainer._train_step

    def ctrl_c_before_step_16(self: Trainer, x_BD: torch.Tensor) -> bool:
        if self.step == 15:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C in the SAE stage of `run`
        return step(self, x_BD)

    monkeypatch.setattr(Trainer, "_train_step", ctrl_c_before_step_16)
    out = tmp_path / "run"
    assert main(["run", "--lm", str(lm_dir), "--out", str(out), *SAE_ARGS, "--eval.tokens=1024",
                 "--skip-analyze"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SIGINT at step 16" in err[0] and f"sae-stream train --resume {out}" in err[0]
    assert _steps(out) == [10, 16] and not (out / "eval.json").exists() and not (out / "sae").exists()
    monkeypatch.setattr(Trainer, "_train_step", step)
    assert main(["train", "--resume", str(out)]) == 0
    assert _steps(out)[-1] == TOTAL_STEPS and (out / "sae" / "sae_weights.safetensors").is_file()
    # `run` made it (job.json), with an LM of its own or not: the resume goes on to eval, and as --skip-analyze
    # asked, no dashboard
    assert (out / "eval.json").is_file() and not (out / "dashboard").exists()


# ---------------------------------------------------------------------------------------------- LM stage


def _ctrl_c_in_lm_step(monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    import lm.train as lm_train

    step, calls = lm_train._step, []

    def ctrl_c(*args, **kwargs):
        calls.append(None)
        if len(calls) == at:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C while the LM trains
        return step(*args, **kwargs)

    monkeypatch.setattr(lm_train, "_step", ctrl_c)


def test_lm_train__sigint_checkpoints_the_step_and_names_its_resume(tmp_path: Path, one_thread: None,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "lm"
    _ctrl_c_in_lm_step(monkeypatch, at=7)
    assert main(["lm", "train", str(default_config_path()), "--out", str(out), *LM_ARGS]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SIGINT at step 7" in err[-1], err
    assert f"sae-stream lm train {out / 'config.yaml'} --out {out} --resume" in err[-1]
    assert _steps(out) == [7] and not (out / "model.safetensors").exists()
    saved = (out / "config.yaml").read_text()
    monkeypatch.undo()
    # no CONFIG: the run's own, not the default (`lm train --resume DIR`, as `train --resume RUN_DIR`)
    assert main(["lm", "train", "--resume", str(out)]) == 0
    assert json.loads((out / "lm_result.json").read_text())["steps"] == 20000 // (16 * 32)
    assert (out / "config.yaml").read_text() == saved


def test_run__lm_stage_sigint_then_train_resume_finishes_the_whole_run(tmp_path: Path, one_thread: None,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """`run` stopped while its LM trains: `train --resume RUN` finishes the LM (the same weights as one
    uninterrupted `lm train`), trains the SAE from step 0, then evaluates and builds the dashboard as `run` would."""
    out = tmp_path / "run"
    _ctrl_c_in_lm_step(monkeypatch, at=10)
    args = ["run", "--out", str(out), *LM_ARGS, *SAE_ARGS, "--eval.tokens=1024", "--analysis.tokens=1024",
            "--analysis.features=4"]
    assert main(args) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SIGINT at step 10" in err[-1] and f"sae-stream train --resume {out}" in err[-1], err
    assert _steps(out / "lm") == [10] and not (out / "checkpoints").exists()
    monkeypatch.undo()
    assert main(["train", "--resume", str(out)]) == 0
    ref = tmp_path / "lm_ref"  # one uninterrupted `lm train`, on as many threads as this run
    assert main(["lm", "train", str(default_config_path()), "--out", str(ref), *LM_ARGS]) == 0
    got, want = load_file(out / "lm" / "model.safetensors"), load_file(ref / "model.safetensors")
    assert got.keys() == want.keys()
    for k in want:  # (as test_lm's resume test: equal up to fp32 rounding)
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    assert _steps(out)[-1] == TOTAL_STEPS
    for name in ("sae/sae_weights.safetensors", "eval.json", "dashboard/index.html"):
        assert (out / name).is_file(), name


def test_resolve_device__an_indexed_gpu_becomes_the_current_device_and_a_missing_one_is_an_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton launches on the current CUDA device: train.device=cuda:1 must make GPU 1 current (CUDA stubbed: two
    GPUs). cuda:2 on that machine is a one-line config error naming the GPUs there; plain `cuda` changes nothing."""
    from sae_stream.config import ConfigError
    from sae_stream.process import resolve_device

    current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and current == [torch.device("cuda", 1)]
    assert resolve_device("cuda") == torch.device("cuda") and len(current) == 1
    with pytest.raises(ConfigError, match=r"train.device='cuda:2' but this machine has 2 GPU\(s\): use cuda:0 to "
                                          r"cuda:1$"):
        resolve_device("cuda:2")
