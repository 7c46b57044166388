"""What each command does, wired from the parts: the composition root behind `cli.py`.

This is the one module of `sae_stream` that imports `lm` (to train or load the LM); the buffer, trainer,
SAE and evaluation never do, so each can be swapped or tested alone.

Run directory of `train` / `run`:
    config.yaml  metrics.jsonl  checkpoints/  sae/ (SAELens format)  eval.json  density_histogram.png
    feature_density.safetensors  dashboard/index.html  [lm/ when `run` trained the LM]
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

from sae_stream.activations import ActivationStream, check_hook_names, hook_dim
from sae_stream.buffer import ShuffleBuffer
from sae_stream.config import Config, load_config, save_config, to_dict
from sae_stream.data import ContextBatches, TokenContexts, heldout_batches
from sae_stream.evaluate import evaluate, load_feature_density, write_eval
from sae_stream.export import export_saelens, load_saelens
from sae_stream.process import resolve_device
from sae_stream.sae import build_sae
from sae_stream.tracking import Tracker
from sae_stream.trainer import Trainer

SAE_DIR, LM_DIR, DASHBOARD_DIR = "sae", "lm", "dashboard"


class UserError(RuntimeError):
    """A problem with what the user asked for; reported as one line, exit code 2."""


def prepare_out_dir(out: str | Path | None, command: str, overwrite: bool) -> Path:
    """A fresh output directory; an existing non-empty one needs --overwrite (or --resume)."""
    path = Path(out) if out else Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not overwrite:
            raise UserError(f"output directory {str(path)!r} exists: pass --overwrite to replace it, "
                            f"--resume to continue it, or choose another --out")
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _require_run_dir(run_dir: str | Path) -> Path:
    path = Path(run_dir)
    if not (path / "config.yaml").is_file():
        raise UserError(f"{str(path)!r} is not a run directory (no config.yaml): pass the --out of `sae-stream train`")
    return path


def load_lm(path_or_name: str, device: torch.device) -> Any:
    from lm.hooked import load_hooked  # the CLI's composition root is the one place that imports lm

    return load_hooked(path_or_name, device=device)


def native_capture(cfg: Config, device: torch.device) -> Any:
    """lm.capture.GPTCapture when buffer.lm_native holds, the LM is an `lm train` run dir and the hook is a block
    point it computes; else None (the stream then reads transformer-lens hooks)."""
    path = Path(str(cfg.lm.path)).expanduser()
    if not cfg.buffer.lm_native or not path.is_dir():
        return None
    from lm.capture import GPTCapture, supported
    from lm.model import GPT

    gpt = GPT.from_run_dir(path, device=device)
    return GPTCapture(gpt, [cfg.buffer.hook_name]) if supported(gpt, [cfg.buffer.hook_name]) else None


def list_hooks(lm_path: str) -> list[str]:
    from lm.hooked import hook_names

    return hook_names(load_lm(lm_path, torch.device("cpu")))


# ---------------------------------------------------------------------------------------------- LM


def lm_train(config: str | None, overrides: list[str], out: str | None, resume: bool = False,
             overwrite: bool = False) -> Path:
    cfg = load_config(config, overrides)
    if resume:
        if not out:
            raise UserError("--resume needs --out DIR: the LM run to continue")
        out_dir = Path(out)
        if not (out_dir / "checkpoints").is_dir():
            raise UserError(f"{out!r} has no checkpoints/ to resume from")
    else:
        out_dir = prepare_out_dir(out, "lm", overwrite)
    _train_lm(cfg, out_dir, resume)
    return out_dir


def _train_lm(cfg: Config, out_dir: Path, resume: bool = False) -> None:
    from lm.train import train_lm  # the composition root is the one place that imports lm

    result = train_lm(cfg, out_dir, resume=resume)
    print(f"LM: held-out loss {result.get('heldout_loss', float('nan')):.4f} "
          f"(unigram baseline {result.get('unigram_loss', float('nan')):.4f}) -> {out_dir}")


# ---------------------------------------------------------------------------------------------- SAE training


class Session:
    """The live parts of one SAE training run: LM, text stream, activation stream, ring buffer, SAE, trainer."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        if not cfg.lm.path:
            raise UserError("no LM given: pass --lm PATH_OR_NAME "
                            "(an `sae-stream lm train` dir or a transformer-lens name)")
        self.cfg, self.run_dir = cfg, run_dir
        self.device = resolve_device(cfg.train.device)
        self.model = load_lm(cfg.lm.path, self.device)
        hook = cfg.buffer.hook_name
        check_hook_names(self.model, [hook])
        self.d_in = hook_dim(self.model, hook, cfg.data.context_len)
        if cfg.sae.d_in is not None and cfg.sae.d_in != self.d_in:
            raise UserError(f"sae.d_in={cfg.sae.d_in} does not match hook {hook!r} (width {self.d_in}): "
                            f"set --sae.d_in={self.d_in} or leave it null")
        self.contexts = TokenContexts(cfg.data, "train")
        tokens = ContextBatches(self.contexts, cfg.buffer.lm_batch_size)
        self.stream = ActivationStream(self.model, [hook], tokens, cfg.buffer, self.device, seed=cfg.train.seed,
                                       context_len=cfg.data.context_len, capture=native_capture(cfg, self.device))
        self.buffer = ShuffleBuffer(self.stream, cfg.buffer, self.device, d_in=self.d_in, seed=cfg.train.seed)
        self.sae = build_sae(cfg.sae, self.d_in, seed=cfg.train.seed).to(self.device)
        self.tracker = Tracker(run_dir, cfg.wandb, to_dict(cfg))
        pool_dtype = getattr(torch, cfg.resample.pool_dtype)
        self.trainer = Trainer(self.sae, cfg, run_dir, self.tracker,
                               pool_fn=lambda n: self.buffer.sample_pool(n, dtype=pool_dtype),
                               extra_state=lambda: {"buffer": self.buffer.state_dict()},
                               extra_metrics=self.buffer.metrics)

    def fit(self) -> dict[str, Any]:
        try:
            metrics = self.trainer.fit(self.buffer.batches(self.cfg.train.batch_size))
        finally:
            self.tracker.close()
        export_saelens(self.sae, self.run_dir / SAE_DIR, self.cfg.buffer.hook_name,
                       log10_density=self.trainer.log10_density(),
                       model_name=str(self.cfg.lm.path),
                       extra_cfg={"context_size": self.cfg.data.context_len, "dataset_path": self.cfg.data.source})
        return metrics


