"""Feature steering (sae_stream/analysis/steering.py): the pinned activation against reconstructions spliced by
hand, sampling against full forwards, the clean and pinned runs' shared randomness, the largest-activation scan,
pin values. (The `steer` command on a trained run: test_cli.py.)"""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_stream.analysis.steering import (
    feature_directions,
    max_activation,
    pin_feature,
    pin_features,
    pin_value,
    sample,
    steer,
)
from sae_stream.config import SAEConfig
from sae_stream.sae import build_sae

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK, N_VOCAB = "blocks.0.mlp.hook_post", 40


def _model() -> HookedTransformer:
    torch.manual_seed(0)
    # two layers: the second's attention reads what the first MLP wrote at every earlier position (in one layer,
    # position 0's MLP output would reach no later prediction)
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=24,
                                  d_vocab=48, act_fn="relu", normalization_type="LN", seed=0)
    model = HookedTransformer(cfg).eval()
    with torch.no_grad():
        model.W_U.mul_(20.0)  # peaked next-token distributions: a feature's push shows in the samples
        model.b_U[N_VOCAB:] = 100.0  # padding ids past the tokenizer's: the likeliest, never to be sampled
    return model


def _sae(arch: str = "anthropic", seed: int = 0, d_in: int = 32):
    cfg = SAEConfig(architecture=arch, d_sae=24, k=4, jumprelu_init_threshold=0.05)
    sae = build_sae(cfg, d_in=d_in, seed=seed).eval()
    with torch.no_grad():
        sae.b_dec_D.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
        sae.input_scale.fill_(2.5 if sae.scales_input else 1.0)
        if arch == "batchtopk":
            sae.threshold.fill_(0.05)
    return sae


@pytest.mark.parametrize("arch", ["anthropic", "april", "topk", "batchtopk", "jumprelu"])
def test_pin_feature__equals_the_reconstruction_with_that_feature_set_plus_the_error(arch):
    """x' = decode(f with f_i := v) + (x − decode(f)): the other features and the SAE's error kept."""
    sae = _sae(arch)
    x_BTD = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1)).relu()
    feats = sae.encode(x_BTD.reshape(-1, 32)).detach()
    pinned = feats.clone()
    pinned[:, 7] = 4.0
    want = sae.decode(pinned) + (x_BTD.reshape(-1, 32) - sae.decode(feats))
    torch.testing.assert_close(pin_feature(sae, 7, 4.0)(x_BTD).reshape(-1, 32), want.detach(), rtol=1e-5, atol=1e-5)
    # the direction is the decoder row, divided by the input scale where the SAE scales its input
    torch.testing.assert_close(feature_directions(sae, torch.tensor([7]))[0],
                               sae.W_dec_FD[7].detach() / sae.input_scale, rtol=1e-6, atol=1e-6)


def test_pin_features__several_at_once_equal_the_reconstruction_with_all_of_them_set():
    """Features 7 and 3 pinned together (4 and 0: one raised, one ablated) in the second group of rows, the
    first group clean (NaN pins): decode(f with both set) + (x − decode(f)), and x itself."""
    sae = _sae()
    x_BTD = torch.randn(4, 5, 32, generator=torch.Generator().manual_seed(1)).relu()
    feats = sae.encode(x_BTD.reshape(-1, 32)).detach()
    pinned = feats.clone()
    pinned[:, 7], pinned[:, 3] = 4.0, 0.0
    want = (sae.decode(pinned) + (x_BTD.reshape(-1, 32) - sae.decode(feats))).detach().reshape(4, 5, 32)
    nan = float("nan")
    got = pin_features(sae, torch.tensor([[7, 3], [7, 3]]), torch.tensor([[nan, nan], [4.0, 0.0]]))(x_BTD)
    assert torch.equal(got[:2], x_BTD[:2])
    torch.testing.assert_close(got[2:], want[2:], rtol=1e-5, atol=1e-5)
    one = pin_features(sae, torch.tensor([[7, 3]]), torch.tensor([[4.0, nan]]))(x_BTD)  # (NaN: 3 left alone)
    torch.testing.assert_close(one, pin_feature(sae, 7, 4.0)(x_BTD), rtol=1e-6, atol=1e-6)


def test_sample__greedy_takes_each_full_forwards_argmax_among_the_tokenizers_ids():
    model = _model()
    prompt = torch.tensor([[1, 5, 9]])
    out = sample(model, prompt, n_tokens=6, samples=2, temperature=0.0, seed=0, n_vocab=N_VOCAB)
    assert out.shape == (2, 6) and torch.equal(out[0], out[1])  # greedy: every sample the same
    tokens = torch.cat([prompt, out[:1]], dim=1)
    with torch.no_grad():
        logits = model(tokens)[0, :, :N_VOCAB]
    assert torch.equal(out[0], logits[2:-1].argmax(-1))  # position t's argmax is token t + 1
    sampled = sample(model, prompt, n_tokens=20, samples=8, temperature=1.0, seed=0, n_vocab=N_VOCAB)
    assert sampled.max() < N_VOCAB  # the padding ids' +100 logits never win


