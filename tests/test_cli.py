"""The command line end to end on a tiny byte-level LM: the run directory, errors, resume."""

import json
from pathlib import Path

import pytest
import yaml

from sae_stream.cli import main
from sae_stream.config import ConfigError, config_from_dict, default_config_path, help_text, load_config

# A byte-level model small enough that LM + SAE + eval + dashboard take seconds on 2 cores.
TINY = [
    "--data.tokenizer=byte", "--data.context_len=32", "--lm.vocab_size=320", "--lm.d_model=32", "--lm.n_heads=2",
    "--lm.d_mlp=64", "--lm.n_ctx=32", "--lm_train.lr=0.01", "--lm_train.tokens=200000", "--lm_train.batch_size=16",
    "--lm_train.eval_every=200", "--lm_train.eval_tokens=2048", "--lm_train.warmup_steps=5",
    "--buffer.capacity=4096", "--buffer.lm_batch_size=16", "--sae.d_sae=128", "--sae.l1_coeff=0.0003",
    "--train.total_tokens=40960", "--train.batch_size=512", "--train.log_every=10", "--train.checkpoint_every=40",
    "--train.density_window_tokens=20000", "--resample.at_steps=[30]", "--resample.pool_size=2048",
    "--resample.dead_window=20", "--eval.tokens=2048", "--analysis.tokens=2048", "--analysis.features=8",
    "--analysis.top_k=4",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["run", "--out", str(out), *TINY]) == 0
    return out


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


