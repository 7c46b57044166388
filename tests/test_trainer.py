"""Trainer: dictionary recovery, exact resume, non-finite policies, schedules, AuxK, autocast, CUDA.
(Logged metrics and density windows: test_trainer_metrics.py.)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sae_stream.sae import build_sae
from sae_stream.schedule import l1_coeff_at, lr_at
from sae_stream.trainer import Trainer
from tests._trainer_helpers import BATCH, D_IN, N_ATOMS, ListLogger, _atoms, _cfg, _pool, _recovered, sparse_batches

pytestmark = pytest.mark.usefixtures("one_thread")


def test_trainer__anthropic_recovers_known_dictionary_with_unit_decoder():
    atoms = _atoms()
    cfg = _cfg("anthropic", steps=1000, train__log_every=1000)
    sae = build_sae(cfg.sae, D_IN)
    final = Trainer(sae, cfg, None, ListLogger()).fit(sparse_batches(atoms))
    cos = _recovered(sae, atoms)
    assert (cos > 0.9).float().mean() >= 0.9, cos
    torch.testing.assert_close(sae.W_dec_FD.norm(dim=1), torch.ones(N_ATOMS))
    assert final["fvu"] < 0.15 and 2 < final["l0"] < 8


def test_trainer__april_recovers_known_dictionary_with_scaled_inputs():
    atoms = _atoms()
    cfg = _cfg("april", steps=500, sae__l1_coeff=0.03, train__log_every=500)
    sae = build_sae(cfg.sae, D_IN)
    Trainer(sae, cfg, None, ListLogger()).fit(sparse_batches(atoms))
    assert (_recovered(sae, atoms) > 0.9).float().mean() >= 0.9
    first = next(sparse_batches(atoms))
    assert (first * sae.input_scale).norm(dim=1).mean().item() == pytest.approx(D_IN ** 0.5, rel=1e-4)
    assert sae.W_dec_FD.norm(dim=1).std() > 1e-3  # no unit-norm constraint


def test_trainer__topk_recovers_known_dictionary():
    atoms = _atoms()
    cfg = _cfg("topk", steps=600, train__log_every=100)
    sae = build_sae(cfg.sae, D_IN)
    Trainer(sae, cfg, None, ListLogger()).fit(sparse_batches(atoms))
    assert (_recovered(sae, atoms) > 0.9).float().mean() >= 0.75


def test_trainer__resume_matches_uninterrupted_run_bit_for_bit(tmp_path):
    atoms = _atoms()
    cfg = _cfg("anthropic", steps=40, train__checkpoint_every=20, train__log_every=7,
               train__lr_schedule="linear_tail", train__warmup_steps=5, train__l1_warmup_fraction=0.3,
               resample__enabled=True, resample__at_steps=[15, 30], sae__l1_coeff=0.05, sae__d_sae=256,
               resample__dead_window=2)
    position = {"i": 0}

    def counted(start):
        position["i"] = start
        for b in sparse_batches(atoms, start=start):
            position["i"] += 1
            yield b

    full = build_sae(cfg.sae, D_IN)
    with torch.no_grad():
        full.b_enc_F[:8] = -1e4  # dead from the start, so both resamples have work to do
    log_full = ListLogger()
    Trainer(full, cfg, tmp_path / "full", log_full, pool_fn=_pool(atoms),
            extra_state=lambda: {"pos": position["i"]}).fit(counted(0))
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["step_00000020", "step_00000040"]
    resampled = {s: m["resampled"] for s, m in log_full.rows}
    assert resampled[14] == 0 and resampled[21] >= 8 and resampled[35] > resampled[21]  # before and after step 20

    fresh = build_sae(cfg.sae, D_IN, seed=123)  # different init: everything must come from the checkpoint
    log_res = ListLogger()
    trainer = Trainer(fresh, cfg, tmp_path / "full" / "checkpoints" / "step_00000020", log_res,
                      pool_fn=_pool(atoms), extra_state=lambda: {"pos": position["i"]})
    extra = trainer.resume(tmp_path / "full" / "checkpoints" / "step_00000020")
    assert extra == {"pos": 20} and trainer.step == 20
    trainer.run_dir = tmp_path / "resumed"
    trainer.fit(counted(extra["pos"]))
    for name, p in full.state_dict().items():
        assert torch.equal(p, fresh.state_dict()[name]), name
    strip = [(s, {k: v for k, v in m.items() if k != "tokens_per_s"}) for s, m in log_full.rows if s > 20]
    assert strip == [(s, {k: v for k, v in m.items() if k != "tokens_per_s"}) for s, m in log_res.rows]


def test_trainer__resume_from_run_dir_picks_latest_and_checks_shape(tmp_path):
    atoms = _atoms()
    cfg = _cfg(steps=6, train__checkpoint_every=2, train__keep_checkpoints=2)
    Trainer(build_sae(cfg.sae, D_IN), cfg, tmp_path, ListLogger()).fit(sparse_batches(atoms))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    (tmp_path / "checkpoints" / "step_00000009.bak").mkdir()  # not a checkpoint name: ignored
    stray = tmp_path / "checkpoints" / "step_00000008"  # a newer one that fails its check (a torn write)
    shutil.copytree(tmp_path / "checkpoints" / "step_00000006", stray)
    (stray / "state.pt").write_bytes(b"torn")
    tr = Trainer(build_sae(cfg.sae, D_IN), cfg, tmp_path, ListLogger())
    with pytest.warns(UserWarning, match="step_00000008 is corrupt"):
        tr.resume(tmp_path)
    assert tr.step == 6 and stray.is_dir()  # (Trainer.resume deletes nothing; `train --resume` does, at its end)
    assert tr.writer.written == 6  # on disk: a writer pruning for several directories keeps it (checkpoint.py)
    other = _cfg(steps=6, sae__d_sae=32)
    with pytest.raises(ValueError, match="d_sae"):
        Trainer(build_sae(other.sae, D_IN), other, tmp_path, ListLogger()).resume(tmp_path)
    with pytest.raises(ValueError, match="no valid checkpoint"):
        tr.resume(tmp_path / "nowhere")


# the last step: a log and checkpoint step; neither; a checkpoint step only
@pytest.mark.parametrize(("steps", "checkpoint_every"), [(10, 5), (12, 5), (12, 4)])
def test_trainer__resuming_a_finished_run_logs_nothing_new_and_returns_its_final_metrics(tmp_path, steps,
                                                                                         checkpoint_every):
    from sae_stream.tracking import Tracker

    atoms = _atoms()
    cfg = _cfg(steps=steps, train__log_every=5, train__checkpoint_every=checkpoint_every)
    tracker = Tracker(tmp_path)
    final = Trainer(build_sae(cfg.sae, D_IN), cfg, tmp_path, tracker).fit(sparse_batches(atoms))
    tracker.close()
    before = (tmp_path / "metrics.jsonl").read_text()
    tracker = Tracker(tmp_path)
    trainer = Trainer(build_sae(cfg.sae, D_IN), cfg, tmp_path, tracker)
    trainer.resume(tmp_path)
    tracker.drop_after(trainer.step)
    again = trainer.fit(sparse_batches(atoms, start=steps))
    tracker.close()
    assert (tmp_path / "metrics.jsonl").read_text() == before  # no empty record of zero steps appended
    assert again["mse"] == final["mse"] and again["l0"] == final["l0"] and again["step"] == steps


def test_trainer__resuming_a_run_whose_stream_ended_at_a_checkpoint_step_logs_it_once(tmp_path):
    """The stream ends at step 8, a checkpoint step (written before the final log) but not a log step: that
    checkpoint holds unlogged steps, so a resume drops step 8's record and logs it again, once, the same."""
    import itertools

    from sae_stream.tracking import Tracker

    atoms = _atoms()
    cfg = _cfg(steps=20, train__log_every=5, train__checkpoint_every=4)
    tracker = Tracker(tmp_path)
    with pytest.warns(UserWarning, match="stream ended at step 8"):
        final = Trainer(build_sae(cfg.sae, D_IN), cfg, tmp_path, tracker).fit(
            itertools.islice(sparse_batches(atoms), 8))
    tracker.close()
    before = (tmp_path / "metrics.jsonl").read_text()
    assert [json.loads(line)["step"] for line in before.splitlines()] == [5, 8]
    tracker = Tracker(tmp_path)
    trainer = Trainer(build_sae(cfg.sae, D_IN), cfg, tmp_path, tracker)
    trainer.resume(tmp_path)
    assert trainer.records_kept_through() == 7
    tracker.drop_after(trainer.records_kept_through())
    with pytest.warns(UserWarning, match="stream ended at step 8"):
        again = trainer.fit(iter([]))
    tracker.close()
    after = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    volatile = ("time", "tokens_per_s")  # (wall clock)
    assert [{k: v for k, v in r.items() if k not in volatile} for r in after] == \
        [{k: v for k, v in json.loads(line).items() if k not in volatile} for line in before.splitlines()]
    assert again["mse"] == final["mse"] and trainer.step == 8
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004", "step_00000008"]


