"""Sweeps through Hydra's own plugins: Optuna studies (hparams_search), parallel trials (joblib), SLURM (submitit).

Every study here is real: Hydra's Optuna sweeper runs real training jobs of a tiny model, in a subprocess, as a
user's command would."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY, run_cli, write_corpus

SEARCHES = sorted(p.stem for p in (ROOT / "conf" / "hparams_search").glob("*.yaml"))
# Two optimizer steps per trial, every trial's output quiet.
STEPS = ["trainer.max_steps=2", "trainer.sample_words=0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("c") / "corpus", {"train": 120, "valid": 20, "test": 20})


def sweep(corpus: Path, folder: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    # (TINY's model.dropout=0.0 left out: a key fixed on the command line is not searched)
    tiny = [a for a in TINY if not a.startswith("model.dropout=")]
    return run_cli("train.py", ["-m", "data=custom", f"data.dir={corpus}", *tiny, *STEPS, *args,
                                f"hydra.sweep.dir={folder}"], timeout=timeout)


# A failing trial beside a good one: a NaN loss from step 1 on (fault injection) in the trial that draws 1. The
# random sampler with seed 8 draws 1000, then 1 (each test checks both were drawn). Not the grid sampler: with
# Optuna 2.10 it stops the study from inside its last trial, which the sweeper does not survive when that trial
# failed.
DIVERGE = ["hydra/sweeper=optuna", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=8",
           "hydra.sweeper.n_trials=2", "trainer.debug_nan_steps=5", "trainer.max_bad_steps=1"]


def trials(folder: Path) -> dict:
    """{trial folder name: its metrics.json}"""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(folder.glob("*/metrics.json"))}


def one_error_line(p: subprocess.CompletedProcess) -> str:
    lines = [line for line in p.stderr.splitlines() if line.startswith("wordlm: error:")]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("name", SEARCHES)
def test_each_search_config_composes_and_searches_keys_that_exist(name):
    """Each shipped search: Optuna, a failed trial does not end the study, a budget per trial, and every key of
    its space is a key of the recipe it searches (a typo would fail only when the study runs)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from wordlm.compose import register_configs, to_config
    from wordlm.config import conf_dir

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        dc = compose(config_name="config", overrides=[f"hparams_search={name}"], return_hydra_config=True)
    sweeper = dc.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert sweeper.max_failure_rate == 1.0 and 4 <= sweeper.n_trials <= 12 and sweeper.sampler.seed is not None
    assert dc.trainer.max_minutes and dc.trainer.max_minutes <= 5  # a laptop finishes the study in under an hour
    job = OmegaConf.masked_copy(dc, [k for k in dc if k != "hydra"])
    cfg = to_config(job)
    for key in sweeper.params:
        assert OmegaConf.select(job, key, default="absent") != "absent", f"{name} searches {key}, not a key"
    if name != "classic":  # the search of a recipe runs that recipe
        assert cfg.model.name == ("transformer" if "transformer" in name else "lstm") and cfg.model.tied


def test_a_real_study_minimises_the_best_validation_and_lists_its_trials(corpus, tmp_path):
    folder = tmp_path / "study"
    p = sweep(corpus, folder, "hparams_search=classic", "hydra.sweeper.n_trials=3")
    assert p.returncode == 0, p.stderr[-3000:]
    found = trials(folder)
    assert len(found) == 3 and all(m["status"] == "completed" for m in found.values())
    result = yaml.safe_load((folder / "optimization_results.yaml").read_text())
    best = min(m["best_valid_ppl"] for m in found.values())
    assert result["best_value"] == pytest.approx(best, rel=1e-12)  # the number the run returned to the sweeper
    assert set(result["best_params"]) == {"optim.lr", "model.dropout", "trainer.clip"}
    # Each trial ran with the values the sweeper chose (and its folder's name says which, rounded).
    lrs = sorted(m["config"]["optim.lr"] for m in found.values())
    assert len(set(lrs)) == 3 and all(5.0 <= v <= 40.0 for v in lrs)
    assert any(f"lr-{result['best_params']['optim.lr']:.4g}" in name for name in found)
    # The table of runs reads the study's folder.
    table = subprocess.run([sys.executable, "-m", "wordlm.runs", str(folder), "--sort", "valid", "--format", "json"],
                           capture_output=True, text=True, timeout=60)
    rows = json.loads(table.stdout)
    assert len(rows) == 3 and rows[0]["valid"] == pytest.approx(best)


def test_a_diverging_trial_is_a_failed_trial_and_the_study_goes_on(corpus, tmp_path):
    """A NaN loss from the first step in one trial (fault injection): that trial is recorded as failed, in its own
    folder too, the other one completes, and the study returns the objective it was asked for (test/ppl)."""
    folder = tmp_path / "study"
    p = sweep(corpus, folder, *DIVERGE, "hydra.sweeper.max_failure_rate=1", "trainer.debug_nan_at_step=choice(1,1000)",
              "sweep.objective=test/ppl")
    assert p.returncode == 0, p.stderr[-3000:]
    found = trials(folder)
    status = {m["config"]["trainer.debug_nan_at_step"]: m for m in found.values()}
    assert sorted(status) == [1, 1000]
    assert status[1]["status"] == "failed" and status[1]["stop_reason"] == "bad_steps"
    assert status[1000]["status"] == "completed"
    assert sum(line.startswith("wordlm: error:") for line in p.stderr.splitlines()) == 1  # the failed trial's line
    result = yaml.safe_load((folder / "optimization_results.yaml").read_text())
    assert result["best_params"] == {"trainer.debug_nan_at_step": 1000}
    assert result["best_value"] == pytest.approx(status[1000]["test_ppl"], rel=1e-12)
    assert result["best_value"] != pytest.approx(status[1000]["best_valid_ppl"], rel=1e-9)


