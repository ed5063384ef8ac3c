"""Generation from a checkpoint alone: parity with a full forward pass, filters, seeds, devices, errors."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import run_cli, train_args, write_corpus

from wordlm import checkpoint
from wordlm.config import Config, GenerateConfig, UserError
from wordlm.data.vocab import Vocab
from wordlm.generate import run as generate_run
from wordlm.generate import validate
from wordlm.models import build_model, model_config
from wordlm.sampling import Sampler, draw, encode_prompt, filter_logits, generate, join_words, prompt_words

V = 40  # vocabulary of the in-process models
# Tiny models on shared cores: one thread each (idle OpenMP threads spin and slow everyone down).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LSTM trained once per session by the real train.py (shared with test_evaluate.py)."""
    base = tmp_path_factory.getbasetemp() / "tiny-lstm"
    run_dir = base / "run"
    if not (run_dir / "metrics.json").is_file():
        corpus = write_corpus(base / "corpus")
        args = train_args(corpus, run_dir, "trainer.max_steps=20", "trainer.device=cpu")
        run_cli("train.py", args, env=ONE_THREAD, check=True)
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def ckpt(run_dir) -> Path:
    return run_dir / "checkpoints" / "best.pt"


def tiny_model(name: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name == "transformer":
        kw.setdefault("nhead", 2)
    cfg = model_config(name=name, emsize=16, nhid=24, nlayers=2, dropout=0.3, **kw)
    return build_model(cfg, V).eval()


def save_model_checkpoint(path: Path, name: str, bptt: int = 8) -> Path:
    """A weights-only wordlm checkpoint of an untrained model (enough to sample from)."""
    model = tiny_model(name)
    cfg = Config(model=model.cfg)
    cfg.trainer.bptt = bptt
    vocab = Vocab(["<unk>", "<eos>"] + [f"w{i}" for i in range(V - 2)])
    checkpoint.save(path, checkpoint.payload(cfg, vocab, model.state_dict()))
    return path


def gen_text(**kw) -> str:
    out = io.StringIO()
    generate_run(GenerateConfig(**{"progress": False, **kw}), stdout=out)
    return out.getvalue()


# ---------------------------------------------------------------------------- parity
def recorded_steps(model, prompt, n, context):
    seen = []
    gen = torch.Generator().manual_seed(3)
    out = generate(model, prompt, n, "cpu", start=1, context=context, generator=gen, on_logp=seen.append)
    return out, torch.stack(seen)  # (n, V)


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_rnn_step_logprobs_equal_one_full_forward(name):
    model = tiny_model(name)
    prompt = [5, 9, 1, 3, 17]
    out, steps = recorded_steps(model, prompt, 25, context=4)  # context is irrelevant to a stateful model
    seq = torch.tensor(prompt + out[:-1]).unsqueeze(1)  # (T, 1)
    with torch.no_grad():
        full, _ = model(seq)  # (T, 1, V)
    torch.testing.assert_close(steps, full[len(prompt) - 1 :, 0], atol=1e-5, rtol=0)


def test_transformer_step_logprobs_equal_one_full_forward_with_causal_mask():
    model = tiny_model("transformer")
    prompt = [5, 9, 1, 3, 17]
    out, steps = recorded_steps(model, prompt, 20, context=64)  # window holds everything
    seq = torch.tensor(prompt + out[:-1]).unsqueeze(1)
    with torch.no_grad():
        full, _ = model(seq)
    torch.testing.assert_close(steps, full[len(prompt) - 1 :, 0], atol=1e-5, rtol=0)
    # The parity above needs the causal mask: without it (the classic example's generator), row 0 sees the future.
    assert not torch.allclose(full[0, 0], _unmasked_first_row(model, seq), atol=1e-3)


def _unmasked_first_row(model, seq) -> torch.Tensor:
    """Row 0 of the transformer run WITHOUT a causal mask (what the classic example's generator did)."""
    with torch.no_grad():
        x = model.encoder(seq) * model.scale + model.positions(seq.size(0), seq.device)
        h = model.layers(x)  # no mask
        return torch.log_softmax(model.decoder(h), dim=-1)[0, 0]


def test_transformer_sliding_window_any_length():
    model = tiny_model("transformer")
    ctx = 6
    prompt = list(range(2, 16))  # longer than the window
    out, steps = recorded_steps(model, prompt, 15, context=ctx)
    seq = prompt + out
    for i in range(len(out)):
        # Each word sees the last ctx // 2 to ctx words (the key/value cache starts again from half a window when
        # it is full; tests/test_transformer.py follows the window exactly); the first, the prompt's last ctx.
        refs = []
        for n in range(ctx // 2, ctx + 1):
            with torch.no_grad():
                refs.append(model(torch.tensor(seq[: len(prompt) + i][-n:]).unsqueeze(1))[0][-1, 0])
        assert any(torch.allclose(steps[i], r, atol=1e-5, rtol=0) for r in refs), i
        if i == 0:
            torch.testing.assert_close(steps[0], refs[-1], atol=1e-5, rtol=0)


def test_long_prompt_reaches_an_rnn_in_chunks():
    model = tiny_model("gru")
    prompt = [int(t) for t in torch.randint(0, V, (700,), generator=torch.Generator().manual_seed(0))]
    s = Sampler(model, "cpu", context=8)
    logp = s.feed(prompt)
    with torch.no_grad():
        full, _ = model(torch.tensor(prompt).unsqueeze(1))
    torch.testing.assert_close(logp, full[-1, 0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- filters
def _logp(seed: int, n: int = 50) -> torch.Tensor:
    return torch.log_softmax(torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 2, dim=-1)


def test_draw_follows_the_distribution_and_never_picks_impossible_words():
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.0, 0.1, 0.0, 0.6, 0.3, 0.0])
    logp = torch.log(p)  # -inf where p = 0
    counts = torch.bincount(torch.tensor([draw(logp, 1.0, 0, 1.0, gen) for _ in range(4000)]), minlength=6)
    assert counts[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(counts.double() / 4000, p.double(), atol=0.03, rtol=0)
    with pytest.raises(ValueError, match="not finite"):
        draw(torch.full((6,), float("nan")), 1.0, 0, 1.0, gen)


def test_top_k_never_leaves_the_k_most_likely():
    gen = torch.Generator().manual_seed(0)
    for seed in range(5):
        logp = _logp(seed)
        allowed = set(torch.topk(logp, 5).indices.tolist())
        assert torch.isfinite(filter_logits(logp, top_k=5)).sum() == 5
        drawn = {draw(logp, 1.5, 5, 1.0, gen) for _ in range(300)}
        assert drawn <= allowed and len(drawn) > 1


def test_top_p_never_leaves_the_nucleus():
    gen = torch.Generator().manual_seed(0)
    for seed, p in [(0, 0.5), (1, 0.9), (2, 0.3)]:
        logp = _logp(seed)
        probs, idx = torch.sort(logp.exp(), descending=True)
        n = int((torch.cumsum(probs, 0) < p).sum()) + 1  # smallest prefix reaching p
        nucleus = set(idx[:n].tolist())
        kept = set(torch.nonzero(torch.isfinite(filter_logits(logp, top_p=p))).flatten().tolist())
        assert kept == nucleus
        drawn = {draw(logp, 1.0, 0, p, gen) for _ in range(300)}
        assert drawn <= nucleus
    # top-k and top-p together: top-p applies to what top-k left.
    logp = _logp(4)
    kept = torch.isfinite(filter_logits(logp, top_k=3, top_p=0.999)).sum()
    assert kept <= 3


def test_small_temperature_approaches_greedy():
    gen = torch.Generator().manual_seed(0)
    for seed in range(5):
        logp = _logp(seed)
        best = int(logp.argmax())
        assert all(draw(logp, 1e-4, 0, 1.0, gen) == best for _ in range(50))
        assert draw(logp, 1e-45, 0, 1.0, gen) == best  # no NaN even when logits/T underflow
    # A warmer temperature spreads: more distinct words than a colder one.
    logp = _logp(7)
    cold = {draw(logp, 0.2, 0, 1.0, gen) for _ in range(300)}
    hot = {draw(logp, 2.0, 0, 1.0, gen) for _ in range(300)}
    assert len(hot) > len(cold)


# ---------------------------------------------------------------------------- prompts and text
def test_prompt_tokenisation_and_unknown_words():
    vocab = Vocab(["<unk>", "<eos>", "the", "cat"])
    assert prompt_words("the cat\nthe") == ["the", "cat", "<eos>", "the"]
    _, ids, unknown = encode_prompt("the dog\ncat dog emu", vocab)
    assert ids == [2, 0, 1, 3, 0, 0]
    assert unknown == ["dog", "emu"]  # each said once
    assert join_words(["a", "b", "<eos>", "c"]) == "a b\nc"


def test_cli_prompt_seed_outf_and_clean_cwd(ckpt, tmp_path):
    """Prompt first, unknown words said once on stderr, same seed = same text, nothing but the output written."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    prompt = "w1 w2 zzz w3 zzz"
    p = run_cli("generate.py", [f"checkpoint={ckpt}", "words=40", f'prompt="{prompt}"', "seed=7"], cwd=cwd,
                env=ONE_THREAD, check=True)
    assert p.stdout.startswith(prompt)
    assert p.stderr.count("zzz") == 1 and "<unk>" in p.stderr
    assert "words/s" in p.stderr
    # 40 words: each is a word or a line break (the last line break may be the one closing the text).
    assert 39 <= len(p.stdout.split()) - 5 + p.stdout.count("\n") - 1 <= 40
    assert list(cwd.iterdir()) == []  # no outputs/, no .hydra, no log file
    # Same seed, same text: the CLI's stdout equals an in-process run written to outf.
    out = tmp_path / "out.txt"
    generate_run(GenerateConfig(checkpoint=str(ckpt), words=40, prompt=prompt, seed=7, outf=str(out), progress=False))
    assert out.read_text() == p.stdout


def test_same_seed_same_text_other_seed_other_text(ckpt):
    a = gen_text(checkpoint=str(ckpt), words=60, seed=5)
    assert a == gen_text(checkpoint=str(ckpt), words=60, seed=5)
    assert a != gen_text(checkpoint=str(ckpt), words=60, seed=6)


@pytest.mark.parametrize("name", ["transformer", "gru"])
def test_generation_of_any_length_from_checkpoint(tmp_path, name):
    path = save_model_checkpoint(tmp_path / f"{name}.pt", name, bptt=6)
    text = gen_text(checkpoint=str(path), words=80, top_k=10, top_p=0.9, temperature=0.8, prompt="w1 w2 w3")
    tokens = text.split()
    assert tokens[:3] == ["w1", "w2", "w3"]
    assert 79 <= len(tokens) - 3 + text.count("\n") - 1 <= 80  # each generated word: a word or a line break


# ---------------------------------------------------------------------------- devices
def all_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from all_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from all_tensors(v)


def as_if_saved_on_cuda(src: Path, dst: Path) -> Path:
    """Rewrite a checkpoint's storage locations from 'cpu' to 'cuda:0', as if written on a GPU."""
    with zipfile.ZipFile(src) as zin:
        names = zin.namelist()
        pkl = next(n for n in names if n.endswith("data.pkl"))
        data = zin.read(pkl)
        new = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
        assert new != data, "storage location tag not found: torch changed its pickle layout"
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
            for n in names:
                zout.writestr(n, new if n == pkl else zin.read(n))
    return dst


def test_load_maps_every_tensor_to_the_requested_device(ckpt):
    ck = checkpoint.load(ckpt, map_location="cpu")
    tensors = list(all_tensors(ck))
    assert len(tensors) > 5 and all(t.device.type == "cpu" for t in tensors)
    loaded = checkpoint.load_model(ckpt, "cpu")
    assert all(p.device.type == "cpu" for p in loaded.model.state_dict().values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the real CUDA test below runs instead")
def test_checkpoint_written_on_cuda_samples_on_cpu(ckpt, tmp_path):
    cuda_ck = as_if_saved_on_cuda(ckpt, tmp_path / "cuda.pt")
    with pytest.raises(RuntimeError, match="CUDA"):  # what happens without map_location on a CPU-only machine
        torch.load(cuda_ck, weights_only=True)
    tensors = list(all_tensors(checkpoint.load(cuda_ck, map_location="cpu")))
    assert all(t.device.type == "cpu" for t in tensors)
    assert gen_text(checkpoint=str(cuda_ck), words=30, device="auto") == gen_text(checkpoint=str(ckpt), words=30)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA GPU here: sampling a checkpoint trained on a real GPU on a CPU remains unchecked "
                           "(the CPU test above checks a checkpoint whose storages are tagged cuda:0)")
def test_cuda_trained_checkpoint_samples_on_cpu(tmp_path, corpus_dir):
    run_dir = tmp_path / "run"
    run_cli("train.py", train_args(corpus_dir, run_dir, "trainer.max_steps=5", "trainer.device=cuda"), check=True)
    ck = run_dir / "checkpoints" / "best.pt"
    p = run_cli("generate.py", [f"checkpoint={ck}", "words=20", "device=cpu"], check=True,
                env={"CUDA_VISIBLE_DEVICES": ""})
    assert len(p.stdout.split()) > 0


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("override, key", [
    ({"temperature": 0.0}, "temperature"), ({"temperature": -1.0}, "temperature"), ({"top_k": -1}, "top_k"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"words": 0}, "words"), ({"context": 0}, "context"),
    ({"device": "tpu"}, "device"),
])
def test_bad_values_are_clear_errors(override, key):
    with pytest.raises(UserError, match=key):
        validate(GenerateConfig(checkpoint="x.pt", **override))


def test_cli_errors_are_one_line(ckpt):
    p = run_cli("generate.py", [f"checkpoint={ckpt}", "temperature=0"], env=ONE_THREAD)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "wordlm: error: temperature=0.0 must be > 0 (near 0 = nearly greedy, 1 = the model's own distribution)"]


def test_missing_not_a_checkpoint_and_truncated_files(ckpt, tmp_path):
    cases = {}
    cases["missing"] = tmp_path / "missing.pt"
    (tmp_path / "text.pt").write_text("hello, I am not a checkpoint\n")
    cases["text"] = tmp_path / "text.pt"
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    cases["other"] = tmp_path / "other.pt"
    data = ckpt.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    cases["trunc"] = tmp_path / "trunc.pt"
    (tmp_path / "junk.pt").write_bytes(b"garbage" * 10)
    cases["junk"] = tmp_path / "junk.pt"
    expect = {"missing": "does not exist", "text": "not a wordlm checkpoint", "junk": "not a wordlm checkpoint",
              "other": "not a wordlm checkpoint", "trunc": "truncated"}
    for name, path in cases.items():
        with pytest.raises(UserError, match=expect[name]) as e:
            gen_text(checkpoint=str(path), words=5)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="checkpoint=PATH is required"):
        gen_text(words=5)


class Payload:
    """Unpickling this would run code: it would create the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_objects_are_refused_never_executed(tmp_path):
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "wordlm-checkpoint", "model": {}, "config": {}, "vocab": [], "x": Payload(str(marker))},
               evil)
    assert not marker.exists()
    with pytest.raises(UserError, match="refusing .* pickled Python objects"):
        gen_text(checkpoint=str(evil), words=5)
    assert not marker.exists(), "the checkpoint's pickled code ran"
    # The same object in the legacy (non-zip) format is never even unpickled.
    torch.save({"x": Payload(str(marker))}, evil, _use_new_zipfile_serialization=False)
    with pytest.raises(UserError, match="not a wordlm checkpoint"):
        gen_text(checkpoint=str(evil), words=5)
    assert not marker.exists(), "the checkpoint's pickled code ran"


def test_training_logs_a_sample_to_tensorboard(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    assert any(t.startswith("sample") for t in tags), tags
    text = acc.Tensors(next(t for t in tags if t.startswith("sample")))[-1].tensor_proto.string_val[0].decode()
    assert text.strip()
