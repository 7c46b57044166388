"""GPTCapture (the GPT's own forward, fused attention) gives the HookedTransformer's hook activations."""

from __future__ import annotations

import pytest
import torch

from lm.capture import POINTS, GPTCapture, supported
from lm.hooked import to_hooked
from sae_stream.activations import HookCapture
from tests.test_lm import tiny_gpt


@pytest.mark.parametrize("act_fn", ["relu", "gelu"])
def test_gpt_capture__equals_transformer_lens_hooks(act_fn: str) -> None:
    gpt = tiny_gpt(act_fn, n_layers=2, seed=3)
    hooked = to_hooked(gpt)
    tokens = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(0))
    for layer in (0, 1):
        for point in POINTS:
            name = f"blocks.{layer}.{point}"
            ours = GPTCapture(gpt, [name])(tokens)
            ref = HookCapture(hooked, name)(tokens)
            assert ours.shape == ref.shape, name
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5, msg=name)


def test_gpt_capture__several_hooks_concatenate_in_the_given_order() -> None:
    gpt = tiny_gpt(n_layers=2)
    names = ["blocks.1.hook_resid_pre", "blocks.0.mlp.hook_post", "blocks.0.attn.hook_z"]
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    ours = GPTCapture(gpt, names)(tokens)
    ref = HookCapture(to_hooked(gpt), names)(tokens)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_supported__block_points_of_existing_layers_only() -> None:
    gpt = tiny_gpt(n_layers=1)
    assert supported(gpt, ["blocks.0.mlp.hook_post", "blocks.0.hook_resid_post"])
    for bad in (["blocks.1.mlp.hook_post"], ["blocks.0.attn.hook_pattern"], ["hook_embed"],
                ["ln_final.hook_normalized"]):
        assert not supported(gpt, bad)
    with pytest.raises(ValueError, match="GPTCapture computes"):
        GPTCapture(gpt, ["blocks.0.attn.hook_pattern"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpt_capture__cuda_bf16_close_to_transformer_lens() -> None:
    gpt = tiny_gpt(n_layers=1, seed=2).cuda()
    hooked = to_hooked(gpt)
    tokens = torch.randint(0, 97, (8, 16), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        ours = GPTCapture(gpt, ["blocks.0.mlp.hook_post"])(tokens).float()
        ref = HookCapture(hooked, "blocks.0.mlp.hook_post")(tokens).float()
    torch.testing.assert_close(ours, ref, rtol=5e-2, atol=2e-2)
