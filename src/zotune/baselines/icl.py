"""In-context learning: k solved training examples in front of every prompt, no training.

As MeZO's paper runs it (Malladi et al. 2023, §3 and Appendix E: "ICL", up to 32 demonstrations for
the causal-LM tasks; after Brown et al. 2020): the same demonstrations, drawn once per seed from the
training split, precede every evaluation example, separated by a blank line. A demonstration is the
example's prompt followed by its answer (the correct label word, option or target), in the very tokens
the objective scores, so the prompt format is exactly the zero-shot one.

Because the demonstrations are shared, their keys and values are computed once and reused for every
example as an attention prefix (:class:`zotune.prefix.PrefixLM`, with positions continuing after the
prefix): the same logits as feeding the whole concatenated text, at the cost of the example alone.

Demonstrations that do not fit ``max_length`` (with the longest evaluation example after them) are
dropped whole, from the end; the log says how many fit.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from zotune.config import ConfigError
from zotune.objectives import Encoded, Objective, evaluate
from zotune.tasks import TaskError

__all__ = ["ICLConfig", "demonstration_tokens", "in_context"]


@dataclass
class ICLConfig:
    """In-context learning (see :mod:`zotune.baselines.icl`)."""

    k: int = 32  # demonstrations drawn from the training split (the paper: 32 for the causal-LM tasks)
    max_length: int = 2048  # longest context in tokens: demonstrations + example (the paper's OPT: 2048);
    # capped by the model's own limit
    separator: str = "\n\n"  # between demonstrations and before the example
    seed: int = 0  # which demonstrations, in which order
    batch_size: int = 8  # examples per forward: each carries the demonstrations' keys and values (about
    # 46 kB a token for SmolLM2-135M: 2,000 tokens x 8 examples = 0.7 GB)

    def __post_init__(self):
        if self.k < 0:
            raise ConfigError(f"icl.k must be >= 0, got {self.k}")
        if self.max_length < 1 or self.batch_size < 1:
            raise ConfigError("icl.max_length and icl.batch_size must be >= 1")


def _demo(objective: Objective, e: Encoded) -> list[int]:
    """The tokens of a solved example: prompt + answer, as the objective scores them."""
    if objective.kind == "classification":
        return list(e.sequences[0]) + [objective.label_ids[e.label]]
    if objective.kind == "multiple_choice":
        return list(e.sequences[e.label])
    eos = objective.tokenizer.eos_token_id
    tokens = list(e.sequences[0])
    return tokens[:-1] if eos is not None and tokens and tokens[-1] == eos else tokens  # no EOS mid-context


def _without_bos(tokens: Sequence[int], bos: int | None) -> list[int]:
    return list(tokens[1:]) if bos is not None and tokens and tokens[0] == bos else list(tokens)


def _shift(e: Encoded, bos: int | None) -> Encoded:
    """The example without a leading BOS (the demonstrations already start the context)."""
    if bos is None or not e.sequences or e.sequences[0][:1] != (bos,):
        return e
    return dataclasses.replace(
        e,
        sequences=tuple(s[1:] for s in e.sequences),
        positions=tuple(tuple(p - 1 for p in ps) for ps in e.positions),
        prompt=e.prompt[1:] if e.prompt[:1] == (bos,) else e.prompt,
    )


def _context_limit(model, requested: int) -> int:
    config = getattr(model, "config", None)
    limits = [getattr(config, a, None) for a in ("max_position_embeddings", "n_positions")]
    return min([requested] + [v for v in limits if isinstance(v, int) and v > 0])


def demonstration_tokens(
    objective: Objective,
    train: Sequence[Encoded],
    examples: Sequence[Encoded],
    *,
    config: ICLConfig,
    limit: int,
    log: Callable[[str], None] = print,
) -> tuple[list[int], int]:
    """(the demonstrations' tokens, how many fit): ``config.k`` drawn from ``train`` with ``config.seed``.

    The first demonstration keeps the tokenizer's leading BOS (if any), later ones lose it, and each
    ends with the separator. Whole demonstrations are dropped until the longest of ``examples`` fits
    after them within ``limit`` tokens.
    """
    tokenizer = objective.tokenizer
    bos = (
        tokenizer.bos_token_id
        if tokenizer.bos_token_id is not None and train and train[0].sequences[0][:1] == (tokenizer.bos_token_id,)
        else None
    )
    sep = tokenizer(config.separator, add_special_tokens=False)["input_ids"]
    k = min(config.k, len(train))
    if k < config.k:
        log(f"in-context learning: only {len(train)} training examples for k={config.k}")
    order = np.random.default_rng([config.seed, 0x1C1]).permutation(len(train))[:k].tolist()
    demos = [
        (_demo(objective, train[i]) if n == 0 else _without_bos(_demo(objective, train[i]), bos)) + sep
        for n, i in enumerate(order)
    ]
    longest = max((_shift(e, bos).width for e in examples), default=0)
    if objective.kind == "generation":
        longest = max(longest, max((len(e.prompt) for e in examples), default=0) + objective.max_new_tokens)
    used, total = 0, 0
    for d in demos:
        if total + len(d) + longest > limit:
            break
        used, total = used + 1, total + len(d)
    if used < k:
        log(
            f"in-context learning: {used} of {k} demonstrations fit in {limit} tokens "
            f"(the longest example takes {longest}); using {used}"
        )
    tokens = [t for d in demos[:used] for t in d]
    return tokens, used


def in_context(
    prepared, config: ICLConfig | None = None, *, log: Callable[[str], None] = print, progress: bool = True
) -> dict:
    """Evaluate ``prepared`` (a :class:`zotune.train.Prepared`) with demonstrations in the prompt.

    Returns ``{"validation": metrics, "test": metrics, "demonstrations": used, "context_tokens": n,
    "wall_time_s": s}``.

    Example::

        prepared = zotune.train.prepare(RunConfig())
        in_context(prepared, ICLConfig(k=32))["test"]["accuracy"]
    """
    from tqdm.auto import tqdm

    from zotune.prefix import PrefixLM

    config = config or ICLConfig()
    started = time.perf_counter()
    loaded, objective, encoded = prepared.loaded, prepared.objective, prepared.encoded
    if loaded.kind != "causal":
        raise TaskError(
            f"in-context learning is implemented for causal LMs (the paper's ICL rows); this model is {loaded.kind}"
        )
    model = loaded.model
    examples = [e for s in ("validation", "test") for e in encoded[s]]
    limit = _context_limit(model, config.max_length)
    tokens, used = demonstration_tokens(objective, encoded["train"], examples, config=config, limit=limit, log=log)
    bos = objective.tokenizer.bos_token_id if tokens[:1] == [objective.tokenizer.bos_token_id] else None
    if tokens:
        with torch.no_grad():
            icl_model = PrefixLM(model, torch.tensor(tokens))
        icl_model.prefix.requires_grad_(False)
    else:
        icl_model = model
    log(f"in-context learning: {used} demonstrations, {len(tokens)} tokens of context")
    results = {}
    for split in ("validation", "test"):
        if not encoded[split]:
            continue
        batch = [_shift(e, bos) for e in encoded[split]]
        with (
            tqdm(total=len(batch), desc=f"ICL {split}", unit="ex", leave=False, disable=not progress) as bar,
            torch.no_grad(),
        ):
            results[split] = evaluate(objective, icl_model, batch, config.batch_size, progress=bar.update)
    return {
        **results,
        "demonstrations": used,
        "context_tokens": len(tokens),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
