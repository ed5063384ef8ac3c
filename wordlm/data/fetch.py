"""Downloading with mirrors and checksums, and safe zip extraction.

Every write goes to a temporary file in the target folder and is renamed into place only
once it is complete and verified, so an interrupted download, a checksum mismatch or a
refused archive leaves nothing that a later run could take for data.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import re
import socket
import stat
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import IO

from ..config import UserError

log = logging.getLogger("wordlm")

# Some hosts (wikitext.smerity.com among them) answer Python's default "Python-urllib/3.x" with 403.
USER_AGENT = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36 wordlm"
)
TIMEOUT_S = 30.0  # per socket operation: connect, and each read
CHUNK = 1 << 20
ALGORITHMS = {"md5": 32, "sha256": 64}
PART_PREFIX = ".download-"
PART_SUFFIX = ".part"
STALE_PART_S = 3600.0  # a .part file untouched this long belongs to a dead download


class FetchError(Exception):
    """One mirror failed; the message is the reason (collected into the final UserError)."""


class AllMirrorsFailed(Exception):
    def __init__(self, failures: list[tuple[str, str]]):
        super().__init__("; ".join(f"{u} ({why})" for u, why in failures))
        self.failures = failures


# ---------------------------------------------------------------------------- checksums
def parse_checksum(value: str, key: str = "data.checksum") -> tuple[str, str]:
    """``"md5:<hex>"`` or ``"sha256:<hex>"`` -> (algorithm, lowercase hex)."""
    m = re.fullmatch(r"\s*(\w+)\s*:\s*([0-9A-Fa-f]+)\s*", str(value))
    if not m or m.group(1).lower() not in ALGORITHMS or len(m.group(2)) != ALGORITHMS[m.group(1).lower()]:
        raise UserError(f"{key}={value!r} is not a checksum: write md5:<32 hex digits> or sha256:<64 hex digits>")
    return m.group(1).lower(), m.group(2).lower()


def new_hash(algo: str):
    try:
        return hashlib.new(algo, usedforsecurity=False)
    except TypeError:  # pragma: no cover - very old OpenSSL builds
        return hashlib.new(algo)


def file_checksum(path: Path, algo: str) -> str:
    h = new_hash(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- progress
class Progress:
    """A tqdm bar on a terminal; otherwise a log line every 10% (or every 30 s when the size is unknown)."""

    def __init__(self, total: int | None, desc: str):
        self.total, self.desc, self.done = total, desc, 0
        self.bar = None
        self.next_pct, self.last_log = 10, time.monotonic()
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                            dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        if self.total:
            pct = 100 * self.done // self.total
            if pct >= self.next_pct and pct < 100:
                log.info("%s: %d%% of %s", self.desc, pct, human(self.total))
                self.next_pct = (pct // 10 + 1) * 10
        elif time.monotonic() - self.last_log > 30:
            log.info("%s: %s so far", self.desc, human(self.done))
            self.last_log = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


# ---------------------------------------------------------------------------- temp files
@contextlib.contextmanager
def temp_file(folder: Path, name: str) -> Iterator[tuple[IO[bytes], Path]]:
    """A fresh ``.download-<name>-XXXX.part`` in ``folder``, removed on any failure (Ctrl-C included)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{PART_PREFIX}{name}-", suffix=PART_SUFFIX, dir=folder)
    path = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, path
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def remove_stale_parts(folder: Path, max_age_s: float = STALE_PART_S) -> None:
    """Delete leftovers of downloads killed too hard to clean up after themselves (SIGKILL, power loss)."""
    if not folder.is_dir():
        return
    now = time.time()
    for p in folder.glob(f"{PART_PREFIX}*{PART_SUFFIX}"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > max_age_s:
                p.unlink()


# ---------------------------------------------------------------------------- download
def _reason(e: BaseException) -> str:
    if isinstance(e, FetchError):
        return str(e)
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        r = e.reason
        return f"cannot connect: {r.strerror if isinstance(r, OSError) and r.strerror else r}"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return f"no answer within {TIMEOUT_S:.0f} s"
    if isinstance(e, http.client.IncompleteRead):
        return f"connection closed after {len(e.partial)} bytes"
    if isinstance(e, (http.client.HTTPException, ConnectionError)):
        return f"connection failed: {type(e).__name__} {e}".strip()
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return f"{type(e).__name__}: {e}"


def download_one(url: str, dest: Path, checksum: str | None, desc: str = "",
                 timeout: float = TIMEOUT_S) -> None:
    """Fetch ``url`` to ``dest``: temp file, verify size and checksum, rename. Raises FetchError/OSError."""
    algo, want = parse_checksum(checksum) if checksum else ("sha256", None)
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": "*/*"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        h = new_hash(algo)
        got = 0
        progress = Progress(total, desc or dest.name)
        try:
            with temp_file(dest.parent, dest.name) as (f, tmp):
                while True:
                    block = resp.read(CHUNK)
                    if not block:
                        break
                    f.write(block)
                    h.update(block)
                    got += len(block)
                    progress.update(len(block))
                if total is not None and got != total:
                    # http.client returns b"" when the server hangs up early; it does not raise.
                    raise FetchError(f"connection closed after {got} of {total} bytes")
                if got == 0:
                    raise FetchError("empty response")
                digest = h.hexdigest()
                if want is not None and digest != want:
                    raise FetchError(f"checksum mismatch: expected {algo}:{want}, got {algo}:{digest}")
                f.flush()
                os.fsync(f.fileno())
                f.close()
                os.replace(tmp, dest)
        finally:
            progress.close()
    log.info("downloaded %s (%s) from %s%s", dest.name, human(got), url,
             f", {algo} verified" if want is not None else "")


def download(urls: Sequence[str], dest: Path, checksum: str | None, desc: str = "",
             timeout: float = TIMEOUT_S) -> str:
    """Try each mirror in order until one gives a verified ``dest``; returns the URL that worked.

    Raises AllMirrorsFailed listing every URL with its reason. KeyboardInterrupt passes through
    (the temp file is removed on the way).
    """
    failures: list[tuple[str, str]] = []
    remove_stale_parts(dest.parent)
    for url in urls:
        log.info("downloading %s", url)
        try:
            download_one(url, dest, checksum, desc, timeout)
            return url
        except (FetchError, urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
            # ValueError: a malformed URL ("unknown url type")
            why = _reason(e)
            log.warning("%s failed: %s", url, why)
            failures.append((url, why))
    raise AllMirrorsFailed(failures)


# ---------------------------------------------------------------------------- extraction
def _member_problem(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    if "\x00" in name:
        return "a NUL byte in its name"
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        return "an absolute path"
    if ".." in PurePosixPath(norm).parts:
        return "a '..' path component"
    kind = stat.S_IFMT(info.external_attr >> 16)  # Unix type bits; 0 when the zip tool did not record them
    if kind == stat.S_IFLNK:
        return "a symbolic link"
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        return "a special file (device, pipe or socket)"
    return None


def check_zip(zf: zipfile.ZipFile, archive: Path) -> None:
    """Refuse the whole archive if any member could write outside the target folder or is a link."""
    for info in zf.infolist():
        problem = _member_problem(info)
        if problem:
            raise UserError(
                f"refusing archive {archive.name}: member {info.filename!r} has {problem}; "
                f"it is not a genuine copy - download it again from another mirror (data.url)"
            )


def extract_zip(archive: Path, wanted: dict[str, Path]) -> None:
    """Extract the members whose base names are ``wanted``'s keys to the paths given as values.

    The archive is checked first (see :func:`check_zip`); each member goes to a temp file in its
    target folder and is renamed into place only when it is complete (zipfile checks its CRC).
    Nothing else is extracted.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as e:
        raise UserError(f"{archive} is not a valid zip archive ({e}): delete it and download it again") from None
    with zf:
        check_zip(zf, archive)
        found: dict[str, zipfile.ZipInfo] = {}
        for info in zf.infolist():
            base = PurePosixPath(info.filename.replace("\\", "/")).name
            if base in wanted and not info.is_dir():
                if base in found:
                    raise UserError(f"archive {archive.name} holds {base} twice ({found[base].filename}, "
                                    f"{info.filename}): it is not the expected archive")
                found[base] = info
        missing = [b for b in wanted if b not in found]
        if missing:
            raise UserError(f"archive {archive.name} lacks {', '.join(missing)}: it is not the expected archive "
                            f"(check data.url)")
        done: list[tuple[Path, Path]] = []  # (temp file, target): renamed only once all are complete
        try:
            for base, target in wanted.items():
                with zf.open(found[base]) as src, temp_file(target.parent, target.name) as (dst, tmp):
                    for block in iter(lambda: src.read(CHUNK), b""):
                        dst.write(block)
                done.append((tmp, target))
            for tmp, target in done:
                os.replace(tmp, target)
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise UserError(f"archive {archive.name} is corrupt ({e}): delete it and download it again") from None
        finally:
            for tmp, _ in done:
                tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- folders
def writable_dir(folder: Path) -> bool:
    """Whether we may write in ``folder``: it exists, has a write bit, and the OS agrees.

    A folder with every write bit off counts as read-only by intent even for root (shared data
    copies are often marked that way), although root's writes would succeed.
    """
    try:
        mode = folder.stat().st_mode
    except OSError:
        return False
    return stat.S_ISDIR(mode) and bool(mode & 0o222) and os.access(folder, os.W_OK | os.X_OK)


# ---------------------------------------------------------------------------- locking
@contextlib.contextmanager
def folder_lock(folder: Path | None) -> Iterator[None]:
    """An exclusive lock on ``folder``/.wordlm.lock, so that parallel ranks download and tokenise once.

    The lock file is removed on release; a waiter that wakes up holding a removed file tries again.
    Where the folder is None, missing or read-only (or on a platform without fcntl) this does nothing.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None
    if fcntl is None or folder is None or not writable_dir(folder):
        yield
        return
    path = folder / ".wordlm.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.info("waiting for another process preparing %s", folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder before us removed this file: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)  # closing releases the lock
