"""How long a resumed text stream takes to reach its saved position (streamed local .jsonl, GPT-2 BPE).

A run that stops mid-epoch resumes its token stream exactly where it was. Two ways of getting there, timed from
`load_state_dict` to the first context after the position, alternating, in one process:

- `replay_chunk` (now): the state names the start of the token chunk the position is in; the records before it are
  read again but not tokenized, and only that chunk is tokenized again.
- `replay_epoch` (sessions 1-6): the state holds the position only; the epoch is read and tokenized again up to it.

Both must give the same next context (checked). The corpus is synthetic English-like text written to --dir.

    python benchmarks/data_resume.py --docs 20000 --out benchmarks/results/data_resume.jsonl
    python benchmarks/data_resume.py --docs 2000 --repeats 1            # smoke
"""

from __future__ import annotations

import argparse
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
from sae_stream.data import TokenContexts

WORDS = ("the of and to in is was that for on as with by it at from this be are an or which have not had one "
         "their were all been there when more would who some into time than only other new could also about "
         "after first two over such where most these those between during through model layer feature sparse "
         "autoencoder neuron activation buffer stream token context dictionary learning superposition").split()


def write_corpus(path: Path, docs: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    chars = 0
    with path.open("w") as f:
        for i in range(docs):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(100, 900))) + f". Document {i}."
            chars += len(text)
            f.write(json.dumps({"text": text}) + "\n")
    return chars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--context-len", type=int, default=1024)
    parser.add_argument("--at", type=float, default=0.5, help="resume point as a fraction of the epoch's contexts")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where to write the corpus (default: a temporary dir)")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = Path(args.dir or tempfile.mkdtemp(prefix="data_resume_"))
    corpus = root / "corpus.jsonl"
    chars = write_corpus(corpus, args.docs)
    cfg = DataConfig(source=str(corpus), tokenizer="gpt2", context_len=args.context_len, heldout_fraction=0.0,
                     loop=False)
    t0 = time.perf_counter()
    epoch = sum(1 for _ in TokenContexts(cfg))
    full_pass_s = time.perf_counter() - t0
    at = int(epoch * args.at)
    stream = TokenContexts(cfg)
    reference = next(itertools.islice(stream, at, None))  # the context after the first `at`
    state = TokenContexts(cfg)
    for _ in itertools.islice(state, at):
        pass
    saved = state.state_dict()
    variants = {"replay_chunk": saved, "replay_epoch": {k: v for k, v in saved.items() if k != "replay"}}
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
                   "torch": torch.__version__, "variant": name, "repeat": rep, "docs": args.docs, "chars": chars,
                   "contexts_per_epoch": epoch, "resumed_at": at, "context_len": args.context_len,
                   "seconds_to_position": round(seconds, 3), "full_epoch_pass_s": round(full_pass_s, 3)}
            rows.append(row)
            print(json.dumps(row))
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
