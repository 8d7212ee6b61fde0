"""`hf-distill run`: every stage on tiny models with real SST-2 rows and the real MiniLM tokenizer; skipping,
config errors, and the Hub push with only the Hub's servers stubbed."""

import json

import pytest
import yaml
from conftest import save_text_model, write_sst2_slice

from hf_distill.cli import main
from hf_distill.pipeline import Pipeline
from hf_distill.pipeline.config import load_pipeline_config
from hf_distill.pipeline.stage_keys import STAGE_NAMES


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    save_text_model(root / "t")
    write_sst2_slice(root)
    return root


def write_config(assets, out, **changes):
    config = {
        "output_dir": str(out),
        "seed": 1,
        "data": {"train": str(assets / "train.tsv"), "validation": str(assets / "dev.tsv"), "max_length": 32},
        "teacher": {"model": str(assets / "t"), "epochs": 0.25, "batch_size": 16},
        "student": {"num_layers": 1, "baseline": True},
        "distill": {
            "max_steps": 4,
            "save_steps": 2,
            "per_device_train_batch_size": 8,
            "use_cpu": True,
            "logging_steps": 2,
            "disable_tqdm": True,
        },
        "export": {"variants": ["fp32", "int8_dynamic"], "max_metric_drop": 100.0, "num_validation": 32},
        "bench": {"batch_sizes": [1], "seq_lens": [8], "runs": 3, "warmup": 1},
    }
    for key, value in changes.items():
        section, _, field = key.partition(".")
        config.setdefault(section, {})[field] = value
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def finished_run(assets, tmp_path_factory):
    """One run of every stage, shared by the tests that read a finished run (why: a full run is the slowest test)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    config_path = write_config(assets, out)
    assert main(["run", str(config_path)]) == 0
    return config_path, out


def test_run_all_stages_then_skip_them(finished_run, capsys):
    config_path, out = finished_run
    for stage in ("teacher", "student", "distill", "export", "bench", "report"):
        assert (out / stage / ".done").is_file(), stage
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"]["layers"] == 2 and report["student"]["teacher_layers_copied"] == [1]
    assert report["baseline_accuracy"] is not None and "kd_gain_points" in report
    assert {e["variant"] for e in report["export"]} == {"fp32", "int8_dynamic"}
    assert report["export_engine"]["engine"] == "torch.onnx" and not report["export_engine"]["kv_cache"]
    assert "not a decoder LM" in report["export_engine"]["engine_reason"]
    assert {x["variant"] for x in report["latency"]} == {"teacher_fp32", "student_fp32", "fp32", "int8_dynamic"}
    text = (out / "REPORT.md").read_text()
    assert "| teacher" in text and "ONNX variants" in text and f"hf-distill run {config_path}" in text
    assert "Exporter: torch.onnx, no KV cache" in text
    assert (out / "bench.png").is_file()
    model_file = out / "distill" / "student" / "model" / "model.safetensors"
    before = model_file.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["run", str(config_path)]) == 0  # everything done: nothing is redone
    printed = capsys.readouterr().out
    # Every finished stage is skipped; only the (cheap) report is rebuilt.
    assert printed.count("done already, skipped") == 5 and model_file.stat().st_mtime_ns == before


def test_push_builds_card_and_folder_and_never_shows_the_token(finished_run, monkeypatch, capsys):
    config_path, out = finished_run
    calls = []

    class FakeApi:  # the Hub's servers are the one thing that cannot run here
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create_repo", repo_id, private))

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload", repo_id, sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_123")
    assert main(["push", str(config_path), "--set", "push.repo_id=me/tiny-student"]) == 0
    upload = out / "push" / "upload"
    assert ("create_repo", "me/tiny-student", True) in calls and calls[0] == ("init", "hf_secret_token_123")
    uploaded = next(c for c in calls if c[0] == "upload")[2]
    assert {"model.safetensors", "config.json", "README.md", "onnx", "edge_runner.py", "edge_genai.py"} <= set(uploaded)
    assert (upload / "onnx" / "model_int8.onnx").is_file() and (upload / "onnx" / "hf_distill_manifest.json").is_file()
    card = (upload / "README.md").read_text()
    for needle in (
        "me/tiny-student",
        "teacher",
        "KD settings",
        "ONNX variants",
        "Latency",
        "edge_runner.py",
        "Reproduce",
        "hf-distill push",
    ):
        assert needle in card, needle
    everything = capsys.readouterr().out + "".join(p.read_text(errors="ignore") for p in out.rglob("*.json"))
    assert "hf_secret_token_123" not in everything + card


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"teacher.lr": 1}, "Unknown config key 'teacher.lr'"),
        ({"student.num_layers": "three"}, "Config key 'student.num_layers' must be int or null, got 'three'"),
        ({"distill.temprature": 2}, "Unknown config key 'distill.temprature'"),
        ({"distill.alpha": 2.0}, r"Config section 'distill': alpha must be in \[0, 1\]"),
        ({"data.train": "missing.tsv"}, "Data file 'missing.tsv' does not exist"),
        ({"data.text_column": "text"}, "Column 'text' is not in"),
        ({"teacher.model": "./no/such/teacher"}, "Teacher path './no/such/teacher' does not exist"),
    ],
)
def test_bad_config_fails_before_anything_runs(assets, tmp_path, capsys, change, message):
    out = tmp_path / "run"
    assert main(["run", str(write_config(assets, out, **change))]) == 2
    assert message.replace("\\", "") in capsys.readouterr().err.replace("\\", "") or pytest.fail(message)
    assert not out.exists()


def test_set_overrides_and_unknown_top_level_key(assets, tmp_path):
    path = write_config(assets, tmp_path / "run")
    config = load_pipeline_config(path, ["distill.temperature=3", "export.variants=[fp32]", "student.layers=[0]"])
    assert config.distill["temperature"] == 3 and config.export.variants == ["fp32"] and config.student.layers == [0]
    with pytest.raises(ValueError, match=r"Unknown config key\(s\) \['epochs'\]"):
        load_pipeline_config(path, ["epochs=3"])
    with pytest.raises(ValueError, match="--set expects key=value"):
        load_pipeline_config(path, ["distill.temperature"])


def test_foreign_or_changed_output_dir_is_refused(assets, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["run", str(write_config(assets, out)), "--stages", "teacher"]) == 2
    assert "not empty and holds no hf-distill run" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    other = tmp_path / "other"
    assert main(["run", str(write_config(assets, other)), "--stages", "teacher"]) == 0
    changed = write_config(assets, other, **{"student.num_layers": 2})
    assert main(["run", str(changed), "--stages", "teacher"]) == 2
    assert "different config (sections ['student'] differ)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unknown stage"):
        Pipeline(load_pipeline_config(changed), force=True).run(("teach",))
    assert set(STAGE_NAMES) >= {"teacher", "push"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("export.variants=[int9]", "Config key 'export.variants' must be a non-empty list from ["),
        ("export.variants=[]", "Config key 'export.variants' must be a non-empty list from ["),
        ("export.engine=onnx", "Config key 'export.engine' must be one of ['auto', 'genai', 'torch']"),
        ("export.engine=genai", "export.engine 'genai' (onnxruntime-genai, KV cache) exports decoder LMs"),
        ("refine.method=prompt_tunning", "Config key 'refine.method' must be one of ['lora', 'p_tuning'"),
        ("refine.num_virtual_tokens=0", "Config key 'refine.num_virtual_tokens' must be > 0, got 0"),
        ("bench.batch_sizes=[1,0]", "Config key 'bench.batch_sizes' must be a non-empty list of integers > 0"),
        ("bench.seq_lens=[-8]", "Config key 'bench.seq_lens' must be a non-empty list of integers > 0"),
        ("bench.runs=0", "Config key 'bench.runs' must be > 0, got 0"),
        ("data.max_length=0", "Config key 'data.max_length' must be > 0, got 0"),
        ("teacher.learning_rate=-0.0001", "Config key 'teacher.learning_rate' must be > 0"),
        ("student.layers=[a]", "Config key 'student.layers' must be null or a non-empty list of teacher layer"),
        ("data.validation=nowhere/dev.tsv", "Data file 'nowhere/dev.tsv' does not exist (config data.validation)"),
        ("distill.alpha=high", "Config key 'distill.alpha' must be float, got 'high' (str)"),
        ("distill.per_device_train_batch_size=2.5", "Config key 'distill.per_device_train_batch_size' must be int"),
        ("distill.use_cpu=maybe", "Config key 'distill.use_cpu' must be bool, got 'maybe'"),
        ("student.hidden_size=0", "Config key 'student.hidden_size' must be > 0, got 0"),
        ("data.unlabelled=nowhere/more.tsv", "Data file 'nowhere/more.tsv' does not exist (config data.unlabelled)"),
        ("data.unlabelled=rest", "data.unlabelled is 'rest' (the training rows train_size leaves out) but"),
    ],
)
def test_wrong_values_are_reported_by_key_before_any_stage(assets, tmp_path, capsys, override, message):
    out = tmp_path / "run"
    assert main(["run", str(write_config(assets, out)), "--set", override]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    assert not out.exists()  # nothing ran: the teacher was not fine-tuned


def test_enum_and_scheduler_fields_take_strings(assets, tmp_path):
    path = write_config(assets, tmp_path / "run")
    config = load_pipeline_config(path, ["distill.lr_scheduler_type=cosine", "distill.save_strategy=no"])
    assert config.distill["lr_scheduler_type"] == "cosine"


def test_yaml_exponent_floats_are_floats(assets, tmp_path):
    # PyYAML reads 1e-4 (no dot) as the string '1e-4'; float keys take it as the number users meant.
    config = load_pipeline_config(
        write_config(assets, tmp_path / "run"), ["teacher.learning_rate=1e-4", "distill.learning_rate=5e-5"]
    )
    assert config.teacher.learning_rate == 1e-4 and config.distill["learning_rate"] == 5e-5


def test_narrow_student_learns_from_the_rows_train_size_leaves_out(assets, tmp_path):
    """student.hidden_size prunes width on training rows; data.unlabelled=rest adds the other rows, soft loss only."""
    out = tmp_path / "run"
    changes = {"data.train_size": 40, "data.unlabelled": "rest", "student.hidden_size": 16}
    changes |= {"student.num_attention_heads": 2, "student.baseline": True, "student.calibration_size": 16}
    assert main(["distill", str(write_config(assets, out, **changes))]) == 0
    student = json.loads((out / "distill" / "student" / "model" / "config.json").read_text())
    assert (student["hidden_size"], student["num_attention_heads"], student["num_hidden_layers"]) == (16, 2, 1)
    done = json.loads((out / "distill" / ".done").read_text())
    # 64 training rows: 40 labelled, the other 24 unlabelled; the labels-only baseline sees the 40 alone.
    assert (done["student"]["train_rows"], done["student"]["unlabelled_rows"]) == (64, 24)
    assert (done["baseline"]["train_rows"], done["baseline"]["unlabelled_rows"]) == (40, 0)
