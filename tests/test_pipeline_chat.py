"""`hf-distill run` with ``task: causal-lm``: a tiny chat Llama through every stage (cut by measured importance,
distilled on chat rows, exported with a KV cache, timed, reported), skipping, and the config errors of the task."""

import json

import pytest
import yaml
from llm_assets import tiny_chat_llama

from hf_distill.cli import main
from hf_distill.pipeline.config import load_pipeline_config

pytest.importorskip("onnxruntime_genai")
ROWS = [{"question": f"Say {w} twice.", "answer": f"{w} {w}"} for w in ("red", "green", "blue", "gold", "grey", "pink")]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    tiny_chat_llama(root / "teacher", layers=4)
    for name in ("train", "eval"):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    config = {
        "task": "causal-lm",
        "output_dir": str(root / "run"),
        "seed": 3,
        "data": {
            "train": str(root / "train.jsonl"),
            "validation": str(root / "eval.jsonl"),
            "prompt_column": "question",
            "response_column": "answer",
            "max_length": 64,
        },
        "teacher": {"model": str(root / "teacher")},
        "student": {"num_layers": 2, "calibration_size": 4},
        "distill": {"max_steps": 2, "per_device_train_batch_size": 4, "use_cpu": True, "disable_tqdm": True},
        "evaluate": {"num_rows": 3, "max_new_tokens": 4},
        "export": {"variants": ["fp32"], "max_metric_drop": 1000.0, "num_validation": 4},
        "bench": {"seq_lens": [8], "new_tokens": 3, "runs": 1, "include_teacher": False},
    }
    path = root / "chat.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0
    return path, root / "run"


def test_chat_run_goes_through_every_stage_and_reports(chat_run, capsys):
    path, out = chat_run
    for stage in ("teacher", "student", "distill", "export", "bench", "report"):
        assert (out / stage / ".done").is_file(), stage
    assert not (out / "refine").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "causal-lm" and len(report["kept_teacher_layers"]) == 2
    assert report["layer_selection"]["method"] == "greedy"  # "importance", the causal-LM default, is greedy removal
    names = [m["model"] for m in report["models"]]
    assert names == ["teacher", "cut student, untrained", "distilled student"]
    for model in report["models"]:
        assert 0 <= model["rouge_l"] <= 100 and model["teacher_perplexity"] > 1 and model["num_rows"] == 3
        assert model["samples"] and {"prompt", "reference", "response"} <= set(model["samples"][0])
    assert report["models"][0]["samples"][0]["prompt"].startswith("Say ")  # the renamed prompt column
    assert report["train_rows"]["rows"] == len(ROWS) and report["models"][2]["tokens_per_s"] > 0
    export = report["export"][0]
    assert export["variant"] == "fp32" and export["passed"] and export["greedy_agreement"] == 1.0
    speed = report["speed"]
    assert [(r["engine"], r["variant"]) for r in speed] == [("pytorch", "student_fp32"), ("onnxruntime-genai", "fp32")]
    assert all(r["decode_tokens_per_s"]["1"] > 0 and r["ttft_ms"]["8"] > 0 for r in speed)
    text = (out / "REPORT.md").read_text()
    assert "| distilled student | 2 |" in text and "ONNX variants (onnxruntime-genai, KV cache" in text
    assert "Sample answers" in text and f"hf-distill run {path}" in text
    genai = json.loads((out / "export" / "onnx" / "hf_distill_manifest.json").read_text())
    assert genai["kv_cache"] and genai["format"] == "hf_distill-genai/1"
    capsys.readouterr()
    assert main(["run", str(path)]) == 0  # everything finished: only the report is rebuilt
    assert capsys.readouterr().out.count("done already, skipped") == 5


def test_a_failed_gate_with_allow_failed_is_reported_and_not_timed(chat_run, monkeypatch, capsys):
    """Only the export, bench and report stages are redone (--stages ... --force); the failed variant is a FAIL row
    of the report, the bench times PyTorch alone. Without allow_failed the same gate stops the run."""
    from hf_distill.export import genai

    path, out = chat_run
    monkeypatch.setattr(
        genai, "gate", lambda row, *a: {**row, "ppl_increase_pct": 9.9, "passed": False, "reason": "forced"}
    )
    student = (out / "distill" / "student" / "model" / "model.safetensors").stat().st_mtime_ns
    again = ["run", str(path), "--stages", "export,bench,report", "--force"]
    assert main([*again, "--set", "export.allow_failed=true"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [(e["variant"], e["passed"], e["reason"]) for e in report["export"]] == [("fp32", False, "forced")]
    assert [r["engine"] for r in report["speed"]] == ["pytorch"]
    assert "FAIL: forced" in (out / "REPORT.md").read_text()
    assert (out / "distill" / "student" / "model" / "model.safetensors").stat().st_mtime_ns == student
    capsys.readouterr()
    assert main([*again, "--set", "export.allow_failed=false"]) == 2
    assert "failed the accuracy gate" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"teacher": {"finetune": True}}, "'teacher.finetune' is not supported for task 'causal-lm'"),
        ({"refine": {"enabled": True}}, "'refine.enabled' is not supported"),
        ({"export": {"variants": ["int8_dynamic"]}}, "takes \\['fp32', 'int8', 'int4'\\]"),
        ({"export": {"engine": "torch"}}, "'torch' has no KV cache"),
        ({"student": {"layer_selection": "best"}}, "'student.layer_selection' must be one of"),
        ({"evaluate": {"num_rows": 0}}, "'evaluate.num_rows' must be > 0"),
        ({"task": "summarisation"}, "handles the tasks .* got task 'summarisation'"),
    ],
)
def test_chat_config_errors_name_the_key(tmp_path, change, message):
    base = {"task": "causal-lm", "output_dir": str(tmp_path / "run"), **change}
    with pytest.raises(ValueError, match=message):
        load_pipeline_config(None, base=base)
    assert not (tmp_path / "run").exists()


