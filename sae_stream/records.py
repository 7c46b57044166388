"""The shuffled texts of a streamed `datasets.IterableDataset`, resumable without re-reading what came before.

    texts = ShuffledTexts(dataset, "text", seed, buffer_size=1000, where="HF dataset ...")
    for text in texts: ...            # str; an int32 tensor for pre-tokenized ids; None for anything else
    state = texts.snapshot()          # between two texts: resume with ShuffledTexts(..., state=state)

The epoch's order: the dataset's shards (its files) in a seeded random order, then a shuffle buffer over their
records, both drawn from the seed. A snapshot is where that order stands: the shard being read, how many of its
records were read, the buffer's texts and the generator's state. A resume opens that one shard and skips its
records read already, so a Hub stream downloads one shard again, not every record of the epoch up to the position
(what `datasets`' own resumable shuffle would avoid too, but it drops the buffer's records: the order changes).
"""

from __future__ import annotations

import functools
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from sae_stream.rundir import first_line
from sae_stream.tokenizer import Tokenizer

ENCODE_DOCS = 64  # documents per token chunk of a StreamSource (its snapshots are taken between chunks)
Doc = str | torch.Tensor  # a record's text, or its pre-tokenized ids (int32: compact in the shuffle buffer, and a
# checkpoint of that buffer pickles tensors, which load under any numpy)
Parts = list[tuple[np.ndarray, bool]]  # a chunk's documents' ids, each with whether it was text (gets end-of-text)


class ShuffledTexts:
    """One epoch of `dataset[text_field]`, shuffled by `seed`."""

    def __init__(self, dataset: Any, text_field: str, seed: int, buffer_size: int, where: str,
                 state: dict[str, Any] | None = None, retries: int = 0) -> None:
        self.dataset, self.text_field, self.size, self.where = dataset, text_field, buffer_size, where
        self.retries = retries  # network errors survived per shard (a Hub stream over hours meets some)
        self.n_shards = max(1, int(getattr(dataset, "n_shards", 1) or 1))
        self.order = np.random.default_rng([seed, 0]).permutation(self.n_shards).tolist()
        self.rng = np.random.default_rng([seed, 1])
        self.shards = ShardTree(dataset, self.n_shards)
        self.shard_pos, self.in_shard, self.buffer = 0, 0, []
        if state is not None:
            self._restore(state)

    def _restore(self, state: dict[str, Any]) -> None:
        if state["n_shards"] != self.n_shards or state["buffer_size"] != self.size:
            raise ValueError(f"data state was saved for {state['n_shards']} shard(s) and a shuffle buffer of "
                             f"{state['buffer_size']} but {self.where} has {self.n_shards} and data.shuffle_buffer="
                             f"{self.size}: resume with the same files and settings")
        self.shard_pos, self.in_shard = int(state["shard_pos"]), int(state["in_shard"])
        self.buffer = list(state["buffer"])
        self.rng.bit_generator.state = state["rng"]

    def snapshot(self) -> dict[str, Any]:
        """Where the order stands (taken between two texts): what `state=` resumes from."""
        return {"n_shards": self.n_shards, "buffer_size": self.size, "shard_pos": self.shard_pos,
                "in_shard": self.in_shard, "buffer": list(self.buffer), "rng": self.rng.bit_generator.state}

    def __iter__(self) -> Iterator[str | None]:
        while self.shard_pos < self.n_shards:
            for record in self._shard_records(self.order[self.shard_pos], self.in_shard):
                self.in_shard += 1
                text = self._text(record)
                if len(self.buffer) < self.size:
                    self.buffer.append(text)
                    continue
                j = int(self.rng.integers(self.size))
                out, self.buffer[j] = self.buffer[j], text
                yield out
            self.shard_pos, self.in_shard = self.shard_pos + 1, 0
        while self.buffer:  # the shards are read: the buffer's texts, in random order
            j = int(self.rng.integers(len(self.buffer)))
            self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
            yield self.buffer.pop()

    def _shard_records(self, shard: int, skip: int) -> Iterator[dict[str, Any]]:
        """Shard `shard`'s records after its first `skip`. A network error (_network_error) is retried `self.retries`
        times, the shard opened again at the record reached; any other reader error (a malformed .jsonl line, a
        bad parquet file), or the last retry's, is raised naming the source."""
        failures = 0
        while True:
            ds = self.shards.leaf(shard)
            records = iter(ds.skip(skip) if skip else ds)
            while True:
                try:
                    record = next(records)
                except StopIteration:
                    return
                except Exception as e:  # noqa: BLE001 - pyarrow / json / datasets errors come in many types
                    if not _network_error(e) or failures >= self.retries:
                        again = f" (after {failures} retries)" if failures else ""
                        fix = (": the text must be UTF-8 (convert it, e.g. `iconv -f latin1 -t utf-8`)"
                               if isinstance(e, UnicodeDecodeError) else "")
                        raise ValueError(f"cannot read {self.where}{again}: {first_line(e)}{fix}") from e
                    failures += 1
                    wait = min(60.0, 2.0 ** failures)
                    warnings.warn(f"reading {self.where} failed ({first_line(e)}): retry {failures} of "
                                  f"{self.retries} in {wait:g} s, from record {skip} of its shard", stacklevel=2)
                    time.sleep(wait)
                    break
                skip, failures = skip + 1, 0  # (retries count failures in a row: progress resets them)
                yield record

    def _text(self, record: dict[str, Any]) -> Doc | None:
        if self.text_field not in record:
            raise ValueError(f"{self.where} has no column {self.text_field!r} (columns: {', '.join(record)}): "
                             "set data.text_field")
        value = record[self.text_field]
        if isinstance(value, str) or value is None:
            return value
        try:
            ids = np.asarray(value)
        except ValueError:  # (ragged nested lists)
            ids = None
        if ids is None or ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise ValueError(f"column {self.text_field!r} of {self.where} holds neither text nor a list of token ids "
                             f"(a {type(value).__name__}): set data.text_field to one that does")
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
            bad = int(ids.min() if ids.min() < 0 else ids.max())
            raise ValueError(f"{self.where}: token id {bad} in column {self.text_field!r} is no id a tokenizer "
                             "gives (outside int32): set data.text_field to a column of token ids")
        return torch.from_numpy(ids.astype(np.int32))


