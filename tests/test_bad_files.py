"""Bad input from a user ends in one line, never a traceback.

Every reader of a user's file, given random bytes or a valid file cut short, raises a UserError
that names the file (or, where a shorter file is still valid, reads it); the CLI prints that error
as one line with exit code 2. A model name that is nothing fails within seconds when the hub
cannot be asked.
"""

import json
import random
import socket
import time

import numpy as np
import pytest
import torch
import yaml

from zotune import checkpoint
from zotune.cli import main
from zotune.errors import UserError

RANDOM = random.Random(18).randbytes(600)


def _cuts(data: bytes) -> list[int]:
    """Where to cut a valid file: the first bytes, a spread through the middle, the last byte."""
    return sorted({0, 1, 2, 5, 9, len(data) - 1} | {len(data) * k // 11 for k in range(1, 11)})


def _bad_versions(tmp_path, data: bytes, name: str):
    """(path, whether it holds random bytes) for random bytes and for every cut of ``data``."""
    path = tmp_path / name
    path.write_bytes(RANDOM)
    yield path, True
    for cut in _cuts(data):
        path.write_bytes(data[:cut])
        yield path, False


def _is_clean(err: UserError, path) -> bool:
    return str(path) in str(err) and "\n" not in str(err)


def _read_bad_versions(tmp_path, data: bytes, name: str, read, error=UserError):
    """``read`` random bytes and every cut of ``data``: each is refused with a clean one-line ``error``
    naming the file, or (a cut only: a shorter file can still be valid) read. Returns the path and what
    was read, for the caller to check."""
    done = []
    for path, garbage in _bad_versions(tmp_path, data, name):
        try:
            result = read(path)
        except error as err:
            assert _is_clean(err, path), err
        else:
            assert not garbage, f"random bytes read as {result!r}"
            done.append(result)
    return path, done


# -- the user-error base class ---------------------------------------------------------------------


def test_every_module_error_is_a_user_error():
    from zotune.checkpoint import CheckpointError, CheckpointMismatch
    from zotune.config import ConfigError
    from zotune.models import ModelError
    from zotune.plot import PlotError
    from zotune.tasks import TaskError
    from zotune.trajectory import TrajectoryError

    for cls in (ConfigError, ModelError, TaskError, TrajectoryError, PlotError, CheckpointError, CheckpointMismatch):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError)


# -- YAML: run configs and compare grids ------------------------------------------------------------


def test_a_config_file_of_random_or_cut_bytes(tmp_path):
    from zotune.config import ConfigError, RunConfig, load_config

    data = b"model:\n  dtype: float32\ntask:\n  name: sst2\noptimizer:\n  lr: 1.0e-06\ntrain:\n  steps: 20\n"
    path, configs = _read_bad_versions(tmp_path, data, "run.yaml", load_config, ConfigError)
    assert all(isinstance(c, RunConfig) for c in configs)  # a cut at a line's end, or inside a value
    path.write_bytes(b"model:\n  name: x\x00\n")  # UTF-8, but a character YAML refuses
    with pytest.raises(ConfigError, match=r"run.yaml: not valid YAML \(special characters are not allowed\)"):
        load_config(path)
    path.write_bytes(b"7: 1\n")
    with pytest.raises(ConfigError, match="run.yaml: unknown config key 7"):
        load_config(path)


def test_a_compare_grid_of_random_or_cut_bytes(tmp_path):
    from zotune.compare import CompareConfig, load_compare_config

    data = b"tasks: [sst2, rte]\nmethods: [zero-shot, mezo]\nseeds: [0, 1]\nrun:\n  train:\n    steps: 10\n"
    path, grids = _read_bad_versions(tmp_path, data, "grid.yaml", load_compare_config)
    assert all(isinstance(g, CompareConfig) for g in grids)
    path.write_bytes(b"tasks: [1, 2]\n")
    with pytest.raises(UserError, match=r"grid.yaml: tasks must be a list of names, got \[1, 2\]"):
        load_compare_config(path)


# -- JSON files of a run: state.json, summary.json, best.json ---------------------------------------


def test_a_runs_json_files_of_random_or_cut_bytes(tmp_path):
    checkpoint.write_json(tmp_path / "good.json", {"loop": {"step": 3, "best": None}, "optimizer": {"lr": 1e-3}})
    data = (tmp_path / "good.json").read_bytes()
    for path, _ in _bad_versions(tmp_path, data[:-1], "state.json"):  # without its final newline: any cut breaks it
        with pytest.raises(checkpoint.CheckpointError) as err:
            checkpoint.read_json(path)
        assert _is_clean(err.value, path)


# -- safetensors ------------------------------------------------------------------------------------


def test_a_safetensors_file_of_random_or_cut_bytes(tmp_path):
    tensors = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5)}
    checkpoint.save_tensors(tmp_path / "good.safetensors", tensors, {"step": "3"})
    data = (tmp_path / "good.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    for path, garbage in _bad_versions(tmp_path, data, "model.safetensors"):
        targets = {name: torch.zeros_like(t) for name, t in tensors.items()}
        with pytest.raises(checkpoint.CheckpointMismatch) as err:
            checkpoint.copy_into(path, targets)
        assert _is_clean(err.value, path)
        assert all(not t.any() for t in targets.values())  # refused before anything was written
        with pytest.raises(checkpoint.CheckpointError) as err:
            checkpoint.load_tensors(path)
        assert _is_clean(err.value, path)
        if garbage or path.stat().st_size < header_end:  # the header alone is read: a cut in the data passes
            with pytest.raises(checkpoint.CheckpointMismatch) as err:
                checkpoint.read_header(path)
            assert _is_clean(err.value, path)


def test_a_safetensors_header_with_malformed_entries(tmp_path):
    path = tmp_path / "odd.safetensors"
    for entry in (
        {"dtype": "F32", "shape": [2]},
        {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]},
        [1, 2],
    ):
        body = json.dumps({"x": entry}).encode()
        path.write_bytes(len(body).to_bytes(8, "little") + body + bytes(8))
        with pytest.raises(checkpoint.CheckpointMismatch, match="tensor 'x' has a malformed entry"):
            checkpoint.copy_into(path, {"x": torch.zeros(2)})


