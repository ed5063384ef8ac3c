"""Hydra entry points. DictConfig stops here: it becomes typed dataclasses before anything runs.

Importing this module is cheap (no torch, no Hydra): a Ctrl-C while the heavy imports run is
caught by the entry point and reported in one line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from . import record
from .config import _SECTIONS, UserError, conf_dir, flatten, objective_key, to_dict
from .tracking import write_text_atomic

if TYPE_CHECKING:  # pragma: no cover
    from omegaconf import DictConfig

log = logging.getLogger("wordlm")
CONF_DIR = str(conf_dir())  # conf/ of the checkout, or wordlm/conf inside an installed wheel
# hydra.run.dir and hydra.sweep.subdir name a run's folder with this resolver. Registered on import: a launcher
# that runs jobs in other processes (joblib's workers, submitit's SLURM jobs) resolves the folder there.
record.register_resolver()


class RunLogFile(logging.FileHandler):
    """train.log: records are held back (not even the file is created) until :meth:`start`, called once the run
    has passed every check; a refused command leaves no train.log, and appends nothing to another run's."""

    HOLD = 10_000  # records held at most before the start (the oldest are dropped)

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None, delay: bool = True):
        super().__init__(filename, mode, encoding, delay=True)
        self.held: list = []
        self.started = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.started:
            super().emit(record)
        elif len(self.held) < self.HOLD:
            self.held.append(record)

    def start(self) -> None:
        self.started = True
        for held in self.held:
            super().emit(held)
        self.held = []

    @staticmethod
    def start_all() -> None:
        for h in logging.getLogger().handlers:
            if isinstance(h, RunLogFile):
                h.start()


class TrialFailed(Exception):
    """A job of a sweep (``-m``) that started and then failed: it diverged or crashed. Its folder records the error;
    Hydra records a failed job, and the Optuna sweeper a failed trial, and the study goes on (as far as its
    ``max_failure_rate`` lets it). A refusal before the job starts (a wrong key or value) stops the sweep instead:
    the same mistake would refuse every job."""


class Exit(Exception):
    """Leave with this message and exit code (used for interruptions)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def die(message: str, code: int = 2) -> NoReturn:
    sys.stderr.write(f"wordlm: error: {message}\n")
    sys.stderr.flush()
    sys.exit(code)


def leave(e: BaseException) -> NoReturn:
    """Exit for a UserError (one line, code 2) or an Exit (its message, if any, and its code)."""
    if isinstance(e, Exit):
        if str(e):
            sys.stderr.write(f"wordlm: {e}\n")
        sys.exit(e.code)
    die(str(e))


_NOISE = re.compile(r"^\s*(full_key|reference_type|object_type|To append to your config|Config search path)")


def one_line(ex: BaseException) -> str:
    """Hydra/OmegaConf messages span several lines; keep the informative ones on one line."""
    parts: list = []
    for e in (ex, ex.__cause__):
        if e is None:
            continue
        for raw in str(e).splitlines():
            line = raw.strip()
            if line.startswith("Config search path"):
                break
            if not line or _NOISE.match(line) or line in parts:
                continue
            if raw.startswith("\t") and parts and parts[-1].endswith((":", ",")):
                parts[-1] += (" " if parts[-1].endswith(":") else " ") + line + ","
                continue
            parts.append(line)
    parts = [p.rstrip(",") for p in parts]
    msg = " ".join(p if p.endswith((".", ":", "?")) else p + "." for p in parts)
    return msg + _suggest(ex) + " (see the override tables in docs/configuration.md)"


def _suggest(ex: BaseException) -> str:
    """'did you mean trainer.epochs?' for a misspelt key."""
    import dataclasses
    import difflib

    from . import models  # (torch: imported only when a key is misspelt, so --help stays quick)

    m = re.search(r"Could not override '([\w.]+)'", str(ex)) or re.search(r"full_key: ([\w.]+)", str(ex.__cause__))
    if not m or "." not in m.group(1):
        return ""
    section, key = m.group(1).split(".", 1)
    if section == "model":  # every model type's keys
        owners = [n for n in models.names() if key in {f.name for f in dataclasses.fields(models.config_class(n))}]
        if owners and len(owners) < len(models.names()):
            return f" model.{key} is a setting of model={'|'.join(owners)} only."
        if owners:  # a key of every type: the value is what is wrong
            return ""
        names = sorted({f.name for n in models.names() for f in dataclasses.fields(models.config_class(n))})
    elif section in _SECTIONS:
        names = [f.name for f in dataclasses.fields(_SECTIONS[section])]
    else:
        return ""
    if key in names:
        return ""
    close = difflib.get_close_matches(key, names, n=1)
    return f" Did you mean {section}.{close[0]}?" if close else ""


def _run_and_report(func: Callable[[], Any]) -> Any:
    """Replacement for Hydra's reporter: user mistakes are one line; bugs keep their traceback."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return func()
    except (UserError, Exit) as e:
        leave(e)
    except TrialFailed as e:  # Hydra's sweeper raises a failed job's error once the jobs of its batch have run
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        die(f"a job of the sweep failed: {e}. Its folder holds its train.log and metrics.json (with the Optuna "
            f"sweeper, hydra.sweeper.max_failure_rate=1 lets a study go on past failed trials; the hparams_search "
            f"configs set it)")
    except (HydraException, OmegaConfBaseException) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        die(one_line(e))
    except (OSError, ValueError) as e:  # Hydra creating the run folder or its log file
        if "No trials are completed yet" in str(e):  # Optuna, asked for the best of a study whose trials all failed
            die("no trial of the study completed: every one failed (each one's error is above, and in its folder's "
                "train.log and metrics.json)")
        io = _os_error(e)
        if io is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        where = io.filename or "the run folder"
        die(f"cannot write {where}: {io.strerror or io}; choose a writable folder with hydra.run.dir=... "
            f"(or hydra.sweep.dir=... with --multirun)")


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e`` (itself, or its cause/context chain), if any."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
        seen += 1
    return None


