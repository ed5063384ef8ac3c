"""Score a split with a checkpoint: ``python -m wordlm.evaluate checkpoint=PATH [split=test] [data=...]``.

Prints one line of JSON: loss (mean NLL per word, nats), perplexity and bits per word. The text
is encoded with the checkpoint's own vocabulary (words it lacks become ``<unk>``), batched and
windowed as the trainer does, and scored by the trainer's own :func:`wordlm.scoring.nll`:
with the same batch size, bptt and precision, the number equals the trainer's test loss.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from .cli import die, entry
from .config import DataConfig, EvaluateConfig, UserError, build, plain
from .generate import load_checkpoint, need_checkpoint, resolve_device, resolve_precision

OOV_WARN = 0.05  # warn when more of the scored tokens than this are outside the checkpoint's vocabulary


def validate(cfg: EvaluateConfig) -> None:
    from .data import SPLITS

    if cfg.split not in SPLITS:
        raise UserError(f"split='{cfg.split}': use one of {'|'.join(SPLITS)}")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise UserError(f"batch_size={cfg.batch_size} is impossible: it must be >= 1 or null (= the training "
                        f"eval_batch_size)")
    if cfg.bptt is not None and cfg.bptt < 1:
        raise UserError(f"bptt={cfg.bptt} must be >= 1 or null (= the training bptt)")


def run(cfg: EvaluateConfig) -> dict:
    from .data.batching import batchify
    from .data.corpus import check_folder, encode_file, literal_count
    from .data.datasets import prepare
    from .scoring import nll, ppl

    validate(cfg)
    path = need_checkpoint(cfg.checkpoint, "-m wordlm.evaluate")
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    loaded = load_checkpoint(path, device)
    data_cfg = cfg.data if cfg.data is not None else loaded.config.data
    folder = Path(prepare(data_cfg))  # holds train/valid/test.txt (fetched first where the data set says how)
    files = check_folder(folder)
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
    data = batchify(ids, cfg.batch_size or loaded.config.trainer.eval_batch_size, device)  # (T, B)
    bptt = cfg.bptt or loaded.config.trainer.bptt
    loss = nll(loaded.model, data, bptt, device, precision,
                    progress_desc=f"{cfg.split}" if cfg.progress else None)
    return {
        "checkpoint": str(path), "split": cfg.split, "tokens": int((data.size(0) - 1) * data.size(1)),
        "loss": loss, "perplexity": ppl(loss), "bits_per_word": loss / math.log(2),
        "oov_rate": oov_rate, "oov_tokens": oov,
    }


def config_from(dc: Any) -> EvaluateConfig:
    values = plain(dc)
    data: dict | None = values.pop("data", None)
    cfg = build(EvaluateConfig, values)
    cfg.data = build(DataConfig, data) if data else None
    return cfg


def _task(dc: Any) -> dict:
    result = run(config_from(dc))
    sys.stdout.write(json.dumps(result) + "\n")
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