def test_cli__existing_run_dir_is_not_overwritten(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    before = (tiny_run / "eval.json").read_bytes()
    assert main(["run", "--out", str(tiny_run), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    assert (tiny_run / "eval.json").read_bytes() == before


@pytest.mark.parametrize(("args", "needle"), [
    (["--sae.d_sae=abc"], "sae.d_sae"),
    (["--sae.bogus=1"], "unknown config key 'sae.bogus'"),
    (["--nosection.x=1"], "unknown config key 'nosection'"),
    (["--sae.architecture=resnet"], "sae.architecture"),
    (["--sae.architecture=topk", "--sae.k=5000", "--sae.d_sae=128"], "sae.k"),
    (["--train.batch_size=0"], "train.batch_size must be > 0"),
    (["--buffer.capacity=100"], "buffer.capacity"),
    (["--data.context_len=2048"], "data.context_len"),
])
def test_cli__bad_config_is_one_line_exit_2(args: list[str], needle: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "never"
    assert main(["run", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()


def test_cli__bad_inputs_name_the_fix(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lm = str(tiny_run / "lm")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    corrupt = tmp_path / "corrupt_lm"
    corrupt.mkdir()
    for name in ("config.yaml", "model.safetensors"):
        (corrupt / name).write_bytes((tiny_run / "lm" / name).read_bytes())
    with open(corrupt / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    cases = [
        (["train", "--lm", lm, "--out", str(tmp_path / "a"), *TINY, "--buffer.hook_name=blocks.7.nope"], "blocks.0"),
        (["train", "--lm", lm, "--out", str(tmp_path / "b"), *TINY, "--sae.d_in=100"], "sae.d_in"),
        (["train", "--lm", str(tmp_path / "missing"), "--out", str(tmp_path / "c"), *TINY], "missing"),
        (["train", "--resume", str(tmp_path / "nothing")], "not a run directory"),
        (["eval", str(tmp_path / "nothing")], "not a run directory"),
        (["lm", "train", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "d")], "not found"),
        (["lm", "train", str(default_config_path()), "--out", str(tmp_path / "e"), *TINY,
          f"--data.source={empty}"], "no text"),
        (["lm", "train", str(default_config_path()), "--out", str(tmp_path / "f"), "--data.tokenizer=gpt3"],
         "data.tokenizer"),
        (["train", "--lm", str(corrupt), "--out", str(tmp_path / "g"), *TINY], "model.safetensors"),
        (["train", "--lm", lm, "--out", str(tmp_path / "p"), *TINY, "--buffer.hook_name=blocks.0.attn.hook_pattern"],
         "attn.hook_z"),  # (trainable, but nothing after training could read it)
        (["eval", str(tiny_run), "--buffer.hook_name=blocks.0.hook_resid_pre"], "drop that override"),
        (["analyze", str(tiny_run), "--buffer.hook_name=blocks.0.mlp.hook_pre"], "blocks.0.mlp.hook_post"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, (argv, err)
    # a data error leaves lm train's --out as it was (no config.yaml), so the corrected command can use it
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": f"document {i} " * 20}) + "\n" for i in range(50)))
    out = tmp_path / "lm_out"
    argv = ["lm", "train", str(default_config_path()), "--out", str(out), *TINY, f"--data.source={jsonl}",
            "--lm_train.tokens=2048", "--data.heldout_fraction=0.5"]
    assert main(argv) == 2 and "data.text_field" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
    assert main([*argv, "--data.text_field=body"]) == 0 and (out / "model.safetensors").is_file()
    # `python -m lm.train` is the same command, with the same one-line errors
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-m", "lm.train", "--out", str(tmp_path / "h"), f"--data.source={empty}"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "no text" in bad.stderr


def test_cli__guards_keep_runs_and_name_the_fix(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    import signal

    lm = str(tiny_run / "lm")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    listing = sorted(str(p.relative_to(copy)) for p in copy.rglob("*"))

    def fails(argv: list[str], needle: str) -> None:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, (argv, err)

    # --overwrite: an LM inside the directory it replaces; a bad input found after the move: the old run is back
    fails(["run", "--out", str(copy), "--overwrite", "--lm", str(copy / "lm"), *TINY], "lies inside --out")
    fails(["train", "--lm", lm, "--out", str(copy), "--overwrite", *TINY, "--buffer.hook_name=blocks.7.nope"],
          "blocks.0")
    # `run` checks the SAE side on the untrained LM before training one; `--out .` names the directory itself
    fails(["run", "--out", str(copy), "--overwrite", *TINY, "--buffer.hook_name=blocks.7.nope"], "blocks.0")
    monkeypatch.chdir(copy)
    fails(["train", "--lm", lm, "--out", ".", "--overwrite", *TINY, "--sae.d_in=7"], "sae.d_in")
    monkeypatch.chdir(tmp_path)
    # SIGTERM while the new run starts up: the old run is put back, exit status 143
    from sae_stream import pipeline

    def terminated(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)

    with monkeypatch.context() as m:
        m.setattr(pipeline.Session, "__init__", terminated)
        with pytest.raises(SystemExit) as stopped:
            main(["train", "--lm", lm, "--out", str(copy), "--overwrite", *TINY])
    assert stopped.value.code == 143 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*")) == listing
    assert not list(tmp_path.glob(".copy.replaced-*"))
    stranger = tmp_path / "not_a_run"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    fails(["train", "--lm", lm, "--out", str(stranger), "--overwrite", *TINY], "not a run directory")
    assert (stranger / "notes.txt").read_text() == "mine"
    # text settings that do not suit the LM: one line, and no half-made run directory left behind
    fails(["train", "--lm", lm, "--out", str(tmp_path / "x"), "--data.tokenizer=byte"],
          "data.context_len (128) exceeds lm.n_ctx (32), the LM's context: set --data.context_len=32 or less")
    fails(["train", "--lm", lm, "--out", str(tmp_path / "x"), "--data.context_len=32"],
          "data.tokenizer='gpt2' but the LM in")
    assert not (tmp_path / "x").exists()
    # analyze with a hook the SAE was not trained on; overrides written with a space; flags --resume ignores
    fails(["analyze", str(copy), "--buffer.hook_name=blocks.0.attn.hook_z"], "drop that override")  # (not its hook)
    fails(["train", "--lm", lm, "--train.lr", "--out", str(tmp_path / "y")], "--train.lr needs a value")
    fails(["train", "--resume", str(copy), "--out", str(tmp_path / "z")], "drop --out")
    fails(["train", "--lm", lm, "--out", str(copy), *TINY, "--train.lr", "abc"], "train.lr")


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
    # never fire without use_attn_result & co., or give no vector per position: not offered
    assert not any(h.endswith(("hook_result", "hook_q_input", "hook_pattern", "hook_attn_scores")) for h in hooks)
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


def test_train__disk_full_while_checkpointing_keeps_previous(tiny_run: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    import errno

    from sae_stream import checkpoint

    class Full:  # the file of the second checkpoint: the disk fills up part-way through torch.save
        def __init__(self, f) -> None:
            self.f, self.left = f, 4096

        def write(self, data: bytes) -> int:
            if len(data) > self.left:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.left -= len(data)
            return self.f.write(data)

        def __getattr__(self, name: str):
            return getattr(self.f, name)

    init, writers = checkpoint._HashingWriter.__init__, []

    def second_file_fills_the_disk(self, f) -> None:
        writers.append(self)
        init(self, Full(f) if len(writers) == 2 else f)

    monkeypatch.setattr(checkpoint._HashingWriter, "__init__", second_file_fills_the_disk)
    run = tmp_path / "full"
    argv = ["train", "--lm", str(tiny_run / "lm"), "--out", str(run), *TINY, "--train.checkpoint_every=10"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()  # (torch.save itself says only "unexpected pos")
    assert len(err) == 1 and "disk full" in err[0] and f"sae-stream train --resume {run}" in err[0], err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000010"]  # no partial leftovers
    checkpoint.verify_checkpoint(run / "checkpoints" / "step_00000010")


def test_train__short_dataset_without_loop_stops_and_says_so(tiny_run: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    text = tmp_path / "short.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." * 3 for i in range(40)))
    run = tmp_path / "short"
    argv = ["train", "--lm", str(tiny_run / "lm"), "--out", str(run), *TINY, f"--data.source={text}",
            "--data.loop=false"]
    with pytest.warns(UserWarning) as record:
        assert main(argv) == 0
    messages = " ".join(str(w.message) for w in record)
    assert "data.loop=false" in messages and "training stops here" in messages
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 0 < steps[-1] < 40960 // 512  # stopped early, and exported what it trained
    assert (run / "sae" / "sae_weights.safetensors").is_file()


@pytest.mark.parametrize(("policy", "needle"), [("stop", "non-finite activations in the batch of step 1"),
                                                ("skip", "entirely non-finite")])
def test_train__nan_activations_stop_with_the_step(policy: str, needle: str, tiny_run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan_lm"
    broken.mkdir()
    (broken / "config.yaml").write_bytes((tiny_run / "lm" / "config.yaml").read_bytes())
    weights = load_file(tiny_run / "lm" / "model.safetensors")
    name = next(k for k in weights if "mlp" in k and k.endswith("weight"))
    weights[name][:] = float("nan")  # every MLP neuron becomes NaN
    save_file(weights, broken / "model.safetensors")
    argv = ["train", "--lm", str(broken), "--out", str(tmp_path / "run"), *TINY, f"--train.nan_policy={policy}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))  # nothing trained on NaN was saved


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
    with pytest.raises(ConfigError, match="device must be auto, cuda or cpu, got 'gpu'"):
        load_run(tiny_run, device="gpu")
    with pytest.raises(UserError, match="not a run directory"):
        load_run(tiny_run / "sae")


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


def test_cli__flags_and_overrides_where_a_researcher_puts_them(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--debug after the command works as before it; an override given to a command that reads no config is an
    error, not silently dropped; `lm train` without a config trains the packaged default (checked up to --out);
    a broken YAML config says where."""
    assert main(["train", "--lm", "x", "--sae.d_sae=abc", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.strip().splitlines()[-1] == "sae-stream: error: sae.d_sae: expected an integer, got 'abc'"
    assert main(["config", "--sae.d_sae=5"]) == 2
    assert "takes no config overrides (--sae.d_sae=5)" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["lm", "train", "--out", str(tmp_path / "afile")]) == 2  # the default config loaded, then --out
    assert "is a file, not a directory" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("sae:\n  d_sae: 4\n bad: 1\n")
    assert main(["run", str(tmp_path / "bad.yaml")]) == 2
    assert "is not valid YAML at line 3, column 2" in capsys.readouterr().err


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
