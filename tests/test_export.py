"""wordlm-export: ONNX graphs equal to the PyTorch models (every model type, other lengths and batches than the
traced ones, carried state), the file's interface and metadata, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from wordlm import checkpoint
from wordlm import export as wexport
from wordlm.config import Config, ExportConfig, UserError
from wordlm.data.vocab import Vocab
from wordlm.models import build_model, count_params, model_config

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

V = 40  # vocabulary of the in-process models
TOL = 1e-4
ONE_THREAD = {"OMP_NUM_THREADS": "1"}

# (model name, config values, expected input names after tokens)
CASES = [
    ("lstm", {}, ["h0", "c0"]),
    ("gru", {}, ["h0"]),
    ("rnn_tanh", {}, ["h0"]),
    ("rnn_relu", {"tied": True, "nhid": 16}, ["h0"]),
    # AWD-LSTM: layer by layer (locked dropout, weight drop, a last layer of its own size, tied)
    ("lstm", {"wdrop": 0.5, "locked": True, "last_nhid": 16, "tied": True}, ["h0_0", "c0_0", "h0_1", "c0_1"]),
    ("gru", {"locked": True}, ["h0_0", "h0_1"]),
    ("transformer", {}, []),
    ("transformer", {"tied": True}, []),
    ("transformer", {"norm_first": True, "activation": "gelu", "positions": "learned", "max_len": 80,
                     "init": "scaled", "tied": True}, []),
    ("transformer", {"bias": False}, []),
    # adaptive softmax and adaptive input (wordlm.models.words)
    ("lstm", {"softmax": "adaptive", "cutoffs": [8, 20]}, ["h0", "c0"]),
    ("transformer", {"softmax": "adaptive", "adaptive_input": True, "tied": True, "cutoffs": [8, 20]}, []),
]
IDS = ["lstm", "gru", "rnn_tanh", "rnn_relu_tied", "awd_lstm", "layered_gru", "transformer", "transformer_tied",
       "transformer_prenorm_gelu_learned", "transformer_nobias", "lstm_adaptive_softmax",
       "transformer_adaptive_tied"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(name: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name == "transformer":
        kw.setdefault("nhead", 2)
    kw = {"emsize": 16, "nhid": 24, "nlayers": 2, "dropout": 0.3, **kw}
    return build_model(model_config(name=name, **kw), V).eval()


def save_checkpoint(path: Path, name: str = "lstm", **kw) -> Path:
    model = tiny_model(name, **kw)
    vocab = Vocab(["<unk>", "<eos>"] + [f"w{i}" for i in range(V - 2)])
    checkpoint.save(path, checkpoint.payload(Config(model=model.cfg), vocab, model.state_dict()))
    return path


def session(path: Path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def flat(state) -> list:
    return wexport.flat_state(state)


# ---------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name,kw,state_inputs", CASES, ids=IDS)
def test_onnx_equals_pytorch(tmp_path, name, kw, state_inputs):
    """log-probs and states within 1e-4 at two (seq_len, batch) shapes other than the traced (7, 3), and a second
    chunk fed the returned state equals PyTorch's carried-state result."""
    model = tiny_model(name, **kw)
    with torch.no_grad():  # a transformer now caches positions for 64: the graph must not bake that table in
        model(torch.randint(0, V, (20, 2)))
    path = tmp_path / "m.onnx"
    inputs, outputs = wexport.export_onnx(model, path, V, ExportConfig.opset)
    assert inputs == ["tokens", *state_inputs]
    assert outputs == ["log_probs", *[n.replace("0", "1", 1) for n in state_inputs]]
    stored = sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)
    assert stored <= count_params(model) + 100  # tied weights stored once (a little room for small constants)
    sess = session(path)
    assert [i.name for i in sess.get_inputs()] == inputs and [o.name for o in sess.get_outputs()] == outputs
    tok = sess.get_inputs()[0]
    assert tok.type == "tensor(int64)" and all(isinstance(d, str) for d in tok.shape)  # both axes dynamic
    assert sess.get_outputs()[0].type == "tensor(float)"
    for i in sess.get_inputs()[1:]:
        assert isinstance(i.shape[1], str) and isinstance(i.shape[0], int) and isinstance(i.shape[2], int)

    gen = torch.Generator().manual_seed(3)
    worst = {"log_probs": 0.0, "state": 0.0}
    for seq_len, batch in [(70, 2), (3, 5)]:  # 70: longer than the example and than a transformer's cached table
        state = model.init_state(batch)
        state = None if state is None else type(state)(torch.randn(s.shape, generator=gen) * 0.5 for s in flat(state)) \
            if isinstance(state, tuple) else torch.randn(state.shape, generator=gen) * 0.5
        ort_state = [s.numpy() for s in flat(state)]
        for chunk in (seq_len, 4):  # the second chunk carries each side's own returned state
            tokens = torch.randint(0, V, (chunk, batch), generator=gen)
            with torch.no_grad():
                log_probs, state = model(tokens, state)
            got = sess.run(None, {"tokens": tokens.numpy(), **dict(zip(inputs[1:], ort_state, strict=True))})
            assert got[0].shape == (chunk, batch, V) and got[0].dtype == np.float32
            refs = [log_probs, *flat(state)]
            assert len(got) == len(refs)
            for j, (mine, ref) in enumerate(zip(got, refs, strict=True)):
                assert mine.shape == tuple(ref.shape)
                key = "log_probs" if j == 0 else "state"
                worst[key] = max(worst[key], float(np.abs(mine - ref.numpy()).max()))
            ort_state = got[1:]
    print(f"{name} {kw}: max |diff| {worst}")
    assert worst["log_probs"] < TOL and worst["state"] < TOL, worst


