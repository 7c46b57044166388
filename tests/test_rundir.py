"""Run directories under --overwrite: the replaced run survives a second Ctrl-C in the rollback, and one stranded
by a killed process is put back (or named) by the next command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sae_stream import rundir
from sae_stream.rundir import UserError, fresh_out_dir


def _old_run(path: Path) -> Path:
    path.mkdir()
    (path / "config.yaml").write_text("old: true\n")
    (path / "metrics.jsonl").write_text("{}\n")
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_rollback__a_ctrl_c_between_its_renames_still_puts_the_old_run_back(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    run = _old_run(tmp_path / "run")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # (a background shell may ignore it)
    replace, calls = os.replace, []

    def ctrl_c_mid_rollback(src, dst):
        calls.append(Path(src).name)
        if ".discarded-" in Path(dst).name:  # the rollback's first rename: a second Ctrl-C lands here
            signal.raise_signal(signal.SIGINT)
        replace(src, dst)

    try:
        with pytest.raises(KeyboardInterrupt):
            with fresh_out_dir(run, "train", overwrite=True) as staged:
                (staged.path / "half_made").write_text("new")
                monkeypatch.setattr(rundir.os, "replace", ctrl_c_mid_rollback)
                raise ValueError("bad input found after the move")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(calls) == 2  # both renames ran before the Ctrl-C took effect
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.jsonl"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # nothing stranded, the discarded new dir removed


def test_fresh_out_dir__a_stranded_replaced_run_is_put_back(tmp_path: Path) -> None:
    """A process killed between moving the old run aside and putting it back: the next command restores it (then
    reports it exists, as for any existing run)."""
    stranded = _old_run(tmp_path / f".run.replaced-{_dead_pid()}-abcd1234")
    with pytest.warns(UserWarning, match="moved aside by an --overwrite that was killed.*restored"):
        with pytest.raises(UserError, match="exists: pass --overwrite"):
            with fresh_out_dir(tmp_path / "run", "train", overwrite=False):
                pass
    assert not stranded.exists() and (tmp_path / "run" / "config.yaml").read_text() == "old: true\n"


def test_fresh_out_dir__only_its_own_stranded_names_count(tmp_path: Path) -> None:
    """`run[1]` is a name, not a pattern: run1's stranded directory is not its, nor one not named as we name
    them; a discarded new directory of this name is removed; a pid out of range is no process."""
    other = _old_run(tmp_path / f".run1.replaced-{_dead_pid()}-abcd1234")
    odd = _old_run(tmp_path / f".run[1].replaced-{_dead_pid()}-not-hex!")
    discarded = _old_run(tmp_path / ".run[1].discarded-0123abcd")
    with fresh_out_dir(tmp_path / "run[1]", "train", overwrite=False) as staged:
        assert not any(staged.path.iterdir())  # a fresh directory: nothing was moved into it
    assert other.is_dir() and odd.is_dir() and not discarded.exists()
    assert not rundir._alive(10**20)  # (os.kill raises OverflowError for it)


def test_fresh_out_dir__a_run_stranded_under_our_own_pid_is_put_back(tmp_path: Path) -> None:
    """In a container a restarted process gets the pid of the one that was killed: its directory is no live one."""
    _old_run(tmp_path / f".run.replaced-{os.getpid()}-abcd1234")
    with pytest.warns(UserWarning, match="restored"), pytest.raises(UserError, match="exists"):
        with fresh_out_dir(tmp_path / "run", "train", overwrite=False):
            pass
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_fresh_out_dir__a_stranded_run_beside_a_new_one_is_named_not_moved(tmp_path: Path) -> None:
    _old_run(tmp_path / "run")
    stranded = _old_run(tmp_path / f".run.replaced-{_dead_pid()}-abcd1234")
    live = _old_run(tmp_path / f".run.replaced-{os.getppid()}-00000000")  # a running --overwrite's: not ours to touch
    with pytest.warns(UserWarning, match=r"\.run\.replaced-\d+-abcd1234' left by an interrupted --overwrite"):
        with fresh_out_dir(tmp_path / "run", "train", overwrite=True) as staged:
            staged.commit()
    assert stranded.is_dir() and live.is_dir()


def test_fresh_out_dir__a_stranded_run_beside_a_new_run_that_never_started_is_put_back(tmp_path: Path) -> None:
    """Killed during the new run's start-up (after its directory and config.yaml files were made, before its
    commit): that directory holds nothing trained, so the old run takes its place again."""
    new = tmp_path / "run"
    (new / "member").mkdir(parents=True)
    (new / "config.yaml").write_text("new: true\n")
    (new / "member" / "config.yaml").write_text("new: true\n")
    rundir.mark_job(new, "run", analyze=False)  # (`run` writes job.json during its start-up too)
    assert rundir.read_job(new) == {"job": "run", "analyze": False}
    stranded = _old_run(tmp_path / f".run.replaced-{_dead_pid()}-abcd1234")
    with pytest.warns(UserWarning, match="restored"), pytest.raises(UserError, match="exists"):
        with fresh_out_dir(new, "train", overwrite=False):
            pass
    assert not stranded.exists() and (new / "config.yaml").read_text() == "old: true\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and not (new / "member").exists()


def test_require_run_dir__puts_a_stranded_run_back_before_looking(tmp_path: Path) -> None:
    """`train --resume RUN` / `eval RUN` after a killed --overwrite: the old run, not "not a run directory"."""
    (tmp_path / "run").mkdir()
    _old_run(tmp_path / f".run.replaced-{_dead_pid()}-abcd1234")
    with pytest.warns(UserWarning, match="restored"):
        assert (rundir.require_run_dir(tmp_path / "run") / "config.yaml").read_text() == "old: true\n"


def test_commit__removes_the_replaced_run_under_a_discarded_name(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit renames the old run before removing it: a kill mid-removal leaves `.run.discarded-*` (removed by
    the next command), never a partly removed `.run.replaced-*` that could be put back."""
    _old_run(tmp_path / "run")
    removed = []
    monkeypatch.setattr(rundir.shutil, "rmtree", lambda p, **kw: removed.append(Path(p).name))
    with fresh_out_dir(tmp_path / "run", "train", overwrite=True) as staged:
        staged.commit()
    assert len(removed) == 1 and removed[0].startswith(".run.discarded-")
    assert not list(tmp_path.glob(".run.replaced-*"))


