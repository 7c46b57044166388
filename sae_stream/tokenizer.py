"""Tokenizers: GPT-2 BPE (tiktoken, ranks shipped in `assets/`: works offline), raw bytes, and any Hugging Face
tokenizer (`hf:NAME_OR_DIR`, for LMs of other families: Pythia, gelu-1l, ...; from the Hub's cache or a directory).

    tok = get_tokenizer("gpt2")
    tok.encode("Hello world")        # [15496, 995]
    tok.decode([15496, 995, tok.eot])  # 'Hello world<|endoftext|>'

`tiktoken.get_encoding("gpt2")` downloads its files on first use, so it fails on machines without
internet; here the same `tiktoken.Encoding` is built from `assets/gpt2.tiktoken` (verified by sha256).
The 'byte' tokenizer (ids 0..255 are bytes, 256 is end-of-text) keeps tests tiny and dependency-free.
"""

from __future__ import annotations

import base64
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken

GPT2_RANKS_PATH = Path(__file__).parent / "assets" / "gpt2.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = 50256
HF_PREFIX = "hf:"

# Token ids: a list, or anything with `.tolist()` (a 1-D tensor or array); torch is not imported here.
Ids = Sequence[int] | Any


class Tokenizer(ABC):
    """Text <-> token ids. Text is encoded as plain text: '<|endoftext|>' in a document is not the eot id."""

    name: str
    eot: int
    n_vocab: int

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Ids) -> str: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as a 1-D integer array: what streams join, with no Python int per token on the way."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def cache_key(self) -> str:
        """Names the ids this tokenizer gives, in cache file names and data states: gpt2 and byte by name."""
        return self.name

    def decode_tokens(self, ids: Ids) -> list[str]:
        """Each id decoded on its own (for showing tokens one by one; split UTF-8 shows as U+FFFD)."""
        return [self.decode([i]) for i in _as_list(ids)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n_vocab={self.n_vocab}, eot={self.eot})"


class BPETokenizer(Tokenizer):
    """A tiktoken BPE encoding (GPT-2's)."""

    def __init__(self, name: str, encoding: tiktoken.Encoding, eot: int) -> None:
        self.name, self.encoding, self.eot, self.n_vocab = name, encoding, eot, encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # tiktoken releases the GIL, so its thread pool uses every core.
        return self.encoding.encode_ordinary_batch(list(texts))

    def encode_array(self, text: str) -> np.ndarray:
        # tiktoken's buffer straight into numpy (uint32), GIL released while it encodes; disallowed_special=()
        # skips the special-token check, so '<|endoftext|>' in a text is plain text as in encode_ordinary
        return self.encoding.encode_to_numpy(text, disallowed_special=())

    def decode(self, ids: Ids) -> str:
        return self.encoding.decode(_as_list(ids))


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, end-of-text 256."""

    name, eot, n_vocab = "byte", 256, 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Ids) -> str:
        out, run = [], bytearray()
        for i in _as_list(ids):
            if i == self.eot:
                out.append(run.decode("utf-8", errors="replace") + "<|endoftext|>")
                run = bytearray()
            else:
                run.append(i)
        return "".join(out) + run.decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer, `hf:NAME_OR_DIR` (a Hub name, read from its cache or downloaded, or a directory
    written by `save_pretrained`). End-of-text is its eos token (bos if it has none). Text is encoded as plain text
    as the others do: no special tokens added, none parsed out of the text."""

    def __init__(self, name: str) -> None:
        from transformers import AutoTokenizer

        from sae_stream.hub import hub_unreachable_reason

        where = name.removeprefix(HF_PREFIX)
        # offline, a Hub name must be in the cache: read it from there at once (no ~45 s of retries)
        offline = not Path(where).is_dir() and hub_unreachable_reason(offline_vars=("HF_HUB_OFFLINE",)) is not None
        try:
            self.hf = AutoTokenizer.from_pretrained(where, local_files_only=offline)
        except Exception as e:  # noqa: BLE001 - hub, file and format errors come in many types: one line
            line = next((x for x in str(e).splitlines() if x.strip()), type(e).__name__)
            fix = ("it is not in the Hub cache and the Hub is unreachable: fetch it once online, or give a "
                   "directory with its tokenizer files") if offline else ("give a Hub name (hf:EleutherAI/pythia-70m) "
                                                                          "or a directory with its tokenizer files")
            raise ValueError(f"data.tokenizer={name!r}: cannot load that Hugging Face tokenizer ({line}): {fix}"
                             ) from None
        eot = self.hf.eos_token_id if self.hf.eos_token_id is not None else self.hf.bos_token_id
        if eot is None:
            raise ValueError(f"data.tokenizer={name!r} has no eos (or bos) token to end documents with")
        vocab = self.hf.get_vocab()  # (ids may have gaps: n_vocab covers the largest)
        self.name, self.eot, self.n_vocab = name, int(eot), max(len(self.hf), max(vocab.values(), default=-1) + 1)
        backend = getattr(self.hf, "backend_tokenizer", None)
        self._backend, self._key = None, None
        if backend is not None and hasattr(backend, "encode_special_tokens"):
            from tokenizers import Tokenizer as RustTokenizer

            self._backend = RustTokenizer.from_str(backend.to_str())  # a copy: the settings below are ours
            self._backend.encode_special_tokens = True  # '<|endoftext|>' in a text stays text
            self._backend.no_truncation()  # (a tokenizer.json saved after a truncating call keeps its max_length)
            self._backend.no_padding()

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._backend is not None:  # (Rust, parallel, the GIL released; _fast: no offsets, ~1.3x)
            encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
            return [e.ids for e in encode(list(texts), add_special_tokens=False)]
        return self.hf(list(texts), add_special_tokens=False, split_special_tokens=True,
                       return_attention_mask=False)["input_ids"]

    def decode(self, ids: Ids) -> str:
        return self.hf.decode(_as_list(ids), clean_up_tokenization_spaces=False)

    def convert_ids_to_tokens(self, token_id: int) -> str:
        """The token's own string (the dashboard shows it beside the decoded text)."""
        return self.hf.convert_ids_to_tokens(token_id)

    def cache_key(self) -> str:
        """A hash of the ids it gives (a directory's files may change under its name): its vocabulary and merges,
        its end-of-text and size; computed once (data states ask at every checkpoint)."""
        if self._key is None:
            text = self._backend.to_str() if self._backend is not None else repr(
                (sorted(self.hf.get_vocab().items()), getattr(self.hf, "init_kwargs", {}).get("merges_file")))
            self._key = "hf-" + hashlib.sha256(f"{text}|eot={self.eot}|n={self.n_vocab}".encode()).hexdigest()[:16]
        return self._key


