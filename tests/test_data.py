"""Text sources -> token contexts: embedded corpus, local files, HF offline failure, sharding, epochs, batching.
(Resuming a stream and the record reader behind it: test_data_resume.py; `txt_dir` is in _data_helpers.py.)"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import time

import pytest
import torch

from sae_stream import corpus, data
from sae_stream.checkpoint import load_checkpoint, save_checkpoint
from sae_stream.config import DataConfig, config_from_dict
from sae_stream.corpus import heldout_key
from sae_stream.data import TokenContexts, context_batches, heldout_batches
from tests._data_helpers import byte_cfg, take

EOT = 256  # the byte tokenizer's end-of-text id


def documents_in(contexts: list[torch.Tensor]) -> list[str]:
    """The complete documents in one epoch's contexts (the tail after the last eot was cut off, so dropped)."""
    tokens = torch.cat(contexts).tolist()
    docs, start = [], 0
    for i, t in enumerate(tokens):
        if t == EOT:
            docs.append(bytes(tokens[start:i]).decode("utf-8"))
            start = i + 1
    return docs


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


@pytest.mark.filterwarnings("ignore:data.*exhausted")
def test_pretokenized_column__records_join_as_they_are_split_and_resume(tmp_path, monkeypatch) -> None:
    """A column of token ids is used as it is: records of context_len ids stay whole, no end-of-text is added, the
    held-out split partitions the records by hash, a resume replays exactly; ids the tokenizer lacks are refused."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    g = torch.Generator().manual_seed(0)
    records = [torch.randint(0, 256, (16,), generator=g).tolist() for _ in range(40)]
    jsonl = tmp_path / "ids.jsonl"
    jsonl.write_text("".join(json.dumps({"input_ids": r, "text": "unused"}) + "\n" for r in records))
    parquet = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"input_ids": records}), parquet)
    whole = sorted(records)
    for path in (jsonl, parquet):
        cfg = byte_cfg(source=str(path), text_field="input_ids", context_len=16, heldout_fraction=0.0)
        assert sorted(c.tolist() for c in TokenContexts(cfg)) == whole
    cfg = byte_cfg(source=str(jsonl), text_field="input_ids", context_len=16, heldout_fraction=0.3)
    train = [c.tolist() for c in TokenContexts(cfg)]
    held = [c.tolist() for c in TokenContexts(cfg, split="heldout")]
    assert sorted(train + held) == whole and 0 < len(held) < len(train)
    monkeypatch.setattr("sae_stream.records.ENCODE_DOCS", 4)  # chunks of 4: a resume mid-epoch, ids in the buffer
    contexts = TokenContexts(dataclasses.replace(cfg, shuffle_buffer=4))
    take(contexts, 9)
    buffer = contexts.state_dict()["replay"]["source"]["buffer"]
    assert len(buffer) == 4 and all(isinstance(b, torch.Tensor) and b.dtype == torch.int32 for b in buffer)
    saved = save_checkpoint(tmp_path / "ckpt", 1, {"data": contexts.state_dict()})  # (and back, memory-mapped)
    again = TokenContexts(dataclasses.replace(cfg, shuffle_buffer=4))
    again.load_state_dict(load_checkpoint(saved)["data"])
    assert [c.tolist() for c in take(again, 6)] == [c.tolist() for c in take(contexts, 6)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input_ids": [1, 2, 300]}) + "\n")
    with pytest.raises(ValueError, match=r"token id 300 in column 'input_ids' is outside the 'byte' tokenizer"):
        next(iter(TokenContexts(byte_cfg(source=str(bad), text_field="input_ids", heldout_fraction=0.0,
                                         context_len=2))))
    for i, (ids, needle) in enumerate((([0.5, 1.5], "holds neither text nor a list of token ids"),
                                       ([[1, 2], [3]], "holds neither text nor a list of token ids"),
                                       ([2**32 + 5], r"token id 4294967301 in column 'input_ids' is no id"))):
        odd = tmp_path / f"odd{i}.jsonl"
        odd.write_text(json.dumps({"input_ids": ids}) + "\n")
        with pytest.raises(ValueError, match=needle):
            next(iter(TokenContexts(byte_cfg(source=str(odd), text_field="input_ids", heldout_fraction=0.0))))


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


def test_pin_hf_revision__resolves_a_hf_source_to_its_commit_and_leaves_the_rest(monkeypatch) -> None:
    import huggingface_hub

    sha = "0123456789abcdef0123456789abcdef01234567"
    asked = []

    def dataset_info(self, repo_id, *, revision=None, timeout=None):
        asked.append((repo_id, revision))
        if repo_id == "gone/corpus":
            raise FileNotFoundError("404")
        return type("Info", (), {"sha": sha})()

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(data, "hub_unreachable_reason", lambda *a, **k: None)
    cfg = config_from_dict({"data": {"source": "someone/corpus"}})
    assert data.pin_hf_revision(cfg).data.hf_revision == sha and asked == [("someone/corpus", None)]
    tagged = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, hf_revision="v1.0"))
    assert data.pin_hf_revision(tagged).data.hf_revision == sha and asked[-1] == ("someone/corpus", "v1.0")
    asked.clear()
    pinned = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, hf_revision=sha))
    for same in (pinned, config_from_dict({"data": {"source": "embedded"}})):
        assert data.pin_hf_revision(same) is same
    gone = config_from_dict({"data": {"source": "gone/corpus"}})
    assert data.pin_hf_revision(gone) is gone  # (opening it names the problem)
    assert asked == [("gone/corpus", None)]  # a sha and the embedded corpus ask nothing
    monkeypatch.setattr(data, "hub_unreachable_reason", lambda *a, **k: "offline")
    assert data.pin_hf_revision(cfg) is cfg


@pytest.mark.filterwarnings("ignore:data.*exhausted")
def test_hf_tokenizer__a_changed_directory_or_another_tokenizers_ids_are_refused(tmp_path, txt_dir) -> None:
    """A data state names its hf: tokenizer's ids (a directory's files may change under its name): a resume on
    other ids is refused; so is a `sae-stream tokenize` output read with another tokenizer than its manifest's."""
    from sae_stream import tokenizer as tokmod
    from tests._data_helpers import make_hf_tokenizer

    spec = make_hf_tokenizer(tmp_path / "tok")
    cfg = DataConfig(source=str(txt_dir), tokenizer=spec, context_len=16, loop=False, shuffle_buffer=8)
    contexts = TokenContexts(cfg)
    take(contexts, 3)
    state = contexts.state_dict()
    make_hf_tokenizer(tmp_path / "tok", vocab_size=280)  # the same directory, other files
    tokmod._hf_tokenizer.cache_clear()  # (a resume is a new process)
    with pytest.raises(ValueError, match="data state was saved with tokenizer_ids="):
        TokenContexts(cfg).load_state_dict(state)
    ids = tmp_path / "ids"
    ids.mkdir()
    (ids / "part-0.jsonl").write_text(json.dumps({"input_ids": [1, 2, 3, 4]}) + "\n")
    (ids / data.TOKENIZED_MANIFEST).write_text("tokenizer: gpt2\n")
    with pytest.raises(ValueError, match=r"holds ids of the 'gpt2' tokenizer \(tokenized.yaml\), not of "
                                         r"data.tokenizer='byte': set --data.tokenizer=gpt2"):
        next(iter(TokenContexts(byte_cfg(source=str(ids), text_field="input_ids", context_len=2))))