class StreamSource:
    """A `datasets.IterableDataset` of records: shuffled per epoch (ShuffledTexts), filtered, tokenized in batches by a
    pool of `threads` (each document on its own, joined in order: the same tokens for any count). Text documents
    are each followed by end-of-text; a column of pre-tokenized ids is joined as it is (such datasets carry their
    own separators), its ids checked against the tokenizer's vocabulary."""

    def __init__(self, dataset: Any, text_field: str, keep: Callable[[Doc], bool] | None, tok: Tokenizer,
                 shuffle_buffer: int, where: str, retries: int = 0, threads: int = 1) -> None:
        self.dataset, self.text_field, self.keep, self.tok = dataset, text_field, keep, tok
        self.shuffle_buffer, self.where, self.retries, self.threads = shuffle_buffer, where, retries, threads
        self._pool: ThreadPoolExecutor | None = None

    def token_chunks(self, seed: int, start: dict[str, Any] | None = None) -> Iterator[tuple[torch.Tensor, Any]]:
        """Token chunks of the epoch's documents (`ENCODE_DOCS` per chunk), each with the reader's snapshot before
        its first record. `start`: such a snapshot to go on from (a resume: records.py reads again only the part of
        one shard before it, and tokenizes nothing before it). With threads, up to `threads` chunks are being
        encoded while the reader goes on."""
        for parts, before in self._doc_chunks(seed, start):
            yield torch.from_numpy(self._joined(parts)), before

    def doc_chunks(self, seed: int, start: dict[str, Any] | None = None) -> Iterator[tuple[list[np.ndarray], Any]]:
        """token_chunks' chunks before they are joined: each document's ids (a text's followed by end-of-text;
        int32 or the tokenizer's dtype), checked against the vocabulary."""
        for parts, before in self._doc_chunks(seed, start):
            docs = [np.append(ids, np.asarray(self.tok.eot, ids.dtype)) if text else ids for ids, text in parts]
            self._checked(np.concatenate(docs))
            yield docs, before

    def _doc_chunks(self, seed: int, start: dict[str, Any] | None) -> Iterator[tuple[Parts, Any]]:
        texts = ShuffledTexts(self.dataset, self.text_field, seed, self.shuffle_buffer, self.where, start,
                              retries=self.retries)
        batch: list[Doc] = []
        in_flight: deque[tuple[list[Any], Any]] = deque()
        n_docs = n_other_split = 0
        before = texts.snapshot()
        for text in texts:
            if text is None or (not text.strip() if isinstance(text, str) else text.numel() == 0):
                continue
            if self.keep is not None and not self.keep(text):
                n_other_split += 1
                continue
            batch.append(text)
            n_docs += 1
            if len(batch) == ENCODE_DOCS:
                in_flight.append((self._submit(batch), before))
                batch, before = [], texts.snapshot()
                if len(in_flight) > self.threads - 1:
                    yield self._join(*in_flight.popleft())
        if batch:
            in_flight.append((self._submit(batch), before))
        while in_flight:
            yield self._join(*in_flight.popleft())
        if start is not None:
            return  # a resume's rest of the epoch may be empty; the epoch itself had text
        if n_docs == 0 and n_other_split:
            raise ValueError(f"no text in {self.where}: each of its {n_other_split} document(s) fell in the other "
                             "split (data.heldout_fraction picks documents by a hash of their text; a single .txt "
                             "file is split into documents at blank lines): give more documents, e.g. blank lines "
                             "between them or a .jsonl record each, or change data.heldout_fraction")
        if n_docs == 0:
            raise ValueError(f"no text in {self.where}")

    def _submit(self, docs: list[Doc]) -> list[tuple[Any, bool]]:
        """Each document's token array (with threads a future of it), and whether it was text (gets end-of-text)."""
        if self.threads > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="tokenize")
        encode = self.tok.encode_array if self._pool is None else functools.partial(self._pool.submit,
                                                                                     self.tok.encode_array)
        return [(encode(d), True) if isinstance(d, str) else (d.numpy(), False) for d in docs]

    def _join(self, parts: list[tuple[Any, bool]], before: Any) -> tuple[Parts, Any]:
        """The chunk's documents' ids, each with whether it was text (gets end-of-text), and the snapshot before."""
        return [(p.result() if isinstance(p, Future) else p, text) for p, text in parts], before

    def _joined(self, parts: Parts) -> np.ndarray:
        """The documents as one checked int64 array, text ones followed by end-of-text (one copy of the ids)."""
        eot = np.array([self.tok.eot], dtype=np.int64)
        flat = np.concatenate([a for ids, text in parts for a in ((ids, eot) if text else (ids,))])
        return self._checked(flat.astype(np.int64, copy=False))

    def _checked(self, flat: np.ndarray) -> np.ndarray:
        """`flat`, if every id is in the tokenizer's vocabulary (only pre-tokenized ids can be outside it)."""
        if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= self.tok.n_vocab):
            bad = int(flat[(flat < 0) | (flat >= self.tok.n_vocab)][0])
            raise ValueError(f"{self.where}: token id {bad} in column {self.text_field!r} is outside the "
                             f"{self.tok.name!r} tokenizer's {self.tok.n_vocab} ids (data.tokenizer): the ids come "
                             "from another tokenizer; set data.tokenizer to it (hf:NAME_OR_DIR for a Hugging Face "
                             "one)")
        return flat