def test_chat_defaults_and_a_classifier_variant_list_for_an_llm(tmp_path):
    config = load_pipeline_config(None, base={"task": "causal-lm", "output_dir": str(tmp_path / "r")})
    assert config.teacher.model == "smollm2" and not config.teacher.finetune
    assert config.export.variants == ["int4"] and config.export.max_metric_drop == 5.0
    assert config.data.train == "instruct/train.jsonl" and config.bench.seq_lens == [128, 512]
    classifier = {"output_dir": str(tmp_path / "c"), "export": {"variants": ["int4", "int8"]}}
    with pytest.raises(ValueError, match="\\['int8'\\] are decoder-LM variants"):
        load_pipeline_config(None, base=classifier)


def test_shipped_chat_job_config_is_valid():
    from conftest import ROOT

    config = load_pipeline_config(ROOT / "recipes" / "configs" / "smollm2_pipeline.yaml")
    assert config.task == "causal-lm" and config.teacher.model == "smollm2" and config.student.num_layers == 10
    assert config.export.variants == ["int4"] and config.distillation_config("x").alpha == 1.0


def test_chat_run_with_missing_columns_fails_before_any_stage(tmp_path, capsys):
    tiny_chat_llama(tmp_path / "teacher", layers=2)
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "no chat here"}) + "\n")
    config = {
        "task": "causal-lm",
        "output_dir": str(tmp_path / "run"),
        "teacher": {"model": str(tmp_path / "teacher")},
        "data": {"train": str(tmp_path / "rows.jsonl"), "validation": str(tmp_path / "rows.jsonl")},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "a chat run needs 'messages'" in err and "data.prompt_column='prompt'" in err
    assert not (tmp_path / "run").exists()


def _tiny_chat_config(tmp_path, **student):
    tiny_chat_llama(tmp_path / "teacher", layers=4)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    config = {
        "task": "causal-lm",
        "output_dir": str(tmp_path / "run"),
        "teacher": {"model": str(tmp_path / "teacher")},
        "data": {"train": str(tmp_path / "rows.jsonl"), "validation": str(tmp_path / "rows.jsonl"),
                 "prompt_column": "question", "response_column": "answer", "max_length": 64},
        "student": {"num_layers": 2, "calibration_size": 4, **student},
        "evaluate": {"num_rows": 2, "max_new_tokens": 2},
    }  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    return str(tmp_path / "c.yaml")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("student.num_layers=9", "student.num_layers=9: the teacher has 4 layers"),
        ("student.layers=[0,9]", r"student.layers=\[0, 9\]: the teacher has 4 layers, so indices run 0..3"),
        ("data.max_length=1", "data.max_length must be >= 2"),
        ("data.prompt_column=nope", "data.prompt_column='nope'"),
        ("teacher.model=CORRUPT", "is not a GGUF file"),
    ],
)
def test_values_known_from_teacher_and_data_fail_before_any_stage(tmp_path, capsys, setting, message):
    path = _tiny_chat_config(tmp_path)
    (tmp_path / "corrupt.gguf").write_bytes(b"GGU" + bytes(64))
    setting = setting.replace("CORRUPT", str(tmp_path / "corrupt.gguf"))
    assert main(["run", path, "--set", setting]) == 2
    err = capsys.readouterr().err
    assert len(__import__("re").findall(message, err)) >= 1, err
    assert not (tmp_path / "run").exists()


def test_explicit_student_layers_cut_without_calibration(tmp_path):
    path = _tiny_chat_config(tmp_path, layers=[0, 3])
    assert main(["run", path, "--stages", "teacher,student"]) == 0
    saved = json.loads((tmp_path / "run" / "student" / "config.json").read_text())
    assert saved["hf_distill_teacher_layers"] == [0, 3]
