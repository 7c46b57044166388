"""`sae-stream tokenize`: text -> parquet shards of token ids that training reads as it reads the text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from sae_stream.cli import main
from sae_stream.config import DataConfig
from sae_stream.data import TokenContexts
from sae_stream.tokenizer import get_tokenizer

WORDS = "the cat sat on a mat while seven quiet engineers measured buffers and dictionaries at night".split()


def _texts(n: int) -> list[str]:
    """n documents of varied length, one with non-ASCII text and one a bare '<|endoftext|>' string (plain text)."""
    g = torch.Generator().manual_seed(0)
    docs = []
    for i in range(n):
        words = [WORDS[j] for j in torch.randint(len(WORDS), (int(torch.randint(5, 200, (1,), generator=g)),),
                                                 generator=g).tolist()]
        docs.append(" ".join(words) + (" café ünïcode" if i == 3 else ""))
    docs[7] = "plain <|endoftext|> text"
    return docs


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, list[str]]:
    texts = _texts(150)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path, texts


def _tokenize(src: Path, out: Path, *extra: str) -> int:
    return main(["tokenize", f"--data.source={src}", "--out", str(out), *extra])


def _records(out: Path) -> list[list[int]]:
    import pyarrow.parquet as pq

    return [r for f in sorted(out.glob("part-*.parquet")) for r in pq.read_table(f).column("input_ids").to_pylist()]


def test_tokenize__each_document_once_as_the_text_reader_joins_it(source, tmp_path: Path) -> None:
    src, texts = source
    out = tmp_path / "ids"
    assert _tokenize(src, out, "--shard-tokens", "3000") == 0
    tok = get_tokenizer("gpt2")
    want = [tok.encode(t) + [tok.eot] for t in texts]
    got = _records(out)
    assert got == want  # (read in order: one file, no shuffle)
    manifest = yaml.safe_load((out / "tokenized.yaml").read_text())
    files = sorted(p.name for p in out.glob("part-*.parquet"))
    assert manifest["files"] == files and len(files) > 3
    assert manifest["documents"] == len(texts) and manifest["tokens"] == sum(map(len, want))
    assert (manifest["text_field"], manifest["tokenizer"], manifest["source"]) == ("input_ids", "gpt2", str(src))
    import pyarrow.parquet as pq

    sizes = [sum(map(len, pq.read_table(out / f).column("input_ids").to_pylist())) for f in files]
    longest = max(map(len, want))
    assert all(3000 <= n < 3000 + longest for n in sizes[:-1]) and 0 < sizes[-1] < 3000 + longest


def test_tokenize__training_reads_the_same_contexts_from_the_ids(source, tmp_path: Path) -> None:
    """In one file read in order (shuffle buffer 1), the ids give the text's contexts exactly; in many files (read
    in a shuffled order) the same number of contexts with the same tokens, up to the epoch's dropped tail."""
    src, _ = source
    common = dict(tokenizer="gpt2", context_len=32, heldout_fraction=0.0, loop=False)

    def contexts(source: Path, shuffle_buffer: int, **kw) -> torch.Tensor:
        cfg = DataConfig(source=str(source), shuffle_buffer=shuffle_buffer, **common, **kw)
        with pytest.warns(UserWarning, match="exhausted"):
            return torch.stack(list(TokenContexts(cfg)))

    assert _tokenize(src, tmp_path / "one") == 0 and len(list((tmp_path / "one").glob("*.parquet"))) == 1
    text = contexts(src, 1)
    assert torch.equal(contexts(tmp_path / "one", 1, text_field="input_ids"), text)
    assert _tokenize(src, tmp_path / "many", "--shard-tokens", "2000") == 0
    ids = contexts(tmp_path / "many", 16, text_field="input_ids")
    assert ids.shape == text.shape and not torch.equal(ids, text)
    counts = [torch.bincount(c.flatten(), minlength=50257) for c in (text, ids)]
    assert 0 < (counts[0] - counts[1]).abs().sum() <= 2 * 31