def test_trainer__nan_stop_names_the_step():
    atoms = _atoms()
    cfg = _cfg(steps=20, train__log_every=5)
    batches = [b for _, b in zip(range(20), sparse_batches(atoms))]
    batches[6][3, 2] = float("nan")
    with pytest.raises(ValueError, match="step 7"):
        Trainer(build_sae(cfg.sae, D_IN), cfg, None, ListLogger()).fit(iter(batches))


def test_trainer__nan_skip_drops_rows_and_counts_them():
    atoms = _atoms()
    cfg = _cfg(steps=4, train__log_every=4, train__nan_policy="skip")
    batches = [b for _, b in zip(range(5), sparse_batches(atoms))]
    batches[1][[0, 5, 9]] = float("inf")
    batches[2][:] = float("nan")  # a batch with nothing left is skipped without counting a step
    sae = build_sae(cfg.sae, D_IN)
    m = Trainer(sae, cfg, None, ListLogger()).fit(iter(batches))
    assert m["skipped_rows"] == 3 + BATCH
    assert m["tokens"] == 4 * BATCH - 3
    assert all(torch.isfinite(p).all() for p in sae.parameters())


def test_lr_at__schedule_shapes():
    def lrs(**over):
        t = _cfg(steps=100, **{f"train__{k}": v for k, v in over.items()}).train
        return [lr_at(s, t) for s in range(100)]

    assert set(lrs()) == {1e-2}
    warm = lrs(lr_schedule="warmup", warmup_steps=10)
    assert warm[0] == pytest.approx(1e-3) and warm[9] == warm[99] == 1e-2
    assert all(a < b for a, b in zip(warm[:9], warm[1:10]))
    tail = lrs(lr_schedule="linear_tail", warmup_steps=10, decay_fraction=0.2)
    assert tail[10:80] == [1e-2] * 70
    assert all(a > b for a, b in zip(tail[80:], tail[81:]))
    assert tail[99] == pytest.approx(1e-2 / 20) and tail[80] == 1e-2
    assert lrs(lr_schedule="constant", warmup_steps=10)[0] == 1e-2  # constant ignores warm-up