def train(config: str | None, overrides: list[str], lm: str | None = None, out: str | None = None,
          overwrite: bool = False) -> Path:
    if lm:
        overrides = [*overrides, f"--lm.path={_abs_lm(lm)}"]
    cfg = load_config(config, overrides)
    run_dir = prepare_out_dir(out, "train", overwrite)
    save_config(cfg, run_dir / "config.yaml")
    session = Session(cfg, run_dir)
    _report_training(session.fit(), run_dir)
    return run_dir


def train_resume(run_dir: str | Path) -> Path:
    run_dir = _require_run_dir(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    session = Session(cfg, run_dir)
    extra = session.trainer.resume(run_dir)
    if "buffer" in extra:
        session.buffer.load_state_dict(extra["buffer"])
    print(f"resuming {run_dir} at step {session.trainer.step}")
    _report_training(session.fit(), run_dir)
    return run_dir


def _abs_lm(lm: str) -> str:
    """A local LM dir is stored absolute in config.yaml so the run can be resumed from anywhere."""
    return str(Path(lm).resolve()) if Path(lm).exists() else lm


def _report_training(metrics: dict[str, Any], run_dir: Path) -> None:
    keys = ("mse", "fvu", "l0", "dead", "tokens_per_s")
    shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), (int, float)))
    print(f"SAE trained: {shown} -> {run_dir / SAE_DIR}")


# ---------------------------------------------------------------------------------------------- eval, analyze


def _load_trained(run_dir: Path, overrides: list[str]) -> tuple[Config, Any, Any]:
    cfg = load_config(run_dir / "config.yaml", overrides)
    if not (run_dir / SAE_DIR / "cfg.json").is_file():
        raise UserError(f"{run_dir} has no trained SAE in {SAE_DIR}/: run or resume `sae-stream train` first")
    device = resolve_device(cfg.train.device)
    model = load_lm(cfg.lm.path, device)
    sae = load_saelens(run_dir / SAE_DIR, device=device)
    return cfg, model, sae


