"""Rendering of the feature dashboard: one self-contained HTML page (inline CSS/JS, no network).

Every token and label passes through `html.escape`; whitespace and control characters are drawn visibly
(space ·, newline ↵, tab ⇥, others \\xNN). A tiny script in <head> records JavaScript errors into the page
(`data-js-errors` on <html>) so a headless browser's `--dump-dom` shows them; the main script marks
`<body data-ready="1">` when it has run to the end.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

WHITESPACE = {" ": "·", "\n": "↵", "\t": "⇥", "\r": "␍"}


@dataclass
class ContextView:
    tokens: list[str]
    acts: list[float]
    """Activation of the feature at each token (NaN where unknown)."""
    center: int
    """Index of the activating token in `tokens`."""
    value: float


@dataclass(frozen=True)
class DensityBands:
    """The density thresholds that split the index into tabs: train.dead_threshold, ultralow_threshold and
    dense_threshold, counted as eval counts them (dead <= dead < ultra-low < ultralow <= mid <= dense < dense)."""

    dead: float = 0.0
    ultralow: float = 1e-6
    dense: float = 0.1

    def band(self, density: float) -> str:
        if density <= self.dead:
            return "dead"
        if density < self.ultralow:
            return "low"
        return "dense" if density > self.dense else "mid"

    def tabs(self) -> list[tuple[str, str, str]]:
        """(band, tab name, density range) in index order."""
        return [("dense", "Dense", f"> {self.dense:g}"), ("mid", "Mid density", f"{self.ultralow:g} – {self.dense:g}"),
                ("low", "Ultra-low density", f"< {self.ultralow:g}"), ("dead", "Dead", f"≤ {self.dead:g}")]


@dataclass
class FeaturePanel:
    feature: int
    density: float
    ultralow: bool
    contexts: list[ContextView]
    hist_counts: list[int]
    hist_width: float
    top_tokens: list[str]
    single_token: tuple[str, float] | None = None
    """(token, fraction of top activations on it) when the feature is flagged single-token."""
    logits_pos: list[tuple[str, float]] = field(default_factory=list)
    logits_neg: list[tuple[str, float]] = field(default_factory=list)
    ablation_raised: list[tuple[str, float]] | None = None
    ablation_lowered: list[tuple[str, float]] | None = None
    pinned: tuple[float, str] | None = None
    """(value, text) of a sample with the feature pinned at value (dashboard.pinned_samples)."""
    level: str | None = None
    """A Matryoshka SAE's nested dictionary holding the feature (matryoshka_level), else None."""


def esc(text: str) -> str:
    return html.escape(text, quote=True)


def visible(text: str) -> str:
    """Escaped token text with whitespace and control characters shown as marks."""
    if text == "":
        return '<span class="ws">∅</span>'
    out = []
    for ch in text:
        if ch in WHITESPACE:
            out.append(f'<span class="ws">{WHITESPACE[ch]}</span>')
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f'<span class="ws">\\x{ord(ch):02x}</span>')
        else:
            out.append(esc(ch))
    return "".join(out)


def svg_bars(counts: list[int], left_label: str, right_label: str, titles: list[str], width: int = 340,
             height: int = 70) -> str:
    """Inline SVG bar chart; each bar's <title> shows on hover."""
    top = max(max(counts, default=0), 1)
    bar_w = width / max(len(counts), 1)
    bars = []
    for i, (c, t) in enumerate(zip(counts, titles)):
        h = height * c / top
        bars.append(f'<rect x="{i * bar_w:.1f}" y="{height - h:.1f}" width="{max(bar_w - 1, 1):.1f}" '
                    f'height="{h:.1f}"><title>{esc(t)}</title></rect>')
    return (f'<svg class="hist" width="{width}" height="{height + 14}" viewBox="0 0 {width} {height + 14}">'
            f'{"".join(bars)}<text x="0" y="{height + 12}">{esc(left_label)}</text>'
            f'<text x="{width}" y="{height + 12}" text-anchor="end">{esc(right_label)}</text></svg>')


