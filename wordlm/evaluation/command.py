"""Score a split with a checkpoint: ``python evaluate.py checkpoint=PATH [split=test] [data=...]``.

Prints one line of JSON: loss (mean NLL per word, nats), perplexity and bits per word. The text
is encoded with the checkpoint's own vocabulary (words it lacks become ``<unk>``), batched and
windowed as the trainer does, and scored by the trainer's own :func:`wordlm.evaluation.scoring.nll`:
with the same batch size, bptt and precision, the number equals the trainer's test loss.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from .. import runtime
from ..checkpoint import load_model, need_checkpoint
from ..cli import die, entry
from ..config import (
    CacheConfig,
    DataConfig,
    DynamicConfig,
    EvaluateConfig,
    UserError,
    build,
    check_cache,
    check_dynamic,
    plain,
)
from ..data import SPLITS
from ..data.batching import batchify
from ..data.corpus import check_folder, encode_file, literal_count
from ..data.datasets import prepare
from . import cache as caching
from . import dynamic as dynamics
from . import stream
from .scoring import eval_context, nll, ppl

OOV_WARN = 0.05  # warn when more of the scored tokens than this are outside the checkpoint's vocabulary


def validate(cfg: EvaluateConfig) -> None:
    if cfg.split not in SPLITS:
        raise UserError(f"split='{cfg.split}': use one of {'|'.join(SPLITS)}")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise UserError(f"batch_size={cfg.batch_size} is impossible: it must be >= 1 or null (= the training "
                        f"eval_batch_size)")
    if cfg.bptt is not None and cfg.bptt < 1:
        raise UserError(f"bptt={cfg.bptt} must be >= 1 or null (= the training bptt)")
    c, d = cfg.cache, cfg.dynamic
    if c.enabled:
        check_cache(c)
    if d.enabled:
        check_dynamic(d)
        if cfg.batch_size not in (None, 1):
            raise UserError(f"dynamic evaluation reads the text as one stream: batch_size={cfg.batch_size} would "
                            f"adapt the weights on later text (the next columns) before scoring earlier text; "
                            f"leave batch_size unset (= 1)")
    if cfg.tune_tokens is not None and cfg.tune_tokens < 1:
        raise UserError(f"tune_tokens={cfg.tune_tokens} must be >= 1 or null (= all of valid)")
    if cfg.tune and not (c.enabled or d.enabled):
        raise UserError("tune=true tunes the cache or dynamic evaluation: add cache.enabled=true and/or "
                        "dynamic.enabled=true")


def run(cfg: EvaluateConfig) -> dict:
    validate(cfg)
    path = need_checkpoint(cfg.checkpoint, "evaluate.py")
    device = runtime.resolve_device(cfg.device, key="device")
    precision = runtime.resolve_precision(cfg.precision, device, key="precision")
    loaded = load_model(path, device)
    data_cfg = cfg.data if cfg.data is not None else loaded.config.data
    needed = {cfg.split} | ({"train"} if cfg.dynamic.enabled else set()) | ({"valid", "test"} if cfg.tune else set())
    needed = [s for s in SPLITS if s in needed]
    folder = Path(prepare(data_cfg, needed))  # (a named data set is fetched first where its files are missing)
    files = check_folder(folder, splits=needed)
    ids = encode_file(files[cfg.split], loaded.vocab)  # (N,) with the checkpoint's vocabulary, never a rebuilt one
    # Out of vocabulary: words the checkpoint does not know (the text's own literal <unk> tokens are not).
    unk = loaded.vocab.itos[loaded.vocab.unk]
    oov = int((ids == loaded.vocab.unk).sum()) - literal_count(files[cfg.split], unk)
    oov_rate = oov / max(1, ids.numel())
    if oov_rate > OOV_WARN:
        sys.stderr.write(f"wordlm: warning: {oov_rate:.1%} of the {cfg.split} tokens are not in the checkpoint's "
                         f"vocabulary and score as <unk>: the perplexity is not comparable with the model's own "
                         f"test set (is this the data the model was trained for?)\n")
        sys.stderr.flush()
    adaptive = cfg.cache.enabled or cfg.dynamic.enabled
    # The cache and dynamic evaluation follow their references: one column, the whole text one stream.
    bsz = cfg.batch_size or (1 if adaptive else loaded.config.trainer.eval_batch_size)
    data = batchify(ids, bsz, device)  # (T, B)
    bptt = cfg.bptt or loaded.config.trainer.bptt
    longest = getattr(loaded.config.model, "longest", None)
    if longest is not None and bptt > longest:
        raise UserError(f"bptt={bptt} is longer than this model reads: model.max_len={longest} (learned positions); "
                        f"use bptt={longest} or less")
    given = cfg.eval_context if cfg.eval_context is not None else getattr(loaded.config.trainer, "eval_context", None)
    if given is not None and not 0 <= given < bptt:
        raise UserError(f"eval_context={given} must be in [0, bptt={bptt}) (null = the checkpoint's, else bptt // 2)")
    context = eval_context(loaded.model, given, bptt)
    if cfg.dynamic.enabled:
        cfg = dataclasses.replace(cfg, dynamic=dataclasses.replace(
            cfg.dynamic, segment=dynamics.segment_for(cfg.dynamic.segment, bptt, context)))
    out = {"checkpoint": str(path), "weights": loaded.weights, "split": cfg.split,
           "tokens": int((data.size(0) - 1) * data.size(1)),
           "batch_size": bsz, "bptt": bptt, "eval_context": context}
    t0 = time.perf_counter()
    if not adaptive:
        loss = nll(loaded.model, data, bptt, device, precision, progress_desc=f"{cfg.split}" if cfg.progress else None,
                   context=context)
    else:
        loss = _adapted(cfg, loaded, data_cfg.name, files, data, bsz, bptt, context, device, precision, out)
    if not math.isfinite(ppl(loss)):  # NaN, inf, or a perplexity that overflows
        bad = [k for k, v in loaded.model.state_dict().items() if v.is_floating_point() and not v.isfinite().all()]
        why = f"its weights are not finite ({', '.join(bad[:3])}): the run that wrote it diverged" if bad else \
            "the model's perplexity overflows"
        raise UserError(f"{path} scores {cfg.split} to a loss of {loss}: {why}; evaluate an earlier checkpoint, e.g. "
                        f"checkpoints/best.pt")
    out.update(loss=loss, perplexity=ppl(loss), bits_per_word=loss / math.log(2), oov_rate=oov_rate, oov_tokens=oov,
               seconds=round(time.perf_counter() - t0, 3))
    return out


def _adapted(cfg: EvaluateConfig, loaded, data_name: str, files, data, bsz: int, bptt: int, context: int, device,
             precision: str, out: dict):
    """Score with the cache and/or dynamic evaluation (tuned on valid first when cfg.tune)."""
    model = loaded.model
    stateless = getattr(model, "stateless", False)
    cache = caching.settings(cfg.cache, data_name) if cfg.cache.enabled else None
    dyn_cfg = dynamics.settings(cfg.dynamic, bptt) if cfg.dynamic.enabled else None
    # Tokens scored per piece: dynamic evaluation's segment, else whole windows (the static evaluation's).
    segment = dyn_cfg.segment if dyn_cfg is not None else (bptt - context if stateless else bptt)
    ms = None
    if dyn_cfg is not None:
        t = time.perf_counter()
        ms = stream.gradient_stats(model, encode_file(files["train"], loaded.vocab), segment, device, precision,
                                   max_batches=dyn_cfg.stat_batches, bptt=bptt, context=context)
        out["stat_seconds"] = round(time.perf_counter() - t, 3)

    def score(d, c, dc) -> float:
        dyn = stream.Dynamic(model, dc, ms) if dc is not None else None
        return stream.evaluate(model, d, segment, device, precision, c, dyn, bptt, context)["loss"]

    if cfg.tune:
        t = time.perf_counter()
        full_valid = batchify(encode_file(files["valid"], loaded.vocab), bsz, device)
        valid = full_valid[: max(2, cfg.tune_tokens // bsz + 1)] if cfg.tune_tokens else full_valid
        cache, dyn_cfg, tried = stream.tune(model, valid, cache, dyn_cfg, ms, segment, bptt, device, precision,
                                            context)
        valid_loss = score(full_valid, cache, dyn_cfg)
        out.update(split="test", valid_ppl=ppl(valid_loss), tried=tried, tune_seconds=round(time.perf_counter() - t, 3))
        data = batchify(encode_file(files["test"], loaded.vocab), bsz, device)
        out["tokens"] = int((data.size(0) - 1) * data.size(1))
    out["cache"] = dataclasses.asdict(cache) if cache is not None else None
    out["dynamic"] = dataclasses.asdict(dyn_cfg) if dyn_cfg is not None else None
    t = time.perf_counter()
    loss = score(data, cache, dyn_cfg)
    out["score_seconds"] = round(time.perf_counter() - t, 3)  # the scoring pass alone (no statistics, no tuning)
    return loss


def config_from(dc: Any) -> EvaluateConfig:
    values = plain(dc)
    data: dict | None = values.pop("data", None)
    cache, dynamic = values.pop("cache", None), values.pop("dynamic", None)
    cfg = build(EvaluateConfig, values)
    cfg.data = build(DataConfig, data) if data else None
    cfg.cache = build(CacheConfig, cache)
    cfg.dynamic = build(DynamicConfig, dynamic)
    return cfg


def _task(dc: Any) -> dict:
    result = run(config_from(dc))
    sys.stdout.write(json.dumps(result, allow_nan=False) + "\n")  # (non-finite figures were refused above)
    sys.stdout.flush()
    return result


_hydra_main = entry("evaluate", _task)


def main() -> Any:
    # `data.dir=X` alone has no data set to apply to (data: null = the checkpoint's own): say so in one
    # line instead of OmegaConf's assertion.
    args = sys.argv[1:]
    if any(a.startswith("data.") for a in args) and not any(a.startswith("data=") for a in args):
        die("data.<key>=... needs a data set to apply to: add data=custom (a folder of your own, with data.dir=...) "
            "or data=wikitext2; without data=..., the checkpoint's own data set is used")
    return _hydra_main()


if __name__ == "__main__":
    main()
