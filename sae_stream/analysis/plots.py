"""The feature-density histogram (log10 of the fraction of tokens each feature fires on), and a sweep's
sparsity / fidelity frontier.

In Anthropic's paper this histogram is bimodal: a high-density cluster of interpretable features and an
ultra-low-density cluster (~1e-6 and below). Dead features (density 0, log10 = -inf) have no place on a log
axis, so they get their own bar left of the axis break.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
from torch import Tensor

from sae_stream.checkpoint import atomic_write_bytes


def save_png(fig: Figure, path: str | Path) -> Path:
    """Render `fig` (a pyplot-free Figure: no global backend state) and write it to the PNG `path` atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def split_dead(log10_density: Tensor, dead_threshold: float = 0.0) -> tuple[Tensor, int]:
    """(log10 densities of the alive features, the dead count): dead is density <= dead_threshold, as eval counts."""
    values = log10_density.detach().double().cpu()
    dead = values <= (math.log10(dead_threshold) if dead_threshold > 0 else -math.inf)
    return values[~dead], int(dead.sum())


def plot_density_histogram(log10_density: Tensor, path: str | Path, ultralow_threshold: float = 1e-6,
                           bins: int = 60, title: str = "SAE feature density", dead_threshold: float = 0.0) -> Path:
    """Write a PNG histogram of `log10_density` [F] to `path` atomically: features of density <= `dead_threshold`
    (train.dead_threshold, as eval counts them; -inf entries never fired) in the dead bar, the others as alive."""
    if log10_density.dim() != 1 or log10_density.numel() == 0:
        raise ValueError("log10_density must be a non-empty 1-D tensor [d_sae]")
    finite, n_dead = split_dead(log10_density, dead_threshold)
    line_x = math.log10(ultralow_threshold)
    lo = min(float(finite.min()) if finite.numel() else line_x, line_x) - 0.25
    hi = max(float(finite.max()) if finite.numel() else 0.0, line_x) + 0.25
    width = (hi - lo) / bins

    # Figure without pyplot: no global backend state, renders with Agg.
    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.add_subplot()
    ax.hist(finite.numpy(), bins=bins, range=(lo, hi), color="#3b6fb6", label=f"alive ({finite.numel()})")
    dead_x = lo - 3 * width
    ax.bar([dead_x], [n_dead], width=2 * width, color="#999999", label=f"dead ({n_dead})")
    ax.annotate(f"dead\n{n_dead}", (dead_x, n_dead), ha="center", va="bottom", fontsize=8)
    ax.axvline(line_x, color="#c0392b", linestyle="--", label=f"ultra-low threshold (1e{line_x:g})")
    ax.set_xlabel("log10 feature density (fraction of tokens the feature fires on)")
    ax.set_ylabel("features")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def l0_axis(ax: object, l0s: list[float]) -> None:
    """L0 on a log axis where the SAEs' L0s span more than 3x, ticked at 1, 2, 3 and 5 times powers of 10 (plain
    numbers) below a 100x span so some fall between them; linear for a narrower span."""
    l0s = [v for v in l0s if v == v]  # (a diverged SAE's NaN left out)
    if not l0s or min(l0s) <= 0 or max(l0s) <= 3 * min(l0s):
        return
    ax.set_xscale("log")
    if max(l0s) < 100 * min(l0s):
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 3, 5)))
    ax.xaxis.set_major_formatter(ScalarFormatter())  # L0 as plain numbers, minor ticks unlabelled
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_sweep_frontier(rows: list[dict], path: str | Path, title: str = "sweep") -> Path:
    """The sparsity / fidelity frontier of a sweep's SAEs: FVU and 1 − CE loss recovered (vs zero- and
    mean-ablation; error bars: its 95% interval, rows' `ce_gap_*_ci95`, where given) against L0, one labelled
    point per SAE; written to the PNG `path` atomically."""
    fig = Figure(figsize=(10, 4), dpi=110)
    panels = (("fvu", "FVU (lower is better)"), ("ce_gap", "1 − CE loss recovered (lower is better)"))
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        labelled: set[str] = set()  # each series in the legend once, from whichever SAE has it first
        for r in rows:
            ys = [("fvu", None)] if key == "fvu" else [("ce_gap_zero", "vs zero"), ("ce_gap_mean", "vs mean")]
            for (field, kind), marker in zip(ys, ("o", "s")):
                y, ci, color = r[field], r.get(f"{field}_ci95"), "#3b6fb6" if marker == "o" else "#e67e22"
                if y is None:
                    continue
                if ci:
                    ax.errorbar([r["l0"]], [y], yerr=[[y - ci[0]], [ci[1] - y]], fmt="none", ecolor=color, capsize=2)
                ax.scatter([r["l0"]], [y], marker=marker, color=color,
                           label=kind if kind and kind not in labelled else None)
                labelled.add(kind or "")
                ax.annotate(r["name"], (r["l0"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("L0 (features active per token)")
        ax.set_ylabel(label, fontsize=8)
        l0_axis(ax, [r["l0"] for r in rows])
        ax.margins(0.15)  # room for the labels of the outermost points
        if key == "ce_gap":
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)


def plot_feature_matches(panels: list[tuple[str, Tensor, Tensor]], path: str | Path, title: str = "",
                         density_a: Tensor | None = None) -> Path:
    """Histograms of each feature's best match in the other SAE, one panel per measure (decoder cosine, activation
    correlation): `panels` [(measure, A's best values [F_A], B's best values [F_B])]; NaN values (undefined) are
    left out and counted in the legend. With `density_a` (A's densities on the text), a last panel draws A's best
    matches against log10 density, where rare features part from common ones. Written to the PNG `path`."""
    if not panels:
        raise ValueError("no measure to plot")
    n = len(panels) + (density_a is not None)
    fig = Figure(figsize=(5 * n, 4), dpi=110)
    for i, (measure, a_F, b_F) in enumerate(panels):
        ax = fig.add_subplot(1, n, i + 1)
        series = [(v.detach().double().cpu(), label, color) for v, label, color in
                  ((a_F, "A's features, best in B", "#3b6fb6"), (b_F, "B's features, best in A", "#e67e22"))]
        lowest = min([0.0] + [float(v.nan_to_num(nan=0.0).min()) for v, _, _ in series])
        lo = math.floor(lowest * 10) / 10  # (best matches are rarely negative: no empty half of the axis)
        for v, label, color in series:
            defined = v[~v.isnan()]
            undefined = v.numel() - defined.numel()
            note = f" ({undefined} undefined)" if undefined else ""
            ax.hist(defined.numpy(), bins=50, range=(lo, 1), histtype="step", linewidth=1.5, color=color,
                    label=f"{label}: {defined.numel()}{note}")
        ax.set_xlabel(f"best {measure}")
        ax.set_ylabel("features")
        ax.legend(fontsize=7, loc="upper left")
    if density_a is not None:
        ax = fig.add_subplot(1, n, n)
        density = density_a.detach().double().cpu()
        fired = density > 0
        for (measure, a_F, _), color in zip(panels, ("#3b6fb6", "#c0392b")):
            ax.scatter(density[fired].log10().numpy(), a_F.detach().double().cpu()[fired].numpy(), s=4, alpha=0.5,
                       color=color, label=measure)
        ax.set_xlabel(f"log10 density of A's features ({int((~fired).sum())} never fired: not shown)")
        ax.set_ylabel("best match in B")
        ax.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)
