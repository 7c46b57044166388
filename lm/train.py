"""Train the GPT of lm/model.py on `data.*` token contexts; resumable, with held-out and unigram-baseline losses.

Each training window holds data.context_len + 1 tokens: the model reads the first context_len and predicts the
last context_len, so every position the SAE stream later reads (0 .. context_len - 1) is trained, its position
embedding included (nanoGPT's block_size + 1).

    python -m lm.train --out runs/lm [--config configs/default.yaml] [--resume] [--lm_train.tokens=500000 ...]

Writes to the output dir: config.yaml, metrics.jsonl, checkpoints/step_*/ (model, optimizer, step, RNG, data
position), and at the end model.safetensors, lm_result.json (final held-out loss against a unigram baseline) and
training_curves.png.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lm.model import GPT
from sae_stream.checkpoint import (
    atomic_write_json,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from sae_stream.config import Config, DataConfig, LMTrainConfig, save_config, to_dict
from sae_stream.data import ContextBatches, heldout_batches
from sae_stream.prefetch import PrefetchedBatches, training_batches
from sae_stream.process import TrainingInterrupted, resolve_device, signals_to, tune_cpu_allocator
from sae_stream.tokenizer import Tokenizer, get_tokenizer
from sae_stream.tracking import Tracker, keep_records_through, read_records

RESULT_FILE = "lm_result.json"
CKPT_DIR = "checkpoints"


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls (AVX512-BF16 or AMX): there bf16 autocast is ~2x faster than fp32 on the unembedding."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if setting == "none":
        return None
    if setting == "bfloat16" or device.type == "cuda" or cpu_has_bf16():
        return torch.bfloat16
    return None


def make_optimizer(model: GPT, cfg: LMTrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (and the embeddings) only, not on biases or LayerNorm gains."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=device.type == "cuda")


def lr_at(step: int, total_steps: int, cfg: LMTrainConfig) -> float:
    """Linear warm-up to cfg.lr over warmup_steps, then cosine decay to cfg.lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device,
                 dtype: torch.dtype | None) -> float:
    """Mean next-token cross-entropy (nats) over every predicted held-out token (logits never materialized)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x_BT in batches:
        x_BT = x_BT.to(device)
        with _autocast(device, dtype):
            _, loss = model(x_BT[:, :-1], x_BT[:, 1:], return_logits=False)
        total += loss.item() * x_BT[:, 1:].numel()
        count += x_BT[:, 1:].numel()
    model.train(was_training)
    return total / count


def unigram_loss(counts_V: torch.Tensor, batches: list[torch.Tensor], n_vocab: int) -> float:
    """Cross-entropy on the held-out targets of the train-set unigram distribution, add-one smoothed over n_vocab."""
    counts_V = counts_V[:n_vocab].double()
    logp_V = torch.log((counts_V + 1.0) / (counts_V.sum() + n_vocab))
    targets = torch.cat([x_BT[:, 1:].flatten() for x_BT in batches])
    return float(-logp_V[targets].mean())


@dataclass
class _State:
    """Everything that changes during training and is checkpointed."""

    step: int
    counts_V: torch.Tensor  # int64 train-token counts for the unigram baseline
    elapsed_s: float  # training wall time before this process
    last_heldout: float | None = None


def _checkpoint(run: _Run, state: _State, elapsed_s: float) -> None:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    save_checkpoint(run.out_dir / CKPT_DIR, state.step, {
        "model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "step": state.step, "rng": rng,
        "data": run.batches.state_dict(), "unigram_counts": state.counts_V, "elapsed_s": elapsed_s,
        "last_heldout": state.last_heldout, "config": to_dict(run.cfg), "window": run.cfg.data.context_len + 1})


def _resume(out_dir: Path, cfg: Config, model: GPT, opt: torch.optim.Optimizer,
            batches: ContextBatches | PrefetchedBatches, device: torch.device) -> _State:
    if not list_checkpoints(out_dir / CKPT_DIR):
        raise ValueError(f"no checkpoint to resume in {str(out_dir / CKPT_DIR)!r}: run without resume to start")
    path = latest_checkpoint(out_dir / CKPT_DIR)
    if path is None:
        raise ValueError(f"every checkpoint in {str(out_dir / CKPT_DIR)!r} is corrupt: delete them to start over")
    ckpt = load_checkpoint(path, map_location="cpu")
    saved, now = ckpt["config"], to_dict(cfg)
    for section in ("lm", "data"):  # (first: a changed context_len is a config change, not an old version)
        if saved[section] != now[section]:
            diff = next(k for k in now[section] if saved[section].get(k) != now[section][k])
            raise ValueError(f"cannot resume {str(out_dir)!r}: {section}.{diff} was {saved[section].get(diff)!r}, "
                             f"now {now[section][diff]!r}; use the run's config.yaml")
    if ckpt.get("window") != cfg.data.context_len + 1:
        raise ValueError(f"cannot resume {str(out_dir)!r}: its checkpoints come from an sae-stream that trained on "
                         f"windows of data.context_len tokens (now context_len + 1, so that the last position is "
                         "trained too): resume with that version, or train again")
    if saved["lm_train"]["batch_size"] != cfg.lm_train.batch_size:
        raise ValueError(f"cannot resume {str(out_dir)!r}: lm_train.batch_size changed; use the run's config.yaml")
    model.load_weights_(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    batches.load_state_dict(ckpt["data"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if device.type == "cuda" and "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return _State(ckpt["step"], ckpt["unigram_counts"], ckpt["elapsed_s"], ckpt.get("last_heldout"))


def _check(cfg: Config, tokenizer: Tokenizer) -> int:
    """Total steps; rejects a tokenizer larger than the LM's vocabulary and a budget below one step."""
    tc = cfg.lm_train
    if tokenizer.n_vocab > cfg.lm.vocab_size:
        raise ValueError(f"lm.vocab_size ({cfg.lm.vocab_size}) < the {cfg.data.tokenizer} tokenizer's "
                         f"{tokenizer.n_vocab} ids: raise lm.vocab_size")
    if cfg.data.context_len < 2:
        raise ValueError("data.context_len must be >= 2 to train a next-token predictor")
    steps = tc.tokens // (tc.batch_size * cfg.data.context_len)
    if steps < 1:
        raise ValueError(f"lm_train.tokens ({tc.tokens}) is below one step of lm_train.batch_size x data.context_len "
                         f"({tc.batch_size * cfg.data.context_len}): raise it")
    return steps


