"""Tasks: readers on the real data, the paper's templates, sampling protocols, the bundled SST-2
sample, custom tasks, and the errors each bad input gives."""

import json
from collections import Counter
from pathlib import Path

import pytest

from zotune.tasks import MASK, Task, TaskError, get_task, list_tasks, register
from zotune.tasks import readers as R
from zotune.tasks.custom import CustomTask, CustomTaskConfig
from zotune.tasks.glue import build_sst2_bundle
from zotune.tasks.sampling import shrink

DATA = Path(__file__).parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(
    not (DATA / "PROVENANCE.txt").is_file(), reason=f"task data not found at {DATA} (the project's shared/data folder)"
)

ALL = [
    "boolq",
    "cb",
    "copa",
    "drop",
    "mnli",
    "multirc",
    "record",
    "rte",
    "snli",
    "squad",
    "sst2",
    "sst5",
    "trec",
    "wic",
    "wsc",
]


# -- readers on the real files -------------------------------------------------------------------


def _provenance():
    if not (DATA / "PROVENANCE.txt").is_file():
        return []
    out = []
    for line in (DATA / "PROVENANCE.txt").read_text().splitlines():
        path, rows, _, columns, *_ = (cell.strip() for cell in line.split("|"))
        out.append((path, int(rows), columns))
    return out


def _read(path: str):
    """The reader (and its options) for each file of shared/data, by its documented format."""
    p = DATA / path
    if path.endswith(".jsonl"):
        return R.read_jsonl(p)
    if path.endswith(".json"):
        return R.read_json_records(p)
    if path.endswith(".csv"):
        return R.read_csv(p, fieldnames=("label", "text"))
    if path.endswith(".all") or path == "SST-2/dpt_sentlevel_test.tsv":
        return R.read_label_text(p)
    if path.startswith("SST-5/"):
        return R.read_tsv(p, fieldnames=("label", "text"))
    return R.read_tsv(p, ragged_last=path.startswith("SNLI/"))


@needs_data
@pytest.mark.parametrize("path,rows,columns", _provenance(), ids=[p for p, _, _ in _provenance()])
def test_every_data_file_reads_with_the_documented_rows_and_fields(path, rows, columns):
    records = _read(path)
    if path == "SST-2/dpt_sentlevel_test.tsv":
        rows += 1  # no header row, but PROVENANCE counted its first line as one: SST-2's test has 1,821
    assert len(records) == rows
    assert records.where(0).startswith(str(DATA / path))
    if not columns.startswith("<") and " " not in columns:  # a column list (cut at 90 characters)
        documented, keys = columns.rstrip(",").split(","), list(records[0])
        assert keys[: len(documented) - 1] == documented[:-1] and keys[len(documented) - 1].startswith(documented[-1])
        if len(columns) < 90:
            assert len(keys) == len(documented)
    if "label" in records[0] and path.endswith((".csv", ".all")):
        assert {int(r["label"]) for r in records} <= set(range(6))


@needs_data
def test_multirc_and_record_are_flattened():
    multirc = R.read_multirc(DATA / "MultiRC" / "mice_val_original.jsonl")
    assert len({(r["idx"]["paragraph"], r["idx"]["question"]) for r in multirc}) == 953  # questions
    assert len(multirc) == 4848 and {r["label"] for r in multirc} == {0, 1}
    assert set(multirc[0]) == {"paragraph", "question", "answer", "label", "idx"}
    record = R.read_record(DATA / "ReCoRD" / "ptuning_fewglue32dev_train.jsonl")
    assert len(record) == 32
    assert record[0]["answers"] == ["Olimpija Ljubljana"] and "Olimpija Ljubljana" in record[0]["entities"]
    assert record[0]["entities"] == sorted(set(record[0]["entities"]))


