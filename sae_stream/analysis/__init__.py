"""Feature analysis: streaming top-k and histograms, the HTML dashboard, feature ablation, density plots.

hooks.py (read / splice a hook's activation), topk.py, histogram.py, scan.py (one streaming pass),
logits.py (direct logit effects), ablation.py, html.py + dashboard.py (the page), plots.py (density PNG, a sweep's
frontier), curves.py (training curves).
"""
