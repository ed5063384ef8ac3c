"""Typed configuration: the schema Hydra checks every override against.

Values live in ``conf/*.yaml``; the types and help live here. Entry points turn
Hydra's ``DictConfig`` into these dataclasses (:func:`to_config`), so everything
below the entry points works with plain typed objects and can be built in tests
without Hydra.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional


class UserError(Exception):
    """A mistake the user can fix (config, files, data): reported as one line, no traceback."""


# This module imports nothing of wordlm's: every other module may import it. What needs the model registry
# (a Config from a dict or from Hydra, the ConfigStore) is in wordlm.compose.


OPTIM_NAMES = ("sgd", "adamw")
SCHEDULES = ("plateau", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ModelConfig:
    """The keys every model type has. Each type extends it with its own keys in its own file under
    ``wordlm/models/`` (an LSTM's config has no ``nhead``); ``name`` picks the type from the registry."""

    name: str = "lstm"  # a registered model type: lstm | gru | rnn_tanh | rnn_relu | transformer
    emsize: int = 200  # word embedding size
    nhid: int = 200  # RNN hidden size / transformer feed-forward size
    nlayers: int = 2  # number of layers
    dropout: float = 0.2  # dropout probability
    tied: bool = False  # tie the decoder weights to the embedding (needs emsize == nhid for RNNs)
    softmax: str = "full"  # full | adaptive: Grave et al.'s adaptive softmax, clusters cut at model.cutoffs
    cutoffs: List[int] = field(default_factory=lambda: [2000, 10000])  # adaptive softmax/input: vocabulary bands
    div_value: float = 4.0  # adaptive softmax/input: band i is dim / div_value ** i wide
    adaptive_input: bool = False  # Baevski & Auli's adaptive input embeddings over the same bands
    adaptive_dropout: float = 0.0  # adaptive softmax: dropout on its input and on each cluster's projection (fairseq)
    adaptive_dropout_input: bool = True  # adaptive_dropout on the softmax's input too (false: only on the clusters'
    #                                      projections, as wordlm before 2026-12-06; older checkpoints resume so)

    # Keys a type gains after checkpoints without them exist, with the value that rebuilds those checkpoints'
    # models as they were (see wordlm.models.config_from_dict). Not a config key. Types extend it.
    LEGACY: ClassVar[Dict[str, Any]] = {"softmax": "full", "cutoffs": [2000, 10000], "div_value": 4.0,
                                        "adaptive_input": False, "adaptive_dropout": 0.0,
                                        "adaptive_dropout_input": False}

    def effective(self) -> Dict[str, Any]:
        """The keys as the model uses them (a null that means "as model.dropout" resolved; keys that do nothing
        for this model left out): what a run records about its model. Types override it."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.softmax != "adaptive" and not self.adaptive_input:
            for k in ("cutoffs", "div_value"):
                del out[k]
        if self.softmax != "adaptive" or not self.adaptive_dropout:
            del out["adaptive_dropout_input"]
        if self.softmax != "adaptive":
            del out["adaptive_dropout"]
        return out

    def validate(self) -> None:
        for k in ("emsize", "nhid", "nlayers"):
            v = getattr(self, k)
            _check(v >= 1, f"model.{k}={v} is impossible: it must be >= 1")
        _check(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)")
        _check(self.softmax in ("full", "adaptive"), f"model.softmax={self.softmax!r}: use full|adaptive")
        c = list(self.cutoffs)
        _check(len(c) >= 1 and all(isinstance(x, int) and x >= 1 for x in c) and c == sorted(set(c)),
               f"model.cutoffs={c} must be one or more increasing word counts, e.g. model.cutoffs=[2000,10000]")
        _check(self.div_value >= 1.0, f"model.div_value={self.div_value} must be >= 1 (1: every band full width)")
        _check(0.0 <= self.adaptive_dropout < 1.0, f"model.adaptive_dropout={self.adaptive_dropout} must be in [0, 1)")
        if self.tied and (self.softmax == "adaptive") != self.adaptive_input:
            _check(False, "model.tied=true with an adaptive layer ties the adaptive softmax's clusters to the adaptive "
                          "input's bands: set both model.softmax=adaptive and model.adaptive_input=true, or "
                          "model.tied=false")


@dataclass
class DataConfig:
    name: str = "wikitext2"  # wikitext2 | wikitext103 | ptb | custom
    root: Optional[str] = None  # where named data sets live; null = <project>/data
    dir: Optional[str] = None  # folder with train.txt, valid.txt, test.txt (custom); null = <root>/<folder>
    url: Any = None  # download URL or list of mirror URLs; null = the data set's own mirrors
    checksum: Optional[str] = None  # "md5:<hex>" or "sha256:<hex>" of the download; null = the data set's own
    min_freq: int = 1  # words seen fewer times in train become <unk>
    max_vocab: Optional[int] = None  # keep only the most frequent words (specials included); null = all
    cache: bool = True  # cache tokenised corpora (in cache_dir, never in the corpus folder)
    cache_dir: Optional[str] = None  # null = $WORDLM_CACHE_DIR, else <data root>/cache


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 20.0  # (peak) learning rate
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd only
    nesterov: bool = False  # sgd only: Nesterov momentum (needs momentum > 0)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw only
    eps: float = 1e-8  # adamw only
    schedule: str = "plateau"  # plateau (lr / anneal when valid loss does not improve) | cosine | constant
    anneal: float = 4.0  # plateau: divide lr by this
    warmup_steps: int = 0  # cosine/constant: linear warmup steps
    min_lr_ratio: float = 0.0  # cosine: final lr = lr * min_lr_ratio
    # cosine: decay over the run's optimizer steps (epochs x steps per epoch, or max_steps) | time: over
    # trainer.max_minutes too, whichever ends first (a time-budgeted recipe then anneals fully on any machine)
    schedule_over: str = "steps"
    fused: Optional[bool] = None  # fused optimizer kernels; null = on for CUDA
    ntasgd: bool = False  # NT-ASGD: average the weights from the first validation that fails the nonmono test on
    nonmono: int = 5  # NT-ASGD: the test is "valid loss > the best of all checks but the last nonmono"
    finetune: bool = False  # average from the first step and stop when the nonmono test fails (AWD's finetune)
    # average the weights (the mean of every iterate from then on, as NT-ASGD) once this fraction of the run's
    # budget is spent: its steps or trainer.max_minutes, whichever runs out first; null = only NT-ASGD's trigger
    average_from: Optional[float] = None


@dataclass
class TrainerConfig:
    epochs: int = 40
    batch_size: int = 20  # global batch (columns) per micro-step, split across ranks
    eval_batch_size: int = 10
    bptt: int = 35  # truncated-BPTT window length
    # transformer evaluation: tokens of each bptt-long window used only as history before the scored ones (each
    # token scored once); null = bptt // 2; 0 = non-overlapping windows, as the classic example. RNNs carry state.
    eval_context: Optional[int] = None
    variable_bptt: bool = False  # AWD-LSTM's window lengths: N(bptt or bptt/2, 5), lr scaled by length / bptt
    clip: Optional[float] = 0.25  # max gradient norm; null or 0 = no clipping
    seed: int = 1111
    log_interval: int = 200  # optimizer steps between log lines / TensorBoard points
    device: str = "auto"  # auto | cpu | cuda
    max_steps: Optional[int] = None  # stop after this many optimizer steps (still evaluate, save, test)
    max_minutes: Optional[float] = None  # wall-clock budget of the whole run (then evaluate, save, test)
    eval_every: Optional[int] = None  # also validate every N optimizer steps (not only at epoch ends)
    # scheduled validations (epoch ends, eval_every) start once this fraction of the run's budget is spent (its
    # steps or max_minutes, whichever runs out first); the final weights are validated whatever it is
    eval_from: float = 0.0
    target_ppl: Optional[float] = None  # stop once a validation reaches this perplexity (time-to-target runs)
    init_from: Optional[str] = None  # start a new run from this checkpoint's model weights only
    precision: str = "auto"  # training: auto | fp32 | bf16 | fp16
    eval_precision: str = "fp32"  # evaluation (valid/test perplexity): fp32 keeps reported numbers exact
    compile: Optional[bool] = None  # torch.compile the model; null = auto
    threads: Optional[int] = None  # CPU threads; null = torch's default
    grad_accum: int = 1  # micro-steps per optimizer step
    resume: Optional[str] = None  # checkpoint path, or "auto" = this run dir's checkpoints/last.pt
    checkpoint_every: Optional[int] = None  # also write last.pt every N optimizer steps
    checkpoint_minutes: Optional[float] = None  # also write last.pt every N minutes
    max_bad_steps: int = 20  # stop after this many non-finite steps in a row
    deterministic: bool = False  # deterministic algorithms (CUDA)
    sample_words: int = 50  # words of sample text logged to TensorBoard each epoch; 0 = off
    # after the static test: also score the test split of best.pt with the neural cache, dynamic evaluation or
    # both (each alone and together), at wordlm-evaluate's defaults: static | cache | dynamic | both
    final_eval: str = "static"
    progress: bool = True  # progress bars on a terminal
    dist_timeout_s: float = 300.0  # collective timeout before a stuck rank ends the job
    debug_nan_at_step: Optional[int] = None  # fault injection: make the loss NaN from this step on
    debug_nan_steps: int = 1  # fault injection: for this many steps


@dataclass
class LossConfig:
    """Terms added to the NLL that training minimises (the reported loss stays the NLL)."""

    ar: float = 0.0  # activation regularisation (AWD-LSTM's alpha): ar * mean(dropped last-layer output ** 2)
    tar: float = 0.0  # temporal AR (beta): tar * mean((raw last-layer output[t+1] - output[t]) ** 2)


# sweep.objective: the number a run returns to Hydra's sweeper (the Optuna sweeper minimises it by default): a
# TensorBoard tag, or a number of metrics.json under its own key.
OBJECTIVE_TAGS = {"valid/best_ppl": "best_valid_ppl", "valid/best_loss": "best_valid_loss", "test/ppl": "test_ppl",
                  "test/loss": "test_loss", "test/ppl_cache": "test_ppl_cache", "test/ppl_dynamic": "test_ppl_dynamic",
                  "test/ppl_both": "test_ppl_both"}
METRICS_NUMBERS = ("best_valid_loss", "best_valid_ppl", "test_loss", "test_ppl", "test_ppl_cache", "test_ppl_dynamic",
                   "test_ppl_both", "steps", "epochs", "tokens", "train_tokens_per_sec", "params", "seconds",
                   "train_seconds", "eval_seconds", "seconds_to_target", "final_eval_seconds")


@dataclass
class SweepConfig:
    """What a run returns to a sweep (``python train.py -m hparams_search=...``; docs/operations.md)."""

    # a TensorBoard tag (valid/best_ppl, test/ppl, test/ppl_dynamic, ...) or a metrics.json number
    # (train_tokens_per_sec, seconds_to_target, ...); the sweeper's direction says whether lower is better
    objective: str = "valid/best_ppl"


def objective_key(name: str) -> str:
    """metrics.json's key for ``sweep.objective`` (a tag or a key)."""
    return OBJECTIVE_TAGS.get(name, name)


@dataclass
class CacheConfig:
    """The neural cache (Grave et al. 2017), as AWD-LSTM's pointer.py scores it. window / theta / lam null = the
    reference's for the data set: PTB 500 / 1.0 / 0.1 (its README's command), WikiText-2 and every other data set
    3785 / 0.662 / 0.1279 (pointer.py's defaults)."""

    enabled: bool = False
    window: Optional[int] = None  # hidden states remembered (per column)
    theta: Optional[float] = None  # inverse temperature of the cache's attention
    lam: Optional[float] = None  # weight of the cache in the mixture (0 = the model alone)
    warmup: str = "reference"  # reference: the model alone until more than `window` tokens precede a position
    #                            (pointer.py) | none: the cache mixed in from the second token


@dataclass
class DynamicConfig:
    """Dynamic evaluation (Krause et al. 2018), with the defaults of their dynamiceval.py: segments of 5 tokens,
    lr 5e-5, decay 2e-3. lr / decay null = those scaled by segment / 5 (the reference's rule when its segment
    length changes)."""

    enabled: bool = False
    lr: Optional[float] = None  # eta; null = 5e-5 x segment / 5
    decay: Optional[float] = None  # lambda, the pull towards the trained weights; null = 2e-3 x segment / 5
    eps: float = 2e-5  # epsilon in grad / (MS + eps)
    rule: str = "rms"  # rms (Krause's RMS-normalised rule with decay) | sgd
    segment: Optional[int] = 5  # tokens per update (and per statistics batch), at most a window's; null = a window
    stat_batches: Optional[int] = None  # training batches (of 100 columns) for the gradient statistics; null = all


SHORT_RUN_DROPOUTS = ("dropout", "dropouth", "dropouti", "dropoute", "wdrop")


@dataclass
class ShortRunConfig:
    """Lighter regularisation for a run whose budget holds few epochs (experiment=cpu_20min on a slow CPU): how many
    epochs fit is known only once the run has a pace, so at 5 % of the budget the run estimates it (from its pace
    since 2 %) and, below ``epochs``, switches the model's dropouts to the ones set here for the rest of the run.
    A dropout left null keeps the model's."""

    epochs: Optional[float] = None  # switch when fewer epochs than this fit the budget; null = off
    dropout: Optional[float] = None  # the model's keys, in short runs
    dropouth: Optional[float] = None
    dropouti: Optional[float] = None
    dropoute: Optional[float] = None
    wdrop: Optional[float] = None

    def dropouts(self) -> Dict[str, float]:
        """The dropouts this sets (those not null)."""
        return {k: getattr(self, k) for k in SHORT_RUN_DROPOUTS if getattr(self, k) is not None}


@dataclass
class Config:
    # a ModelConfig subclass, chosen by model.name (wordlm.compose.from_dict builds it from the registry)
    model: Any = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    # How trainer.final_eval=cache|dynamic|both scores the test: evaluate.py's keys and defaults (cache.window,
    # dynamic.segment, ...). Their `enabled` is evaluate.py's switch; here trainer.final_eval decides.
    cache: CacheConfig = field(default_factory=CacheConfig)
    dynamic: DynamicConfig = field(default_factory=DynamicConfig)
    # Lighter dropouts where the budget holds few epochs (off unless short_run.epochs is set)
    short_run: ShortRunConfig = field(default_factory=ShortRunConfig)
    tune: bool = False  # tune trainer.final_eval's settings on valid first (as evaluate.py's tune=true)
    tune_tokens: Optional[int] = 30000  # tokens of valid used while tuning; null = all
    # The run's name in its folder, TensorBoard and metrics.json; null = the overrides that change the run,
    # e.g. "model=transformer,optim=adamw" (wordlm.record.run_name)
    run_name: Optional[str] = None


@dataclass
class GenerateConfig:
    checkpoint: Optional[str] = None  # path to a .pt written by train.py (required)
    words: int = 1000  # words to generate
    temperature: float = 1.0  # > 0; lower = more conservative
    top_k: int = 0  # sample among the k most likely words; 0 = all
    top_p: float = 1.0  # nucleus sampling: smallest set of words with this much probability; 1 = all
    prompt: str = ""  # text to condition on (tokenised with the checkpoint's vocabulary)
    seed: int = 1111
    device: str = "auto"  # auto | cpu | cuda
    outf: Optional[str] = None  # write here instead of stdout (never a .pt; an existing file needs overwrite)
    overwrite: bool = False  # allow outf to replace an existing file
    context: Optional[int] = None  # transformer context window; null = the training bptt
    progress: bool = True


@dataclass
class ExportConfig:
    checkpoint: Optional[str] = None  # path to a .pt written by train.py (required)
    format: str = "onnx"  # onnx (the only format so far)
    out: Optional[str] = None  # null = the checkpoint's path with .onnx for .pt (never a .pt; existing: overwrite)
    overwrite: bool = False  # allow out to replace an existing file
    opset: int = 18  # ONNX opset (>= 18)
    verify: bool = True  # compare the file with PyTorch in onnxruntime (when installed) before writing it


@dataclass
class EvaluateConfig:
    checkpoint: Optional[str] = None  # path to a .pt written by train.py (required)
    data: Optional[DataConfig] = None  # null = the data set the checkpoint was trained on
    split: str = "test"  # train | valid | test
    batch_size: Optional[int] = None  # null = the training eval_batch_size (1 with the cache or dynamic evaluation)
    bptt: Optional[int] = None  # null = the training bptt
    eval_context: Optional[int] = None  # transformer: tokens of history per window (see trainer.eval_context);
    #                                     null = the checkpoint's trainer.eval_context
    device: str = "auto"
    precision: str = "fp32"
    progress: bool = True
    cache: CacheConfig = field(default_factory=CacheConfig)
    dynamic: DynamicConfig = field(default_factory=DynamicConfig)
    tune: bool = False  # grid-search the enabled methods' settings on valid, then score test with the best
    tune_tokens: Optional[int] = 30000  # tokens of valid used while tuning (Krause's gridfast); null = all


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise UserError(msg)


CACHE_WARMUPS = ("reference", "none")


def check_cache(c: CacheConfig) -> None:
    """The neural cache's settings (evaluate.py's cache.*, and trainer.final_eval's): one line per mistake."""
    _check(c.window is None or c.window >= 1,
           f"cache.window={c.window} must be >= 1 or null (= the reference's for the data set)")
    _check(c.lam is None or 0 <= c.lam < 1, f"cache.lam={c.lam} must be in [0, 1) (0 = the model alone) or null")
    _check(c.theta is None or math.isfinite(c.theta), f"cache.theta={c.theta} must be a finite number or null")
    _check(c.warmup in CACHE_WARMUPS,
           f"cache.warmup='{c.warmup}': use {'|'.join(CACHE_WARMUPS)} (reference: the model alone until the cache "
           f"holds more than `window` tokens, as pointer.py)")


def check_short_run(sr: ShortRunConfig) -> None:
    """short_run's settings (whether the model can change those dropouts is checked where it is built)."""
    _check(sr.epochs is None or (math.isfinite(sr.epochs) and sr.epochs > 0),
           f"short_run.epochs={sr.epochs} must be > 0 (switch to short_run's dropouts when fewer epochs fit the "
           f"budget) or null (off)")
    for k, v in sr.dropouts().items():
        _check(0 <= v < 1, f"short_run.{k}={v} must be in [0, 1) or null (= the model's)")
    if sr.epochs is not None:
        _check(bool(sr.dropouts()), f"short_run.epochs={sr.epochs:g} changes nothing: set the dropouts a short run "
                                    f"uses, e.g. short_run.dropout=0.2 short_run.wdrop=0.1")


def check_dynamic(d: DynamicConfig) -> None:
    """Dynamic evaluation's settings (evaluate.py's dynamic.*, and trainer.final_eval's): one line per mistake."""
    _check(d.rule in ("rms", "sgd"), f"dynamic.rule='{d.rule}': use rms|sgd")
    given = [v for v in (d.lr, d.decay) if v is not None]
    _check(all(math.isfinite(v) and v >= 0 for v in given) and math.isfinite(d.eps) and d.eps > 0,
           f"dynamic.lr={d.lr} and dynamic.decay={d.decay} must be finite and >= 0 (or null = the reference's scaled "
           f"to the segment), dynamic.eps={d.eps} finite and > 0")
    _check(d.stat_batches is None or d.stat_batches >= 1,
           f"dynamic.stat_batches={d.stat_batches} must be >= 1 or null (= all training batches): the update "
           f"divides by these gradient statistics")
    _check(d.segment is None or d.segment >= 1,
           f"dynamic.segment={d.segment} must be >= 1 (tokens per update; 5 = the reference's) or null (= a whole "
           f"window)")


def validate(cfg: Config) -> None:
    """Check values the type system cannot; raise UserError naming the key and the fix."""
    cfg.model.validate()  # the model type's own checks (its config class), and short_run's
    check_short_run(cfg.short_run)
    t, o = cfg.trainer, cfg.optim
    for k in ("epochs", "batch_size", "eval_batch_size", "bptt", "log_interval", "grad_accum", "max_bad_steps"):
        v = getattr(t, k)
        _check(v >= 1, f"trainer.{k}={v} is impossible: it must be >= 1")
    _check(t.max_steps is None or t.max_steps >= 1, f"trainer.max_steps={t.max_steps} must be >= 1 or null")
    _check(t.clip is None or t.clip >= 0, f"trainer.clip={t.clip} must be >= 0 or null")
    _check(t.device in DEVICES, f"trainer.device='{t.device}': use {'|'.join(DEVICES)}")
    _check(t.precision in PRECISIONS, f"trainer.precision='{t.precision}': use {'|'.join(PRECISIONS)}")
    _check(t.eval_precision in PRECISIONS,
           f"trainer.eval_precision='{t.eval_precision}': use {'|'.join(PRECISIONS)}")
    _check(t.final_eval in ("static", "cache", "dynamic", "both"),
           f"trainer.final_eval='{t.final_eval}': use static|cache|dynamic|both")
    for name in ("cache", "dynamic"):
        _check(not getattr(cfg, name).enabled,
               f"{name}.enabled is evaluate.py's switch: in training, trainer.final_eval={name}|both scores the test "
               f"with {'the neural cache' if name == 'cache' else 'dynamic evaluation'} ({name}.* set how)")
    if t.final_eval in ("cache", "both"):  # (the settings are read only by their method)
        check_cache(cfg.cache)
    if t.final_eval in ("dynamic", "both"):
        check_dynamic(cfg.dynamic)
    _check(not cfg.tune or t.final_eval != "static",
           "tune=true tunes trainer.final_eval's cache or dynamic evaluation on valid: add "
           "trainer.final_eval=cache|dynamic|both")
    _check(cfg.tune_tokens is None or cfg.tune_tokens >= 1,
           f"tune_tokens={cfg.tune_tokens} must be >= 1 or null (= all of valid)")
    _check(t.threads is None or t.threads >= 1, f"trainer.threads={t.threads} must be >= 1 or null")
    _check(t.eval_context is None or 0 <= t.eval_context < t.bptt,
           f"trainer.eval_context={t.eval_context} must be in [0, trainer.bptt={t.bptt}) or null (= bptt // 2)")
    _check(t.eval_every is None or t.eval_every >= 1, f"trainer.eval_every={t.eval_every} must be >= 1 or null")
    _check(t.target_ppl is None or t.target_ppl > 1, f"trainer.target_ppl={t.target_ppl} must be > 1 or null")
    _check(0 <= t.eval_from < 1, f"trainer.eval_from={t.eval_from} must be in [0, 1) (the share of the budget spent "
                                 f"before scheduled validations start)")
    _check(not (t.eval_from and t.target_ppl is not None),
           f"trainer.target_ppl is checked at validations, and trainer.eval_from={t.eval_from:g} skips them until "
           f"then: drop one (trainer.eval_from=0)")
    for k in ("checkpoint_every", "checkpoint_minutes", "max_minutes"):
        v = getattr(t, k)
        _check(v is None or v > 0, f"trainer.{k}={v} must be > 0 or null")
    _check(o.name in OPTIM_NAMES, f"unknown optimizer '{o.name}': use optim={'|'.join(OPTIM_NAMES)}")
    _check(o.lr > 0, f"optim.lr={o.lr} must be > 0")
    _check(o.schedule in SCHEDULES, f"optim.schedule='{o.schedule}': use {'|'.join(SCHEDULES)}")
    _check(o.anneal >= 1, f"optim.anneal={o.anneal} must be >= 1")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
           f"optim.betas={o.betas} must be two numbers in [0, 1)")
    _check(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    _check(o.momentum >= 0, f"optim.momentum={o.momentum} must be >= 0")
    _check(not o.nesterov or (o.name == "sgd" and o.momentum > 0),
           f"optim.nesterov=true needs optim=sgd with optim.momentum > 0 (got optim={o.name}, momentum {o.momentum})")
    _check(o.eps > 0, f"optim.eps={o.eps} must be > 0")
    _check(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    _check(o.schedule_over in ("steps", "time"), f"optim.schedule_over='{o.schedule_over}': use steps|time")
    _check(o.schedule_over != "time" or (o.schedule == "cosine" and bool(t.max_minutes)),
           f"optim.schedule_over=time decays the cosine schedule over the time budget: it needs optim.schedule=cosine "
           f"and trainer.max_minutes (got schedule={o.schedule}, max_minutes={t.max_minutes})")
    _check(o.nonmono >= 1, f"optim.nonmono={o.nonmono} must be >= 1")
    _check(o.average_from is None or 0 <= o.average_from < 1,
           f"optim.average_from={o.average_from} must be in [0, 1) (the share of the budget spent before averaging "
           f"starts) or null")
    _check(o.name == "sgd" or not (o.ntasgd or o.finetune),
           f"optim.{'ntasgd' if o.ntasgd else 'finetune'}=true averages SGD's iterates (NT-ASGD): it needs "
           f"optim.name=sgd, not {o.name}; for AdamW choose optim=adamw")
    _check(o.name != "adamw" or o.lr < 1,
           f"optim.lr={o.lr:g} with AdamW diverges (its learning rates are about 1e-4 to 3e-3; SGD's are 1 to 30): "
           f"set optim.lr, e.g. optim.lr=1e-3")
    _check(0 <= t.seed < 2 ** 63, f"trainer.seed={t.seed} must be in [0, 2**63)")
    _check(not t.variable_bptt or t.bptt >= 5,
           f"trainer.variable_bptt=true draws windows of at least 5 tokens around trainer.bptt={t.bptt} and scales the "
           f"lr by length / bptt: it needs trainer.bptt >= 5")
    _check(not o.finetune or bool(t.init_from or t.resume),
           "optim.finetune=true finetunes a trained model: add trainer.init_from=<first run>/checkpoints/best.pt")
    _check(not (o.ntasgd and o.finetune), "optim.ntasgd=true and optim.finetune=true: pick one (finetune averages "
                                          "from the first step; ntasgd switches to averaging on the trigger)")
    longest = getattr(cfg.model, "longest", None)  # learned positions: the longest window the model reads
    if longest is not None:
        need = t.bptt + (40 if t.variable_bptt else 0)  # variable windows: N(bptt, 5), 8 sigma of room
        _check(need <= longest, f"trainer.bptt={t.bptt}{' with variable_bptt' if t.variable_bptt else ''} needs "
                                f"windows of up to {need} tokens, longer than model.max_len={longest} (learned "
                                f"positions): set model.max_len={need} or lower trainer.bptt")
    for k, v in (("ar", cfg.loss.ar), ("tar", cfg.loss.tar)):
        _check(v >= 0, f"loss.{k}={v} must be >= 0")
    key = objective_key(cfg.sweep.objective)
    _check(key in METRICS_NUMBERS,
           f"sweep.objective='{cfg.sweep.objective}' is not a number of metrics.json: use a tag "
           f"({', '.join(OBJECTIVE_TAGS)}) or one of {', '.join(k for k in METRICS_NUMBERS if '_ppl_' not in k)}")
    method = key.rpartition("_ppl_")[2] if "_ppl_" in key else ""
    _check(not method or t.final_eval in (method, "both"),
           f"sweep.objective={cfg.sweep.objective} is scored only with trainer.final_eval="
           f"{method if method == 'both' else method + '|both'} (got {t.final_eval})")
    _check(key != "seconds_to_target" or t.target_ppl is not None,
           "sweep.objective=seconds_to_target needs trainer.target_ppl (the perplexity whose time it measures)")
    _check(key != "final_eval_seconds" or t.final_eval != "static",
           "sweep.objective=final_eval_seconds needs trainer.final_eval=cache|dynamic|both")
    d = cfg.data
    _check(d.min_freq >= 1, f"data.min_freq={d.min_freq} must be >= 1")
    _check(d.max_vocab is None or d.max_vocab >= 3, f"data.max_vocab={d.max_vocab} must be >= 3 or null")


# What a resumed run may change: how long it runs, how it logs, checkpoints and reports, where and how fast it
# runs. Every other key defines the run (model, data and vocabulary, optimizer, schedule, batches, bptt, seed,
# precision) and must equal the checkpoint's: see :func:`resume_conflicts`.
RESUMABLE = frozenset({
    "trainer.epochs", "trainer.max_steps", "trainer.max_minutes", "trainer.log_interval", "trainer.eval_every",
    "trainer.eval_from", "trainer.target_ppl", "trainer.final_eval",
    "trainer.checkpoint_every", "trainer.checkpoint_minutes", "trainer.device", "trainer.threads", "trainer.progress",
    "trainer.compile", "trainer.resume", "trainer.init_from", "trainer.sample_words", "trainer.dist_timeout_s",
    "trainer.max_bad_steps", "trainer.deterministic", "trainer.debug_nan_at_step", "trainer.debug_nan_steps",
    "optim.fused", "run_name", "sweep.objective",
    "data.root", "data.dir", "data.url", "data.checksum", "data.cache", "data.cache_dir",
    # how trainer.final_eval scores the test at the end
    "tune", "tune_tokens",
    *(f"{name}.{f.name}" for name, c in (("cache", CacheConfig), ("dynamic", DynamicConfig))
      for f in dataclasses.fields(c)),
})


# model: by its name
_SECTIONS = {"data": DataConfig, "optim": OptimConfig, "trainer": TrainerConfig, "loss": LossConfig,
             "sweep": SweepConfig, "cache": CacheConfig, "dynamic": DynamicConfig, "short_run": ShortRunConfig}


def build(cls: type, values: dict) -> Any:
    """A dataclass from plain values; keys it does not know are ignored (e.g. from an older checkpoint)."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in (values or {}).items() if k in known})


def plain(dictconfig: Any) -> dict:
    """Hydra DictConfig -> plain, resolved containers without the ``hydra`` node."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(dictconfig, resolve=True) if not isinstance(dictconfig, dict) else dict(dictconfig)
    return {k: v for k, v in values.items() if k != "hydra"}


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: a config as its dotted keys."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def conf_dir() -> Path:
    """The Hydra configs: ``wordlm/conf`` inside an installed wheel (setup.py ships ``conf/`` there), else
    ``conf/`` at the root of a checkout (an editable install too)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise UserError(f"wordlm's configs are missing (no conf/config.yaml beside {here}): reinstall wordlm")