def train_lm(cfg: Config, out_dir: str | Path, resume: bool = False, tracker: Any = None,
             started: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train the LM of cfg.lm on cfg.data for cfg.lm_train.tokens tokens; returns (and writes) lm_result.json.
    `started` is called once the data and config have checked out, before the first step."""
    out_dir = Path(out_dir)
    if not resume and list_checkpoints(out_dir / CKPT_DIR):
        raise ValueError(f"{str(out_dir)!r} already holds LM checkpoints: resume it or use a fresh output dir")
    device = resolve_device(cfg.train.device)
    dtype = autocast_dtype(cfg.lm_train.autocast, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        tune_cpu_allocator()  # chunked logits and grads would page-fault in again every step
    torch.manual_seed(cfg.train.seed)
    windows = dataclasses.replace(cfg.data, context_len=cfg.data.context_len + 1)  # inputs + the next token
    batches = training_batches(windows, cfg.lm_train.batch_size, device)
    try:
        result = _train(cfg, out_dir, resume, tracker, started, windows, batches, device, dtype)
    finally:
        batches.close()
    from sae_stream.analysis.curves import LM_PANELS, plot_training_curves  # (matplotlib: imported when drawing)

    plot_training_curves(read_records(out_dir / "metrics.jsonl"), out_dir / "training_curves.png", LM_PANELS,
                         x_key="step", title=f"LM training: {cfg.lm.n_layers} layer(s), d_model {cfg.lm.d_model}")
    return result


def _train(cfg: Config, out_dir: Path, resume: bool, tracker: Any, started: Callable[[], None] | None,
           windows: DataConfig, batches: ContextBatches | PrefetchedBatches, device: torch.device,
           dtype: torch.dtype | None) -> dict[str, Any]:
    """train_lm's run once its training batches exist: checks, held-out set, model, loop, result."""
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    total_steps = _check(cfg, tokenizer)
    # read before anything is written: a data error leaves --out as it was, so the fixed command can reuse it
    heldout = list(heldout_batches(windows, cfg.lm_train.batch_size, cfg.lm_train.eval_tokens,
                                   what="lm_train.eval_tokens"))
    model = GPT(cfg.lm).to(device)
    opt = make_optimizer(model, cfg.lm_train, device)
    state = (_resume(out_dir, cfg, model, opt, batches, device) if resume
             else _State(0, torch.zeros(cfg.lm.vocab_size, dtype=torch.int64), 0.0))
    save_config(cfg, out_dir / "config.yaml")
    if started is not None:
        started()
    own_tracker = tracker is None
    if own_tracker and resume:
        keep_records_through(out_dir / "metrics.jsonl", state.step)  # the crashed run logged past it
    tracker = Tracker(out_dir, cfg.wandb, to_dict(cfg)) if own_tracker else tracker
    try:
        _loop(_Run(cfg, out_dir, model, opt, batches, heldout, total_steps, device, dtype, tracker), state)
        model.save(out_dir)
        tokens = state.step * cfg.lm_train.batch_size * cfg.data.context_len
        result = {"heldout_loss": state.last_heldout,
                  "unigram_loss": unigram_loss(state.counts_V, heldout, tokenizer.n_vocab),
                  "heldout_tokens": sum(x_BT[:, 1:].numel() for x_BT in heldout), "steps": state.step,
                  "tokens_trained": tokens, "wall_time_s": round(state.elapsed_s, 2),
                  "tokens_per_s": round(tokens / max(state.elapsed_s, 1e-9), 1), "device": str(device),
                  "autocast": str(dtype), "n_params": model.num_params(non_embedding=False)}
        atomic_write_json(out_dir / RESULT_FILE, result)
        tracker.log(state.step, {f"final/{k}": v for k, v in result.items() if isinstance(v, (int, float))})
    finally:
        if own_tracker:
            tracker.close()
    return result


class _Throughput:
    """Tokens/s over the steps since the last read, with held-out evaluation time left out."""

    def __init__(self) -> None:
        self.t, self.tokens, self.paused = time.perf_counter(), 0, 0.0

    def read(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t - self.paused, 1e-9)
        self.t, self.tokens, self.paused = now, 0, 0.0
        return rate


def _step(fwd: torch.nn.Module, model: GPT, opt: torch.optim.Optimizer, x_BT: torch.Tensor, lr: float,
          tc: LMTrainConfig, dtype: torch.dtype | None, chunked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on the next-token loss of x_BT; returns (loss, grad norm before clipping)."""
    for group in opt.param_groups:
        group["lr"] = lr
    with _autocast(x_BT.device, dtype):
        _, loss = fwd(x_BT[:, :-1], x_BT[:, 1:], return_logits=not chunked)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm


@dataclass
class _Run:
    """What the training loop works with and does not change: config, output, model, optimizer, data, tracker."""

    cfg: Config
    out_dir: Path
    model: GPT
    opt: torch.optim.Optimizer
    batches: ContextBatches | PrefetchedBatches
    heldout: list[torch.Tensor]
    total_steps: int
    device: torch.device
    dtype: torch.dtype | None
    tracker: Any

    def heldout_loss(self) -> float:
        return heldout_loss(self.model, self.heldout, self.device, self.dtype)


def _loop(run: _Run, state: _State) -> None:
    """The training steps from state.step to total_steps, with held-out evals, logging and checkpoints."""
    t0, speed = time.perf_counter(), _Throughput()
    if state.step == 0:  # the untrained loss anchors the curve (~ln vocab_size)
        run.tracker.log(0, {"lm/heldout_loss": run.heldout_loss()})
        speed = _Throughput()
    bar = tqdm(total=run.total_steps, initial=state.step, desc="lm train", unit="step", disable=None)
    run.model.train()
    stop: list[int] = []  # SIGTERM/SIGINT: finish the step, checkpoint it, stop; a second one stops at once
    with signals_to(lambda signum: stop.append(signum) if not stop else _interrupt_now()):
        _steps(run, state, bar, stop, t0, speed)
    bar.close()
    if state.step < run.total_steps:
        tqdm.write(f"lm train: data.source ran out after {state.step}/{run.total_steps} steps (data.loop is false)")
        state.last_heldout = run.heldout_loss()
    state.elapsed_s += time.perf_counter() - t0


def _interrupt_now() -> None:
    raise KeyboardInterrupt


def _steps(run: _Run, state: _State, bar: Any, stop: list[int], t0: float, speed: _Throughput) -> None:
    """_loop's steps: log, evaluate and checkpoint on their schedules; after a stop signal, checkpoint the step
    and raise TrainingInterrupted naming the command that continues."""
    tc, device, total_steps = run.cfg.lm_train, run.device, run.total_steps
    fwd = torch.compile(run.model) if tc.compile else run.model
    # on CPU the [B, T, 50304] logits cost more than the unembedding matmul: compute the loss chunk by chunk
    chunked = device.type == "cpu" and not tc.compile
    for x_BT in itertools.islice(run.batches, total_steps - state.step):
        state.counts_V += torch.bincount(x_BT.flatten(), minlength=run.cfg.lm.vocab_size)
        lr = lr_at(state.step, total_steps, tc)
        loss, grad_norm = _step(fwd, run.model, run.opt, x_BT.to(device, non_blocking=True), lr, tc, run.dtype,
                                chunked)
        state.step += 1
        speed.tokens += x_BT.numel()
        done = state.step == total_steps
        if state.step % tc.log_every == 0 or done:
            tok_s = speed.read()
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tok_s:,.0f}")
            run.tracker.log(state.step, {"lm/loss": loss.item(), "lm/lr": lr, "lm/grad_norm": float(grad_norm),
                                         "lm/tokens_per_s": tok_s})
        if state.step % tc.eval_every == 0 or done:
            e0 = time.perf_counter()
            state.last_heldout = run.heldout_loss()
            speed.paused += time.perf_counter() - e0
            run.tracker.log(state.step, {"lm/heldout_loss": state.last_heldout})
        if state.step % tc.checkpoint_every == 0 or done or stop:
            _checkpoint(run, state, state.elapsed_s + time.perf_counter() - t0)
        bar.update(1)
        if stop and not done:
            bar.close()
            raise TrainingInterrupted(stop[0], state.step, run.out_dir, command=f"sae-stream lm train "
                                      f"{run.out_dir / 'config.yaml'} --out {run.out_dir} --resume")


def main(argv: Sequence[str] | None = None) -> int:
    """`sae-stream lm train` under another name: the same run, output checks and one-line errors."""
    from sae_stream.cli import main as cli_main
    from sae_stream.config import default_config_path

    parser = argparse.ArgumentParser(prog="python -m lm.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output run dir")
    parser.add_argument("--config", default=None, help="YAML config (default: the embedded default)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    args, rest = parser.parse_known_args(argv)
    config = args.config or str(default_config_path())
    return cli_main(["lm", "train", config, "--out", args.out, *(["--resume"] if args.resume else []), *rest])


if __name__ == "__main__":
    raise SystemExit(main())
