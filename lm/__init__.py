"""The one-layer GPT of "Towards Monosemanticity": model, training, and conversion to HookedTransformer."""
