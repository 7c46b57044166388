"""A trained run from Python (a notebook): its LM, SAE and tokenizer, and the SAE's features of any text.

    from sae_stream import load_run
    run = load_run("runs/run-20261127-151647")             # a run directory, or a sweep's RUN_DIR/<name>
    feats_TF = run.features("The cat sat on the mat.")     # [text tokens, d_sae]
    for token, top in run.top_features("The cat sat on the mat.", k=5):
        print(repr(token), top)                            # [(feature, activation), ...], strongest first
    run.loss("The cat sat on the mat.")                    # {"clean": ..., "sae": ...} next-token CE, nats

Text is tokenized as in training (documents follow an end-of-text token), so the text's first token sits at
position 1: with `buffer.skip_first_position` (the default) the SAE never saw position 0, which holds the
end-of-text token here and is left out of what these return.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_stream.analysis.hooks import hook_activations, sae_decode, sae_features, spliced_logits
from sae_stream.config import Config, ConfigError
from sae_stream.report import load_trained
from sae_stream.rundir import require_run_dir
from sae_stream.tokenizer import Tokenizer, get_tokenizer


@dataclass
class TrainedRun:
    cfg: Config
    model: Any  # transformer_lens.HookedTransformer
    sae: Any  # sae_stream.sae.SAE, in eval mode
    tokenizer: Tokenizer
    run_dir: Path

    @property
    def hook_name(self) -> str:
        return self.cfg.buffer.hook_name

    def tokens(self, text: str) -> Tensor:
        """LongTensor[1, T]: end-of-text, then the text's tokens (cut to the LM's context)."""
        return self._tokens(text)

    def _tokens(self, text: str) -> Tensor:
        """tokens(), called by a public method: its warnings point at the line that called that method."""
        ids = [self.tokenizer.eot, *self.tokenizer.encode(text)]
        n_ctx, trained = self.model.cfg.n_ctx, self.cfg.data.context_len
        if len(ids) > n_ctx:
            warnings.warn(f"the LM reads {n_ctx} tokens: using the text's first {n_ctx - 1} of its {len(ids) - 1} "
                          "tokens", stacklevel=3)
            ids = ids[:n_ctx]
        if len(ids) > trained:
            warnings.warn(f"the SAE was trained on positions < data.context_len={trained}: the text's tokens past "
                          f"its first {trained - 1} sit where it never looked", stacklevel=3)
        if len(ids) < 2:
            raise ValueError("the text has no tokens: pass some text")
        return torch.tensor([ids], device=self.model.W_U.device)

    def features(self, text: str) -> Tensor:
        """The SAE's feature activations at each of the text's tokens, [T, d_sae] (float32, on the CPU)."""
        return self._features(self._tokens(text))

    @torch.no_grad()
    def _features(self, tokens_1T: Tensor) -> Tensor:
        x_1TD = hook_activations(self.model, self.hook_name, tokens_1T)
        return sae_features(self.sae, x_1TD)[0, 1:].float().cpu()

    def top_features(self, text: str, k: int = 5) -> list[tuple[str, list[tuple[int, float]]]]:
        """For each of the text's tokens, its `k` most active features (active ones only), strongest first."""
        tokens_1T = self._tokens(text)
        feats_TF = self._features(tokens_1T)
        names = self.tokenizer.decode_tokens(tokens_1T[0, 1:].tolist())
        values_TK, index_TK = feats_TF.topk(min(k, feats_TF.shape[1]), dim=1)
        return [(name, [(int(f), float(v)) for v, f in zip(vals, idx) if v > 0])
                for name, vals, idx in zip(names, values_TK, index_TK)]

    def loss(self, text: str) -> dict[str, float]:
        """Mean next-token cross-entropy over the text's tokens, clean and with the SAE's reconstruction spliced in
        at the hook (positions past the first, as in eval)."""
        tokens_1T = self._tokens(text)

        def through_sae(x_BTD: Tensor) -> Tensor:
            return sae_decode(self.sae, sae_features(self.sae, x_BTD), x_BTD)

        with torch.no_grad():  # (not a decorator: the warnings above would point into torch)
            clean = self.model(tokens_1T)
            spliced = spliced_logits(self.model, self.hook_name, tokens_1T, through_sae,
                                     skip_first_position=self.cfg.buffer.skip_first_position)
        return {"clean": _next_token_ce(clean, tokens_1T), "sae": _next_token_ce(spliced, tokens_1T)}


def _next_token_ce(logits_1TV: Tensor, tokens_1T: Tensor) -> float:
    return float(F.cross_entropy(logits_1TV[0, :-1].float(), tokens_1T[0, 1:]))


def load_run(run_dir: str | Path, device: str | None = None) -> TrainedRun:
    """The LM, SAE and tokenizer of a trained run (`sae-stream run` / `train`), on `device` (default: the run's
    train.device, i.e. the GPU when there is one)."""
    path = require_run_dir(run_dir)
    overrides = [f"--train.device={device}"] if device else []
    try:
        cfg, model, sae = load_trained(path, overrides)
    except ConfigError as e:
        raise ConfigError(str(e).replace("--train.device=", "device=").replace("train.device", "device")) from None
    return TrainedRun(cfg, model, sae.eval(), get_tokenizer(cfg.data.tokenizer), path)
