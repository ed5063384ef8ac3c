"""Data sets that fetch themselves: download, mirrors, checksums, safe extraction, the tokenisation cache.

No test touches the internet: a real HTTP server on 127.0.0.1, started here in a thread, serves
archives and text files that the tests build.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import logging
import socket
import stat
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_cli, write_corpus

from wordlm.config import DataConfig, UserError
from wordlm.data import batchify, cache, datasets, fetch
from wordlm.data.datasets import load_corpus

WT_MEMBERS = {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"}


# ---------------------------------------------------------------------------- a local HTTP server
class Server:
    """Serves ``routes`` (path -> bytes). ``/cut/...`` promises the full length but hangs up halfway."""

    def __init__(self):
        self.routes: dict[str, bytes] = {}
        self.hits: list[str] = []
        routes, hits = self.routes, self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hits.append(self.path)
                self.agent = self.headers.get("User-Agent", "")
                if "Python-urllib" in self.agent:  # like wikitext.smerity.com
                    self.send_error(403, "Forbidden")
                    return
                body = routes.get(self.path.removeprefix("/cut"))
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path.startswith("/cut"):
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/nothing-listens-here.zip"


def md5(data: bytes) -> str:
    return "md5:" + hashlib.md5(data).hexdigest()


def corpus_texts(tmp: Path, lines: int = 300) -> dict[str, bytes]:
    """Split texts large enough for batch 4 x bptt 8 (a few hundred lines of train)."""
    folder = write_corpus(tmp / "src", {"train": lines, "valid": lines // 5, "test": lines // 5})
    return {s: (folder / f"{s}.txt").read_bytes() for s in ("train", "valid", "test")}


def make_zip(members: dict[str, bytes], extra: list[zipfile.ZipInfo | str] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for e in extra:
            zf.writestr(e, b"gotcha")
    return buf.getvalue()


def wikitext_zip(texts: dict[str, bytes], top: str = "wikitext-2/", extra=()) -> bytes:
    return make_zip({f"{top}{WT_MEMBERS[s]}": t for s, t in texts.items()}, list(extra))


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---------------------------------------------------------------------------- end to end through train.py
def test_train_py_downloads_verifies_extracts_and_falls_back(tmp_path, server):
    texts = corpus_texts(tmp_path)
    archive = wikitext_zip(texts)
    server.routes["/good/wikitext-2-v1.zip"] = archive
    root, run = tmp_path / "data", tmp_path / "run"
    p = run_cli("train.py", [
        "data=wikitext2", f"data.root={root}",
        f"data.url=[{server.url}/missing.zip,{server.url}/good/wikitext-2-v1.zip]",
        f"data.checksum={md5(archive)}", "data.min_freq=2", f"hydra.run.dir={run}", "trainer.max_steps=2", *TINY,
        f"data.cache_dir={tmp_path / 'cache'}",
    ])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    folder = root / "wikitext-2"
    names = files_in(folder)
    assert sorted(names) == ["test.txt", "train.txt", "valid.txt"], names  # no leftovers, no cache, no lock
    (sub,) = (tmp_path / "cache").iterdir()
    assert sub.name.startswith("wikitext-2-") and len(list(sub.glob("cache-*.pt"))) == 1
    for s in ("train", "valid", "test"):
        assert (folder / f"{s}.txt").read_bytes() == texts[s]
    assert server.hits[:2] == ["/missing.zip", "/good/wikitext-2-v1.zip"]  # first mirror failed, second used
    out = p.stdout + p.stderr
    assert "404" in out
    # min_freq travels with the vocabulary in the checkpoint
    ckpts = sorted((run / "checkpoints").glob("*.pt"))
    assert ckpts, list(run.rglob("*"))
    ck = torch.load(ckpts[0], map_location="cpu", weights_only=True)
    assert ck["config"]["data"]["min_freq"] == 2
    counts: dict[str, int] = {}
    for w in texts["train"].decode().split():
        counts[w] = counts.get(w, 0) + 1
    assert len(ck["vocab"]) == 2 + sum(1 for c in counts.values() if c >= 2)


def test_train_py_offline_is_one_clear_line(tmp_path):
    dead = closed_port_url()
    root = tmp_path / "data"
    p = run_cli("train.py", ["data=ptb", f"data.root={root}", f"data.url=[{dead[:dead.rindex('/')]}]",
                             f"hydra.run.dir={tmp_path / 'run'}", *TINY])
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("wordlm: error:")]
    assert len(errors) == 1, p.stderr
    err = errors[0]
    assert "could not download Penn Treebank" in err and "ptb.train.txt" in err
    assert "cannot connect" in err and str(root / "ptb") in err
    assert "train.txt, valid.txt" in err
    assert not (root / "ptb").exists()


# ---------------------------------------------------------------------------- download failures
def cfg_for(root: Path, name: str = "wikitext2", **kw) -> DataConfig:
    return DataConfig(name=name, root=str(root), **kw)


def test_wrong_checksum_is_refused_and_leaves_nothing(tmp_path, server):
    texts = corpus_texts(tmp_path, 40)
    server.routes["/wt2.zip"] = wikitext_zip(texts)
    cfg = cfg_for(tmp_path / "data", url=f"{server.url}/wt2.zip", checksum="md5:" + "0" * 32)
    with pytest.raises(UserError) as ei:
        load_corpus(cfg)
    msg = str(ei.value)
    assert "checksum mismatch" in msg and f"{server.url}/wt2.zip" in msg and "md5:" + "0" * 32 in msg
    assert "\n" not in msg
    assert files_in(tmp_path / "data" / "wikitext-2") == []


def test_server_closing_mid_transfer_leaves_no_file(tmp_path, server):
    texts = corpus_texts(tmp_path, 40)
    archive = wikitext_zip(texts)
    server.routes["/wt2.zip"] = archive
    cfg = cfg_for(tmp_path / "data", url=f"{server.url}/cut/wt2.zip", checksum=md5(archive))
    with pytest.raises(UserError, match=r"connection closed after \d+ of \d+ bytes"):
        load_corpus(cfg)
    assert files_in(tmp_path / "data" / "wikitext-2") == []


def test_unreachable_first_mirror_falls_back_and_sends_a_browser_user_agent(tmp_path, server):
    texts = corpus_texts(tmp_path, 40)
    archive = wikitext_zip(texts, top="wikitext-103/")
    server.routes["/wt103.zip"] = archive
    cfg = cfg_for(tmp_path / "data", name="wikitext103", url=[closed_port_url(), f"{server.url}/wt103.zip"],
                  checksum=md5(archive))
    corpus = load_corpus(cfg)
    assert corpus.train.numel() == sum(len(line.split()) + 1 for line in texts["train"].decode().splitlines())
    assert (tmp_path / "data" / "wikitext-103" / "valid.txt").read_bytes() == texts["valid"]


def test_ptb_files_each_verified(tmp_path, server):
    texts = corpus_texts(tmp_path, 40)
    for s, t in texts.items():
        server.routes[f"/ptb/ptb.{s}.txt"] = t
    sums = ",".join(md5(texts[s]) for s in ("train", "valid", "test"))
    cfg = cfg_for(tmp_path / "data", name="ptb", url=[f"{server.url}/nowhere/", f"{server.url}/ptb"], checksum=sums)
    corpus = load_corpus(cfg)
    assert corpus.valid.numel() > 0
    assert files_in(tmp_path / "data" / "ptb")[-3:] == ["test.txt", "train.txt", "valid.txt"]
    with pytest.raises(UserError, match="3 comma-separated checksums"):
        datasets._checksums(cfg_for(tmp_path, name="ptb", checksum=md5(b"x")), datasets.SOURCES["ptb"])


def test_default_mirrors_and_checksums_are_the_known_ones():
    wt2 = datasets.SOURCES["wikitext2"]
    assert wt2.checksums == ("md5:542ccefacc6c27f945fb54453812b3cd",)
    assert wt2.mirrors[0] == "https://wikitext.smerity.com/wikitext-2-v1.zip"
    assert datasets.SOURCES["wikitext103"].checksums == ("md5:9ddaacaf6af0710eda8c456decff7832",)
    assert datasets.SOURCES["ptb"].checksums[0] == "md5:f26c4b92c5fdc7b3f8c7cdcb991d8420"
    assert "Python-urllib" not in fetch.USER_AGENT and fetch.USER_AGENT.startswith("Mozilla/5.0")
    for bad in ("md5:xyz", "crc32:12345678", "md5:" + "0" * 31, "sha256:" + "0" * 32):
        with pytest.raises(UserError, match="data.checksum"):
            fetch.parse_checksum(bad)


# ---------------------------------------------------------------------------- safe extraction
def _symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize("evil, why", [
    ("wikitext-2/../../evil", "'..'"),
    ("/tmp/wordlm-evil-absolute", "absolute path"),
    (_symlink("wikitext-2/link"), "symbolic link"),
])
def test_unsafe_archive_is_refused(tmp_path, server, evil, why):
    texts = corpus_texts(tmp_path, 40)
    archive = wikitext_zip(texts, extra=[evil])
    names = zipfile.ZipFile(io.BytesIO(archive)).namelist()
    assert (evil if isinstance(evil, str) else evil.filename) in names  # zipfile kept the name as written
    server.routes["/wt2.zip"] = archive
    root = tmp_path / "deep" / "data"
    with pytest.raises(UserError, match=f"refusing archive wikitext-2-v1.zip: member .*{why}"):
        load_corpus(cfg_for(root, url=f"{server.url}/wt2.zip", checksum=md5(archive)))
    assert files_in(root / "wikitext-2") == []
    assert not (tmp_path / "deep" / "evil").exists() and not (tmp_path / "evil").exists()
    assert not Path("/tmp/wordlm-evil-absolute").exists()


def test_archive_placed_by_hand_is_used_offline(tmp_path):
    texts = corpus_texts(tmp_path, 40)
    archive = wikitext_zip(texts)
    folder = tmp_path / "data" / "wikitext-2"
    folder.mkdir(parents=True)
    (folder / "wikitext-2-v1.zip").write_bytes(archive)
    cfg = cfg_for(tmp_path / "data", url=closed_port_url(), checksum=md5(archive))
    assert load_corpus(cfg).test.numel() > 0
    assert (folder / "test.txt").read_bytes() == texts["test"]
    (folder / "train.txt").unlink()
    with pytest.raises(UserError, match="delete it"):  # a wrong archive in place is named, not silently used
        load_corpus(cfg_for(tmp_path / "data", url=closed_port_url(), checksum="md5:" + "1" * 32))


# ---------------------------------------------------------------------------- tokenisation cache
def test_cache_is_hit_then_rebuilt_after_a_change(tmp_path, monkeypatch, caplog):
    folder = write_corpus(tmp_path / "corpus")
    cfg = DataConfig(name="custom", dir=str(folder), root=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    own = datasets.corpus_cache_dir(cfg, folder)
    before = files_in(folder)
    builds = []
    real = datasets.read_corpus
    monkeypatch.setattr(datasets, "read_corpus", lambda *a, **k: builds.append(1) or real(*a, **k))

    first = load_corpus(cfg)
    assert len(builds) == 1 and first.train.dtype == torch.int32
    assert files_in(folder) == before  # nothing is ever written into the user's corpus folder
    caches = sorted(own.glob("cache-*.pt"))
    assert len(caches) == 1

    caplog.set_level(logging.INFO, logger="wordlm")
    second = load_corpus(cfg)
    assert len(builds) == 1, "the second load must come from the cache"
    assert "loaded tokenised corpus" in caplog.text
    assert second.vocab == first.vocab
    for s in ("train", "valid", "test"):
        assert torch.equal(second.split(s), first.split(s))

    with open(folder / "valid.txt", "a") as f:  # same size and mtime tricks do not matter: content is hashed
        f.write("w1 w2 w3\n")
    third = load_corpus(cfg)
    assert len(builds) == 2 and third.valid.numel() == first.valid.numel() + 4
    assert [p.name for p in own.glob("cache-*.pt")] != [caches[0].name]
    assert len(list(own.glob("cache-*.pt"))) == 1, "the stale cache is removed"

    cfg.min_freq = 3  # another setting: another cache, built once
    load_corpus(cfg)
    load_corpus(cfg)
    assert len(builds) == 3 and len(list(own.glob("cache-*.pt"))) == 2

    cfg.cache = False
    load_corpus(cfg)
    assert len(builds) == 4


def test_corrupt_cache_is_rebuilt(tmp_path):
    folder = write_corpus(tmp_path / "corpus")
    cfg = DataConfig(name="custom", dir=str(folder), cache_dir=str(tmp_path / "cache"))
    ref = load_corpus(cfg)
    (path,) = datasets.corpus_cache_dir(cfg, folder).glob("cache-*.pt")
    path.write_bytes(b"not a torch file")
    again = load_corpus(cfg)
    assert torch.equal(again.train, ref.train)
    assert cache.load(path, "x", {}) is None  # rewritten, but for other content it does not match


def test_second_load_is_fast(tmp_path):
    folder = write_corpus(tmp_path / "corpus", {"train": 20000, "valid": 500, "test": 500}, vocab=5000)
    cfg = DataConfig(name="custom", dir=str(folder))
    load_corpus(cfg)
    t = time.perf_counter()
    load_corpus(cfg)
    assert time.perf_counter() - t < 1.0


# ---------------------------------------------------------------------------- corpus details
def test_ids_are_int32_and_batchify_gives_int64(tmp_path):
    corpus = load_corpus(DataConfig(name="custom", dir=str(write_corpus(tmp_path / "c")), cache=False))
    assert corpus.train.dtype == torch.int32 and corpus.train.dim() == 1
    b = batchify(corpus.train, 4)
    assert b.dtype == torch.int64 and b.is_contiguous()
    n = corpus.train.numel() // 4
    assert torch.equal(b[:, 1], corpus.train[n : 2 * n].long())


def test_max_vocab_and_min_freq_map_rare_words_to_unk(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "train.txt").write_text("a a a b b c\n")
    (folder / "valid.txt").write_text("a b c d\n")
    (folder / "test.txt").write_text("c\n")
    c = load_corpus(DataConfig(name="custom", dir=str(folder), max_vocab=3))
    assert c.vocab.itos == ["<unk>", "<eos>", "a"]
    assert c.valid.tolist() == [2, 0, 0, 0, 1]
    c = load_corpus(DataConfig(name="custom", dir=str(folder), min_freq=2))
    assert c.vocab.itos == ["<unk>", "<eos>", "a", "b"]


def test_non_utf8_names_file_line_and_offset(tmp_path):
    folder = write_corpus(tmp_path / "c")
    (folder / "valid.txt").write_bytes(b"fine line\ncaf\xe9 au lait\n")
    with pytest.raises(UserError, match=r"valid.txt is not UTF-8: line 2, byte offset 13 \(byte 0xe9\)"):
        load_corpus(DataConfig(name="custom", dir=str(folder)))


def test_custom_folder_needs_its_three_files(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "train.txt").write_text("a b\n")
    with pytest.raises(UserError, match="lacks valid.txt, test.txt"):
        load_corpus(DataConfig(name="custom", dir=str(folder)))
    with pytest.raises(UserError, match="data.url is for the named data sets"):
        load_corpus(DataConfig(name="custom", dir=str(folder), url="http://x/y.zip"))


def test_read_only_folder_is_left_untouched_and_cached_elsewhere(tmp_path):
    folder = write_corpus(tmp_path / "shared")
    before = files_in(folder)
    folder.chmod(0o555)
    try:
        cfg = DataConfig(name="custom", dir=str(folder), cache_dir=str(tmp_path / "data" / "cache"))
        first = load_corpus(cfg)
        second = load_corpus(cfg)
        assert files_in(folder) == before  # no cache, no lock file
    finally:
        folder.chmod(0o755)
    (sub,) = (tmp_path / "data" / "cache").iterdir()
    assert sub.name.startswith("shared-") and len(list(sub.glob("cache-*.pt"))) == 1
    assert torch.equal(first.train, second.train)


def test_a_refused_run_leaves_no_outputs_folder_it_created(tmp_path):
    """Refused (offline, or by its config) in a fresh folder, with the default run folder (outputs/<date>/<time>):
    Hydra creates outputs/ and the date's folder before the checks; the refused run removes them again, and
    leaves an outputs/ that was there before (even empty) alone."""
    dead = closed_port_url()
    args = ["data=ptb", f"data.root={tmp_path / 'data'}", f"data.url=[{dead[:dead.rindex('/')]}]", *TINY]
    work = tmp_path / "work"
    work.mkdir()
    p = run_cli("train.py", args, cwd=work)
    assert p.returncode == 2 and "could not download Penn Treebank" in p.stderr, p.stderr
    assert list(work.iterdir()) == []
    (work / "outputs").mkdir()
    p = run_cli("train.py", args, cwd=work)
    assert p.returncode == 2, p.stderr
    assert list(work.iterdir()) == [work / "outputs"] and list((work / "outputs").iterdir()) == []
    # refused at its config (before any data is read): the same
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    p = run_cli("train.py", ["trainer.final_eval=dynamic", "dynamic.segment=0", *TINY], cwd=fresh)
    assert p.returncode == 2 and "dynamic.segment=0 must be >= 1" in p.stderr, p.stderr
    assert list(fresh.iterdir()) == []