def evaluate_run(run_dir: str | Path, overrides: list[str] | None = None, loaded: tuple | None = None) -> dict:
    run_dir = _require_run_dir(run_dir)
    cfg, model, sae = loaded or _load_trained(run_dir, overrides or [])
    batches = heldout_batches(cfg.data, cfg.eval.batch_contexts, cfg.eval.tokens)
    result = evaluate(model, sae, cfg.buffer.hook_name, batches, cfg.eval, cfg.train,
                      skip_first_position=cfg.buffer.skip_first_position)
    path = write_eval(run_dir, result, cfg.eval.histogram_bins)
    _print_eval(result, path)
    return result


def _print_eval(r: dict[str, Any], path: Path) -> None:
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    ce, rec = r["ce_loss"], r["ce_loss_recovered"]
    print(f"eval: {r['tokens']} tokens, L0 {fmt(r['l0'])}, FVU {fmt(r['fvu'])}, CE clean {fmt(ce['clean'])} / "
          f"SAE {fmt(ce['sae'])} / zero-abl {fmt(ce['zero_ablation'])} / mean-abl {fmt(ce['mean_ablation'])}, "
          f"loss recovered {fmt(rec['zero'])} (vs zero) {fmt(rec['mean'])} (vs mean), KL {fmt(r['kl_clean_sae'])}")
    d = r.get("density", {})
    print(f"eval: dead {d.get('dead')}, ultra-low {d.get('ultralow')}, dense {d.get('dense')} of {d.get('d_sae')} "
          f"features -> {path}")


def analyze_run(run_dir: str | Path, overrides: list[str] | None = None, loaded: tuple | None = None) -> Path:
    from sae_stream.analysis.dashboard import build_dashboard
    from sae_stream.tokenizer import get_tokenizer

    run_dir = _require_run_dir(run_dir)
    cfg, model, sae = loaded or _load_trained(run_dir, overrides or [])
    densities = load_feature_density(run_dir) if (run_dir / "eval.json").is_file() else None
    batches = heldout_batches(cfg.data, cfg.eval.batch_contexts, cfg.analysis.tokens)
    path = build_dashboard(model, sae, cfg.buffer.hook_name, batches, get_tokenizer(cfg.data.tokenizer), cfg.analysis,
                           run_dir / DASHBOARD_DIR, densities, ultralow_threshold=cfg.train.ultralow_threshold,
                           skip_first_position=cfg.buffer.skip_first_position)
    print(f"dashboard: {path}")
    return path


# ---------------------------------------------------------------------------------------------- the main job


def run(config: str | None, overrides: list[str], lm: str | None = None, out: str | None = None,
        overwrite: bool = False, analyze: bool = True) -> Path:
    """Text -> LM (trained here unless given) -> streamed SAE -> eval -> dashboard, in one run directory."""
    t0 = time.perf_counter()
    cfg = load_config(config, overrides)  # validate everything before touching the disk
    run_dir = prepare_out_dir(out, "run", overwrite)
    if lm:
        lm_path = _abs_lm(lm)
    elif cfg.lm.path:
        lm_path = _abs_lm(cfg.lm.path)
    else:
        lm_dir = run_dir / LM_DIR
        _train_lm(cfg, lm_dir)
        lm_path = str(lm_dir.resolve())
    cfg = load_config(config, [*overrides, f"--lm.path={lm_path}"])
    save_config(cfg, run_dir / "config.yaml")
    session = Session(cfg, run_dir)
    _report_training(session.fit(), run_dir)
    loaded = (cfg, session.model, load_saelens(run_dir / SAE_DIR, device=session.device))
    del session
    evaluate_run(run_dir, loaded=loaded)
    if analyze:
        analyze_run(run_dir, loaded=loaded)
    print(f"done in {time.perf_counter() - t0:.0f}s: run directory {run_dir.resolve()}")
    return run_dir