def test_l1_coeff_at__linear_warmup():
    cfg = _cfg(steps=100, train__l1_warmup_fraction=0.1)
    vals = [l1_coeff_at(s, cfg) for s in range(100)]
    assert vals[0] == pytest.approx(0.001) and vals[4] == pytest.approx(0.005) and vals[9:] == [0.01] * 91


def test_trainer__auxk_turns_on_for_dead_latents():
    atoms = _atoms()
    cfg = _cfg("topk", steps=120, train__log_every=10, sae__dead_tokens_auxk=5 * BATCH, sae__d_sae=256)
    log = ListLogger()
    Trainer(build_sae(cfg.sae, D_IN), cfg, None, log).fit(sparse_batches(atoms))
    aux = [m["aux"] for _, m in log.rows]
    assert aux[0] == 0.0 and max(aux) > 0  # off until latents have been dead for 5 batches


def test_trainer__bf16_autocast_tracks_fp32_loss():
    atoms = _atoms()
    finals = []
    for autocast in ("none", "bfloat16"):
        cfg = _cfg(steps=60, train__autocast=autocast, train__log_every=60)
        finals.append(Trainer(build_sae(cfg.sae, D_IN), cfg, None, ListLogger()).fit(sparse_batches(atoms))["mse"])
    assert finals[1] == pytest.approx(finals[0], rel=0.1)


def test_trainer__resampling_needs_a_pool():
    cfg = _cfg(resample__enabled=True)
    with pytest.raises(ValueError, match="pool_fn"):
        Trainer(build_sae(cfg.sae, D_IN), cfg, None, ListLogger())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trainer__moves_to_the_batch_device_and_trains_on_cuda():
    cfg = _cfg(steps=50, train__log_every=25, train__autocast="bfloat16")
    sae = build_sae(cfg.sae, D_IN)
    m = Trainer(sae, cfg, None, ListLogger()).fit(x.cuda() for x in sparse_batches(_atoms()))
    assert sae.W_dec_FD.device.type == "cuda" and m["fvu"] < 1.0