_TILDE = re.compile(r"^([\w.+~/-]+)=([\"']?)(~[^'\"]*)\2$")


def _quote_home_paths(argv: list) -> list:
    """``data.dir=~/x`` is a lexer error in Hydra's override grammar, and Hydra would not expand ``~`` (in
    ``hydra.run.dir`` a folder named ``~`` would appear): expand it, quoted, as a shell would have."""
    return [_TILDE.sub(lambda m: f"{m.group(1)}='{os.path.expanduser(m.group(3))}'", a) if not a.startswith("-")
            else a for a in argv]


def _install_reporting() -> None:
    import hydra._internal.utils as hydra_utils

    if hasattr(hydra_utils, "run_and_report"):  # Hydra 1.3: _run_hydra looks it up at call time
        hydra_utils.run_and_report = _run_and_report


def entry(config_name: str, task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
    """A console entry point: register schemas, install one-line errors, run ``task`` under Hydra."""

    def job(dc: DictConfig) -> Any:
        # Report here, inside the job: an exception escaping a Hydra job gets an extra
        # "Error executing job with overrides" line from Hydra before ours.
        try:
            return task(dc)
        except TrialFailed as e:  # (a sweep's job: reported here, then Hydra's sweeper counts it as failed)
            sys.stderr.write(f"wordlm: error: {e}\n")
            sys.stderr.flush()
            raise
        except (UserError, Exit) as e:
            leave(e)

    job.__name__ = job.__qualname__ = task.__name__
    job.__module__ = task.__module__

    def main() -> Any:
        try:
            import hydra

            from .compose import register_configs  # (torch, through the model registry: after --help's parse)

            sys.argv[1:] = _quote_home_paths(sys.argv[1:])
            missing = _missing_plugin(sys.argv[1:])
            if missing:
                die(missing)
            register_configs()
            _install_reporting()
            wrapped = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)(job)
            _note_new_parents()
            try:
                return wrapped()
            except UserError as e:  # raised outside Hydra's reporter (e.g. while it set up)
                die(str(e))
        except KeyboardInterrupt:  # Ctrl-C before training started (imports, data preparation)
            what = {"config": " before training started; nothing to resume",
                    "generate": "; generate stopped (a file given as outf= is written only when complete: none was)",
                    }.get(config_name, f"; {config_name} wrote nothing")
            leave(Exit(130, f"interrupted by Ctrl-C{what}"))

    return main