def test_a_study_whose_trials_all_fail_ends_in_one_line(corpus, tmp_path):
    folder = tmp_path / "study"
    p = sweep(corpus, folder, *DIVERGE, "hydra.sweeper.max_failure_rate=1", "trainer.debug_nan_at_step=choice(1,2)",
              "trainer.max_steps=4")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [line for line in p.stderr.splitlines() if line.startswith("wordlm: error:")]
    assert len(lines) == 3 and "no trial of the study completed" in lines[-1]  # each trial's line, then the study's
    assert [m["status"] for m in trials(folder).values()] == ["failed", "failed"]


def test_without_max_failure_rate_the_first_failed_trial_stops_the_study_in_one_line(corpus, tmp_path):
    folder = tmp_path / "study"
    p = sweep(corpus, folder, *DIVERGE, "hydra.sweeper.n_jobs=1", "trainer.debug_nan_at_step=choice(1,1000)")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    last = p.stderr.splitlines()[-1]
    assert last.startswith("wordlm: error: a job of the sweep failed") and "max_failure_rate=1" in last, last
    # The first trial (1000) completed, the second (1) failed and ended the study: no results were written.
    assert sorted(m["status"] for m in trials(folder).values()) == ["completed", "failed"]
    assert not (folder / "optimization_results.yaml").exists()


@pytest.mark.parametrize("args, words", [
    (["sweep.objective=valid/nope"], ["sweep.objective='valid/nope' is not a number of metrics.json",
                                      "valid/best_ppl"]),
    (["sweep.objective=test/ppl_dynamic"], ["trainer.final_eval=dynamic|both"]),
    (["sweep.objective=seconds_to_target"], ["trainer.target_ppl"]),
])
def test_an_objective_that_is_not_in_metrics_json_is_one_line_before_any_trial_trains(corpus, tmp_path, args, words):
    folder = tmp_path / "study"
    p = sweep(corpus, folder, "hparams_search=classic", "hydra.sweeper.n_trials=2", *args)
    line = one_error_line(p)
    assert all(w in line for w in words), line
    assert not list(folder.glob("*/metrics.json")) and not list(folder.glob("*/checkpoints"))


def test_an_unknown_search_config_and_a_misspelt_key_in_a_search_space_are_one_line(corpus, tmp_path):
    line = one_error_line(sweep(corpus, tmp_path / "a", "hparams_search=nope"))
    assert "hparams_search/nope" in line and "classic" in line  # the available searches are named
    line = one_error_line(sweep(corpus, tmp_path / "b", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=1",
                                "optim.lrr=interval(1,2)"))
    assert "optim.lrr" in line and "Did you mean optim.lr?" in line, line


def test_asking_for_a_plugin_that_is_not_installed_names_the_extra(corpus, tmp_path):
    """Each plugin made unimportable (as where wordlm[sweep] is not installed): one line, before anything runs."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.startswith(('hydra_plugins.hydra_optuna_sweeper', 'hydra_plugins.hydra_joblib_launcher',\n"
        "                            'hydra_plugins.hydra_submitit_launcher')):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n")
    env = {"PYTHONPATH": os.pathsep.join([str(block), os.environ.get("PYTHONPATH", "")])}
    for args, plugin in ((["-m", "hparams_search=classic"], "Optuna sweeper"),
                         (["-m", "hydra/sweeper=optuna"], "Optuna sweeper"),
                         (["-m", "hydra/launcher=joblib"], "joblib launcher"),
                         (["-m", "hydra/launcher=slurm"], "submitit launcher")):
        p = run_cli("train.py", [*args, f"hydra.sweep.dir={tmp_path / 'never'}"], env=env)
        line = one_error_line(p)
        assert plugin in line and "pip install 'wordlm[sweep]'" in line, line
    assert not (tmp_path / "never").exists()


def test_the_slurm_launcher_config_composes():
    """It cannot run here (no cluster): the documented config must at least compose into submitit's launcher."""
    for choice, timeout in (("slurm", 240), ("submitit_slurm", 60)):
        p = run_cli("train.py", [f"hydra/launcher={choice}", "hydra.launcher.partition=gpu", "--cfg", "hydra"])
        assert p.returncode == 0, p.stderr[-2000:]
        launcher = yaml.safe_load(p.stdout)["hydra"]["launcher"]
        assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
        assert launcher["partition"] == "gpu" and launcher["timeout_min"] == timeout
    assert launcher["submitit_folder"].startswith("${hydra.sweep.dir}")


@pytest.mark.slow
def test_joblib_runs_trials_at_once_with_the_cores_split_between_them(corpus, tmp_path):
    folder = tmp_path / "study"
    p = sweep(corpus, folder, "hparams_search=classic", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
              "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=2", "trainer.threads=null", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    found = trials(folder)
    assert len(found) == 2 and all(m["status"] == "completed" for m in found.values())
    cores = len(os.sched_getaffinity(0))
    assert all(m["config"]["trainer.threads"] == max(1, cores // 2) for m in found.values())
    # the launcher ran them as one batch of two processes
    assert re.search(r"Joblib\.Parallel\(n_jobs=2,[^)]*\) is launching 2 jobs", p.stdout + p.stderr)
    result = yaml.safe_load((folder / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(min(m["best_valid_ppl"] for m in found.values()), rel=1e-12)
