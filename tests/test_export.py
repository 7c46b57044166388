"""SAELens export: round trip, cfg.json fields, and equivalence under SAELens's own forward semantics."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sae_stream.config import SAEConfig
from sae_stream.export import export_saelens, load_saelens
from sae_stream.sae import build_sae

ARCHS = ("anthropic", "april", "topk", "batchtopk", "jumprelu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_like(arch: str):
    """An SAE with non-trivial biases, input scale and threshold (as after training), in eval mode."""
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture=arch, d_sae=48, k=5), d_in=16)
    x = torch.randn(256, 16) * 4 + 1
    sae.init_from_sample_(x)
    with torch.no_grad():
        sae.b_enc_F.normal_(0, 0.3)
        sae.W_dec_FD.mul_(torch.rand(48, 1) + 0.5)
    if arch == "batchtopk":
        sae.train()
        sae(x)  # sets the inference threshold
    if arch == "jumprelu":  # thresholds of their own, on the scale of the pre-activations
        with torch.no_grad():
            sae.log_threshold_F.copy_((torch.rand(48) * 3).log())
    return sae.eval(), torch.randn(64, 16) * 4 + 1


def saelens_reference(directory, x: torch.Tensor):
    """SAELens's inference forward (standard / topk / jumprelu), re-implemented from its cfg.json + weights."""
    cfg = json.loads((directory / "cfg.json").read_text())
    w = load_file(str(directory / "sae_weights.safetensors"))
    assert cfg["normalize_activations"] == "none"
    sae_in = x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)  # (SAELens's default when absent)
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "standard":
        feats = pre.relu()
    elif cfg["architecture"] == "topk":
        top = pre.topk(cfg["k"], dim=-1)
        feats = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    else:
        assert cfg["architecture"] == "jumprelu"
        feats = pre.relu() * (pre > w["threshold"])
    return feats, feats @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("arch", ARCHS)