# What asks for one of Hydra's plugins (the extra wordlm[sweep] installs them): the plugin's module, its name.
_PLUGINS = {"optuna": ("hydra_optuna_sweeper", "Optuna sweeper"),
            "joblib": ("hydra_joblib_launcher", "joblib launcher"),
            "submitit": ("hydra_submitit_launcher", "submitit launcher")}


def _missing_plugin(argv: list) -> str | None:
    """One line naming the extra to install, where the command asks for a Hydra plugin that is not installed
    (Hydra itself would only say that it cannot find the config)."""
    import importlib.util

    for a in argv:
        key, _, value = a.partition("=")
        key = key.lstrip("+~")
        if key == "hydra/sweeper" and value == "optuna" or key == "hparams_search" and value not in ("", "null"):
            plugin = "optuna"
        elif key == "hydra/launcher" and value == "joblib":
            plugin = "joblib"
        elif key == "hydra/launcher" and (value.startswith("submitit") or value == "slurm"):
            plugin = "submitit"
        else:
            continue
        module, name = _PLUGINS[plugin]
        try:
            found = importlib.util.find_spec(f"hydra_plugins.{module}") is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return (f"{a} needs Hydra's {name} plugin, which is not installed: pip install 'wordlm[sweep]' (or "
                    f"pip install hydra-{module.split('_', 1)[1].replace('_', '-')})")
    return None


# ---------------------------------------------------------------------------- train
def _train(dc: DictConfig) -> float | None:
    import torch.distributed
    from hydra.core.hydra_config import HydraConfig

    # The heavy modules (torch) load here, when a job runs: --help stays quick, and a Ctrl-C while they load is
    # reported in one line by the entry point.
    from . import distributed
    from .data.datasets import load_corpus
    from .runtime import resolve_device
    from .tracking import Tracker
    from .trainer import Interrupted, Trainer
    from .training.checkpoints import RunLock

    d = distributed.from_env()
    if not d.main:
        logging.getLogger("wordlm").setLevel(logging.WARNING)  # (one rank speaks)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    dc, cfg = _checked_config(dc, run_dir, d.main)
    sweep = _sweep_job(cfg)
    # A train.log write that fails (a full disk) must not print a traceback per log line: the failure that
    # matters (a checkpoint or events that cannot be written) stops the run with one line.
    logging.raiseExceptions = False
    device = resolve_device(cfg.trainer.device, d.local_rank)
    distributed.init(d, device, cfg.trainer.dist_timeout_s)
    trainer = None
    lock = None
    started = False  # from here on the run folder is this run's: a failure is written into its records
    try:
        if d.enabled:
            run_dir = Path(_broadcast_str(str(run_dir)))  # every rank uses rank 0's run dir
        refusal = ""
        if d.main:  # one run at a time in a run folder, for the whole run
            try:
                lock = RunLock(run_dir).acquire()
            except UserError as e:
                refusal = str(e)
        if d.enabled:
            refusal = _broadcast_str(refusal)
        if refusal:
            raise UserError(refusal)
        corpus = load_corpus(cfg.data)
        trainer = Trainer(cfg, corpus, run_dir, None, d)
        if d.main:
            trainer.ckpt.clear_stale_temps()
        resume = _resume_decision(cfg, run_dir, d)  # after the data and sizes are known to be good
        if resume is not None:
            trainer.resume(resume)
        if d.main:
            # Only now, with every check passed, does the run folder's record of its config change.
            write_run_record(run_dir, dc)
            trainer.tracker = Tracker(run_dir, purge_step=trainer.step + 1 if resume else None)
        started = True
        RunLogFile.start_all()
        metrics = trainer.fit()
        log.info("outputs in %s", run_dir)
        return _objective(metrics, cfg, sweep)
    except Interrupted as e:
        hint = _resume_hint(e, run_dir, d) if d.main else ""
        log.warning("%s", hint)
        raise Exit(128 + e.signum, hint) from None
    except (torch.distributed.DistError, RuntimeError) as e:
        if not (d.enabled and _is_peer_failure(e)):
            _record_failure(trainer if started else None, f"{type(e).__name__}: {_first_line(e)}")
            if sweep and started:
                raise _failed_trial(e, run_dir, f"{type(e).__name__}: {_first_line(e)}") from e
            raise
        message = (f"rank {d.rank} lost contact with another rank ({_first_line(e)[:300]}); the job stops. "
                   f"Resume with trainer.resume={run_dir / 'checkpoints' / 'last.pt'}")
        _record_failure(trainer if started else None, message)
        raise Exit(1, "error: " + message) from None
    except KeyboardInterrupt:
        last = run_dir / "checkpoints" / "last.pt"
        where = (f"the last complete checkpoint is {last}. Resume with: {_resume_command(run_dir, last, d)}"
                 if last.is_file() else "no checkpoint was written yet")
        message = f"stopped at once by Ctrl-C; {where}"
        if started:
            log.warning("%s", message)
            trainer.stop_reason = "signal"
            trainer.report.partial("interrupted", message)
        raise Exit(130, message if d.main else "") from None
    except Exception as e:  # a failed run: its error line goes into train.log and metrics.json, then out
        if isinstance(e, (Exit, TrialFailed)):
            raise
        line = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {_first_line(e)}"
        _record_failure(trainer if started else None, line)
        if sweep and started:  # a trial that diverged or crashed: the study goes on
            raise _failed_trial(e, run_dir, line) from e
        raise
    finally:
        if trainer is not None:
            trainer.tracker.close()  # after a failure's record (above) reached TensorBoard
        if lock is not None:
            lock.release()
        if not started and d.main:
            _remove_new_folders(run_dir)
        distributed.shutdown()


