"""What the exported graph is fed: the exported tokenizer's rule, usable positions, segment ids and text pairs,
the position a decoder classifier is read at. PyTorch (tokenizer, padding=True) is the reference everywhere."""

import json
import subprocess

import datasets
import numpy as np
import pytest
import torch
from conftest import ROOT, save_text_model, tiny_bert
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from hf_distill.cli import main
from hf_distill.data import load_sst2, minilm_path
from hf_distill.export import benchmark, export_onnx
from hf_distill.export.onnx import MANIFEST
from hf_distill.prompts import make_peft_student, prompt_refine_config
from hf_distill.tasks import Task

TEXTS = ["a gripping , funny and moving film", "dull"]
LABELS = {"id2label": {0: "negative", 1: "positive"}, "label2id": {"negative": 0, "positive": 1}}


def pristine_tokenizer():
    """The MiniLM tokenizer as the package ships it (tokenizer.json pads to a fixed 128 tokens)."""
    return AutoTokenizer.from_pretrained(minilm_path())


def edge(python, folder, *args, stdin=None):
    result = subprocess.run(
        [python, str(ROOT / "hf_distill" / "edge.py"), str(folder), *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=True,
    )
    return [json.loads(line) for line in result.stdout.splitlines()], result.stderr


def torch_probs(model, encoded):
    with torch.no_grad():
        return torch.softmax(model.eval()(**encoded).logits, -1).numpy()


def test_edge_runner_tokenises_like_training_with_pretokenized_data(tmp_path, edge_python):
    tokenizer = pristine_tokenizer()
    model = text_student(tmp_path / "student", tokenizer, initializer_range=1.0)  # large weights: pads would show
    dev = load_sst2()["validation"].select(range(24))
    encoded = tokenizer(list(dev["sentence"]), truncation=True, max_length=64)
    datasets.Dataset.from_dict(
        {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": list(dev["label"])}
    ).save_to_disk(str(tmp_path / "dev"))
    args = ["--variants", "fp32", "--max-metric-drop", "100"]
    assert (
        main(["export", str(tmp_path / "student"), str(tmp_path / "onnx"), "--data", str(tmp_path / "dev"), *args]) == 0
    )
    rows, _ = edge(edge_python, tmp_path / "onnx", *TEXTS)
    expected = torch_probs(model, tokenizer(TEXTS, padding=True, return_tensors="pt"))
    np.testing.assert_allclose([r["probabilities"] for r in rows], expected, atol=1e-4)
    manifest = json.loads((tmp_path / "onnx" / MANIFEST).read_text())
    saved = json.loads((tmp_path / "onnx" / "tokenizer.json").read_text())
    assert saved["padding"]["strategy"] == "BatchLongest" and saved["padding"]["direction"] == "Right"
    assert saved["truncation"]["max_length"] == manifest["max_length"] == 128
    assert manifest["tokenization"]["padding"] == "longest" and manifest["tokenization"]["max_length"] == 128


def text_student(folder, tokenizer, model_class=None, **config):
    """A tiny BERT over the MiniLM vocabulary, saved with the pristine tokenizer."""
    kwargs = {"model_class": model_class} if model_class else {}
    model = save_text_model(folder, seed=1, **LABELS, **kwargs, **config)
    tokenizer.save_pretrained(folder)  # overwrite: the shared test tokenizer may have been called already
    return model.eval()


def test_roberta_usable_positions_everywhere(tmp_path, edge_python):
    tokenizer = pristine_tokenizer()
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=34,
        initializer_range=1.0,  # large weights: a dropped closing token shows in the probabilities
        **LABELS,
    )
    model = RobertaForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "roberta")
    tokenizer.save_pretrained(tmp_path / "roberta")
    long_text = " ".join(["good"] * 45)
    data = datasets.Dataset.from_dict(
        {"input_ids": [list(range(1000, 1040))] * 4, "labels": [0, 1, 0, 1]}  # 40 tokens each
    )
    export_onnx(tmp_path / "roberta", tmp_path / "onnx", variants=["fp32"], validation_data=data, max_metric_drop=100)
    rows, stderr = edge(edge_python, tmp_path / "onnx", long_text, "short")
    assert "longer than this export's 32" in stderr
    expected = torch_probs(
        model, tokenizer([long_text, "short"], padding=True, truncation=True, max_length=32, return_tensors="pt")
    )
    np.testing.assert_allclose([r["probabilities"] for r in rows], expected, atol=1e-4)
    manifest = json.loads((tmp_path / "onnx" / MANIFEST).read_text())
    assert manifest["max_length"] == manifest["max_positions"] == 32  # 34 rows, positions start at padding_idx + 1
    with pytest.raises(ValueError, match="Sequence length 33 exceeds .* 32 usable positions"):
        benchmark(tmp_path / "onnx", seq_lens=[33], batch_sizes=[1], runs=1, warmup=0)
    prompted = make_peft_student(model, prompt_refine_config(Task.SEQUENCE_CLASSIFICATION, 4, init="random"))
    export_onnx(
        prompted, tmp_path / "p", variants=["fp32"], validation_data=data, tokenizer=tokenizer, max_metric_drop=100
    )
    assert json.loads((tmp_path / "p" / MANIFEST).read_text())["max_positions"] == 28


