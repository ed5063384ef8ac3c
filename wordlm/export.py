"""Export a checkpoint for serving: ``wordlm-export checkpoint=PATH [format=onnx] [out=FILE] [overwrite=true]
[opset=18] [verify=true]``.

Weights, config and vocabulary come from the checkpoint alone (read with ``weights_only=True``); the model is
exported in eval mode, on CPU, in fp32. The ONNX graph (see docs/evaluation.md, "Exporting to ONNX"):

- input ``tokens``: int64 (seq_len, batch), both axes dynamic;
- output ``log_probs``: float32 (seq_len, batch, vocab);
- RNNs carry their recurrent state explicitly, zeros to start, the outputs fed back in for the next chunk:
  a classic LSTM ``h0``, ``c0`` -> ``h1``, ``c1`` and a GRU/Elman RNN ``h0`` -> ``h1``, each (nlayers, batch,
  nhid); an RNN run layer by layer (``model.locked``, ``model.wdrop``, ``model.last_nhid``) has one tensor per
  layer ``i``, (1, batch, size of layer i): ``h0_<i>`` (and for an LSTM ``c0_<i>``) -> ``h1_<i>`` (``c1_<i>``),
  in the order h0_0, c0_0, h0_1, c0_1, ... A transformer has no state inputs.

The file also carries the vocabulary (metadata ``vocab``: a JSON list, position = token id; 0 is ``<unk>``,
1 is ``<eos>``, the end of a line), the model config (``model``) and the state's input -> output pairs
(``state``). It is written to a temporary file, checked with onnxruntime when that is installed (the PyTorch
model and the ONNX graph on shapes other than the traced ones), and only then renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from .checkpoint import load_model, need_checkpoint
from .cli import entry
from .config import ExportConfig, UserError, build, plain
from .models import count_params

FORMATS = ("onnx",)
# 18: the lowest opset the torch.export-based exporter writes natively (older ones lack LayerNormalization);
# onnxruntime runs it from 1.14 on.
MIN_OPSET = 18
MAX_DIFF = 1e-4  # verification: the largest |log-prob| (and state) difference accepted between PyTorch and ORT
EXAMPLE = (7, 3)  # (seq_len, batch) of the traced example
CHECK = ((11, 2), (4, 2))  # verification: two chunks of another shape, the second carrying the first's state
MAX_BYTES = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB limit for a single-file ONNX model, with room for the graph
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")
INSTALL = 'pip install "wordlm[export]"'


# ---------------------------------------------------------------------------- checks
def validate(cfg: ExportConfig) -> None:
    if cfg.format not in FORMATS:
        raise UserError(f"format='{cfg.format}' is not one wordlm can export: use format={'|'.join(FORMATS)}")
    if cfg.opset < MIN_OPSET:
        raise UserError(f"opset={cfg.opset} is too old for this exporter: use opset={MIN_OPSET} or newer "
                        f"(the default is {ExportConfig.opset})")
    top = max_opset()
    if cfg.opset > top:
        raise UserError(f"opset={cfg.opset} is newer than this torch's ONNX exporter writes: use opset={MIN_OPSET}"
                        f"..{top} (the default is {ExportConfig.opset})")


def max_opset() -> int:
    """The newest opset this torch's exporters write (asking for more prints a graph dump, then fails)."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET  # private: a torch without it falls back to 2.13's value

        return int(ONNX_MAX_OPSET)
    except (ImportError, AttributeError, TypeError, ValueError):
        return 23


def output_path(out: Optional[str], checkpoint: Path, overwrite: bool) -> Path:
    """Where the file goes (default: the checkpoint's path with .onnx); refuse to destroy anything."""
    path = Path(out).expanduser() if out else checkpoint.with_suffix(".onnx")
    key = f"out={out}" if out else f"the default out={path}"
    if path.is_dir():
        raise UserError(f"{key} is a folder: give a file name, e.g. out={path / (checkpoint.stem + '.onnx')}")
    if path.suffix.lower() in CHECKPOINT_SUFFIXES or (path.exists() and path.resolve() == checkpoint.resolve()):
        raise UserError(f"{key} names a checkpoint (.pt): wordlm-export never writes over one; choose another file, "
                        f"e.g. out={path.with_suffix('.onnx').name}")
    if path.exists() and not overwrite:
        raise UserError(f"{key} already exists: add overwrite=true to replace it, or choose another out=FILE")
    return path


def need_packages() -> None:
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"format=onnx needs {' and '.join(missing)}, which are not installed: {INSTALL}")


# ---------------------------------------------------------------------------- the graph's interface
def flat_state(state: Any) -> List[torch.Tensor]:
    """A model's state (None, a tensor or a flat tuple of tensors) as a list of tensors."""
    if state is None:
        return []
    if isinstance(state, torch.Tensor):
        return [state]
    return list(state)


