"""Sweeps: K SAEs fed by one stream train exactly as K separate runs on the same batches; the CLI's sweep run
directory, resume after an interrupt, per-SAE eval, and bad sweep configs."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_stream.cli import main
from sae_stream.config import ConfigError, config_from_dict
from sae_stream.sweep import SharedPool, fit_together
from sae_stream.trainer import Trainer
from tests._tiny_run import TINY, tiny_run  # noqa: F401 - the module fixture: a tiny trained LM
from tests._trainer_helpers import D_IN, ListLogger, _atoms, _cfg, _pool, sparse_batches

LAMBDAS = (0.01, 0.03, 0.1)


def _member(l1: float, steps: int = 40):
    cfg = _cfg("anthropic", steps=steps, sae__l1_coeff=l1, sae__d_sae=128, train__log_every=10,
               train__checkpoint_every=20, resample__enabled=True, resample__at_steps=[15, 30],
               resample__dead_window=2)
    from sae_stream.sae import build_sae

    sae = build_sae(cfg.sae, D_IN)
    with torch.no_grad():
        sae.b_enc_F[:8] = -1e4  # dead from the start: every member resamples
    return cfg, sae


def test_fit_together__three_saes_equal_three_separate_runs(tmp_path: Path, one_thread: None) -> None:
    atoms = _atoms()
    separate = []
    for i, l1 in enumerate(LAMBDAS):
        cfg, sae = _member(l1)
        log = ListLogger()
        Trainer(sae, cfg, tmp_path / f"separate{i}", log, pool_fn=_pool(atoms)).fit(sparse_batches(atoms))
        separate.append((sae, log.rows))

    draws: list[int] = []

    def counted_pool(n: int) -> torch.Tensor:
        draws.append(n)
        return _pool(atoms)(n)

    pool, streams, trainers = SharedPool(counted_pool), [], []
    for i, l1 in enumerate(LAMBDAS):
        cfg, sae = _member(l1)
        trainers.append(Trainer(sae, cfg, tmp_path / f"member{i}", ListLogger(), pool_fn=pool))
    finals = fit_together(trainers, sparse_batches(atoms), save_stream=streams.append, pool=pool)

    assert streams == [20, 40] and len(draws) == 2  # one stream checkpoint per step, one pool per resample step
    for tr, (sae, rows), final in zip(trainers, separate, finals, strict=True):
        for name, p in sae.state_dict().items():
            assert torch.equal(tr.sae.state_dict()[name], p), name  # identical maths, identical bits
        strip = [(s, {k: v for k, v in m.items() if k != "tokens_per_s"}) for s, m in rows]
        assert strip == [(s, {k: v for k, v in m.items() if k != "tokens_per_s"}) for s, m in tr.tracker.rows]
        assert final["resampled"] >= 8 and (tr.run_dir / "checkpoints" / "step_00000040").is_dir()
    assert len({float(t.last_metrics["l0"]) for t in trainers}) == 3  # the λ sweep did produce different SAEs


SWEEP = ["--sweep.saes=[{name: low, sae: {l1_coeff: 0.0001}}, {name: high, sae: {l1_coeff: 0.001}, "
         "train: {lr: 0.002}}]", "--train.total_tokens=20480", "--train.checkpoint_every=10", "--eval.tokens=1024"]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "sae" / "sae_weights.safetensors")


def test_cli__sweep_run_dir_resume_and_eval(tiny_run: Path, tmp_path: Path, one_thread: None,  # noqa: F811
                                            monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    lm = str(tiny_run / "lm")
    ref = tmp_path / "sweep"
    assert main(["train", "--lm", lm, "--out", str(ref), *TINY, *SWEEP]) == 0
    for name in ("low", "high"):
        for f in ("config.yaml", "metrics.jsonl", "sae/cfg.json", "sae/sae_weights.safetensors",
                  "checkpoints/step_00000040/state.pt"):
            assert (ref / name / f).is_file(), (name, f)
    assert (ref / "checkpoints" / "step_00000040" / "state.pt").is_file() and not (ref / "sae").exists()
    assert _weights(ref / "low")["W_enc"].ne(_weights(ref / "high")["W_enc"]).any()

    # a separate run with member "high"'s settings, fed by its own LM + buffer: the same SAE
    alone = tmp_path / "alone"
    argv = [*TINY, "--train.total_tokens=20480", "--train.checkpoint_every=10", "--sae.l1_coeff=0.001",
            "--train.lr=0.002"]
    assert main(["train", "--lm", lm, "--out", str(alone), *argv]) == 0
    for key, value in _weights(alone).items():
        assert torch.equal(_weights(ref / "high")[key], value), key

    # Ctrl-C at step 16: every member and the stream checkpoint step 16, keeping step 10 even with keep_checkpoints=1
    # (the step every directory had before 16's writes began); resume ends on the same bits
    step = Trainer._train_step

    def ctrl_c(self: Trainer, x: torch.Tensor) -> bool:
        if self.step == 15 and self.run_dir.name == "low":
            signal.raise_signal(signal.SIGINT)
        return step(self, x)

    monkeypatch.setattr(Trainer, "_train_step", ctrl_c)
    cut = tmp_path / "cut"
    assert main(["train", "--lm", lm, "--out", str(cut), *TINY, *SWEEP, "--train.keep_checkpoints=1"]) == 130
    assert f"SIGINT at step 16, checkpoint saved; continue with: sae-stream train --resume {cut}" in \
        capsys.readouterr().err
    for d in (cut, cut / "low", cut / "high"):
        assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["step_00000010", "step_00000016"], d
    monkeypatch.setattr(Trainer, "_train_step", step)
    assert main(["train", "--resume", str(cut)]) == 0
    for name in ("low", "high"):
        for key, value in _weights(ref / name).items():
            assert torch.equal(_weights(cut / name)[key], value), (name, key)
    # the finished sweep resumed again: no checkpoint (the stream's ring least of all) is written again
    written = {p: p.stat().st_mtime_ns for p in cut.rglob("state.pt")}
    assert main(["train", "--resume", str(cut)]) == 0
    assert {p: p.stat().st_mtime_ns for p in cut.rglob("state.pt")} == written

    assert main(["eval", str(ref), "--eval.tokens=2048"]) == 0  # (two blocks of 1024 tokens: an interval)
    rows = {r["name"]: r for r in json.loads((ref / "sweep_summary.json").read_text())}
    assert set(rows) == {"low", "high"}
    for name in ("low", "high"):
        ev = json.loads((ref / name / "eval.json").read_text())
        assert 0 < ev["fvu"] < 1
        row = rows[name]  # the summary holds each member's own eval figures and settings
        assert (row["l0"], row["fvu"], row["dead"]) == (ev["l0"], ev["fvu"], ev["density"]["dead"])
        assert row["ce_gap_zero"] == pytest.approx(1 - ev["ce_loss_recovered"]["zero"])
        lo, hi = ev["ce_loss_recovered_ci95"]["mean"]  # (the frontier's error bars)
        assert row["ce_gap_mean_ci95"] == pytest.approx([1 - hi, 1 - lo]) and 1 - hi <= row["ce_gap_mean"] <= 1 - lo
    assert (rows["low"]["l1_coeff"], rows["high"]["l1_coeff"], rows["high"]["lr"]) == (0.0001, 0.001, 0.002)
    assert rows["low"]["l0"] > rows["high"]["l0"]  # 10x the L1 penalty: sparser
    vs = rows["high"]["vs_first"]  # high against low, paired: two blocks of contexts give an interval
    lo, hi = vs["b_minus_a_ci95"]["zero"]
    assert vs["name"] == "low" and lo <= vs["b_minus_a"]["zero"] <= hi
    assert (ref / "sweep_frontier.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("low", "high"):
        assert (ref / name / "training_curves.png").is_file()
    assert main(["eval", str(ref / "low")]) == 0  # a member directory is a run directory of its own
    from sae_stream import load_run
    from sae_stream.rundir import UserError

    with pytest.raises(UserError, match=r"is a sweep: each SAE is in RUN_DIR/<name> \(low, high\)"):
        load_run(ref, device="cpu")
    capsys.readouterr()
    # ...but not a run of its own to resume: its SAE trains on the sweep's stream
    before = sorted(p.name for p in (ref / "low" / "checkpoints").iterdir())
    assert main(["train", "--resume", str(ref / "low")]) == 2
    assert f"one SAE of the sweep in {str(ref.resolve())!r}" in capsys.readouterr().err
    assert sorted(p.name for p in (ref / "low" / "checkpoints").iterdir()) == before


@pytest.mark.parametrize(("saes", "needle"), [
    ([{"name": "a"}, {"name": "a"}], "duplicate name 'a'"),
    ([{"name": "a", "train": {"batch_size": 64}}], "train.batch_size is shared"),
    ([{"name": "a", "sae": {"d_in": 32}}, {"name": "b", "sae": {"d_in": 64}}], "sae.d_in differs"),
    ([{"name": "a", "sae": {"l1_coeff": -1}}], "sweep.saes[0] (a): sae.l1_coeff must be >= 0"),
    ([{"name": "checkpoints"}], "reserved"),
    ([{"sae": {}}], "needs a name"),
    ([{"name": "config.yaml"}], "needs a name of letters, digits, '_' or '-'"),  # would collide with run files
    ([{"name": "a", "resample": {"pool_dtype": "float32"}}], "resample.pool_dtype is shared"),
    ([{"name": "a", "resample": {"pool_size": 4096}}], "resample.pool_size is shared"),
    ([{"name": "a", "train": {"tf32": False}}], "train.tf32 is shared"),
    ([{"name": "a", "train": {"step_impl": "fused"}, "sae": {"architecture": "topk"}}], "anthropic only"),
])
def test_config__bad_sweeps_name_the_fix(saes: list, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"sweep": {"saes": saes}})
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("l0s", [[16.33, 16.39], [15, 50], [12, 40], [5, 50], [1, 1000], [3, 9]])
def test_l0_axis__the_frontiers_l0_axis_labels_at_least_two_ticks_in_view(l0s: list[float]) -> None:
    from matplotlib.figure import Figure

    from sae_stream.analysis.plots import l0_axis

    fig = Figure()
    ax = fig.add_subplot()
    ax.scatter(l0s, [1.0] * len(l0s))
    l0_axis(ax, l0s)
    ax.margins(0.15)
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    shown = [t for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi and t.get_text()]
    assert len(shown) >= 2, (ax.get_xscale(), [t.get_text() for t in ax.get_xticklabels()])
    assert ax.get_xscale() == ("log" if max(l0s) > 3 * min(l0s) else "linear")
