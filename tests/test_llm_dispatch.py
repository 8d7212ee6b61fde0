"""Which exporter a model goes through (one rule for export_onnx, the CLI and the pipeline), and the LLM dispatch of
`hf-distill bench` and `hf-distill-edge`: a tiny Qwen2 through the CLI, a LoRA-adapted create_student cut of a tiny
Llama through export_onnx, a tiny GPT-2 falling back to the no-cache graph."""

import copy
import json
import logging
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from conftest import ROOT
from llm_assets import CORPUS, byte_bpe_tokenizer, tiny_chat_llama, tiny_chat_qwen2, train_briefly
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from hf_distill.cli import main
from hf_distill.export import choose_engine, export_onnx
from hf_distill.export.engine import GENAI, TORCH, builder_architectures
from hf_distill.export.genai import genai_greedy, genai_logits
from hf_distill.prompts import make_peft_student, prompt_refine_config
from hf_distill.student import create_student

pytest.importorskip("onnxruntime_genai")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def _greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, top_k=None, top_p=None)
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A tiny Qwen2 exported (fp32) by `hf-distill export` with the default engine."""
    root = tmp_path_factory.mktemp("qwen")
    model, tokenizer = tiny_chat_qwen2()
    train_briefly(model, tokenizer, steps=30)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS * 2))
    argv = ["export", str(root / "model"), str(root / "onnx"), "--data", str(root / "data.jsonl")]
    assert main([*argv, "--text-column", "text", "--variants", "fp32"]) == 0
    return root, model, tokenizer


def test_engine_rule():
    llama, _ = tiny_chat_llama()
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"} <= builder_architectures()
    assert "GPT2LMHeadModel" not in builder_architectures()  # read from the installed builder, not guessed
    cut = create_student(llama, num_layers=1)
    assert choose_engine(cut).engine == GENAI and choose_engine(cut).kv_cache
    lora = make_peft_student(create_student(llama, num_layers=1), prompt_refine_config("causal-lm", method="lora"))
    assert choose_engine(lora).engine == GENAI and choose_engine(lora).architecture == "LlamaForCausalLM"
    prompted = make_peft_student(create_student(llama, num_layers=1), prompt_refine_config("causal-lm", 4))
    choice = choose_engine(prompted)
    assert choice.engine == TORCH and not choice.kv_cache and "prompt-tuned" in choice.reason
    forced = choose_engine(cut, "torch")
    assert forced.engine == TORCH and "engine='torch' requested" in forced.reason
    bert = BertForSequenceClassification(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    assert "not a decoder LM" in choose_engine(bert).reason
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2))
    assert "does not support GPT2LMHeadModel" in choose_engine(gpt2).reason
    with pytest.raises(ValueError, match="cannot export this model: .*does not support GPT2LMHeadModel"):
        choose_engine(gpt2, "genai")
    with pytest.raises(ValueError, match="Unknown export engine 'onnx'"):
        choose_engine(cut, "onnx")


def test_qwen2_exports_with_a_kv_cache_and_generates_what_pytorch_generates(qwen):
    root, model, tokenizer = qwen
    report = json.loads((root / "onnx" / "export_report.json").read_text())
    manifest = json.loads((root / "onnx" / "hf_distill_manifest.json").read_text())
    assert report["engine"] == GENAI and report["kv_cache"] and "Qwen2ForCausalLM" in report["engine_reason"]
    assert manifest["format"] == "hf_distill-genai/1" and list(manifest["variants"]) == ["fp32"]
    prompt = tokenizer("the capital of")["input_ids"]
    assert genai_greedy(root / "onnx" / "fp32", [prompt], 20)[0] == _greedy(model, prompt, 20)


def test_lora_adapted_cut_goes_through_genai_with_the_adapter_merged(tmp_path, caplog):
    llama, tokenizer = tiny_chat_llama()
    cut = create_student(llama, num_layers=1).eval()
    student = make_peft_student(copy.deepcopy(cut), prompt_refine_config("causal-lm", method="lora")).eval()
    torch.manual_seed(1)
    for name, param in student.named_parameters():
        if "lora_B" in name:  # LoRA starts as the identity; make the merge matter
            param.data.normal_(0, 0.05)
    data = datasets.Dataset.from_dict({"text": CORPUS})
    with caplog.at_level(logging.INFO, logger="hf_distill"):
        report = export_onnx(
            student, tmp_path / "onnx", variants=["fp32"], validation_data=data, tokenizer=tokenizer, text_column="text"
        )
    assert any("LlamaForCausalLM: exporting with a KV cache" in r.getMessage() for r in caplog.records)
    assert report["engine"] == GENAI and report["variants"][0]["passed"]
    assert "lora_A" in " ".join(n for n, _ in student.named_parameters())  # the caller's model keeps its adapter
    ids = tokenizer(CORPUS[0])["input_ids"]
    ours = genai_logits(tmp_path / "onnx" / "fp32", [ids])[0]
    with torch.no_grad():
        adapted, base = (m(torch.tensor([ids])).logits[0].numpy() for m in (student, cut))
    assert np.abs(ours - adapted).max() < 1e-4 < 1e-2 < np.abs(ours - base).max()
    with pytest.raises(ValueError, match=r"not decoder-LM variants.*engine='torch'"):
        export_onnx(student, tmp_path / "x", variants=["int8_dynamic"], validation_data=data, tokenizer=tokenizer)


def test_unsupported_decoder_falls_back_without_a_kv_cache_and_says_why(tmp_path, caplog):
    torch.manual_seed(0)
    tokenizer = byte_bpe_tokenizer()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    gpt2.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    data = datasets.Dataset.from_dict({"text": CORPUS})
    with caplog.at_level(logging.INFO, logger="hf_distill"):
        report = export_onnx(
            tmp_path / "gpt2",
            tmp_path / "onnx",
            variants=["fp32"],
            validation_data=data,
            text_column="text",
            max_length=32,
        )
    line = next(r.getMessage() for r in caplog.records if "without a KV cache" in r.getMessage())
    assert "GPT2LMHeadModel" in line and "does not support" in line
    assert report["engine"] == TORCH and report["kv_cache"] is False and "does not support" in report["engine_reason"]
    manifest = json.loads((tmp_path / "onnx" / "hf_distill_manifest.json").read_text())
    assert manifest["format"] == "hf_distill-onnx/1" and manifest["kv_cache"] is False


def test_cli_export_engine_values_are_checked(qwen, capsys):
    root = qwen[0]
    with pytest.raises(SystemExit):
        main(["export", str(root / "model"), str(root / "other"), "--data", str(root / "data.jsonl"), "--engine", "x"])
    assert "invalid choice: 'x'" in capsys.readouterr().err and not (root / "other").exists()


def test_cli_bench_dispatches_llm_exports_to_benchmark_llm(qwen, tmp_path, capsys):
    from hf_distill.export import benchmark

    root = qwen[0]
    argv = ["bench", str(root / "onnx"), "--seq-lens", "8", "--batch-sizes", "1", "--new-tokens", "3", "--runs", "1"]
    assert main([*argv, "--output-dir", str(tmp_path / "b")]) == 0
    rows = json.loads((tmp_path / "b" / "bench.json").read_text())["rows"]
    assert [(r["engine"], r["variant"]) for r in rows] == [("onnxruntime-genai", "fp32")]
    assert set(rows[0]["ttft_ms"]) == {"8"} and rows[0]["decode_tokens_per_s"]["1"] > 0
    with pytest.raises(ValueError, match="decoder-LM export with a KV cache.*benchmark_llm"):
        benchmark(root / "onnx")
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(root / "onnx"), str(broken)], check=True)
    (broken / "fp32" / "model.onnx").write_bytes(b"\0" * 64)
    capsys.readouterr()
    assert main(["bench", str(broken), "--seq-lens", "8", "--runs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Cannot read" in err and "model.onnx" in err and len(err.splitlines()) == 1
    assert main(["bench", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err, err


def _edge(*args, stdin=None):
    code = "import sys; from hf_distill import edge; edge.main(sys.argv[1:]); assert 'torch' not in sys.modules"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=ENV, input=stdin
    )


def test_edge_module_imports_no_torch():
    code = "import sys, hf_distill.edge, hf_distill.edge_genai; print('torch' in sys.modules)"
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert ran.returncode == 0 and ran.stdout.strip() == "False", ran.stderr


def test_edge_hands_llm_exports_to_the_genai_runner(qwen):
    root, model, tokenizer = qwen
    ran = _edge(root / "onnx", "hello", "--max-new-tokens", "8")
    assert ran.returncode == 0, ran.stderr  # also: torch was never imported
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ran.stdout.strip() == tokenizer.decode(_greedy(model, ids, 8), skip_special_tokens=True).strip()
    bare = _edge(root / "onnx" / "fp32", "--generate", "hello", "--max-new-tokens", "8", "--threads", "1")
    assert bare.returncode == 0 and bare.stdout == ran.stdout, bare.stderr  # one variant folder copied alone
    chat = _edge(root / "onnx", "--chat", "--max-new-tokens", "3", "--do-sample", stdin="hello\nthe capital\n")
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr


def test_edge_errors_are_one_line(qwen, tmp_path):
    root = qwen[0]
    classifier = tmp_path / "cls"
    classifier.mkdir()
    manifest = {"format": "hf_distill-onnx/1", "task": "sequence-classification", "variants": {}, "max_length": 8}
    (classifier / "hf_distill_manifest.json").write_text(json.dumps(manifest))
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(root / "onnx"), str(broken)], check=True)
    (broken / "fp32" / "model.onnx").write_bytes(np.zeros(64, dtype=np.uint8).tobytes())
    cases = [
        ((classifier, "--chat"), "--chat needs a decoder-LM export with a KV cache"),
        ((tmp_path / "nowhere", "--chat"), "does not exist"),
        ((broken, "hi"), "cannot load"),
        ((root / "onnx", "--pair", "a", "b"), "--pair and --prompt are for classifiers"),
    ]
    for args, message in cases:
        ran = _edge(*args)
        err = ran.stderr.strip()
        assert ran.returncode != 0 and message in err and len(err.splitlines()) == 1, (args, err)


def test_peak_rss_is_the_engine_process_own():
    """A spawned engine reports its own peak, not the benchmark's (ru_maxrss carries the parent's across exec)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from hf_distill.engine_timing import peak_rss_mb

    ballast = np.ones(1_500_000_000 // 8)  # 1.5 GB in the parent
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        child = pool.submit(peak_rss_mb).result()
    assert 0 < child < peak_rss_mb() - 1000 and ballast[-1] == 1.0


def test_onnx_engine_processes_do_not_carry_torch(qwen, tmp_path):
    """A spawned onnxruntime(-genai) engine imports neither torch nor transformers, so its peak RSS is the runtime's
    and the model's (with them it was 500 MB for a 0.2 MB model)."""
    from hf_distill.export.bench_llm import benchmark_llm

    code = "import sys, hf_distill.engine_timing; print('torch' in sys.modules or 'transformers' in sys.modules)"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert probe.stdout.strip() == "False", probe.stderr
    rows = benchmark_llm(qwen[0] / "onnx", prompt_lens=[8], batch_sizes=[1], new_tokens=3, runs=1, output_dir=tmp_path)[
        "rows"
    ]
    assert rows[0]["engine"] == "onnxruntime-genai" and 0 < rows[0]["peak_rss_mb"] < 250, rows


def test_fallback_decoder_reads_chat_rows_and_survives_a_failing_fusion(tmp_path, caplog, monkeypatch):
    """GPT-2 through torch.onnx with prompt/response rows (rendered by the chat template, as the KV-cache path reads
    them); onnxruntime's gpt2 fusion failing (it did on a dynamo graph) leaves fp32_optimized with generic graph
    optimizations and the error in its settings."""
    import onnxruntime.transformers.optimizer as ort_optimizer

    def broken_fusion(*args, **kwargs):
        raise IndexError("list index out of range")

    monkeypatch.setattr(ort_optimizer, "optimize_model", broken_fusion)
    torch.manual_seed(0)
    tokenizer = byte_bpe_tokenizer()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=128))
    rows = datasets.Dataset.from_list([{"prompt": t[:20], "response": t[20:]} for t in CORPUS])
    with caplog.at_level(logging.WARNING, logger="hf_distill"):
        report = export_onnx(
            gpt2, tmp_path / "onnx", variants=["fp32", "fp32_optimized"], validation_data=rows, tokenizer=tokenizer
        )
    optimized = next(r for r in report["variants"] if r["variant"] == "fp32_optimized")
    assert report["kv_cache"] is False and optimized["passed"], optimized
    assert optimized["settings"]["fusion_error"].startswith("IndexError") and "generic graph" in caplog.text
    assert report["num_validation_examples"] == len(CORPUS)
