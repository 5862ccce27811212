"""zotune.checkpoint: tensors in and out of safetensors without pickle, NaN refused, copies slice by slice."""

import pytest
import torch
from memory import rss_growth_mb

from zotune import checkpoint


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "emb.weight": torch.randn(37, 5, generator=gen),
        "norm.weight": torch.randn(5, generator=gen),
        "scale": torch.tensor(2.5),
        "half": torch.randn(9, 3, generator=gen).to(torch.bfloat16),
    }


@pytest.mark.parametrize("chunk_bytes", [1, 64, 16 << 20])
def test_copy_into_round_trips_in_slices(tmp_path, chunk_bytes):
    source = _tensors()
    checkpoint.save_tensors(tmp_path / "m.safetensors", source)
    targets = {n: torch.zeros_like(t) for n, t in source.items()}
    names = checkpoint.copy_into(tmp_path / "m.safetensors", targets, chunk_bytes=chunk_bytes)
    assert sorted(names) == sorted(source)
    for n, t in source.items():
        assert torch.equal(targets[n], t) and targets[n].dtype == t.dtype


@pytest.mark.parametrize(
    "targets,match",
    [
        ({"emb.weight": torch.zeros(37, 4)}, r"'emb.weight' \[37, 5\] does not fit the model \(shape \[37, 4\]\)"),
        ({}, r"'emb.weight' \[37, 5\] does not fit the model \(no such tensor\)"),
    ],
)
def test_copy_into_checks_every_tensor_before_writing(tmp_path, targets, match):
    checkpoint.save_tensors(tmp_path / "m.safetensors", {"norm.weight": torch.ones(5), "emb.weight": torch.ones(37, 5)})
    targets = {"norm.weight": torch.zeros(5), **targets}
    with pytest.raises(checkpoint.CheckpointMismatch, match=match):
        checkpoint.copy_into(tmp_path / "m.safetensors", targets)
    assert torch.equal(targets["norm.weight"], torch.zeros(5))  # nothing written


def test_save_refuses_nan(tmp_path):
    with pytest.raises(ValueError, match="refusing to save w: it holds NaN"):
        checkpoint.save_tensors(tmp_path / "m.safetensors", {"w": torch.tensor([1.0, float("nan")])})
    assert not (tmp_path / "m.safetensors").exists()


def test_copy_into_needs_no_second_copy_of_the_weights(tmp_path):
    # 256 MB of weights restored from a checkpoint: the peak grows by a slice, not by the file.
    setup = f"""
        import torch
        from zotune import checkpoint
        w = {{"a": torch.ones(8192, 4096), "b": torch.ones(8192, 4096)}}
        checkpoint.save_tensors({str(tmp_path / "m.safetensors")!r}, w)
    """
    measured = f"checkpoint.copy_into({str(tmp_path / 'm.safetensors')!r}, w)"
    assert rss_growth_mb(setup, measured, timeout=120) < 64  # MB (load_tensors + copy_: +256)


def test_save_tensors_writes_what_the_safetensors_library_reads(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    source = {
        **_tensors(),
        "flags": torch.tensor([True, False, True]),
        "ids": torch.arange(7, dtype=torch.int64),
        "t": torch.randn(4, 6, generator=torch.Generator().manual_seed(0)).T,
    }  # a non-contiguous one
    checkpoint.save_tensors(tmp_path / "m.safetensors", source, {"step": "12"})
    loaded = load_file(tmp_path / "m.safetensors")
    assert sorted(loaded) == sorted(source)
    for n, t in source.items():
        assert torch.equal(loaded[n], t) and loaded[n].dtype == t.dtype
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        assert f.metadata() == {"step": "12"}
    assert checkpoint.read_header(tmp_path / "m.safetensors") == (
        {"step": "12"},
        {n: list(t.shape) for n, t in source.items()},
    )


def test_read_header_reads_files_of_the_safetensors_library_and_refuses_others(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2, 3)}, tmp_path / "lib.safetensors", metadata={"step": "7"})
    assert checkpoint.read_header(tmp_path / "lib.safetensors") == ({"step": "7"}, {"w": [2, 3]})
    save_file({"w": torch.zeros(1)}, tmp_path / "plain.safetensors")
    assert checkpoint.read_header(tmp_path / "plain.safetensors") == ({}, {"w": [1]})
    (tmp_path / "bad.safetensors").write_bytes(b"\x03\x00\x00\x00\x00\x00\x00\x00[1]")  # JSON, not a dict
    with pytest.raises(checkpoint.CheckpointMismatch, match="not a safetensors file"):
        checkpoint.read_header(tmp_path / "bad.safetensors")


def test_copy_into_reads_files_of_the_safetensors_library_and_converts_dtypes(tmp_path):
    from safetensors.torch import save_file

    source = _tensors()
    save_file(source, tmp_path / "lib.safetensors")
    targets = {n: torch.zeros_like(t) for n, t in source.items()}
    targets["emb.weight"] = torch.zeros(37, 5, dtype=torch.bfloat16)  # another dtype: through the buffer
    targets["norm.weight"] = torch.zeros(5, 2)[:, 0]  # non-contiguous
    checkpoint.copy_into(tmp_path / "lib.safetensors", targets, chunk_bytes=40)
    assert torch.equal(targets["emb.weight"], source["emb.weight"].to(torch.bfloat16))
    for n in ("norm.weight", "scale", "half"):
        assert torch.equal(targets[n], source[n])


def test_copy_into_refuses_a_truncated_file_before_writing(tmp_path):
    checkpoint.save_tensors(tmp_path / "m.safetensors", {"a": torch.ones(100), "b": torch.ones(100)})
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[:-8])
    targets = {"a": torch.zeros(100), "b": torch.zeros(100)}
    with pytest.raises(checkpoint.CheckpointMismatch, match="'b' is cut short"):
        checkpoint.copy_into(tmp_path / "m.safetensors", targets)
    assert not targets["a"].any()
    (tmp_path / "m.safetensors").write_bytes(b"\x05")
    with pytest.raises(checkpoint.CheckpointMismatch, match="not a safetensors file"):
        checkpoint.copy_into(tmp_path / "m.safetensors", targets)


def test_save_tensors_streams_from_the_weights(tmp_path):
    # Saving 256 MB (one 128 MB tensor among them) adds a slice to the peak, not a copy of a tensor.
    setup = f"""
        import torch
        from zotune import checkpoint
        w = {{"a": torch.ones(8192, 4096), "b": torch.ones(8192, 4096)}}
        checkpoint.save_tensors({str(tmp_path / "warm.safetensors")!r}, {{"x": torch.ones(3)}})
    """
    measured = f"checkpoint.save_tensors({str(tmp_path / 'm.safetensors')!r}, w)"
    assert rss_growth_mb(setup, measured, timeout=120) < 64  # MB (safetensors.torch.save_file: a copy of each tensor)
