"""Linear probing: a logistic regression on the frozen model's features, the "LP" row of MeZO's tables.

As Malladi et al. 2023 (arXiv 2305.17333) run it (Table 1 and Appendix E, after LM-BFF and Kumar et al.
2022): the model is not trained; scikit-learn's logistic regression is fitted on the final hidden states
(the output embedding's input) at the position the prompt-based objective scores, and its
regularisation strength C is chosen on the validation split.

- classification: one feature vector per example, at the position whose next token is the label word
  (causal LM) or at the mask (masked LM); the regression predicts the label.
- multiple choice: one vector per option, at the option's last token (it has read the whole option: the
  position before it, the last one the objective scores, has not, and for one-token options it would be
  the same for every option); the regression is fitted on "is this the correct option", and an instance's
  prediction is its option with the largest decision value.
- generation tasks have no classes to probe: :class:`zotune.tasks.TaskError`.

:func:`init_head_from_probe` starts prompt-based fine-tuning from a probe ("linear probing then MeZO",
the paper's Appendix F.1, after LP-FT of Kumar et al. 2022): the probe's weights become the label
words' rows of the output embedding, so the head predicts what the probe predicts.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from zotune.config import ConfigError
from zotune.models import select_trainable
from zotune.objectives import Encoded, Objective, hidden_at
from zotune.tasks import TaskError

__all__ = [
    "ProbeConfig",
    "features",
    "head_rows",
    "init_head_from_probe",
    "linear_probe",
    "probe_init_unavailable",
    "write_head_rows",
]

_RANDOM_STATE = 0  # the regression's solver is deterministic; fixed anyway so a solver change cannot vary runs


@dataclass
class ProbeConfig:
    """Linear probing (see :mod:`zotune.baselines.probe`)."""

    Cs: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])  # inverse L2 strengths tried (as
    # scikit-learn's LogisticRegressionCV names them); the best on validation is kept, the first of ties
    max_iter: int = 1000  # the solver's iterations per fit
    standardize: bool = True  # scale each feature to zero mean, unit variance on train before the regression
    batch_size: int = 32  # examples per forward when extracting features
    progress: bool = True  # a progress bar while extracting features

    def __post_init__(self):
        if isinstance(self.Cs, (int, float)):
            self.Cs = [self.Cs]
        if not self.Cs or not all(isinstance(c, (int, float)) and c > 0 and math.isfinite(c) for c in self.Cs):
            raise ConfigError(
                f"probe.Cs must be a non-empty list of finite numbers > 0, got {self.Cs!r} "
                "(e.g. [0.01, 0.1, 1.0, 10.0])"
            )
        if self.max_iter < 1:
            raise ConfigError(f"probe.max_iter must be >= 1, got {self.max_iter}")
        if self.batch_size < 1:
            raise ConfigError(f"probe.batch_size must be >= 1, got {self.batch_size}")


def _check_kind(objective: Objective) -> None:
    if objective.kind not in ("classification", "multiple_choice"):
        raise TaskError(
            f"linear probing applies to classification and multiple-choice tasks; this task is "
            f"{objective.kind}: compare with zero-shot, in-context learning or fine-tuning instead"
        )


def _probe_points(objective: Objective, e: Encoded) -> list[tuple[tuple[int, ...], int]]:
    """(sequence, position) of each feature vector of ``e``: the scored position, or each option's last token."""
    if objective.kind == "classification":
        return [(e.sequences[0], e.positions[0][-1])]
    return [(s, len(s) - 1) for s in e.sequences]


