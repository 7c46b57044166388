"""Text -> fixed-length token contexts, from three kinds of source (`data.source`):

- 'embedded': English prose shipped with every Python (corpus.py): `pydoc_data.topics` plus the standard library's
  docstrings. ~0.6M GPT-2 tokens, no download; cached in memory and on disk.
- a local .txt / .jsonl / .json / .parquet file, a directory of them, or a glob (read with `datasets`, streaming).
- any Hugging Face dataset name, streamed (e.g. 'Skylion007/openwebtext', 'monology/pile-uncopyrighted').

Documents are shuffled (per seed and epoch), tokenized, joined with end-of-text and cut into contexts of
`data.context_len` tokens, as nanoGPT does (a column of token ids is joined as it is). Context i of an epoch goes
to rank i % world_size.

    contexts = TokenContexts(cfg.data, split="train")
    for tokens_BT in context_batches(contexts, batch_size=32): ...
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from sae_stream.config import Config, DataConfig, load_config
from sae_stream.corpus import embedded_corpus, heldout_key
from sae_stream.hub import hub_unreachable_reason
from sae_stream.records import Doc, StreamSource
from sae_stream.rundir import first_line, is_main_process
from sae_stream.tokenizer import HF_PREFIX, Tokenizer, get_tokenizer, same_tokenizer

SPLITS = ("train", "heldout")
LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HELDOUT_SEED = 0
TOKENIZED_MANIFEST = "tokenized.yaml"  # `sae-stream tokenize` (pretokenize.py): written last, when it is complete
TOKENIZE_PROGRESS = "tokenize.progress.pt"  # ... and where an unfinished one stands
"""Held-out order ignores data.seed, so evaluations of runs with different seeds see the same tokens."""


# ---------------------------------------------------------------------------------------------- document sources


class _EmbeddedSource:
    """The in-memory embedded corpus: each epoch is one permutation of the split's documents."""

    def __init__(self, cfg: DataConfig, heldout: bool) -> None:
        self.corpus = embedded_corpus(cfg.tokenizer)
        in_heldout = self.corpus.doc_hash_D < cfg.heldout_fraction
        self.docs_K = torch.nonzero(in_heldout if heldout else ~in_heldout).flatten()
        self.starts_D = torch.cumsum(self.corpus.doc_lens_D, 0) - self.corpus.doc_lens_D
        self.where = f"the embedded corpus ({'heldout' if heldout else 'train'} split)"
        if len(self.docs_K) == 0:
            raise ValueError(f"no text in {self.where}: data.heldout_fraction={cfg.heldout_fraction} selects none")

    def token_chunks(self, seed: int, start: Any = None) -> Iterator[tuple[torch.Tensor, Any]]:
        """The epoch as one chunk (in memory: replaying it is cheap), with no reader state before it."""
        order_K = self.docs_K[torch.randperm(len(self.docs_K), generator=torch.Generator().manual_seed(seed))]
        starts, lens = self.starts_D[order_K].tolist(), self.corpus.doc_lens_D[order_K].tolist()
        yield torch.cat([self.corpus.tokens_N[s:s + n] for s, n in zip(starts, lens)]).long(), None


def tokenizer_threads(cfg: DataConfig) -> int:
    """data.tokenizer_threads, or the cores this process may use (at most 16)."""
    if cfg.tokenizer_threads is not None:
        return cfg.tokenizer_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cores))


def _hash_filter(fraction: float, heldout: bool) -> Callable[[Doc], bool] | None:
    if fraction == 0.0 and not heldout:
        return None
    return lambda doc: (heldout_key(doc if isinstance(doc, str) else doc.numpy().astype("<i4", copy=False).tobytes())
                        < fraction) == heldout