# -- trajectories -----------------------------------------------------------------------------------


def test_a_trajectory_of_random_or_cut_bytes(tmp_path, toy_model):
    from zotune.optim import MeZO
    from zotune.trajectory import TrajectoryError, read_trajectory

    model = toy_model()
    opt = MeZO(model.named_parameters(), lr=1e-3, eps=1e-3, seed=5, trajectory=tmp_path / "good.zot")
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        opt.step(lambda: model(x).pow(2).mean())
    opt.flush()
    whole = read_trajectory(tmp_path / "good.zot")
    data = (tmp_path / "good.zot").read_bytes()
    _, cuts = _read_bad_versions(tmp_path, data, "t.zot", read_trajectory, TrajectoryError)
    for cut in cuts:  # a cut between two records leaves a shorter valid file: the run up to there
        assert cut.header == whole.header and cut.records == whole.records[: len(cut.records)]


def test_a_trajectory_whose_header_checks_out_but_is_not_json(tmp_path):
    import struct
    import zlib

    from zotune.trajectory import TrajectoryError, read_trajectory

    for body in (b"\xff\xfe not json", b"[1, 2]", b'{"seed": 1}'):
        path = tmp_path / "odd.zot"
        path.write_bytes(b"ZOTRAJ" + struct.pack("<HI", 1, len(body)) + body + struct.pack("<I", zlib.crc32(body)))
        with pytest.raises(TrajectoryError, match="odd.zot: not a zotune trajectory"):
            read_trajectory(path)


# -- GGUF -------------------------------------------------------------------------------------------


