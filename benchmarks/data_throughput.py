"""How fast text becomes token batches: the part of the loop before the LM (streamed local .jsonl, GPT-2 BPE).

On a GPU the loop eats >10M tokens/s (RESULTS.md); the text must keep up. Variants, in one process, alternating
over --repeats rounds, each timed over --tokens tokens of [--batch, --context-len] batches:

- `records`: the shuffled record reader alone (records.ShuffledTexts: read, parse, shuffle), no tokenizing
- `tokenize_session8`: session 8's tokenizing of a 64-document chunk (tiktoken's encode_ordinary_batch into
  Python lists, then a tensor), on the same documents
- `tokenize_array_T`: this session's (records.StreamSource): each document to a numpy array on a pool of T threads
- `inline_T`: the whole reader (TokenContexts -> ContextBatches) in the consuming thread, T tokenizer threads
- `inline_hf_T`: the same with `data.tokenizer=hf:DIR`, GPT-2's BPE as a Hugging Face fast tokenizer
  (tokenizer.save_gpt2_hf: the same ids, checked on the first batch): what an LM of another family pays for
  Hugging Face's tokenizer against tiktoken
- `prefetched_T`: the same batches from a child process (prefetch.PrefetchedBatches, depth 32), consumed at once
- `prefetched_T_busy`: ditto while the consuming thread keeps its core busy --busy-ms per batch (as a GPU loop's
  launching thread does), so the child has the other cores only
- `reader_ceiling`: the whole reader inline with the BPE replaced by a lookup of the documents' tokens: what one
  reader process can deliver at most however many tokenizer threads it has (its serial part)
- `pretokenized_jsonl_inline` / `pretokenized_parquet_inline`: the whole reader inline on the same documents stored
  as token ids (`data.text_field=input_ids`, each document's ids and its end-of-text): no tokenizer runs

T runs over 1 and the cores this process may use (--threads to choose). The corpus: documents of ~4.5 KB (about
OpenWebText's mean) joined from the embedded corpus (Python's docs: prose with code), written to --dir.

    python benchmarks/data_throughput.py --out benchmarks/results/data_throughput.jsonl
    python benchmarks/data_throughput.py --tokens 300000 --repeats 1          # smoke
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sae_stream.config import DataConfig
from sae_stream.corpus import embedded_documents
from sae_stream.data import ContextBatches, TokenContexts, tokenizer_threads
from sae_stream.prefetch import PrefetchedBatches
from sae_stream.records import ENCODE_DOCS, ShuffledTexts, StreamSource
from sae_stream.tokenizer import get_tokenizer, save_gpt2_hf

DEPTH = 32  # batches the child reads ahead (data.prefetch's default on CUDA)


def write_corpus(path: Path, n_bytes: int, seed: int = 0) -> list[str]:
    """Documents of 4-5 KB of the embedded corpus's texts, `n_bytes` in all, as a .jsonl; returns them."""
    rng = random.Random(seed)
    source = list(embedded_documents())
    docs, current = [], ""
    while sum(map(len, docs)) < n_bytes:
        current += rng.choice(source) + "\n\n"
        if len(current) > rng.randint(4000, 5000):
            docs.append(current)
            current = ""
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return docs