def _sweep_job(cfg: Any) -> bool:
    """Whether this run is a job of a sweep (-m); there, joblib's parallel jobs split the cores."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    search = hc.runtime.choices.get("hparams_search")
    if search and not sweep:
        log.warning("hparams_search=%s without -m (--multirun) trains one run with the search's budget, not a study: "
                    "add -m for the study", search)
    _split_threads(cfg)
    return sweep


def _failed_trial(e: BaseException, run_dir: Path, line: str) -> TrialFailed:
    """A sweep's job that failed after it started, as the sweeper is to see it: one line (``line``, already in its
    train.log and metrics.json); a bug's traceback goes to train.log too."""
    if not isinstance(e, UserError):
        log.error("the trial's traceback:", exc_info=e)
    return TrialFailed(f"{run_dir}: {line}")


def _objective(metrics: dict, cfg: Any, sweep: bool) -> float | None:
    """What the run returns to Hydra: the number ``sweep.objective`` names, which a sweeper (Optuna) minimises or
    maximises. A sweep's job without it is a failed trial (a plain run just returns None)."""
    key = objective_key(cfg.sweep.objective)
    value = metrics.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if sweep:
        raise TrialFailed(f"sweep.objective={cfg.sweep.objective}: the run completed but its metrics.json has "
                          f"{key}={value}, not a finite number")
    return None