def state_names(model: nn.Module) -> List[Tuple[str, str]]:
    """(input, output) name of each state tensor, in the model's own flat order (see the module docstring)."""
    template = model.init_state(1)
    if template is None:
        return []
    if isinstance(template, torch.Tensor):
        return [("h0", "h1")]  # GRU / Elman RNN: (nlayers, B, H)
    layers = getattr(model, "layers", None)
    if not getattr(model, "layered", False) or layers is None:
        return [("h0", "h1"), ("c0", "c1")][: len(template)]  # the classic LSTM's (h, c), each (nlayers, B, H)
    per = len(template) // len(layers)  # layer by layer: per layer h (and c), each (1, B, H_layer)
    return [(f"{k}0_{i}", f"{k}1_{i}") for i in range(len(layers)) for k in "hc"[:per]]


class Exportable(nn.Module):
    """``model`` with its state as flat tensors: ``forward(tokens, *state) -> (log_probs, *new_state)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        template = model.init_state(1)
        self.kind = "none" if template is None else "tensor" if isinstance(template, torch.Tensor) else "tuple"

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor):
        packed = None if self.kind == "none" else state[0] if self.kind == "tensor" else tuple(state)
        log_probs, new = self.model(tokens, packed)
        return (log_probs, *flat_state(new))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' warnings and log lines (TracerWarnings, "torchvision is not installed", the legacy exporter's
    deprecation notice) say nothing a user of this command can act on; the result is verified instead."""
    names = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes",
             "onnxscript")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def export_onnx(model: nn.Module, path: Path, vocab_size: int, opset: int) -> Tuple[List[str], List[str]]:
    """Write ``model`` (eval mode, CPU, fp32) to ``path`` as ONNX; returns the input and output names.

    Two exporters, one per kind of model, because neither writes a correct graph for both kinds (torch 2.13,
    checked by tests/test_export.py):

    - RNNs go through the TorchScript exporter (``dynamo=False``, ``dynamic_axes``): it maps ``aten::lstm``/
      ``gru``/``rnn_*`` to ONNX's own LSTM/GRU/RNN ops, which take any sequence length. torch.export (the
      ``dynamo=True`` exporter) traces the recurrence one time step at a time, so ``seq_len`` is specialised to
      the example's ("Constraints violated (seq_len)"), for nn.LSTM and the layer-by-layer kernels alike.
    - The transformer goes through the torch.export-based exporter (``dynamo=True``, ``dynamic_shapes``): the
      causal mask and the positions are computed from the symbolic length. The TorchScript exporter bakes the
      traced length into nn.MultiheadAttention's reshapes, so its graph fails on any other length.
    """
    names = state_names(model)
    inputs = ["tokens"] + [i for i, _ in names]
    outputs = ["log_probs"] + [o for _, o in names]
    wrapper = Exportable(model).eval()
    seq_len, batch = EXAMPLE
    tokens = torch.randint(0, vocab_size, (seq_len, batch), generator=torch.Generator().manual_seed(0))
    state = flat_state(model.init_state(batch))
    tied = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False)) > count_params(model)
    with _quiet():
        if names:
            axes: Dict[str, Dict[int, str]] = {"tokens": {0: "seq_len", 1: "batch"},
                                               "log_probs": {0: "seq_len", 1: "batch"}}
            axes.update({n: {1: "batch"} for n in inputs[1:] + outputs[1:]})
            # With tied weights, this exporter's constant folding writes the shared embedding/decoder matrix twice
            # (classic_medium: 200 MB instead of the checkpoint's 114 MB). Unfolded it is stored once, and runtimes
            # fold the rest when they load the graph (onnxruntime does; measured at the same speed).
            torch.onnx.export(wrapper, (tokens, *state), str(path), input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=not tied)
        else:
            dims = {0: torch.export.Dim("seq_len"), 1: torch.export.Dim("batch")}
            # Tied weights: this exporter's optimizer folds the decoder's transpose of the shared matrix into a
            # second copy; unoptimised it is stored once (onnxruntime optimises when it loads the graph).
            program = torch.onnx.export(wrapper, (tokens,), input_names=inputs, output_names=outputs,
                                        dynamic_shapes=(dims,), opset_version=opset, dynamo=True, verbose=False,
                                        optimize=not tied)
            program.save(str(path))
    return inputs, outputs


def finish(path: Path, loaded, inputs: List[str], outputs: List[str], opset: int) -> None:
    """Check the written graph's interface and opset; add the vocabulary and config as metadata."""
    import onnx

    proto = onnx.load(str(path))
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise UserError(f"opset={opset}: the exporter wrote opset {got} instead; use opset={ExportConfig.opset} "
                        f"(the default)")
    init = {i.name for i in proto.graph.initializer}
    have = ([i.name for i in proto.graph.input if i.name not in init], [o.name for o in proto.graph.output])
    if have != (inputs, outputs):  # pragma: no cover - an exporter change
        raise RuntimeError(f"the exported graph has inputs {have[0]} and outputs {have[1]}, not {inputs} / {outputs}")
    # The torch.export-based exporter annotates every node with its Python stack trace (this machine's paths) and
    # FX names: most of a small model's file, and nothing a runtime reads.
    g = proto.graph
    for item in [*g.node, *g.initializer, *g.input, *g.output, *g.value_info]:
        del item.metadata_props[:]
    meta = {"vocab": json.dumps(loaded.vocab.itos, ensure_ascii=False),
            "model": json.dumps(loaded.config.model.effective()),
            "state": json.dumps(list(zip(inputs[1:], outputs[1:], strict=True)))}
    for key, value in meta.items():
        entry_ = proto.metadata_props.add()
        entry_.key, entry_.value = key, value
    proto.producer_name = "wordlm"
    onnx.save(proto, str(path))