@torch.no_grad()
def features(
    objective: Objective,
    model,
    encoded: Sequence[Encoded],
    batch_size: int = 32,
    progress: Callable[[int], object] | None = None,
) -> np.ndarray:
    """The final hidden states a linear probe fits: (examples, hidden size), or (options, hidden size).

    Classification: one row per example, at its scored position (the next-token position of a causal
    LM, the mask of a masked LM). Multiple choice: one row per option, all of an instance's options in
    order, at each option's last token. Runs in eval mode (no dropout), without gradients.

    Args:
        objective: the task's :class:`zotune.objectives.Objective` (classification or multiple choice).
        model: the language model.
        encoded: the encoded examples.
        batch_size: examples per forward.
        progress: called with the number of examples after each batch.

    Example::

        X = features(prepared.objective, prepared.loaded.model, prepared.encoded["train"])
        y = [e.label for e in prepared.encoded["train"]]
    """
    _check_kind(objective)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    # Batches of similar lengths (as evaluate): little padding; the rows go back to the original order.
    order = sorted(range(len(encoded)), key=lambda i: encoded[i].width)
    per_example: list[np.ndarray | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            per = [_probe_points(objective, encoded[i]) for i in chosen]
            counts = [len(pts) for pts in per]
            points = [pt for pts in per for pt in pts]
            h = hidden_at(objective, model, [s for s, _ in points], [(p,) for _, p in points]).float().cpu().numpy()
            hidden = h.shape[-1]
            for i, part in zip(chosen, np.split(h, np.cumsum(counts)[:-1])):
                per_example[i] = part
            if progress is not None:
                progress(len(chosen))
    finally:
        model.train(was_training)
    return np.concatenate(per_example) if per_example else np.zeros((0, hidden or 0), dtype=np.float32)


def _targets(objective: Objective, encoded: Sequence[Encoded]) -> np.ndarray:
    if objective.kind == "classification":
        return np.array([e.label for e in encoded])
    return np.array([int(j == e.label) for e in encoded for j in range(len(e.sequences))])


def _predict(objective: Objective, fitted, X: np.ndarray, encoded: Sequence[Encoded]) -> list[int]:
    if objective.kind == "classification":
        return fitted.predict(X).tolist()
    scores = fitted.decision_function(X)  # binary: one value per option, larger = more likely correct
    bounds = np.cumsum([len(e.sequences) for e in encoded])[:-1]
    return [int(np.argmax(s)) for s in np.split(scores, bounds)]


def _pipeline(config: ProbeConfig, C: float, fit_intercept: bool = True):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    regression = LogisticRegression(
        C=C, max_iter=config.max_iter, fit_intercept=fit_intercept, random_state=_RANDOM_STATE
    )
    return make_pipeline(StandardScaler(), regression) if config.standardize else make_pipeline(regression)


def linear_probe(prepared, config: ProbeConfig | None = None, *, log: Callable[[str], None] = print) -> dict:
    """Fit a logistic regression on ``prepared``'s frozen features; choose C on validation; test it.

    Features of every split are extracted once (:func:`features`), then a scikit-learn pipeline
    (``StandardScaler`` + ``LogisticRegression``) is fitted on train for each of ``config.Cs``; the one
    with the best validation metric (the train metric when there is no validation split) is tested.

    Args:
        prepared: a :class:`zotune.train.Prepared` (model, objective, encoded splits); the model is unchanged.
        config: the probe's settings (default :class:`ProbeConfig`).
        log: where progress lines go.

    Returns:
        ``{"train": metrics, "validation": metrics, "test": metrics, "C": the chosen C, "wall_time_s": float}``
        (an empty split's metrics are ``{}``).

    Example::

        from zotune.config import RunConfig
        from zotune.train import prepare
        config = RunConfig(); config.task.name = "sst2"
        result = linear_probe(prepare(config), ProbeConfig(Cs=[0.1, 1.0]))
        result["test"]["accuracy"], result["C"]

    Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes", the LP baseline.
    """
    return _fit_probe(prepared, config or ProbeConfig(), log)[0]


def _fit_probe(
    prepared,
    config: ProbeConfig,
    log: Callable[[str], None],
    fit_intercept: bool = True,
    splits: Sequence[str] = ("train", "validation", "test"),
):
    """(linear_probe's result, the chosen fitted pipeline); features of ``splits`` only (train and validation fit
    and choose: the test split is there to report)."""
    model, objective, encoded = prepared.loaded.model, prepared.objective, prepared.encoded
    _check_kind(objective)
    if not encoded["train"]:
        raise TaskError("the training split is empty: linear probing fits on training examples")
    started = time.perf_counter()
    from tqdm.auto import tqdm

    X = {}
    for split in splits:
        with tqdm(
            total=len(encoded[split]),
            desc=f"features {split}",
            unit="ex",
            leave=False,
            disable=not config.progress,
            dynamic_ncols=True,
        ) as bar:
            X[split] = features(objective, model, encoded[split], config.batch_size, progress=bar.update)
    y = _targets(objective, encoded["train"])
    if len(set(y.tolist())) < 2:
        what = "label" if objective.kind == "classification" else "kind of option (correct / incorrect)"
        raise TaskError(f"the training split has a single {what}: a linear probe needs examples of at least two")
    select = "validation" if encoded["validation"] and "validation" in splits else "train"
    metric = objective.metric_name
    best = None
    for C in config.Cs:
        fitted = _pipeline(config, C, fit_intercept).fit(X["train"], y)
        score = objective.metrics(_predict(objective, fitted, X[select], encoded[select]), encoded[select])[metric]
        log(f"linear probe C={C:g}: {select} {metric} {100 * score:.1f}")
        if best is None or score > best[0]:
            best = (score, C, fitted)
    _, C, fitted = best
    result = {
        split: objective.metrics(_predict(objective, fitted, X[split], encoded[split]), encoded[split])
        if encoded[split] and split in splits
        else {}
        for split in ("train", "validation", "test")
    }
    elapsed = time.perf_counter() - started
    test = (
        f"test {metric} {100 * result['test'][metric]:.1f}"
        if result["test"]
        else "test: the run evaluates its start"
        if encoded["test"]
        else "no test split"
    )
    log(f"linear probe: C={C:g} chosen on {select}; {test}; {X['train'].shape[1]} features, {elapsed:.0f} s")
    return {**result, "C": C, "wall_time_s": round(elapsed, 2)}, fitted


def _untie_output(model, log: Callable[[str], None]) -> None:
    """Give the output embedding its own copy of the matrix it shares with the input embeddings."""
    head, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if inputs is None or head.weight is not inputs.weight:
        return
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    config = getattr(model, "config", None)
    if config is not None:  # so that saving and loading do not tie them again
        config.tie_word_embeddings = False
    note = ""
    tuning, patterns = getattr(model, "zotune_tuning", None), getattr(model, "zotune_trainable", None)
    if tuning == "head":  # head tuning trained the shared matrix; now the head alone
        inputs.weight.requires_grad_(False)
        note = "; head tuning now trains the output layer only"
    elif tuning in (None, "full") and patterns is not None:
        # model.trainable chose the shared matrix by either of its names; each now answers to its own
        shared = head.weight.requires_grad
        select_trainable(model, patterns)
        if (head.weight.requires_grad, inputs.weight.requires_grad) != (shared, shared):
            state = {True: "trained", False: "frozen"}
            note = (
                f"; model.trainable now applies to each by its own name: the output layer "
                f"{state[head.weight.requires_grad]}, the input embeddings {state[inputs.weight.requires_grad]}"
            )
    log(
        "untied the output embedding from the input embeddings: the probe writes the label words' output "
        "rows, the input embeddings stay as they are (the output layer is now its own parameter, "
        f"{head.weight.numel():,} more weights){note}"
    )


def probe_init_unavailable(prepared) -> str | None:
    """Why a probe cannot initialise ``prepared``'s head (None: it can); ``train.init auto`` falls back on it."""
    model, objective, encoded = prepared.loaded.model, prepared.objective, prepared.encoded
    if objective.kind != "classification":
        return (
            f"a probe initialises the label words' output rows of classification tasks, this task is "
            f"{objective.kind} (with task.scoring options, label words are scored as options)"
        )
    if len(set(objective.label_ids)) != len(objective.label_ids):
        return "two labels share one label-word token: their output rows cannot hold different weights"
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        return f"{type(model).__name__} has no output embedding to write the probe into"
    missing = sorted(set(range(len(objective.label_ids))) - {e.label for e in encoded["train"]})
    if not encoded["train"]:
        return "the training split is empty: linear probing fits on training examples"
    if missing:
        return f"the training split has no example of label {missing[0]}: the probe would have no weights for it"
    return None


def head_rows(model, label_ids: Sequence[int]) -> dict[str, torch.Tensor]:
    """The label words' rows of the output embedding (``weight``, and ``bias`` where it has one), as copies."""
    head = model.get_output_embeddings()
    rows = torch.tensor(list(label_ids), device=head.weight.device)
    out = {"weight": head.weight.detach()[rows].clone()}
    if getattr(head, "bias", None) is not None:
        out["bias"] = head.bias.detach()[rows].clone()
    return out


def write_head_rows(model, label_ids: Sequence[int], weight, bias=None, log: Callable[[str], None] = print) -> None:
    """Write ``weight`` (and ``bias``) into the label words' rows of the output embedding, untying it first.

    The one place a start is written, whether fitted now or read back from a run's init.safetensors, so both
    give the same bits.
    """
    from zotune.checkpoint import CheckpointError

    head = model.get_output_embeddings()
    weight = torch.as_tensor(weight)
    if weight.shape != (len(label_ids), head.weight.shape[1]):
        raise CheckpointError(
            f"the start's rows are {list(weight.shape)}, this model's label words' rows "
            f"[{len(label_ids)}, {head.weight.shape[1]}]: they were written for another model"
        )
    has_bias = getattr(head, "bias", None) is not None
    if (bias is not None) != has_bias:
        raise CheckpointError(
            "the start's rows were written for a model "
            + ("without an output bias, this one has one" if has_bias else "with an output bias, this one has none")
        )
    _untie_output(model, log)
    head = model.get_output_embeddings()
    rows = torch.tensor(list(label_ids), device=head.weight.device)
    with torch.no_grad():
        head.weight[rows] = weight.to(dtype=head.weight.dtype, device=head.weight.device)
        if bias is not None:
            head.bias[rows] = torch.as_tensor(bias).to(dtype=head.bias.dtype, device=head.bias.device)


def init_head_from_probe(prepared, config: ProbeConfig | None = None, *, log: Callable[[str], None] = print) -> dict:
    """Fit a linear probe and write it into the label words' rows of the output embedding.

    Prompt-based classification scores ``softmax(h @ W[label words].T + b[label words])`` on the very
    features ``h`` a probe fits (:func:`features`), so a multinomial logistic regression on raw
    (unstandardised) features is a head: its coefficients become ``W``'s label-word rows (for two
    labels the single decision vector ``w`` becomes ``-w/2`` and ``+w/2``, whose two-way softmax is the
    regression's sigmoid) and its intercepts ``b``'s; without an output bias (Llama, GPT-2, OPT) the
    regression is fitted without an intercept. Fine-tuning then starts at the probe's solution: the
    model's predictions equal the probe's. A tied output embedding is untied first (logged). Other
    vocabulary rows are left alone.

    Args:
        prepared: a :class:`zotune.train.Prepared` of a classification task (label words).
        config: the probe's settings (``standardize`` is ignored: the head sees raw features).
        log: where progress lines go.

    Returns:
        :func:`linear_probe`'s result, plus ``"probe"``: the fitted scikit-learn pipeline.

    ``zotune train`` does this itself (``train.init``: ``probe``, or ``auto``, the default, for classification
    tasks) and stores the rows it wrote in the run folder (:mod:`zotune.start`), so that resume, eval and replay
    start from the same bits.

    Example::

        prepared = prepare(config)
        init_head_from_probe(prepared, ProbeConfig(Cs=[1.0]))
        config.train.init = "none"  # the model is started already
        zotune.train.run(config, loaded=prepared.loaded)  # MeZO from the probe's solution
        # (its trajectory records steps only: replaying it needs the same start first)

    Malladi et al. 2023, Appendix F.1 ("linear probing then MeZO"); Kumar et al. 2022, LP-FT.
    """
    config = dataclasses.replace(config or ProbeConfig(), standardize=False)
    model, objective = prepared.loaded.model, prepared.objective
    why = probe_init_unavailable(prepared)
    if why is not None:
        raise TaskError(why)
    bias = getattr(model.get_output_embeddings(), "bias", None)
    # no test features: the run that follows evaluates its start (the probe's predictions) on every split itself
    result, fitted = _fit_probe(prepared, config, log, fit_intercept=bias is not None, splits=("train", "validation"))
    regression = fitted[-1]
    labels = list(range(len(objective.label_ids)))
    if regression.classes_.tolist() != labels:
        raise TaskError(
            f"the training split has labels {regression.classes_.tolist()}, not all of {labels}: "
            "the probe has no weights for the missing ones"
        )
    coef, intercept = regression.coef_, regression.intercept_
    if len(labels) == 2:  # one decision function: halve it symmetrically, softmax([-d/2, d/2]) = sigmoid(d)
        coef, intercept = np.stack([-coef[0], coef[0]]) / 2, np.array([-intercept[0], intercept[0]]) / 2
    write_head_rows(
        model, objective.label_ids, torch.as_tensor(coef), torch.as_tensor(intercept) if bias is not None else None, log
    )
    log(f"initialised the output rows of the {len(labels)} label words from the probe (C={result['C']:g})")
    return {**result, "probe": fitted}