def test_signals_deferred__an_error_in_the_block_does_not_swallow_the_ctrl_c() -> None:
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            with rundir._signals_deferred():
                signal.raise_signal(signal.SIGINT)
                raise FileNotFoundError("a rename failed")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert isinstance(info.value.__context__, FileNotFoundError)  # (the error is kept as its context)


HOLD = """
import sys, time
from pathlib import Path
from sae_stream.rundir import lock_run
f = lock_run(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(60)
"""


def test_lock_run__one_process_trains_a_run_dir_and_a_killed_holder_frees_it(tmp_path: Path) -> None:
    """A second trainer of the same run (a requeued job beside a manual resume) and an --overwrite of a run being
    trained are refused, naming the holder; the kernel frees the lock when the holder dies, even by SIGKILL."""
    run = _old_run(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"is being trained by sae-stream pid {holder.pid}"):
            rundir.lock_run(run)
        assert rundir.locked(run)
        with pytest.raises(UserError, match="a process is training it"):
            with fresh_out_dir(run, "train", overwrite=True):
                pass
        assert (run / "metrics.jsonl").is_file()  # untouched
    finally:
        holder.kill()
        holder.wait()
    assert not rundir.locked(run)
    mine = rundir.lock_run(run)
    with pytest.raises(UserError, match=f"pid {os.getpid()}"):  # (a second open of it, even in one process)
        rundir.lock_run(run)
    mine.close()
    rundir.lock_run(run).close()


def test_lm_train__holds_the_lock_of_the_directory_it_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`lm train` (fresh and --resume) and `run`'s LM stage train under the run lock, as `train` does: a second
    process on the same directory is refused instead of writing the same checkpoints."""
    from sae_stream import pipeline
    from sae_stream.config import default_config_path

    held: list[tuple[str, bool, bool]] = []

    class Stop(Exception):
        pass

    def record(cfg: object, out_dir: Path, resume: bool = False, started: object = None) -> dict:
        held.append((Path(out_dir).name, rundir.locked(Path(out_dir)), rundir.locked(Path(out_dir).parent)))
        raise Stop

    monkeypatch.setattr(pipeline, "train_lm", record)
    lm = tmp_path / "lm"
    with pytest.raises(Stop):
        pipeline.lm_train(None, [], str(lm))
    (lm / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="config.yaml' is missing: pass the CONFIG the LM was trained with"):
        pipeline.lm_train(None, [], str(lm), resume=True)
    with pytest.raises(Stop):
        pipeline.lm_train(str(default_config_path()), [], str(lm), resume=True)
    with pytest.raises(Stop):
        pipeline.run(None, [], out=str(tmp_path / "run"))
    assert [(name, mine) for name, mine, _ in held] == [("lm", True), ("lm", True), ("lm", False)]
    assert held[2][2]  # `run` trains RUN_DIR/lm holding RUN_DIR's lock
    assert not rundir.locked(lm)  # released with the process's work
    # `lm train --resume --out RUN_DIR/lm` of a `run` takes RUN_DIR's lock too, as `train --resume RUN_DIR` does
    run_dir = tmp_path / "stopped"
    (run_dir / "lm" / "checkpoints").mkdir(parents=True)
    rundir.mark_job(run_dir, "run", analyze=True)
    with pytest.raises(Stop):
        pipeline.lm_train(str(default_config_path()), [], str(run_dir / "lm"), resume=True)
    assert held[3] == ("lm", True, True)
    with rundir.lock_run(run_dir), pytest.raises(UserError, match="stopped' is being trained by sae-stream pid"):
        pipeline.lm_train(str(default_config_path()), [], str(run_dir / "lm"), resume=True)
    assert len(held) == 4 and not rundir.locked(run_dir / "lm")
    (run_dir / "job.json").unlink()  # a run from before job.json: its config.yaml makes it one
    (run_dir / "config.yaml").write_text("{}")
    with rundir.lock_run(run_dir), pytest.raises(UserError, match="being trained by"):
        pipeline.lm_train(str(default_config_path()), [], str(run_dir / "lm"), resume=True)
    (run_dir / "config.yaml").unlink()  # an LM dir that merely sits in a folder named by the user: its own lock
    with pytest.raises(Stop):
        pipeline.lm_train(str(default_config_path()), [], str(run_dir / "lm"), resume=True)
    assert held[4] == ("lm", True, False)


def test_fresh_out_dir__a_file_or_an_uncreatable_out_is_named_and_left_alone(tmp_path: Path) -> None:
    afile = tmp_path / "eval.json"
    afile.write_text("{}")
    with pytest.raises(UserError, match=r"^--out '.*eval.json' is a file, not a directory: choose another --out$"):
        with fresh_out_dir(afile, "train", overwrite=True):
            pass
    assert afile.read_text() == "{}"
    with pytest.raises(UserError, match=r"^cannot create --out '.*eval.json/run': .*; choose a writable place$"):
        with fresh_out_dir(afile / "run", "train", overwrite=False):  # (under a file: no directory can be made)
            pass