def test_readers_parse_quoting_keys_and_label_text(tmp_path):
    csv = tmp_path / "a.csv"
    csv.write_text('3,"what , surprising ""quotes"""\n1,"two\nlines"\n2,plain\n')
    rows = R.read_csv(csv, fieldnames=("label", "text"))
    assert [r["text"] for r in rows] == ['what , surprising "quotes"', "two\nlines", "plain"]
    assert rows.locations == [1, 2, 4]
    keyed = tmp_path / "a.json"
    keyed.write_text(json.dumps({"10": {"text_a": "c"}, "2": {"text_a": "b"}, "0": {"text_a": "a"}}))
    assert [r["text_a"] for r in R.read_json_records(keyed)] == ["a", "b", "c"]
    spaced = tmp_path / "a.all"
    spaced.write_text("5 How far is it ?\n\n0 Why ?\n")
    assert list(R.read_label_text(spaced)) == [
        {"label": "5", "text": "How far is it ?"},
        {"label": "0", "text": "Why ?"},
    ]
    ragged = tmp_path / "a.tsv"
    ragged.write_text("s1\ts2\tgold\nA\tB\tx\ty\tneutral\n")
    assert R.read_tsv(ragged, ragged_last=True)[0] == {"s1": "A", "s2": "B", "gold": "neutral"}


@pytest.mark.parametrize(
    "name,text,reader,message",
    [
        ("bad.jsonl", '{"a": 1}\n\n{"a": 2,}\n', R.read_jsonl, "bad.jsonl:3: invalid JSON"),
        ("list.jsonl", '{"a": 1}\n[1, 2]\n', R.read_jsonl, "list.jsonl:2: expected a JSON object, got list"),
        (
            "bad.tsv",
            "sentence\tlabel\nfine\t1\nno label here\n",
            R.read_tsv,
            "bad.tsv:3: expected 2 tab-separated columns (sentence, label), got 1",
        ),
        ("bad.csv", 'text,label\nok,1\n"open,1\n', R.read_csv, "bad.csv:"),
        ("short.csv", "text,label\nok,1\nonly\n", R.read_csv, "short.csv:3: expected 2 comma-separated columns"),
        ("bad.json", '{"0": {"a": 1}, "1": 5}', R.read_json_records, "bad.json[1]: expected a JSON object, got int"),
        ("empty.jsonl", "\n\n", R.read_jsonl, "empty.jsonl: no records (the file is empty)"),
        ("header.tsv", "sentence\tlabel\n", R.read_tsv, "header.tsv: no records"),
        ("bad.all", "5\n", R.read_label_text, "bad.all:1: expected 'label text'"),
        (
            "multirc.jsonl",
            '{"idx": 0, "passage": {"questions": []}}\n',
            R.read_multirc,
            "multirc.jsonl:1: passage has no 'text' field",
        ),
    ],
)
def test_malformed_files_name_the_file_and_line(tmp_path, name, text, reader, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TaskError, match=None) as err:
        reader(path)
    assert message in str(err.value) and str(tmp_path) in str(err.value)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(TaskError, match=r"data file not found: .*nowhere\.jsonl"):
        R.read_jsonl(tmp_path / "nowhere.jsonl")


# -- the registry --------------------------------------------------------------------------------


def test_registry_lists_every_paper_task_with_a_kind_and_model_kinds():
    assert list_tasks() == ALL
    kinds = {name: (get_task(name).kind, get_task(name).model_kinds) for name in ALL}
    assert kinds["sst2"] == ("classification", ("causal", "masked"))
    assert kinds["sst5"] == ("classification", ("masked",))
    assert kinds["copa"] == kinds["record"] == ("multiple_choice", ("causal",))
    assert kinds["squad"] == kinds["drop"] == ("generation", ("causal",))


def test_unknown_task_suggests_the_closest_name():
    with pytest.raises(TaskError) as err:
        get_task("sst3")
    assert str(err.value) == f"unknown task 'sst3'; did you mean 'sst2'? known: {', '.join(ALL)}"
    with pytest.raises(TaskError, match=r"^unknown task 'zzz'; known: boolq, "):
        get_task("zzz")


@pytest.mark.parametrize(
    "task,message",
    [
        (Task(name="sst2"), "task 'sst2' is already registered"),
        (Task(name="My-Task"), "task name 'My-Task' is malformed"),
        (Task(name=""), "task name '' is malformed"),
        (Task(name="fine", kind="regression"), "task 'fine' has kind 'regression'"),
        (Task(name="fine", model_kinds=("seq2seq",)), "task 'fine' has model kinds ('seq2seq',)"),
        ("sst2", "register() takes a Task instance, got str"),
    ],
)
def test_register_rejects_duplicate_and_malformed_tasks(task, message):
    with pytest.raises(TaskError) as err:
        register(task)
    assert message in str(err.value)
    assert list_tasks() == ALL


