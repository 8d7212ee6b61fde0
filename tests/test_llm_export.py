"""Decoder-LM export with a KV cache through onnxruntime-genai's builder: gate, greedy equality, edge runner."""

import json
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from llm_assets import CORPUS, tiny_chat_llama, train_briefly

from hf_distill.export import GateError
from hf_distill.export.genai import genai_greedy, prefix_agreement
from hf_distill.export.llm import MANIFEST, export_llm

pytest.importorskip("onnxruntime_genai")


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    model, tokenizer = tiny_chat_llama()
    train_briefly(model, tokenizer, steps=30)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    data = datasets.Dataset.from_dict({"text": CORPUS * 2})
    report = export_llm(root / "model", root / "onnx", variants=["fp32", "int4"], validation_data=data)
    return root, model, tokenizer, data, report


def test_fp32_export_generates_what_pytorch_generates(llm):
    root, model, tokenizer, _, report = llm
    manifest = json.loads((root / "onnx" / MANIFEST).read_text())
    assert manifest["kv_cache"] and set(manifest["variants"]) == {"fp32", "int4"}
    assert manifest["default_variant"] == "int4"
    prompt = tokenizer("the capital of")["input_ids"]
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt) :]
    ours = genai_greedy(root / "onnx" / "fp32", [prompt], 20)[0]
    assert ours == expected.tolist()
    fp32 = next(r for r in report["variants"] if r["variant"] == "fp32")
    assert fp32["passed"] and fp32["greedy_agreement"] == 1.0 and fp32["greedy_prefix"] == 1.0
    assert abs(fp32["perplexity"] - report["reference"]["value"]) < 1e-3 * report["reference"]["value"]


def test_int4_is_smaller_and_gated(llm):
    _, _, _, _, report = llm
    rows = {r["variant"]: r for r in report["variants"]}
    assert rows["int4"]["passed"] and rows["int4"]["size_bytes"] < 0.6 * rows["fp32"]["size_bytes"]
    assert rows["int4"]["ppl_increase_pct"] <= 5.0 and rows["int4"]["attempts"]


def test_failing_gate_climbs_the_ladder_then_writes_nothing(llm, tmp_path, monkeypatch):
    from hf_distill.export import genai

    root, _, _, data, _ = llm
    # Two rungs show the climb; each rung is a full builder run, so the whole ladder would only repeat it.
    monkeypatch.setattr(genai, "INT4_LADDER", genai.INT4_LADDER[:2])
    with pytest.raises(GateError, match="int4") as caught:
        export_llm(root / "model", tmp_path / "out", variants=["int4"], validation_data=data, max_ppl_increase=-1.0)
    attempts = caught.value.report["variants"][0]["attempts"]
    assert len(attempts) == 2 and not any(a["passed"] for a in attempts)
    reason = caught.value.report["variants"][0]["reason"]
    assert reason.startswith("all 2 rungs failed") and reason.count("perplexity") == 2  # every rung's reason
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_caller_model_and_unsupported_architectures(llm, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, model, tokenizer, data, _ = llm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_llm(model, tmp_path / "mem", variants=["fp32"], validation_data=data, tokenizer=tokenizer)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="does not support GPT2LMHeadModel.*without a KV cache"):
        export_llm(gpt2, tmp_path / "g", validation_data=data, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="Unknown decoder-LM variants"):
        export_llm(model, tmp_path / "v", variants=["int3"], validation_data=data, tokenizer=tokenizer)


def test_prefix_agreement():
    assert prefix_agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == 0.5
    assert prefix_agreement([[1, 2]], [[1, 2, 3, 4]]) == 0.5  # stopped early: the missing half disagrees
    assert prefix_agreement([[5], [1, 2]], [[5], [1, 2]]) == 1.0


def test_edge_runner_streams_the_greedy_answer_without_torch(llm, edge_python):
    from conftest import ROOT

    root, model, tokenizer, _, _ = llm
    runner = str(ROOT / "hf_distill" / "edge_genai.py")
    ran = subprocess.run(
        [edge_python, runner, str(root / "onnx"), "hello", "--variant", "fp32", "--max-new-tokens", "12"],
        capture_output=True,
        text=True,
    )
    assert ran.returncode == 0, ran.stderr
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :]
    assert ran.stdout.strip() == tokenizer.decode(out, skip_special_tokens=True).strip()
    chat = subprocess.run(
        [edge_python, runner, str(root / "onnx"), "--chat", "--max-new-tokens", "4", "--do-sample"],
        input="hello\nthe capital of\n",
        capture_output=True,
        text=True,
    )
    assert chat.returncode == 0 and len(chat.stdout.strip().splitlines()) >= 1, chat.stderr


