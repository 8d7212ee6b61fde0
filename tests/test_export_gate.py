"""The accuracy gate: non-finite outputs fail, regression heads get a regression metric, the reference is the
trained (unmerged) student and the caller's model is left alone, p-tuned prompts export from inference mode."""

import json
import subprocess

import datasets
import numpy as np
import pytest
import torch
from conftest import ROOT, first_token_rule, lm_dataset, minilm_tokenizer, save_text_model, tiny_bert
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

import hf_distill.export.validate as validate
from hf_distill.cli import main
from hf_distill.data import load_sst2
from hf_distill.export import GateError, export_onnx, variant_table
from hf_distill.export.onnx import MANIFEST
from hf_distill.prompts import load_prompt, make_peft_student, prompt_refine_config
from hf_distill.tasks import Task


def _session_logits(path, feed):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(["logits"], {k: v for k, v in feed.items() if k in names})[0]


def _feed(ids):
    ids = np.asarray(ids, dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def test_nan_outputs_fail_the_gate(tmp_path, monkeypatch):
    model = tiny_bert(2, seed=3).eval()
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([5.0, -5.0]))  # every prediction is class 0 ...
    data = first_token_rule(32, 1).map(lambda _: {"labels": 0})  # ... and so is every label
    real_run = validate.run_onnx

    def nan_rows(path, batches, providers=None):
        outputs = real_run(path, batches, providers)
        if str(path).endswith("model_fp16.onnx"):
            outputs[0][[1, 4]] = np.nan  # NaN would argmax to class 0 and count as correct
        return outputs

    monkeypatch.setattr(validate, "run_onnx", nan_rows)
    with pytest.raises(GateError, match=r"(?s)fp16.*non-finite outputs \(NaN/inf\) in 2 of 32 rows"):
        export_onnx(model, tmp_path / "a", variants=["fp32", "fp16"], validation_data=data, max_metric_drop=1.0)
    report = export_onnx(
        model, tmp_path / "b", variants=["fp32", "fp16"], validation_data=data, max_metric_drop=1.0, fail_on_gate=False
    )
    rows = {r["variant"]: r for r in report["variants"]}
    assert rows["fp32"]["passed"] and rows["fp32"]["reason"] is None
    assert rows["fp16"]["passed"] is False and rows["fp16"]["non_finite_rows"] == 2
    assert "non-finite outputs" in rows["fp16"]["reason"] and rows["fp16"]["metric_value"] == pytest.approx(
        100 * 30 / 32
    )
    assert json.loads((tmp_path / "b" / "export_report.json").read_text())  # strict JSON: no NaN literal
    assert "non-finite" in variant_table(report["variants"], report["reference"]["metric"])


def test_failing_rows_name_their_reason(tmp_path):
    report = export_onnx(
        tiny_bert(2),
        tmp_path / "o",
        variants=["fp32"],
        validation_data=first_token_rule(16, 0),
        max_metric_drop=-1.0,
        fail_on_gate=False,
    )
    assert report["variants"][0]["reason"] == "accuracy drop 0.00 > max_metric_drop -1.00"


def test_non_finite_reference_is_refused_before_export(tmp_path):
    model = tiny_bert(2)
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[7] = float("nan")
    data = datasets.Dataset.from_dict({"input_ids": [[5, 7, 9], [5, 6, 9]], "labels": [0, 1]})
    with pytest.raises(ValueError, match="PyTorch model itself gives non-finite logits on 1 of 2 rows"):
        export_onnx(model, tmp_path / "o", variants=["fp32"], validation_data=data)
    assert not (tmp_path / "o").exists()