def _tiny_gguf(path):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_token_list(["a", "b", "c"])
    writer.add_tensor("token_embd.weight", np.zeros((3, 8), np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def test_a_gguf_file_of_random_or_cut_bytes(tmp_path):
    from zotune.models import ModelError, _check_gguf

    data = _tiny_gguf(tmp_path / "good.gguf")
    _check_gguf(tmp_path / "good.gguf")
    for path, _ in _bad_versions(tmp_path, data, "bad.gguf"):
        with pytest.raises(ModelError) as err:
            _check_gguf(path)
        assert _is_clean(err.value, path)
    path.write_bytes(b"GGUF" + RANDOM)  # the reported case: the magic, then noise
    with pytest.raises(ModelError, match=r"bad.gguf: GGUF version \d+; zotune reads versions 2 and 3"):
        _check_gguf(path)
    path.write_bytes(data[:4] + (3).to_bytes(4, "big") + data[8:])
    with pytest.raises(ModelError, match="a big-endian file"):
        _check_gguf(path)


def test_loading_a_bad_gguf_file_fails_before_transformers_reads_it(tmp_path, monkeypatch):
    from zotune.models import ModelConfig, ModelError, load_model

    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "bad.gguf"
    path.write_bytes(_tiny_gguf(tmp_path / "good.gguf")[:300])
    with pytest.raises(ModelError, match="bad.gguf: a truncated GGUF file"):
        load_model(ModelConfig(name=str(path)), log=lambda m: None)
    assert not (tmp_path / "cache").exists()


# -- a model's config.json for `zotune memory` ------------------------------------------------------


def test_a_config_json_of_random_or_cut_bytes(tmp_path):
    from zotune.memory import _load_config
    from zotune.models import ModelError

    data = json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2}).encode()
    for path, _ in _bad_versions(tmp_path, data, "config.json"):
        with pytest.raises(ModelError) as err:
            _load_config(str(path))
        assert _is_clean(err.value, path)


# -- data files -------------------------------------------------------------------------------------


def _readers():
    from zotune.tasks import readers

    passage = {
        "passage": {
            "text": "Ann met Bob.",
            "questions": [{"question": "Who?", "answers": [{"text": "Bob", "label": 1}]}],
            "entities": [{"start": 0, "end": 2}],
        },
        "qas": [{"query": "@placeholder met Bob", "answers": [{"text": "Ann"}]}],
    }
    return [
        (readers.read_tsv, "d.tsv", b"sentence\tlabel\nit was fine\t1\nawful\t0\n"),
        (readers.read_csv, "d.csv", b'label,text\n1,"fine, really"\n0,awful\n'),
        (readers.read_label_text, "d.txt", b"1 it was fine\n0 awful\n"),
        (readers.read_jsonl, "d.jsonl", b'{"sentence": "fine", "label": 1}\n{"sentence": "awful", "label": 0}\n'),
        (readers.read_json_records, "d.json", json.dumps({"0": {"s": "fine"}, "1": {"s": "awful"}}).encode()),
        (readers.read_multirc, "m.jsonl", (json.dumps(passage) + "\n").encode()),
        (readers.read_record, "r.jsonl", (json.dumps(passage) + "\n").encode()),
    ]


@pytest.mark.parametrize("reader,name,data", _readers(), ids=lambda v: getattr(v, "__name__", None))
def test_a_data_file_of_random_or_cut_bytes(tmp_path, reader, name, data):
    from zotune.tasks import TaskError

    _, read = _read_bad_versions(tmp_path, data, name, reader, TaskError)
    assert all(read)  # lines are records: a cut after one, or inside a text, leaves fewer or shorter ones


def test_record_files_with_the_wrong_shapes(tmp_path):
    from zotune.tasks import TaskError
    from zotune.tasks.readers import read_multirc, read_record

    path = tmp_path / "r.jsonl"
    for line, message in [
        ({"passage": {"text": "t", "entities": 3}, "qas": []}, "'entities' must be a list"),
        ({"passage": {"text": "t", "entities": []}, "qas": ["q"]}, "'qas' must be a list"),
        ({"passage": {"text": 5, "entities": []}, "qas": []}, "'text' must be a string"),
    ]:
        path.write_text(json.dumps(line) + "\n")
        with pytest.raises(TaskError, match=message):
            read_record(path)
    path.write_text(json.dumps({"passage": {"text": "t", "questions": 7}}) + "\n")
    with pytest.raises(TaskError, match="r.jsonl:1: passage's 'questions' must be a list"):
        read_multirc(path)