def _context_html(ctx: ContextView) -> str:
    top = max([a for a in ctx.acts if a == a and a > 0], default=1.0)
    spans = []
    for i, (tok, act) in enumerate(zip(ctx.tokens, ctx.acts)):
        level = 0 if act != act or act <= 0 else max(1, round(10 * min(act / top, 1.0)))
        shown = "n/a" if act != act else f"{act + 0.0:.4g}"  # (+ 0.0: a masked-out -0.0 of batchtopk prints as 0)
        cls = f"t a{level}" + (" hot" if i == ctx.center else "")
        spans.append(f'<span class="{cls}" title="{esc(repr(tok))}: {shown}">{visible(tok)}</span>')
    return f'<div class="ctx"><span class="val">{ctx.value:.3f}</span>{"".join(spans)}</div>'


def _token_list(title: str, items: list[tuple[str, float]] | None) -> str:
    if items is None:
        return ""
    rows = "".join(f'<li><span class="t">{visible(t)}</span> <span class="num">{v:+.3g}</span></li>'
                   for t, v in items)
    return f'<div class="tl"><h4>{esc(title)}</h4><ol>{rows}</ol></div>'


def _histogram_html(p: FeaturePanel) -> str:
    if p.hist_width <= 0:
        return '<p class="note">never fired in the scanned tokens</p>'
    n = len(p.hist_counts)
    titles = [f"[{i * p.hist_width:.3g}, {(i + 1) * p.hist_width:.3g}): {c}" for i, c in enumerate(p.hist_counts)]
    return svg_bars(p.hist_counts, "0", f"{n * p.hist_width:.3g}", titles)


def panel_html(p: FeaturePanel, logit_note: str) -> str:
    badges = ['<span class="badge low">ultra-low density</span>' if p.ultralow else ""]
    if p.single_token is not None:
        tok, frac = p.single_token
        badges.append(f'<span class="badge single">single-token: {visible(tok)} ({frac:.0%})</span>')
    contexts = "".join(_context_html(c) for c in p.contexts) or '<p class="note">no activations found</p>'
    ablation = ""
    if p.ablation_raised is not None:
        ablation = (f'<h3>Ablation (Δ log-prob at the activating token, feature zeroed)</h3><div class="cols">'
                    f'{_token_list("raised", p.ablation_raised)}{_token_list("lowered", p.ablation_lowered)}</div>')
    logits = (f'<div class="cols">{_token_list("promoted", p.logits_pos)}{_token_list("suppressed", p.logits_neg)}'
              f'</div>' if p.logits_pos or p.logits_neg else "")
    pinned = ""
    if p.pinned is not None:
        pinned = (f'<h3>Pinned sample</h3><p class="note">feature held at {p.pinned[0]:.4g} at every position the '
                  f'SAE reads: compare the clean sample at the top</p><div class="sample">{visible(p.pinned[1])}</div>')
    return (f'<section class="feature" id="f{p.feature}"><h2>Feature {p.feature} {"".join(badges)}</h2>'
            f'<p>density {p.density:.3g} (log10 {_log10(p.density)}){"; " + esc(p.level) if p.level else ""}</p>'
            f'<h3>Activation histogram</h3>{_histogram_html(p)}'
            f'<h3>Logit effects</h3><p class="note">{esc(logit_note)}</p>{logits}{ablation}{pinned}'
            f'<h3>Top activations</h3>{contexts}</section>')


def matryoshka_level(feature: int, sizes: list[int] | None, d_sae: int) -> str | None:
    """'nested dictionary 2 of 3 (features 64-255)': the first of a Matryoshka SAE's nested dictionaries that holds
    `feature` (the smallest prefix it belongs to); None without levels."""
    if not sizes:
        return None
    bounds = [0, *sizes, d_sae]
    i = next(i for i in range(1, len(bounds)) if feature < bounds[i])
    return f"nested dictionary {i} of {len(bounds) - 1} (features {bounds[i - 1]}-{bounds[i] - 1})"


