"""task.template / task.label_words: a registered classification task with a prompt of one's own."""

import json

import pytest

from zotune.cli import main
from zotune.config import ConfigError, TaskConfig
from zotune.tasks import MASK, TaskError, get_task
from zotune.tasks.templated import Retemplated

RECORD = {"sentence": "a charming journey .", "label": 1}


def test_the_template_fills_the_records_fields_and_keeps_the_tasks_labels():
    task = Retemplated(get_task("sst2"), "Movie review: {sentence}\nSentiment:", [" negative", " positive"])
    inst = task.render(RECORD)
    assert inst.prompt == "Movie review: a charming journey .\nSentiment:"
    assert inst.options == (" negative", " positive") and inst.label == 1
    assert task.render({"sentence": "dull .", "label": 0}).label == 0
    assert task.name == "sst2" and task.model_kinds == ("causal",)
    # the data and splits are the task's own
    assert (
        task.splits(None, train=3, validation=2, test=2).train
        == get_task("sst2").splits(None, train=3, validation=2, test=2).train
    )


def test_label_words_alone_keep_the_papers_prompt():
    task = Retemplated(get_task("sst2"), label_words=[" bad", " good"])
    inst, paper = task.render(RECORD, "masked"), get_task("sst2").render(RECORD, "masked")
    assert inst.prompt == paper.prompt and inst.label == paper.label and inst.options == (" bad", " good")
    assert task.model_kinds == get_task("sst2").model_kinds


def test_a_masked_template_serves_masked_models_only():
    task = Retemplated(get_task("rte"), "{premise}? {mask}, {hypothesis}")
    record = {"premise": "It rains", "hypothesis": "it is wet", "label": "entailment"}
    inst = task.render(record, "masked")
    assert inst.prompt == f"It rains? {MASK}, it is wet" and inst.options == ("Yes", "No") and inst.label == 0
    with pytest.raises(TaskError, match="has no template for 'causal' models"):
        task.render(record, "causal")


def test_bad_templates_and_words_say_what_the_task_has():
    with pytest.raises(TaskError, match=r"names \{text\}, which sst2's records do not have \(they have: sentence\)"):
        Retemplated(get_task("sst2"), "{text} It was").render(RECORD)
    with pytest.raises(
        TaskError, match=r"has 3 words; sst2 has 2 labels, in this order: 0 = ' terrible', 1 = ' great'"
    ):
        Retemplated(get_task("sst2"), label_words=["a", "b", "c"])
    with pytest.raises(TaskError, match="copa is multiple-choice: define a custom task"):
        Retemplated(get_task("copa"), "{premise}")
    with pytest.raises(TaskError, match=r"\{mask\} once"):
        Retemplated(get_task("sst2"), "{sentence} {mask} {mask}")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"template": "  "}, "task.template must be a non-empty string"),
        ({"label_words": " good"}, "task.label_words must be a list of words, one per label, got the string"),
        ({"label_words": [" good"]}, "task.label_words must be a list of at least two non-empty words"),
        ({"label_words": [" good", ""]}, "task.label_words must be a list of at least two non-empty words"),
        ({"name": "custom", "template": "{x}"}, "a custom task sets them in task.custom"),
    ],
)
def test_bad_task_template_config(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TaskConfig(**kwargs)


def test_a_run_with_its_own_template_records_it_and_eval_uses_it(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        "--model.name",
        str(model_dir),
        "--steps",
        "2",
        "--eval_every",
        "2",
        "--train",
        "8",
        "--validation",
        "4",
        "--test",
        "4",
        "--batch_size",
        "4",
        "--progress",
        "false",
        "--output_dir",
        str(out),
        "--task.template",
        '"Review: {sentence}\\nIt was"',
        "--task.label_words",
        '[" great", " terrible"]',
    ]
    assert main(args) == 0
    config = (out / "config.yaml").read_text()
    assert "template: 'Review: {sentence}" in config and "- ' great'" in config
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--run", str(out)]) == 0
    assert f"accuracy {100 * summary['test']['accuracy']:.2f}" in capsys.readouterr().out
    assert (
        main(
            [
                "train",
                "--model.name",
                str(model_dir),
                "--task.name",
                "copa",
                "--data_dir",
                str(tmp_path),
                "--task.template",
                "{premise}",
                "--output_dir",
                str(tmp_path / "copa"),
            ]
        )
        == 2
    )
    assert "copa is multiple-choice: define a custom task" in capsys.readouterr().err
