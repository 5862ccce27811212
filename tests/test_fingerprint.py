"""KeyedOptimizer.fingerprint: what copies of one run must agree on (compared across ranks by check_consistent)."""

import json

import torch

from zotune import MeZO, MeZOAdam, distributed
from zotune.optim import ForwardGradient


def _model(hidden=4):
    with torch.random.fork_rng():  # seeded, without moving the global generator that later tests see
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))


def test_mezo_fingerprint_names_seed_step_options_variant_groups_and_parameters():
    opt = MeZO(_model().named_parameters(), lr=0.05, eps=1e-3, weight_decay=0.1, seed=3, n_perturbations=2)
    facts = opt.fingerprint()
    assert list(facts) == ["seed", "step", "eps", "options", "variant", "lr and weight decay", "parameter set"]
    assert (facts["seed"], facts["step"], facts["eps"]) == (3, 0, 1e-3)
    assert facts["options"] == {"distribution": "gaussian", "fuse_next": False, "stochastic_rounding": False}
    assert facts["variant"] == {"n_perturbations": 2}
    assert facts["lr and weight decay"] == [[0.05, 0.1], [0.05, 0.0]]  # matrices, then vectors
    assert [e["name"] for e in facts["parameter set"]] == ["0.weight", "2.weight", "0.bias", "2.bias"]
    json.dumps(facts)  # plain values: they are digested and, on a mismatch, sent to every rank
    opt.step(lambda: torch.tensor(1.0))
    assert opt.fingerprint()["step"] == 1


def test_what_would_make_runs_diverge_changes_it():
    base = MeZO(_model().named_parameters(), lr=0.05, seed=3).fingerprint()
    assert MeZO(_model().named_parameters(), lr=0.05, seed=3).fingerprint() == base
    for other in (
        MeZO(_model().named_parameters(), lr=0.05, seed=4),
        MeZO(_model().named_parameters(), lr=0.06, seed=3),
        MeZO(_model(5).named_parameters(), lr=0.05, seed=3),
        MeZO(_model().named_parameters(), lr=0.05, seed=3, estimator="one-sided"),
        MeZOAdam(_model().named_parameters(), lr=0.05, seed=3),
    ):
        assert other.fingerprint() != base


def test_forward_gradient_has_no_eps_and_no_variant():
    facts = ForwardGradient(_model().named_parameters(), lr=0.05, seed=1).fingerprint()
    assert facts["eps"] is None and facts["variant"] is None
    assert facts["options"]["distribution"] == "gaussian"


def test_check_consistent_compares_the_fingerprint():
    for opt in (
        MeZO(_model().named_parameters(), lr=0.05, seed=3, n_perturbations=2),
        ForwardGradient(_model().named_parameters(), lr=0.05, seed=1),
    ):
        assert distributed._fingerprint(opt, check_values=False) == opt.fingerprint()


def test_another_torch_optimizer_is_fingerprinted_by_what_it_has():
    model = _model()
    facts = distributed._fingerprint(torch.optim.SGD(model.parameters(), lr=0.1), check_values=False)
    assert (facts["seed"], facts["step"], facts["eps"], facts["variant"]) == (None, None, None, None)
    assert facts["lr and weight decay"] == [[0.1, 0]]
    assert facts["parameter set"] == [[list(p.shape), "torch.float32"] for p in model.parameters()]