@pytest.mark.parametrize("name,model_kind", [("sst5", "causal"), ("cb", "masked"), ("squad", "masked")])
def test_render_rejects_a_model_kind_without_template(name, model_kind):
    with pytest.raises(TaskError, match=f"task '{name}' has no template for '{model_kind}' models"):
        get_task(name).render({}, model_kind)


# -- the paper's templates on one known record each ------------------------------------------------


def _first(path, reader=R.read_jsonl):
    return reader(DATA / path)[0]


TEMPLATES = [  # task, model kind, record loader, prompt (or its start and end), options, label
    (
        "sst2",
        "causal",
        lambda: {"sentence": "it 's a charming and often affecting journey . ", "label": 1},
        "it 's a charming and often affecting journey . It was",
        (" terrible", " great"),
        1,
    ),
    (
        "sst2",
        "masked",
        lambda: {"sentence": "it 's a charming and often affecting journey .", "label": "1"},
        f"it 's a charming and often affecting journey . It was {MASK}.",
        (" terrible", " great"),
        1,
    ),
    (
        "sst5",
        "masked",
        lambda: {"sentence": "nice piece of work .", "label": 3},
        f"nice piece of work . It was {MASK}.",
        (" terrible", " bad", " okay", " good", " great"),
        3,
    ),
    (
        "trec",
        "masked",
        lambda: {"sentence": "How far is it from Denver to Aspen ?", "label": 5},
        f"{MASK}: How far is it from Denver to Aspen ?",
        (" Description", " Entity", " Expression", " Human", " Location", " Number"),
        5,
    ),
    (
        "snli",
        "masked",
        lambda: _first("SNLI/gennli_dev.jsonl"),
        f"Two women are embracing while holding to go packages? {MASK}, the sisters are hugging goodbye while "
        "holding to go packages after just eating lunch.",
        (" Yes", " Maybe", " No"),
        1,
    ),
    (
        "mnli",
        "masked",
        lambda: _first("MNLI/gennli_dev.jsonl"),
        f"The new rights are nice enough? {MASK}, everyone really likes the newest benefits",
        (" Yes", " Maybe", " No"),
        1,
    ),
    (
        "rte",
        "causal",
        lambda: _first("RTE/jiant_train.jsonl"),
        'No Weapons of Mass Destruction Found in Iraq Yet.\nDoes this mean that "Weapons of Mass Destruction '
        'Found in Iraq." is true? Yes or No?\n',
        ("Yes", "No"),
        1,
    ),
    (
        "rte",
        "masked",
        lambda: _first("RTE/jiant_train.jsonl"),
        f"No Weapons of Mass Destruction Found in Iraq Yet? {MASK}, weapons of Mass Destruction Found in Iraq.",
        (" Yes", " No"),
        1,
    ),
    (
        "cb",
        "causal",
        lambda: _first("CB/mice_train.jsonl"),
        "Suppose It was a complex language. Not written down but handed down. One might say it was peeled down. "
        'Can we infer that "the language was peeled down"? Yes, No, or Maybe?\n',
        ("Yes", "No", "Maybe"),
        0,
    ),
    (
        "boolq",
        "causal",
        lambda: _first("BoolQ/mice_val.jsonl"),
        (
            "Ethanol fuel -- All biomass goes through",
            "than producing gasoline. Does ethanol take more energy make that produces?\n",
        ),
        ("Yes", "No"),
        1,
    ),
    (
        "wsc",
        "causal",
        lambda: _first("WSC/jiant_train.jsonl"),
        "Mark told Pete many lies about himself, which Pete included in his book. He should have been more "
        'skeptical.\nIn the previous sentence, does the pronoun "he" refer to Mark? Yes or No?\n',
        ("No", "Yes"),
        0,
    ),
    (
        "wic",
        "causal",
        lambda: _first("WiC/mice_train.jsonl"),
        'Does the word "place" have the same meaning in these two sentences? Yes, No?\nDo you want to come over '
        "to my place later?\nA political system with no place for the less prominent groups.\n",
        ("No", "Yes"),
        0,
    ),
    (
        "multirc",
        "causal",
        lambda: _first("MultiRC/mice_train_original.jsonl", R.read_multirc),
        (
            "While this process moved along, diplomacy continued its rounds.",
            "The U.S. effort continued. \nQuestion: What did the high-level effort to persuade Pakistan include?\n"
            'I found this answer "Children, Gerd, or Dorian Popa". Is that correct? Yes or No?\n',
        ),
        ("No", "Yes"),
        0,
    ),
    (
        "copa",
        "causal",
        lambda: _first("COPA/mice_train.jsonl"),
        "My body cast a shadow over the grass because",
        (" the sun was rising.", " the grass was cut."),
        0,
    ),
]