def _split_threads(cfg: Any) -> None:
    """Jobs that hydra/launcher=joblib runs at once share the cores: each gets cores // n_jobs threads unless
    trainer.threads says otherwise (torch's default, every core per job, makes them fight)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    launcher = hc.launcher
    if cfg.trainer.threads is not None or "JoblibLauncher" not in str(launcher.get("_target_", "")):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = int(launcher.get("n_jobs") or 1)
    n = cores + 1 + n if n < 0 else n  # (joblib: -1 = every core, -2 all but one, ...)
    batch = hc.sweeper.get("n_jobs")  # the Optuna sweeper hands the launcher this many trials at a time
    n = max(1, min(cores, n, int(batch) if batch else n))
    cfg.trainer.threads = max(1, cores // n)
    log.info("hydra/launcher=joblib with n_jobs=%d on %d cores: trainer.threads=%d per job", n, cores,
             cfg.trainer.threads)


# The folders above the default run folder (outputs/<date>/<time>...) that did not exist when this command
# started: Hydra creates them before any check runs, so a refused command removes them again where it left them
# empty. A folder that existed before, empty or not, is the user's and stays.
_NEW_PARENTS: list = []


def _note_new_parents() -> None:
    import datetime

    outputs = Path.cwd() / "outputs"
    _NEW_PARENTS[:] = [p for p in (outputs / datetime.date.today().strftime("%Y-%m-%d"), outputs)
                       if not p.exists()]


def _checked_config(dc: DictConfig, run_dir: Path, main: bool):
    """:func:`_run_config`; a refused config leaves none of the folders Hydra made for the run behind."""
    try:
        return _run_config(dc)
    except BaseException:
        if main:
            _remove_new_folders(run_dir)
        raise


def _remove_new_folders(run_dir: Path) -> None:
    """A refused command leaves no empty folder behind: the run folder, and outputs/<date>/ and outputs/ where this
    command created them; it removes nothing else."""
    _remove_if_empty(run_dir)
    for parent in _NEW_PARENTS:
        if run_dir.resolve().is_relative_to(parent.resolve()):
            _remove_if_empty(parent)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only ever succeeds on an empty folder
    except OSError:
        pass


def _run_config(dc: DictConfig):
    """The composed config as the run uses it: a preset's optimizer keys replaced where the user chose another
    optimizer group, typed and validated, keys that do nothing named in one line, the run's name."""
    from hydra.core.hydra_config import HydraConfig

    from .compose import to_config  # (torch, through the model registry)

    task = list(HydraConfig.get().overrides.task)
    dc = _preset_optimizer_replaced(dc, task)
    cfg = to_config(dc)
    flat = flatten(to_dict(cfg))
    keys = (o.split("=", 1)[0].lstrip("+~") for o in task if "=" in o)
    idle = [k for k in keys if k in flat and not record.acts(k, flat)]
    if idle:
        log.warning("%s %s nothing with this run's other settings (e.g. optim.betas is AdamW's, optim.anneal the "
                    "plateau schedule's): ignored, and left out of its name", ", ".join(idle),
                    "does" if len(idle) == 1 else "do")
    cfg.run_name = record.run_name(cfg.run_name, task, flat)
    return dc, cfg


def _preset_optimizer_replaced(dc: DictConfig, task: list) -> DictConfig:
    """``experiment=X optim=Y``: a preset's optimizer keys were chosen for its own optimizer (SGD's lr 30 makes
    AdamW diverge). The optimizer group the user names brings its own defaults instead; the user's own optim.*
    overrides still apply on top, and a line says which of the preset's keys were replaced."""
    if not any(o.startswith("experiment=") for o in task) or not any(o.startswith("optim=") for o in task):
        return dc
    from hydra import compose
    from omegaconf import OmegaConf, open_dict

    # The preset's own optimizer group: naming that same group changes nothing.
    preset = compose(config_name="config", overrides=[o for o in task if not o.startswith("optim=")],
                     return_hydra_config=True).hydra.runtime.choices.get("optim")
    named = next(o for o in task if o.startswith("optim=")).split("=", 1)[1]
    if named == preset:
        return dc
    own = compose(config_name="config", overrides=[o for o in task if not o.startswith("experiment=")]).optim
    replaced = [f"optim.{k}={dc.optim[k]}" for k in own if dc.optim[k] != own[k]]
    if replaced:
        log.warning("%s: the preset's optimizer settings %s are replaced by that optimizer's own defaults (set "
                    "optim.<key>=... to choose them)", next(o for o in task if o.startswith("optim=")),
                    ", ".join(replaced))
        with open_dict(dc):
            dc.optim = OmegaConf.merge(dc.optim, own)
    return dc


def _record_failure(trainer: Any, line: str) -> None:
    """The error line of a run that had started, in train.log and metrics.json (a refused command, which
    never started, leaves the folder's records alone)."""
    if trainer is None:
        return
    log.error("run failed at step %d: %s", trainer.step, line)
    trainer.report.failure(line)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:500] if text else "(no message)"