def test_regression_head_is_gated_with_r2(tmp_path, edge_python):
    tokenizer = minilm_tokenizer()
    model = save_text_model(tmp_path / "student", num_labels=1, seed=2).eval()
    dev = load_sst2()["validation"].select(range(40))
    with torch.no_grad():
        predictions = model(**tokenizer(list(dev["sentence"]), padding=True, return_tensors="pt")).logits[:, 0].numpy()
    targets = predictions + np.random.default_rng(0).normal(0, 0.05, len(dev))  # float targets in (-1, 1)
    data = dev.remove_columns("label").add_column("label", targets.astype(np.float32).tolist())
    report = export_onnx(
        tmp_path / "student",
        tmp_path / "onnx",
        variants=["fp32", "int8_dynamic"],
        validation_data=data,
        max_metric_drop=100.0,
    )
    mse = float(np.mean((predictions - targets) ** 2))
    assert report["reference"]["metric"] == "r2"
    assert report["reference"]["value"] == pytest.approx(100 * (1 - mse / np.var(targets)), abs=1e-2)
    rows = {r["variant"]: r for r in report["variants"]}
    assert rows["fp32"]["mse"] == pytest.approx(mse, rel=1e-3) and abs(rows["fp32"]["metric_drop"]) < 1e-3
    assert json.loads((tmp_path / "onnx" / MANIFEST).read_text())["problem_type"] == "regression"
    out = subprocess.run(
        [
            edge_python,
            str(ROOT / "hf_distill" / "edge.py"),
            str(tmp_path / "onnx"),
            "--variant",
            "fp32",
            *list(dev["sentence"])[:2],
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert [json.loads(line)["value"] for line in out.splitlines()] == pytest.approx(predictions[:2], abs=1e-4)


def test_constant_regression_labels_are_refused(tmp_path):
    data = first_token_rule(8, 0).remove_columns("labels").add_column("labels", [0.5] * 8)
    with pytest.raises(ValueError, match="regression labels are all equal"):
        export_onnx(tiny_bert(1, num_labels=1), tmp_path / "o", validation_data=data)


def _tied_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=24,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def test_lora_on_tied_embeddings_exports_the_trained_student(tmp_path):
    lora = LoraConfig(
        r=4, target_modules=["lm_head", "embed_tokens", "q_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    student = get_peft_model(_tied_llama(), lora).eval()
    ids = torch.tensor(lm_dataset(4, 3)["input_ids"])
    with torch.no_grad():
        expected = student(input_ids=ids).logits.numpy()
    report = export_onnx(  # the torch.onnx graph: model.onnx is read below
        student,
        tmp_path / "onnx",
        variants=["fp32"],
        validation_data=lm_dataset(8, 0),
        max_metric_drop=0.01,
        engine="torch",
    )
    assert report["variants"][0]["max_abs_diff"] < 1e-4
    np.testing.assert_allclose(_session_logits(tmp_path / "onnx" / "model.onnx", _feed(ids)), expected, atol=1e-4)
    # The caller's student keeps its adapter and its outputs.
    assert isinstance(student, PeftModel) and any("lora_A" in n for n, _ in student.named_parameters())
    with torch.no_grad():
        np.testing.assert_allclose(student(input_ids=ids).logits.numpy(), expected, atol=1e-6)


def test_export_leaves_the_callers_model_alone(tmp_path):
    base = tiny_bert(2, seed=5)
    student = get_peft_model(
        base, LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False, task_type="SEQ_CLS")
    )
    student.train()
    before = {n: p.detach().clone() for n, p in student.state_dict().items()}
    export_onnx(
        student, tmp_path / "onnx", variants=["fp32"], validation_data=first_token_rule(16, 0), max_metric_drop=100.0
    )
    assert student.training and set(student.state_dict()) == set(before)
    assert all(torch.equal(p, before[n]) for n, p in student.state_dict().items())
    student.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_bert(2, seed=5), tmp_path / "adapter").eval()
    ids = torch.tensor([[5, 9, 13, 20]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, student.eval()(input_ids=ids).logits)


def test_unfaithful_merge_is_refused(tmp_path, monkeypatch):
    from hf_distill.export import plan as module

    real = module.merge_adapter

    def broken(model, in_place=False):
        merged = real(model, in_place)
        with torch.no_grad():
            merged.classifier.weight.add_(1.0)
        return merged

    monkeypatch.setattr(module, "merge_adapter", broken)
    student = get_peft_model(tiny_bert(2, seed=5), LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="Merging the adapter changes the logits"):
        export_onnx(student, tmp_path / "onnx", variants=["fp32"], validation_data=first_token_rule(8, 0))
    assert not (tmp_path / "onnx").exists()


@pytest.fixture
def p_tuned(tmp_path):
    """A p-tuned tiny BERT (MLP prompt encoder, training mode), its saved adapter folder and pretokenized data."""
    tiny_bert(2, seed=6).save_pretrained(tmp_path / "base")
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    student = make_peft_student(base, prompt_refine_config(Task.SEQUENCE_CLASSIFICATION, 4, method="p_tuning"))
    student.save_pretrained(tmp_path / "adapter")
    first_token_rule(16, 0).save_to_disk(str(tmp_path / "data"))
    return student.eval(), tmp_path


def test_p_tuned_adapter_folder_exports(p_tuned):
    student, folder = p_tuned
    args = ["--variants", "fp32", "--max-metric-drop", "0"]
    assert main(["export", str(folder / "adapter"), str(folder / "onnx"), "--data", str(folder / "data"), *args]) == 0
    ids = [[5, 9, 13, 20, 4]]
    with torch.no_grad():
        expected = student(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(_session_logits(folder / "onnx" / "model.onnx", _feed(ids)), expected, atol=1e-4)


def test_loaded_p_tuned_prompt_exports_as_input(p_tuned):
    student, folder = p_tuned
    fresh = make_peft_student(
        AutoModelForSequenceClassification.from_pretrained(folder / "base"),
        prompt_refine_config(Task.SEQUENCE_CLASSIFICATION, 4, method="p_tuning"),
    )
    load_prompt(fresh, folder / "adapter", "task")
    report = export_onnx(
        fresh,
        folder / "onnx",
        variants=["fp32"],
        validation_data=datasets.load_from_disk(str(folder / "data")),
        prompt_mode="input",
        max_metric_drop=0.0,
    )
    assert report["variants"][0]["max_abs_diff"] < 1e-4
    stored = np.load(folder / "onnx" / "prompts" / "task.npy")
    np.testing.assert_allclose(stored, student.get_prompt_embedding_to_save("default").numpy(), atol=1e-6)
