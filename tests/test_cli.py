"""The command line end to end on a tiny byte-level LM: the run directory, eval, resume, hooks, the notebook API,
moved runs, shipped configs. (Bad input and failures: test_cli_errors.py; `tiny_run` is in _tiny_run.py.)"""

import json
from pathlib import Path

import pytest
import yaml

from sae_stream.cli import main
from sae_stream.config import ConfigError, config_from_dict, default_config_path, help_text, load_config
from tests._tiny_run import TINY


def test_run__writes_the_run_directory(tiny_run: Path) -> None:
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "density_histogram.png", "sae/cfg.json",
                 "sae/sae_weights.safetensors", "sae/sparsity.safetensors", "dashboard/index.html",
                 "lm/model.safetensors", "training_curves.png", "lm/training_curves.png"):
        assert (tiny_run / name).is_file(), name
    page = (tiny_run / "dashboard/index.html").read_text()  # the run's plots linked from the dashboard
    for name in ("training_curves.png", "density_histogram.png", "eval.json"):
        assert f'href="../{name}"' in page
    for png in ("density_histogram.png", "training_curves.png", "lm/training_curves.png"):
        assert (tiny_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert any((tiny_run / "checkpoints").iterdir())
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert Path(cfg["lm"]["path"]).is_absolute()  # resumable from any working directory
    saelens = json.loads((tiny_run / "sae/cfg.json").read_text())
    assert (saelens["d_in"], saelens["d_sae"]) == (64, 128)
    assert saelens["hook_name"] == "blocks.0.mlp.hook_post"
    # trained without position 0: SAELens's slice of each context says so (slice(1, None))
    assert saelens["metadata"]["seqpos_slice"] == [1, None] and saelens["reshape_activations"] == "none"


def test_run__eval_is_sane(tiny_run: Path) -> None:
    ev = json.loads((tiny_run / "eval.json").read_text())
    ce = ev["ce_loss"]
    assert 0 < ev["fvu"] < 1  # reconstructs better than the mean
    assert ce["clean"] < ce["zero_ablation"]  # the MLP matters to this LM
    recovered = (ce["zero_ablation"] - ce["sae"]) / (ce["zero_ablation"] - ce["clean"])
    assert ev["ce_loss_recovered"]["zero"] == pytest.approx(recovered)
    lo, hi = ev["ce_loss_recovered_ci95"]["zero"]  # (64 contexts of 32 tokens: two blocks of 1024 tokens)
    assert lo <= recovered <= hi
    steps = [json.loads(line)["step"] for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 40960 // 512


def test_train__resume_continues_from_checkpoint(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "sae"
    lm = str(tiny_run / "lm")
    short = [*TINY, "--train.total_tokens=20480", "--train.checkpoint_every=20"]
    assert main(["train", "--lm", lm, "--out", str(run), *short]) == 0
    (run / "sae").rename(tmp_path / "first_export")
    cfg_path = run / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["train"]["total_tokens"] = 30720  # extend the run: resume must start at step 40 and stop at 60
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--resume", str(run)]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 60 and 50 in steps
    assert (run / "checkpoints" / "step_00000060").is_dir()


SHA = "0123456789abcdef0123456789abcdef01234567"


def _stand_in_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list:
    """The Hub stood in for: any dataset is a local jsonl, and resolving a revision names commit SHA. Returns the
    list of revisions datasets were opened at."""
    import datasets
    import huggingface_hub

    from sae_stream import data

    shard = tmp_path / "shard.jsonl"
    shard.write_text("".join(json.dumps({"text": f"record {i}: " + "some words " * 30}) + "\n" for i in range(400)))
    opened, real = [], datasets.load_dataset

    def load_dataset(name, subset=None, *, split, streaming, revision=None):
        opened.append(revision)
        return real("json", data_files=str(shard), split="train", streaming=True)

    monkeypatch.setattr(data, "hub_unreachable_reason", lambda *a, **k: None)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info",
                        lambda self, repo_id, **kw: type("Info", (), {"sha": SHA})())
    return opened


def test_train__a_hub_dataset_is_pinned_to_its_commit_for_the_run_and_its_resume(
        tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A HF source without a sha is resolved once, at the start; config.yaml keeps the sha and the resume streams
    that commit without asking the Hub again."""
    import huggingface_hub

    opened = _stand_in_hub(monkeypatch, tmp_path)
    run = tmp_path / "run"
    short = [*TINY, "--train.total_tokens=10240", "--train.checkpoint_every=10", "--data.source=someone/corpus"]
    assert main(["train", "--lm", str(tiny_run / "lm"), "--out", str(run), *short]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["hf_revision"] == SHA
    assert set(opened) == {SHA}
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda *a, **k: 1 / 0)  # (not asked again)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"]["total_tokens"] = 15360
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    opened.clear()
    assert main(["train", "--resume", str(run)]) == 0
    assert opened and set(opened) == {SHA}


def test_lm_train__resume_with_its_config_keeps_the_pinned_commit(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`lm train CONFIG --out DIR --resume` with the CONFIG it began with (no sha in it) resumes at the commit the
    LM began on, instead of refusing a changed data.hf_revision."""
    import huggingface_hub

    opened = _stand_in_hub(monkeypatch, tmp_path)
    config, lm = str(default_config_path()), tmp_path / "lm"
    args = [*TINY, "--data.source=someone/corpus", "--lm_train.eval_every=20", "--lm_train.checkpoint_every=20"]
    assert main(["lm", "train", config, "--out", str(lm), *args, "--lm_train.tokens=10240"]) == 0
    assert yaml.safe_load((lm / "config.yaml").read_text())["data"]["hf_revision"] == SHA
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda *a, **k: 1 / 0)
    opened.clear()
    assert main(["lm", "train", config, "--out", str(lm), "--resume", *args, "--lm_train.tokens=15360"]) == 0
    assert opened and set(opened) == {SHA}


def test_config__yaml_roundtrip_and_defaults(tiny_run: Path) -> None:
    saved = load_config(tiny_run / "config.yaml")
    assert saved.sae.d_sae == 128 and saved.data.tokenizer == "byte"
    shipped = Path(__file__).parents[1] / "configs" / "default.yaml"
    assert shipped.read_text() == default_config_path().read_text()  # the package carries the same default
    with pytest.raises(ConfigError, match="train.lr: expected a number"):
        config_from_dict({"train": {"lr": "fast"}})
    with pytest.raises(ConfigError, match="expected true or false"):
        config_from_dict({"wandb": {"enabled": "yes"}})
    assert "--sae.l1_coeff" in help_text() and "λ" in help_text()


def test_cli__hooks_lists_model_hooks(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["hooks", "--lm", str(tiny_run / "lm")]) == 0
    hooks = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    assert hooks["blocks.0.mlp.hook_post"] == str(_hook_width(tiny_run, "blocks.0.mlp.hook_post"))
    assert hooks["blocks.0.hook_resid_pre"] == str(_hook_width(tiny_run, "blocks.0.hook_resid_pre"))
    assert hooks["blocks.0.attn.hook_z"] == str(_hook_width(tiny_run, "blocks.0.attn.hook_z"))  # heads x d_head
    # switched on when asked for: offered (each head's output in the residual stream: heads x d_model); the
    # residual stream copied per head, or no vector per position: not offered
    assert int(hooks["blocks.0.attn.hook_result"]) == 2 * 32 and hooks["blocks.0.hook_mlp_in"] == "32"
    assert not any(h.endswith(("hook_q_input", "hook_attn_in", "hook_pattern", "hook_attn_scores")) for h in hooks)
    # every hook offered is one the stream's forward reaches (it stops before the unembedding), at the width listed,
    # and a vector (not LayerNorm's one-number hook_scale)
    from sae_stream.activations import hook_dim
    from sae_stream.lm_bridge import load_lm

    model = load_lm(str(tiny_run / "lm"), "cpu")
    assert {name: hook_dim(model, name) for name in hooks} == {name: int(w) for name, w in hooks.items()}
    assert min(int(w) for w in hooks.values()) > 1 and "ln_final.hook_normalized" in hooks
    for hook, why in (("unembed.hook_in", "ln_final.hook_normalized"), ("blocks.0.ln1.hook_scale", "one number")):
        assert main(["train", "--lm", str(tiny_run / "lm"), "--out", str(tiny_run.parent / "h"), *TINY,
                     f"--buffer.hook_name={hook}"]) == 2
        assert why in capsys.readouterr().err and not (tiny_run.parent / "h").exists()
    assert main(["hooks", "--lm", str(tiny_run)]) == 2  # the run's directory, not its LM: the error points there
    assert f"its LM is {str(tiny_run / 'lm')!r}" in capsys.readouterr().err


def test_cli__an_optional_hook_trains_and_evaluates(tiny_run: Path, tmp_path: Path) -> None:
    """attn.hook_result fires only once transformer-lens's use_attn_result is on: `train` turns it on in its LM,
    and so must eval (which loads the LM afresh), or its forward would never reach the hook."""
    out = tmp_path / "result"
    assert main(["train", "--lm", str(tiny_run / "lm"), "--out", str(out), *TINY, "--train.total_tokens=4096",
                 "--buffer.hook_name=blocks.0.attn.hook_result"]) == 0
    assert main(["eval", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["hook_name"] == "blocks.0.attn.hook_result" and result["ce_loss_recovered"]["zero"] > 0.5


def test_run__on_a_hugging_face_tokenizer_end_to_end(hf_tokenizer: str, tmp_path: Path) -> None:
    """data.tokenizer=hf:DIR (an LM family with its own tokenizer): LM, SAE, eval and dashboard on its ids, the
    embedded corpus cached under the vocabulary's hash; a transformer-lens LM that carries another tokenizer than
    data.tokenizer is refused, naming its own."""
    from sae_stream.config import load_config
    from sae_stream.lm_bridge import load_lm
    from sae_stream.report import check_lm_fits
    from sae_stream.rundir import UserError
    from sae_stream.tokenizer import get_tokenizer
    from sae_stream.trained import load_run

    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *TINY, f"--data.tokenizer={hf_tokenizer}"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["ce_loss_recovered"]["zero"] > 0.5 and (out / "dashboard" / "index.html").is_file()
    run = load_run(out, device="cpu")
    tokens = run.tokens("the cat sat")
    assert tokens[0].tolist() == [0, *get_tokenizer(hf_tokenizer).encode("the cat sat")]  # eos first, then text
    model = load_lm(str(out / "lm"), "cpu")
    from transformers import AutoTokenizer

    model.tokenizer = AutoTokenizer.from_pretrained(hf_tokenizer[3:])  # as transformer-lens's Hub models carry one
    hub = "--lm.path=a-hub-model"  # (no lm train config.yaml to compare with)
    check_lm_fits(model, load_config(out / "config.yaml", [hub]))  # its own: fine
    with pytest.raises(UserError, match=f"data.tokenizer 'byte' encodes text differently from the LM's own "
                                        f"tokenizer .*: set --data.tokenizer=hf:{hf_tokenizer[3:]}"):
        check_lm_fits(model, load_config(out / "config.yaml", [hub, "--data.tokenizer=byte"]))


def _hook_width(run: Path, hook: str) -> int:
    from sae_stream.activations import hook_dim
    from sae_stream.lm_bridge import load_lm

    return hook_dim(load_lm(str(run / "lm"), "cpu"), hook)


def test_module__python_m_entry_point() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "sae_stream", "config"], capture_output=True, text=True, check=True)
    assert "--buffer.hook_name" in out.stdout


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_config__shipped_configs_validate(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.buffer.capacity >= 2 * cfg.train.batch_size


def test_readme__config_reference_is_current() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
    documented = readme[readme.index(start) + len(start):readme.index(end)].strip()
    assert documented == help_text(markdown=True), "regenerate with: sae-stream config --markdown"


@pytest.mark.parametrize("hook", ["blocks.0.mlp.hook_post", "blocks.0.hook_resid_mid"])
def test_session__native_lm_capture_streams_the_hooked_values(tiny_run: Path, tmp_path: Path, hook: str) -> None:
    """With buffer.lm_native the stream runs the GPT's own forward; its chunks equal the transformer-lens ones."""
    import torch

    from lm.capture import GPTCapture
    from sae_stream.activations import HookCapture
    from sae_stream.pipeline import Session

    def first_chunk(native: bool) -> tuple[object, torch.Tensor]:
        cfg = load_config(None, [*TINY, f"--lm.path={tiny_run / 'lm'}", f"--buffer.lm_native={native}",
                                 f"--buffer.hook_name={hook}", "--train.device=cpu"])
        session = Session(cfg, tmp_path / f"native_{native}")
        for member in session.members:
            member.tracker.close()
        return session.stream.capture, next(iter(session.stream)).acts

    native, acts_native = first_chunk(True)
    hooked, acts_hooked = first_chunk(False)
    assert isinstance(native, GPTCapture) and isinstance(hooked, HookCapture)
    torch.testing.assert_close(acts_native, acts_hooked, rtol=1e-4, atol=1e-5)


def test_sae_stream__reaches_lm_only_through_lm_bridge() -> None:
    """The buffer, trainer, SAE and evaluation must work on any HookedTransformer: only lm_bridge.py may import lm."""
    import ast

    root = Path(__file__).resolve().parents[1] / "sae_stream"
    importers = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            if any(n == "lm" or n.startswith("lm.") for n in names):
                importers.add(path.relative_to(root).as_posix())
    assert importers == {"lm_bridge.py"}


def test_load_run__features_and_losses_of_any_text_match_the_parts(tiny_run: Path) -> None:
    """The notebook API: features are the SAE's encoding of the hook's activations at the text's tokens (after the
    end-of-text that starts every document), top_features their largest, loss the model's own CE and the spliced
    one."""
    import torch

    from sae_stream import load_run
    from sae_stream.analysis.hooks import hook_activations
    from sae_stream.rundir import UserError

    run = load_run(tiny_run, device="cpu")
    text = "the cat sat on a mat"  # (20 bytes: the tiny LM reads 32)
    tokens_1T = run.tokens(text)
    assert tokens_1T[0, 0] == run.tokenizer.eot and tokens_1T.shape[1] == len(run.tokenizer.encode(text)) + 1
    feats_TF = run.features(text)
    want = run.sae.encode(hook_activations(run.model, run.hook_name, tokens_1T)[0, 1:])
    torch.testing.assert_close(feats_TF, want.float())
    assert feats_TF.shape == (tokens_1T.shape[1] - 1, run.sae.d_sae) and (feats_TF > 0).any()
    top = run.top_features(text, k=3)
    assert [name for name, _ in top] == run.tokenizer.decode_tokens(tokens_1T[0, 1:].tolist())
    for (_, pairs), row_F in zip(top, feats_TF):
        assert [f for f, _ in pairs] == row_F.topk(3).indices[: len(pairs)].tolist()
        assert len(pairs) == min(3, int((row_F > 0).sum())) and all(v > 0 for _, v in pairs)
    loss = run.loss(text)
    with torch.no_grad():
        assert loss["clean"] == pytest.approx(float(run.model(tokens_1T, return_type="loss")), rel=1e-5)
    assert loss["sae"] != loss["clean"] and loss["sae"] < 2 * loss["clean"]
    with pytest.warns(UserWarning, match="first 31 of its 38 tokens"):
        assert run.features("the cat sat on a mat, and then the dog").shape[0] == 31  # cut to the LM's context
    for method in (run.tokens, run.features, run.top_features, run.loss):
        with pytest.warns(UserWarning) as caught:
            method("the cat sat on a mat, and then the dog")
        assert {Path(w.filename).name for w in caught} == {"test_cli.py"}, method  # (the line that called it)
    with pytest.raises(ValueError, match="k must be at least 1, got 0"):  # (as `features --k 0`)
        run.top_features("the cat", k=0)
    with pytest.raises(ConfigError, match="device must be auto, cuda or cpu, got 'gpu'"):
        load_run(tiny_run, device="gpu")
    with pytest.raises(UserError, match="not a run directory"):
        load_run(tiny_run / "sae")


def test_steer__prints_clean_and_pinned_samples_at_a_multiple_of_the_largest_activation(
        tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    """`sae-stream steer`: "Nx" is N times the feature's largest held-out activation (the scan's own figure), the
    samples are the tokenizer's text, and bad input is a one-line exit 2."""
    import re

    from sae_stream import load_run
    from sae_stream.evaluate import load_feature_density

    density = load_feature_density(tiny_run)
    alive = int(density.argmax())
    assert main(["steer", str(tiny_run), "--feature", str(alive), "--value", "3x", "--tokens", "6", "--samples",
                 "2", "--prompt", "the ", "--train.device=cpu"]) == 0
    out = capsys.readouterr().out
    head = re.match(r"feature (\d+) pinned at ([\d.e+-]+) \(3x its largest activation, ([\d.e+-]+), on ([\d,]+) "
                    r"held-out tokens\); 2 samples of 6 tokens, temperature 1, seed 0, after the prompt 'the '", out)
    assert head and int(head[1]) == alive and float(head[2]) == pytest.approx(3 * float(head[3]), rel=1e-3)
    assert [line.split(":")[0].strip() for line in out.splitlines()[1:]] == ["clean 1", "clean 2", "pinned 1",
                                                                             "pinned 2"]
    run = load_run(tiny_run, device="cpu")
    r = run.steer(alive, "3x", prompt="the ", n_tokens=6, samples=2)
    assert f"pinned 2: {r['pinned'][1]!r}" in out  # (the command prints what the API returns)
    assert len(r["clean"]) == len(r["pinned"]) == 2 and r["value"] == pytest.approx(3 * r["max_activation"])
    b = int(density.argsort(descending=True)[1])  # several features, pinned together: a at 3x its top, b at 0
    assert main(["steer", str(tiny_run), "--feature", f"{alive},{b}", "--value", "3x,0", "--tokens", "6",
                 "--samples", "2", "--train.device=cpu"]) == 0
    out = capsys.readouterr().out
    r = run.steer([alive, b], ["3x", "0"], n_tokens=6, samples=2)
    assert r["max_activation"][1] is None and r["value"] == [pytest.approx(3 * r["max_activation"][0]), 0.0]
    assert out.startswith(f"features {alive}, {b} pinned together at {r['value'][0]:.4g} (3x its largest activation, "
                          f"{r['max_activation'][0]:.4g}), 0, on {r['scanned_tokens']:,} held-out tokens; 2 samples")
    assert f"pinned 2: {r['pinned'][1]!r}" in out
    for args, message in ((["--feature", "100000"], "feature 100000 is not a feature of this SAE"),
                          (["--feature", "0,x"], "--feature '0,x': give a feature id, or ids separated by commas"),
                          (["--feature", "0,0"], "give at least one, each once"),
                          (["--feature", "0,1", "--value", "1,2,3"], "3 pin values for 2 features"),
                          (["--feature", "0", "--value", "lots"], "pin value 'lots': give a number"),
                          (["--feature", "0", "--tokens", "40"], "exceed the LM's context of 32"),
                          (["--feature", "0", "--samples", "0"], "steering needs tokens >= 1, samples >= 1")):
        assert main(["steer", str(tiny_run), *args]) == 2, args
        assert message in capsys.readouterr().err


def test_features__prints_each_tokens_top_features_and_where_to_see_them(tiny_run: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    import re

    from sae_stream import load_run
    from sae_stream.trained import dashboard_features

    assert main(["features", str(tiny_run), "--text", "the cat sat", "--k", "3", "--train.device=cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    top = load_run(tiny_run, device="cpu").top_features("the cat sat", k=3)
    assert lines[0].startswith("11 tokens, their top 3 features at blocks.0.mlp.hook_post")  # (bytes: 11 tokens)
    for line, (token, feats) in zip(lines[1:12], top):  # one line a token, as the API gives them
        printed = re.findall(r"(\d+): ([\d.e+-]+)", line.split(repr(token), 1)[1])
        assert [int(f) for f, _ in printed] == [f for f, _ in feats]
        assert [float(v) for _, v in printed] == pytest.approx([v for _, v in feats], rel=5e-3)  # (3 digits)
    seen = sorted({f for _, feats in top for f, _ in feats})
    shown = dashboard_features(tiny_run)
    assert shown and len(shown) == 8  # (analysis.features=8)
    in_dashboard = [f for f in seen if f in shown]
    assert (f"in the dashboard: {', '.join(map(str, in_dashboard))} (" in lines[12]) == bool(in_dashboard)
    if set(seen) - shown:
        ids = ",".join(map(str, seen))
        assert lines[-1] == f"a dashboard of them all (in dashboard-features/): sae-stream analyze {tiny_run} " \
            f"--features {ids}"
    for args, message in ((["--text", "x", "--k", "0"], "--k must be at least 1, got 0"),
                          (["--text", ""], "--text is empty")):
        assert main(["features", str(tiny_run), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_moved_run__eval_and_load_run_use_its_own_lm(tiny_run: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    """config.yaml names the LM `run` trained by its absolute path; a copied run (the original gone) uses the lm/
    that travelled with it."""
    import shutil

    from sae_stream import load_run
    from sae_stream.config import load_config
    from sae_stream.report import own_lm

    original = tmp_path / "original"
    shutil.copytree(tiny_run, original)
    cfg = yaml.safe_load((original / "config.yaml").read_text())
    cfg["lm"]["path"] = str(original / "lm")  # as `run` wrote it for this directory
    (original / "config.yaml").write_text(yaml.safe_dump(cfg))
    moved = tmp_path / "moved"
    shutil.move(original, moved)
    assert own_lm(moved, load_config(moved / "config.yaml")).lm.path == str((moved / "lm").resolve())
    assert main(["eval", str(moved)]) == 0
    assert load_run(moved, device="cpu").features("a cat").shape[0] == 5
    assert own_lm(moved, load_config(moved / "config.yaml"), ["--lm.path=elsewhere"]).lm.path == str(original / "lm")


def test_train__the_lm_section_is_the_given_lms_and_its_tokenizer_is_required(tiny_run: Path, tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    """With --lm an `lm train` dir, config.yaml's lm section is that LM's (the defaults said d_model 128 and
    vocab 50304 here); an override that contradicts the LM, or another tokenizer, is refused before any work."""
    lm, out = str(tiny_run / "lm"), tmp_path / "x"
    for bad, says in (("--data.tokenizer=gpt2", "was trained with 'byte' (its config.yaml): set --data.tokenizer=byte"),
                      ("--lm.d_model=64", "--lm.d_model=64: the LM in")):
        assert main(["train", "--lm", lm, "--out", str(out), *TINY, bad]) == 2
        assert says in capsys.readouterr().err and not out.exists()
    sae_only = [a for a in TINY if not a.startswith("--lm.")]
    assert main(["train", "--lm", lm, "--out", str(out), *sae_only, "--train.total_tokens=5120"]) == 0
    saved, trained = load_config(out / "config.yaml").lm, load_config(tiny_run / "lm" / "config.yaml").lm
    assert (saved.d_model, saved.vocab_size, saved.d_mlp) == (32, 320, 64)
    assert {**vars(saved), "path": None} == {**vars(trained), "path": None} and saved.path == lm


def test_eval__a_held_out_split_shorter_than_eval_tokens_is_said(tiny_run: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("checkpoints", "dashboard"))
    assert main(["eval", str(copy), "--eval.tokens=4096"]) == 0  # the split holds more: nothing said
    assert "short of eval.tokens" not in capsys.readouterr().out
    assert main(["eval", str(copy), "--eval.tokens=100000000"]) == 0
    out = capsys.readouterr().out
    read = json.loads((copy / "eval.json").read_text())["tokens"]
    assert 4096 < read < 100_000_000 and f"ended after {read:,} tokens, short of eval.tokens=100,000,000" in out