def test_bench_reads_gpt2_positions(tmp_path):
    config = GPT2Config(vocab_size=24, n_embd=32, n_layer=1, n_head=4, n_positions=16, pad_token_id=0)
    torch.manual_seed(0)
    data = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7, 8], [9, 10, 11]], "labels": [0, 1]})
    export_onnx(
        GPT2ForSequenceClassification(config),
        tmp_path / "onnx",
        variants=["fp32"],
        validation_data=data,
        max_metric_drop=100,
    )
    with pytest.raises(ValueError, match="Sequence length 20 exceeds .* 16 usable positions"):
        benchmark(tmp_path / "onnx", seq_lens=[20], batch_sizes=[1], runs=1, warmup=0)


def _pair_rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids, types = [], []
    for _ in range(n):
        first, second = (int(x) for x in torch.randint(2, 5, (2,), generator=g))
        tokens = torch.randint(3, 24, (first + second,), generator=g).tolist()
        ids.append([1, *tokens[:first], 2, *tokens[first:], 2])
        types.append([0] * (first + 2) + [1] * (second + 1))
    return ids, types


def test_gate_keeps_segment_ids_of_pretokenized_pairs(tmp_path):
    model = tiny_bert(2, seed=7, initializer_range=1.0).eval()  # large weights: the label depends on the segments
    ids, types = _pair_rows(48, 0)

    def predict(segments):
        with torch.no_grad():
            return [
                int(model(input_ids=torch.tensor([i]), token_type_ids=torch.tensor([s])).logits.argmax())
                for i, s in zip(ids, segments, strict=True)
            ]

    labels = predict(types)
    assert labels != predict([[0] * len(t) for t in types])  # zeroed segments would change predictions
    data = datasets.Dataset.from_dict({"input_ids": ids, "token_type_ids": types, "labels": labels})
    report = export_onnx(model, tmp_path / "onnx", variants=["fp32"], validation_data=data, max_metric_drop=0.0)
    assert report["reference"]["value"] == 100.0 and report["variants"][0]["metric_value"] == 100.0


