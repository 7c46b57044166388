"""Data parallel (gloo, 2 CPU processes): equal to one process on the same global batches, identical ranks through
resampling, exact resume; the real CLI under torchrun survives a SIGKILL and resumes."""

from __future__ import annotations

import itertools
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sae_stream.distributed import Distributed, shard_size
from sae_stream.sae import build_sae
from sae_stream.trainer import Trainer
from tests.test_trainer import D_IN, ListLogger, _atoms, _cfg, _pool, sparse_batches

WORLD = 2
STEPS = 40
DEAD = 8  # features forced dead at init, so both resamples have work


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config():
    return _cfg("anthropic", steps=STEPS, train__checkpoint_every=20, train__log_every=10,
                train__lr_schedule="linear_tail", train__warmup_steps=5, resample__enabled=True,
                resample__at_steps=[15, 30], sae__l1_coeff=0.05, sae__d_sae=256, resample__dead_window=2)


def _sae(cfg):
    sae = build_sae(cfg.sae, D_IN)
    with torch.no_grad():
        sae.b_enc_F[:DEAD] = -1e4
    return sae


def _shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = shard_size(x.shape[0], world)
    return x[rank * n:(rank + 1) * n]


def _worker(rank: int, port: int, out: str, resume_from: str | None, stop_at: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = Distributed.from_env()
    assert dist is not None and dist.rank == rank
    cfg, atoms, log = _config(), _atoms(), ListLogger()
    full_pool = _pool(atoms)
    trainer = Trainer(_sae(cfg), cfg, Path(out) / "run", log if rank == 0 else ListLogger(),
                      pool_fn=lambda n: dist.all_gather_rows(_shard(full_pool(n), rank, WORLD)),
                      extra_state=lambda: {"rank": rank}, dist=dist)
    start = 0
    if resume_from is not None:
        assert trainer.resume(resume_from) == {"rank": rank}  # each rank gets its own part back
        start = trainer.step
    batches = (_shard(b, rank, WORLD) for b in itertools.islice(sparse_batches(atoms, start=start), stop_at - start))
    trainer.fit(batches)
    torch.save({"sae": trainer.sae.state_dict(), "log": log.rows, "resampled": trainer.resampled},
               Path(out) / f"rank{rank}.pt")
    dist.close()


def _spawn(out: Path, resume_from: Path | None = None, stop_at: int = STEPS) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_worker, args=(_free_port(), str(out), str(resume_from) if resume_from else None, stop_at),
                       nprocs=WORLD, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ddp__equals_single_process_and_ranks_stay_identical_through_resampling(tmp_path: Path,
                                                                                one_thread: None) -> None:
    cfg, atoms = _config(), _atoms()
    single = _sae(cfg)
    log = ListLogger()
    Trainer(single, cfg, None, log, pool_fn=_pool(atoms)).fit(sparse_batches(atoms))

    ranks = _spawn(tmp_path / "ddp")
    for name, p in ranks[0]["sae"].items():
        assert torch.equal(p, ranks[1]["sae"][name]), f"{name} differs between ranks"
        # the sum order differs, and Adam's fresh moments after a resample magnify that: compare whole tensors
        ref = single.state_dict()[name]
        assert float((p - ref).norm() / ref.norm().clamp_min(1e-12)) < 1e-4, name
    assert ranks[0]["resampled"] == ranks[1]["resampled"] > DEAD  # both resamples had work, on both ranks
    for (step, m), (ref_step, ref) in zip(ranks[0]["log"], log.rows, strict=True):
        assert step == ref_step and m["tokens"] == ref["tokens"] and m["dead"] == ref["dead"]
        for key in ("mse", "l1", "l0"):
            assert m[key] == pytest.approx(ref[key], rel=1e-4), (step, key)
        assert m["fvu"] == pytest.approx(ref["fvu"], rel=1e-2)  # variance around each rank's batch mean

    # killed after the checkpoint at step 20 (the run stops there), then resumed: the same bits as uninterrupted
    _spawn(tmp_path / "cut", stop_at=25)
    state = torch.load(tmp_path / "cut" / "run" / "checkpoints" / "step_00000020" / "state.pt", weights_only=False)
    assert [p["extra"] for p in state["per_rank"]] == [{"rank": 0}, {"rank": 1}]
    resumed = _spawn(tmp_path / "resumed", resume_from=tmp_path / "cut" / "run" / "checkpoints" / "step_00000020")
    for name, p in ranks[0]["sae"].items():
        assert torch.equal(resumed[0]["sae"][name], p), name
    def strip(rows: list, after: int = 0) -> list:
        return [(s, {k: v for k, v in m.items() if k != "tokens_per_s"}) for s, m in rows if s > after]

    assert strip(resumed[0]["log"]) == strip(ranks[0]["log"], after=20)


def test_ddp__batch_must_split_evenly_and_checkpoint_needs_same_world(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train.batch_size=510 is not divisible by the 4"):
        shard_size(510, 4)
    cfg = _config()
    Trainer(_sae(cfg), cfg, tmp_path, ListLogger(), pool_fn=_pool(_atoms())).save()
    state = torch.load(tmp_path / "checkpoints" / "step_00000000" / "state.pt", weights_only=False)
    state["per_rank"] = [{}, {}]
    from sae_stream.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "checkpoints", 1, state)
    with pytest.raises(ValueError, match="nproc_per_node=2"):
        Trainer(_sae(cfg), cfg, tmp_path, ListLogger(), pool_fn=_pool(_atoms())).resume(tmp_path)