def write_run_record(run_dir: Path, dc: DictConfig) -> None:
    """``<run>/.hydra/{config,hydra,overrides}.yaml`` as Hydra writes them, but only once a run starts or resumes
    (Hydra's own writing is off: ``hydra.output_subdir: null``), so a refused command never changes them."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    hc = HydraConfig.get()
    folder = run_dir / ".hydra"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / "config.yaml", OmegaConf.to_yaml(dc))
        write_text_atomic(folder / "hydra.yaml", OmegaConf.to_yaml({"hydra": hc}))
        write_text_atomic(folder / "overrides.yaml", OmegaConf.to_yaml(list(hc.overrides.task)))
    except OSError as e:
        raise UserError(f"cannot write the run's record in {folder}: {e.strerror or e}; free space or make the "
                        f"folder writable") from None


def _resume_hint(e, run_dir: Path, d) -> str:
    """The exact command that resumes an interrupted run."""
    name = signal.Signals(e.signum).name
    return f"stopped by {name} after step {e.step}; saved {e.path}. Resume with: {_resume_command(run_dir, e.path, d)}"


def _resume_command(run_dir: Path, path: Path, d) -> str:
    args = [a for a in sys.argv[1:] if not a.startswith("trainer.resume=")]
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={run_dir}")
    prog = sys.argv[0]
    launcher = ["python", prog] if prog.endswith(".py") else [Path(prog).name]
    if d.enabled:
        launcher = ["torchrun", f"--nproc_per_node={d.world}", prog]
    return shlex.join([*launcher, *args, f"trainer.resume={path}"])


def _is_peer_failure(e: BaseException) -> bool:
    """Did a collective fail because a peer rank died or hung? (gloo raises plain RuntimeErrors.)"""
    import torch.distributed as dist

    text = str(e).lower()
    return isinstance(e, dist.DistError) or any(
        k in text for k in ("connection", "gloo", "nccl", "timed out", "timeout", "broken pipe"))


def _resume_decision(cfg: Any, run_dir: Path, d) -> Path | None:
    """Where the run continues from (None: a fresh start), or a refusal: decided by rank 0 alone, which sees the
    folder before anything of this run is in it, and broadcast (another rank would see rank 0's .hydra/)."""
    decided = ""
    if d.main:
        try:
            resume = _resume_path(cfg.trainer.resume, run_dir)
            if resume is None and cfg.optim.finetune and not cfg.trainer.init_from:
                raise UserError("optim.finetune=true finetunes a trained model, and there is no last.pt here to "
                                "resume: add trainer.init_from=<first run>/checkpoints/best.pt")
            decided = f"resume:{resume or ''}"
        except UserError as e:
            decided = f"refuse:{e}"
    if d.enabled:
        decided = _broadcast_str(decided)
    kind, _, value = decided.partition(":")
    if kind == "refuse":
        raise UserError(value)
    return Path(value) if value else None


def _finished_here(run_dir: Path) -> bool:
    """Does the folder's metrics.json say a run completed there (or is it not one of wordlm's)?"""
    try:
        status = json.loads((run_dir / "metrics.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return (run_dir / "metrics.json").exists()
    return status not in ("failed", "interrupted")


def _resume_path(value: Any, run_dir: Path) -> Path | None:
    last = run_dir / "checkpoints" / "last.pt"
    # A fresh run writes checkpoints/, metrics.json and .hydra/: where any of them is already there (another
    # run's, or the user's own files), it would overwrite them. Refuse, lose nothing.
    taken = [p.relative_to(run_dir).as_posix() for p in (*sorted(run_dir.glob("checkpoints/*.pt")),
                                                         run_dir / "metrics.json", run_dir / ".hydra") if p.exists()]
    if value in (None, ""):
        if taken:
            hint = "continue it with trainer.resume=auto, or " if last.is_file() else ""
            raise UserError(f"{run_dir} already holds a run ({', '.join(taken[:3])}): {hint}start a new run in "
                            f"another hydra.run.dir (nothing there was changed)")
        return None
    if value == "auto":
        if last.is_file():
            return last
        # A job stopped before its first checkpoint (its .hydra/, a failed or interrupted metrics.json) starts
        # afresh: a scheduler may requeue it. Checkpoints without last.pt, or a finished run, are refused.
        if any("checkpoints/" in t for t in taken) or _finished_here(run_dir):
            raise UserError(f"trainer.resume=auto: {run_dir} holds {', '.join(taken[:3])} but no checkpoints/last.pt "
                            f"to resume from; start a new run in another hydra.run.dir (nothing there was changed)")
        log.info("trainer.resume=auto: no %s yet, starting fresh", last)
        return None
    p = Path(str(value)).expanduser()
    if not p.is_file():
        raise UserError(f"trainer.resume={value}: no such checkpoint (use a path to last.pt, or auto)")
    return p


def _broadcast_str(s: str) -> str:
    import torch.distributed as dist

    obj = [s]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


train_main = entry("config", _train)


if __name__ == "__main__":
    train_main()