def _network_error(e: BaseException) -> bool:
    """A fault worth reading again for: an OSError (ConnectionError, a timeout, datasets' own "Server Disconnected"
    once its retries are spent, huggingface_hub's HTTP errors) or a request error of the HTTP client the Hub
    libraries use (httpx, or the httpx2 that huggingface_hub 2.x names `huggingface_hub.utils.httpx`)."""
    if isinstance(e, OSError):
        return True
    return isinstance(e, _http_request_errors())


@functools.cache
def _http_request_errors() -> tuple[type[BaseException], ...]:
    errors = []
    try:
        from huggingface_hub.utils import httpx as hub_httpx

        errors.append(hub_httpx.RequestError)
    except (ImportError, AttributeError):
        pass
    try:
        import httpx

        errors.append(httpx.RequestError)
    except ImportError:
        pass
    return tuple(errors)


class ShardTree:
    """One-shard views of a dataset of `n` shards. `datasets` builds every shard's arguments to keep one, so
    `dataset.shard(n, i)` costs O(n) and taking all n of them O(n²) (about 90 s for 4000 files); splitting into
    FANOUT contiguous groups level by level, each group split once and kept, costs O(n log n)."""

    FANOUT = 8

    def __init__(self, dataset: Any, n: int) -> None:
        self.dataset, self.n = dataset, n
        self._groups: dict[tuple[int, ...], list[tuple[Any, int, int]]] = {}  # path -> [(group, shards, offset)]

    def leaf(self, i: int) -> Any:
        """The dataset holding shard `i` alone (the same one in every process: the split is deterministic)."""
        ds, n, path = self.dataset, self.n, ()
        while n > 1:
            for j, (group, size, offset) in enumerate(self._split(path, ds, n)):
                if offset <= i < offset + size:
                    ds, n, i, path = group, size, i - offset, (*path, j)
                    break
        return ds

    def _split(self, path: tuple[int, ...], ds: Any, n: int) -> list[tuple[Any, int, int]]:
        if path not in self._groups:
            groups, offset = [], 0
            for j in range(min(self.FANOUT, n)):
                group = ds.shard(num_shards=min(self.FANOUT, n), index=j)  # contiguous shards
                groups.append((group, group.n_shards, offset))
                offset += group.n_shards
            if offset != n:
                raise RuntimeError(f"splitting {n} shards gave {offset}: this `datasets` version shards otherwise")
            self._groups[path] = groups
        return self._groups[path]
