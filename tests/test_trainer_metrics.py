"""Trainer metrics: the logged values against a direct computation, the density window (its size, the ultralow
count it can resolve, restarts by resampling, what exports read), firing counts, april's MSE in the activations'
own units. (Training itself: test_trainer.py.)"""

from __future__ import annotations

import copy
import itertools
from types import SimpleNamespace

import pytest
import torch

from sae_stream.fused_ops import firing_counts
from sae_stream.sae import build_sae
from sae_stream.trainer import Trainer
from tests._trainer_helpers import BATCH, D_IN, N_ATOMS, ListLogger, _atoms, _cfg, _pool, sparse_batches

pytestmark = pytest.mark.usefixtures("one_thread")


def test_trainer__metrics_match_a_direct_computation():
    atoms = _atoms()
    cfg = _cfg(steps=1, train__log_every=1, train__density_window_tokens=BATCH)
    sae = build_sae(cfg.sae, D_IN)
    x = next(sparse_batches(atoms))
    ref = copy.deepcopy(sae)
    ref.init_from_sample_(x)
    out = ref(x)
    log = ListLogger()
    trainer = Trainer(sae, cfg, None, log)
    trainer.fit(iter([x]))
    step, m = log.rows[0]
    assert step == 1
    err = (out.recon - x).pow(2).sum()
    var = (x - x.mean(0)).pow(2).sum()
    assert m["mse"] == pytest.approx(out.mse.item(), rel=1e-5)
    assert m["l1"] == pytest.approx(out.l1.item(), rel=1e-5)
    assert m["fvu"] == pytest.approx((err / var).item(), rel=1e-4)
    density = (out.feats > 0).float().mean(0)
    assert m["l0"] == pytest.approx((out.feats > 0).sum(1).float().mean().item(), rel=1e-6)
    assert m["dead"] == int((density == 0).sum()) and m["dense"] == int((density > 0.1).sum())
    torch.testing.assert_close(trainer.log10_density(), torch.log10(density + 1e-10))
    hist = m["density_log10_histogram"]
    assert sum(hist["counts"]) == N_ATOMS and len(hist["edges"]) == len(hist["counts"]) + 1
    assert m["lr"] == cfg.train.lr and m["l1_coeff"] == cfg.sae.l1_coeff and m["tokens"] == BATCH
    assert m["tokens_per_s"] > 0


def test_trainer__ultralow_count_only_where_the_density_window_resolves_its_threshold():
    atoms = _atoms()
    # windows of 2 batches: one batch cannot tell a density below 0.75 / BATCH from 0, two can
    cfg = _cfg(steps=8, train__log_every=1, train__density_window_tokens=2 * BATCH,
               train__ultralow_threshold=0.75 / BATCH)  # (8 steps: a quarter of the run is the 2 batches asked)
    log = ListLogger()
    trainer = Trainer(build_sae(cfg.sae, D_IN), cfg, None, log)
    trainer.fit(itertools.islice(sparse_batches(atoms), 3))
    assert [m["ultralow"] is None for _, m in log.rows] == [True, False, False]
    density = trainer.metrics.density_F  # the completed window of steps 1-2, which step 3 still reports
    assert trainer.metrics.density_tokens == 2 * BATCH
    assert log.rows[2][1]["ultralow"] == int(((density > 0) & (density < 0.75 / BATCH)).sum())


def test_running_metrics__state_from_before_density_tokens_keeps_ultralow_counted():
    from sae_stream.metrics import RunningMetrics

    t = _cfg(train__density_window_tokens=2 * BATCH, train__ultralow_threshold=0.75 / BATCH).train
    old = RunningMetrics(8, torch.device("cpu"), t, bins=10).state_dict()
    old["density_F"] = torch.full((8,), 0.5, dtype=torch.float64)  # a completed window...
    del old["density_tokens"]  # ...saved before its token count was kept
    m = RunningMetrics(8, torch.device("cpu"), t, bins=10)
    m.load_state_dict(old)
    assert m.summary()["ultralow"] == 0  # a count (the window resolves the threshold), not None