def _log10(x: float) -> str:
    return f"{math.log10(x):.2f}" if x > 0 else "-inf"


def _index_rows(panels: list[FeaturePanel]) -> str:
    rows = []
    for p in panels:
        search = f"{p.feature} " + " ".join(p.top_tokens)
        flag = " ◆" if p.single_token is not None else ""
        tokens = " ".join(f'<span class="t">{visible(t)}</span>' for t in p.top_tokens)
        rows.append(f'<tr class="frow" data-search="{esc(search.lower())}"><td><a href="#f{p.feature}">'
                    f'{p.feature}</a>{flag}</td><td class="num">{p.density:.2e}</td><td>{tokens}</td></tr>')
    return "".join(rows)


def _tabs_html(panels: list[FeaturePanel], bands: DensityBands, empty_low_note: str) -> tuple[str, str]:
    """(tab buttons, one index table per tab): a tab per density band, each named with its range; the dead tab
    only when some shown feature is dead (`features=` chosen by hand)."""
    head = "<tr><th>feature</th><th>density</th><th>top tokens</th></tr>"
    groups = {key: [p for p in panels if bands.band(p.density) == key] for key, _, _ in bands.tabs()}
    active = bands.band(panels[0].density) if panels else "mid"
    buttons, tables = [], []
    for key, name, span in bands.tabs():
        group = groups[key]
        if key == "dead" and not group:
            continue
        on = " active" if key == active else ""
        buttons.append(f'<button data-tab="{key}" class="tab{on}" title="density {esc(span)}">{esc(name)} '
                       f'({len(group)}) <small>{esc(span)}</small></button>')
        empty = (empty_low_note if key == "low" else "") or f"no shown feature has density {span}"
        body = _index_rows(group) if group else f'<tr><td colspan="3" class="note">{esc(empty)}</td></tr>'
        tables.append(f'<table class="list{on}" id="tab-{key}"><thead>{head}</thead><tbody>{body}</tbody></table>')
    return "".join(buttons), "".join(tables)


def render_page(panels: list[FeaturePanel], title: str, summary_html: str, logit_note: str,
                empty_low_note: str = "", bands: DensityBands = DensityBands()) -> str:
    """The whole page; `empty_low_note` fills the ultra-low tab when no shown feature is ultra-low."""
    buttons, tables = _tabs_html(panels, bands, empty_low_note)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<script>{ERROR_TRAP}</script><style>{CSS}</style></head><body>'
            f'<header><h1>{esc(title)}</h1>{summary_html}</header><main><nav>'
            f'<input id="filter" type="search" placeholder="filter by feature id or token">'
            f'<div class="tabs">{buttons}</div>{tables}</nav>'
            f'<div id="panels">{"".join(panel_html(p, logit_note) for p in panels)}</div></main>'
            f'<script>{JS}</script></body></html>\n')


ERROR_TRAP = """
(function(){var root=document.documentElement;root.setAttribute('data-js-errors','0');
function rec(msg){var n=+root.getAttribute('data-js-errors')+1;root.setAttribute('data-js-errors',String(n));
root.setAttribute('data-js-error-'+n,String(msg));}
window.addEventListener('error',function(e){rec(e.message||'error');});
window.addEventListener('unhandledrejection',function(e){rec('unhandled rejection: '+e.reason);});
var ce=console.error;
console.error=function(){rec(Array.prototype.join.call(arguments,' '));ce.apply(console,arguments);};
})();
"""

