"""The command line on bad input and failures: one-line errors that name the fix (exit status 2), existing runs
left as they were, a disk that fills up while checkpointing, a dataset that runs out, non-finite activations.
(The working paths: test_cli.py; `tiny_run` is in _tiny_run.py.)"""

import json
import shutil
from pathlib import Path

import pytest

from sae_stream.cli import main
from sae_stream.config import default_config_path
from tests._tiny_run import TINY


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
        (["lm", "train", "--resume", str(tmp_path / "nope")], "no such directory"),
        (["lm", "train", str(default_config_path()), "--out", str(tmp_path / "e"), *TINY,
          f"--data.source={empty}"], "no text"),
        (["lm", "train", str(default_config_path()), "--out", str(tmp_path / "f"), "--data.tokenizer=gpt3"],
         "data.tokenizer"),
        (["train", "--lm", str(corrupt), "--out", str(tmp_path / "g"), *TINY], "model.safetensors"),
        (["train", "--lm", lm, "--out", str(tmp_path / "p"), *TINY, "--buffer.hook_name=blocks.0.attn.hook_pattern"],
         "attn.hook_z"),  # (trainable, but nothing after training could read it)
        (["train", "--lm", lm, "--out", str(tmp_path / "q"), *TINY, "--buffer.hook_name=blocks.0.hook_q_input"],
         "train on 'blocks.0.hook_resid_pre', the same values"),
        (["eval", str(tiny_run), "--buffer.hook_name=blocks.0.hook_resid_pre"], "drop that override"),
        (["eval", str(tiny_run), "--sae.d_sae=5"], "--sae.d_sae: the SAE is read as trained"),
        (["analyze", str(tiny_run), "--resample.at_steps=[3]"], "would change nothing: drop it"),
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


def test_train__a_data_error_leaves_out_as_it_was(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The text is read (the ring filled once) before `train` writes anything: a missing column leaves a new --out
    absent, and an --overwrite's old run in place, so the corrected command can use the same --out. The session
    that failed is closed (its text reader, lock and process group)."""
    from sae_stream.pipeline import Session

    closed, close = [], Session.close
    monkeypatch.setattr(Session, "close", lambda self: (closed.append(1), close(self)))
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": f"document {i} " * 20}) + "\n" for i in range(50)))
    out, old = tmp_path / "new", tmp_path / "old"
    shutil.copytree(tiny_run, old)
    before = sorted(str(p.relative_to(old)) for p in old.rglob("*"))
    argv = ["train", "--lm", str(tiny_run / "lm"), *TINY, f"--data.source={jsonl}", "--train.total_tokens=4096"]
    for where in (["--out", str(out)], ["--out", str(old), "--overwrite"]):
        assert main([*argv, *where]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "data.text_field" in err, err
    assert not out.exists() and len(closed) == 2
    assert sorted(str(p.relative_to(old)) for p in old.rglob("*")) == before
    assert main([*argv, "--out", str(out), "--data.text_field=body"]) == 0 and (out / "sae").is_dir()


def test_cli__guards_keep_runs_and_name_the_fix(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
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
    assert main(["config", "my.yaml"]) == 2
    assert "takes no config file or other argument (my.yaml): it prints every field" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["lm", "train", "--out", str(tmp_path / "afile")]) == 2  # the default config loaded, then --out
    assert "is a file, not a directory" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("sae:\n  d_sae: 4\n bad: 1\n")
    assert main(["run", str(tmp_path / "bad.yaml")]) == 2
    assert "is not valid YAML at line 3, column 2" in capsys.readouterr().err


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


@pytest.mark.parametrize("argv, needle, where", [
    (["steer"], "the following arguments are required: run_dir, --feature", "sae-stream steer --help"),
    (["bogus"], "invalid choice: 'bogus'", "sae-stream --help"),
    (["tokenize", "--shard-tokens", "x"], "argument --shard-tokens: invalid int value: 'x'",
     "sae-stream tokenize --help"),
    ([], "the following arguments are required: command", "sae-stream --help"),
])
def test_cli__usage_errors_are_one_line_naming_the_help_to_read(argv, needle, where, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("sae-stream: error: ") and needle in err and f"(see `{where}`)" in err