def test_firing_counts__float_path_equals_bool_count():
    f = torch.randn(300, 50).relu()
    assert torch.equal(firing_counts(f), (f > 0).sum(0))
    assert torch.equal(firing_counts(f.bfloat16()), (f > 0).sum(0))


def test_running_metrics__window_at_most_a_quarter_run_and_restarted_for_exports():
    """A run shorter than train.density_window_tokens still completes windows (a quarter of it each), so the
    exported densities describe the end of training; after a restart (resampling) the export reads the new
    window in progress, while the logs keep the last completed one until a new one completes."""
    from sae_stream.metrics import RunningMetrics

    t = _cfg(steps=8, train__density_window_tokens=100 * BATCH).train
    m = RunningMetrics(4, torch.device("cpu"), t, bins=10)
    assert m.window == 2 * BATCH
    out = SimpleNamespace(loss=torch.tensor(0.0), mse=torch.tensor(0.0), l1=torch.tensor(0.0), aux=torch.tensor(0.0))
    x = torch.ones(BATCH, D_IN)

    def step(counts: list[int]) -> None:
        m.accumulate_(out, x, torch.tensor(counts), torch.tensor(1.0))
        m.count_(BATCH)

    step([BATCH, 0, 0, 0])
    step([BATCH, BATCH, 0, 0])
    m.summary()  # the window of steps 1-2 completes
    assert m.current_density().tolist() == [1.0, 0.5, 0.0, 0.0]
    m.restart_window()
    step([0, 0, BATCH, 0])
    assert m.current_density().tolist() == [0.0, 0.0, 1.0, 0.0]  # the SAE since the restart
    assert m.summary()["dead"] == 2  # logs: still the completed window (features 2 and 3 dead in it)
    restored = RunningMetrics(4, torch.device("cpu"), t, bins=10)
    restored.load_state_dict(m.state_dict())
    assert restored.current_density().tolist() == [0.0, 0.0, 1.0, 0.0]  # (a resume keeps it stale)
    step([0, 0, BATCH, BATCH])
    m.summary()
    assert m.current_density().tolist() == [0.0, 0.0, 1.0, 0.5] and not m.stale


def test_trainer__resampling_restarts_the_density_window():
    atoms = _atoms()
    cfg = _cfg(steps=12, train__log_every=4, train__density_window_tokens=100 * BATCH, resample__enabled=True,
               resample__at_steps=[6], resample__dead_window=2)
    sae = build_sae(cfg.sae, D_IN)
    with torch.no_grad():
        sae.b_enc_F[:8] = -1e3  # 8 features that never fire: resampled at step 6
    trainer = Trainer(sae, cfg, None, ListLogger(), pool_fn=_pool(atoms))
    trainer.fit(sparse_batches(atoms))
    assert trainer.resampled >= 8 and trainer.metrics.window == 3 * BATCH
    # windows of >= 3 steps, completed at logs (every 4): steps 1-4 at step 4; the resampling at step 6 restarts
    # the count, so the log of step 8 has 2 steps (too few), and steps 7-12 complete at the log of step 12
    assert trainer.metrics.density_tokens == 6 * BATCH and not trainer.metrics.stale


def test_trainer__april_logs_mse_in_the_activations_own_units():
    """april trains on inputs scaled by input_scale; the logged MSE (as FVU, eval and the other architectures) is in
    the activations' own units, so that mse * n * d / Σ‖x − x̄‖² is the logged FVU."""
    atoms = _atoms()
    cfg = _cfg("april", steps=1, train__log_every=1)
    x = next(sparse_batches(atoms)) * 7.0  # far from the scaled norm, so input_scale != 1
    log = ListLogger()
    trainer = Trainer(build_sae(cfg.sae, D_IN), cfg, None, log)
    trainer.fit(iter([x]))
    assert abs(float(trainer.sae.input_scale) - 1) > 0.5
    m = log.rows[0][1]
    var = (x.double() - x.double().mean(0)).pow(2).sum().item()
    assert m["mse"] * x.numel() / var == pytest.approx(m["fvu"], rel=1e-4)
