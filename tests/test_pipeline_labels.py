"""Classes come from the data (or data.label_names), not from SST-2: teacher, student, export manifest, report and
model card carry them; labels the data cannot support fail before anything runs."""

import json
import re

import datasets
import pytest
from conftest import minilm_tokenizer, save_text_model, write_sst2_slice
from test_pipeline import write_config

from hf_distill.cli import main
from hf_distill.data import tokenize_text_classification
from hf_distill.labels import LabelSet, agree_with_model, labels_from_data
from hf_distill.pipeline import Pipeline
from hf_distill.pipeline.config import load_pipeline_config
from hf_distill.pipeline.hub import model_card
from hf_distill.pipeline.report import collect
from hf_distill.pipeline.stage_keys import stage_infos
from hf_distill.teacher import finetune_teacher

TOPICS = ["sports", "politics", "science"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    save_text_model(root / "t")
    write_sst2_slice(root, train=24, dev=12)
    return root


def relabel(assets, folder, train_labels, dev_labels):
    """SST-2 sentences with other labels: ``train.tsv`` and ``dev.tsv`` in ``folder``; returns the two paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, labels in (("train.tsv", train_labels), ("dev.tsv", dev_labels)):
        rows = [line.split("\t")[0] for line in (assets / name).read_text().splitlines()[1:]]
        lines = ["sentence\tlabel"] + [f"{s}\t{labels[i % len(labels)]}" for i, s in enumerate(rows)]
        (folder / name).write_text("\n".join(lines) + "\n")
        paths.append(str(folder / name))
    return paths


def tiny_run(assets, tmp_path, labels, **changes):
    train, dev = relabel(assets, tmp_path / "data", labels, labels)
    out = tmp_path / "run"
    changes = {"data.train": train, "data.validation": dev, "student.baseline": False, "distill.max_steps": 2}
    return out, write_config(assets, out, **changes, **{"export.variants": ["fp32"], "export.num_validation": 12})


@pytest.mark.parametrize(
    ("labels", "id2label", "export"),
    [
        ([0, 1, 2], {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, False),
        (TOPICS, {0: "politics", 1: "science", 2: "sports"}, True),  # the export (slow) once
    ],
)
def test_three_classes_reach_teacher_student_manifest_report_and_card(assets, tmp_path, labels, id2label, export):
    out, config_path = tiny_run(assets, tmp_path, labels)
    stages = "teacher,student,distill" + (",export" if export else "") + ",report"
    assert main(["run", str(config_path), "--stages", stages]) == 0
    for folder in ("teacher", "distill/student/model") + (("export/onnx",) if export else ()):
        saved = json.loads((out / folder / "config.json").read_text())
        assert {int(k): v for k, v in saved["id2label"].items()} == id2label, folder
    if export:
        manifest = json.loads((out / "export" / "onnx" / "hf_distill_manifest.json").read_text())
        assert manifest["id2label"] == {str(k): v for k, v in id2label.items()}
    report = json.loads((out / "report.json").read_text())
    assert report["labels"] == list(id2label.values())
    listed = ", ".join(f"{i}: {name}" for i, name in id2label.items())
    assert f"Classes (id: name): {listed}." in (out / "REPORT.md").read_text()
    config = load_pipeline_config(config_path)
    card = model_card(collect(config, "cmd", stage_infos(config, Pipeline(config).workspace)), "me/topics")
    assert f"classes (3: {', '.join(id2label.values())})" in card and listed in card


@pytest.mark.parametrize(
    ("train", "dev", "message"),
    [
        ([0, 1], [0, 1, 2], r"has label\(s\) \[2\] that the training file .* lacks"),
        (TOPICS[:2], TOPICS, r"has label\(s\) \['science'\] that the training file .* lacks"),
    ],
)
def test_validation_label_missing_from_training_fails_before_anything_runs(
    assets, tmp_path, capsys, train, dev, message
):
    paths = relabel(assets, tmp_path / "data", train, dev)
    out = tmp_path / "run"
    config_path = write_config(assets, out, **{"data.train": paths[0], "data.validation": paths[1]})
    assert main(["run", str(config_path)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_a_finished_teacher_must_have_the_data_classes(assets, tmp_path, capsys):
    paths = relabel(assets, tmp_path / "data", TOPICS, TOPICS)
    out = tmp_path / "run"
    base = {"data.train": paths[0], "data.validation": paths[1], "teacher.finetune": False}
    assert main(["run", str(write_config(assets, out, **base))]) == 2  # 2 placeholder classes, the data 3
    assert "has 2 classes ['LABEL_0', 'LABEL_1'], the data 3" in capsys.readouterr().err and not out.exists()
    # A teacher with the data's classes in its own order keeps its ids: 'sports' is its class 0.
    names = {0: "sports", 1: "politics", 2: "science"}
    save_text_model(tmp_path / "t3", num_labels=3, id2label=names, label2id={v: k for k, v in names.items()})
    config = load_pipeline_config(write_config(assets, out, **base, **{"teacher.model": str(tmp_path / "t3")}))
    context = Pipeline(config).context
    assert context.labels().id2label == names
    data, _ = context.tokenized()
    expected = [{"sports": 0, "politics": 1, "science": 2}[v] for v in context.raw_data()["train"]["label"]]
    assert data["train"]["labels"] == expected
    other = {0: "sports", 1: "politics", 2: "weather"}
    save_text_model(tmp_path / "t4", num_labels=3, id2label=other, label2id={v: k for k, v in other.items()})
    assert main(["run", str(write_config(assets, out, **base, **{"teacher.model": str(tmp_path / "t4")}))]) == 2
    assert "has classes" in capsys.readouterr().err and not out.exists()


def test_label_names_name_integer_ids_and_order_string_labels():
    assert labels_from_data([0, 2, 1], [1], ["a", "b", "c"]).id2label == {0: "a", 1: "b", 2: "c"}
    assert labels_from_data([0, 2], [2]).id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}  # ids are kept
    ordered = labels_from_data(["pos", "neg", "pos"], ["neg"], ["pos", "neg"])
    assert ordered.id2label == {0: "pos", 1: "neg"} and ordered.encode(["neg", "pos"]) == [1, 0]
    for train, names, message in [
        ([0, 3], ["a", "b"], "Label id 3 has no name"),
        (["x", "y"], ["x"], r"Label\(s\) \['y'\] .* not in data.label_names"),
        ([0, -1], None, "must be class ids"),
        ([0, "x"], None, "mix integers and strings"),
        ([0, None], None, "must be class ids"),
        ([0, 1], ["a", "a"], "distinct"),
    ]:
        with pytest.raises(ValueError, match=message):
            labels_from_data(train, train[:1] if train[0] is not None else [0], names)
    with pytest.raises(ValueError, match="cannot be matched"):
        agree_with_model(labels_from_data(["x", "y"], ["x"]), {0: "LABEL_0", 1: "LABEL_1"}, "m")
    with pytest.raises(ValueError, match="disagree"):
        agree_with_model(labels_from_data([0, 1], [0], ["a", "b"]), {0: "b", 1: "a"}, "m", names_given=True)
    assert agree_with_model(LabelSet({0: "LABEL_0", 1: "LABEL_1"}, {0: 0, 1: 1}), {0: "n", 1: "p"}, "m").names == [
        "n",
        "p",
    ]


def test_finetune_teacher_takes_the_classes_of_the_data(tmp_path):
    tokenizer = minilm_tokenizer()
    rows = tokenizer(["a fine film", "a dull film", "a film", "the end"] * 2)
    data = datasets.DatasetDict({"train": datasets.Dataset.from_dict({**rows, "labels": [0, 1, 2, 1] * 2})})
    save_text_model(tmp_path / "backbone")
    args = {"epochs": 1.0, "learning_rate": 1e-3, "batch_size": 8, "seed": 0}
    finetune_teacher(str(tmp_path / "backbone"), data, tokenizer, tmp_path / "teacher", **args)
    saved = json.loads((tmp_path / "teacher" / "config.json").read_text())
    assert saved["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    with pytest.raises(ValueError, match="every training label"):
        finetune_teacher(
            str(tmp_path / "backbone"), data, tokenizer, tmp_path / "t2", id2label={0: "a", 1: "b"}, **args
        )


def test_tokenize_text_classification_maps_class_names_to_ids():
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"s": ["a goal", "a vote"], "y": TOPICS[:2]})})
    labels = labels_from_data(raw["train"]["y"], raw["train"]["y"])
    data = tokenize_text_classification(minilm_tokenizer(), raw, "s", "y", 16, labels)
    assert data["train"]["labels"] == [1, 0]  # politics 0, sports 1
    with pytest.raises(ValueError, match="holds class names, not ids"):
        tokenize_text_classification(minilm_tokenizer(), raw, "s", "y", 16)