def local_files(source: str) -> list[Path] | None:
    """The files a local `data.source` names (file, directory or glob); None when it names no local path."""
    path = Path(source).expanduser()
    if glob.has_magic(source) and not path.is_file():  # an existing name such as `corpus[v2].txt` is itself
        files = [Path(f) for f in sorted(glob.glob(str(path), recursive=True)) if Path(f).is_file()]
    elif path.is_dir():
        if (path / TOKENIZE_PROGRESS).is_file() and not (path / TOKENIZED_MANIFEST).is_file():
            raise ValueError(f"data.source {source!r} is an unfinished `sae-stream tokenize` output: finish it with "
                             f"`sae-stream tokenize --resume {source}`")
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in LOCAL_BUILDERS)
    elif path.is_file():
        files = [path]
    elif path.suffix in LOCAL_BUILDERS or source.startswith(("/", "./", "../", "~")):
        raise ValueError(f"data.source {source!r} does not exist: give an existing file, directory or glob")
    else:
        return None
    if not files:
        raise ValueError(f"data.source {source!r} holds no {'/'.join(LOCAL_BUILDERS)} files")
    return files


def _open_local(cfg: DataConfig, files: list[Path], heldout: bool, tok: Tokenizer) -> StreamSource:
    where = f"data.source {cfg.source!r} ({'heldout' if heldout else 'train'} split)"
    manifest = Path(cfg.source).expanduser() / TOKENIZED_MANIFEST  # `sae-stream tokenize` output: whose ids?
    made = yaml.safe_load(manifest.read_text()).get("tokenizer") if manifest.is_file() else None
    if made and not same_tokenizer(made, cfg.tokenizer):
        raise ValueError(f"data.source {cfg.source!r} holds ids of the {made!r} tokenizer ({TOKENIZED_MANIFEST}), "
                         f"not of data.tokenizer={cfg.tokenizer!r}: set --data.tokenizer={made}")
    suffixes = sorted({f.suffix for f in files})
    builders = {LOCAL_BUILDERS.get(s) for s in suffixes}
    if None in builders or len(builders) > 1:
        raise ValueError(f"data.source {cfg.source!r} mixes or holds unsupported file types ({', '.join(suffixes)}): "
                         f"point it at .txt, .jsonl/.json or .parquet files of one kind")
    if all(f.stat().st_size == 0 for f in files):
        raise ValueError(f"no text in {where}: all {len(files)} file(s) are empty")
    (builder,) = builders
    kwargs: dict[str, Any] = {}
    if builder == "text":
        # one document per file; a single file is split at blank lines so a hash held-out split is possible
        kwargs["sample_by"] = "paragraph" if len(files) == 1 else "document"
    import datasets

    if builder == "json":  # its reader logs a parse error before raising it, which our one-line error names
        logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
    # data_files are patterns to `datasets`: escaped, a name such as `corpus[v2].txt` matches only itself
    dataset = datasets.load_dataset(builder, data_files=[glob.escape(str(f)) for f in files], split="train",
                                    streaming=True, **kwargs)
    field = "text" if builder == "text" else cfg.text_field
    return StreamSource(dataset, field, _hash_filter(cfg.heldout_fraction, heldout), tok, cfg.shuffle_buffer, where,
                         threads=tokenizer_threads(cfg))


def _open_hf(cfg: DataConfig, heldout: bool, tok: Tokenizer) -> StreamSource:
    reason = hub_unreachable_reason()
    if reason is not None:
        raise ValueError(f"could not reach the Hugging Face Hub for dataset {cfg.source!r} ({reason}; no local path "
                         f"of that name exists either): use --data.source=embedded or an existing local "
                         ".txt/.jsonl/.parquet file or directory")
    split, keep = cfg.split, _hash_filter(cfg.heldout_fraction, heldout)
    if heldout and cfg.heldout_split is not None:
        split, keep = cfg.heldout_split, None
    elif not heldout and cfg.heldout_split is not None:
        keep = None
    import datasets

    try:
        dataset = datasets.load_dataset(cfg.source, cfg.hf_subset, split=split, streaming=True,
                                        revision=cfg.hf_revision)
    except Exception as e:  # datasets raises many types; the user needs one line naming the source
        revision = f", revision {cfg.hf_revision!r}" if cfg.hf_revision else ""
        raise ValueError(f"could not open HF dataset {cfg.source!r} (subset {cfg.hf_subset!r}, split {split!r}"
                         f"{revision}): {first_line(e)}") from e
    where = f"HF dataset {cfg.source!r} (split {split!r}{', held-out by hash' if keep and heldout else ''})"
    return StreamSource(dataset, cfg.text_field, keep, tok, cfg.shuffle_buffer, where, cfg.stream_retries,
                         tokenizer_threads(cfg))