def write_pretokenized(root: Path, docs: list[str]) -> dict[str, Path]:
    """The documents as GPT-2 token ids, each followed by end-of-text (the tokens the text variants make), in a
    .jsonl and a .parquet (list<int32>, as pre-tokenized Hub datasets store them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = get_tokenizer("gpt2")
    ids = [[*tok.encode(d), tok.eot] for d in docs]
    jsonl, parquet = root / "ids.jsonl", root / "ids.parquet"
    jsonl.write_text("".join(json.dumps({"input_ids": i}) + "\n" for i in ids))
    pq.write_table(pa.table({"input_ids": pa.array(ids, type=pa.list_(pa.int32()))}), parquet)
    return {"jsonl": jsonl, "parquet": parquet}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed_batches(batches: object, n_batches: int, busy_s: float = 0.0, warmup: int = 1) -> float:
    """Tokens/s of drawing `n_batches` from `batches` after `warmup` (which start it and, for a prefetching reader,
    empty its queue: the rate is then what it produces, not what it had stored), spinning `busy_s` after each."""
    it = iter(batches)
    first = next(it)
    for _ in range(warmup - 1):
        next(it)
    t0, tokens = time.perf_counter(), 0
    for x_BT in itertools.islice(it, n_batches):
        tokens += x_BT.numel()
        if busy_s:
            end = time.perf_counter() + busy_s
            while time.perf_counter() < end:
                pass
    assert first.dtype == torch.long
    return tokens / (time.perf_counter() - t0)


def records_rate(cfg: DataConfig, tokens_per_char: float, n_tokens: int) -> float:
    import datasets

    dataset = datasets.load_dataset("json", data_files=[cfg.source], split="train", streaming=True)
    t0, chars = time.perf_counter(), 0
    for text in ShuffledTexts(dataset, "text", seed=0, buffer_size=cfg.shuffle_buffer, where="bench"):
        chars += len(text)
        if chars * tokens_per_char >= n_tokens:
            break
    return chars * tokens_per_char / (time.perf_counter() - t0)


def tokenize_session8(docs: list[str]) -> float:
    tok = get_tokenizer("gpt2")
    t0, n = time.perf_counter(), 0
    for i in range(0, len(docs), ENCODE_DOCS):
        ids = tok.encoding.encode_ordinary_batch(docs[i:i + ENCODE_DOCS])
        n += len(torch.tensor(list(itertools.chain.from_iterable(d + [tok.eot] for d in ids)), dtype=torch.long))
    return n / (time.perf_counter() - t0)


def tokenize_array(docs: list[str], threads: int) -> float:
    """records.StreamSource's tokenizing itself (its pool of `threads`, numpy arrays joined with end-of-text)."""
    source = StreamSource(None, "text", None, get_tokenizer("gpt2"), 1, "bench", threads=threads)
    t0, n = time.perf_counter(), 0
    for i in range(0, len(docs), ENCODE_DOCS):
        parts, _ = source._join(source._submit(docs[i:i + ENCODE_DOCS]), None)
        n += len(source._joined(parts))  # (joined, as token_chunks joins them)
    return n / (time.perf_counter() - t0)


def reader_ceiling(cfg: DataConfig, docs: list[str], batch: int, n_batches: int) -> float:
    tok = get_tokenizer("gpt2")
    tokens = {d: tok.encode_array(d) for d in docs}
    contexts = TokenContexts(cfg)
    contexts._source.tok = _Lookup(tok, tokens)  # (the reader's own tokenizer, swapped for this variant only)
    return timed_batches(ContextBatches(contexts, batch), n_batches)


