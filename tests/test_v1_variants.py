"""Stored version-1 trajectories of every variant replay onto their base weights bit for bit.

The files were written by the optimizer before replay and the optimizer shared one description of a step
(tests/data/v1-variants/make.py): a change that moved both the same way passes the optimizer-vs-replay
tests but fails here.
"""

from pathlib import Path

import pytest
from safetensors.torch import load_file

from zotune import read_trajectory, replay

DATA = Path(__file__).parent / "data" / "v1-variants"
NAMES = sorted(p.stem for p in DATA.glob("*.zot"))


def test_the_stored_files_cover_every_record_type():
    kinds = {type(r).__name__ for name in NAMES for r in read_trajectory(DATA / f"{name}.zot").records}
    assert kinds == {"Hyper", "Step", "MultiStep", "Skip", "Flush", "LayerScales", "LayerProbe"}
    assert len(NAMES) == 8


@pytest.mark.parametrize("name", NAMES)
def test_a_stored_v1_trajectory_replays_to_its_trained_weights_bit_for_bit(name):
    base = load_file(str(DATA / ("base-bf16.safetensors" if name.startswith("bf16") else "base.safetensors")))
    trained = load_file(str(DATA / f"{name}.safetensors"))
    assert any(not base[k].equal(trained[k]) for k in base)
    replay(base, DATA / f"{name}.zot")
    for k, t in trained.items():
        assert base[k].equal(t), k