def document_source(cfg: DataConfig) -> StreamSource:
    """Every document of a local or Hub `data.source` (its data.split; no held-out filter; its files in data.seed's
    order, each file's records in order), tokenized as training reads them: what `sae-stream tokenize` writes."""
    if cfg.source == "embedded":
        raise ValueError("data.source=embedded is tokenized already (in memory): `sae-stream tokenize` reads a local "
                         ".txt/.jsonl/.parquet source or a Hugging Face dataset; pass --data.source=PATH_OR_NAME")
    cfg = dataclasses.replace(cfg, heldout_fraction=0.0, heldout_split=None, shuffle_buffer=1)
    files = local_files(cfg.source)
    tok = get_tokenizer(cfg.tokenizer)
    return _open_local(cfg, files, False, tok) if files is not None else _open_hf(cfg, False, tok)


def pin_hf_revision(cfg: Config) -> Config:
    """cfg with a HF dataset's data.hf_revision (None, a branch or a tag) resolved to the commit the Hub serves now,
    so the run's config.yaml, and so its resume, name the exact data. Unchanged for local sources, a sha, or when the
    Hub cannot be asked. Under torchrun each rank asks at start-up: they agree unless a commit lands in between."""
    source, rev = cfg.data.source, cfg.data.hf_revision
    if source == "embedded" or local_files(source) is not None or (rev and _is_sha(rev)) or hub_unreachable_reason():
        return cfg
    try:
        from huggingface_hub import HfApi

        sha = HfApi().dataset_info(source, revision=rev, timeout=10).sha
    except Exception as e:  # (not found, gated: opening the dataset says so; a network error: it may pass)
        warnings.warn(f"data: could not resolve {source!r} to a commit ({first_line(e)}): the run streams "
                      f"{rev or 'the default branch'} unpinned, and a resume may read other data", stacklevel=2)
        return cfg
    if not sha:
        return cfg
    if is_main_process():
        print(f"data: {source!r} pinned at revision {sha} (data.hf_revision{f', was {rev!r}' if rev else ''})")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, hf_revision=sha))


def keep_pinned_revision(cfg: Config, saved: Path) -> Config:
    """cfg (a resume's CONFIG, with no sha of its own) at the commit of the run's config.yaml `saved`, same source."""
    if not saved.is_file() or (cfg.data.hf_revision and _is_sha(cfg.data.hf_revision)):
        return cfg
    run = load_config(saved).data
    if run.source != cfg.data.source or not (run.hf_revision and _is_sha(run.hf_revision)):
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, hf_revision=run.hf_revision))


def _is_sha(revision: str) -> bool:
    return len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)


# ---------------------------------------------------------------------------------------------- contexts


@dataclasses.dataclass
class _Replay:
    """Where to replay an epoch from to reach a position: the record reader's `source` snapshot (records.py; None
    for the embedded corpus or an epoch's start), with `index` contexts cut, `mine` of them this rank's, `carry`
    tokens left over and this rank's `pending` context of an unfinished group. Taken at the start of each token
    chunk, so a resume tokenizes one chunk again, not the epoch up to its position."""

    source: dict[str, Any] | None = None
    index: int = 0
    mine: int = 0
    carry: torch.Tensor = dataclasses.field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    pending: torch.Tensor | None = None


