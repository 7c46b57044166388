"""Resuming a token stream: TokenContexts.state_dict replays to the exact context (across epochs, shards and files)
by re-reading one chunk of the shard it stopped in, not the epoch; the record reader under it (ShuffledTexts,
ShardTree) resumes between any two texts and retries network faults from the record reached; states saved by an
older reader, for other files or another layout are refused. (Sources and stream properties: test_data.py.)"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import pytest
import torch

from sae_stream import records
from sae_stream.data import TokenContexts
from tests._data_helpers import byte_cfg, take


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


# ---------------------------------------------------------------------------------------------- record reader


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


# ---------------------------------------------------------------------------------------------- refused states


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
