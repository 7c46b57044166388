"""`sae-stream tokenize`: a text source tokenized once, into parquet shards of token ids that training then reads with
no tokenizer at all.

    sae-stream tokenize [CONFIG] --data.source=Skylion007/openwebtext --out data/owt-gpt2
    sae-stream run --data.source=data/owt-gpt2 --data.text_field=input_ids ...

Why: on an H200 node the whole loop (LM -> ring -> SAE step) trains ~13M tokens/s, while reading and tokenizing
text fed it at 3.1M (16 cores; benchmarks/RESULTS.md), so a long run from raw text is tokenizer-bound. The same
node read pre-tokenized parquet at 72M tokens/s and .jsonl at 88M.

What is written: each document of `data.source` (its `data.split`) becomes one record, column `input_ids`
(list<int32>): its ids followed by end-of-text, exactly what the text reader joins (a source that holds ids
already is copied as it is). Records go in reading order into `part-NNNNN.parquet` files of about `--shard-tokens`
tokens; training shuffles the files' order and then records through `data.shuffle_buffer`, so more, smaller files
shuffle better. `tokenized.yaml` (written last) names the source, tokenizer and counts.

Choices: every document is written; `data.heldout_fraction` then holds out documents by a hash of their ids rather
than of their text, so the held-out documents are another (equally random) sample than the text source's. The
output directory is staged like a run directory (an existing one needs --overwrite and is only replaced once the
new one is complete): an interrupted or failed tokenize leaves nothing behind, and nothing of the old output lost.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import yaml
from tqdm.auto import tqdm

from sae_stream.checkpoint import atomic_write_bytes
from sae_stream.config import load_config
from sae_stream.data import document_source, pin_hf_revision
from sae_stream.rundir import UserError, fresh_out_dir

MANIFEST = "tokenized.yaml"
FIELD = "input_ids"
SHARD_TOKENS = 50_000_000  # ~200 MB of int32 ids per file
ROW_GROUP_DOCS = 4096


class ShardWriter:
    """Documents' ids into `part-NNNNN.parquet` files of about `shard_tokens` tokens each (a file closes at the
    first document boundary past that), in row groups of ROW_GROUP_DOCS records."""

    def __init__(self, out_dir: Path, shard_tokens: int) -> None:
        self.out_dir, self.shard_tokens = out_dir, shard_tokens
        self.files: list[Path] = []
        self.documents = self.tokens = 0
        self._pending: list[np.ndarray] = []
        self._writer, self._in_shard = None, 0

    def add(self, docs: list[np.ndarray]) -> None:
        for ids in docs:
            self._pending.append(ids)
            self.documents += 1
            self.tokens += len(ids)
            self._in_shard += len(ids)
            if len(self._pending) == ROW_GROUP_DOCS or self._in_shard >= self.shard_tokens:
                self._flush()
            if self._in_shard >= self.shard_tokens:
                self._close_shard()

    def close(self) -> None:
        self._flush()
        self._close_shard()

    def _flush(self) -> None:
        if not self._pending:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        lens = np.array([len(d) for d in self._pending], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        values = np.concatenate(self._pending).astype(np.int32)  # (checked against the vocabulary by the reader)
        table = pa.table({FIELD: pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))})
        if self._writer is None:
            self.files.append(self.out_dir / f"part-{len(self.files):05d}.parquet")
            self._writer = pq.ParquetWriter(self.files[-1], table.schema)
        self._writer.write_table(table)
        self._pending = []

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer, self._in_shard = None, 0


def tokenize_source(config: str | None, overrides: list[str], out: str | None, overwrite: bool,
                    shard_tokens: int = SHARD_TOKENS) -> Path:
    """Write `data.source` as token ids into `out` (see the module's docstring); returns the directory."""
    if shard_tokens <= 0:
        raise UserError(f"--shard-tokens {shard_tokens}: give a positive number of tokens per file, e.g. 50000000")
    cfg = pin_hf_revision(load_config(config, overrides))  # (a Hub source: the manifest names its commit)
    source = document_source(cfg.data)  # (a bad source fails here, before any directory is made)
    start = time.perf_counter()
    with fresh_out_dir(out, "tokenize", overwrite, marker=MANIFEST) as staged:
        shards = ShardWriter(staged.path, shard_tokens)
        with tqdm(desc="tokenize", unit="tok", unit_scale=True, disable=None) as bar:
            for docs, _ in source.doc_chunks(cfg.data.seed):
                shards.add(docs)
                bar.update(sum(len(d) for d in docs))
        shards.close()
        manifest = {"source": cfg.data.source, "split": cfg.data.split, "hf_subset": cfg.data.hf_subset,
                    "hf_revision": cfg.data.hf_revision, "read_field": cfg.data.text_field,
                    "tokenizer": cfg.data.tokenizer, "text_field": FIELD, "documents": shards.documents,
                    "tokens": shards.tokens, "files": [f.name for f in shards.files], "shard_tokens": shard_tokens,
                    "date": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(time.perf_counter() - start, 1)}
        atomic_write_bytes(staged.path / MANIFEST, yaml.safe_dump(manifest, sort_keys=False).encode())
    print(f"tokenized {shards.documents:,} documents, {shards.tokens:,} tokens into {len(shards.files)} file(s) "
          f"-> {staged.path}\ntrain on them with --data.source={staged.path} --data.text_field={FIELD} "
          f"--data.tokenizer={cfg.data.tokenizer}")
    return staged.path
