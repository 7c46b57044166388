"""The one seam between `sae_stream` and `lm/`: every use of the project's own LM goes through here.

The buffer, trainer, SAE and evaluation never import `lm`; they see a transformer-lens `HookedTransformer` (ours,
or any other by name). The commands (pipeline.py, report.py) load, train or capture from our LM only through these
functions, so `sae_stream` works the same on a model `lm/` knows nothing about.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sae_stream.config import Config
from sae_stream.hook_points import trainable_hooks
from sae_stream.step import resolve_kernels


def load_lm(path_or_name: str, device: torch.device) -> Any:
    """A HookedTransformer: an `lm train` run directory, or a transformer-lens model name."""
    from lm.hooked import load_hooked

    return load_hooked(path_or_name, device=device)


def lm_run_config(path_or_name: str | None) -> Config | None:
    """The config an `lm train` run directory was trained with (its config.yaml); None for a transformer-lens name
    (or no LM)."""
    from lm.model import WEIGHTS_FILE, read_run_config

    run_dir = Path(str(path_or_name)).expanduser() if path_or_name else None
    if run_dir is None or not (run_dir / WEIGHTS_FILE).is_file():  # (no LM there: loading it says so)
        return None
    return read_run_config(run_dir)


def list_hooks(lm_path: str) -> list[str]:
    """'NAME<tab>WIDTH' for each hook an SAE can train on (a vector of WIDTH per position), in module order, the
    optional ones (attn.hook_result, hook_mlp_in, ...: switched on when asked for) included. Left out: the
    unembedding's (the stream stops before the logits), attention patterns / scores, one-number hook_scale."""
    return [f"{name}\t{w}" for name, w in trainable_hooks(load_lm(lm_path, torch.device("cpu"))).items()]


def native_capture(cfg: Config, device: torch.device) -> Any:
    """lm.capture.GPTCapture when buffer.lm_native holds, the LM is an `lm train` run dir and the hook is a block
    point it computes; else None (the stream then reads transformer-lens hooks)."""
    path = Path(str(cfg.lm.path)).expanduser()
    if not cfg.buffer.lm_native or not path.is_dir():
        return None
    from lm.capture import GPTCapture, supported
    from lm.model import GPT

    gpt = GPT.from_run_dir(path, device=device)
    if not supported(gpt, [cfg.buffer.hook_name]):
        return None
    return GPTCapture(gpt, [cfg.buffer.hook_name], kernels=resolve_kernels(cfg.train.kernels, device))


def untrained_lm(cfg: Config) -> Any:
    """The GPT `lm train` would train, at its initialisation, as transformer-lens sees it (for input checks)."""
    from lm.hooked import to_hooked
    from lm.model import GPT

    return to_hooked(GPT(cfg.lm))


def train_lm(cfg: Config, out_dir: Path, resume: bool = False, started: Any = None) -> dict[str, Any]:
    """`lm train` into out_dir (lm/train.py); its final metrics."""
    from lm.train import train_lm as _train

    return _train(cfg, out_dir, resume=resume, started=started)
