"""The 1-layer GPT, its training loop and its HookedTransformer twin: tiny models, byte tokenizer, CPU, offline."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import pytest
import torch

from lm.hooked import hook_names, load_hooked, to_hooked
from lm.model import GPT, chunked_cross_entropy
from lm.train import lr_at, make_optimizer, train_lm, unigram_loss
from sae_stream.config import Config, LMConfig, LMTrainConfig, config_from_dict, read_yaml
from sae_stream.tracking import NullTracker, Tracker


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a busy shared machine makes 2-thread sync erratic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_gpt(act_fn: str = "relu", n_layers: int = 1, seed: int = 0, d_model: int = 32, d_mlp: int = 64) -> GPT:
    """A small GPT with every weight perturbed (non-zero biases, non-unit LayerNorms) so no mapping hides."""
    torch.manual_seed(seed)
    gpt = GPT(LMConfig(n_layers=n_layers, d_model=d_model, n_heads=4, d_mlp=d_mlp, n_ctx=16, vocab_size=97,
                       act_fn=act_fn))
    with torch.no_grad():
        for p in gpt.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return gpt.eval()


def tiny_cfg(steps: int, **lm_train: object) -> Config:
    """Byte tokenizer on the embedded corpus, d_model 32: ~2 ms per step on one core."""
    B, T = 16, 32
    train = {"batch_size": B, "tokens": steps * B * T, "eval_tokens": 2048, "eval_every": 50, "checkpoint_every": 1000,
             "lr": 0.01, "warmup_steps": 10, "autocast": "none", "log_every": 10, **lm_train}
    return config_from_dict({
        "data": {"tokenizer": "byte", "context_len": T},
        "lm": {"vocab_size": 257, "d_model": 32, "n_heads": 2, "d_mlp": 128, "n_ctx": T},
        "lm_train": train, "train": {"device": "cpu", "seed": 0}})


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lm_run")
    torch.set_num_threads(1)
    train_lm(tiny_cfg(300, eval_every=100), out)  # bytes: ~300 steps to leave the unigram plateau clearly
    return out


# ---------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("act_fn", ["relu", "gelu"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_to_hooked__logits_equal_gpt(act_fn: str, seed: int) -> None:
    gpt = tiny_gpt(act_fn, n_layers=2, seed=seed)
    hooked = to_hooked(gpt)
    idx_BT = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        diff = (gpt(idx_BT).logits - hooked(idx_BT)).abs().max().item()
    assert diff <= 1e-4, f"{act_fn} seed {seed}: max |logit diff| {diff}"
    assert hooked.cfg.act_fn == act_fn and hooked.cfg.d_head == 8


def test_to_hooked__stop_at_layer_hook_matches_full_cache_and_gpt_neurons() -> None:
    gpt = tiny_gpt("gelu", n_layers=2)
    hooked = to_hooked(gpt)
    idx_BT = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(5))
    name = "blocks.0.mlp.hook_post"
    seen: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        hooked.run_with_hooks(idx_BT, stop_at_layer=1, fwd_hooks=[(name, lambda a, hook: seen.update(x=a.clone()))])
        _, cache = hooked.run_with_cache(idx_BT, names_filter=name)
        handle = gpt.blocks[0].mlp.act.register_forward_hook(lambda m, i, o: seen.update(gpt=o.clone()))
        gpt(idx_BT)
        handle.remove()
    assert seen["x"].shape == (2, 16, 64)
    torch.testing.assert_close(seen["x"], cache[name], rtol=0, atol=0)
    torch.testing.assert_close(seen["x"], seen["gpt"], rtol=0, atol=1e-5)
    assert name in hook_names(hooked) and "blocks.1.hook_resid_post" in hook_names(hooked)


def test_gpt__causal() -> None:
    gpt = tiny_gpt()
    idx_BT = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    changed_BT = idx_BT.clone()
    changed_BT[:, 9] = (changed_BT[:, 9] + 1) % 97
    with torch.no_grad():
        a_BTV, b_BTV = gpt(idx_BT).logits, gpt(changed_BT).logits
    torch.testing.assert_close(a_BTV[:, :9], b_BTV[:, :9], rtol=0, atol=1e-6)
    assert (a_BTV[:, 9:] - b_BTV[:, 9:]).abs().amax(dim=-1).min() > 1e-4  # every later position sees the change


def test_gpt__loss_is_cross_entropy_and_init_scales_residual_projections() -> None:
    torch.manual_seed(0)
    gpt = GPT(LMConfig(n_layers=4, d_model=64, n_heads=4, d_mlp=256, n_ctx=16, vocab_size=97))
    for name, p in gpt.named_parameters():
        if name.endswith("c_proj.weight"):
            assert abs(p.std().item() - 0.02 / math.sqrt(8)) < 0.0015, name
        elif name.endswith("bias"):
            assert p.abs().max() == 0, name
    idx_BT = torch.randint(0, 97, (2, 8))
    logits_BTV, loss = gpt(idx_BT[:, :-1], idx_BT[:, 1:])
    by_hand = -torch.log_softmax(logits_BTV, -1).gather(-1, idx_BT[:, 1:, None]).mean()
    torch.testing.assert_close(loss, by_hand)
    assert abs(loss.item() - math.log(97)) < 0.1  # small init: near-uniform predictions


def test_gpt__chunked_loss_matches_logits_loss_and_grads() -> None:
    gpt = tiny_gpt(n_layers=2)
    idx_BT = torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(2))
    grads = []
    for return_logits in (True, False):
        gpt.zero_grad()
        logits, loss = gpt(idx_BT[:, :-1], idx_BT[:, 1:], return_logits=return_logits)
        assert (logits is None) is (not return_logits)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in gpt.named_parameters()}))
    (ref, ref_grads), (chunked, chunked_grads) = grads
    torch.testing.assert_close(chunked, ref, rtol=0, atol=1e-6)
    for name, g in ref_grads.items():  # wte.weight: embedding + tied unembedding gradients both arrive
        torch.testing.assert_close(chunked_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(gpt(idx_BT[:, :-1], idx_BT[:, 1:], return_logits=False).loss, ref, rtol=0, atol=1e-6)


def test_chunked_cross_entropy__matches_cross_entropy_across_partial_chunks() -> None:
    g = torch.Generator().manual_seed(3)
    h_ND = torch.randn(90, 16, generator=g, requires_grad=True)  # 90 rows, chunk 32: the last chunk has 26
    W_VD = torch.randn(50, 16, generator=g, requires_grad=True)
    y_N = torch.randint(0, 50, (90,), generator=g)
    ref = torch.nn.functional.cross_entropy(h_ND @ W_VD.T, y_N)
    ref_grads = torch.autograd.grad(2.0 * ref, (h_ND, W_VD))  # a non-unit upstream gradient
    loss = chunked_cross_entropy(h_ND, W_VD, y_N, chunk=32)
    grads = torch.autograd.grad(2.0 * loss, (h_ND, W_VD))
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_chunked_cross_entropy__without_grad_is_the_exact_loss() -> None:
    # under no_grad the loss-only branch runs: log-sum-exp, so no floor at 87 nats on a confident miss
    h_ND = torch.tensor([[30.0, 0.0], [0.0, 1.0]], requires_grad=True)
    W_VD = torch.tensor([[50.0, 0.0], [-50.0, 0.0], [0.0, 2.0]], requires_grad=True)
    y_N = torch.tensor([1, 2])  # row 0 puts ~3000 nats between its top logit and the target
    with torch.no_grad():
        loss = chunked_cross_entropy(h_ND, W_VD, y_N, chunk=1)
        ref = torch.nn.functional.cross_entropy(h_ND @ W_VD.T, y_N)
    assert ref > 1000 and loss == pytest.approx(ref.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------- training pieces


def test_lr_at__warmup_then_cosine_to_floor() -> None:
    tc = LMTrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 110, tc) == pytest.approx(0.1)
    assert lr_at(9, 110, tc) == pytest.approx(1.0)
    assert lr_at(10, 110, tc) == pytest.approx(1.0)
    assert lr_at(60, 110, tc) == pytest.approx(0.55)  # halfway through the cosine: (1 + 0.1) / 2
    assert lr_at(110, 110, tc) == pytest.approx(0.1)


def test_make_optimizer__decays_matrices_only() -> None:
    gpt = tiny_gpt()
    opt = make_optimizer(gpt, LMTrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(gpt.parameters()))


def test_unigram_loss__hand_computed() -> None:
    counts_V = torch.tensor([3, 1, 0, 0, 99])  # id 4 is padding beyond n_vocab=4: ignored
    heldout = [torch.tensor([[0, 0, 1, 2]])]  # targets 0, 1, 2
    p = [(3 + 1) / 8, (1 + 1) / 8, (0 + 1) / 8]
    expected = -sum(math.log(x) for x in p) / 3
    assert unigram_loss(counts_V, heldout, n_vocab=4) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------- train_lm


def test_train_lm__heldout_loss_falls(trained_run: Path) -> None:
    result = json.loads((trained_run / "lm_result.json").read_text())
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    heldout = [(r["step"], r["lm/heldout_loss"]) for r in records if "lm/heldout_loss" in r]
    assert heldout[0][0] == 0 and abs(heldout[0][1] - math.log(257)) < 0.1  # untrained: ~uniform over the vocab
    assert [s for s, _ in heldout] == [0, 100, 200, 300]
    assert all(a > b for (_, a), (_, b) in zip(heldout, heldout[1:]))
    assert result["heldout_loss"] == heldout[-1][1] < heldout[0][1] - 2.0
    # bytes need ~1M tokens to get well past unigram statistics; 150k tokens reach them (3.16 vs 3.34 on the
    # Python 3.11 corpus, 3.25 vs 3.28 on 3.12's); a model that failed to learn them would sit far above
    assert result["heldout_loss"] < result["unigram_loss"] + 0.02
    assert 3.0 < result["unigram_loss"] < 4.0  # bytes of English prose
    assert result["steps"] == 300 and result["tokens_trained"] == 300 * 16 * 32
    assert sum("lm/loss" in r for r in records) == 30  # log_every=10


def test_train_lm__every_position_the_stream_reads_is_trained(trained_run: Path) -> None:
    # windows of context_len + 1 tokens: position context_len - 1 (the last one an SAE context has) gets
    # gradients, so Adam's second moment of its position embedding is non-zero (AdamW's decay does not enter it)
    cfg = tiny_cfg(300, eval_every=100)
    (ckpt,) = (trained_run / "checkpoints").glob("step_*")
    state = torch.load(ckpt / "state.pt", weights_only=False)
    model = GPT(cfg.lm)
    opt = make_optimizer(model, cfg.lm_train, torch.device("cpu"))
    opt.load_state_dict(state["optimizer"])
    v_TD = opt.state[model.wpe.weight]["exp_avg_sq"]
    assert v_TD.shape[0] == cfg.data.context_len and bool((v_TD.abs().sum(1) > 0).all())


def test_load_hooked__run_dir_round_trip(trained_run: Path) -> None:
    result = json.loads((trained_run / "lm_result.json").read_text())
    hooked = load_hooked(str(trained_run))
    gpt = GPT.from_run_dir(trained_run)
    assert load_hooked(hooked) is hooked
    cfg = config_from_dict(read_yaml(trained_run / "config.yaml"))
    from sae_stream.data import heldout_batches

    windows = dataclasses.replace(cfg.data, context_len=cfg.data.context_len + 1)  # as lm train evaluates
    batches = list(heldout_batches(windows, 16, cfg.lm_train.eval_tokens))
    total, n = 0.0, 0
    with torch.no_grad():
        for x_BT in batches:
            logits_BTV = hooked(x_BT[:, :-1])
            torch.testing.assert_close(logits_BTV, gpt(x_BT[:, :-1]).logits, rtol=0, atol=1e-4)
            total += torch.nn.functional.cross_entropy(logits_BTV.flatten(0, 1), x_BT[:, 1:].flatten(),
                                                       reduction="sum").item()
            n += x_BT[:, 1:].numel()
    assert total / n == pytest.approx(result["heldout_loss"], abs=1e-4)  # the saved weights are the evaluated ones


class _Crash(Exception):
    pass


class _CrashAfter(Tracker):
    """Writes metrics.jsonl like the real tracker, then dies at the first record past `step`."""

    def __init__(self, run_dir: Path, step: int) -> None:
        super().__init__(run_dir)
        self.step = step

    def log(self, step: int, metrics: dict) -> None:
        if step > self.step:
            self.close()
            raise _Crash(step)
        super().log(step, metrics)


def test_train_lm__resume_continues_exactly_and_skips_corrupt_checkpoint(tmp_path: Path) -> None:
    cfg = tiny_cfg(40, checkpoint_every=10, log_every=1, eval_every=20)
    cfg.lm.dropout = 0.1  # so the RNG state must be restored too
    full = train_lm(cfg, tmp_path / "full", tracker=NullTracker())
    with pytest.raises(_Crash):
        train_lm(cfg, tmp_path / "crashed", tracker=_CrashAfter(tmp_path / "crashed", 31))  # keeps ckpts 20, 30
    ckpts = sorted((tmp_path / "crashed" / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpts] == ["step_00000020", "step_00000030"]
    (ckpts[-1] / "state.pt").write_bytes((ckpts[-1] / "state.pt").read_bytes()[:1000])  # truncated: skip it
    with pytest.warns(UserWarning, match="corrupt"):
        resumed = train_lm(cfg, tmp_path / "crashed", resume=True)
    assert resumed["steps"] == 40
    records = [json.loads(line) for line in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "lm/loss" in r] == list(range(1, 41))  # steps 21-31 logged once
    assert resumed["heldout_loss"] == pytest.approx(full["heldout_loss"], abs=1e-6)
    assert resumed["unigram_loss"] == pytest.approx(full["unigram_loss"], abs=1e-12)  # token counts restored
    a, b = GPT.from_run_dir(tmp_path / "full"), GPT.from_run_dir(tmp_path / "crashed")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=name)


def test_train_lm__bad_resume_and_vocab_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no checkpoint to resume"):
        train_lm(tiny_cfg(5), tmp_path / "empty", resume=True, tracker=NullTracker())
    train_lm(tiny_cfg(5, checkpoint_every=5), tmp_path / "run", tracker=NullTracker())
    with pytest.raises(ValueError, match="already holds LM checkpoints"):
        train_lm(tiny_cfg(5), tmp_path / "run", tracker=NullTracker())
    changed = tiny_cfg(5)
    changed.lm.d_mlp = 64
    with pytest.raises(ValueError, match="lm.d_mlp was 128"):
        train_lm(changed, tmp_path / "run", resume=True, tracker=NullTracker())
    (ckpt,) = (tmp_path / "run" / "checkpoints").glob("step_*")
    (ckpt / "state.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="every checkpoint .* is corrupt"):
        train_lm(tiny_cfg(5), tmp_path / "run", resume=True, tracker=NullTracker())
    small_vocab = tiny_cfg(5)
    small_vocab.lm.vocab_size = 200
    with pytest.raises(ValueError, match="raise lm.vocab_size"):
        train_lm(small_vocab, tmp_path / "vocab", tracker=NullTracker())


def test_train_lm__bf16_autocast_on_cpu_trains(tmp_path: Path) -> None:
    result = train_lm(tiny_cfg(30, autocast="bfloat16", eval_every=30), tmp_path, tracker=NullTracker())
    assert result["autocast"] == "torch.bfloat16"
    assert math.isfinite(result["heldout_loss"]) and result["heldout_loss"] < math.log(257) - 1.0


# ---------------------------------------------------------------------------------------------- load_hooked errors


def _one_line_error(arg: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        load_hooked(arg)
    assert "\n" not in str(info.value)


def test_load_hooked__bad_run_dirs_are_one_line_errors(trained_run: Path, tmp_path: Path) -> None:
    _one_line_error(str(tmp_path / "nope"), "does not exist")
    _one_line_error("./runs/nope", "does not exist")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes((trained_run / "config.yaml").read_bytes())
    _one_line_error(str(run), "model.safetensors.* not found")
    data = (trained_run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) // 2])
    _one_line_error(str(run), "corrupt or truncated")
    (run / "model.safetensors").write_bytes(data)
    (run / "config.yaml").write_text((trained_run / "config.yaml").read_text().replace("d_mlp: 128", "d_mlp: 96"))
    _one_line_error(str(run), r"do not match the LM config \(blocks.0.mlp.c_fc.weight")
    (run / "config.yaml").unlink()
    _one_line_error(str(run), "config.yaml.* not found")


def test_load_hooked__model_name_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    import lm.hooked

    monkeypatch.setattr(lm.hooked, "_is_cached", lambda repo: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    _one_line_error("gelu-1l", "could not download model 'gelu-1l'.*pass a local run dir")
    _one_line_error("NeelNanda/GELU_1L512W_C4_Code", "could not download model")  # a name with '/', not a path
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # concerns datasets only: the connection is what decides
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # nothing listens there: the proxy is what is tried
    _one_line_error("gelu-1l", r"could not download model 'gelu-1l' \(offline: no connection to 127\.0\.0\.1:9")
    assert time.perf_counter() - t0 < 5.0
    _one_line_error("surely-not-a-model", "neither an LM run dir nor a transformer-lens model name")


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
def test_train_lm__cuda_bf16_trains_and_converts(tmp_path: Path, compile: bool) -> None:
    cfg = tiny_cfg(150, compile=compile, autocast="auto")
    cfg.train.device = "cuda"
    result = train_lm(cfg, tmp_path, tracker=NullTracker())
    assert result["device"] == "cuda" and result["autocast"] == "torch.bfloat16"
    assert result["heldout_loss"] < result["unigram_loss"]
    gpt = GPT.from_run_dir(tmp_path, device="cuda")
    hooked = load_hooked(str(tmp_path), device="cuda")
    idx_BT = torch.randint(0, 257, (4, 32), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(hooked(idx_BT), gpt(idx_BT).logits, rtol=0, atol=1e-3)