def test_text_pairs_raw_text_cli_and_edge_runner(tmp_path, edge_python):
    tokenizer = pristine_tokenizer()
    model = text_student(tmp_path / "student", tokenizer, initializer_range=1.0)
    sentences = list(load_sst2()["validation"]["sentence"])[:33]
    first, second = sentences[:-1], sentences[1:]
    labels = torch_probs(model, tokenizer(first, second, padding=True, return_tensors="pt")).argmax(-1).tolist()
    lines = ["sentence1\tsentence2\tlabel"] + [f"{a}\t{b}\t{y}" for a, b, y in zip(first, second, labels, strict=True)]
    (tmp_path / "pairs.tsv").write_text("\n".join(lines) + "\n")
    args = ["--variants", "fp32", "--max-metric-drop", "0"]
    assert (
        main(
            ["export", str(tmp_path / "student"), str(tmp_path / "onnx"), "--data", str(tmp_path / "pairs.tsv"), *args]
        )
        == 0
    )
    report = json.loads((tmp_path / "onnx" / "export_report.json").read_text())
    assert report["reference"]["value"] == 100.0 and report["text_columns"] == ["sentence1", "sentence2"]
    datasets.Dataset.from_dict({"question": first, "answer": second, "label": labels}).to_json(tmp_path / "qa.jsonl")
    explicit = ["--text-column", "question", "--text-pair-column", "answer", "--force"]
    assert (
        main(
            [
                "export",
                str(tmp_path / "student"),
                str(tmp_path / "onnx"),
                "--data",
                str(tmp_path / "qa.jsonl"),
                *args,
                *explicit,
            ]
        )
        == 0
    )
    expected = torch_probs(model, tokenizer(first[:3], second[:3], padding=True, return_tensors="pt"))
    alone = torch_probs(model, tokenizer(first[:3], padding=True, return_tensors="pt"))
    assert np.abs(expected - alone).max() > 1e-2  # the second text matters
    pair_args = [arg for a, b in zip(first[:3], second[:3], strict=True) for arg in ("--pair", a, b)]
    rows, _ = edge(edge_python, tmp_path / "onnx", *pair_args)
    assert [r["text_pair"] for r in rows] == second[:3]
    np.testing.assert_allclose([r["probabilities"] for r in rows], expected, atol=1e-4)
    stdin = "".join(f"{a}\t{b}\n" for a, b in zip(first[:3], second[:3], strict=True))
    rows, _ = edge(edge_python, tmp_path / "onnx", stdin=stdin)
    np.testing.assert_allclose([r["probabilities"] for r in rows], expected, atol=1e-4)


def _decoder_classifier(arch, vocab):
    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128, pad_token_id=0, **LABELS)
        return GPT2ForSequenceClassification(config)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
        **LABELS,
    )
    return LlamaForSequenceClassification(config)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompted_decoder_classifier_reads_last_attended_position(tmp_path, edge_python, arch):
    tokenizer = pristine_tokenizer()
    student = make_peft_student(
        _decoder_classifier(arch, tokenizer.vocab_size),
        prompt_refine_config(Task.SEQUENCE_CLASSIFICATION, 3, init="random"),
    ).eval()
    with torch.no_grad():
        student.prompt_encoder["default"].embedding.weight.normal_(0, 1)
    dev = load_sst2()["validation"].select(range(24))
    report = export_onnx(
        student, tmp_path / "onnx", variants=["fp32"], validation_data=dev, tokenizer=tokenizer, max_metric_drop=0.0
    )
    assert report["variants"][0]["max_abs_diff"] < 1e-4

    def encode(texts, **kwargs):  # GPT-2 would embed the BERT tokenizer's token_type_ids as tokens
        return tokenizer(texts, return_token_type_ids=arch != "gpt2", **kwargs)

    with torch.no_grad():
        alone = np.concatenate([student(**encode([t], return_tensors="pt")).logits.numpy() for t in TEXTS])
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = encode(TEXTS, padding=True, return_tensors="np")
    feed = {i.name: batch[i.name].astype(np.int64) for i in session.get_inputs()}
    np.testing.assert_allclose(session.run(["logits"], feed)[0], alone, atol=1e-4)
    rows, _ = edge(edge_python, tmp_path / "onnx", *TEXTS)
    probs = np.exp(alone - alone.max(-1, keepdims=True))
    np.testing.assert_allclose([r["probabilities"] for r in rows], probs / probs.sum(-1, keepdims=True), atol=1e-4)
