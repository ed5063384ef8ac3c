"""wordlm-runs: a table of the runs under folders, read from their metrics.json files."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


def runs(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wordlm.runs", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


@pytest.fixture(scope="module")
def folder(trained, tmp_path_factory) -> Path:
    """A real tiny run, a second one (its copy with another name, config and score), and a corrupted one."""
    root = tmp_path_factory.mktemp("runs")
    shutil.copytree(trained, root / "a" / "run1", ignore=shutil.ignore_patterns("checkpoints", "tb"))
    m = json.loads((trained / "metrics.json").read_text())
    m.update(run_name="second", best_valid_ppl=m["best_valid_ppl"] - 1, status="interrupted",
             test_ppl_dynamic=12.5, config={**m["config"], "model.name": "gru"})
    (root / "b" / "nested").mkdir(parents=True)
    (root / "b" / "nested" / "metrics.json").write_text(json.dumps(m))
    (root / "broken").mkdir()
    (root / "broken" / "metrics.json").write_text('{"status": "compl')
    (root / "odd").mkdir()
    (root / "odd" / "metrics.json").write_text(json.dumps({**m, "run_name": "odd", "seconds": "x"}))
    return root


def test_every_run_is_a_row_and_a_corrupted_one_is_listed_as_unreadable(folder, trained):
    p = runs(str(folder))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split()[:7] == ["run", "status", "stop", "epochs", "minutes", "valid", "test"]
    assert "test_dynamic" in lines[0]  # shown because one run has it
    m = json.loads((trained / "metrics.json").read_text())
    body = lines[1:]
    assert len(body) == 4
    assert body[0].startswith("second") and body[1].startswith(m["run_name"])  # sorted by best valid
    assert f"{m['best_valid_ppl']:.2f}" in body[1] and f"{m['test_ppl']:.2f}" in body[1]
    unreadable = sorted(b.split()[0] for b in body[2:])
    assert unreadable == ["broken", "odd"] and all("unreadable" in b for b in body[2:])


def test_sort_filter_and_formats(folder, trained):
    m = json.loads((trained / "metrics.json").read_text())
    p = runs(str(folder), "--format", "json", "--status", "completed", "--status", "interrupted", "--sort", "valid",
             "--reverse")
    rows = json.loads(p.stdout)
    assert [r["run"] for r in rows] == [m["run_name"], "second"]
    assert rows[0]["valid"] == m["best_valid_ppl"] and rows[0]["folder"].endswith("run1")
    p = runs(str(folder), "--where", "model.name=gru", "--format", "csv")
    table = list(csv.DictReader(io.StringIO(p.stdout)))
    assert [r["run"] for r in table] == ["second"] and table[0]["test_dynamic"] == "12.5"
    p = runs(str(folder), "--where", "model.name=transformer", "--format", "markdown")
    assert p.returncode == 0 and p.stdout.startswith("| run |") and "none matches" in p.stderr


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "does not exist"),
    (["{empty}"], "no runs under"),
    (["{folder}", "--sort", "speed"], "--sort speed: use one of"),
    (["{folder}", "--where", "model.name"], "--where model.name: use KEY=VALUE"),
])
def test_mistakes_are_one_line(folder, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    fill = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "folder": folder}
    p = runs(*[a.format(**fill) for a in args])
    assert p.returncode == 2 and p.stdout == "" and message in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_it_reads_no_torch():
    code = "import sys, wordlm.runs; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_runs_gathered_by_symlinks_are_found_once_and_a_loop_ends(folder, tmp_path):
    """A folder of links to runs kept elsewhere lists them; a link back up the tree does not loop; a run reached
    twice (by its link and its own folder) is one row."""
    gathered = tmp_path / "gathered"
    gathered.mkdir()
    (gathered / "first").symlink_to(folder / "a" / "run1", target_is_directory=True)
    (gathered / "loop").symlink_to(gathered, target_is_directory=True)
    p = runs(str(gathered), "--format", "json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    assert len(rows) == 1 and rows[0]["folder"].endswith("first")
    p = runs(str(gathered), str(folder / "a"), "--format", "json")
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout)) == 1
