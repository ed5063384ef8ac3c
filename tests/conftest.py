"""Shared fixtures: small generated corpora and a runner for the real CLI in a subprocess."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tokenisation caches of the tests' throw-away corpora go to a throw-away folder, not <project>/data/cache
# (every subprocess inherits this). Tests about the cache's place set data.cache_dir themselves.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "WORDLM_CACHE_DIR" not in os.environ:
    os.environ["WORDLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="wordlm-test-cache-")
    atexit.register(shutil.rmtree, os.environ["WORDLM_CACHE_DIR"], True)

# The tests that press Ctrl-C send SIGINT to their subprocesses. A shell starts a background job with SIGINT ignored
# (`nohup pytest ... &`, `bash .ci/run &`), children inherit an ignored signal through exec, and Python then installs
# no KeyboardInterrupt handler, so those tests would measure how the suite was launched, not wordlm. Restore the
# default here: a handler, unlike SIG_IGN, is reset to SIG_DFL by exec, so every subprocess starts as from a terminal.
import signal  # noqa: E402

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# A tiny model and run that any test can shrink further: fast on 2 CPU cores.
TINY = [
    "model.emsize=16", "model.nhid=16", "model.nlayers=1", "model.dropout=0.0",
    "trainer.batch_size=4", "trainer.eval_batch_size=4", "trainer.bptt=8", "trainer.epochs=1",
    "trainer.log_interval=5", "trainer.sample_words=5", "trainer.progress=false", "trainer.threads=1",
]


def tiny_config(name: str = "lstm", optim=None, dropout: float = 0.2, **trainer):
    """A typed Config of a TINY-sized model (no Hydra), for tests that build a Trainer in-process."""
    from wordlm.config import Config, OptimConfig, TrainerConfig
    from wordlm.models import model_config

    kw = dict(batch_size=4, eval_batch_size=4, bptt=8, epochs=2, log_interval=5, progress=False, sample_words=0,
              threads=1, device="cpu", precision="fp32", compile=False)
    kw.update(trainer)
    return Config(model=model_config(name, emsize=16, nhid=16, nlayers=1, dropout=dropout),
                  optim=optim or OptimConfig(), trainer=TrainerConfig(**kw))


def write_corpus(folder: Path, n_lines: Dict[str, int] = None, vocab: int = 30, seed: int = 0) -> Path:
    """Random word lines in folder/{train,valid,test}.txt; valid/test may hold words train lacks."""
    n_lines = n_lines or {"train": 200, "valid": 40, "test": 40}
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(vocab)]
    for split, n in n_lines.items():
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n)]
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and one thread does not collapse when other jobs share the CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small corpus shared by a module's tests (modules that need another size define their own)."""
    return write_corpus(tmp_path_factory.mktemp("c") / "corpus", {"train": 120, "valid": 20, "test": 20})


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    """A 10-step TINY run on ``corpus``: its run folder."""
    run = tmp_path_factory.mktemp("run")
    run_cli("train.py", train_args(corpus, run, "trainer.max_steps=10"), check=True)
    return run


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")


def run_cli(script: str, args: List[str], cwd: Optional[Path] = None, timeout: float = 120,
            env: Optional[Dict[str, str]] = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run ``python <script> args`` from the repo, as a user would; returns the completed process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    p = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd or ROOT, capture_output=True,
                       text=True, timeout=timeout, env=full_env)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def train_args(corpus: Path, run_dir: Path, *extra: str) -> List[str]:
    return ["data=custom", f"data.dir={corpus}", f"hydra.run.dir={run_dir}", *TINY, *extra]
