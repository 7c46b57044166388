"""Data parallel (gloo, 2 CPU processes): equal to one process on the same global batches, identical ranks through
resampling, exact resume; the real CLI under torchrun survives a SIGKILL and resumes."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sae_stream.checkpoint import RANK_KEYS, list_checkpoints, newest_common_step, rank_dir, save_checkpoint
from sae_stream.distributed import Distributed, shard_size
from sae_stream.sae import build_sae
from sae_stream.trainer import Trainer
from tests._tiny_run import TINY, tiny_run  # noqa: F401 - module fixture: a tiny trained LM
from tests._trainer_helpers import D_IN, ListLogger, _atoms, _cfg, _pool, sparse_batches
from tests.test_reliability import GATED_CLI

WORLD = 2
STEPS = 40
DEAD = 8  # features forced dead at init, so both resamples have work


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(keep: int = 2):
    return _cfg("anthropic", steps=STEPS, train__checkpoint_every=20, train__log_every=10, train__keep_checkpoints=keep,
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


def _worker(rank: int, port: int, out: str, resume_from: str | None, stop_at: int, keep: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = Distributed.from_env()
    assert dist is not None and dist.rank == rank
    cfg, atoms, log = _config(keep), _atoms(), ListLogger()
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


def _spawn(out: Path, resume_from: Path | None = None, stop_at: int = STEPS, keep: int = 2) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_worker, args=(_free_port(), str(out), str(resume_from) if resume_from else None, stop_at,
                                      keep), nprocs=WORLD, start_method="spawn")
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

    # cut at step 25 (checkpoints at 20 and 25) with keep_checkpoints=1, rank 1's newest part torn, then resumed
    # from the run dir: both ranks agree on step 20 (kept: the newest step every rank had written when 25 was
    # saved), and the result is the same bits as uninterrupted
    _spawn(tmp_path / "cut", stop_at=25, keep=1)
    ckpts = tmp_path / "cut" / "run" / "checkpoints"
    main, own = (torch.load(d / "step_00000020" / "state.pt", weights_only=False) for d in (ckpts, ckpts / "rank_1"))
    assert (main["extra"], main["world_size"], own["extra"]) == ({"rank": 0}, 2, {"rank": 1})
    assert set(own) == set(RANK_KEYS)  # rank 1 writes only its own part: no SAE, no Adam
    for d in (ckpts, ckpts / "rank_1"):
        assert [p.name for p in list_checkpoints(d)] == ["step_00000020", "step_00000025"]
    (ckpts / "rank_1" / "step_00000025" / "state.pt").write_bytes(b"torn")
    resumed = _spawn(tmp_path / "resumed", resume_from=tmp_path / "cut" / "run")
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
    save_checkpoint(tmp_path / "checkpoints", 1, {**state, "world_size": 2})
    with pytest.raises(ValueError, match="nproc_per_node=2"):  # an explicit step: its state says so
        Trainer(_sae(cfg), cfg, tmp_path, ListLogger(), pool_fn=_pool(_atoms())).resume(tmp_path / "checkpoints" /
                                                                                         "step_00000001")
    # the run dir: told by the rank directories, before any collective (every rank raises the same)
    with pytest.raises(ValueError, match=r"by a single process: resume it without torchrun \(or, if torchrun"):
        newest_common_step([tmp_path / "checkpoints"], _Rank1())
    save_checkpoint(tmp_path / "checkpoints" / "rank_1", 1, {"step": 1})
    for dist, fix in ((None, "nproc_per_node=2"), (_Rank1(world=3), "nproc_per_node=2")):
        with pytest.raises(ValueError, match=f"written by 2 data-parallel processes.*{fix}"):
            newest_common_step([tmp_path / "checkpoints"], dist)


class _Peer:
    """Rank `rank` of 2 whose all_gather_objects reports `other` as the other rank's object."""

    world_size, is_main = 2, False

    def __init__(self, rank: int, other: object) -> None:
        self.rank, self.other, self.is_main = rank, other, rank == 0

    def all_gather_objects(self, obj: object) -> list:
        return [obj, self.other] if self.rank == 0 else [self.other, obj]


