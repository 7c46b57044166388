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

Interruptions: after each file, and on SIGINT / SIGTERM (which finish the chunk of documents being read and close
the file), `tokenize.progress.pt` records the files written and where the reader stands; `sae-stream tokenize
--resume DIR` continues from there with the saved config (a file left half-written by a kill is written again),
giving the records of an uninterrupted run in the same order (a signal's early-closed file is one more file).
Training refuses a directory with progress and no manifest.

Choices: every document is written; `data.heldout_fraction` then holds out documents by a hash of their ids rather
than of their text, so the held-out documents are another (equally random) sample than the text source's. The
output directory is staged like a run directory: an existing one needs --overwrite, and is only replaced once the
first progress is saved (a failure before that leaves nothing behind and the old output as it was).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from sae_stream.checkpoint import atomic_write_bytes
from sae_stream.config import Config, config_from_dict, load_config, to_dict
from sae_stream.data import TOKENIZE_PROGRESS, TOKENIZED_MANIFEST, document_source, pin_hf_revision
from sae_stream.process import TrainingInterrupted, signals_to
from sae_stream.records import StreamSource
from sae_stream.rundir import LOCK_FILE, UserError, fresh_out_dir, lock_run
from sae_stream.tokenizer import get_tokenizer

MANIFEST, PROGRESS = TOKENIZED_MANIFEST, TOKENIZE_PROGRESS
FIELD = "input_ids"
SHARD_TOKENS = 50_000_000  # ~200 MB of int32 ids per file
ROW_GROUP_DOCS = 4096


class ShardWriter:
    """Documents' ids into `part-NNNNN.parquet` files of about `shard_tokens` tokens each (a file closes at the
    first document boundary past that), in row groups of ROW_GROUP_DOCS records; `on_file(before, skip)` after
    each file closes: the reader's snapshot before the chunk being added and how many of its documents are in
    closed files. `files`, `documents`, `tokens`: what an interrupted run wrote (a resume goes on numbering)."""

    def __init__(self, out_dir: Path, shard_tokens: int, files: list[Path] | None = None, documents: int = 0,
                 tokens: int = 0, on_file: Callable[[Any, int], None] | None = None) -> None:
        self.out_dir, self.shard_tokens, self.on_file = out_dir, shard_tokens, on_file
        self.files: list[Path] = list(files or [])
        self.documents, self.tokens = documents, tokens
        self._pending: list[np.ndarray] = []
        self._writer, self._in_shard = None, 0

    def add(self, docs: list[np.ndarray], before: Any = None, skipped: int = 0) -> None:
        """Append `docs`: the chunk read from snapshot `before`, less its first `skipped` documents."""
        for i, ids in enumerate(docs):
            self._pending.append(ids)
            self.documents += 1
            self.tokens += len(ids)
            self._in_shard += len(ids)
            if len(self._pending) == ROW_GROUP_DOCS or self._in_shard >= self.shard_tokens:
                self._flush()
            if self._in_shard >= self.shard_tokens:
                self.close(before, skipped + i + 1)

    def close(self, before: Any = None, skip: int = 0) -> None:
        """Close the file being written (if any) and report the position (see on_file)."""
        self._flush()
        closed = self._writer is not None
        self._close_shard()
        if closed and self.on_file is not None:
            self.on_file(before, skip)

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
    with fresh_out_dir(out, "tokenize", overwrite, marker=(MANIFEST, PROGRESS)) as staged:
        lock = lock_run(staged.path)
        try:
            _Job(staged.path, cfg, shard_tokens, {}, staged.commit).run(source, None, 0)
        finally:
            lock.close()
    return staged.path


def resume_tokenize(out: str) -> Path:
    """Continue the interrupted `sae-stream tokenize` in `out` from its progress file, with its saved config."""
    path = Path(out).resolve()
    if (path / MANIFEST).is_file():
        raise UserError(f"--resume {out}: that tokenize finished ({MANIFEST} is there): nothing to continue")
    if not (path / PROGRESS).is_file():
        raise UserError(f"--resume {out}: no {PROGRESS} there, so not an interrupted `sae-stream tokenize` output "
                        "(one killed before its first file ends is started again: --out DIR --overwrite)")
    lock = lock_run(path)
    try:
        state = torch.load(path / PROGRESS, weights_only=False)
        missing = [f for f in state["files"] if not (path / f).is_file()]
        if missing:
            raise UserError(f"--resume {out}: {missing[0]} is missing, yet {PROGRESS} counts it: start again with "
                            "--out DIR --overwrite")
        for f in path.glob("part-*.parquet"):  # a file a kill left half-written: written again
            if f.name not in state["files"]:
                f.unlink()
        cfg = config_from_dict(state["config"])
        ids = get_tokenizer(cfg.data.tokenizer).cache_key()
        if state.get("tokenizer_ids", ids) != ids:  # (an hf: directory whose files changed since)
            raise UserError(f"--resume {out}: data.tokenizer {cfg.data.tokenizer!r} gives other ids than when this "
                            "tokenize began: restore that tokenizer, or start again with --out DIR --overwrite")
        _Job(path, cfg, state["shard_tokens"], state).run(document_source(cfg.data), state["reader"], state["skip"])
    finally:
        lock.close()
    return path


class _Job:
    """One tokenize (or the rest of an interrupted one) into `path`: the files, progress after each, a stop on
    SIGINT / SIGTERM at the next chunk boundary, the manifest last. `commit` (a fresh output): called once the
    first progress is saved, from then on the output stays if the job stops."""

    def __init__(self, path: Path, cfg: Config, shard_tokens: int, state: dict[str, Any],
                 commit: Callable[[], None] | None = None) -> None:
        self.path, self.cfg, self.shard_tokens, self.commit = path, cfg, shard_tokens, commit
        self.seconds, self.t0 = state.get("seconds", 0.0), time.perf_counter()  # (across resumes)
        self.shards = ShardWriter(path, shard_tokens, [path / f for f in state.get("files", [])],
                                  state.get("documents", 0), state.get("tokens", 0), on_file=self._save_progress)
        self.signum: int | None = None

    def run(self, source: StreamSource, start: Any, skip: int) -> None:
        with tqdm(desc="tokenize", unit="tok", unit_scale=True, disable=None, initial=self.shards.tokens) as bar, \
                signals_to(self._stop):
            for docs, before in source.doc_chunks(self.cfg.data.seed, start):
                docs, skipped, skip = docs[skip:], skip, 0  # (a resume's first chunk: some written already)
                self.shards.add(docs, before, skipped)
                bar.update(sum(len(d) for d in docs))
                if self.signum is not None:
                    self.shards.close(before, skipped + len(docs))
                    if self.commit is not None:  # nothing saved to continue from (the output is removed)
                        raise KeyboardInterrupt
                    raise TrainingInterrupted(self.signum, 0, self.path, f"sae-stream tokenize --resume {self.path}",
                                              at=f"{len(self.shards.files)} file(s), {self.shards.tokens:,} tokens")
            self.shards.on_file = None  # (the last file's progress would have no reader position: the manifest is next)
            self.shards.close()
        self._finish()

    def _stop(self, signum: int) -> None:
        if self.signum is not None:  # a second signal: stop now (the last saved progress stands)
            raise KeyboardInterrupt
        self.signum = signum

    def _elapsed(self) -> float:
        return round(self.seconds + time.perf_counter() - self.t0, 1)

    def _save_progress(self, before: Any, skip: int) -> None:
        s = self.shards
        state = {"config": to_dict(self.cfg), "shard_tokens": self.shard_tokens, "files": [f.name for f in s.files],
                 "documents": s.documents, "tokens": s.tokens, "reader": before, "skip": skip,
                 "seconds": self._elapsed(), "tokenizer_ids": get_tokenizer(self.cfg.data.tokenizer).cache_key()}
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.path / PROGRESS, buf.getvalue())
        if self.commit is not None:
            self.commit()  # (an --overwrite's old output goes now)
            self.commit = None

    def _finish(self) -> None:
        d, s = self.cfg.data, self.shards
        manifest = {"source": d.source, "split": d.split, "hf_subset": d.hf_subset, "hf_revision": d.hf_revision,
                    "read_field": d.text_field, "tokenizer": d.tokenizer, "text_field": FIELD,
                    "documents": s.documents, "tokens": s.tokens, "files": [f.name for f in s.files],
                    "shard_tokens": self.shard_tokens, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "seconds": self._elapsed()}
        atomic_write_bytes(self.path / MANIFEST, yaml.safe_dump(manifest, sort_keys=False).encode())
        for name in (PROGRESS, LOCK_FILE):
            (self.path / name).unlink(missing_ok=True)
        print(f"tokenized {s.documents:,} documents, {s.tokens:,} tokens into {len(s.files)} file(s) -> {self.path}\n"
              f"train on them with --data.source={self.path} --data.text_field={FIELD} --data.tokenizer={d.tokenizer}")
