"""ONNX export: every variant loads in onnxruntime and matches PyTorch; gates; report; bad inputs; atomic writes."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import first_token_rule, lm_dataset, minilm_tokenizer, save_text_model, tiny_bert, tiny_llama
from transformers import BertConfig, BertForTokenClassification

from hf_distill.data import load_sst2
from hf_distill.export.onnx import MANIFEST, REPORT, export_onnx
from hf_distill.export.validate import GateError

REPORT_FIELDS = {"file", "size_bytes", "max_abs_diff", "metric", "metric_value", "metric_drop", "passed", "exporter"}
ROOT = Path(__file__).resolve().parent.parent


def _session_logits(path, feed):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(["logits"], {k: v for k, v in feed.items() if k in names})[0]


@pytest.mark.parametrize("exporter", ["auto", "dynamo"])
def test_all_classification_variants_match_pytorch(tmp_path, monkeypatch, exporter):
    """auto (what users get) exports a BERT with TorchScript, whose attention onnxruntime fuses; dynamo is pinned."""
    monkeypatch.setenv("HF_DISTILL_ONNX_EXPORTER", exporter)
    model = tiny_bert(2, seed=3).eval()
    data = first_token_rule(40, 1)
    out = tmp_path / "onnx"
    report = export_onnx(
        model,
        out,
        variants=["fp32", "fp32_optimized", "int8_dynamic", "int8_static", "fp16"],
        validation_data=data,
        max_metric_drop=100.0,
        batch_size=16,
    )
    assert {r["variant"] for r in report["variants"]} == {
        "fp32",
        "fp32_optimized",
        "int8_dynamic",
        "int8_static",
        "fp16",
    }
    saved = json.loads((out / REPORT).read_text())
    assert saved == json.loads(json.dumps(report))
    ids = np.array([[5, 9, 13, 20, 4, 7]], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
    tolerance = {"fp32": 1e-4, "fp32_optimized": 1e-4, "fp16": 1e-2, "int8_dynamic": 0.2, "int8_static": 0.3}
    for row in report["variants"]:
        assert REPORT_FIELDS <= set(row), row
        assert row["exporter"] == ("torchscript" if exporter == "auto" else "dynamo")
        assert row["size_bytes"] == os.path.getsize(out / row["file"])
        np.testing.assert_allclose(_session_logits(out / row["file"], feed), expected, atol=tolerance[row["variant"]])
    fp32 = next(r for r in report["variants"] if r["variant"] == "fp32")
    assert fp32["max_abs_diff"] < 1e-4 and fp32["metric_drop"] == pytest.approx(0.0)
    int8 = next(r for r in report["variants"] if r["variant"] == "int8_dynamic")
    assert int8["size_bytes"] < 0.8 * fp32["size_bytes"]  # tiny model: graph overhead dominates
    int8_ops = {n.op_type for n in onnx.load(str(out / int8["file"])).graph.node}
    assert int8["settings"]["fused_operators"]["SkipLayerNormalization"] == 4  # quantized after onnxruntime's fusions
    if exporter == "auto":  # TorchScript's attention graph: one fused Attention per layer, quantized as QAttention
        assert int8["settings"]["fused_operators"]["Attention"] == 2 and "QAttention" in int8_ops
    assert not list(out.glob(".*"))  # the fused intermediate graph is not left in the folder
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert manifest["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"}
    assert (out / "config.json").is_file()


def test_exporter_choice_fallback_and_bad_value(tmp_path, monkeypatch, caplog):
    from transformers import LlamaConfig

    from hf_distill.export import graph

    def broken(*args, **kwargs):
        raise RuntimeError("this exporter cannot trace this")

    assert graph.exporter_order("auto", LlamaConfig()) == ("dynamo", "torchscript")
    assert graph.exporter_order("auto", BertConfig()) == ("torchscript", "dynamo")  # its attention fuses
    assert graph.exporter_order("dynamo", BertConfig()) == ("dynamo",)
    model, data = tiny_bert(1, seed=4).eval(), first_token_rule(16, 2)
    monkeypatch.setenv("HF_DISTILL_ONNX_EXPORTER", "auto")
    for failing, used, message in (
        ("_export_torchscript", "dynamo", "TorchScript ONNX export failed"),
        ("_export_dynamo", "torchscript", None),  # the BERT's first choice works: dynamo never runs
    ):
        caplog.clear()
        with monkeypatch.context() as patched:
            patched.setattr(graph, failing, broken)
            out = tmp_path / f"auto_{used}"
            report = export_onnx(model, out, variants=["fp32"], validation_data=data, max_metric_drop=100.0)
        assert report["variants"][0]["exporter"] == used and report["variants"][0]["max_abs_diff"] < 1e-4
        if message:
            assert f"{message} (RuntimeError" in caplog.text and "falling back to the Dynamo exporter" in caplog.text
        else:
            assert "export failed" not in caplog.text
    monkeypatch.setattr(graph, "_export_dynamo", broken)
    monkeypatch.setenv("HF_DISTILL_ONNX_EXPORTER", "dynamo")  # no fallback: the dynamo error itself
    with pytest.raises(RuntimeError, match="cannot trace"):
        export_onnx(model, tmp_path / "dyn", variants=["fp32"], validation_data=data)
    assert not (tmp_path / "dyn").exists()
    monkeypatch.setenv("HF_DISTILL_ONNX_EXPORTER", "onnxscript")
    with pytest.raises(ValueError, match="HF_DISTILL_ONNX_EXPORTER='onnxscript' is not an exporter"):
        export_onnx(tmp_path / "no-model-needed", tmp_path / "bad", validation_data=data)


def test_gate_failure_is_an_error_and_writes_nothing(tmp_path):
    data = first_token_rule(32, 2)
    out = tmp_path / "onnx"
    with pytest.raises(GateError, match=r"(?s)lost more than max_metric_drop=-1.0.*Nothing was written"):
        export_onnx(tiny_bert(2), out, variants=["fp32"], validation_data=data, max_metric_drop=-1.0)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx")]  # no staging folder left behind
    report = export_onnx(
        tiny_bert(2), out, variants=["fp32"], validation_data=data, max_metric_drop=-1.0, fail_on_gate=False
    )
    assert (
        report["variants"][0]["passed"] is False and "fp32" not in json.loads((out / MANIFEST).read_text())["variants"]
    )


def test_int8_ladder_climbs_until_a_rung_passes(tmp_path):
    data = first_token_rule(32, 2)
    report = export_onnx(
        tiny_bert(2, seed=4),
        tmp_path / "a",
        variants=["int8_dynamic"],
        validation_data=data,
        max_metric_drop=-50.0,
        fail_on_gate=False,
    )  # impossible gate: every rung is tried
    rungs = [a["settings"]["rung"] for a in report["variants"][0]["attempts"]]
    assert rungs == ["default", "per_channel", "per_channel_reduce_range", "static_qdq", "exclude_sensitive"]
    assert report["variants"][0]["attempts"][-1]["settings"]["excluded_nodes"]
    easy = export_onnx(
        tiny_bert(2, seed=4), tmp_path / "b", variants=["int8_dynamic"], validation_data=data, max_metric_drop=100.0
    )
    assert [a["settings"]["rung"] for a in easy["variants"][0]["attempts"]] == ["default"]


def test_causal_lm_perplexity_and_int4(tmp_path):
    model = tiny_llama(2, hidden=64, seed=1)
    data = lm_dataset(16, 1)
    report = export_onnx(  # the no-cache torch.onnx graph (engine auto would build KV-cache variants)
        model,
        tmp_path / "lm",
        variants=["fp32", "int8_dynamic", "int4"],
        validation_data=data,
        max_metric_drop=1000.0,
        engine="torch",
    )
    assert report["engine"] == "torch.onnx" and report["kv_cache"] is False
    rows = {r["variant"]: r for r in report["variants"]}
    assert rows["fp32"]["metric"] == "perplexity" and rows["fp32"]["max_abs_diff"] < 1e-3
    assert rows["fp32"]["metric_value"] == pytest.approx(report["reference"]["value"], rel=1e-4)
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "lm" / rows["int4"]["file"])).graph.node}
    assert "MatMulNBits" in ops


def test_token_classification_export(tmp_path):
    config = BertConfig(
        vocab_size=24, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, num_labels=3
    )
    model = BertForTokenClassification(config)
    data = first_token_rule(16, 3).map(lambda ex: {"labels": [-100] + [t % 3 for t in ex["input_ids"][1:]]})
    report = export_onnx(model, tmp_path / "tok", variants=["fp32"], validation_data=data, max_metric_drop=100.0)
    assert report["task"] == "token-classification" and report["variants"][0]["max_abs_diff"] < 1e-4


def test_lora_student_is_merged_before_export(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_bert(2, seed=5)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False, task_type="SEQ_CLS")
    )
    ids = torch.tensor([[5, 9, 13, 20]])
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=ids).logits.numpy()
    export_onnx(
        peft_model, tmp_path / "lora", variants=["fp32"], validation_data=first_token_rule(16, 0), max_metric_drop=100.0
    )
    feed = {
        "input_ids": ids.numpy(),
        "attention_mask": np.ones((1, 4), np.int64),
        "token_type_ids": np.zeros((1, 4), np.int64),
    }
    np.testing.assert_allclose(_session_logits(tmp_path / "lora" / "model.onnx", feed), expected, atol=1e-4)


def test_bad_inputs(tmp_path):
    data = first_token_rule(8, 0)
    with pytest.raises(ValueError, match="No saved model in .*config.json missing"):
        export_onnx(tmp_path / "missing", tmp_path / "o", validation_data=data)
    with pytest.raises(ValueError, match="Unknown variants \\['int3'\\]"):
        export_onnx(tiny_bert(1), tmp_path / "o", variants=["int3"], validation_data=data)
    with pytest.raises(ValueError, match="needs a text column 'sentence'"):
        export_onnx(tiny_bert(1), tmp_path / "o", validation_data=data.remove_columns("input_ids"))
    with pytest.raises(ValueError, match="no labels"):
        export_onnx(tiny_bert(1), tmp_path / "o", validation_data=data.remove_columns("labels"))
    with pytest.raises(ValueError, match="pass validation_data="):
        export_onnx(tiny_bert(1), tmp_path / "o")
    with pytest.raises(ValueError, match="int4 weight-only .* decoder LMs"):
        export_onnx(tiny_bert(1), tmp_path / "o", variants=["int4"], validation_data=data)
    from transformers import BertModel

    BertModel(
        BertConfig(vocab_size=24, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    ).save_pretrained(tmp_path / "backbone")
    with pytest.raises(ValueError, match="Cannot export BertModel"):
        export_onnx(tmp_path / "backbone", tmp_path / "o", validation_data=data)
    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="exists and is not empty"):
        export_onnx(tiny_bert(1), existing, validation_data=data)
    assert (existing / "keep.txt").read_text() == "user data"
    assert not (tmp_path / "o").exists()


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    import hf_distill.export.onnx as module

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "build_variant", boom)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(tiny_bert(1), tmp_path / "onnx", variants=["int8_dynamic"], validation_data=first_token_rule(8, 0))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def text_export(tmp_path_factory):
    """A tiny classifier with the real MiniLM tokenizer, exported with raw SST-2 dev sentences."""
    folder = tmp_path_factory.mktemp("text")
    tokenizer = minilm_tokenizer()
    labels = {"id2label": {0: "negative", 1: "positive"}, "label2id": {"negative": 0, "positive": 1}}
    model = save_text_model(folder / "student", **labels).eval()
    dev = load_sst2()["validation"]
    export_onnx(
        folder / "student",
        folder / "onnx",
        variants=["fp32", "int8_dynamic"],
        validation_data=dev,
        num_validation=64,
        max_metric_drop=100.0,
    )
    return model, tokenizer, folder / "onnx"


def test_edge_runner_matches_pytorch_without_torch(text_export, edge_python):
    model, tokenizer, folder = text_export
    texts = ["a gripping , funny and moving film", "the plot is a mess and the acting is worse", "ok"]
    result = subprocess.run(
        [edge_python, str(ROOT / "hf_distill" / "edge.py"), str(folder), "--variant", "fp32", *texts],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    with torch.no_grad():
        probs = torch.softmax(model(**tokenizer(texts, padding=True, return_tensors="pt")).logits, -1).numpy()
    assert [r["label_id"] for r in rows] == probs.argmax(-1).tolist()
    assert [r["label"] for r in rows] == [model.config.id2label[i] for i in probs.argmax(-1).tolist()]
    np.testing.assert_allclose([r["probabilities"] for r in rows], probs, atol=1e-5)


def test_edge_runner_rejects_corrupted_model(text_export, edge_python, tmp_path):
    import shutil

    _, _, folder = text_export
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "model_int8.onnx").write_bytes(b"not an onnx file")
    result = subprocess.run(
        [edge_python, str(ROOT / "hf_distill" / "edge.py"), str(broken), "x"], capture_output=True, text=True
    )
    assert result.returncode != 0 and "truncated or corrupted" in result.stderr


@pytest.mark.parametrize("name", ["hf_distill_manifest.json", "tokenizer.json"])
def test_edge_runner_rejects_corrupted_folder_files(text_export, edge_python, tmp_path, name):
    import shutil

    _, _, folder = text_export
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / name).write_text("{not json")
    result = subprocess.run(
        [edge_python, str(ROOT / "hf_distill" / "edge.py"), str(broken), "x"], capture_output=True, text=True
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and name in result.stderr and len(result.stderr.splitlines()) == 1
