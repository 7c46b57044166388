"""How long a resumed text stream takes to reach its saved position (streamed local .jsonl, GPT-2 BPE).

A run that stops mid-epoch resumes its token stream exactly where it was. Ways of getting there, timed from
`load_state_dict` to the first context after the position, alternating, in one process:

- `replay_chunk` (now): the state holds the record reader's snapshot at the start of the token chunk the position
  is in (records.py: the shard being read, how far, the shuffle buffer); the resume reads that one shard again up
  to there, untokenized, and tokenizes that chunk again. Run on the corpus as one file and as --files files
  (shards): with several, the shards before the position are not read at all.
- `replay_epoch` (sessions 1-6): the state holds the position only; the epoch is read and tokenized again up to it.
(Session 7's `replay_chunk` read every record before the chunk again, untokenized: ~ the one-file case here.)

All must give the same next context (checked). The corpus is synthetic English-like text written to --dir.

    python benchmarks/data_resume.py --docs 20000 --out benchmarks/results/data_resume.jsonl
    python benchmarks/data_resume.py --docs 2000 --repeats 1            # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

from sae_stream.config import DataConfig
from sae_stream.data import TokenContexts, _Replay

WORDS = ("the of and to in is was that for on as with by it at from this be are an or which have not had one "
         "their were all been there when more would who some into time than only other new could also about "
         "after first two over such where most these those between during through model layer feature sparse "
         "autoencoder neuron activation buffer stream token context dictionary learning superposition").split()


def write_corpus(root: Path, docs: int, files: int, seed: int = 0) -> int:
    """`docs` documents in `files` .jsonl files under `root` (the same texts whatever `files` is)."""
    rng = random.Random(seed)
    chars = 0
    root.mkdir(parents=True, exist_ok=True)
    outs = [(root / f"part{i:03d}.jsonl").open("w") for i in range(files)]
    for i in range(docs):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(100, 900))) + f". Document {i}."
        chars += len(text)
        outs[i * files // docs].write(json.dumps({"text": text}) + "\n")
    for f in outs:
        f.close()
    return chars


def resume_rows(args: argparse.Namespace, root: Path, files: int) -> list[dict]:
    chars = write_corpus(root / f"files{files}", args.docs, files)
    cfg = DataConfig(source=str(root / f"files{files}" / "*.jsonl"), tokenizer="gpt2", context_len=args.context_len,
                     heldout_fraction=0.0, loop=False)
    t0 = time.perf_counter()
    epoch = sum(1 for _ in TokenContexts(cfg))
    full_pass_s = time.perf_counter() - t0
    at = int(epoch * args.at)
    reference = next(itertools.islice(TokenContexts(cfg), at, None))  # the context after the first `at`
    state = TokenContexts(cfg)
    for _ in itertools.islice(state, at):
        pass
    saved = state.state_dict()
    variants = {"replay_chunk": saved}
    if files == 1:
        variants["replay_epoch"] = {**saved, "replay": dataclasses.asdict(_Replay())}  # from the epoch's start
    rows = []
    for rep in range(args.repeats):
        for name, st in variants.items():
            resumed = TokenContexts(cfg)
            t0 = time.perf_counter()
            resumed.load_state_dict(st)
            first = next(iter(resumed))
            seconds = time.perf_counter() - t0
            assert torch.equal(first, reference), f"{name}: not the context after the saved position"
            row = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                   "torch": torch.__version__, "variant": name, "files": files, "repeat": rep, "docs": args.docs,
                   "chars": chars, "contexts_per_epoch": epoch, "resumed_at": at, "context_len": args.context_len,
                   "seconds_to_position": round(seconds, 3), "full_epoch_pass_s": round(full_pass_s, 3)}
            rows.append(row)
            print(json.dumps(row))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--context-len", type=int, default=1024)
    parser.add_argument("--at", type=float, default=0.5, help="resume point as a fraction of the epoch's contexts")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--files", type=int, default=8, help="files (shards) of the second corpus layout")
    parser.add_argument("--dir", default=None, help="where to write the corpus (default: a temporary dir)")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = Path(args.dir or tempfile.mkdtemp(prefix="data_resume_"))
    rows = resume_rows(args, root, 1) + resume_rows(args, root, args.files)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