JS = """
(function(){
var panels=document.querySelectorAll('section.feature');
function setTab(name){
 document.querySelectorAll('.tabs button').forEach(function(o){o.classList.toggle('active',o.dataset.tab===name);});
 document.querySelectorAll('table.list').forEach(function(t){t.classList.toggle('active',t.id==='tab-'+name);});}
function show(id){var el=id&&document.getElementById(id);if(!el){return;}
 panels.forEach(function(p){p.classList.toggle('shown',p===el);});
 document.querySelectorAll('tr.frow').forEach(function(r){
  var hit=r.querySelector('a').getAttribute('href')==='#'+id;r.classList.toggle('sel',hit);
  if(hit){setTab(r.closest('table').id.slice(4));}});}
function fromHash(){show(decodeURIComponent(location.hash.slice(1)));}
window.addEventListener('hashchange',fromHash);
document.querySelectorAll('.tabs button').forEach(function(b){
 b.addEventListener('click',function(){setTab(b.dataset.tab);});});
document.getElementById('filter').addEventListener('input',function(e){var q=e.target.value.trim().toLowerCase();
 document.querySelectorAll('tr.frow').forEach(function(r){r.style.display=(!q||r.dataset.search.indexOf(q)>=0)?'':'none';});
});
if(location.hash){fromHash();}else if(panels.length){show(panels[0].id);}
document.body.setAttribute('data-ready','1');
})();
"""

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{padding:8px 16px;background:#263645;color:#fff}header h1{font-size:18px;margin:4px 0}
header .summary{font-size:12px;color:#cfd8e0}header svg.hist rect{fill:#8fb3d9}header svg.hist text{fill:#cfd8e0}
main{display:flex;align-items:flex-start}
nav{width:400px;flex:none;height:calc(100vh - 120px);overflow:auto;border-right:1px solid #ddd;padding:8px;
 background:#fff}
#filter{width:100%;box-sizing:border-box;padding:5px;margin-bottom:6px}
.tabs button{border:1px solid #bbb;background:#eee;padding:4px 8px;cursor:pointer;margin:0 2px 2px 0}
.tabs button small{opacity:.75}
.tabs button.active{background:#263645;color:#fff}
table.list{display:none;border-collapse:collapse;width:100%;margin-top:6px;font-size:12px}table.list.active{display:table}
table.list td,table.list th{padding:2px 4px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
tr.sel{background:#fff3d6}.num{font-variant-numeric:tabular-nums;white-space:nowrap}
#panels{flex:1;padding:8px 16px;min-width:0}
section.feature{display:none}section.feature:target,section.feature.shown{display:block}
h2{font-size:18px;margin:6px 0}h3{font-size:14px;margin:12px 0 4px}h4{margin:2px 0;font-size:12px}
.badge{font-size:11px;padding:1px 6px;border-radius:8px;margin-left:6px;vertical-align:middle}
.badge.low{background:#e8d9f5}.badge.single{background:#fde3c8}
.note{color:#777;font-size:12px;margin:2px 0}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;padding:2px 0;border-bottom:1px solid #f0f0f0;
 white-space:pre;overflow-x:auto}
.val{display:inline-block;width:56px;color:#666;margin-right:6px}
.t{border-radius:2px;font-family:ui-monospace,Menlo,Consolas,monospace}.t.hot{outline:1.5px solid #b03a00}
.ws{color:#555}
.a0{background:transparent}.a1{background:rgba(255,106,0,.1)}.a2{background:rgba(255,106,0,.2)}
.a3{background:rgba(255,106,0,.3)}.a4{background:rgba(255,106,0,.4)}.a5{background:rgba(255,106,0,.5)}
.a6{background:rgba(255,106,0,.6)}.a7{background:rgba(255,106,0,.7)}.a8{background:rgba(255,106,0,.8)}
.a9{background:rgba(255,106,0,.9)}.a10{background:rgba(255,106,0,1)}
svg.hist rect{fill:#3b6fb6}svg.hist text{font-size:10px;fill:#555}
.sample{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;white-space:pre-wrap}
.cols{display:flex;gap:32px}.tl ol{margin:0;padding-left:22px;font-size:12px}
"""