def test_a_custom_tasks_file_of_random_or_cut_bytes(tmp_path):
    from zotune.tasks import TaskError
    from zotune.tasks.custom import CustomTask, CustomTaskConfig

    task = CustomTask(
        CustomTaskConfig(
            template="{text} It was", train="train.csv", label_field="stars", label_words={"1": " bad", "5": " good"}
        )
    )
    data = b"text,stars\nawful film,1\ngreat film,5\nfine,5\n"
    _, read = _read_bad_versions(tmp_path, data, "train.csv", task.load, TaskError)
    assert all(read)


# -- the command line: one line, exit 2 -------------------------------------------------------------


def _one_line_exit_2(capsys, argv, *expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err


def test_cli_binary_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_bytes(RANDOM)
    _one_line_exit_2(capsys, ["train", "--config", "r.yaml"], "zotune train: error: r.yaml: not a YAML config file")


def test_cli_gguf_of_noise(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + RANDOM)
    _one_line_exit_2(capsys, ["train", "--model.name", "bad.gguf"], "zotune train: error: bad.gguf: GGUF version")
    assert not (tmp_path / "runs").exists()


def test_cli_resume_with_a_broken_state(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text(yaml.safe_dump({"train": {"steps": 2}}))
    (tmp_path / "r" / "state.json").write_text('{"loop": {"step": 1, "be')
    _one_line_exit_2(capsys, ["train", "--resume", "r"], "zotune train: error: r/state.json: not valid JSON")


def test_cli_replay_step_best_with_a_broken_best_json(tmp_path, monkeypatch, capsys, toy_model):
    from zotune.optim import MeZO

    monkeypatch.chdir(tmp_path)
    model = toy_model()
    opt = MeZO(model.named_parameters(), lr=1e-3, trajectory=tmp_path / "trajectory.zot")
    opt.step(lambda: model(torch.ones(2, 6)).pow(2).mean())
    opt.flush()
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "best.json").write_bytes(RANDOM)
    _one_line_exit_2(
        capsys,
        ["replay", "--base", "x", "--trajectory", "trajectory.zot", "--out", "o", "--step", "best"],
        "best/best.json: not a JSON file",
    )


# -- a model name that is nothing, offline: seconds, not half a minute -------------------------------


@pytest.fixture
def no_proxy(monkeypatch):
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return constants


def test_hub_unavailable_says_why(no_proxy, monkeypatch):
    from zotune.models import hub_unavailable

    with socket.socket() as server:  # a port that listens: the hub "answers"
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(no_proxy, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_unavailable() is None
    # the same port, closed now: refused at once
    assert "is unreachable" in hub_unavailable()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_unavailable() == "HF_HUB_OFFLINE is set"


@pytest.mark.parametrize(
    "argv,expected",
    [
        (
            ["train", "--model.name", "no-such-model"],
            [
                "cannot load model 'no-such-model': it is not the embedded default (smollm2-135m-instruct), there is no file "
                "or folder no-such-model, it is not in the local Hugging Face cache, and the hub was not asked: "
                "HF_HUB_OFFLINE is set"
            ],
        ),
        (
            ["memory", "--model", "opt-999t"],
            [
                "cannot find model 'opt-999t': it is not an OPT size (opt-125m, ",
                "and there is no config.json file or model "
                "folder opt-999t, it is not in the local Hugging Face cache, and the hub was not asked: HF_HUB_OFFLINE is set",
            ],
        ),
    ],
)
def test_an_unknown_model_name_offline_fails_in_seconds(tmp_path, monkeypatch, capsys, no_proxy, argv, expected):
    import transformers  # noqa: F401  (imported before the clock starts: the first import alone takes seconds)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    _one_line_exit_2(capsys, argv, *expected)
    assert time.perf_counter() - start < 10  # ~27 s of hub retries before