def test_tokenize__bad_input_is_one_line_and_leaves_everything_as_it_was(source, tmp_path: Path, capsys) -> None:
    src, _ = source
    keep = tmp_path / "a-run"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    done = tmp_path / "ids"
    assert _tokenize(src, done) == 0
    before = sorted(p.name for p in done.iterdir())
    capsys.readouterr()
    broken = tmp_path / "broken.jsonl"
    broken.write_text(src.read_text() + "{not json\n")
    cases = [(["tokenize", "--out", str(tmp_path / "e")], "data.source=embedded is tokenized already"),
             (["tokenize", f"--data.source={tmp_path / 'none.jsonl'}", "--out", str(tmp_path / "e")], "does not exist"),
             (["tokenize", f"--data.source={src}", "--out", str(tmp_path / "e"), "--shard-tokens", "0"],
              "--shard-tokens 0"),
             (["tokenize", f"--data.source={src}", "--out", str(done)], "exists: pass --overwrite"),
             (["tokenize", f"--data.source={src}", "--out", str(keep), "--overwrite"], "no tokenized.yaml"),
             (["tokenize", f"--data.source={broken}", "--out", str(done), "--overwrite"], "cannot read")]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "e").exists() and (keep / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in done.iterdir()) == before  # (the failed --overwrite put the old output back)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert main(["tokenize", f"--data.source={src}", "--out", str(done), "--overwrite", "--shard-tokens", "999"]) == 0
    assert len(list(done.glob("part-*.parquet"))) > len(before) - 1


def _stopping_after(monkeypatch: pytest.MonkeyPatch, chunks: int, stop) -> None:
    """The reader's doc_chunks calls `stop()` after yielding `chunks` chunks (a signal, or an error as a kill)."""
    from sae_stream.records import StreamSource

    original = StreamSource.doc_chunks

    def doc_chunks(self, seed, start=None):
        for i, item in enumerate(original(self, seed, start)):
            yield item
            if i + 1 == chunks:
                stop()
    monkeypatch.setattr(StreamSource, "doc_chunks", doc_chunks)


@pytest.mark.parametrize("how", ["sigint", "sigterm", "killed"])
def test_tokenize__interrupted_then_resumed_writes_what_one_run_writes(source, tmp_path: Path, capsys,
                                                                       monkeypatch: pytest.MonkeyPatch, how) -> None:
    """A signal finishes the chunk being read, closes the file early and saves the progress; a kill (here: an error
    after two files) leaves the file being written half done. Either way training refuses the directory, and
    --resume gives the records (in order) and counts of an uninterrupted run, in the same files after a kill (one
    more, the early-closed one, after a signal); progress file and lock removed."""
    import signal

    src, _ = source
    whole = tmp_path / "whole"
    assert _tokenize(src, whole, "--shard-tokens", "2500") == 0
    out = tmp_path / "cut"
    signum = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM}.get(how)
    with monkeypatch.context() as m:
        if signum is not None:
            _stopping_after(m, 1, lambda: signal.raise_signal(signum))
        else:
            def kill():
                raise ValueError("simulated kill")
            _stopping_after(m, 2, kill)
        capsys.readouterr()
        code = _tokenize(src, out, "--shard-tokens", "2500")
    err = capsys.readouterr().err
    assert code == (128 + signum if signum else 2), err
    if signum is not None:
        assert f"continue with: sae-stream tokenize --resume {out}" in err
    assert (out / "tokenize.progress.pt").is_file() and not (out / "tokenized.yaml").exists()
    cut_files = sorted(p.name for p in out.glob("part-*.parquet"))
    assert 0 < len(cut_files) < len(list(whole.glob("part-*.parquet")))
    from sae_stream.data import local_files
    with pytest.raises(ValueError, match="unfinished `sae-stream tokenize` output: finish it with"):
        local_files(str(out))
    assert main(["tokenize", "--resume", str(out)]) == 0
    names = [sorted(p.name for p in d.iterdir()) for d in (out, whole)]
    assert names[0] == names[1] if signum is None else names[0][:-2] == names[1][:-1]  # (+ tokenized.yaml)
    assert _records(out) == _records(whole)
    a, b = (yaml.safe_load((d / "tokenized.yaml").read_text()) for d in (out, whole))
    for key in ("documents", "tokens", "source", "shard_tokens"):
        assert a[key] == b[key], key
    assert len(a["files"]) == len(b["files"]) + (signum is not None)


def test_tokenize__resume_errors_are_one_line(source, tmp_path: Path, capsys) -> None:
    src, _ = source
    done = tmp_path / "ids"
    assert _tokenize(src, done) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    cases = [(["tokenize", "--resume", str(done)], "that tokenize finished"),
             (["tokenize", "--resume", str(empty)], "no tokenize.progress.pt there"),
             (["tokenize", "--resume", str(done), "--shard-tokens", "5"], "drop --shard-tokens"),
             (["tokenize", "--resume", str(done), f"--data.source={src}"], "drop overrides")]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
