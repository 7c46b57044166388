"""Run directories: a fresh one for a new run (never overwriting without being asked), an existing one for a resume,
eval or analyze; and the one-line error for what the user asked wrongly.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from sae_stream.process import signals_to


class UserError(RuntimeError):
    """A problem with what the user asked for; reported as one line, exit code 2."""


def first_line(e: BaseException) -> str:
    """An exception's message as one line for a one-line error: its first non-blank line, else its type's name
    (libraries such as datasets, pyarrow and torch raise multi-line messages)."""
    return next((line for line in str(e).strip().splitlines() if line.strip()), type(e).__name__)


def is_main_process() -> bool:
    """Rank 0 under torchrun (read before the process group exists), or a plain process."""
    return int(os.environ.get("RANK", "0")) == 0


def resume_command(run_dir: str | Path = "RUN_DIR") -> str:
    """The command that continues a run: under torchrun, with as many nodes and processes per node."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return f"sae-stream train --resume {run_dir}"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = f"--nnodes={world // per_node} (and your rendezvous options) " if world > per_node else ""
    return f"torchrun {nodes}--nproc_per_node={per_node} -m sae_stream train --resume {run_dir}"


class OutDir:
    """A fresh output directory (`path`). An existing run directory replaced with --overwrite is only moved aside
    until the new run has started (`commit`, once its inputs have checked out); a failure or a stop before that
    (`rollback`) removes what this made and puts the old one back: bad input never costs the old run."""

    def __init__(self, path: Path, old: Path | None = None, created: bool = False,
                 new_parents: list[Path] | None = None) -> None:
        self.path, self.old, self.created, self.done = path, old, created, False
        self.new_parents = new_parents or []  # (made for it, deepest first: a rollback removes them while empty)

    def commit(self) -> None:
        if not self.done and self.old is not None:
            # renamed first, so a `.NAME.replaced-*` left behind is always whole (a kill mid-removal leaves a
            # `.NAME.discarded-*`, which the next command removes): _recover_replaced may put it back
            trash = self.path.with_name(f".{self.path.name}.discarded-{secrets.token_hex(4)}")
            os.replace(self.old, trash)
            shutil.rmtree(trash, ignore_errors=True)
        self.done = True

    def rollback(self) -> None:
        """Put the old run back, with Ctrl-C / SIGTERM held off until it is done (a second Ctrl-C must not strand
        it under its temporary name): the new directory renamed aside, the old one back, then the new one removed
        (the name is never missing while it is; a kill -9 then leaves `.NAME.discarded-*`, which the next command
        removes)."""
        if self.done:
            return
        trash = None
        with _signals_deferred():
            if self.created and self.path.exists():
                trash = self.path.with_name(f".{self.path.name}.discarded-{secrets.token_hex(4)}")
                os.replace(self.path, trash)  # (a rename: the old run's name is free at once)
            if self.old is not None:
                os.replace(self.old, self.path)
            self.done = True
            if trash is not None:  # (the new directory is small: commit comes before any heavy work)
                shutil.rmtree(trash, ignore_errors=True)
            for parent in self.new_parents:  # e.g. the default runs/ of a first command that failed
                try:
                    parent.rmdir()
                except OSError:
                    break


@contextmanager
def fresh_out_dir(out: str | Path | None, command: str, overwrite: bool,
                  marker: str | tuple[str, ...] = "config.yaml") -> Iterator[OutDir]:
    """An `OutDir` for a new run: committed when the block ends, or earlier by the caller; rolled back if the
    block raises first. An existing non-empty directory needs --overwrite, and must be one this command writes:
    one holding `marker` (a run directory's config.yaml, unless the command writes something else), or one of
    several."""
    markers = (marker,) if isinstance(marker, str) else marker
    path = Path(out) if out else Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not is_main_process():
        if not out:
            raise UserError("under torchrun pass --out RUN_DIR: every rank must name the same run directory")
        yield OutDir(path)  # rank 0 prepares it (the others write their checkpoint parts into it: check_shared)
        return
    path = path.resolve()  # `.`, a symlink or the working directory: the real directory, named absolutely
    _recover_replaced(path)
    old = None
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {str(path)!r} is a file, not a directory: choose another --out")
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            resume = {"lm": " (`sae-stream lm train CONFIG --out DIR --resume` continues it)", "compare": "",
                      "tokenize": " (`sae-stream tokenize --resume DIR` continues an interrupted one)"
                      }.get(command, " (`sae-stream train --resume DIR` continues an interrupted run)")
            raise UserError(f"output directory {str(path)!r} exists: pass --overwrite to replace it, or choose "
                            f"another --out{resume}")
        if not any((path / m).is_file() for m in markers):
            what = "a run directory" if markers[0] == "config.yaml" else f"the output of `sae-stream {command}`"
            raise UserError(f"refusing to --overwrite {str(path)!r}: it is not {what} (no {markers[0]}); "
                            "remove it yourself or choose another --out")
        if locked(path):
            raise UserError(f"refusing to --overwrite {str(path)!r}: a process is training it; stop it first")
        old = path.with_name(f".{path.name}.replaced-{os.getpid()}-{secrets.token_hex(4)}")
    with _term_raises():  # a SIGTERM before the commit must roll back too, not kill the process where it stands
        if old is not None:
            os.replace(path, old)
        created = not path.exists()
        new_parents = [p for p in path.parents if not p.exists()]
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if old is not None:
                os.replace(old, path)
            raise UserError(f"cannot create --out {str(path)!r}: {e.strerror or e}; choose a writable place") from e
        staged = OutDir(path, old, created, new_parents)
        try:
            yield staged
        except BaseException:
            staged.rollback()
            raise
        staged.commit()


def _recover_replaced(path: Path) -> None:
    """A run an earlier --overwrite moved aside (`.NAME.replaced-PID-HEX`) and never put back (that process was
    killed mid-way): with `path` gone it is renamed back; beside a `path` it is named in a warning (the new run
    started, so its removal was cut short). A discarded new directory (`.NAME.discarded-HEX`) is removed."""
    import re
    import warnings

    name = re.escape(path.name)
    stranded = []
    for p in sorted(path.parent.iterdir()) if path.parent.is_dir() else []:
        if re.fullmatch(rf"\.{name}\.discarded-[0-9a-f]{{8}}", p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        m = re.fullmatch(rf"\.{name}\.replaced-(\d+)-[0-9a-f]{{8}}", p.name)
        if m and p.is_dir() and not _alive(int(m.group(1))):
            stranded.append(p)
    if not stranded:
        return
    if len(stranded) == 1 and (stranded[0] / "config.yaml").is_file() and _nothing_trained(path):
        if path.exists():  # the killed process's new run, which never got past its start-up: nothing is lost
            trash = path.with_name(f".{path.name}.discarded-{secrets.token_hex(4)}")
            os.replace(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(stranded[0], path)
        warnings.warn(f"{str(path)!r} was moved aside by an --overwrite that was killed before it put it back: "
                      "restored", stacklevel=3)
        return
    warnings.warn(f"{', '.join(repr(str(p)) for p in stranded)} left by an interrupted --overwrite of "
                  f"{str(path)!r} (the run it replaced, perhaps partly removed): remove it, or rename it back",
                  stacklevel=3)


def _nothing_trained(path: Path) -> bool:
    """`path` is missing, or holds no file but the config.yaml files (and lock, and `run`'s job.json) a run writes
    before its start-up ends."""
    return not path.exists() or (path.is_dir() and all(f.name in ("config.yaml", LOCK_FILE, JOB_FILE)
                                                       for f in path.rglob("*") if not f.is_dir()))


JOB_FILE = "job.json"


def mark_job(run_dir: Path, job: str, **options: Any) -> None:
    """RUN_DIR/job.json: which command made the run and with what, so `train --resume` finishes it the same way
    (a `run` goes on to eval and the dashboard, whether or not it trained its own LM). Rank 0 writes it."""
    from sae_stream.checkpoint import atomic_write_json  # (checkpoint imports this module)

    if is_main_process():
        atomic_write_json(run_dir / JOB_FILE, {"job": job, **options})


def read_job(run_dir: Path) -> dict[str, Any] | None:
    """The job.json `mark_job` wrote, or None (a run made before it existed, or unreadable)."""
    try:
        job = json.loads((run_dir / JOB_FILE).read_text())
    except (OSError, ValueError):
        return None
    return job if isinstance(job, dict) else None


LOCK_FILE = ".lock"


def lock_run(run_dir: Path) -> IO[str]:
    """Hold RUN_DIR/.lock while this process trains the run: a second process (a requeued job beside a manual
    resume) is refused instead of writing the same checkpoints and metrics. The kernel drops the lock when the
    process ends, killed too; keep the returned file open (closing it releases the lock)."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)  # (a Session may be the first to write into it)
    f = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{str(run_dir)!r} is being trained by {holder}: wait for it to end or stop it, "
                        "then run the command again") from None
    f.seek(0)
    f.truncate()
    f.write(f"sae-stream pid {os.getpid()}")
    f.flush()
    return f


def locked(run_dir: Path) -> bool:
    """Whether a live process holds RUN_DIR/.lock (lock_run)."""
    try:
        f = lock_run(run_dir) if (run_dir / LOCK_FILE).is_file() else None
    except UserError:
        return True
    if f is not None:
        f.close()
    return False


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs (then its --overwrite may be in progress: leave its directory alone). Our
    own pid is not: in a container a restarted process gets the same small pid as the one that was killed."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM arriving inside the block take effect when it ends (main thread; elsewhere a no-op)."""
    got: list[int] = []
    try:
        with signals_to(got.append):
            yield
    finally:
        if got:  # now, with the handlers it would have met (also over an error raised in the block)
            signal.raise_signal(got[0])


class Terminated(SystemExit):
    """SIGTERM while a new run starts up (exit status 143, as the signal would give)."""


@contextmanager
def _term_raises() -> Iterator[None]:
    """SIGTERM raises `Terminated` inside the block (main thread only; the training loop installs its own)."""
    def raise_terminated(signum: int) -> None:
        raise Terminated(128 + signum)

    with signals_to(raise_terminated, (signal.SIGTERM,)):
        yield


def inside(path: str | Path, directory: str | Path) -> bool:
    """Whether `path` lies in `directory` (both resolved)."""
    p, d = Path(path).resolve(), Path(directory).resolve()
    return p == d or d in p.parents


def lm_outside(lm: str | None, out: str | None, overwrite: bool) -> None:
    """--overwrite replaces --out: an LM inside it would be gone before it is loaded."""
    if overwrite and lm and out and Path(lm).exists() and inside(lm, out):
        raise UserError(f"--lm {lm!r} lies inside --out {out!r}, which --overwrite replaces: move the LM out "
                        "first, or choose another --out")


def require_run_dir(run_dir: str | Path) -> Path:
    """An existing run directory (one with the config.yaml a run writes), put back first if a killed --overwrite
    left it aside (a single process: under torchrun the ranks would race for it)."""
    path = Path(run_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and path.parent.is_dir():
        _recover_replaced(path.resolve())
    if not (path / "config.yaml").is_file():
        shared = (" (under torchrun every process must see it: on several machines, a shared filesystem)"
                  if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "")
        raise UserError(f"{str(path)!r} is not a run directory (no config.yaml): pass the --out of `sae-stream "
                        f"train`{shared}")
    return path


def check_shared(run_dir: Path, dist: Any) -> None:
    """Under torchrun every rank writes its own part of each checkpoint into the run directory, so every rank must
    see the same directory (across machines: a shared filesystem). Checked with a file rank 0 writes; a collective.
    dist None (a single process): nothing to check."""
    if dist is None:
        return
    marker = run_dir / f".ranks-{dist.broadcast_object(secrets.token_hex(8) if dist.is_main else None)}"
    if dist.is_main:
        marker.touch()
    dist.barrier()
    blind = [r for r, seen in enumerate(dist.all_gather_objects(marker.is_file())) if not seen]
    if dist.is_main:
        marker.unlink()
    if blind:
        raise UserError(f"rank(s) {blind} do not see the run directory {str(run_dir)!r} that rank 0 made: under "
                        "torchrun every rank writes its part of each checkpoint there, so put --out on a filesystem "
                        "every machine shares")
