"""The SST-2 recipe end to end at toy scale: real data files, the real MiniLM tokenizer, a tiny teacher."""

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import minilm_tokenizer, save_text_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_distill.data import load_sst2

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))
import text_classification  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_load_sst2_reads_the_bundled_files():
    data = load_sst2(train_size=100)
    assert len(data["train"]) == 100 and len(data["validation"]) == 872
    assert set(data["validation"]["label"]) == {0, 1}
    assert all(isinstance(s, str) and s for s in data["validation"]["sentence"][:50])


def test_load_sst2_errors_on_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="SST-2 not found"):
        load_sst2(str(tmp_path))


def test_recipe_runs_teacher_student_baseline(tmp_path):
    teacher_dir = tmp_path / "tiny_teacher"
    save_text_model(teacher_dir)
    out = tmp_path / "run"
    results = text_classification.main(
        [
            "--teacher",
            str(teacher_dir),
            "--student_layers",
            "1",
            "--train_size",
            "64",
            "--max_length",
            "32",
            "--run_baseline",
            "true",
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "8",
            "--report_to",
            "none",
            "--use_cpu",
            "true",
            "--save_strategy",
            "no",
            "--teacher_epochs",
            "0.1",
        ]
    )
    assert 0 <= results["student_accuracy"] <= 1 and 0 <= results["baseline_accuracy"] <= 1
    assert json.loads((out / "results.json").read_text())["teacher_accuracy"] == results["teacher_accuracy"]
    student = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 1
    assert student.config.id2label == {0: "negative", 1: "positive"}


def test_prompt_refine_recipe_runs_prompt_distillation(tmp_path):
    import prompt_refine

    for name in ("teacher", "student"):
        save_text_model(tmp_path / name)
    results = prompt_refine.main(
        [
            "--teacher",
            str(tmp_path / "teacher"),
            "--student",
            str(tmp_path / "student"),
            "--train_size",
            "32",
            "--teacher_prompt_preset",
            "instructions",
            "--num_virtual_tokens",
            "8",
            "--output_dir",
            str(tmp_path / "run"),
            "--max_steps",
            "2",
            "--alpha",
            "1.0",
            "--report_to",
            "none",
            "--use_cpu",
            "true",
            "--save_strategy",
            "no",
        ]
    )
    assert results["prompt_tokens_saved_per_request"] == results["teacher_prompt_tokens"] - 8 > 50
    assert results["teacher"]["agreement"] == 100.0
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_causal_lm_recipe_trains_teacher_and_students(tmp_path):
    import causal_lm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text((ROOT / "data" / "tinyshakespeare" / "input.txt").read_text()[:120_000])
    results = causal_lm.main(
        [
            "--corpus",
            str(corpus),
            "--output_dir",
            str(tmp_path / "lm"),
            "--vocab_size",
            "400",
            "--block_size",
            "32",
            "--teacher_layers",
            "2",
            "--hidden_size",
            "32",
            "--student_layers",
            "1",
            "--teacher_steps",
            "30",
            "--student_steps",
            "6",
            "--kd_losses",
            "forward_kl,jsd",
            "--eval_blocks",
            "8",
            "--per_device_train_batch_size",
            "8",
            "--use_cpu",
            "true",
            "--disable_tqdm",
            "true",
        ]
    )
    assert results["teacher_perplexity"] < 400  # it learned something over a uniform 400-token guess
    curve = results["teacher_curve"]  # held-out perplexity every teacher_steps // 6 steps
    assert [point["step"] for point in curve] == [5, 10, 15, 20, 25, 30]
    assert curve[-1]["held_out_perplexity"] == pytest.approx(results["teacher_perplexity"], rel=1e-3)
    assert curve[-1]["held_out_perplexity"] < curve[0]["held_out_perplexity"]
    for name in ("no_kd", "forward_kl", "jsd"):
        assert results[f"{name}_perplexity"] > 1 and (tmp_path / "lm" / name / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "lm" / "tokenizer")
    assert tokenizer.decode(tokenizer("ROMEO: good night")["input_ids"]) == "ROMEO: good night"


def test_token_classification_recipe_aligns_subwords_and_distils(tmp_path):
    import token_classification

    # Tagged data built from real SST-2 sentences: each word tagged POS/NEG/O by a tiny sentiment lexicon. The
    # recipe is for the user's CoNLL-style data; this only has to exercise it on real words and a real tokenizer.
    lexicon = {
        "good": "POS",
        "great": "POS",
        "funny": "POS",
        "best": "POS",
        "bad": "NEG",
        "dull": "NEG",
        "worst": "NEG",
        "boring": "NEG",
    }
    sentences = load_sst2(train_size=80)
    for name, split in (("train.jsonl", "train"), ("dev.jsonl", "validation")):
        rows = [
            {"tokens": s.split(), "tags": [lexicon.get(w, "O") for w in s.split()]}
            for s in sentences[split]["sentence"][:80]
        ]
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    from transformers import BertForTokenClassification

    save_text_model(tmp_path / "backbone", BertForTokenClassification, num_labels=3)
    tokenizer = minilm_tokenizer()
    raw, labels = token_classification.load_tagged(
        token_classification.ScriptArguments(
            train_file=str(tmp_path / "train.jsonl"), validation_file=str(tmp_path / "dev.jsonl")
        )
    )
    aligned = token_classification.align(tokenizer, raw, labels, 64)
    first = aligned["train"][0]
    words = raw["train"][0]["tokens"]
    assert sum(label != -100 for label in first["labels"]) == min(len(words), 62)  # one label per word
    results = token_classification.main(
        [
            "--train_file",
            str(tmp_path / "train.jsonl"),
            "--validation_file",
            str(tmp_path / "dev.jsonl"),
            "--teacher",
            str(tmp_path / "backbone"),
            "--student_layers",
            "1",
            "--output_dir",
            str(tmp_path / "run"),
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "8",
            "--report_to",
            "none",
            "--use_cpu",
            "true",
            "--save_strategy",
            "no",
            "--disable_tqdm",
            "true",
        ]
    )
    assert results["labels"] == ["NEG", "O", "POS"] and 0 <= results["student"]["accuracy"] <= 1
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()


