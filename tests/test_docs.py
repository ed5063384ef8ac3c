"""The docs cannot drift from the code: every command in README.md and docs/*.md is extracted and run.

- every ``python train.py`` / ``torchrun ... train.py`` command composes through the real Hydra configs into a
  validated Config (fast), and, at tiny size on a tiny corpus, trains for two steps (slow);
- every ``generate.py`` / ``evaluate.py`` / ``export.py`` command runs on a tiny trained checkpoint (README's in
  the fast suite, the rest slow);
- every ``python -m wordlm.bench`` / ``wordlm.synthetic`` / ``wordlm-runs`` command parses with the tool's own
  parser.

Placeholders: ``outputs/RUN/checkpoints/best.pt`` (and any other ``checkpoint=``) is a tiny trained checkpoint,
``/path/to/corpus`` and ``data.dir=`` a tiny corpus, ``/tmp/...`` output folders a temporary folder.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_cli, train_args, write_corpus

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PREFIXES = ("python train.py", "python generate.py", "python evaluate.py", "python export.py", "python -m wordlm.",
            "wordlm-", "torchrun ")


def doc_commands():
    """(file name, command) for each command line in a code block of the docs."""
    out = []
    for f in DOCS:
        fenced = False
        for line in f.read_text().splitlines():
            if line.strip().startswith("```"):
                fenced = not fenced
                continue
            s = line.strip()
            if (fenced or line.startswith("    ")) and s.startswith(PREFIXES):
                out.append((f.name, s))
    return out


COMMANDS = doc_commands()


def _of(kind):
    return [pytest.param(c, id=f"{f}:{c[:90]}") for f, c in COMMANDS if _kind(c) == kind]


def _kind(cmd: str) -> str:
    words = shlex.split(cmd)
    if words[0] == "torchrun" or (len(words) > 1 and words[1] == "train.py") or words[0] == "wordlm-train":
        return "train"
    if words[0] == "wordlm-runs":
        return "tool"
    if words[0] == "python" and words[1] == "-m":
        return "tool" if words[2] in ("wordlm.bench", "wordlm.synthetic", "wordlm.runs") else "checkpoint"
    return "checkpoint"


def _substitute(arg: str, corpus: Path, ckpt: Path, tmp: Path) -> str:
    arg = arg.replace("/path/to/corpus", str(corpus))
    arg = re.sub(r"^checkpoint=.*", f"checkpoint={ckpt}", arg)
    arg = re.sub(r"^(trainer\.init_from|trainer\.resume)=outputs/.*", rf"\1={ckpt}", arg)
    arg = re.sub(r"^data\.dir=/tmp/.*", f"data.dir={corpus}", arg)
    arg = re.sub(r"<64 hex digits>", "0" * 64, arg)
    return arg


def _train_overrides(cmd: str, corpus: Path, ckpt: Path, tmp: Path):
    """The Hydra overrides of a documented train command, one list per job of a sweep."""
    words = shlex.split(cmd)
    args = words[words.index("train.py") + 1:] if "train.py" in words else words[1:]
    args = [_substitute(a, corpus, ckpt, tmp) for a in args if a not in ("--multirun", "-m")]
    args = [a for a in args if not a.startswith("hydra.")]
    jobs = [[]]
    for a in args:
        key, _, value = a.partition("=")
        if re.match(r"^(interval|range|choice|tag)\(", value):  # a search space (Optuna): its first value
            value = value[value.rfind("(") + 1:].split(",")[0].strip(" )")
            a = f"{key}={value}"
        if "," in value and not value.startswith("["):  # a sweep: each value is a job
            jobs = [[*j, f"{key}={v}"] for j in jobs for v in value.split(",")]
        else:
            jobs = [[*j, a] for j in jobs]
    return jobs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny corpus and a run trained on it (its best.pt stands for every documented checkpoint)."""
    tmp = tmp_path_factory.mktemp("docs")
    corpus = write_corpus(tmp / "corpus", {"train": 120, "valid": 20, "test": 20})
    run = tmp / "run"
    run_cli("train.py", train_args(corpus, run, "trainer.max_steps=6"), check=True)
    return corpus, run / "checkpoints" / "best.pt", tmp


def test_the_docs_hold_commands_of_every_kind():
    kinds = {_kind(c) for _, c in COMMANDS}
    assert {"train", "checkpoint", "tool"} <= kinds and len(COMMANDS) >= 30


@pytest.mark.parametrize("cmd", _of("train"))
def test_every_documented_train_command_composes_into_a_valid_config(cmd, tmp_path):
    from hydra import compose, initialize_config_dir

    from wordlm.compose import register_configs, to_config
    from wordlm.config import conf_dir

    corpus = tmp_path / "corpus"
    register_configs()
    for overrides in _train_overrides(cmd, corpus, tmp_path / "best.pt", tmp_path):
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = to_config(compose(config_name="config", overrides=overrides))
        assert cfg.model.name and cfg.trainer.epochs >= 1


