"""Weight-decay groups by tensor rank (zotune.optim.groups), shared by MeZO, ForwardGradient and the FT baseline."""

import torch

from zotune import MeZO
from zotune.optim import ForwardGradient
from zotune.optim.groups import decay_groups, decays


def _model():
    return torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))


def test_matrices_decay_vectors_do_not_whatever_their_names():
    model = _model()
    named = list(model.named_parameters())
    assert [decays(p) for p in model.parameters()] == [True, True, False, False, False]
    assert [decays(item) for item in named] == [True, True, False, False, False]
    groups = decay_groups(named, 0.1)
    assert groups == [{"params": named[:2], "weight_decay": 0.1}, {"params": named[2:], "weight_decay": 0.0}]


def test_without_a_value_the_decayed_group_takes_the_optimizers_default():
    params = list(_model().parameters())
    groups = decay_groups(params)
    assert [sorted(g) for g in groups] == [["params"], ["params", "weight_decay"]]
    assert groups[1]["weight_decay"] == 0.0
    opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]


def test_empty_groups_are_left_out_and_order_is_kept():
    vectors = [torch.zeros(3), torch.zeros(2), torch.zeros(())]
    assert decay_groups(vectors, 0.1) == [{"params": vectors, "weight_decay": 0.0}]
    matrices = [torch.zeros(2, 2), torch.zeros(1, 2, 3)]
    assert decay_groups(iter(matrices)) == [{"params": matrices}]
    assert decay_groups([]) == []


def test_the_optimizers_split_a_flat_list_with_it():
    model = _model()
    for opt in (
        MeZO(model.named_parameters(), lr=1e-3, weight_decay=0.1),
        ForwardGradient(model.named_parameters(), lr=1e-3, weight_decay=0.1),
    ):
        assert [len(g["params"]) for g in opt.param_groups] == [2, 3]
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