def test_recipe_yaml_config_with_overrides_and_unknown_key(tmp_path):
    from hf_distill import DistillationConfig
    from hf_distill.arguments import parse_recipe_args

    config = tmp_path / "c.yaml"
    config.write_text("teacher: minilm\nstudent_layers: 2\noutput_dir: x\nalpha: 0.3\nreport_to: none\n")
    script, args = parse_recipe_args(
        (text_classification.ScriptArguments, DistillationConfig), [str(config), "--alpha", "0.7"]
    )
    assert script.student_layers == 2 and args.alpha == 0.7 and args.output_dir == "x"
    config.write_text("studnt_layers: 2\noutput_dir: x\n")
    with pytest.raises(ValueError, match="studnt_layers"):
        parse_recipe_args((text_classification.ScriptArguments, DistillationConfig), [str(config)])
    import causal_lm
    import prompt_refine
    import token_classification

    for module, name in (
        (text_classification, "sst2_minilm"),
        (causal_lm, "shakespeare_lm"),
        (prompt_refine, "sst2_prompt_distillation"),
        (token_classification, "ner_example"),
    ):
        parsed, _ = parse_recipe_args(
            (module.ScriptArguments, DistillationConfig), [str(ROOT / "recipes" / "configs" / f"{name}.yaml")]
        )
        assert isinstance(parsed, module.ScriptArguments)


def test_chat_recipe_cuts_by_importance_distils_and_evaluates(tmp_path):
    import chat_distill
    from llm_assets import tiny_chat_llama

    tiny_chat_llama(tmp_path / "teacher", layers=4)
    rows = [{"prompt": f"Say {w} twice.", "response": f"{w} {w}"} for w in ("red", "green", "blue", "gold")] * 2
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    results = chat_distill.main(
        ["--teacher", str(tmp_path / "teacher"), "--train_file", str(tmp_path / "train.jsonl")]
        + ["--eval_file", str(tmp_path / "train.jsonl"), "--train_size", "8", "--max_length", "64"]
        + ["--student_layers", "2", "--calibration_size", "4", "--eval_size", "2", "--eval_max_new_tokens", "4"]
        + ["--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--per_device_train_batch_size", "4"]
        + ["--alpha", "1.0", "--use_cpu", "true", "--disable_tqdm", "true", "--report_to", "none"]
    )
    assert len(results["kept_teacher_layers"]) == 2 and results["train"]["tokens_per_s"] > 0
    saved = json.loads((tmp_path / "run" / "student" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 2 and saved["hf_distill_layer_selection"]["method"] != "uniform"
    evaluation = results["evaluation"]
    assert set(evaluation) == {"teacher", "cut_student", "student"}
    assert all(0 <= e["rouge_l"] <= 100 and e["teacher_perplexity"] > 1 for e in evaluation.values())
    assert json.loads((tmp_path / "run" / "results.json").read_text())["evaluation"]["student"]["num_rows"] == 2
    with pytest.raises(ValueError, match="eval_models: unknown \\['cut'\\]"):
        chat_distill.main(
            [
                "--teacher",
                str(tmp_path / "teacher"),
                "--eval_models",
                "student,cut",
                "--output_dir",
                str(tmp_path / "y"),
            ]
        )
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--eval_file", "nope.jsonl"], "Data file 'nope.jsonl' not found"),
        (["--train_file", "nope.jsonl"], "Data file 'nope.jsonl' not found"),
        (["--layer_selection", "best"], "layer_selection must be one of"),
        (["--layers", "0,a"], "--layers '0,a': give comma-separated"),
    ],
)
def test_chat_recipe_checks_its_arguments_before_loading_the_teacher(tmp_path, arguments, message):
    import chat_distill

    # The teacher does not exist: an argument error must come first, before any loading or conversion.
    base = ["--teacher", str(tmp_path / "no_teacher.gguf"), "--output_dir", str(tmp_path / "run")]
    with pytest.raises(ValueError, match=message):
        chat_distill.main(base + arguments)
    assert not (tmp_path / "run").exists()


def test_run_recipe_one_line_errors_and_process_group_teardown(tmp_path):
    """A recipe's ValueError becomes `<prog>: error: ...`; a live process group is destroyed on success and failure."""
    import torch.distributed as dist

    from hf_distill.arguments import run_recipe

    def bad_data() -> None:
        raise ValueError("train_file 'x.jsonl' does not exist")

    for k, main in enumerate((lambda: None, bad_data)):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / f'store{k}'}", rank=0, world_size=1)
        assert dist.is_initialized()
        if main is bad_data:
            with pytest.raises(SystemExit, match=r"^chat_distill.py: error: train_file 'x.jsonl' does not exist$"):
                run_recipe(main, "chat_distill.py")
        else:
            run_recipe(main, "chat_distill.py")
        assert not dist.is_initialized()
    with pytest.raises(KeyError):  # anything else is a bug: its traceback is kept
        run_recipe(lambda: {}["x"], "chat_distill.py")
