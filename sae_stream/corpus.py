"""The embedded corpus: English prose shipped with every Python, so that the default run and the tests need no
download. `pydoc_data.topics` (the interactive help's topics) plus the standard library's docstrings, read with
`ast` (nothing imported): ~0.6M GPT-2 tokens. Tokenized once per tokenizer and cached in memory and on disk
(`~/.cache/sae-stream`, keyed by Python build, recipe version and tokenizer). Documents are held out by a stable
hash of their text (`heldout_key`), so every run splits them alike.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import os
import platform
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import torch

from sae_stream.checkpoint import atomic_torch_save
from sae_stream.tokenizer import get_tokenizer

_EMBEDDED_RECIPE = 1  # bump when the embedded corpus recipe changes: invalidates disk caches
_STDLIB_SKIP = {"site-packages", "dist-packages", "idlelib", "lib2to3", "turtledemo", "ensurepip", "encodings",
                "pydoc_data", "__pycache__", "__phello__"}
_DEF_NODES = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


@lru_cache(maxsize=1)
def embedded_documents() -> tuple[str, ...]:
    """The embedded corpus documents: pydoc topics (sorted by name), then stdlib docstrings (see below)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package pydoc_data separately
        topics = {}
    docs = tuple(d for d in [topics[name].strip() for name in sorted(topics)] + _stdlib_docstrings() if d)
    if not docs:
        raise ValueError("no text in the embedded corpus: this Python ships neither pydoc_data nor stdlib sources; "
                         "set data.source to a local file or a HF dataset")
    return docs


def _stdlib_docstrings() -> list[str]:
    """Stdlib docstrings read with `ast` (tests and vendored code skipped), sorted by file path.

    Each module docstring is a document, and so is each top-level class or function with the docstrings
    nested in it: units small enough that the hash held-out split gets close to its fraction of tokens.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP and not d.startswith(("test", ".")))
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("test"):
                continue
            try:
                tree = ast.parse(Path(dirpath, name).read_bytes())
            except (SyntaxError, ValueError, OSError):
                continue
            docs.append(ast.get_docstring(tree) or "")
            docs.extend(_nested_docstrings(node) for node in tree.body if isinstance(node, _DEF_NODES))
    return docs


def _nested_docstrings(node: ast.AST) -> str:
    return "\n\n".join(doc for n in ast.walk(node) if isinstance(n, _DEF_NODES) and (doc := ast.get_docstring(n)))


class EmbeddedCorpus(NamedTuple):
    tokens_N: torch.Tensor  # int32, every document followed by eot
    doc_lens_D: torch.Tensor  # int64, tokens per document including its eot
    doc_hash_D: torch.Tensor  # float64 in [0, 1): the document's held-out key


@lru_cache(maxsize=2)
def embedded_corpus(tokenizer_name: str) -> EmbeddedCorpus:
    """The tokenized embedded corpus, read from the disk cache when present (built and cached otherwise)."""
    path = embedded_cache_path(tokenizer_name)
    try:
        raw = torch.load(path, weights_only=True)
        return EmbeddedCorpus(raw["tokens_N"], raw["doc_lens_D"], raw["doc_hash_D"])
    except Exception:  # missing, stale or truncated cache: rebuild it
        pass
    docs = embedded_documents()
    tok = get_tokenizer(tokenizer_name)
    ids = [d + [tok.eot] for d in tok.encode_batch(docs)]
    corpus = EmbeddedCorpus(torch.tensor(list(itertools.chain.from_iterable(ids)), dtype=torch.int32),
                            torch.tensor([len(d) for d in ids], dtype=torch.int64),
                            torch.tensor([heldout_key(d) for d in docs], dtype=torch.float64))
    try:
        atomic_torch_save(path, corpus._asdict())
    except OSError:
        pass  # a read-only home only costs the rebuild next time
    return corpus


def embedded_cache_path(tokenizer_name: str) -> Path:
    """~/.cache/sae-stream (or $SAE_STREAM_CACHE) / embedded corpus keyed by Python build and tokenizer (an HF
    tokenizer by its vocabulary's hash)."""
    base = os.environ.get("SAE_STREAM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "sae-stream"
    stdlib = hashlib.sha1(sysconfig.get_paths()["stdlib"].encode()).hexdigest()[:8]
    name = f"embedded-v{_EMBEDDED_RECIPE}-{platform.python_implementation()}{platform.python_version()}-{stdlib}"
    return Path(base).expanduser() / f"{name}-{get_tokenizer(tokenizer_name).cache_key()}.pt"


def heldout_key(text: str | bytes) -> float:
    """A stable value in [0, 1) per document (its text, or the bytes of its pre-tokenized ids): documents with key <
    heldout_fraction are held out."""
    data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha1(data).digest()[:8], "big") / 2.0**64


def corpus_summary(tokenizer_name: str = "gpt2", heldout_fraction: float = 0.05) -> dict[str, Any]:
    """Size of the embedded corpus split (for `sae-stream` info output and the README)."""
    corpus = embedded_corpus(tokenizer_name)
    held = corpus.doc_hash_D < heldout_fraction
    return {"python": sys.version.split()[0], "tokenizer": tokenizer_name, "documents": len(corpus.doc_lens_D),
            "train_tokens": int(corpus.doc_lens_D[~held].sum()), "heldout_tokens": int(corpus.doc_lens_D[held].sum()),
            "heldout_documents": int(held.sum())}
