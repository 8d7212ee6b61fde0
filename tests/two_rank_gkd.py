"""Run under `accelerate launch --num_processes 2` (gloo on CPU) by test_gkd: two on-policy steps (lmbda 1). Each
rank writes what it generated and its final weights' checksum to argv[1]/rank<k>.json."""

import json
import sys
from pathlib import Path

import torch
from conftest import tiny_llama
from test_gkd import _data

from hf_distill import DistillationConfig, DistillationTrainer, onpolicy
from hf_distill.arguments import end_distributed

if __name__ == "__main__":
    out = Path(sys.argv[1])
    sampled: list[list[list[int]]] = []
    real = onpolicy.sample_responses

    def spy(model, *args, **kwargs):
        result = real(model, *args, **kwargs)
        sampled.append(result["input_ids"].tolist())
        return result

    onpolicy.sample_responses = spy
    args = DistillationConfig(
        output_dir=str(out / "trainer"),
        use_cpu=True,
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        alpha=1.0,
        seed=0,
        lmbda=1.0,
        max_new_tokens=3,
        logging_steps=1,
    )
    torch.manual_seed(0)
    student = tiny_llama(num_layers=1, seed=1)
    trainer = DistillationTrainer(model=student, teacher=tiny_llama(num_layers=2), args=args, train_dataset=_data())
    trainer.train()
    rank = trainer.accelerator.process_index
    checksum = float(sum(p.double().sum() for p in student.parameters()))
    losses = [h["kd_loss"] for h in trainer.state.log_history if "kd_loss" in h]
    record = {"world_size": trainer.args.world_size, "sampled": sampled, "checksum": checksum, "kd_loss": losses}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    end_distributed()  # a clean teardown: a live gloo group can abort the rank at exit