def test_state_names():
    assert wexport.state_names(tiny_model("lstm", nlayers=1)) == [("h0", "h1"), ("c0", "c1")]
    assert wexport.state_names(tiny_model("rnn_relu", nlayers=3)) == [("h0", "h1")]
    layered = tiny_model("rnn_tanh", nlayers=3, wdrop=0.1)
    assert wexport.state_names(layered) == [("h0_0", "h1_0"), ("h0_1", "h1_1"), ("h0_2", "h1_2")]
    assert wexport.state_names(tiny_model("transformer")) == []


# ---------------------------------------------------------------------------- the command
def test_cli_exports_next_to_the_checkpoint_and_refuses_to_overwrite(tmp_path):
    """The real command: default out=<checkpoint>.onnx, verified, one summary line; the file carries the vocabulary
    and scores like the model; a second run refuses to replace it."""
    ck = save_checkpoint(tmp_path / "best.pt", "lstm")
    p = run_cli("export.py", [f"checkpoint={ck}"], env=ONE_THREAD, check=True)
    out = tmp_path / "best.onnx"
    assert out.is_file()
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "tokens, h0, c0" in lines[0] and "log_probs, h1, c1" in lines[0]
    assert "verified with onnxruntime" in p.stderr and "Warning" not in p.stderr, p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["best.onnx", "best.pt"]  # no temporary left

    sess = session(out)
    meta = sess.get_modelmeta().custom_metadata_map
    loaded = checkpoint.load_model(ck)
    assert json.loads(meta["vocab"]) == loaded.vocab.itos
    assert json.loads(meta["state"]) == [["h0", "h1"], ["c0", "c1"]]
    assert json.loads(meta["model"])["name"] == "lstm"
    ids = torch.tensor([[loaded.vocab.stoi[w]] for w in "w1 w2 w3".split()])  # (3, 1)
    zeros = np.zeros((2, 1, 24), np.float32)
    lp, _, _ = sess.run(None, {"tokens": ids.numpy(), "h0": zeros, "c0": zeros})
    with torch.no_grad():
        ref, _ = loaded.model.eval()(ids)
    assert np.abs(lp - ref.numpy()).max() < TOL

    before = out.read_bytes()
    p = run_cli("export.py", [f"checkpoint={ck}"], env=ONE_THREAD)
    assert p.returncode == 2
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err and "overwrite=true" in err and "out=" in err, err
    assert out.read_bytes() == before


def run_export(**kw):
    return wexport.run(ExportConfig(**kw))


def test_refusals(tmp_path):
    ck = save_checkpoint(tmp_path / "m.pt", "gru")
    with pytest.raises(UserError, match=r"checkpoint .*nope\.pt does not exist"):
        run_export(checkpoint=str(tmp_path / "nope.pt"))
    with pytest.raises(UserError, match="checkpoint=PATH is required"):
        run_export()
    with pytest.raises(UserError, match=r"use format=onnx"):
        run_export(checkpoint=str(ck), format="tflite")
    with pytest.raises(UserError, match=r"opset=18 or newer"):
        run_export(checkpoint=str(ck), opset=13)
    with pytest.raises(UserError, match=r"newer than"):
        run_export(checkpoint=str(ck), opset=99)
    other = save_checkpoint(tmp_path / "other.pt", "gru")
    for out in (other, tmp_path / "x.pth", ck):  # never over a checkpoint, even with overwrite=true
        with pytest.raises(UserError, match="never writes over"):
            run_export(checkpoint=str(ck), out=str(out), overwrite=True)
    with pytest.raises(UserError, match="is a folder"):
        run_export(checkpoint=str(ck), out=str(tmp_path))
    existing = tmp_path / "taken.onnx"
    existing.write_text("keep")
    with pytest.raises(UserError, match="overwrite=true"):
        run_export(checkpoint=str(ck), out=str(existing))
    assert existing.read_text() == "keep"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.pt", "other.pt", "taken.onnx"]


def test_overwrite_and_custom_out(tmp_path, capsys):
    ck = save_checkpoint(tmp_path / "m.pt", "rnn_tanh", nlayers=1)
    out = tmp_path / "sub" / "served.onnx"  # the folder is made
    result = run_export(checkpoint=str(ck), out=str(out), opset=20)
    assert result["max_diff"]["log_probs"] < TOL and result["inputs"] == ["tokens", "h0"]
    assert {o.domain: o.version for o in onnx.load(str(out)).opset_import}.get("", None) == 20
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1 and str(out) in printed and "kB" in printed
    out.write_text("old")
    run_export(checkpoint=str(ck), out=str(out), overwrite=True, verify=False)
    assert onnx.load(str(out)).graph.input[0].name == "tokens"


def test_failed_verification_writes_nothing(tmp_path, monkeypatch):
    ck = save_checkpoint(tmp_path / "m.pt", "lstm", nlayers=1)
    out = tmp_path / "m.onnx"
    out.write_text("previous")
    monkeypatch.setattr(wexport, "verify", lambda *a, **k: {"log_probs": 0.5, "state": 0.0})
    with pytest.raises(UserError, match=r"verification failed.*nothing was written"):
        run_export(checkpoint=str(ck), overwrite=True)
    assert out.read_text() == "previous"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.onnx", "m.pt"]  # no temporary left


def test_missing_packages_say_how_to_install(tmp_path, monkeypatch):
    import importlib.util

    ck = save_checkpoint(tmp_path / "m.pt", "gru", nlayers=1)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnxscript" else real(n, *a))
    with pytest.raises(UserError, match=r'onnxscript.*pip install "wordlm\[export\]"'):
        run_export(checkpoint=str(ck))
    assert not (tmp_path / "m.onnx").exists()