def test_load_own_part__explicit_step_ranks_agree_and_name_the_rank_missing_its_part(tmp_path: Path) -> None:
    from sae_stream.checkpoint import load_own_part

    ckpts = tmp_path / "checkpoints"
    save_checkpoint(ckpts, 5, {"step": 5, "world_size": 2, "sae": "shared", "rng": "r0"})
    step = ckpts / "step_00000005"
    # rank 1's part is missing: rank 1 raises naming itself; rank 0, whose own load works, raises the same
    with pytest.raises(ValueError) as on_rank1:
        load_own_part(step, _Peer(1, None))
    assert str(on_rank1.value).startswith("rank 1: ")
    with pytest.raises(ValueError) as on_rank0:
        load_own_part(step, _Peer(0, str(on_rank1.value)[len("rank 1: "):]))
    assert str(on_rank0.value) == str(on_rank1.value)
    # once the part is there, each rank gets rank 0's state with its own part in place
    save_checkpoint(rank_dir(ckpts, 1), 5, {"step": 5, "world_size": 2, "rng": "r1"})
    assert load_own_part(step, _Peer(1, None))["rng"] == "r1"
    assert load_own_part(step, _Peer(0, None)) == {"step": 5, "world_size": 2, "sae": "shared", "rng": "r0"}
    # the same error on every rank (resumed with 3 ranks) is given once, naming them all
    three = _Peer(0, None)
    three.world_size = 3
    with pytest.raises(ValueError) as alone:
        load_own_part(step, three)
    message = str(alone.value)[len("rank 0: "):]
    assert "written by 2 data-parallel processes, this run has 3" in message
    three.other = message
    with pytest.raises(ValueError, match=r"^ranks 0, 1: checkpoint .*written by 2 data-parallel"):
        load_own_part(step, three)


# ---------------------------------------------------------------------------------------------- the CLI under torchrun

# GATED_CLI (from test_reliability): the real CLI, every rank held before step HOLD_AT+1 while GATE exists, its
# checkpoints written.
DDP_ARGS = ["--train.total_tokens=20480", "--train.checkpoint_every=10", "--resample.at_steps=[15]",
            "--train.device=cpu"]