def get_tokenizer(name: str) -> Tokenizer:
    """'gpt2' (GPT-2 BPE from the shipped ranks), 'byte', or 'hf:NAME_OR_DIR' (a Hugging Face tokenizer)."""
    if name == "gpt2":
        return BPETokenizer("gpt2", gpt2_encoding(GPT2_RANKS_PATH), GPT2_EOT)
    if name == "byte":
        return ByteTokenizer()
    if name.startswith(HF_PREFIX) and len(name) > len(HF_PREFIX):
        return _hf_tokenizer(name)
    raise ValueError(f"unknown tokenizer {name!r}: valid names are gpt2, byte or hf:NAME_OR_DIR")


@lru_cache(maxsize=4)
def _hf_tokenizer(name: str) -> HFTokenizer:
    return HFTokenizer(name)


@lru_cache(maxsize=4)
def gpt2_encoding(path: Path) -> tiktoken.Encoding:
    """GPT-2's `tiktoken.Encoding` built from a local ranks file (base64 token, space, rank per line)."""
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=_gpt2_ranks(path),
                             special_tokens={"<|endoftext|>": GPT2_EOT}, explicit_n_vocab=GPT2_EOT + 1)


def _gpt2_ranks(path: Path) -> dict[bytes, int]:
    """{token bytes: rank} of a GPT-2 ranks file, its sha256 checked."""
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        raise ValueError(f"GPT-2 ranks file {str(path)!r} is corrupted (sha256 {digest[:12]}..., expected "
                         f"{GPT2_RANKS_SHA256[:12]}...): reinstall sae-stream to restore it")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def save_gpt2_hf(directory: str | Path) -> str:
    """GPT-2's BPE, from the shipped ranks, saved in `directory` as a Hugging Face fast tokenizer (offline): the
    same ids as 'gpt2' (tested), for comparing the two paths; returns its spec 'hf:DIR'.

    A BPE rank list is the merge list in order: token t of rank r is the merge of the two parts that BPE with the
    ranks below r leaves of it. Hugging Face's byte-level BPE spells bytes as printable characters (GPT-2's
    byte-to-unicode table: printable Latin-1 bytes as themselves, the other 68 as chr(256 + i) in byte order)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import PreTrainedTokenizerFast

    ranks = _gpt2_ranks(GPT2_RANKS_PATH)
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    others = iter(range(256, 512))
    char = {b: chr(b) if b in printable else chr(next(others)) for b in range(256)}
    spell = lambda bs: "".join(char[b] for b in bs)  # noqa: E731
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            parts = [token[i:i + 1] for i in range(len(token))]
            while len(parts) > 2:  # merge the lowest-ranked adjacent pair below `rank` until two parts remain
                pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
                best, i = min(pairs)
                if best >= rank:
                    raise ValueError(f"GPT-2 rank {rank} is no merge of lower ranks")
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            merges.append((spell(parts[0]), spell(parts[1])))
    vocab = {spell(t): r for t, r in ranks.items()} | {"<|endoftext|>": GPT2_EOT}
    tok = RustTokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # (GPT-2's split pattern)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(directory))
    return HF_PREFIX + str(Path(directory).resolve())


def _as_list(ids: Ids) -> list[int]:
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


def same_tokenizer(a: str, b: str) -> bool:
    """Whether two data.tokenizer specs give the same ids: the same name, or Hugging Face tokenizers (e.g. one
    directory named two ways, or a copy of it) with the same vocabulary, end-of-text and size."""
    if a == b:
        return True
    if not (a.startswith(HF_PREFIX) and b.startswith(HF_PREFIX)):
        return False
    try:
        return get_tokenizer(a).cache_key() == get_tokenizer(b).cache_key()
    except ValueError:  # one of them no longer loads: not shown to be the same
        return False
