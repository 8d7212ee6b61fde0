"""Scaling, measured: a real `accelerate launch` with 2 processes (gloo on CPU) against one process with the same
global batch, and a run killed with SIGKILL mid-distillation that resumes to the same final student."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import ROOT, save_text_model, write_sst2_slice
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scaling") / "teacher"
    save_text_model(
        folder,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    return folder


# A real 2-rank launch on the CPU: `--multi_gpu` with `use_cpu` gives DistributedType.MULTI_CPU over gloo.
ACCELERATE_2_PROCESSES = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run_recipe(tiny_teacher, out, launcher, per_device_batch, use_cpu=True):
    args = [
        "--teacher",
        str(tiny_teacher),
        "--teacher_is_finetuned",
        "true",
        "--student_layers",
        "1",
        "--train_size",
        "64",
        "--max_length",
        "32",
        "--output_dir",
        str(out),
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        str(per_device_batch),
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--seed",
        "3",
        "--learning_rate",
        "0.001",
        "--disable_tqdm",
        "true",
        "--use_cpu",
        str(use_cpu).lower(),
    ]
    return subprocess.run(
        [*launcher, str(ROOT / "recipes" / "text_classification.py"), *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _recipe_losses(tiny_teacher, out, launcher, per_device_batch):
    result = _run_recipe(tiny_teacher, out, launcher, per_device_batch)
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((out / "student_log_history.json").read_text())
    return [(h["step"], h["loss"], h["kd_loss"], h["hard_loss"]) for h in history if "loss" in h]


def test_two_process_accelerate_matches_one_process(tiny_teacher, tmp_path):
    two = _recipe_losses(tiny_teacher, tmp_path / "ddp", ACCELERATE_2_PROCESSES, per_device_batch=4)
    one = _recipe_losses(tiny_teacher, tmp_path / "single", [sys.executable], per_device_batch=8)
    assert [s[0] for s in two] == [s[0] for s in one] == [1, 2, 3, 4]
    for (_, *a), (_, *b) in zip(two, one, strict=True):
        assert a == pytest.approx(b, rel=2e-3, abs=1e-6), (two, one)
    # Training moved the loss: the comparison is not between two constants.
    assert one[0][1] != pytest.approx(one[-1][1], rel=1e-4)


def test_multi_process_launch_without_use_cpu_is_refused(tiny_teacher, tmp_path):
    result = _run_recipe(tiny_teacher, tmp_path / "x", ACCELERATE_2_PROCESSES, 4, use_cpu=False)
    assert result.returncode != 0 and "pass use_cpu=True" in result.stderr


def _pipeline_config(tiny_teacher, out, data_dir, save_steps=2):
    config = {
        "output_dir": str(out),
        "seed": 5,
        "data": {"train": str(data_dir / "train.tsv"), "validation": str(data_dir / "dev.tsv"), "max_length": 32},
        "teacher": {"model": str(tiny_teacher), "finetune": False},
        "student": {"num_layers": 1},
        "distill": {
            # A checkpoint every 2 steps so the kill below lands during a save as often as between saves; 100
            # steps leave 80 after checkpoint-20 for the kill to arrive in.
            "max_steps": 100,
            "save_steps": save_steps,
            "save_total_limit": 3,
            "per_device_train_batch_size": 8,
            "logging_steps": 10,
            "disable_tqdm": True,
            "learning_rate": 0.001,
        },
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_sigkill_mid_distillation_resumes_to_the_same_student(tiny_teacher, tmp_path):
    write_sst2_slice(tmp_path, train=64, dev=16)
    command = [sys.executable, "-m", "hf_distill.cli", "run", "--stages", "teacher,student,distill"]
    reference = tmp_path / "uninterrupted"
    subprocess.run(
        # Checkpoints do not change the weights (no RNG draws): the reference saves none, which halves its time.
        [*command, str(_pipeline_config(tiny_teacher, reference, tmp_path, save_steps=1000))],
        env=_env(),
        check=True,
        capture_output=True,
        timeout=600,
    )

    crashed = tmp_path / "crashed"
    config = _pipeline_config(tiny_teacher, crashed, tmp_path)
    process = subprocess.Popen(
        [*command, str(config)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    checkpoint = crashed / "distill" / "student" / "checkpoints" / "checkpoint-20"
    deadline = time.time() + 300
    while not checkpoint.is_dir() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    final = crashed / "distill" / "student" / "model" / "model.safetensors"
    assert not final.exists() and not (crashed / "distill" / ".done").exists()
    student_init = crashed / "student" / "model.safetensors"
    before = student_init.stat().st_mtime_ns

    resumed = subprocess.run([*command, str(config)], env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming student from" in resumed.stdout and "student: done already, skipped" in resumed.stdout
    assert student_init.stat().st_mtime_ns == before  # finished stages are not redone or overwritten
    expected = load_file(reference / "distill" / "student" / "model" / "model.safetensors")
    got = load_file(final)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)


def _means_by_hand(student, teacher, data, temperature=2.0):
    from torch.nn import functional as F

    from hf_distill.cache import pad_batch

    batch = pad_batch([data[i] for i in range(len(data))])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        s, t = student.eval()(**inputs).logits / temperature, teacher(**inputs).logits / temperature
    kd = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1).mean() * temperature**2
    return float(kd), float(F.cross_entropy(s * temperature, batch["labels"]))


def test_two_ranks_log_exact_means_without_repeated_samples(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from two_rank_run import datasets, models

    result = subprocess.run(
        [*ACCELERATE_2_PROCESSES, str(ROOT / "tests" / "two_rank_run.py"), str(tmp_path / "out.json"), str(tmp_path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logged = json.loads((tmp_path / "out.json").read_text())
    assert logged["world_size"] == 2
    train, evaluation = datasets()
    for split, data in (("train", train), ("eval", evaluation)):
        kd, hard = _means_by_hand(*models(), data)
        prefix = "eval_" if split == "eval" else ""
        assert logged[split][f"{prefix}kd_loss"] == pytest.approx(kd, rel=1e-5), split
        assert logged[split][f"{prefix}hard_loss"] == pytest.approx(hard, rel=1e-5), split
    metrics = logged["eval"]
    assert metrics["eval_loss"] == pytest.approx(0.5 * metrics["eval_kd_loss"] + 0.5 * metrics["eval_hard_loss"])