@needs_data
@pytest.mark.parametrize(
    "name,model_kind,load,prompt,options,label", TEMPLATES, ids=[f"{t[0]}-{t[1]}" for t in TEMPLATES]
)
def test_paper_template_renders_a_known_record_exactly(name, model_kind, load, prompt, options, label):
    instance = get_task(name).render(load(), model_kind)
    if isinstance(prompt, tuple):
        assert instance.prompt.startswith(prompt[0]) and instance.prompt.endswith(prompt[1])
    else:
        assert instance.prompt == prompt
    assert instance.options == options and instance.label == label
    assert instance.prompt.count(MASK) == (1 if model_kind == "masked" else 0)


@needs_data
def test_record_squad_and_drop_render_their_choices_and_answers():
    record = get_task("record").render(_first("ReCoRD/ptuning_fewglue32dev_train.jsonl", R.read_record))
    assert record.prompt.startswith("By Hamish Mackay Goals from Diego Costa")
    assert "\n- Young defender Kurt Zouma grabbed the winner" in record.prompt and "@highlight" not in record.prompt
    assert record.prompt.endswith("to make it 3-1\n-")
    assert record.options[record.label] == (
        " Speaking after the game, Mourinho said: 'The important thing is "
        "to give competition to the players, the best thing was that "
        "Olimpija Ljubljana made it difficult."
    )
    assert len(record.options) == 19
    squad = get_task("squad").render(_first("SQuAD/dev-v1.1.jsonl"))
    assert squad.prompt.startswith("Title: Super_Bowl_50\nContext: Super Bowl 50 was an American football game")
    assert squad.prompt.endswith("\nQuestion: Which NFL team represented the AFC at Super Bowl 50?\nAnswer:")
    assert (squad.target, squad.answers, squad.options) == (" Denver Broncos", ("Denver Broncos",), ())
    drop = get_task("drop").render(_first("DROP/drop_1000.jsonl"))
    assert drop.prompt.startswith("Passage:  Hoping to rebound from their loss to the Patriots")
    assert drop.prompt.endswith("\nQuestion: Who scored the first touchdown of the game?\nAnswer:")
    assert (drop.target, drop.answers) == (" Chaz Schilens", ("Chaz Schilens", "JaMarcus Russell"))


def test_drop_answers_cover_numbers_dates_and_spans():
    task = get_task("drop")
    empty_date = {"day": "", "month": "", "year": ""}
    record = {
        "passage": "p",
        "question": "q ",
        "answer": {"number": "", "date": {"day": "", "month": "May", "year": "1990"}, "spans": []},
        "validated_answers": [
            {"number": "7", "date": empty_date, "spans": []},
            {"number": "", "date": empty_date, "spans": ["a", "b"]},
        ],
    }
    assert task.render(record).answers == ("May 1990", "7", "a", "b")
    assert task.render(record).prompt == "Passage: p\nQuestion: q\nAnswer:"


@needs_data
@pytest.mark.parametrize("name", ALL)
def test_every_task_renders_all_its_sampled_records_for_each_model_kind(name):
    task = get_task(name)
    splits = task.splits(DATA, seed=0, train=60, validation=30, test=60)
    records = splits.train + splits.validation + splits.test
    assert records and splits.note
    for model_kind in task.model_kinds:
        for record in records:
            instance = task.render(record, model_kind)
            assert instance.prompt.count(MASK) == (model_kind == "masked")
            if task.kind == "generation":
                assert instance.target == " " + instance.answers[0] and instance.label is None
            else:
                assert 0 <= instance.label < len(instance.options) and len(instance.options) >= 2
                if task.kind == "classification":
                    assert len(instance.options) == len(task.label_words)


# -- sampling -----------------------------------------------------------------------------------


def _ids(rows):
    return {id(r) for r in rows}


