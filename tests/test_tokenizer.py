"""GPT-2 BPE built offline from the shipped ranks, and the byte tokenizer."""

from __future__ import annotations

import time

import pytest
import torch

from sae_stream import tokenizer as tokmod
from sae_stream.tokenizer import get_tokenizer

UNICODE_TEXT = "Grüße, naïve café — 漢字とかな 🙂\n\n\tindented  double  spaces\r\nit's we've they'll I'd\n"


def test_gpt2__reference_ids() -> None:
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("hello world") == [31373, 995]
    assert tok.eot == 50256 and tok.n_vocab == 50257
    assert tok.decode([15496, 995, tok.eot]) == "Hello world<|endoftext|>"


def test_gpt2__unicode_round_trip() -> None:
    tok = get_tokenizer("gpt2")
    ids = tok.encode(UNICODE_TEXT)
    assert tok.decode(ids) == UNICODE_TEXT
    assert tok.decode(torch.tensor(ids)) == UNICODE_TEXT
    assert all(0 <= i < tok.eot for i in ids)
    # the split pattern keeps contractions as their own pieces: "'s" is GPT-2 token 338
    assert tok.encode("it's")[-1] == 338


def test_gpt2__endoftext_in_text_is_plain_text() -> None:
    tok = get_tokenizer("gpt2")
    ids = tok.encode("a<|endoftext|>b")
    assert tok.eot not in ids
    assert tok.decode(ids) == "a<|endoftext|>b"


def test_gpt2__batch_matches_single() -> None:
    tok = get_tokenizer("gpt2")
    texts = ["Hello world", UNICODE_TEXT, ""]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_gpt2__decode_tokens_joins_to_decode() -> None:
    tok = get_tokenizer("gpt2")
    ids = tok.encode("The quick brown fox.")
    pieces = tok.decode_tokens(ids)
    assert len(pieces) == len(ids) and "".join(pieces) == "The quick brown fox."


def test_gpt2__encoding_is_cached_and_fast() -> None:
    start = time.perf_counter()
    a, b = get_tokenizer("gpt2"), get_tokenizer("gpt2")
    assert a.encoding is b.encoding
    assert time.perf_counter() - start < 0.5


def test_gpt2__corrupted_ranks_file_is_rejected(tmp_path, monkeypatch) -> None:
    data = bytearray(tokmod.GPT2_RANKS_PATH.read_bytes())
    data[10] ^= 1
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(tokmod, "GPT2_RANKS_PATH", bad)
    with pytest.raises(ValueError, match="corrupted") as err:
        get_tokenizer("gpt2")
    assert "\n" not in str(err.value) and "sha256" in str(err.value)


def test_byte__round_trip_and_eot() -> None:
    tok = get_tokenizer("byte")
    ids = tok.encode(UNICODE_TEXT)
    assert ids == list(UNICODE_TEXT.encode("utf-8"))
    assert tok.decode(ids) == UNICODE_TEXT
    assert (tok.eot, tok.n_vocab) == (256, 257)
    assert tok.decode(tok.encode("ab") + [tok.eot] + tok.encode("é")) == "ab<|endoftext|>é"


def test_get_tokenizer__unknown_name_lists_valid() -> None:
    with pytest.raises(ValueError, match="unknown tokenizer .gpt3.*gpt2, byte or hf:NAME_OR_DIR"):
        get_tokenizer("gpt3")


def test_hf__a_hugging_face_tokenizer_encodes_plain_text_and_ends_documents_with_its_eos(hf_tokenizer,
                                                                                       tmp_path) -> None:
    """`hf:DIR`: encode / decode round trip, batches as singles, '<|endoftext|>' in a text stays text (as gpt2
    does), eot is its eos, n_vocab its size; cache files keyed by the vocabulary, not the directory's name."""
    from tests._data_helpers import make_hf_tokenizer

    tok = get_tokenizer(hf_tokenizer)
    text = "the cat sat on the mat, returns é<|endoftext|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.eot == 0 and 0 not in ids and tok.n_vocab == 300
    assert tok.encode_batch([text, "value"]) == [ids, tok.encode("value")]
    assert "".join(tok.decode_tokens(tok.encode("the mat"))) == "the mat" and tok.convert_ids_to_tokens(ids[0]) == "the"
    assert tok.cache_key() == get_tokenizer(make_hf_tokenizer(tmp_path / "same")).cache_key()
    assert tok.cache_key() != get_tokenizer(make_hf_tokenizer(tmp_path / "other", 280)).cache_key()
    with pytest.raises(ValueError, match=r"data.tokenizer='hf:/no/such/dir': cannot load that Hugging Face "
                                         r"tokenizer \(.*\): it is not in the Hub cache and the Hub is unreachable"):
        get_tokenizer("hf:/no/such/dir")


def test_hf__saved_truncation_ignored_ids_keyed_by_eos_and_relative_dirs_made_absolute(tmp_path, monkeypatch) -> None:
    """A tokenizer.json saved with a truncation length must not cut documents; the cache key (what data states and
    cache files compare) changes with the end-of-text token though tokenizer.json does not; a relative hf:DIR is
    stored absolute, and one directory named two ways is the same tokenizer."""
    from sae_stream.config import DataConfig
    from tests._data_helpers import make_hf_tokenizer

    cut = get_tokenizer(make_hf_tokenizer(tmp_path / "cut", truncate=16))
    assert len(cut.encode("the cat " * 50)) > 16
    a = get_tokenizer(make_hf_tokenizer(tmp_path / "a"))
    b = get_tokenizer(make_hf_tokenizer(tmp_path / "b", eos="<|eot|>"))
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    assert a.eot != b.eot and a.cache_key() != b.cache_key()
    monkeypatch.chdir(tmp_path)
    assert DataConfig(tokenizer="hf:a").tokenizer == f"hf:{tmp_path / 'a'}"
    assert tokmod.same_tokenizer("hf:a", f"hf:{tmp_path}/../{tmp_path.name}/a")
    assert not tokmod.same_tokenizer("hf:a", "hf:b") and not tokmod.same_tokenizer("gpt2", "byte")


def test_hf__gpt2_saved_as_a_hugging_face_tokenizer_gives_gpt2s_ids(tmp_path) -> None:
    """The HF path end to end on real text: GPT-2's BPE converted from the shipped ranks (save_gpt2_hf) and read
    back as hf:DIR encodes the whole embedded corpus (~0.6M tokens of prose and code) to tiktoken's ids, and
    '<|endoftext|>' inside a text as text, as gpt2 does."""
    from sae_stream.corpus import embedded_documents

    gpt2, hf = get_tokenizer("gpt2"), get_tokenizer(tokmod.save_gpt2_hf(tmp_path / "gpt2"))
    docs = [*embedded_documents(), "a <|endoftext|> b", " \n\n  naïve café 日本語 🤖\t"]
    ids = gpt2.encode_batch(docs)
    assert hf.encode_batch(docs) == ids and sum(map(len, ids)) > 500_000
    assert (hf.eot, hf.n_vocab) == (gpt2.eot, gpt2.n_vocab) and hf.decode(ids[-1]) == docs[-1]