def test_export__saelens_semantics_reproduce_our_encode_decode(tmp_path, arch):
    sae, x = _trained_like(arch)
    export_saelens(sae, tmp_path, hook_name="blocks.0.mlp.hook_post")
    feats, recon = saelens_reference(tmp_path, x)
    ours = sae.encode(x)
    assert (ours > 0).sum() > 0
    torch.testing.assert_close(feats, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recon, sae.decode(ours), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_load_saelens__round_trip_gives_identical_outputs(tmp_path, arch):
    sae, x = _trained_like(arch)
    density = torch.linspace(-6, 0, 48)
    export_saelens(sae, tmp_path / "out", hook_name="blocks.0.mlp.hook_post", log10_density=density)
    back = load_saelens(tmp_path / "out")
    assert type(back) is type(sae) and back.cfg.architecture == arch
    f_ours, f_back = sae.encode(x), back.encode(x)
    if arch in ("april", "jumprelu"):  # scale folded into the weights: equal up to float rounding
        torch.testing.assert_close(f_back, f_ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back.decode(f_back), sae.decode(f_ours), rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(f_back, f_ours)
        assert torch.equal(back.decode(f_back), sae.decode(f_ours))
    assert torch.equal(load_file(str(tmp_path / "out" / "sparsity.safetensors"))["sparsity"], density)


def test_export__cfg_json_has_saelens_fields_old_and_new(tmp_path):
    sae, _ = _trained_like("topk")
    export_saelens(sae, tmp_path, hook_name="blocks.3.mlp.hook_post", model_name="tiny-1l",
                   extra_cfg={"context_size": 128, "dataset_path": "embedded"})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    for key, value in {"architecture": "topk", "d_in": 16, "d_sae": 48, "k": 5, "dtype": "float32",
                       "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
                       "hook_name": "blocks.3.mlp.hook_post", "hook_point": "blocks.3.mlp.hook_post",
                       "hook_layer": 3, "hook_head_index": None, "model_name": "tiny-1l", "context_size": 128,
                       "dataset_path": "embedded", "activation_fn_kwargs": {"k": 5}}.items():
        assert cfg[key] == value, key
    assert cfg["metadata"]["hook_name"] == "blocks.3.mlp.hook_post"
    assert cfg["metadata"]["context_size"] == 128 and cfg["metadata"]["model_name"] == "tiny-1l"
    w = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in w.items()} == {"W_enc": (16, 48), "b_enc": (48,), "W_dec": (48, 16),
                                                          "b_dec": (16,)}
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp files
    with pytest.raises(ValueError, match="log10_density"):
        export_saelens(sae, tmp_path, hook_name="h", log10_density=torch.zeros(3))


def test_export__hook_z_sae_asks_saelens_to_flatten_heads_and_stale_densities_go(tmp_path):
    sae, _ = _trained_like("anthropic")
    export_saelens(sae, tmp_path, hook_name="blocks.0.attn.hook_z", log10_density=torch.zeros(48))
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["reshape_activations"] == "hook_z"  # SAELens then flattens [..., heads, d_head] as we trained
    assert (tmp_path / "sparsity.safetensors").is_file()
    export_saelens(sae, tmp_path, hook_name="blocks.0.mlp.hook_post")  # re-exported without densities
    assert json.loads((tmp_path / "cfg.json").read_text())["reshape_activations"] == "none"
    assert not (tmp_path / "sparsity.safetensors").exists()


def test_load_saelens__foreign_standard_dir_maps_to_anthropic(tmp_path):
    sae, x = _trained_like("anthropic")
    export_saelens(sae, tmp_path, hook_name="blocks.0.hook_resid_post")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["sae_stream"]  # as if SAELens had written it
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    back = load_saelens(tmp_path)
    assert back.cfg.architecture == "anthropic"
    assert torch.equal(back.encode(x), sae.encode(x))


def test_hook_layer__blocks_their_index_hooks_after_them_the_last_block():
    """cfg.json's hook_layer (older SAELens stops the model after block hook_layer): ln_final / unembed hooks sit
    after the last block, so a 2-layer model's is 1, not 0."""
    from sae_stream.export import hook_layer

    assert hook_layer("blocks.3.mlp.hook_post", 4) == 3 and hook_layer("blocks.0.attn.hook_z") == 0
    assert hook_layer("ln_final.hook_normalized", 2) == 1 and hook_layer("unembed.hook_out", 6) == 5
    assert hook_layer("hook_embed", 2) == hook_layer("hook_pos_embed", 2) == 0


@pytest.mark.parametrize(("arch", "b_dec_input"), [("jumprelu", True), ("jumprelu", False), ("jumprelu", None),
                                                   ("topk", False), ("topk", True), ("standard", None)])
def test_load_saelens__files_of_other_writers_give_saelens_features(tmp_path, arch, b_dec_input):
    """A SAELens directory we did not write (per-feature jumprelu thresholds, one of them 0; apply_b_dec_to_input
    true, false or absent, i.e. true) loads to our SAE with SAELens's features and reconstructions: an encoder
    input that differs from our architecture's is folded into b_enc. Written back out by us, it round-trips."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    d_in, d_sae = 8, 24
    w = {"W_enc": torch.randn(d_in, d_sae, generator=g), "b_enc": torch.randn(d_sae, generator=g) * 0.3,
         "W_dec": torch.randn(d_sae, d_in, generator=g), "b_dec": torch.randn(d_in, generator=g) * 2}
    if arch == "jumprelu":
        w["threshold"] = torch.rand(d_sae, generator=g) * 2
        w["threshold"][0] = 0.0  # fires on any positive pre-activation
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "normalize_activations": "none", "k": 5}
    if b_dec_input is not None:
        cfg["apply_b_dec_to_input"] = b_dec_input
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = load_saelens(tmp_path)
    x = torch.randn(64, d_in, generator=g) * 2
    want_f, want_x = saelens_reference(tmp_path, x)
    got = sae.encode(x)
    assert 0.05 < (want_f > 0).float().mean() < 0.95
    torch.testing.assert_close(got, want_f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(got), want_x, rtol=1e-5, atol=1e-5)
    export_saelens(sae, tmp_path / "again", hook_name="blocks.0.hook_resid_post")
    torch.testing.assert_close(load_saelens(tmp_path / "again").encode(x), got, rtol=1e-6, atol=1e-6)


def test_load_saelens__a_run_directory_is_pointed_to_its_sae(tmp_path):
    sae, _ = _trained_like("anthropic")
    export_saelens(sae, tmp_path / "sae", hook_name="blocks.0.mlp.hook_post")
    with pytest.raises(ValueError, match=r"has no cfg.json: .* \(a run directory: its SAE is in '.*/sae'\)$"):
        load_saelens(tmp_path)
    with pytest.raises(ValueError, match=r"SAELens$"):
        load_saelens(tmp_path / "sae" / "nowhere")