def _torchrun(script: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", str(script),
           *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> None:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, (out + err)[-3000:]


def _kill_job(launcher: subprocess.Popen, gate: Path) -> None:
    """SIGKILL the launcher and every worker (they hold its output pipes open)."""
    os.killpg(launcher.pid, signal.SIGKILL)
    for r in range(WORLD):
        pid_file = Path(f"{gate}.rank{r}.pid")
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    launcher.communicate(timeout=60)


SWEEP_ARGS = ["--sweep.saes=[{name: low, sae: {l1_coeff: 0.0001}}, {name: high, sae: {l1_coeff: 0.001}}]"]


@pytest.mark.parametrize("sweep", [False, True], ids=["one_sae", "sweep"])
def test_torchrun__killed_ddp_run_resumes_to_the_uninterrupted_result(tiny_run: Path, tmp_path: Path,  # noqa: F811
                                                                      sweep: bool) -> None:
    """Each rank writes its own checkpoint parts (a sweep: each SAE's and the stream's); SIGKILLed after step 25,
    the run resumes from step 20 on both ranks to the same bits as an uninterrupted run."""
    from safetensors.torch import load_file

    script = tmp_path / "gated.py"
    script.write_text(GATED_CLI)
    lm, gate = str(tiny_run / "lm"), tmp_path / "gate"
    gate.touch()
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = [*TINY, *DDP_ARGS, *(SWEEP_ARGS if sweep else [])]
    killed = _torchrun(script, "train", "--lm", lm, "--out", str(cut), *args, env={"GATE": str(gate), "HOLD_AT": "25"})
    try:
        _finish(_torchrun(script, "train", "--lm", lm, "--out", str(full), *args,
                          env={"GATE": str(tmp_path / "no-gate"), "HOLD_AT": "-1"}))
        deadline = time.monotonic() + 240
        while not all(Path(str(gate) + m).exists() for m in (".held", *(f".rank{r}.held" for r in range(1, WORLD)))):
            assert killed.poll() is None, killed.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        _kill_job(killed, gate)  # 5 steps past the newest checkpoint
    finally:
        if killed.poll() is None:
            _kill_job(killed, gate)
    saes = ["low", "high"] if sweep else [""]
    for d in [cut, *(cut / name for name in saes)]:
        for r in range(WORLD):
            assert [p.name for p in list_checkpoints(rank_dir(d / "checkpoints", r))] == ["step_00000010",
                                                                                            "step_00000020"]
    assert not (cut / saes[0] / "sae").exists()
    _finish(_torchrun(script, "train", "--resume", str(cut), env={"GATE": str(gate), "HOLD_AT": "-1"}))

    for name in saes:
        steps = [json.loads(line)["step"] for line in (cut / name / "metrics.jsonl").read_text().splitlines()]
        assert steps[-1] == 40 and len(json.loads((full / name / "metrics.jsonl").read_text().splitlines()[-1])) > 5
        for key, want in load_file(full / name / "sae" / "sae_weights.safetensors").items():
            assert torch.equal(load_file(cut / name / "sae" / "sae_weights.safetensors")[key], want), (name, key)
    parts = [torch.load(rank_dir(full / "checkpoints", r) / "step_00000040" / "state.pt", weights_only=False)
             for r in range(WORLD)]
    assert [p["extra"]["buffer"]["source"]["token_source"]["rank"] for p in parts] == [0, 1]  # each its own shard
    assert parts[1]["extra"]["buffer"]["acts"].shape[0] > 0  # rank 1's ring, in its own file


def _nan_worker(rank: int, port: int, out: str) -> None:
    """Rank 1 alone sees a non-finite row at step 3: every rank must stop with the same one-line error."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = Distributed.from_env(timeout_s=60)  # a rank left behind in a collective fails the test, not hangs it
    cfg = _cfg("anthropic", steps=20, train__log_every=5, train__checkpoint_every=100)
    trainer = Trainer(build_sae(cfg.sae, D_IN), cfg, None, ListLogger(), dist=dist)

    def batches():
        for i, b in enumerate(sparse_batches(_atoms())):
            x = _shard(b, rank, WORLD).clone()
            if rank == 1 and i == 2:
                x[0, 0] = float("nan")
            yield x

    try:
        trainer.fit(batches())
        result = "finished"
    except ValueError as e:
        result = str(e)
    Path(out, f"nan{rank}.txt").write_text(result)
    dist.close()


def test_ddp__a_bad_batch_on_one_rank_stops_every_rank_with_its_step(tmp_path: Path) -> None:
    mp.start_processes(_nan_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    results = [(tmp_path / f"nan{r}.txt").read_text() for r in range(WORLD)]
    assert results[0] == results[1]
    assert results[0].startswith("non-finite activations in the batch of step 3")


class _Rank1:
    """Rank 1 of 2 as check_shared sees it: rank 0 announced marker ".ranks-abc", rank 0 itself saw it."""

    is_main, rank = False, 1

    def __init__(self, world: int = 2) -> None:
        self.world_size = world

    def broadcast_object(self, obj: object) -> str:
        return "abc"

    def barrier(self) -> None:
        pass

    def all_gather_objects(self, obj: object) -> list:
        return [True, obj]


def test_check_shared__a_rank_that_cannot_see_the_run_dir_is_named(tmp_path: Path) -> None:
    from sae_stream.rundir import UserError, check_shared

    shared, elsewhere = tmp_path / "run", tmp_path / "other-machine"
    shared.mkdir()
    elsewhere.mkdir()
    (shared / ".ranks-abc").touch()  # what rank 0 wrote
    check_shared(shared, _Rank1())
    with pytest.raises(UserError, match=r"rank\(s\) \[1\] do not see the run directory .*other-machine.*shares"):
        check_shared(elsewhere, _Rank1())


def test_resume_command__names_torchrun_with_the_processes_per_node(monkeypatch: pytest.MonkeyPatch) -> None:
    from sae_stream.rundir import resume_command

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resume_command("runs/a1") == "sae-stream train --resume runs/a1"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resume_command("runs/a1") == "torchrun --nproc_per_node=4 -m sae_stream train --resume runs/a1"
    monkeypatch.setenv("WORLD_SIZE", "8")  # 2 nodes of 4
    assert resume_command("runs/a1").startswith("torchrun --nnodes=2 (and your rendezvous options) --nproc_per_node=4")