class _Lookup:
    """A tokenizer whose encode_array looks the document up (the tokens computed beforehand)."""

    def __init__(self, tok: object, tokens: dict[str, np.ndarray]) -> None:
        self.eot, self.n_vocab, self.name, self.tokens = tok.eot, tok.n_vocab, tok.name, tokens

    def encode_array(self, text: str) -> np.ndarray:
        return self.tokens[text]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=3_000_000, help="tokens per timed variant")
    p.add_argument("--context-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64, help="contexts per batch (buffer.lm_batch_size)")
    p.add_argument("--threads", type=int, nargs="*", default=None, help="tokenizer threads to try (default: 1 and "
                   "the cores available)")
    p.add_argument("--busy-ms", type=float, default=2.0, help="the consumer's busy time per batch (_busy variants)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dir", default=None, help="where the corpus goes (default: a temporary dir)")
    p.add_argument("--out", default=None, help="append the JSON lines here")
    args = p.parse_args()
    cores = tokenizer_threads(DataConfig())
    threads = sorted(set(args.threads or [1, cores]))
    root = Path(args.dir or tempfile.mkdtemp(prefix="data_throughput_"))
    root.mkdir(parents=True, exist_ok=True)
    path = root / "docs.jsonl"
    n_tokens = args.tokens
    docs = write_corpus(path, n_bytes=int(n_tokens * 4.6))  # ~4.3 characters per GPT-2 token on this text
    tokens_per_char = sum(len(get_tokenizer("gpt2").encode(d)) for d in docs[:200]) / sum(map(len, docs[:200]))
    common = {"date": datetime.date.today().isoformat(), "machine": f"{cpu_name()}, {os.cpu_count()} cores "
              f"({cores} usable)", "torch": torch.__version__, "context_len": args.context_len, "batch": args.batch}
    cfg = DataConfig(source=str(path), tokenizer="gpt2", context_len=args.context_len, heldout_fraction=0.0)
    n_batches = max(1, n_tokens // (args.batch * args.context_len))
    pre = {kind: DataConfig(**{**cfg.__dict__, "source": str(f), "text_field": "input_ids"})
           for kind, f in write_pretokenized(root, docs).items()}
    hf = DataConfig(**{**cfg.__dict__, "tokenizer": save_gpt2_hf(root / "gpt2_hf")})
    first = [next(iter(ContextBatches(TokenContexts(c), args.batch))) for c in (cfg, *pre.values(), hf)]
    if not all(torch.equal(first[0], b) for b in first[1:]):  # (same records, same order: the same tokens)
        raise SystemExit("the pre-tokenized files or the hf: tokenizer give other batches than the text: a bug")
    variants = {"records": lambda: records_rate(cfg, tokens_per_char, n_tokens),
                "tokenize_session8": lambda: tokenize_session8(docs),
                "reader_ceiling": lambda: reader_ceiling(DataConfig(**{**cfg.__dict__, "tokenizer_threads": 1}),
                                                         docs, args.batch, n_batches)}
    for kind, pcfg in pre.items():
        variants[f"pretokenized_{kind}_inline"] = lambda c=pcfg: timed_batches(ContextBatches(TokenContexts(c),
                                                                                             args.batch), n_batches)
    for t in threads:
        tcfg = DataConfig(**{**cfg.__dict__, "tokenizer_threads": t})
        variants[f"tokenize_array_{t}"] = lambda t=t: tokenize_array(docs, t)
        variants[f"inline_{t}"] = lambda c=tcfg: timed_batches(ContextBatches(TokenContexts(c), args.batch), n_batches)
        hcfg = DataConfig(**{**hf.__dict__, "tokenizer_threads": t})
        variants[f"inline_hf_{t}"] = lambda c=hcfg: timed_batches(ContextBatches(TokenContexts(c), args.batch),
                                                                  n_batches)
        variants[f"prefetched_{t}"] = lambda c=tcfg: _prefetched(c, args.batch, n_batches, 0.0)
        variants[f"prefetched_{t}_busy"] = lambda c=tcfg: _prefetched(c, args.batch, n_batches, args.busy_ms / 1e3)
    # rounds interleave the variants (machine noise spread over all); each row is written as soon as its last round
    # is measured (a run stopped by a time limit keeps what it finished), the ratios' base measured first
    base_name = f"inline_{threads[0]}"
    order = [base_name, *(name for name in variants if name != base_name)]
    rates: dict[str, list[float]] = {name: [] for name in order}
    for r in range(args.repeats):
        for name in order:
            rates[name].append(variants[name]())
            if r == args.repeats - 1:
                _emit(common, name, rates[name], statistics.median(rates[base_name]), args)


def _emit(common: dict, name: str, got: list[float], base: float, args: argparse.Namespace) -> None:
    row = common | {"variant": name, "tokens_per_s": round(statistics.median(got)),
                    "rounds": [round(r) for r in got], "ratio_to_inline_1": round(statistics.median(got) / base, 2)}
    if name.endswith("_busy"):
        row["busy_ms_per_batch"] = args.busy_ms
    line = json.dumps(row)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


def _prefetched(cfg: DataConfig, batch: int, n_batches: int, busy_s: float) -> float:
    batches = PrefetchedBatches(cfg, batch, depth=DEPTH)
    try:
        return timed_batches(batches, n_batches, busy_s, warmup=DEPTH + 1)
    finally:
        batches.close()


if __name__ == "__main__":
    main()