def test_trainer__checkpoint_names_the_step_layout_and_the_resumed_steps_keep_it(tmp_path, monkeypatch):
    """On CUDA with Triton the first step times where the step takes its column sums (fused_ops.step_layout). The
    two layouts round differently, so a resumed run must not time again: it takes its checkpoint's layout. (On CPU
    nothing is timed: the layout is set here as a GPU run would have.)"""
    import sae_stream.trainer as trainer_mod

    seen = []
    real = trainer_mod.anthropic_grads_

    def spy(*args):
        seen.append(args[5])
        return real(*args)

    monkeypatch.setattr(trainer_mod, "anthropic_grads_", spy)
    cfg = _cfg("anthropic", steps=12, train__checkpoint_every=6, train__log_every=4)
    full = build_sae(cfg.sae, D_IN)
    first = Trainer(full, cfg, tmp_path / "full", ListLogger())
    first.step_layout = "cublas"  # as the first step's timing on a GPU would set it
    first.fit(sparse_batches(_atoms()))
    ckpt = tmp_path / "full" / "checkpoints" / "step_00000006"
    resumed = Trainer(build_sae(cfg.sae, D_IN, seed=1), cfg, ckpt, ListLogger())
    assert resumed.step_layout is None
    seen.clear()
    resumed.resume(ckpt)
    resumed.run_dir = tmp_path / "resumed"
    resumed.fit(sparse_batches(_atoms(), start=6))
    assert resumed.step_layout == "cublas" and seen == ["cublas"] * 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trainer__cuda_triton_resume_is_bit_identical_though_a_new_timing_picks_the_other_layout(tmp_path,
                                                                                                monkeypatch):
    """The GPU path end to end (graphed fused bf16 step, Triton kernels): stopped at step 6 and resumed in a process
    whose layout timing would pick the other layout, the SAE ends bit-identical to the uninterrupted one."""
    import sae_stream.fused_ops as fo
    from sae_stream.step import triton_probe

    if not fo.triton_available() or triton_probe(torch.device("cuda")) is not None:
        pytest.skip("Triton does not run on this GPU")
    monkeypatch.delenv(fo.ENCODE_ENV, raising=False)
    monkeypatch.setenv(fo.AUTOTUNE_ENV, "0")  # (one fixed block config: no autotuning within the GPU test budget)
    cfg = _cfg("anthropic", steps=12, train__checkpoint_every=6, train__log_every=4, train__kernels="triton",
               train__autocast="bfloat16", train__step_impl="fused")
    monkeypatch.setattr(fo, "_LAYOUT_PICKS", {})
    monkeypatch.setattr(fo, "_time_layouts", lambda *a, **k: "cublas")  # the first run's timing picks cublas
    full = build_sae(cfg.sae, D_IN)
    Trainer(full, cfg, tmp_path / "full", ListLogger()).fit(x.cuda() for x in sparse_batches(_atoms()))
    fo._LAYOUT_PICKS.clear()  # a new process: nothing timed yet, and a timing there would pick stats
    monkeypatch.setattr(fo, "_time_layouts", lambda *a, **k: "stats")
    ckpt = tmp_path / "full" / "checkpoints" / "step_00000006"

    def resumed(pinned: bool) -> torch.nn.Module:
        fo._LAYOUT_PICKS.clear()
        sae = build_sae(cfg.sae, D_IN, seed=1)
        trainer = Trainer(sae, cfg, ckpt, ListLogger())
        trainer.resume(ckpt)
        if not pinned:
            trainer.step_layout = None  # as a checkpoint without one: timed again (stats)
        trainer.run_dir = tmp_path / f"resumed_{pinned}"
        trainer.fit(x.cuda() for x in sparse_batches(_atoms(), start=6))
        assert trainer.step_layout == ("cublas" if pinned else "stats") and trainer._graph.graphs
        return sae

    unpinned = resumed(False)
    if all(torch.equal(p, unpinned.state_dict()[n]) for n, p in full.state_dict().items()):
        pytest.skip("the two layouts round alike at this size: the pin cannot show here")
    pinned = resumed(True)
    for name, p in full.state_dict().items():
        assert torch.equal(p, pinned.state_dict()[name]), name
