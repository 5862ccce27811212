"""The run configuration: one dataclass per component, a YAML file, and ``--key value`` overrides.

A YAML file has the sections ``model``, ``task``, ``optimizer`` and ``train``; any field may be
overridden on the command line as ``--section.field value`` or, where the name is unique, as
``--field value`` (``--lr 1e-6``). Unknown keys are errors that suggest the nearest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from zotune.errors import UserError
from zotune.models import ModelConfig
from zotune.optim import directions as kinds
from zotune.optim import estimators, scales, variants

__all__ = [
    "ConfigError",
    "OptimConfig",
    "RunConfig",
    "TaskConfig",
    "TrainConfig",
    "load_config",
    "override_pairs",
    "parse_overrides",
    "read_yaml",
]


class ConfigError(UserError):
    """A configuration that cannot be used; the message says which key and what to do."""


@dataclass
class TaskConfig:
    """What to train on."""

    name: str = "sst2"  # a registered task (zotune.tasks.list_tasks()) or "custom"
    data_dir: str | None = None  # folder with one subfolder per task; None: the bundled data (SST-2 only)
    seed: int = 0  # sampling seed of the splits (and of the batch order)
    protocol: str | None = None  # "paper-causal" (1,000/500/1,000) or "kshot"; None: the task's default
    k: int = 16  # kshot protocol: examples per class (the paper: 16 or 512; seeds 13, 21, 42, 87, 100)
    train: int | None = None  # training examples; None: the protocol's number
    validation: int | None = None  # validation examples; None: the protocol's number
    test: int | None = None  # test examples; None: the protocol's number
    max_length: int = 256  # longest input in tokens; prompts are cut from the left
    max_new_tokens: int = 32  # generation tasks: longest decoded answer
    scoring: str = "auto"  # classification: "auto" (one label-word token) or "options" (each label word's
    # full log-likelihood, as multiple choice: for label words of several tokens; causal LMs only)
    custom: dict = field(default_factory=dict)  # name: custom -> the fields of zotune.tasks.custom.CustomTaskConfig
    template: str | None = None  # a registered classification task's prompt, with {field}s of its records
    # (e.g. "Movie review: {sentence}\nSentiment:"; {mask} for masked LMs); None: the paper's prompt
    label_words: list[str] | None = None  # that task's label words, in its label order; None: the paper's

    def __post_init__(self):
        if self.scoring not in ("auto", "options"):
            raise ConfigError(f"task.scoring must be auto or options, got {self.scoring!r}")
        if self.template is not None and (not isinstance(self.template, str) or not self.template.strip()):
            raise ConfigError(
                f"task.template must be a non-empty string with {{field}} placeholders, got {self.template!r}"
            )
        if isinstance(self.label_words, str):
            raise ConfigError(
                f"task.label_words must be a list of words, one per label, got the string {self.label_words!r}"
            )
        if self.label_words is not None and (
            len(self.label_words) < 2 or not all(isinstance(w, str) and w.strip() for w in self.label_words)
        ):
            raise ConfigError(
                f"task.label_words must be a list of at least two non-empty words, got {self.label_words!r}"
            )
        if self.name == "custom" and (self.template is not None or self.label_words is not None):
            raise ConfigError(
                "task.template and task.label_words are for registered tasks; a custom task sets "
                "them in task.custom (template, label_words)"
            )
        for name in ("train", "validation", "test", "max_length", "max_new_tokens", "k"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"task.{name} must be >= 0, got {value}")


SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class OptimConfig:
    """MeZO's hyper-parameters (see zotune.MeZO)."""

    lr: float = 5e-5  # learning rate (tuned for the default run: SmolLM2-135M, full parameters; the paper
    # uses 1e-6 / 1e-7 for OPT-13B and larger)
    eps: float = 1e-3  # perturbation scale
    weight_decay: float = 0.0  # on matrices only
    seed: int = 0  # seeds the perturbations
    distribution: str = "gaussian"  # or "gaussian-fast" (Gaussian from 16-bit uniforms, 8 a Philox call: about half
    # the GPU sweep's instructions), "rademacher", "sphere" (uniform on the sphere of radius sqrt(d)), "lowrank"
    # (LOZO: U V^T / sqrt(rank) on each matrix, U drawn each step, V every lowrank_every steps; SGD or history momentum),
    # "subzero" (SubZero: U Z V^T sqrt(m n) / rank, U and V orthonormal every lowrank_every steps, Z each step; the
    # same rules) or "subspace" (ZO-Muon's P Psi: variant "muon")
    lowrank_rank: int = 2  # distribution "lowrank": the rank of the factors
    lowrank_every: int = 50  # distribution "lowrank": steps between draws of V (LOZO's nu)
    sparsity: float = 0.0  # Sparse-MeZO: the fraction of each matrix left still (its largest magnitudes); the rest
    # (|theta| <= the matrix's 1 - sparsity quantile, from the clean weights each step) is perturbed and updated.
    # 0: off. SGD rule, element-wise z (gaussian, gaussian-fast, rademacher), no layerwise; fuse_next is turned off. A bit a parameter per step.
    # With estimator grzo: Sparse-GRZO (each matrix's U masked the same way; one layer's mask at a time)
    batched: bool = False  # take each step's evaluations (FZOO: all N + 1) in one vmapped forward over copies of the
    # trainable weights instead of one after another in place: for accelerators (on a 2-core CPU it is slower); costs
    # (evaluations a step) x the trainable parameters' memory and as many batches' activations; fuse_next is turned off
    fuse_next: bool = True  # two sweeps per step instead of three (two-sided, non-layerwise runs only; else off)
    stochastic_rounding: bool | None = None  # round bfloat16/float16 weights stochastically in the update, so that
    # updates below half a unit in the last place still move them on average (lr |g| z is often that small); null: on
    # exactly when a trained tensor is bfloat16 or float16 (float32 weights are updated exactly either way)
    schedule: str = "constant"  # learning-rate schedule: constant, linear or cosine (decay to 0)
    warmup_steps: int = 0  # linear warm-up before the schedule
    # The variants of the paper (§2.2, Appendix B); the defaults are plain MeZO.
    n_perturbations: int = 1  # n-SPSA: perturbations per step (2n forward passes; n + 1 one-sided)
    n_schedule: str = "constant"  # "constant", or "linear": n rises to n_perturbations_final over n_ramp_steps
    n_perturbations_final: int = 1  # linear n_schedule: n at and after n_ramp_steps
    n_ramp_steps: int = 1  # linear n_schedule: steps of the rise
    estimator: str = "two-sided"  # zotune.optim.estimators: "grzo" (GRZO: each example of the batch perturbed along
    # its own direction by forward hooks on the Linear layers, two passes, the per-example differences normalised
    # by their std; trains the Linear weights but the head; sets variant "grzo"), "grzo-raw" (GRZO without the division
    # by the std: its rate on MeZO's scale), "two-sided" (L(+eps) - L(-eps)) / 2eps, "one-sided"
    # (L(+eps) - L) / eps, "fzoo" (one-sided divided by the std of the perturbed losses; n >= 2, with
    # distribution "rademacher" and n_perturbations 8 as the FZOO paper; its lr is not MeZO's: tune it), or
    # "hizoo" (HiZOO: three passes, a per-element diagonal; n 1; sets variant "hizoo"), "kerzoo" (KerZOO: two-sided
    # at a keyed random multiple r of eps, weighted by K(r) = 15r(5-7r^2)/4, which cancels the eps^2 bias; MeZO's
    # rates, a noisier step) or "kerzoo-linear" (K(r) = 3r)
    variant: str = "sgd"  # update rule: "sgd" (MeZO), "momentum", "adam", or "muon" (ZO-Muon: on each matrix
    # theta -= lr P msign(1/N sum c_i Psi_i) along subspace directions u_i = P Psi_i, P orthonormal of rank
    # lowrank_rank redrawn every lowrank_every steps; sets distribution "subspace"; only matrices move)
    beta1: float = 0.9  # momentum / Adam: decay of the first moment
    beta2: float = 0.999  # Adam: decay of the second moment (with state "history" prefer <= 0.99)
    adam_eps: float = 1e-8  # Adam: the denominator's guard
    window: int = 32  # momentum / Adam with state "history": steps remembered (cost: window*n z per update)
    state: str = "history"  # momentum / Adam: "history" (recomputed, no memory) or "stored" (m, v tensors)
    layerwise: str = "none"  # "none"; "param-norm": scale each tensor's z by ||theta_l|| / sqrt(d_l);
    # "grad-norm" (the authors' Appendix B variant): per-layer probes estimate each layer's gradient norm c_l,
    # then layer l is perturbed along z / c_l and updated along c_l z (unbiased, the variance evened out)
    grad_norm_every: int = 0  # grad-norm: re-estimate the norms every this many steps (0: once, at the first step)
    grad_norm_probes: int = 1  # grad-norm: probes per layer and estimate (2 forward passes each)
    hizoo_alpha: float = 1e-6  # estimator "hizoo": the smoothing of its diagonal (the authors' "Hessian smooth",
    # 1e-10 for OPT-13B full-parameter); alpha * kappa moves it, and kappa was 1e2-2e3 on SmolLM2 SST-2 at eps 1e-3.
    # HiZOO keeps one float32 tensor per parameter (zotune.HiZOO)

    def __post_init__(self):
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ConfigError(f"optimizer.lr must be a finite number >= 0, got {self.lr}")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ConfigError(f"optimizer.eps must be a finite number > 0, got {self.eps}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optimizer.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        choices = {
            "distribution": tuple(kinds.KINDS),
            "n_schedule": ("constant", "linear"),
            "estimator": tuple(estimators.ESTIMATORS),
            "variant": tuple(variants.RULES),
            "state": ("history", "stored"),
            "layerwise": tuple(scales.SCALES),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"optimizer.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("n_perturbations", "n_perturbations_final"):
            value = getattr(self, name)
            if not (isinstance(value, int) and 1 <= value <= 100):
                raise ConfigError(f"optimizer.{name} must be an integer from 1 to 100, got {value!r}")
        est = estimators.get(self.estimator)
        for name in ("n_perturbations",) + (("n_perturbations_final",) if self.n_schedule == "linear" else ()):
            if not est.min_n <= getattr(self, name) <= (est.max_n or 100):
                raise ConfigError(
                    f"optimizer.{name} must be from {est.min_n} to {est.max_n or 100} with the "
                    f"{self.estimator} estimator, got {getattr(self, name)}"
                )
        self._check_estimator_rule(est)
        if self.variant == "muon" and self.distribution == "gaussian":
            self.distribution = "subspace"  # the directions ZO-Muon's rule is made for
        if self.variant == "muon" and self.distribution != "subspace":
            raise ConfigError(f"optimizer.variant 'muon' needs distribution 'subspace', got {self.distribution!r}")
        kind = kinds.get(self.distribution)
        if not kind.elementwise and (
            self.variant not in ("sgd", "momentum", "muon") or self.state == "stored" and self.variant == "momentum"
        ):
            raise ConfigError(
                f"optimizer.distribution {self.distribution!r} works with variant sgd, history momentum "
                f"or muon, got {self.variant!r}" + (" with state 'stored'" if self.variant == "momentum" else "")
            )
        if not (0 <= self.sparsity < 1):
            raise ConfigError(f"optimizer.sparsity must be in [0, 1), got {self.sparsity}")
        if (
            self.sparsity
            and est.rule != "grzo"
            and (self.variant != "sgd" or not kind.elementwise or kind.sphere or self.layerwise != "none")
        ):
            raise ConfigError(
                "optimizer.sparsity (Sparse-MeZO) works with variant sgd, distribution gaussian, gaussian-fast or "
                "rademacher and layerwise none"
            )
        if not (0 <= self.hizoo_alpha <= 1):
            raise ConfigError(f"optimizer.hizoo_alpha must be in [0, 1], got {self.hizoo_alpha}")
        for name in ("n_ramp_steps", "window", "grad_norm_probes", "lowrank_rank", "lowrank_every"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ConfigError(f"optimizer.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not (isinstance(self.grad_norm_every, int) and self.grad_norm_every >= 0):
            raise ConfigError(
                f"optimizer.grad_norm_every must be an integer >= 0 (0: estimate once), got {self.grad_norm_every!r}"
            )
        for name in ("beta1", "beta2"):
            if not (0 <= getattr(self, name) < 1):
                raise ConfigError(f"optimizer.{name} must be in [0, 1), got {getattr(self, name)}")
        if not (self.adam_eps > 0 and math.isfinite(self.adam_eps)):
            raise ConfigError(f"optimizer.adam_eps must be a finite number > 0, got {self.adam_eps}")

    def _check_estimator_rule(self, est) -> None:
        """An estimator made for one update rule (HiZOO's, GRZO's) and that rule go only together; GRZO's own
        directions take none of the direction options."""
        if est.rule is not None and self.variant == "sgd":
            self.variant = est.rule  # the estimator's own update rule (hizoo's, grzo's), which it needs
        needs = getattr(variants.RULES.get(self.variant), "estimator", None)  # a rule made for one estimator
        if (est.rule or "sgd") != self.variant and (est.rule is not None or needs is not None):
            raise ConfigError(
                f"optimizer.variant {self.variant!r} does not go with optimizer.estimator "
                f"{self.estimator!r}: HiZOO is estimator 'hizoo', GRZO estimator 'grzo' (their update rules "
                "come with them)"
            )
        if est.rule == "grzo" and (
            self.distribution != "gaussian"
            or self.n_perturbations != 1
            or self.n_schedule != "constant"
            or self.layerwise != "none"
            or self.batched
        ):
            raise ConfigError(
                f"optimizer.estimator {self.estimator!r} draws its own per-example directions (Gaussian U and signs): use "
                "distribution gaussian, n_perturbations 1, layerwise none and batched false (sparsity masks its U: "
                "Sparse-GRZO)"
            )


# train.init's choices; zotune.start (in the loop's layer, above this one) executes each (tested there)
INITS = ("auto", "probe", "none")


@dataclass
class TrainConfig:
    """The loop."""

    steps: int = 50  # MeZO steps (the default run, a linear probe first, fits 10 minutes on 2 CPU cores; more
    # steps did not add to the probe at CPU budgets (README, "The default run"); the paper runs 20,000)
    batch_size: int = 16  # examples per step (the paper: 16)
    forward_chunks: int = 0  # forward each batch in this many length-sorted slices (less padding); 0: choose
    # (on a CPU, split where the padding saved outweighs one more forward; on a GPU, one forward)
    eval_every: int = 50  # validate every this many steps (and at the end)
    time_limit: float = 0  # minutes of training (resumes included) after which the run validates, stops and tests
    # the best weights as if its last step were reached (summary "stopped": "time_limit"); 0: no limit
    divergence: float = 10.0  # stop (and test the best weights) once the training loss's running mean passes
    # this many times the starting loss (the median of the first 5 steps' losses): a learning rate too high for
    # this model (summary "stopped": "diverged", with a rate to try; objective loss only; 0: never)
    eval_batch_size: int = 32  # examples per forward when evaluating
    zero_shot: bool = True  # evaluate validation and test before training
    keep_start: bool = True  # the starting weights are a candidate for the best checkpoint: validated at step 0
    # (with zero_shot or not) and kept, and tested, when no step beats them (the summary says so)
    output_dir: str | None = None  # default: runs/<task>-<date>-<time>
    save_best: bool = True  # keep the best validation weights (trainable tensors, safetensors)
    snapshot: bool = True  # with every saved state, the trainable weights as they are (resume/model.safetensors),
    # so --resume loads them instead of replaying the whole trajectory; deleted once the run has done its steps
    progress: bool = True  # a progress bar on the terminal
    init: str = "auto"  # the weights before the first step: "probe", a linear probe fitted on the training split
    # written into the label words' output rows, then MeZO from there (the paper's Appendix F.1, LP-then-MeZO);
    # "none", the model as loaded (the paper's MeZO, from zero-shot); "auto", probe for classification tasks with
    # label words and none otherwise (logged; config.yaml records which). See zotune.start.
    objective: str = "loss"  # what MeZO minimises: loss, accuracy or f1 (the batch's negative metric), or
    # "module:function", a reward(predictions, references) -> float that MeZO maximises

    def __post_init__(self):
        if self.objective not in ("loss", "accuracy", "f1") and ":" not in self.objective:
            raise ConfigError(
                f"train.objective must be loss, accuracy, f1 or a 'module:function' reward, got {self.objective!r}"
            )
        if self.init not in INITS:
            raise ConfigError(f"train.init must be one of {', '.join(INITS)}, got {self.init!r}")
        for name in ("steps", "batch_size", "eval_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not (self.time_limit >= 0 and math.isfinite(self.time_limit)):
            raise ConfigError(
                f"train.time_limit must be a finite number of minutes >= 0 (0: none), got {self.time_limit}"
            )
        if not (self.divergence == 0 or (self.divergence > 1 and math.isfinite(self.divergence))):
            raise ConfigError(f"train.divergence must be 0 (off) or a finite factor > 1, got {self.divergence}")
        if self.forward_chunks < 0:
            raise ConfigError(f"train.forward_chunks must be >= 0 (0: chosen per batch), got {self.forward_chunks}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optimizer: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if estimators.get(self.optimizer.estimator).rule == "grzo" and self.train.objective != "loss":
            raise ConfigError(
                f"optimizer.estimator {self.optimizer.estimator!r} (GRZO) takes per-example losses: use "
                f"train.objective 'loss', got {self.train.objective!r}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}


def section_classes() -> dict[str, type]:
    """Section name -> its config dataclass."""
    hints = typing.get_type_hints(RunConfig)
    return {name: hints[name] for name in _SECTIONS}


def _known_keys() -> dict[str, str]:
    """Every accepted key -> its dotted name (bare names only where unique)."""
    dotted, bare = {}, {}
    for section, cls in section_classes().items():
        for f in dataclasses.fields(cls):
            dotted[f"{section}.{f.name}"] = f"{section}.{f.name}"
            bare.setdefault(f.name, []).append(f"{section}.{f.name}")
    keys = dict(dotted)
    keys.update({name: full[0] for name, full in bare.items() if len(full) == 1})
    return keys


def _unknown(key, known, path: Path | None = None) -> ConfigError:
    near = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.5)  # YAML keys may be numbers
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return ConfigError(f"{f'{path}: ' if path else ''}unknown config key {key!r}{hint}")


def _coerce(value, hint, key: str):
    """``value`` (from YAML or the command line) as the field's type, or a ConfigError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "on"):
                return True
            if str(value).lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if origin is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return [_coerce(v, args[0], key) for v in value]
        if hint is dict or origin is dict:
            if not isinstance(value, dict):
                raise ValueError
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be {getattr(hint, '__name__', hint)}, got {value!r}") from None
    return value


def _build(raw: dict) -> RunConfig:
    sections = {}
    for section, cls in section_classes().items():
        values = raw.get(section) or {}
        hints = typing.get_type_hints(cls)
        kwargs = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}
        try:
            sections[section] = cls(**kwargs)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return RunConfig(**sections)


def read_yaml(path: str | Path, what: str = "YAML file"):
    """The YAML document in the file at ``path``; a file that cannot be read, is not UTF-8 text or is not
    YAML raises a one-line :class:`ConfigError` naming it (``what`` says what it was for)."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a YAML {what} (not UTF-8 text at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        # a reader error (a control character) has a reason, not a problem; both may span lines
        problem = getattr(err, "problem", None) or getattr(err, "reason", None) or err
        raise ConfigError(f"{path}{where}: not valid YAML ({' '.join(str(problem).split())})") from None


def override_pairs(items: list[str]) -> list[tuple[str, str, object]]:
    """Command-line overrides, ``["--lr", "1e-6", "--task.name=rte"]``, as ``(key, text, value)``
    triples: the key with dashes as underscores, the value's text, and the value as YAML reads it
    (numbers, booleans, null, lists), else the text. The one reader of ``--key value`` and
    ``--key=value`` words, for run configs and compare grids alike."""
    pairs, i = [], 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--"):
            raise ConfigError(f"expected --key value, got {item!r}")
        key, eq, value = item[2:].partition("=")
        if not eq:
            if i + 1 >= len(items):
                raise ConfigError(f"--{key} needs a value")
            value = items[i + 1]
            i += 1
        i += 1
        pairs.append((key.replace("-", "_"), value, _parse_value(value)))
    return pairs


def parse_overrides(items: list[str]) -> dict[str, object]:
    """Command-line overrides as config changes: ``["--lr", "1e-6", "--task.name=rte"]`` gives
    ``{"optimizer.lr": "1e-6", "task.name": "rte"}`` (a name unique across sections may stand alone;
    values as :func:`override_pairs` reads them: the config's field types convert them)."""
    known = _known_keys()
    changes: dict[str, object] = {}
    for key, text, value in override_pairs(items):
        if key not in known:
            raise _unknown(key, known)
        section, name = known[key].split(".")
        if isinstance(value, (dict, list)) and _is_text(section, name):
            value = text  # "{sentence} ..." is a template, not a YAML mapping
        changes[known[key]] = value
    return changes


# What a run's own config.yaml means by a key it lacks: the value the key had before it existed, not today's
# default (train.init became "auto" after runs from zero-shot had been written without the key).
SAVED_DEFAULTS = {"train.init": "none"}


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    changes: Mapping[str, object] | None = None,
    saved: bool = False,
) -> RunConfig:
    """The run configuration: defaults, then the YAML file at ``path``, then ``overrides``, then ``changes``.

    Args:
        path: a YAML file with sections model, task, optimizer, train (each optional).
        overrides: command-line words, ``["--lr", "1e-6", "--task.name", "rte", ...]`` or ``["--lr=1e-6"]``
            (see :func:`parse_overrides`).
        changes: typed values by key, ``{"optimizer.lr": 1e-6, "train.steps": 2000}`` (a name unique
            across sections may stand alone: ``{"lr": 1e-6}``).
        saved: ``path`` is a run's own config.yaml: keys it lacks take :data:`SAVED_DEFAULTS`, the values they
            had when it was written.
    """
    raw: dict = {}
    if path is not None:
        path = Path(path)
        raw = read_yaml(path, "config file") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping with sections model, task, optimizer, train")
        if saved:
            for key, value in SAVED_DEFAULTS.items():
                section, name = key.split(".")
                if isinstance(raw.setdefault(section, {}), dict):
                    raw[section].setdefault(name, value)
        fields_of = {s: {f.name for f in dataclasses.fields(c)} for s, c in section_classes().items()}
        for section, values in raw.items():
            if section not in _SECTIONS:
                raise _unknown(section, list(_SECTIONS), path) from None
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping, got {values!r}")
            for key in values:
                if key not in fields_of[section]:
                    raise _unknown(f"{section}.{key}", [f"{section}.{k}" for k in fields_of[section]], path)
    known = _known_keys()
    typed = dict(parse_overrides(list(overrides or [])))
    for key, value in (changes or {}).items():
        if key not in known:
            raise _unknown(key, known)
        typed[known[key]] = value
    for key, value in typed.items():
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = value
    try:
        return _build(raw)
    except ConfigError as err:
        if path is not None and not typed:  # every value came from the file: say which file
            raise ConfigError(f"{path}: {err}") from None
        raise


def _is_text(section: str, name: str) -> bool:
    hint = typing.get_type_hints(section_classes()[section])[name]
    return hint is str or (
        typing.get_origin(hint) in (typing.Union, types.UnionType)
        and str in typing.get_args(hint)
        and not any(typing.get_origin(a) in (list, dict) or a in (list, dict) for a in typing.get_args(hint))
    )


def _parse_value(text: str):
    """A command-line value: YAML where it parses (numbers, booleans, null, lists), else the text."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text