def test_edge_runner_errors(llm, edge_python, tmp_path):
    from conftest import ROOT

    root = llm[0]
    runner = str(ROOT / "hf_distill" / "edge_genai.py")
    classifier = tmp_path / "cls"
    classifier.mkdir()
    (classifier / MANIFEST).write_text(json.dumps({"format": "hf_distill-onnx/1", "task": "sequence-classification"}))
    wrong = subprocess.run([edge_python, runner, str(classifier), "--chat"], capture_output=True, text=True)
    assert wrong.returncode != 0 and "without a KV cache" in wrong.stderr
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(root / "onnx"), str(broken)], check=True)
    (broken / "fp32" / "model.onnx").write_bytes(np.zeros(64, dtype=np.uint8).tobytes())
    bad = subprocess.run([edge_python, runner, str(broken), "x", "--variant", "fp32"], capture_output=True, text=True)
    assert bad.returncode != 0 and "cannot load" in bad.stderr and "Traceback" not in bad.stderr
    onnx = str(root / "onnx")
    for args, message in (
        (["x", "--do-sample", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["x", "--top-k", "-3"], "--top-k must be >= 0"),
        (["x", "--threads", "-2"], "--threads must be >= 1"),
        (["x", "--chat"], "give a prompt or --chat, not both"),
        (["x " * 400], "this model's context holds 256"),
    ):
        ran = subprocess.run([edge_python, runner, onnx, *args], capture_output=True, text=True)
        err = ran.stderr.strip()
        assert ran.returncode != 0 and message in err and len(err.splitlines()) == 1, (args, err)
    # More new tokens than the context has room for: the answer stops at the context, no traceback.
    long = subprocess.run(
        [edge_python, runner, onnx, "hello", "--variant", "fp32", "--max-new-tokens", "1000"],
        capture_output=True,
        text=True,
    )
    assert long.returncode == 0 and long.stdout.strip(), long.stderr[-500:]
    # A chat longer than the context forgets its oldest turns instead of failing.
    turns = "".join("the capital of france is paris and the capital of italy is rome\n" for _ in range(6))
    chat = subprocess.run(
        [edge_python, runner, onnx, "--chat", "--variant", "fp32", "--max-new-tokens", "40"],
        input=turns,
        capture_output=True,
        text=True,
    )
    assert chat.returncode == 0 and len(chat.stdout.strip().splitlines()) >= 6, chat.stderr[-800:]


def test_benchmark_llm_rows_for_pytorch_and_every_variant(llm, tmp_path):
    from hf_distill.export.bench_llm import benchmark_llm

    root = llm[0]
    result = benchmark_llm(
        root / "onnx",
        student=root / "model",
        prompt_lens=[8, 32],
        batch_sizes=[1, 2],
        new_tokens=4,
        runs=1,
        output_dir=tmp_path,
    )
    assert [(r["engine"], r["variant"]) for r in result["rows"]] == [
        ("pytorch", "student_fp32"),
        ("onnxruntime-genai", "fp32"),
        ("onnxruntime-genai", "int4"),
    ]
    for row in result["rows"]:
        assert set(row["ttft_ms"]) == {"8", "32"} and all(v > 0 for v in row["ttft_ms"].values())
        assert set(row["decode_tokens_per_s"]) == {"1", "2"} and row["peak_rss_mb"] > 0 and row["size_mb"] > 0
    assert {"bench.json", "bench.md", "bench.png"} <= {p.name for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="not a decoder-LM export"):
        benchmark_llm(tmp_path)


def test_sigterm_mid_export_cleans_up_like_ctrl_c(llm, tmp_path):
    """`kill PID` during the builder run: the child builder is stopped, the staging folder removed, one line said."""
    import os
    import signal
    import time

    from conftest import ROOT

    root, _, _, _, _ = llm
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "the capital of france is paris"}) + "\n")
    command = [sys.executable, "-m", "hf_distill.cli", "export", str(root / "model"), str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [*command, "--data", str(tmp_path / "rows.jsonl"), "--variants", "fp32"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out*/.hf_source")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the export ended before it could be stopped"
    os.kill(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "interrupted" in err.strip().splitlines()[-1], err[-2000:]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    builders = subprocess.run(["pgrep", "-f", f"models.builder.*{tmp_path}"], capture_output=True, text=True)
    assert builders.stdout.strip() == "", builders.stdout


def test_reports_are_strict_json_folders_are_not_private_and_bad_int4_options_fail_first(llm, tmp_path):
    import os
    import stat

    root, model, tokenizer, data, _ = llm

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    json.loads((root / "onnx" / "export_report.json").read_text(), parse_constant=refuse)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((root / "onnx").stat().st_mode) == 0o777 & ~umask  # as mkdir would make it, not 0700
    for options in ({"block_size": -1}, {"block_size": 48}, {"accuracy_level": 9}):
        with pytest.raises(ValueError, match="block_size \\(--block-size\\) must be one of"):
            export_llm(model, tmp_path / "x", validation_data=data, tokenizer=tokenizer, **options)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))