def test_sample__draws_from_the_softmax_of_the_logits_over_temperature():
    """Gumbel-max: the first token of 20,000 samples follows softmax(logits / T) (within 0.015 per id); copies of
    one sample with no hooks are the same tokens."""
    model, prompt = _model(), torch.tensor([[1, 2]])
    with torch.no_grad():
        model.W_U.div_(40.0)  # (a spread-out distribution, so many ids are drawn)
        logits = model(prompt)[0, -1, :N_VOCAB]
    for temperature in (1.0, 0.5):
        first = sample(model, prompt, 1, 20_000, temperature, 0, N_VOCAB)[:, 0]
        freq = torch.bincount(first, minlength=N_VOCAB).double() / 20_000
        want = torch.softmax(logits.double() / temperature, -1)
        assert want.max() < 0.5 and (freq - want).abs().max() < 0.015, temperature
    copies = sample(model, prompt, 6, 3, 1.0, 0, N_VOCAB, copies=4)
    assert all(torch.equal(copies[:3], copies[3 * c:3 * c + 3]) for c in range(4))
    assert not torch.equal(copies[0], copies[1])  # (the samples themselves differ)


def test_sample__seeded():
    model, prompt = _model(), torch.tensor([[1, 2]])
    a, b, c = (sample(model, prompt, 8, 4, 1.0, seed, N_VOCAB) for seed in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(sample(model, prompt, 8, 2, 1.0, 3, N_VOCAB), a[:2])  # sample s: however many are drawn


def test_steer__pinned_run_splices_the_pin_at_every_position_but_the_first():
    """Against a hook written here: each position past the first gets (v − f_i(x))·W_dec[i] added."""
    model, sae = _model(), _sae()
    prompt, value = torch.tensor([[0, 3, 4]]), 6.0
    with torch.no_grad():
        _, cache = model.run_with_cache(prompt)
    feature = int(sae.encode(cache[HOOK][0]).detach().amax(0).argmax())  # one that fires: f_i(x) matters
    result = steer(model, sae, HOOK, prompt, feature, value, N_VOCAB, n_tokens=8, samples=3, seed=2)

    def by_hand(act, hook):
        f = sae.encode(act.reshape(-1, 32)).detach().reshape(*act.shape[:2], -1)[..., feature]
        add = (value - f)[..., None] * sae.W_dec_FD[feature].detach()
        add[:, 0] = 0.0
        return act + add

    want = sample(model, prompt, 8, 3, 1.0, 2, N_VOCAB, hooks=lambda tokens: [(HOOK, by_hand)])
    assert torch.equal(result.pinned_SN, want)
    assert torch.equal(result.clean_SN, sample(model, prompt, 8, 3, 1.0, 2, N_VOCAB))
    assert not torch.equal(result.pinned_SN, result.clean_SN)  # a pin of 6 moves the samples


def test_steer__several_features_pinned_together_at_their_values():
    """[a, b] at [6, 0]: each position past the first gets (6 − f_a)·W_dec[a] + (0 − f_b)·W_dec[b]; the result
    names both; one value pins them all at it; bad lists are one-line errors."""
    model, sae = _model(), _sae()
    prompt = torch.tensor([[0, 3, 4]])
    with torch.no_grad():
        _, cache = model.run_with_cache(prompt)
    order = sae.encode(cache[HOOK][0]).detach().amax(0).argsort(descending=True)
    a, b = int(order[0]), int(order[1])  # two that fire
    result = steer(model, sae, HOOK, prompt, [a, b], [6.0, 0.0], N_VOCAB, n_tokens=8, samples=3, seed=2)

    def by_hand(act, hook):
        f = sae.encode(act.reshape(-1, 32)).detach().reshape(*act.shape[:2], -1)
        add = (6.0 - f[..., a])[..., None] * sae.W_dec_FD[a].detach() - f[..., b, None] * sae.W_dec_FD[b].detach()
        add[:, 0] = 0.0
        return act + add

    want = sample(model, prompt, 8, 3, 1.0, 2, N_VOCAB, hooks=lambda tokens: [(HOOK, by_hand)])
    assert torch.equal(result.pinned_SN, want) and (result.feature, result.value) == ((a, b), (6.0, 0.0))
    assert torch.equal(result.clean_SN, sample(model, prompt, 8, 3, 1.0, 2, N_VOCAB))
    same = steer(model, sae, HOOK, prompt, [a, b], 6.0, N_VOCAB, n_tokens=8, samples=3, seed=2)
    assert same.value == (6.0, 6.0)
    for feature, value, message in (([a, a], 1.0, "give at least one, each once"),
                                    ([a, b], [1.0, 2.0, 3.0], "3 pin values for 2 features")):
        with pytest.raises(ValueError, match="") as caught:
            steer(model, sae, HOOK, prompt, feature, value, N_VOCAB, n_tokens=4)
        assert message in str(caught.value), feature


def test_steer__an_attention_hook_is_flattened_for_the_sae_and_reshaped_back():
    """hook_z is [B, T, heads, d_head]: the SAE reads heads·d_head = 16 per position. A train-mode BatchTopK SAE
    is steered in eval mode (its threshold, not the batch's top-k) and handed back in train mode."""
    model, sae, hook = _model(), _sae("batchtopk", d_in=16), "blocks.0.attn.hook_z"
    sae.train()

    def by_hand(act, hook):
        x = act.reshape(*act.shape[:2], 16)
        f = ((x - sae.b_dec_D) @ sae.W_enc_DF + sae.b_enc_F).detach()
        f = f * (f > sae.threshold)
        add = (3.0 - f[..., 2])[..., None] * sae.W_dec_FD[2].detach()
        add[:, 0] = 0.0
        return (x + add).reshape(act.shape)

    result = steer(model, sae, hook, torch.tensor([[0, 7]]), 2, 3.0, N_VOCAB, n_tokens=6, samples=2)
    assert sae.training
    assert torch.equal(result.pinned_SN, sample(model, torch.tensor([[0, 7]]), 6, 2, 1.0, 0, N_VOCAB,
                                                hooks=lambda tokens: [(hook, by_hand)]))


def test_steer__a_feature_with_no_direction_changes_nothing():
    """Clean and pinned runs draw from generators with the same seed: with a zero decoder row the pin adds
    nothing, so the samples are the same token for token."""
    model, sae = _model(), _sae()
    with torch.no_grad():
        sae.W_dec_FD[5] = 0.0
    result = steer(model, sae, HOOK, torch.tensor([[0]]), 5, 50.0, N_VOCAB, n_tokens=10, samples=4)
    assert torch.equal(result.pinned_SN, result.clean_SN)


def test_steer__bad_input_is_one_line():
    model, sae = _model(), _sae()
    for kwargs, message in (
            ({"feature": 24}, "feature 24 is not a feature of this SAE: ids run from 0 to 23"),
            ({"n_tokens": 22}, "the prompt (3 tokens with the leading end-of-text) and 22 new tokens exceed the LM's "
                               "context of 24: ask for fewer tokens"),
            ({"samples": 0}, "steering needs tokens >= 1, samples >= 1 and temperature >= 0"),
            ({"temperature": -1.0}, "steering needs tokens >= 1"),
            ({"prompt": torch.zeros(1, 0, dtype=torch.long)}, "the prompt has no tokens"),
            ({"hook_name": "unembed.hook_in"}, "is the unembedding's own hook")):
        args = {"model": model, "sae": sae, "hook_name": HOOK, "tokens_1T": torch.tensor([[0, 1, 2]]), "feature": 3,
                "value": 1.0, "n_vocab": N_VOCAB}
        if "prompt" in kwargs:
            args["tokens_1T"] = kwargs.pop("prompt")
        with pytest.raises(ValueError) as caught:
            steer(**{**args, **kwargs})
        assert message in str(caught.value) and "\n" not in str(caught.value), kwargs


def test_sample__a_tiny_temperature_is_the_argmax():
    model, prompt = _model(), torch.tensor([[1, 2]])
    torch.testing.assert_close(sample(model, prompt, 5, 2, 1e-30, 0, N_VOCAB),
                               sample(model, prompt, 5, 2, 0.0, 0, N_VOCAB), rtol=0, atol=0)


def test_max_activation__is_the_largest_over_the_positions_the_sae_reads():
    model, sae = _model(), _sae()
    tokens = torch.randint(0, N_VOCAB, (10, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    feats = sae.encode(cache[HOOK].reshape(-1, 32)).detach().reshape(10, 12, -1)
    feature = int(feats[:, 1:].amax((0, 1)).argmax())  # the feature firing hardest past position 0
    top, seen = max_activation(model, sae, HOOK, [tokens[:4], tokens[4:]], feature, max_tokens=10 * 12,
                               batch_contexts=3)
    assert seen == 10 * 11 and top == pytest.approx(float(feats[:, 1:, feature].max()), rel=1e-5)
    top0, seen0 = max_activation(model, sae, HOOK, [tokens], feature, 120, skip_first_position=False)
    assert seen0 == 120 and top0 == pytest.approx(float(feats[..., feature].max()), rel=1e-5)
    tops, _ = max_activation(model, sae, HOOK, [tokens], [3, feature, 0], 120)  # several: each its own
    assert tops == [pytest.approx(float(feats[:, 1:, f].max()), rel=1e-5) for f in (3, feature, 0)]


def test_pin_value__numbers_and_multiples():
    assert pin_value("5x") == (5.0, True) and pin_value(8.5) == (8.5, False) and pin_value("0") == (0.0, False)
    for bad in ("five", "x", "-2x", "nan"):
        with pytest.raises(ValueError, match="pin value"):
            pin_value(bad)
