"""On-policy distillation in the trainer (GKD's lmbda and seq_kd)."""

import pytest
import torch
from conftest import tiny_llama

from hf_distill import DistillationConfig, DistillationTrainer, onpolicy


def _data(n=8, prompt=4, response=4):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 24, (prompt + response,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * prompt + ids[prompt:]})
    return rows


def _train(tmp_path, spy=None, **config):
    args = DistillationConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        alpha=1.0,
        seed=0,
        max_new_tokens=3,
        **config,
    )
    torch.manual_seed(0)
    student = tiny_llama(num_layers=1, seed=1)
    trainer = DistillationTrainer(model=student, teacher=tiny_llama(num_layers=2), args=args, train_dataset=_data())
    trainer.train()
    return student


def test_lmbda_zero_is_the_off_policy_loss(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(onpolicy, "sample_responses", lambda *a, **k: calls.append(1))
    off = _train(tmp_path / "a")
    zero = _train(tmp_path / "b", lmbda=0.0, generation_temperature=2.0)
    assert not calls
    assert all(torch.equal(p, q) for p, q in zip(off.parameters(), zero.parameters(), strict=True))


def test_lmbda_one_always_generates_from_the_student(tmp_path, monkeypatch):
    writers = []
    real = onpolicy.sample_responses

    def spy(model, *args, **kwargs):
        writers.append(model.config.num_hidden_layers)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(onpolicy, "sample_responses", spy)
    on = _train(tmp_path / "on", lmbda=1.0)
    assert writers == [1, 1]  # every batch of both steps, from the 1-layer student
    off = _train(tmp_path / "off")
    assert not all(torch.equal(p, q) for p, q in zip(on.parameters(), off.parameters(), strict=True))
    writers.clear()
    _train(tmp_path / "seq", seq_kd=True)
    assert writers == [2, 2]  # seq_kd: the 2-layer teacher writes the responses


def test_generation_settings_are_checked():
    with pytest.raises(ValueError, match="Set alpha=1.0, as GKD does"):
        DistillationConfig(output_dir="x", lmbda=0.5, alpha=0.5)
    with pytest.raises(ValueError, match="lmbda must be in"):
        DistillationConfig(output_dir="x", lmbda=1.5, alpha=1.0)
    for bad in ("0.5", float("nan"), True):
        with pytest.raises(ValueError, match="lmbda must be a number"):
            DistillationConfig(output_dir="x", lmbda=bad, alpha=1.0)
    with pytest.raises(ValueError, match="seq_kd must be True or False, got 'yes'"):
        DistillationConfig(output_dir="x", seq_kd="yes", alpha=1.0)
    with pytest.raises(ValueError, match="kd_chunk_size must be an integer"):
        DistillationConfig(output_dir="x", kd_chunk_size=True)
    from conftest import tiny_bert

    args = DistillationConfig(output_dir="x", lmbda=0.5, alpha=1.0, report_to="none")
    with pytest.raises(ValueError, match="need a causal-LM student"):
        DistillationTrainer(model=tiny_bert(2), teacher=tiny_bert(2), args=args)


def test_on_policy_under_two_process_accelerate(tmp_path):
    """lmbda 1 under a real 2-rank launch: every rank samples its own responses each step, DDP keeps one student."""
    import json
    import subprocess

    from conftest import ROOT
    from test_scaling import ACCELERATE_2_PROCESSES, _env

    result = subprocess.run(
        [*ACCELERATE_2_PROCESSES, str(ROOT / "tests" / "two_rank_gkd.py"), str(tmp_path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [len(r["sampled"]) for r in ranks] == [2, 2]  # both steps generated on both ranks
    assert ranks[0]["sampled"] != ranks[1]["sampled"]  # each rank its own shard and its own sampling stream
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9)  # gradients were all-reduced
    assert all(torch.isfinite(torch.tensor(r["kd_loss"])).all() and r["kd_loss"] for r in ranks)