# ---------------------------------------------------------------------------- verification
def verify(model: nn.Module, path: Path, vocab_size: int, inputs: List[str]) -> Optional[Dict[str, float]]:
    """Max |difference| between ``model`` and onnxruntime on ``path`` of the log-probs (``log_probs``) and of the
    returned states (``state``; 0 for a transformer), over two chunks of shapes other than the traced example's,
    the second carrying each side's own state from the first. None without onnxruntime."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    state = model.init_state(CHECK[0][1])
    ort_state = [s.numpy() for s in flat_state(state)]
    worst = {"log_probs": 0.0, "state": 0.0}
    with torch.no_grad():
        for seq_len, batch in CHECK:
            tokens = torch.randint(0, vocab_size, (seq_len, batch), generator=gen)
            log_probs, state = model(tokens, state)
            got = sess.run(None, {"tokens": tokens.numpy(), **dict(zip(inputs[1:], ort_state, strict=True))})
            for i, (mine, ref) in enumerate(zip(got, [log_probs, *flat_state(state)], strict=True)):
                key = "log_probs" if i == 0 else "state"
                worst[key] = max(worst[key], float(np.abs(mine - ref.numpy()).max()))
            ort_state = got[1:]
    return worst


# ---------------------------------------------------------------------------- the command
def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1][:200] if text else type(e).__name__


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def run(cfg: ExportConfig) -> Dict[str, Any]:
    """Export as ``cfg`` says; returns a summary (path, bytes, inputs, outputs, max_diff)."""
    validate(cfg)
    ckpt = need_checkpoint(cfg.checkpoint, "export.py")
    if not ckpt.is_file():
        raise UserError(f"checkpoint {ckpt} does not exist: check the path (runs keep them in <run>/checkpoints/)")
    out = output_path(cfg.out, ckpt, cfg.overwrite)
    need_packages()
    loaded = load_model(ckpt, "cpu")
    if loaded.weights != "trained":
        sys.stderr.write(f"wordlm: note: exporting the {loaded.weights} weights of {ckpt.name}\n")
    model = loaded.model.float().eval()
    vocab_size = len(loaded.vocab)
    if count_params(model) * 4 > MAX_BYTES:
        raise UserError(f"{ckpt}: the model's weights ({_size(count_params(model) * 4)} in fp32) exceed what one "
                        f"ONNX file holds (2 GiB); wordlm-export writes single files only")

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    done = False
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            inputs, outputs = export_onnx(model, tmp, vocab_size, cfg.opset)
        except RuntimeError as e:  # the TorchScript exporter refuses an opset it does not know
            if "opset" not in str(e).lower() or cfg.opset == ExportConfig.opset:
                raise
            raise UserError(f"opset={cfg.opset} is not one this torch's ONNX exporter writes ({_first_line(e)}); "
                            f"use opset={ExportConfig.opset} (the default)") from None
        finish(tmp, loaded, inputs, outputs, cfg.opset)
        diff = verify(model, tmp, vocab_size, inputs) if cfg.verify else None
        if diff is not None:
            shapes = " then ".join(f"({t}, {b})" for t, b in CHECK)
            found = f"log-probs {diff['log_probs']:.1e}" + (f", state {diff['state']:.1e}" if len(inputs) > 1 else "")
            sys.stderr.write(f"wordlm: verified with onnxruntime on tokens {shapes}: max |difference| from PyTorch: "
                             f"{found}\n")
            sys.stderr.flush()
            if not max(diff.values()) <= MAX_DIFF:
                raise UserError(f"verification failed: onnxruntime differs from PyTorch by up to {found} (> "
                                f"{MAX_DIFF:g}); nothing was written. verify=false writes the file anyway")
        elif cfg.verify:
            sys.stderr.write(f"wordlm: note: onnxruntime is not installed, so the file was not verified: {INSTALL}\n")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
        done = True
    except OSError as e:
        what = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
        raise UserError(f"cannot write {out}: {what}; nothing was written there. Free space or choose another "
                        f"out=FILE") from None
    finally:
        if not done:
            with contextlib.suppress(OSError):
                tmp.unlink()
    size = out.stat().st_size
    sys.stdout.write(f"wordlm: exported {out} ({_size(size)}, ONNX opset {cfg.opset}): inputs "
                     f"{', '.join(inputs)} -> outputs {', '.join(outputs)}\n")
    sys.stdout.flush()
    return {"path": str(out), "bytes": size, "inputs": inputs, "outputs": outputs, "max_diff": diff}


def _task(dc: Any) -> Dict[str, Any]:
    return run(build(ExportConfig, plain(dc)))


main = entry("export", _task)

if __name__ == "__main__":
    main()
