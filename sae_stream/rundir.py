"""Run directories: a fresh one for a new run (never overwriting without being asked), an existing one for a resume,
eval or analyze; and the one-line error for what the user asked wrongly.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any


class UserError(RuntimeError):
    """A problem with what the user asked for; reported as one line, exit code 2."""


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


def prepare_out_dir(out: str | Path | None, command: str, overwrite: bool) -> Path:
    """A fresh output directory; an existing non-empty one needs --overwrite (or --resume)."""
    path = Path(out) if out else Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not is_main_process():
        if not out:
            raise UserError("under torchrun pass --out RUN_DIR: every rank must name the same run directory")
        return path  # rank 0 prepares it (the others write their checkpoint parts into it: check_shared)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not overwrite:
            raise UserError(f"output directory {str(path)!r} exists: pass --overwrite to replace it, "
                            f"--resume to continue it, or choose another --out")
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def require_run_dir(run_dir: str | Path) -> Path:
    """An existing run directory (one with the config.yaml a run writes)."""
    path = Path(run_dir)
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
