"""`zotune memory`: predicted peak memory from a model's shapes."""

import pytest

from zotune.cli import main
from zotune.memory import _load_config, estimate, parse_bytes, shapes_from_config


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * 2**30 == parse_bytes("80GiB") == parse_bytes("80g")
    assert parse_bytes("512MB") == 512 * 2**20
    with pytest.raises(ValueError, match="cannot read a memory size from 'lots'"):
        parse_bytes("lots")


def test_mezo_is_inference_plus_a_sliver_and_backprop_is_far_more():
    shapes = shapes_from_config(_load_config("opt-125m"))
    assert 120e6 < shapes.params < 130e6
    est = estimate(shapes, dtype="float16", batch=16, seq=64)
    assert est.inference <= est.mezo <= 1.01 * est.inference
    assert est.mezo < est.mezo_reference_style
    assert est.mezo_lora < 1.01 * est.inference and est.mezo_prefix > est.inference
    assert est.backprop_adam > 3 * est.inference
    assert est.mezo < est.mezo_momentum_stored < est.mezo_adam_stored < est.backprop_adam
    assert 1.9 * est.inference < est.forward_gradient < 2.1 * est.inference


def test_opt_13b_inference_matches_the_measured_figure():
    # PERF.md: OPT-13B fp16, batch 16, seq 64: inference peak 25.3 GiB measured on an H100.
    est = estimate(shapes_from_config(_load_config("opt-13b")), dtype="float16", batch=16, seq=64)
    assert est.inference / 2**30 == pytest.approx(25.3, rel=0.10)


def test_cli_table_and_bad_input(capsys):
    assert main(["memory", "--model", "opt-1.3b", "--gpu-memory", "16GB"]) == 0
    out = capsys.readouterr().out
    assert "MeZO (zotune)" in out and "backprop fine-tuning (Adam)" in out and "does not fit" in out
    assert main(["memory", "--model", "opt-125m", "--gpu-memory", "lots"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "zotune memory: error: cannot read a memory size from 'lots'; write e.g. 80GB or 24GiB"
    )


def test_opt_1_3b_backprop_matches_the_measured_figure():
    # PERF.md: a backprop Adam step (mixed precision) on OPT-1.3B, seq 64, batch 16: 20.1 GiB measured.
    est = estimate(shapes_from_config(_load_config("opt-1.3b")), dtype="float16", batch=16, seq=64)
    assert est.backprop_adam / 2**30 == pytest.approx(20.1, rel=0.10)


def test_the_report_says_what_fits_one_gpu():
    from zotune.memory import report

    text = report("opt-13b", gpu_memory="40GB", batch=16, seq=64)
    lines = text.splitlines()
    assert lines[0].startswith("opt-13b: 12.") and "float16, batch 16, seq 64" in lines[0]
    rows = {line.split("  ")[1].strip(): line for line in lines[1:]}
    assert rows["inference"].endswith("  fits") and rows["MeZO (zotune)"].endswith("  fits")
    assert any(line.endswith("does not fit") for line in lines[1:])  # backprop with Adam needs ~4x