@needs_data
@pytest.mark.parametrize(
    "name,sizes",
    [
        ("sst2", (1000, 500, 872)),  # GLUE train -> train/validation, GLUE dev (872) is the test set
        ("boolq", (1000, 500, 1000)),  # one labelled file: all three drawn from it
        ("multirc", (1000, 500, 1000)),
        ("cb", (167, 83, 56)),  # 250 training examples, split 2:1
        ("record", (21, 11, 32)),  # FewGLUE's 32 + 32
        ("drop", (381, 191, 428)),  # 572 official-train questions, 428 official-dev questions
    ],
)
def test_paper_causal_sizes_are_disjoint_deterministic_and_seeded(name, sizes):
    task = get_task(name)
    a = task.splits(DATA, seed=1)
    assert (len(a.train), len(a.validation), len(a.test)) == sizes
    assert not (_ids(a.train) & _ids(a.validation) or _ids(a.train) & _ids(a.test) or _ids(a.validation) & _ids(a.test))
    assert len(_ids(a.train)) == len(a.train)
    again, other = task.splits(DATA, seed=1), task.splits(DATA, seed=2)
    assert (again.train, again.validation, again.test) == (a.train, a.validation, a.test)
    assert other.train != a.train
    if sizes[0] < 1000:
        assert "scaled down in proportion" in a.note


@needs_data
def test_paper_causal_keeps_passages_and_questions_apart_where_the_data_allows():
    drop = get_task("drop").splits(DATA, seed=0)
    assert {r["origin"].split()[0] for r in drop.train + drop.validation} == {"drop_dataset_train"}
    assert {r["passage_id"] for r in drop.test}.isdisjoint(r["passage_id"] for r in drop.train)
    boolq = get_task("boolq").splits(DATA, seed=0)
    assert {r["idx"] for r in boolq.test}.isdisjoint(r["idx"] for r in boolq.train + boolq.validation)


@needs_data
def test_kshot_uses_lmbff_files_for_their_seeds_and_samples_otherwise():
    sst5 = get_task("sst5")
    fixed = sst5.splits(DATA, protocol="kshot", k=16, seed=13)
    assert "LM-BFF 16-shot split files for seed 13" in fixed.note
    assert fixed.train[0] == {
        "sentence": "what 's surprising about this traditional thriller , moderately successful "
        "but not completely satisfying , is exactly how genteel and unsurprising "
        "the execution turns out to be .",
        "label": 3,
    }
    assert Counter(r["label"] for r in fixed.train) == {c: 16 for c in range(5)} and len(fixed.test) == 2210
    sampled = sst5.splits(DATA, protocol="kshot", k=16, seed=0)
    assert (
        Counter(r["label"] for r in sampled.train)
        == Counter(r["label"] for r in sampled.validation)
        == {c: 16 for c in range(5)}
    )
    assert _ids(sampled.train).isdisjoint(_ids(sampled.validation))
    assert sampled.train == sst5.splits(DATA, protocol="kshot", k=16, seed=0).train
    assert sampled.train != sst5.splits(DATA, protocol="kshot", k=16, seed=1).train
    big = get_task("rte").splits(DATA, protocol="kshot", k=512, seed=42, test=100)
    assert Counter(r["label"] for r in big.train) == {"entailment": 512, "not_entailment": 512}
    assert len(big.validation) == 1024 and len(big.test) == 100 and "test capped at 100 of 277" in big.note
    snli = get_task("snli").splits(DATA, protocol="kshot", seed=21)
    assert len(snli.train) == len(snli.validation) == 48 and len(snli.test) == 9842  # gennli_dev as test


@needs_data
def test_kshot_falls_back_to_sampling_without_the_lmbff_files(tmp_path):
    (tmp_path / "TREC").mkdir()
    for name in ("dpt_train.csv", "dpt_test.csv"):
        (tmp_path / "TREC" / name).write_bytes((DATA / "TREC" / name).read_bytes())
    splits = get_task("trec").splits(tmp_path, protocol="kshot", k=16, seed=13)
    assert "lmbff_kshot/16-13_train.csv not found, sampled instead" in splits.note
    assert Counter(r["label"] for r in splits.train) == {c: 16 for c in range(6)}


def test_shrink_scales_requests_to_what_exists():
    assert shrink(5000, (1000, 500)) == (1000, 500)
    assert shrink(32, (1000, 500)) == (21, 11)
    assert shrink(3270, (1000, 1000, 500)) == (1000, 1000, 500)
    assert sum(shrink(7, (1, 1, 1, 1, 1, 1, 1, 1))) == 7


