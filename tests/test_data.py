"""Text sources -> token contexts: embedded corpus, local files, HF offline failure, sharding, resume."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import socket
import time

import pytest
import torch

from sae_stream import corpus, data, records
from sae_stream.config import DataConfig
from sae_stream.corpus import heldout_key
from sae_stream.data import TokenContexts, context_batches, heldout_batches

EOT = 256  # the byte tokenizer's end-of-text id


def byte_cfg(**kw) -> DataConfig:
    return DataConfig(**{"tokenizer": "byte", "context_len": 64, "loop": False, "shuffle_buffer": 8, **kw})


def take(contexts, n: int) -> list[torch.Tensor]:
    return list(itertools.islice(contexts, n))


def documents_in(contexts: list[torch.Tensor]) -> list[str]:
    """The complete documents in one epoch's contexts (the tail after the last eot was cut off, so dropped)."""
    tokens = torch.cat(contexts).tolist()
    docs, start = [], 0
    for i, t in enumerate(tokens):
        if t == EOT:
            docs.append(bytes(tokens[start:i]).decode("utf-8"))
            start = i + 1
    return docs


@pytest.fixture
def txt_dir(tmp_path):
    """60 small .txt documents with distinct text (one document per file)."""
    root = tmp_path / "txt"
    (root / "sub").mkdir(parents=True)
    for i in range(60):
        folder = root / "sub" if i % 3 else root
        (folder / f"doc{i:02d}.txt").write_text(f"Document {i}. " + "word " * (5 + i % 17) + "end.")
    return root


# ---------------------------------------------------------------------------------------------- embedded corpus


def test_embedded_corpus__gpt2_size_and_heldout_share() -> None:
    summary = corpus.corpus_summary("gpt2", heldout_fraction=0.05)
    total = summary["train_tokens"] + summary["heldout_tokens"]
    assert 300_000 < total < 1_500_000, summary
    assert 0.01 < summary["heldout_tokens"] / total < 0.15, summary
    assert summary["documents"] > 1000


def test_embedded_corpus__train_and_heldout_documents_disjoint() -> None:
    cfg = byte_cfg(context_len=4096, heldout_fraction=0.05)
    train = documents_in(list(TokenContexts(cfg, "train")))
    heldout = documents_in(list(TokenContexts(cfg, "heldout")))
    assert len(heldout) > 50 and len(train) > 10 * len(heldout)
    assert not set(train) & set(heldout)
    assert all(heldout_key(d) < 0.05 for d in heldout) and all(heldout_key(d) >= 0.05 for d in train)
    assert len(set(train)) > 0.9 * len(train)  # documents are distinct units, not one repeated text


def test_embedded_corpus__disk_cache_written_and_reused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SAE_STREAM_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus, "embedded_documents", lambda: ("ab", "é"))
    corpus.embedded_corpus.cache_clear()
    try:
        built = corpus.embedded_corpus("byte")
        path = corpus.embedded_cache_path("byte")
        assert path.parent == tmp_path and path.is_file()
        assert built.tokens_N.tolist() == [97, 98, EOT, 0xC3, 0xA9, EOT]
        assert built.doc_lens_D.tolist() == [3, 3]

        def no_build():
            raise AssertionError("the disk cache should have been used")

        monkeypatch.setattr(corpus, "embedded_documents", no_build)
        corpus.embedded_corpus.cache_clear()
        assert torch.equal(corpus.embedded_corpus("byte").tokens_N, built.tokens_N)

        path.write_bytes(b"truncated")  # a broken cache is rebuilt, not trusted
        monkeypatch.setattr(corpus, "embedded_documents", lambda: ("ab", "é"))
        corpus.embedded_corpus.cache_clear()
        assert torch.equal(corpus.embedded_corpus("byte").tokens_N, built.tokens_N)
    finally:
        corpus.embedded_corpus.cache_clear()


# ---------------------------------------------------------------------------------------------- stream properties


