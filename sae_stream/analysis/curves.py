"""Training curves as one PNG: what a researcher without wandb would otherwise read off metrics.jsonl.

    plot_training_curves(read_records(run_dir / "metrics.jsonl"), run_dir / "training_curves.png")   # tracking's

`curve_panels` turns the records into the series drawn (pure data, tested); `plot_training_curves` draws them.
SAE runs are drawn against tokens trained, with a dotted line where neuron resampling happened; `lm train` runs
against steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from sae_stream.analysis.plots import save_png

# (title, metric keys, log y-axis if every value is > 0); a key ending in * stands for every key it starts (in the
# order of their numbers: a Matryoshka SAE's fvu_first_64, fvu_first_256, ...)
SAE_PANELS = (
    ("reconstruction (FVU)", ("fvu", "fvu_first_*"), True),  # (fvu_first_m: a Matryoshka prefix's)
    ("L0 (features active per token)", ("l0",), True),
    ("loss", ("loss", "mse"), True),
    ("features (dead; dense)", ("dead", "dense"), False),
    ("learning rate", ("lr",), True),
    ("sparsity coefficient λ", ("l1_coeff",), True),
    ("throughput (tokens/s)", ("tokens_per_s",), False),
)
LM_PANELS = (
    ("loss (nats/token)", ("lm/loss", "lm/heldout_loss"), False),
    ("learning rate", ("lm/lr",), False),
    ("gradient norm (before clipping)", ("lm/grad_norm",), True),
)


@dataclass
class Panel:
    title: str
    series: dict[str, tuple[list[float], list[float]]]  # key: (xs, ys), in record order
    log: bool


@dataclass
class Curves:
    x_label: str
    panels: list[Panel]
    resampled_at: list[float] = field(default_factory=list)  # x of the first record after each resampling


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def curve_panels(records: list[dict[str, Any]], panels: tuple = SAE_PANELS, x_key: str = "tokens") -> Curves:
    """The series to draw: for each panel, each of its keys that some record has, against `x_key` (records
    without a numeric x are left out). Panels with no data are dropped."""
    rows = [(x, r) for r in records if (x := _number(r.get(x_key))) is not None]
    out = []
    for title, keys, log in panels:
        series = {}
        for key in _expand(keys, records):
            pts = [(x, y) for x, r in rows if (y := _number(r.get(key))) is not None]
            if pts:
                series[key] = ([p[0] for p in pts], [p[1] for p in pts])
        if series:
            positive = all(y > 0 for _, ys in series.values() for y in ys)
            out.append(Panel(title, series, log and positive))
    resampled_at, before = [], 0.0
    for x, r in rows:
        count = _number(r.get("resampled"))
        if count is not None and count > before:
            resampled_at.append(x)
        before = count if count is not None else before
    return Curves(x_key, out, resampled_at)


def _expand(keys: tuple[str, ...], records: list[dict[str, Any]]) -> list[str]:
    """`keys` with each `prefix*` replaced by the records' keys that start with it, by their trailing number."""
    out = []
    for key in keys:
        if not key.endswith("*"):
            out.append(key)
            continue
        found = {k for r in records for k in r if k.startswith(key[:-1])}
        out += sorted(found, key=lambda k: (len(k), k))  # (fvu_first_64 before fvu_first_256)
    return out


def plot_training_curves(records: list[dict[str, Any]], path: str | Path, panels: tuple = SAE_PANELS,
                         x_key: str = "tokens", title: str = "SAE training") -> Path | None:
    """Write the curves of `records` to the PNG `path` atomically; None (nothing written) if there is no data."""
    curves = curve_panels(records, panels, x_key)
    if not curves.panels:
        return None
    cols = min(3, len(curves.panels))
    rows = math.ceil(len(curves.panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), dpi=100)  # no pyplot: no global backend state
    for i, panel in enumerate(curves.panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for key, (xs, ys) in panel.series.items():
            ax.plot(xs, ys, label=key, linewidth=1.2, marker="." if len(xs) < 30 else None)
        for x in curves.resampled_at:
            ax.axvline(x, color="#c0392b", linestyle=":", linewidth=0.9)
        if panel.log:
            ax.set_yscale("log")
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel(curves.x_label, fontsize=8)
        ax.tick_params(labelsize=7)
        if len(panel.series) > 1:
            ax.legend(fontsize=7)
    note = " (dotted: neuron resampling)" if curves.resampled_at else ""
    fig.suptitle(title + note, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)