@pytest.mark.parametrize(
    "name,kwargs,message",
    [
        ("sst5", dict(protocol="paper-causal"), "task 'sst5' has no 'paper-causal' protocol (it supports: kshot)"),
        ("cb", dict(protocol="kshot"), "task 'cb' has no 'kshot' protocol"),
        ("rte", dict(protocol="lmbff"), "unknown protocol 'lmbff'; use one of paper-causal, kshot"),
        ("rte", dict(), "task 'rte' needs data_dir"),
    ],
)
def test_splits_reject_unsupported_protocols_and_a_missing_data_dir(name, kwargs, message):
    with pytest.raises(TaskError) as err:
        get_task(name).splits(None, **kwargs)
    assert message in str(err.value)


def test_missing_task_folder_or_file_says_what_is_expected(tmp_path):
    with pytest.raises(TaskError, match=r"task 'rte' expects jiant_train\.jsonl in .*RTE \(folder is missing"):
        get_task("rte").splits(tmp_path)
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "jiant_train.jsonl").write_text('{"premise": "a.", "hypothesis": "b", "label": "entailment"}\n')
    with pytest.raises(TaskError, match=r"expects jiant_val\.jsonl in .*RTE \(file is missing"):
        get_task("rte").splits(tmp_path)


def test_bad_records_in_task_data_name_file_and_line(tmp_path):
    folder = tmp_path / "CB"
    folder.mkdir()
    good = '{"premise": "p", "hypothesis": "h", "label": "neutral"}\n'
    (folder / "mice_val.jsonl").write_text(good)
    (folder / "mice_train.jsonl").write_text(good + '{"premise": "p", "hypothesis": "h", "label": "maybe"}\n')
    with pytest.raises(TaskError) as err:
        get_task("cb").splits(tmp_path)
    assert str(err.value) == (
        f"{folder / 'mice_train.jsonl'}:2: unknown label 'maybe' for task 'cb' "
        "(expected one of 'entailment', 'contradiction', 'neutral')"
    )
    (folder / "mice_train.jsonl").write_text(good + '{"premise": "p", "label": "neutral"}\n')
    with pytest.raises(TaskError, match=r"mice_train\.jsonl:2: record has no field 'hypothesis'"):
        get_task("cb").splits(tmp_path)


# -- the bundled SST-2 sample ---------------------------------------------------------------------


def test_bundled_sst2_loads_without_data_dir():
    splits = get_task("sst2").splits(None)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (1000, 500, 872)
    sentences = [{r["sentence"] for r in rows} for rows in (splits.train, splits.validation, splits.test)]
    assert not (sentences[0] & sentences[1] or sentences[0] & sentences[2] or sentences[1] & sentences[2])
    assert {r["label"] for r in splits.train + splits.validation + splits.test} == {0, 1}
    assert "bundled" in splits.note
    small = get_task("sst2").splits(None, train=10, validation=5, seed=3)
    assert (len(small.train), len(small.validation)) == (10, 5) and small.train[0] in splits.train


@needs_data
def test_bundled_sst2_is_what_its_provenance_says():
    bundle = get_task("sst2").splits(None)
    rebuilt = build_sst2_bundle(DATA)
    assert (bundle.train, bundle.validation, bundle.test) == (rebuilt["train"], rebuilt["validation"], rebuilt["test"])


# -- custom tasks ---------------------------------------------------------------------------------


def _write(path, text):
    path.write_text(text)
    return path


@pytest.fixture
def reviews(tmp_path):
    _write(
        tmp_path / "train.jsonl",
        "".join(json.dumps({"text": f"review {i}", "stars": 1 + 4 * (i % 2)}) + "\n" for i in range(12)),
    )
    _write(tmp_path / "test.csv", 'text,stars\n"good, really good",5\nawful,1\n')
    return tmp_path


def _config(**kwargs):
    base = dict(
        template="Review: {text}\nSentiment:",
        train="train.jsonl",
        test="test.csv",
        label_field="stars",
        label_words={"1": " bad", "5": " good"},
    )
    return CustomTaskConfig(**{**base, **kwargs})


def test_custom_classification_from_jsonl_and_csv(reviews):
    task = CustomTask(_config())
    assert (task.kind, task.model_kinds, task.label_words) == ("classification", ("causal",), (" bad", " good"))
    splits = task.splits(reviews, seed=0, validation=4)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (8, 4, 2)
    assert _ids(splits.train).isdisjoint(_ids(splits.validation))
    assert task.splits(reviews, seed=0, validation=4).train == splits.train
    assert task.render(splits.test[0]) == _instance("Review: good, really good\nSentiment:", (" bad", " good"), 1)
    masked = CustomTask(_config(template="{text} It was {mask}."))
    assert masked.model_kinds == ("masked",)
    assert masked.render({"text": "fine", "stars": 1}, "masked").prompt == f"fine It was {MASK}."
    with pytest.raises(TaskError, match="has no template for 'causal' models"):
        masked.render({"text": "fine", "stars": 1}, "causal")