def test_token_contexts__same_seed_same_contexts() -> None:
    cfg = byte_cfg(seed=3, loop=True)
    a, b = take(TokenContexts(cfg), 50), take(TokenContexts(cfg), 50)
    other = take(TokenContexts(byte_cfg(seed=4, loop=True)), 50)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, other))
    assert all(x.dtype == torch.long and x.shape == (64,) for x in a)


def test_token_contexts__epochs_reshuffle_and_loop_flag(txt_dir) -> None:
    finite = list(TokenContexts(byte_cfg(source=str(txt_dir), heldout_fraction=0.0, context_len=16)))
    looping = TokenContexts(byte_cfg(source=str(txt_dir), heldout_fraction=0.0, context_len=16, loop=True))
    two_epochs = take(looping, 2 * len(finite))
    assert len(two_epochs) == 2 * len(finite) and looping.epoch == 1
    assert all(torch.equal(x, y) for x, y in zip(finite, two_epochs))
    every = {p.read_text() for p in txt_dir.rglob("*.txt")}
    for epoch in (finite, two_epochs[len(finite):]):  # each epoch: every document once, but the one cut at its end
        docs = documents_in(epoch)
        assert len(set(docs)) == len(docs) >= len(every) - 1 and set(docs) <= every
    assert documents_in(two_epochs[len(finite):]) != documents_in(finite)  # a new order
    # another seed is another sequence of orders, not this one shifted by an epoch
    seed_1 = list(TokenContexts(byte_cfg(source=str(txt_dir), heldout_fraction=0.0, context_len=16, seed=1)))
    assert documents_in(seed_1) != documents_in(two_epochs[len(finite):])


