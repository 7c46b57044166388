"""sae-stream: sparse autoencoders trained on activations streamed from a language model."""

__version__ = "0.1.0"
