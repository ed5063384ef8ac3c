"""Named data sets and custom folders -> a corpus folder on disk -> a Corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import DataConfig, UserError
from .corpus import Corpus, check_folder, read_corpus

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# name -> folder under data.root
FOLDERS = {"wikitext2": "wikitext-2"}


def data_root(cfg: DataConfig) -> Path:
    return Path(cfg.root).expanduser() if cfg.root else PROJECT_ROOT / "data"


def corpus_dir(cfg: DataConfig) -> Path:
    """The folder holding train.txt, valid.txt and test.txt for this config."""
    if cfg.name == "custom":
        if not cfg.dir:
            raise UserError("data=custom needs data.dir=/path/to/folder holding train.txt, valid.txt and test.txt")
        return Path(cfg.dir).expanduser()
    if cfg.name not in FOLDERS:
        raise UserError(f"unknown data set '{cfg.name}': use data={'|'.join(sorted(FOLDERS))}|custom")
    return Path(cfg.dir).expanduser() if cfg.dir else data_root(cfg) / FOLDERS[cfg.name]


def prepare(cfg: DataConfig) -> Path:
    folder = corpus_dir(cfg)
    hint = None if cfg.name == "custom" else f"place the {cfg.name} files there, or set data.root"
    check_folder(folder, hint or "")
    return folder


def load_corpus(cfg: DataConfig, folder: Optional[Path] = None) -> Corpus:
    folder = folder or prepare(cfg)
    return read_corpus(folder, cfg.min_freq, cfg.max_vocab)
