"""A trained run from Python (a notebook): its LM, SAE and tokenizer, and the SAE's features of any text.

    from sae_stream import load_run
    run = load_run("runs/run-20261127-151647")             # a run directory, or a sweep's RUN_DIR/<name>
    feats_TF = run.features("The cat sat on the mat.")     # [text tokens, d_sae]
    for token, top in run.top_features("The cat sat on the mat.", k=5):
        print(repr(token), top)                            # [(feature, activation), ...], strongest first
    run.loss("The cat sat on the mat.")                    # {"clean": ..., "sae": ...} next-token CE, nats
    run.steer(161, "5x", prompt="The")                     # samples, clean and with feature 161 pinned
    run.steer([161, 40], ["5x", 0])                        # several features pinned together

Text is tokenized as in training (documents follow an end-of-text token), so the text's first token sits at
position 1: with `buffer.skip_first_position` (the default) the SAE never saw position 0, which holds the
end-of-text token here and is left out of what these return.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_stream.analysis.dashboard import FEATURES_JSON
from sae_stream.analysis.hooks import hook_activations, sae_decode, sae_features, spliced_logits
from sae_stream.analysis.steering import as_features, check_steer, max_activation, pin_value, pin_values, steer
from sae_stream.config import Config, ConfigError
from sae_stream.data import heldout_batches
from sae_stream.report import DASHBOARD_DIR, SELECTED_DASHBOARD_DIR, load_trained
from sae_stream.rundir import UserError, require_run_dir
from sae_stream.tokenizer import Tokenizer, get_tokenizer

STEER_SCAN_TOKENS = 65_536  # held-out tokens scanned for a feature's largest activation ("Nx" pin values)
DEFAULT_PIN = "5x"


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
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
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

    def steer(self, feature: int | list[int], value: float | str | list[float | str] = DEFAULT_PIN, prompt: str = "",
              n_tokens: int = 40, samples: int = 3, temperature: float = 1.0, seed: int = 0) -> dict[str, Any]:
        """Samples after `prompt` from the clean LM and with `feature` pinned at `value` (analysis/steering.py):
        a number, or "Nx" for N times the feature's largest activation on up to STEER_SCAN_TOKENS held-out tokens.
        Several features (a list) are pinned together, at one value or one each. Returns the texts, the values
        used and, for "Nx", the largest activations (None for a feature given a number) and the tokens scanned."""
        features, several = as_features(feature)
        pins = [pin_value(v) for v in pin_values(value, len(features))]
        tokens_1T = self._tokens(prompt) if prompt else self.tokens_eot()
        check_steer(self.model, self.sae, self.hook_name, tokens_1T.shape[1], features, n_tokens, samples, temperature)
        result: dict[str, Any] = {"feature": features if several else features[0], "prompt": prompt}
        scanned, tops = [f for f, (_, multiple) in zip(features, pins) if multiple], [None] * len(features)
        if scanned:
            scan = max(STEER_SCAN_TOKENS, self.cfg.data.context_len)  # (at least one context)
            batches = heldout_batches(self.cfg.data, self.cfg.eval.batch_contexts, scan, what="the steering scan")
            found, seen = max_activation(self.model, self.sae, self.hook_name, batches, scanned, scan,
                                         self.cfg.eval.batch_contexts, self.cfg.buffer.skip_first_position)
            for f, top in zip(scanned, found):
                if top <= 0:
                    raise ValueError(f"feature {f} did not fire on {seen:,} held-out tokens, so a multiple of its "
                                     "largest activation is 0: give its value as a number")
            tops = [dict(zip(scanned, found)).get(f) for f in features]
            result.update(max_activation=tops if several else tops[0], scanned_tokens=seen)
        numbers = [n * top if multiple else n for (n, multiple), top in zip(pins, tops)]
        out = steer(self.model, self.sae, self.hook_name, tokens_1T, features if several else features[0],
                    numbers if several else numbers[0], self.tokenizer.n_vocab, n_tokens, samples, temperature, seed,
                    self.cfg.buffer.skip_first_position)
        text = self.tokenizer.decode
        return {**result, "value": list(out.value) if several else out.value, "temperature": temperature,
                "seed": seed, "clean": [text(row.tolist()) for row in out.clean_SN],
                "pinned": [text(row.tolist()) for row in out.pinned_SN]}

    def tokens_eot(self) -> Tensor:
        """LongTensor[1, 1]: the end-of-text token alone (a document's start: the empty prompt)."""
        return torch.tensor([[self.tokenizer.eot]], device=self.model.W_U.device)


def _next_token_ce(logits_1TV: Tensor, tokens_1T: Tensor) -> float:
    return float(F.cross_entropy(logits_1TV[0, :-1].float(), tokens_1T[0, 1:]))


def load_run(run_dir: str | Path, device: str | None = None) -> TrainedRun:
    """The LM, SAE and tokenizer of a trained run (`sae-stream run` / `train`), on `device` (default: the run's
    train.device, i.e. the GPU when there is one)."""
    overrides = [f"--train.device={device}"] if device else []
    try:
        return _trained_run(run_dir, overrides)
    except ConfigError as e:
        raise ConfigError(str(e).replace("--train.device=", "device=").replace("train.device", "device")) from None


def _trained_run(run_dir: str | Path, overrides: list[str]) -> TrainedRun:
    path = require_run_dir(run_dir)
    cfg, model, sae = load_trained(path, overrides)
    return TrainedRun(cfg, model, sae.eval(), get_tokenizer(cfg.data.tokenizer), path)


def print_steering(run_dir: str | Path, overrides: list[str], feature: int | list[int],
                   value: str | list[str] = DEFAULT_PIN, prompt: str = "", n_tokens: int = 40, samples: int = 3,
                   temperature: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """`sae-stream steer`: TrainedRun.steer on a run directory, printed one sample a line."""
    r = _trained_run(run_dir, overrides).steer(feature, value, prompt, n_tokens, samples, temperature, seed)
    if isinstance(feature, list):  # features 3, 9 pinned at 1.2 (5x its largest activation, 0.24), 0; ...
        given = pin_values(value, len(feature))
        pins = [f"{v:.4g}" + (f" ({g} its largest activation, {top:.4g})" if top is not None else "")
                for v, g, top in zip(r["value"], given, r.get("max_activation", [None] * len(feature)))]
        scanned = f", on {r['scanned_tokens']:,} held-out tokens" if "scanned_tokens" in r else ""
        head = f"features {', '.join(map(str, feature))} pinned together at {', '.join(pins)}{scanned}"
    else:
        how = (f" ({value} its largest activation, {r['max_activation']:.4g}, on {r['scanned_tokens']:,} held-out "
               "tokens)") if "max_activation" in r else ""
        head = f"feature {feature} pinned at {r['value']:.4g}{how}"
    print(f"{head}; {samples} samples of {n_tokens} tokens, temperature {temperature:g}, seed {seed}, after the "
          f"prompt {prompt!r}")
    for label in ("clean", "pinned"):
        for i, text in enumerate(r[label], 1):
            print(f"{label:>6} {i}: {text!r}")
    return r


def dashboard_features(run_dir: Path) -> set[int]:
    """The features that have a panel in the run's dashboard (none when it has no dashboard): from its
    features.json, or the page itself for a dashboard built before that file was written."""
    data, page = run_dir / DASHBOARD_DIR / FEATURES_JSON, run_dir / DASHBOARD_DIR / "index.html"
    if data.is_file():
        return {f["feature"] for f in json.loads(data.read_text())["features"]}
    return {int(f) for f in re.findall(r'<section class="feature" id="f(\d+)"', page.read_text())} \
        if page.is_file() else set()


def print_features(run_dir: str | Path, overrides: list[str], text: str, k: int = 5) -> list:
    """`sae-stream features`: TrainedRun.top_features of a text, a token a line, then which of those features the
    run's dashboard shows and the `analyze` line for a dashboard of them all."""
    if k < 1:
        raise UserError(f"--k must be at least 1, got {k}")
    if not text:
        raise UserError("--text is empty: give the text whose features to list")
    run = _trained_run(run_dir, overrides)
    rows = run.top_features(text, k)
    print(f"{len(rows)} tokens, their top {k} features at {run.hook_name} (feature: activation; the SAE reads the "
          f"text after an end-of-text token, as in training)")
    width = max((len(repr(token)) for token, _ in rows), default=0)
    for i, (token, top) in enumerate(rows):
        shown = "  ".join(f"{f}: {v:.3g}" for f, v in top) or "(none active)"
        print(f"{i:>4} {repr(token):<{width}}  {shown}")
    seen = sorted({f for _, top in rows for f, _ in top})
    shown = dashboard_features(run.run_dir)
    page = run.run_dir / DASHBOARD_DIR / "index.html"
    if seen and shown & set(seen):
        print(f"in the dashboard: {', '.join(str(f) for f in seen if f in shown)} ({page}#f<feature>)")
    if any(f not in shown for f in seen):  # (analyze --features builds a dashboard of exactly those)
        print(f"a dashboard of them all (in {SELECTED_DASHBOARD_DIR}/): sae-stream analyze {run.run_dir} --features "
              f"{','.join(map(str, seen))}")
    return rows
