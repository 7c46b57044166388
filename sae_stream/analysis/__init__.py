"""Feature analysis: streaming top-k and histograms, the HTML dashboard, feature ablation and steering, plots.

hooks.py (read / splice a hook's activation), topk.py, histogram.py, scan.py (one streaming pass),
logits.py (direct logit effects), ablation.py, steering.py (sampling with a feature pinned), html.py +
dashboard.py (the page), plots.py (density PNG, a sweep's frontier, matches), curves.py (training curves).
"""
