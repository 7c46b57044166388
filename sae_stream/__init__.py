"""sae-stream: sparse autoencoders trained on activations streamed from a language model.

    from sae_stream import load_run          # a trained run's LM, SAE and tokenizer (trained.py)
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:  # load_run on first use: `import sae_stream` stays light
    if name == "load_run":
        from sae_stream.trained import load_run

        return load_run
    raise AttributeError(f"module 'sae_stream' has no attribute {name!r}")
