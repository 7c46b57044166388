"""Render a feature dashboard in headless Chromium: report JavaScript errors and write a screenshot.

    python tests/browser_check.py [--out DIR] [--html PATH]

Without --html it first builds a small dashboard (tiny random 1-layer model on byte tokens of a fixed text,
an SAE with a few single-token detector features plus random ones) into DIR. Errors are detected by the
dashboard's own trap (`data-js-errors` on <html>, set by window.onerror / unhandledrejection / console.error)
read from Chromium's `--dump-dom`, plus the page's `data-ready="1"` mark that its script ran to the end.
Chromium: Debian's `chromium` package (`apt-get install -y chromium`).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         "--virtual-time-budget=3000"]
TEXT = ("The quick brown fox jumps over the lazy dog.\n<b>Tags</b> & \"quotes\" stay escaped: if (a < b) { x = 'y'; }\n"
        "Sparse autoencoders find features in the activations of a language model. Each feature fires on a few\n"
        "tokens: a space, a newline, the letter e, an angle bracket <, an ampersand &.\tTabs too.\n") * 6


@dataclass
class BrowserReport:
    errors: list[str]
    ready: bool
    screenshot: Path

    @property
    def ok(self) -> bool:
        return self.ready and not self.errors


class DetectorSAE(nn.Module):
    """Features 0..n_det-1 fire on one byte each (cosine with its embedding); the rest are random ReLU units."""

    def __init__(self, embed_VD: torch.Tensor, detect: Sequence[int], n_random: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = embed_VD.shape[1]
        dirs = embed_VD[list(detect)] / embed_VD[list(detect)].norm(dim=1, keepdim=True)
        self.W_enc_DF = nn.Parameter(torch.cat([dirs.T * 10, torch.randn(d, n_random, generator=g) / d**0.5], 1))
        self.b_enc_F = nn.Parameter(torch.cat([torch.full((len(detect),), -9.9), torch.full((n_random,), -0.25)]))
        self.W_dec_FD = nn.Parameter(torch.randn(len(detect) + n_random, d, generator=g) / d**0.5)
        self.b_dec_D = nn.Parameter(torch.zeros(d))
        self.d_in, self.d_sae = d, len(detect) + n_random

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        x_BD = x_BD / x_BD.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return torch.relu(x_BD @ self.W_enc_DF + self.b_enc_F)

    def decode(self, feats_BF: torch.Tensor) -> torch.Tensor:
        return feats_BF @ self.W_dec_FD + self.b_dec_D


def build_demo(out_dir: Path) -> Path:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from sae_stream.analysis.dashboard import build_dashboard
    from sae_stream.config import AnalysisConfig
    from sae_stream.tokenizer import get_tokenizer

    tok = get_tokenizer("byte")
    model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=32, n_ctx=64, d_head=8, n_heads=4,
                                                      d_mlp=64, d_vocab=tok.n_vocab, act_fn="relu", seed=0))
    model.eval()
    ids = torch.tensor(tok.encode(TEXT))
    n_ctx = ids.numel() // 48
    batches = list(ids[: n_ctx * 48].view(n_ctx, 48).split(8))
    sae = DetectorSAE(model.W_E.detach(), [ord(c) for c in " \ne<&"], n_random=27)
    cfg = AnalysisConfig(features=32, top_k=8, window=14, tokens=100_000, batch_contexts=8, logit_k=6)
    # A high ultra-low threshold so that both index tabs have features in this tiny demo.
    return build_dashboard(model, sae, "hook_embed", batches, tok, cfg, out_dir, ultralow_threshold=0.02)


def _chromium(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout, check=False)


def check_page(html_path: Path, screenshot: Path, fragment: str = "") -> BrowserReport:
    """Load the page (optionally at #fragment), collect trapped JS errors, and save a 1280x900 screenshot."""
    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(f"{CHROMIUM} not found: apt-get update && apt-get install -y chromium")
    url = html_path.resolve().as_uri() + (f"#{fragment}" if fragment else "")
    dom = _chromium(["--dump-dom", url]).stdout
    html_tag = re.search(r"<html[^>]*>", dom)
    attrs = html_tag.group(0) if html_tag else ""
    errors = re.findall(r'data-js-error-\d+="([^"]*)"', attrs)
    if html_tag is None or 'data-js-errors="' not in attrs:
        errors.append("error trap did not run (no data-js-errors attribute)")
    ready = re.search(r'<body[^>]*data-ready="1"', dom) is not None
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    shot = _chromium([f"--screenshot={screenshot.resolve()}", "--window-size=1280,900", url])
    if not screenshot.is_file() or screenshot.stat().st_size == 0:
        errors.append(f"no screenshot written: {shot.stderr.strip()[-500:]}")
    return BrowserReport(errors, ready, screenshot)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "sae-stream-browser-check",
                        help="output directory (dashboard/ and dashboard.png)")
    parser.add_argument("--html", type=Path, default=None, help="an existing dashboard index.html")
    parser.add_argument("--fragment", default="f0", help="feature panel to open (#fragment)")
    args = parser.parse_args(argv)
    html_path = args.html or build_demo(args.out / "dashboard")
    report = check_page(html_path, args.out / "dashboard.png", args.fragment)
    if report.ok:
        print(f"no console errors; screenshot {report.screenshot}")
        return 0
    print(f"FAILED: ready={report.ready} errors={report.errors}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    if shutil.which(CHROMIUM) is None:
        print(f"{CHROMIUM} missing: apt-get update && apt-get install -y chromium", file=sys.stderr)
    sys.exit(main())
