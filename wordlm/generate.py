"""Sample text from a checkpoint alone: ``python generate.py checkpoint=PATH [words=...] [prompt="..."]``.

Weights, config and vocabulary all come from the checkpoint (read with ``weights_only=True``);
the corpus is never read. See docs/evaluation.md for examples.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TextIO

import torch

from . import runtime
from .checkpoint import load_model, need_checkpoint
from .cli import entry
from .config import DEVICES, GenerateConfig, UserError, build, plain
from .sampling import TextWriter, encode_prompt, generate

LONG_RUN_WORDS = 200  # fewer words than this never show a progress bar


# ---------------------------------------------------------------------------- generate
def validate(cfg: GenerateConfig) -> None:
    def check(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)

    check(cfg.words >= 1, f"words={cfg.words} is impossible: generate at least 1 word")
    check(math.isfinite(cfg.temperature) and cfg.temperature > 0,
          f"temperature={cfg.temperature} must be > 0 (near 0 = nearly greedy, 1 = the model's own distribution)")
    check(cfg.top_k >= 0, f"top_k={cfg.top_k} must be >= 0 (0 = no top-k filtering)")
    check(0 < cfg.top_p <= 1, f"top_p={cfg.top_p} must be in (0, 1] (1 = no nucleus filtering)")
    check(cfg.context is None or cfg.context >= 1, f"context={cfg.context} must be >= 1 or null (= training bptt)")
    check(cfg.device in DEVICES, f"device='{cfg.device}': use {'|'.join(DEVICES)}")
    check(0 <= cfg.seed < 2 ** 63, f"seed={cfg.seed} must be in [0, 2**63)")


def check_outf(outf: str, checkpoint: Path, overwrite: bool) -> Path:
    """Refuse an ``outf`` that would destroy something: the checkpoint, any .pt file, or (without
    ``overwrite=true``) any existing file."""
    path = Path(outf).expanduser()
    if path.is_dir():
        raise UserError(f"outf={outf} is a folder: give a file name, e.g. outf={path / 'sample.txt'}")
    if path.exists() and checkpoint.exists() and path.resolve() == checkpoint.resolve():
        raise UserError(f"outf={outf} is the checkpoint itself: writing text there would destroy it; "
                        f"choose another file, e.g. outf=sample.txt")
    if path.suffix in (".pt", ".pth", ".ckpt"):
        raise UserError(f"outf={outf} names a checkpoint-like file (.pt): text goes to a text file, e.g. "
                        f"outf={path.with_suffix('.txt').name}")
    if path.exists() and not overwrite:
        raise UserError(f"outf={outf} already exists: add overwrite=true to replace it, or choose another file")
    return path


@contextmanager
def open_output(outf: str | None, stream: TextIO | None = None) -> Iterator[TextIO]:
    """``stream`` if given, else ``outf`` (written to a temp file beside it, renamed into place only when
    complete: a failure never leaves a half-written file or destroys an older one), else stdout."""
    if stream is not None or not outf:
        yield stream or sys.stdout
        return
    path = Path(outf).expanduser()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with ExitStack() as stack:
        try:
            f = stack.enter_context(open(tmp, "w", encoding="utf-8"))
        except OSError as e:
            raise UserError(f"cannot write outf={outf}: {e.strerror or e}; choose a writable path") from None
        done = False
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp, path)
            done = True
        except OSError as e:
            with contextlib.suppress(OSError):  # (its buffer cannot be written either: the close must not raise again)
                f.close()
            what = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise UserError(f"cannot write outf={outf}: {what}; nothing was written there. Free space or choose "
                            f"another path") from None
        finally:
            if not done:
                with contextlib.suppress(OSError):
                    tmp.unlink()


def _progress_bar(total: int, enabled: bool):
    if not enabled or total < LONG_RUN_WORDS or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    # delay: a run that ends within a second never draws a bar.
    return tqdm(total=total, desc="generating", unit="word", leave=False, dynamic_ncols=True, file=sys.stderr,
                delay=1.0)


def run(cfg: GenerateConfig, stdout: TextIO | None = None) -> dict:
    """Generate as ``cfg`` says; returns a small summary (words, seconds, words/s)."""
    validate(cfg)
    path = need_checkpoint(cfg.checkpoint, "generate.py")
    if cfg.outf and stdout is None:
        check_outf(cfg.outf, path, cfg.overwrite)
    device = runtime.resolve_device(cfg.device, key="device")
    loaded = load_model(path, device)
    vocab, model = loaded.vocab, loaded.model
    model.eval()
    if loaded.weights != "trained":
        sys.stderr.write(f"wordlm: note: sampling with the {loaded.weights} weights of {path.name}\n")
    context = cfg.context or loaded.config.trainer.bptt
    longest = getattr(loaded.config.model, "longest", None)
    if longest is not None and context > longest:
        raise UserError(f"context={context} is longer than this model reads: model.max_len={longest} (learned "
                        f"positions); use context={longest} or less")
    if cfg.context is not None and model.init_state(1, device) is not None:
        sys.stderr.write(f"wordlm: note: context={cfg.context} is ignored: this {loaded.config.model.name} "
                         f"checkpoint carries its state over the whole text (context is for transformers)\n")
    words, ids, unknown = encode_prompt(cfg.prompt, vocab)
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else "")
        sys.stderr.write(f"wordlm: note: {len(unknown)} prompt word{'s' if len(unknown) > 1 else ''} not in the "
                         f"checkpoint's vocabulary, read as <unk>: {shown}\n")
        sys.stderr.flush()

    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    eos = vocab.itos[vocab.eos]
    to_terminal = not cfg.outf and (stdout or sys.stdout).isatty()
    bar = _progress_bar(cfg.words, cfg.progress and not to_terminal)  # on a terminal, the text is the progress
    with open_output(cfg.outf, stdout) as out:
        writer = TextWriter(out.write, eos)
        for w in words:
            writer.word(w)

        def on_token(tok: int) -> None:
            writer.word(vocab.itos[tok])
            if bar is not None:
                bar.update(1)

        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        try:
            generate(model, ids, cfg.words, device, start=vocab.eos, temperature=cfg.temperature, top_k=cfg.top_k,
                     top_p=cfg.top_p, context=context, generator=gen, on_token=on_token)
        except ValueError as e:
            if "probability tensor" in str(e):
                raise UserError(f"{path}: the model gives non-finite probabilities (NaN/inf weights?): "
                                f"use another checkpoint, e.g. checkpoints/best.pt") from None
            raise
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - t0
        writer.end()
        out.flush()
    wps = cfg.words / seconds if seconds > 0 else float("inf")
    sys.stderr.write(f"wordlm: {cfg.words} words in {seconds:.2f} s ({wps:,.0f} words/s) on {device}"
                     + (f", written to {cfg.outf}" if cfg.outf else "") + "\n")
    sys.stderr.flush()
    return {"words": cfg.words, "seconds": seconds, "words_per_sec": wps}


def _task(dc: Any) -> dict:
    cfg = build(GenerateConfig, plain(dc))
    try:
        return run(cfg)
    except BrokenPipeError:
        # e.g. `python generate.py ... | head`: the reader left; that is not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return {}


main = entry("generate", _task)

if __name__ == "__main__":
    main()
