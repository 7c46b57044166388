"""Shared by test_buffer.py and test_activation_stream.py: a small CPU BufferConfig."""

from __future__ import annotations

from typing import Any

from sae_stream.config import BufferConfig


def _cfg(**kw: Any) -> BufferConfig:
    base = dict(capacity=512, refill_fraction=0.5, storage="cpu", lm_batch_size=4)
    return BufferConfig(**(base | kw))
