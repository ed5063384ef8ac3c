"""Tokenisation cache: ``cache-<content>-<settings>.pt`` (int32 ids + vocabulary) in a folder wordlm owns.

The name is keyed on the SHA-256 of the three text files (so an edited file is never served from
a stale cache) and on the tokenisation settings (``min_freq``, ``max_vocab``, the tokeniser's
version). Hashing reads the text once (~1.7 GB/s), far cheaper than tokenising it. Caches made
from older contents of the same folder are deleted when a new one is written; caches for other
settings stay, so switching ``data.min_freq`` back and forth costs nothing.

The cache of a corpus folder lives in ``<cache root>/<folder name>-<hash of its path>/`` (see
:func:`wordlm.data.datasets.cache_root`), never in the corpus folder itself: wordlm writes nothing
into a user's folder. Files are written atomically and read with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import UserError
from . import fetch
from .corpus import SPLITS, Corpus
from .vocab import Vocab

log = logging.getLogger("wordlm")

FORMAT = "wordlm-corpus-cache"
VERSION = 1
TOKENIZER = "whitespace-split+eos/1"  # bump when corpus.tokenize changes what it produces


def content_key(files: dict[str, Path]) -> str:
    """SHA-256 over the split names, sizes and bytes of the text files."""
    h = hashlib.sha256()
    for split in SPLITS:
        path = files[split]
        h.update(f"{split}\0{path.stat().st_size}\0".encode())
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError as e:  # a read: not the run folder's fault
            raise UserError(f"cannot read {path}: {e.strerror or e}; make it readable (e.g. chmod a+r) or point "
                            f"data.dir elsewhere") from None
    return h.hexdigest()


def settings(min_freq: int, max_vocab: int | None) -> dict:
    return {"min_freq": int(min_freq), "max_vocab": None if max_vocab is None else int(max_vocab),
            "tokenizer": TOKENIZER}


def settings_key(s: dict) -> str:
    return hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()


def cache_name(content: str, setting: str) -> str:
    return f"cache-{content[:16]}-{setting[:8]}.pt"


def writable(folder: Path, create: bool = False) -> bool:
    if create:
        with contextlib.suppress(OSError):
            folder.mkdir(parents=True, exist_ok=True)
    return fetch.writable_dir(folder)


def load(path: Path, content: str, setting: dict) -> Corpus | None:
    """The cached Corpus at ``path``, or None when it is missing, unreadable or not for this content/settings."""
    if not path.is_file():
        return None
    try:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not mmap-able (e.g. an old serialisation format): plain read
            blob = torch.load(path, map_location="cpu", weights_only=True)
        ok = (isinstance(blob, dict) and blob.get("format") == FORMAT and blob.get("version") == VERSION
              and blob.get("content") == content and blob.get("settings") == setting)
        if not ok:
            log.info("tokenisation cache %s does not match the text or settings: rebuilding it", path.name)
            return None
        tensors = [blob[s] for s in SPLITS]
        if not all(isinstance(t, torch.Tensor) and t.dim() == 1 and t.dtype == torch.int32 for t in tensors):
            raise ValueError("malformed id tensors")
        return Corpus(Vocab(blob["vocab"]), *tensors)
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign cache is never fatal: tokenise again
        log.warning("tokenisation cache %s is unreadable (%s): rebuilding it", path, str(e).splitlines()[0][:200])
        return None


def save(path: Path, corpus: Corpus, content: str, setting: dict) -> bool:
    """Write atomically (temp file + rename); failure to write only costs a warning."""
    blob = {"format": FORMAT, "version": VERSION, "content": content, "settings": setting,
            "vocab": list(corpus.vocab.itos), **{s: corpus.split(s).to(torch.int32) for s in SPLITS}}
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
        os.replace(tmp, path)
        return True
    except (OSError, RuntimeError) as e:
        log.warning("could not write tokenisation cache %s: %s", path, e)
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return False


def prune(folder: Path, content: str) -> list[Path]:
    """Delete caches of this folder made from other contents of the text (they can never match again)."""
    removed = []
    prefix = f"cache-{content[:16]}-"
    for p in folder.glob("cache-*-*.pt"):
        if not p.name.startswith(prefix):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def cached_corpus(files: dict[str, Path], min_freq: int, max_vocab: int | None, where: Path | None,
                  build: Callable[[], Corpus]) -> Corpus:
    """Load the corpus from the cache in ``where``, or ``build()`` it and write the cache there.

    ``where=None`` means no caching.
    """
    if where is None:
        return build()
    t0 = time.perf_counter()
    content = content_key(files)
    setting = settings(min_freq, max_vocab)
    path = where / cache_name(content, settings_key(setting))
    corpus = load(path, content, setting)
    if corpus is not None:
        log.info("loaded tokenised corpus from %s in %.2f s", path, time.perf_counter() - t0)
        return corpus
    t1 = time.perf_counter()
    corpus = build()
    log.info("tokenised %s in %.1f s: %s training tokens, vocabulary %d", files["train"].parent,
             time.perf_counter() - t1, f"{corpus.train.numel():,}", len(corpus.vocab))
    if save(path, corpus, content, setting):
        for p in prune(where, content):
            log.info("removed stale tokenisation cache %s", p.name)
    return corpus