@pytest.mark.parametrize("source", ["embedded", "txt"])
def test_token_contexts__shards_cover_without_overlap(source, txt_dir) -> None:
    cfg = byte_cfg(source="embedded" if source == "embedded" else str(txt_dir), context_len=2048 if
                   source == "embedded" else 16)
    whole = list(TokenContexts(cfg))
    shards = [list(TokenContexts(cfg, rank=r, world_size=3)) for r in range(3)]
    # every rank gets the same count (data-parallel ranks must end an epoch together): the incomplete last group
    # of < 3 contexts is dropped, everything before it is covered exactly once, in order
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == len(whole) // 3
    interleaved = [shards[i % 3][i // 3] for i in range(3 * len(shards[0]))]
    assert all(torch.equal(x, y) for x, y in zip(whole, interleaved))
    assert len(whole) % 3 != 0 or source == "txt"  # the embedded case really has a tail to drop


def test_token_contexts__state_dict_replays_across_epochs(txt_dir) -> None:
    cfg = byte_cfg(source=str(txt_dir), context_len=32, loop=True, seed=7)
    reference = take(TokenContexts(cfg, rank=1, world_size=2), 200)  # > 2 epochs of this shard
    first = TokenContexts(cfg, rank=1, world_size=2)
    take(first, 137)
    state = first.state_dict()
    assert state["epoch"] >= 1
    resumed = TokenContexts(cfg, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(take(resumed, 63), reference[137:]))


@pytest.mark.parametrize("files", [1, 5])
def test_token_contexts__resume_replays_one_chunk_not_the_epoch_and_is_exact(tmp_path, monkeypatch, files) -> None:

    monkeypatch.setattr(records, "ENCODE_DOCS", 4)  # many chunks per epoch
    docs = [("" if i % 17 == 0 else f"doc {i}: " + "word " * (i % 13)) for i in range(240)]  # some empty records
    for f in range(files):  # (several files: several shards, read in a seeded order)
        part = docs[f * len(docs) // files:(f + 1) * len(docs) // files]
        (tmp_path / f"docs{f}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    path = tmp_path / ("docs0.jsonl" if files == 1 else "*.jsonl")
    cfg = byte_cfg(source=str(path), context_len=24, loop=True, seed=3, heldout_fraction=0.2)
    for rank in range(3):
        reference = take(TokenContexts(cfg, rank=rank, world_size=3), 400)  # > 2 epochs of this shard
        for at in (0, 1, 37, 111, 112, 113, 250, 399):
            first = TokenContexts(cfg, rank=rank, world_size=3)
            take(first, at)
            resumed = TokenContexts(cfg, rank=rank, world_size=3)
            resumed.load_state_dict(first.state_dict())
            encoded: list[int] = []

            def counting(texts, encode=resumed._source.tok.encode_batch, log=encoded):
                log.append(len(texts))
                return encode(texts)

            monkeypatch.setattr(resumed._source.tok, "encode_batch", counting)
            got = take(resumed, 1)[0]
            assert torch.equal(got, reference[at]), (rank, at)
            assert sum(encoded) <= 3 * 4  # a chunk or three, not every document up to the position
            assert all(torch.equal(x, y) for x, y in zip(take(resumed, 30), reference[at + 1:]))


class CountingDataset:
    """Wraps a streamed dataset (or a list of record lists, one per shard) and logs every record read from it,
    the ones a skip passes over included."""

    def __init__(self, inner, log: list | None = None) -> None:
        self.inner, self.log = inner, ([] if log is None else log)
        self.n_shards = len(inner) if isinstance(inner, list) else inner.n_shards

    def shard(self, num_shards: int, index: int) -> CountingDataset:
        """Contiguous groups, the first n % k one shard longer (as `datasets` splits); logs the O(n) work of it."""
        self.log.append(("shard", self.n_shards))
        if not isinstance(self.inner, list):
            return CountingDataset(self.inner.shard(num_shards, index), self.log)
        n, k = len(self.inner), num_shards
        start = index * (n // k) + min(index, n % k)
        return CountingDataset(self.inner[start:start + n // k + (index < n % k)], self.log)

    def skip(self, n: int):
        return itertools.islice(self, n, None)

    def __iter__(self):
        for record in itertools.chain.from_iterable(self.inner) if isinstance(self.inner, list) else self.inner:
            self.log.append(record["text"])
            yield record

    def texts(self) -> list[str]:
        return [r for r in self.log if isinstance(r, str)]


def test_token_contexts__resume_reads_only_the_shard_it_stopped_in(tmp_path, monkeypatch) -> None:
    """8 files of 30 records: a resume late in the epoch reads part of one file again (and on into the next for
    its chunk), never the files before it; its contexts are those of the uninterrupted stream."""

    monkeypatch.setattr(records, "ENCODE_DOCS", 4)
    for f in range(8):
        (tmp_path / f"part{f}.jsonl").write_text("".join(json.dumps({"text": f"file {f} doc {i}: " + "w " * i}) + "\n"
                                                         for i in range(30)))
    cfg = byte_cfg(source=str(tmp_path / "*.jsonl"), context_len=32, seed=1, heldout_fraction=0.0)
    reference = list(TokenContexts(cfg))
    at = len(reference) * 6 // 7
    first = TokenContexts(cfg)
    take(first, at)
    state = first.state_dict()
    assert state["replay"]["source"]["shard_pos"] >= 5  # the position lies in one of the last files
    resumed = TokenContexts(cfg)
    resumed.load_state_dict(state)
    resumed._source.dataset = CountingDataset(resumed._source.dataset)
    assert all(torch.equal(x, y) for x, y in zip(take(resumed, 3), reference[at:]))
    read = resumed._source.dataset.texts()
    assert 0 < len(read) <= 2 * 30  # a replay from the start would read ~6 files (180 records)
    assert len({r.split(" doc")[0] for r in read}) <= 2


def test_shuffled_texts__an_epoch_is_a_permutation_resumable_between_any_two_texts() -> None:
    from sae_stream.records import ShuffledTexts

    shards = [[{"text": f"{s}-{i}"} for i in range(n)] for s, n in enumerate([7, 0, 12, 3, 9])]
    every = sorted(r["text"] for shard in shards for r in shard)
    for size in (1, 4, 31, 100):  # (larger than the whole epoch: one buffer fill, then a drain)
        whole = list(ShuffledTexts(CountingDataset(shards), "text", seed=5, buffer_size=size, where="test"))
        assert sorted(whole) == every and (whole != every or size == 1)
        other = list(ShuffledTexts(CountingDataset(shards), "text", seed=6, buffer_size=size, where="test"))
        assert other != whole
        for at in range(len(whole) + 1):
            texts = ShuffledTexts(CountingDataset(shards), "text", seed=5, buffer_size=size, where="test")
            it = iter(texts)
            assert list(itertools.islice(it, at)) == whole[:at]
            state = texts.snapshot()
            again = ShuffledTexts(CountingDataset(shards), "text", seed=5, buffer_size=size, where="test", state=state)
            assert list(again) == whole[at:], (size, at)
    with pytest.raises(ValueError, match="saved for 5 shard.*has 4 and data.shuffle_buffer=4: resume with the same"):
        ShuffledTexts(CountingDataset(shards[:4]), "text", 5, 4, "test", state=state)


def test_shard_tree__leaves_are_each_shard_once_for_n_log_n_work() -> None:
    """dataset.shard(n, i) costs O(n) in `datasets`: the tree's leaves must cover every shard exactly once, the
    same in every process, for O(n log n) splitting work in all (a flat split of 4096 shards: 16.8M)."""
    from sae_stream.records import ShardTree

    for n in (*range(1, 20), 64, 65, 100, 4096):
        shards = [[{"text": str(i)}] for i in range(n)]
        counted = CountingDataset(shards)
        tree = ShardTree(counted, n)
        leaves = [[r["text"] for r in tree.leaf(i)] for i in range(n)]
        assert leaves == [[str(i)] for i in range(n)]
        assert [[r["text"] for r in ShardTree(CountingDataset(shards), n).leaf(i)] for i in (n - 1, 0)] == \
            [[str(n - 1)], ["0"]]  # another process, another order of requests: the same leaves
        work = sum(size for kind, size in (e for e in counted.log if isinstance(e, tuple)))
        assert work <= ShardTree.FANOUT * n * max(1, math.ceil(math.log(n, ShardTree.FANOUT))), (n, work)


class FlakyShards(CountingDataset):
    """Raises `error` where record `at["text"]` would be read, `at["times"]` times in all (a network fault)."""

    def __init__(self, inner, error: Exception, at: dict[str, int], log: list | None = None) -> None:
        super().__init__(inner, log)
        self.error, self.at = error, at  # (shared by every view of it)

    def shard(self, num_shards: int, index: int) -> FlakyShards:
        view = super().shard(num_shards, index)
        return FlakyShards(view.inner, self.error, self.at, self.log)

    def __iter__(self):
        for record in super().__iter__():
            if record["text"] == self.at["text"] and self.at["times"] > 0:
                self.at["times"] -= 1
                raise self.error
            yield record


def test_shuffled_texts__network_errors_are_retried_from_the_record_reached(monkeypatch) -> None:
    from sae_stream import records
    from sae_stream.records import ShuffledTexts

    waits: list[float] = []
    monkeypatch.setattr(records.time, "sleep", waits.append)
    shards = [[{"text": f"{s}-{i}"} for i in range(10)] for s in range(3)]
    whole = list(ShuffledTexts(CountingDataset(shards), "text", seed=2, buffer_size=4, where="test"))

    def read(error: Exception, times: int, retries: int) -> tuple[list[str], list[str]]:
        flaky = FlakyShards(shards, error, {"text": "1-6", "times": times})
        return list(ShuffledTexts(flaky, "text", seed=2, buffer_size=4, where="test", retries=retries)), flaky.texts()

    with pytest.warns(UserWarning, match=r"test failed \(connection reset\): retry 1 of 3 in 2 s, from record 6"):
        got, read_log = read(ConnectionResetError("connection reset"), times=2, retries=3)
    assert got == whole and waits == [2.0, 4.0]
    others = [t for t in read_log if not t.startswith("1-")]  # reopened where it was: only that shard read again
    assert sorted(others) == sorted(t for t in whole if not t.startswith("1-"))
    with pytest.raises(ValueError, match=r"cannot read test \(after 2 retries\): connection reset"), \
            pytest.warns(UserWarning):
        read(ConnectionResetError("connection reset"), times=3, retries=2)
    with pytest.raises(ValueError, match="cannot read test: bad json"):  # a malformed record is no network fault
        read(ValueError("bad json"), times=1, retries=5)
    import httpx
    from huggingface_hub.utils import httpx as hub_httpx  # (httpx2 under huggingface_hub 2.x: what the Hub raises)

    for client in (hub_httpx, httpx):  # their request errors are not OSErrors
        with pytest.warns(UserWarning, match="retry 1 of 1"):
            assert read(client.ReadTimeout("read timed out"), times=1, retries=1)[0] == whole


def test_token_contexts__stream_state_from_the_old_reader_or_other_files_refused(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i} " * 9}) + "\n" for i in range(50)))
    cfg = byte_cfg(source=str(path), context_len=16, loop=True)
    state = TokenContexts(cfg).state_dict()
    old = {**state, "replay": {**{k: v for k, v in state["replay"].items() if k != "source"}, "records": 12}}
    with pytest.raises(ValueError, match="before session 8, whose record order .* differs"):
        TokenContexts(cfg).load_state_dict(old)
    with path.open("a") as f:  # the files changed since the state was saved: its positions mean nothing now
        f.write(json.dumps({"text": "one more"}) + "\n")
    with pytest.raises(ValueError, match="files of data.source .* changed .*: resume with the same files"):
        TokenContexts(cfg).load_state_dict(state)
    embedded = TokenContexts(byte_cfg(loop=True))  # the embedded corpus's order did not change: still loads
    state = embedded.state_dict()
    embedded.load_state_dict({**state, "replay": {**{k: v for k, v in state["replay"].items() if k != "source"},
                                                  "records": 0}})
    embedded.load_state_dict({k: v for k, v in state.items() if k != "replay"})  # (before session 7, seed 0)


def test_token_contexts__loaded_state_is_saved_again_as_loaded_and_old_seeded_states_refused(txt_dir) -> None:
    cfg = byte_cfg(source=str(txt_dir), context_len=16, loop=True, seed=5)
    early, late = TokenContexts(cfg), TokenContexts(cfg)
    take(early, 10)
    take(late, 150)
    reference = take(TokenContexts(cfg), 31)[-1]
    late.load_state_dict(early.state_dict())  # an object that ran further is put back...
    again = TokenContexts(cfg)
    again.load_state_dict(late.state_dict())  # ...and saved before it iterates: the loaded position, not its own
    assert torch.equal(take(again, 21)[-1], reference)
    old = {k: v for k, v in early.state_dict().items() if k != "replay"}  # written before session 7
    with pytest.raises(ValueError, match="data.seed=5 differ.*resume with that version"):
        TokenContexts(cfg).load_state_dict(old)
    with pytest.raises(ValueError, match="before session 8, whose record order"):  # seed 0: the reader changed
        TokenContexts(dataclasses.replace(cfg, seed=0)).load_state_dict({**old, "seed": 0})


def test_token_contexts__state_from_other_layout_rejected() -> None:
    state = TokenContexts(byte_cfg(), rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size=2"):
        TokenContexts(byte_cfg()).load_state_dict(state)


def test_context_batches__shapes_and_tail() -> None:
    contexts = [torch.full((5,), i) for i in range(10)]
    batches = list(context_batches(contexts, 4))
    assert [b.shape for b in batches] == [(4, 5), (4, 5)]
    assert batches[1][:, 0].tolist() == [4, 5, 6, 7]
    assert [len(b) for b in context_batches(contexts, 4, drop_last=False)] == [4, 4, 2]


def test_heldout_batches__finite_budget_and_seed_free() -> None:
    cfg = byte_cfg(heldout_fraction=0.05, loop=True)
    batches = list(heldout_batches(cfg, batch_size=8, n_tokens=64 * 20))
    assert [tuple(b.shape) for b in batches] == [(8, 64), (8, 64), (4, 64)]
    again = list(heldout_batches(dataclasses.replace(cfg, seed=99), batch_size=8, n_tokens=64 * 20))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    everything = list(heldout_batches(cfg, batch_size=8, n_tokens=10**9))  # ends with the split, never loops
    assert sum(len(b) for b in everything) == len(list(TokenContexts(byte_cfg(heldout_fraction=0.05), "heldout")))


# ---------------------------------------------------------------------------------------------- local files


def test_local_txt_dir__each_file_one_document(txt_dir) -> None:
    texts = sorted(p.read_text() for p in txt_dir.rglob("*.txt"))
    cfg = byte_cfg(source=str(txt_dir), heldout_fraction=0.2, context_len=8)
    train, held = documents_in(list(TokenContexts(cfg))), documents_in(list(TokenContexts(cfg, "heldout")))
    assert not set(train) & set(held)
    assert set(train) | set(held) <= set(texts) and len(set(train) | set(held)) >= len(texts) - 2
    assert sorted(documents_in(list(TokenContexts(byte_cfg(source=str(txt_dir / "*.txt"), heldout_fraction=0.0,
                                                           context_len=1))))) == sorted(
        p.read_text() for p in txt_dir.glob("*.txt"))


def test_local_single_txt__split_at_blank_lines(tmp_path) -> None:
    path = tmp_path / "book.txt"
    paragraphs = [f"Paragraph {i} has some words." for i in range(40)]
    path.write_text("\n\n".join(paragraphs) + "\n")
    got = documents_in(list(TokenContexts(byte_cfg(source=str(path), heldout_fraction=0.0, context_len=1))))
    assert sorted(d.strip() for d in got) == sorted(paragraphs)


def test_local_single_txt__one_document_cannot_be_split_and_the_error_says_why(tmp_path) -> None:
    path = tmp_path / "lines[v2].txt"  # glob characters in the name of an existing file: the file itself
    path.write_text("".join(f"line {i} of a file without blank lines\n" for i in range(50)))
    splits = []
    for split in ("train", "heldout"):
        try:
            splits.append(len(list(TokenContexts(byte_cfg(source=str(path), heldout_fraction=0.5, context_len=8),
                                                 split))))
        except ValueError as e:
            splits.append(str(e))
    # the whole file is one document: it lands in one split, and the other one names the cause and the fix
    (empty,) = [s for s in splits if isinstance(s, str)]
    assert re.search(r"no text in .*: each of its 1 document\(s\) fell in the other split .*blank lines", empty)


def test_local_jsonl_and_parquet__read_text_field(tmp_path, monkeypatch, capfd) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    # datasets pauses 5 s after each shuffled parquet pass (an Arrow thread-shutdown workaround); skip it here
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)

    bodies = [f"record {i} body text" for i in range(30)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": b}) + "\n" for i, b in enumerate(bodies)))
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": bodies}), parquet)
    for path in (jsonl, parquet):
        cfg = byte_cfg(source=str(path), text_field="body", heldout_fraction=0.0, context_len=1)
        assert sorted(documents_in(list(TokenContexts(cfg)))) == sorted(bodies)
    with pytest.raises(ValueError, match="no column 'text'.*data.text_field"):
        next(iter(TokenContexts(byte_cfg(source=str(jsonl)))))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": not json\n')
    capfd.readouterr()
    with pytest.raises(ValueError, match=r"cannot read data.source '.*broken.jsonl' \(train split\): JSON parse"):
        list(TokenContexts(byte_cfg(source=str(broken), heldout_fraction=0.0, context_len=1)))
    assert "Failed to load JSON" not in capfd.readouterr().err  # (the one-line error says it; datasets' log did too)


def test_local_source__empty_corpus_is_an_error(tmp_path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no text in"):
        TokenContexts(byte_cfg(source=str(tmp_path)))
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": ""}\n{"text": "   "}\n')
    with pytest.raises(ValueError, match="no text in"):
        next(iter(TokenContexts(byte_cfg(source=str(blank)))))


def test_local_source__missing_path_is_an_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        TokenContexts(byte_cfg(source=str(tmp_path / "nope.txt")))
    with pytest.raises(ValueError, match="holds no"):
        TokenContexts(byte_cfg(source=str(tmp_path / "*.jsonl")))


def test_local_source__text_that_is_not_utf8_is_named_with_the_fix(tmp_path) -> None:
    (tmp_path / "latin1.txt").write_bytes("café au lait, olé\n\nsecond paragraph\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"^cannot read data.source .*latin1.txt.*'utf-8' codec can't decode.*"
                                         r": the text must be UTF-8 \(convert it"):
        next(iter(TokenContexts(byte_cfg(source=str(tmp_path / "latin1.txt"), heldout_fraction=0.0))))


# ---------------------------------------------------------------------------------------------- Hugging Face


def test_hf_source__offline_fails_fast_with_hint(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="could not reach.*--data.source=embedded") as err:
        TokenContexts(DataConfig(source="Skylion007/openwebtext"))
    assert time.perf_counter() - start < 5.0 and "\n" not in str(err.value)


def test_hub_unreachable_reason__bounded_when_connect_hangs(monkeypatch) -> None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    class _Hung:
        def close(self) -> None:
            pass

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: time.sleep(3) or _Hung())
    start = time.perf_counter()
    assert "no answer from huggingface.co:443" in data.hub_unreachable_reason(timeout_s=0.2)
    assert time.perf_counter() - start < 1.5

    def refuse(*a, **k):
        raise ConnectionRefusedError("refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert "no connection" in data.hub_unreachable_reason(timeout_s=0.2)
    # the proxy is what is tried (a bare host:port means http), unless NO_PROXY exempts the hub
    tried = []
    monkeypatch.setattr(socket, "create_connection", lambda addr, **k: tried.append(addr) or _Hung())
    monkeypatch.setenv("HTTPS_PROXY", "proxy.corp:3128")
    assert data.hub_unreachable_reason(timeout_s=0.2) is None and tried[-1] == ("proxy.corp", 3128)
    monkeypatch.setenv("NO_PROXY", "localhost,.huggingface.co")
    assert data.hub_unreachable_reason(timeout_s=0.2) is None and tried[-1] == ("huggingface.co", 443)


def test_hf_source__streams_the_revision_asked_for_and_names_it_when_it_fails(tmp_path, monkeypatch) -> None:
    """data.hf_revision reaches `datasets.load_dataset` (a sha pins what a run and its resume read); a revision the
    Hub cannot open is named in the one-line error. The Hub is stood in for by a local jsonl of the same records."""
    import datasets

    path = tmp_path / "shard.jsonl"
    path.write_text("".join(json.dumps({"text": f"record {i} " * 20}) + "\n" for i in range(40)))
    asked, real = [], datasets.load_dataset

    def load_dataset(name, subset=None, *, split, streaming, revision=None):
        asked.append((name, subset, split, revision))
        if revision == "no-such-tag":
            raise FileNotFoundError(f"Revision '{revision}' doesn't exist for dataset '{name}'\nmore detail")
        return real("json", data_files=str(path), split="train", streaming=True)

    monkeypatch.setattr(data, "hub_unreachable_reason", lambda *a, **k: None)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = byte_cfg(source="someone/corpus", hf_subset="en", hf_revision="0123abcd", heldout_fraction=0.0)
    got = take(TokenContexts(cfg), 3)
    assert len(got) == 3 and asked == [("someone/corpus", "en", "train", "0123abcd")]
    assert re.match(rb"(record \d+ )+", bytes(got[0].tolist()))  # the stood-in Hub's records, tokenized
    with pytest.raises(ValueError, match=r"^could not open HF dataset 'someone/corpus' \(subset 'en', split "
                                         r"'train', revision 'no-such-tag'\): Revision 'no-such-tag' doesn't exist"):
        next(iter(TokenContexts(dataclasses.replace(cfg, hf_revision="no-such-tag"))))