class TokenContexts:
    """Iterable of LongTensor[context_len] for one split and rank; resumable via state_dict / load_state_dict.

    Iterating continues from the current position (epoch, contexts yielded in it) and advances it.
    """

    def __init__(self, cfg: DataConfig, split: str = "train", rank: int = 0, world_size: int = 1) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.cfg, self.split, self.rank, self.world_size = cfg, split, rank, world_size
        self.tokenizer = get_tokenizer(cfg.tokenizer)
        self._files_sha: str | None = None  # local sources: which files, so a resume on changed files is refused
        self._source = self._open_source()
        self.epoch, self.yielded = 0, 0
        self._replay = _Replay()  # the current chunk's start: what state_dict saves
        self._resume_from: _Replay | None = None  # set by load_state_dict for the next epoch pass

    def _open_source(self) -> _EmbeddedSource | StreamSource:
        heldout = self.split == "heldout"
        if self.cfg.source == "embedded":
            return _EmbeddedSource(self.cfg, heldout)
        files = local_files(self.cfg.source)
        if files is not None:
            listing = "".join(f"{f.name}\t{f.stat().st_size}\n" for f in files)
            self._files_sha = hashlib.sha256(listing.encode()).hexdigest()[:16]
            return _open_local(self.cfg, files, heldout, self.tokenizer)
        return _open_hf(self.cfg, heldout, self.tokenizer)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield from self._epoch_contexts()
            if self.split == "train":  # a held-out pass is meant to end; say what happens to training data
                what = (f"starting epoch {self.epoch + 2} with a new shuffle (data.loop=true)" if self.cfg.loop
                        else "the stream stops here (data.loop=false)")
                warnings.warn(f"data: {self.cfg.source} exhausted after {self.yielded} contexts; {what}", stacklevel=2)
            if not self.cfg.loop:
                return
            self.epoch, self.yielded = self.epoch + 1, 0

    def _epoch_contexts(self) -> Iterator[torch.Tensor]:
        """The epoch's contexts of this rank after the first `self.yielded` (replayed from `_resume_from`)."""
        # one shuffle per (seed, epoch) pair: `seed + epoch` gave seed s+1 the orders of seed s one epoch later
        base = self.cfg.seed if self.split == "train" else HELDOUT_SEED
        seed = (base * 1_000_003 + self.epoch) % 2**32
        start, self._resume_from = self._resume_from or _Replay(), None
        L, W, skip = self.cfg.context_len, self.world_size, self.yielded
        i, mine, carry, pending = start.index, start.mine, start.carry, start.pending
        for chunk, source_before in self._source.token_chunks(seed, start.source):
            self._replay = _Replay(source_before, i, mine, carry, None if pending is None else pending.clone())
            tokens = torch.cat([carry, chunk]) if len(carry) else chunk
            n = len(tokens) // L
            for context_T in tokens[: n * L].view(n, L):
                if i % W == self.rank:
                    pending = context_T
                # a context is handed out once its whole group of world_size exists: every rank gets the same
                # count (the epoch's incomplete last group is dropped), so data-parallel ranks end an epoch together
                if i % W == W - 1 and pending is not None:
                    mine += 1
                    if mine > skip:
                        self.yielded += 1
                        yield pending.clone()
                    pending = None
                i += 1
            carry = tokens[n * L:].clone()  # (a view would keep the whole chunk alive)
        self._replay = _Replay()
        if mine == 0:
            raise ValueError(f"{self._source.where} yields fewer than {self.world_size} context(s) of data.context_len="
                             f"{self.cfg.context_len} (one per rank): use more text, shorter contexts or fewer ranks")

    def _identity(self) -> dict[str, Any]:
        out = {"source": self.cfg.source, "split": self.split, "seed": self.cfg.seed, "rank": self.rank,
               "world_size": self.world_size, "context_len": self.cfg.context_len, "tokenizer": self.cfg.tokenizer}
        if self.cfg.tokenizer.startswith(HF_PREFIX):  # its files may change under its name
            out["tokenizer_ids"] = self.tokenizer.cache_key()
        return out

    def position(self) -> tuple[int, int, _Replay]:
        """The current position as it stands, without copying (the replay of a chunk is never changed once taken):
        what a reader running ahead (prefetch.py) notes per batch, for `state_dict(position)` when asked."""
        return self.epoch, self.yielded, self._replay

    def state_dict(self, position: tuple[int, int, _Replay] | None = None) -> dict[str, Any]:
        epoch, yielded, replay = position if position is not None else self.position()
        return {"epoch": epoch, "contexts": yielded, "replay": dataclasses.asdict(replay),
                "files_sha": self._files_sha, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set the position; the next iteration replays the epoch up to it (from the start of the token chunk it is
        in, whose reader snapshot the state holds), so its first context is the next one."""
        if self._files_sha is not None and state.get("files_sha", self._files_sha) != self._files_sha:
            raise ValueError(f"the files of data.source {self.cfg.source!r} changed (names or sizes) since this data "
                             "state was saved: resume with the same files")
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise ValueError(f"data state was saved with {key}={state.get(key)!r} but this stream has "
                                 f"{key}={value!r}: resume with the same data settings")
        replay = state.get("replay")  # (states from before it replay the epoch from its start)
        if replay is None and self.split == "train" and self.cfg.seed != 0:
            raise ValueError("data state was saved by an sae-stream from before session 7, whose epoch shuffles for "
                             f"data.seed={self.cfg.seed} differ from this one's: resume with that version")
        if replay is None or "records" in replay:  # before the record reader of records.py
            if not isinstance(self._source, _EmbeddedSource):
                raise ValueError(f"data state was saved by an sae-stream from before session 8, whose record order "
                                 f"for {self.cfg.source!r} differs from this one's: resume with that version, or "
                                 "start a new run")
            if replay is not None:
                replay = {k: v for k, v in replay.items() if k != "records"}  # (always 0: the corpus is one chunk)
        self.epoch, self.yielded = int(state["epoch"]), int(state["contexts"])
        self._resume_from = _Replay(**replay) if replay is not None else None
        self._replay = self._resume_from or _Replay()  # what state_dict saves until iteration moves on


def context_batches(contexts: Iterable[torch.Tensor], batch_size: int,
                    drop_last: bool = True) -> Iterator[torch.Tensor]:
    """Stack contexts into LongTensor[batch_size, context_len] batches; an incomplete last batch is dropped."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    batch: list[torch.Tensor] = []
    for context_T in contexts:
        batch.append(context_T)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch and not drop_last:
        yield torch.stack(batch)


def heldout_batches(cfg: DataConfig, batch_size: int, n_tokens: int, rank: int = 0,
                    world_size: int = 1, what: str = "n_tokens") -> Iterator[torch.Tensor]:
    """Held-out batches [B, T] in a fixed order, at most `n_tokens` tokens, stopping at the end of the split.

    The last batch may be smaller than `batch_size`, so small budgets still evaluate every token they allow.
    `what` names the setting `n_tokens` came from in the error.
    """
    if n_tokens < cfg.context_len:
        raise ValueError(f"{what} ({n_tokens}) must be >= one context of {cfg.context_len} tokens: raise it")
    contexts = TokenContexts(dataclasses.replace(cfg, loop=False), "heldout", rank, world_size)
    return context_batches(itertools.islice(contexts, n_tokens // cfg.context_len), batch_size, drop_last=False)


class ContextBatches:
    """Re-iterable [B, T] batches over a TokenContexts, carrying its position: `state_dict()` / `load_state_dict()`
    delegate to the contexts, so a consumer (the activation stream) can checkpoint and replay the text stream."""

    def __init__(self, contexts: TokenContexts, batch_size: int) -> None:
        self.contexts, self.batch_size = contexts, batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        return context_batches(self.contexts, self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        return self.contexts.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.contexts.load_state_dict(state)

    def close(self) -> None:
        """Nothing to stop (prefetch.PrefetchedBatches, read by a child process, has one)."""