def _instance(prompt, options, label):
    from zotune.tasks import Instance

    return Instance(prompt, options, label)


def test_custom_multiple_choice_and_generation(tmp_path):
    _write(tmp_path / "mc.jsonl", json.dumps({"q": "Sky is", "choices": ["blue", "green"], "answer": 0}) + "\n")
    mc = CustomTask(CustomTaskConfig(template="{q}", train="mc.jsonl", options_field="choices", label_field="answer"))
    record = mc.splits(tmp_path).train[0]
    assert mc.kind == "multiple_choice" and mc.render(record) == _instance("Sky is", (" blue", " green"), 0)
    _write(tmp_path / "qa.csv", "question,answer\nTwo plus two?,four\n")
    qa = CustomTask(CustomTaskConfig(template="Q: {question}\nA:", test="qa.csv", target_field="answer"))
    instance = qa.render(qa.splits(tmp_path).test[0])
    assert (qa.kind, instance.prompt, instance.target, instance.answers) == (
        "generation",
        "Q: Two plus two?\nA:",
        " four",
        ("four",),
    )


@pytest.mark.parametrize(
    "file,text,message",
    [
        (
            "train.jsonl",
            '{"text": "a", "stars": 1}\n{"text": "b" "stars": 5}\n',
            "train.jsonl:2: invalid JSON (Expecting ',' delimiter at column 14)",
        ),
        (
            "train.jsonl",
            '{"text": "a", "stars": 1}\n{"body": "b", "stars": 5}\n',
            "train.jsonl:2: template field 'text' is missing (available: body, stars)",
        ),
        (
            "train.jsonl",
            '{"text": "a", "stars": 3}\n',
            "train.jsonl:1: label 3 in field 'stars' is not a known label (known: '1', '5')",
        ),
        ("test.csv", "text,stars\nfine,5\nmeh,2\n", "test.csv:3: label '2' in field 'stars' is not a known label"),
        ("train.jsonl", '{"text": "a"}\n', "train.jsonl:1: label field 'stars' is missing or empty"),
        ("train.jsonl", "", "train.jsonl: no records (the file is empty)"),
    ],
)
def test_custom_bad_data_names_file_and_line(reviews, file, text, message):
    _write(reviews / file, text)
    with pytest.raises(TaskError) as err:
        CustomTask(_config()).splits(reviews)
    assert message in str(err.value)


def test_custom_missing_file(reviews):
    with pytest.raises(TaskError, match=r"data file not found: .*absent\.jsonl"):
        CustomTask(_config(train="absent.jsonl")).splits(reviews)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(template=""), "custom task needs a template"),
        (dict(template="just text"), "template has no {field} placeholder"),
        (dict(template="{text"), "template is malformed"),
        (dict(template="{} text"), "template placeholder {} is not a field name"),
        (dict(template="{text} {mask} {mask}"), "template has {mask} more than once"),
        (dict(target_field="text"), "needs exactly one of label_words (classification), options_field"),
        (dict(label_words={"1": " bad"}), "label_words must map at least two label values to words"),
        (dict(label_field=None), "label_words needs label_field"),
        (
            dict(label_words=None, target_field="text", template="{text} {mask}"),
            "{mask} is for masked-LM classification",
        ),
        (dict(train=None, test=None), "needs at least one data file"),
        (dict(train="train.txt"), "train file train.txt must end in .jsonl, .csv, .tsv"),
    ],
)
def test_custom_config_is_validated_with_what_to_do(kwargs, message):
    with pytest.raises(TaskError) as err:
        _config(**kwargs)
    assert message in str(err.value)


def test_custom_config_from_dict_suggests_keys():
    with pytest.raises(TaskError, match="unknown custom task key 'templat'; did you mean 'template'?"):
        CustomTaskConfig.from_dict({"templat": "{x}"})
    assert CustomTaskConfig.from_dict({"template": "{x}", "train": "a.jsonl", "target_field": "y"}).kind == "generation"