# Sizes that fit every preset's shapes (8 and 10 heads divide 40), for two steps on the tiny corpus.
SHRINK = ["model.emsize=40", "model.nhid=40", "model.nlayers=1", "trainer.batch_size=4", "trainer.eval_batch_size=4",
          "trainer.bptt=8", "trainer.max_steps=2", "trainer.sample_words=0", "trainer.progress=false",
          "trainer.threads=1", "trainer.max_minutes=5", "trainer.epochs=1", "model.cutoffs=[5,10]"]


@pytest.mark.slow
@pytest.mark.parametrize("cmd", _of("train"))
def test_every_documented_train_command_trains_at_tiny_size(cmd, tiny, tmp_path):
    corpus, ckpt, _ = tiny
    for i, overrides in enumerate(_train_overrides(cmd, corpus, ckpt, tmp_path)):
        overrides = [o for o in overrides if not o.startswith(("data=", "data.", "trainer.device"))]
        keys = {o.split("=", 1)[0] for o in overrides}
        shrink = [s for s in SHRINK if s.split("=", 1)[0] not in keys or s.startswith("trainer.max_")]
        preset = next((o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")), "")
        sized = preset and "last_nhid" in (ROOT / "conf" / "experiment" / f"{preset}.yaml").read_text()
        shrink += ["model.last_nhid=40"] if "awd" in cmd or sized else []  # (the AWD-style tied last layer)
        # the limits last (the last value of a key wins): two steps, whatever the command's budget
        limits = [x for x in shrink if x.startswith("trainer.max_")]
        base = ["data=custom", f"data.dir={corpus}", *[x for x in shrink if x not in limits]]
        if any(o.startswith("trainer.init_from=") for o in overrides):  # a first stage of the same shape
            first = tmp_path / f"first{i}"
            run_cli("train.py", [*base, *[o for o in overrides if not o.startswith("trainer.init_from=")],
                                 "optim.finetune=false", *limits, f"hydra.run.dir={first}"], timeout=300, check=True)
            overrides = [f"trainer.init_from={first / 'checkpoints' / 'best.pt'}" if o.startswith(
                "trainer.init_from=") else o for o in overrides]
        p = run_cli("train.py", [*base, *overrides, *limits, f"hydra.run.dir={tmp_path / str(i)}"], timeout=300)
        assert p.returncode == 0, f"{cmd}\n{p.stderr[-2000:]}"


def _checkpoint_args(cmd: str, corpus: Path, ckpt: Path, tmp: Path):
    words = shlex.split(cmd)
    script = {"generate.py": "generate.py", "evaluate.py": "evaluate.py", "export.py": "export.py"}.get(words[1])
    if words[0] == "python" and words[1] == "-m":
        script, args = None, ["-m", words[2], *words[3:]]
    else:
        args = words[2:]
    args = [_substitute(a, corpus, ckpt, tmp) for a in args]
    if script == "export.py":
        args.append(f"out={tmp / 'model.onnx'}")
    if any(a.startswith("eval_context=") for a in args):  # (the docs' transformer was trained at bptt 35)
        args.append("bptt=35")
    if script == "generate.py":
        args = [re.sub(r"^words=\d+", "words=50", a) for a in args] + ["progress=false"]
    return script, args


def _run_checkpoint_command(cmd: str, tiny, tmp_path):
    corpus, ckpt, _ = tiny
    script, args = _checkpoint_args(cmd, corpus, ckpt, tmp_path)
    if script is None:
        p = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    else:
        p = run_cli(script, args, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, f"{cmd}\n{p.stderr[-2000:]}"


@pytest.mark.parametrize("cmd", [c for f, c in COMMANDS if f == "README.md" and _kind(c) == "checkpoint"])
def test_the_readme_checkpoint_commands_run(cmd, tiny, tmp_path):
    _run_checkpoint_command(cmd, tiny, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("cmd", [c for f, c in COMMANDS if f != "README.md" and _kind(c) == "checkpoint"])
def test_every_documented_checkpoint_command_runs(cmd, tiny, tmp_path):
    _run_checkpoint_command(cmd, tiny, tmp_path)


@pytest.mark.parametrize("cmd", _of("tool"))
def test_every_documented_tool_command_parses(cmd):
    from wordlm import bench, runs, synthetic

    words = shlex.split(cmd)
    if words[0] == "wordlm-runs":
        words = ["python", "-m", "wordlm.runs", *words[1:]]
    tool = {"wordlm.bench": bench, "wordlm.synthetic": synthetic, "wordlm.runs": runs}[words[2]]
    a = tool.parser().parse_args(words[3:])
    if tool is bench:
        bench.check(a.__class__(**{**vars(a), "data": None, "tokenize": None, "baseline": None}))


def test_the_readme_is_a_short_read_and_every_relative_link_resolves():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300
    broken = []
    for f in DOCS + [ROOT / "docs" / "architecture.md"]:
        text = f.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            dest = (f.parent / path).resolve() if path else f
            if not dest.is_file():
                broken.append(f"{f.name}: {target}")
                continue
            if anchor:
                heads = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                         for h in re.findall(r"^#+ (.*)$", dest.read_text(), re.M)}
                if anchor not in heads:
                    broken.append(f"{f.name}: {target}")
    assert not broken, broken
