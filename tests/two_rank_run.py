"""Run under `accelerate launch --num_processes 2` (gloo on CPU) by test_scaling: one training step with lr 0 and an
evaluation whose last batch Accelerate pads with repeated samples. Rank 0 writes the logged values to argv[1]."""

import json
import sys

from conftest import first_token_rule, tiny_bert
from test_normalisation import _sharpened

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.arguments import end_distributed
from hf_distill.cache import pad_batch


def models():
    return _sharpened(tiny_bert(2, seed=1)), _sharpened(tiny_bert(2, seed=2))


def datasets():
    """6 training examples (3 per rank, ragged lengths) and 5 evaluation examples (2 + 2, then 1 + a repeat)."""
    return first_token_rule(6, 21), first_token_rule(5, 22)


if __name__ == "__main__":
    student, teacher = models()
    train, evaluation = datasets()
    args = DistillationConfig(
        output_dir=sys.argv[2],
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        alpha=0.5,
        learning_rate=0.0,
        max_steps=1,
        logging_steps=1,
        per_device_train_batch_size=3,
        per_device_eval_batch_size=2,
    )
    trainer = DistillationTrainer(
        model=student, teacher=teacher, args=args, train_dataset=train, eval_dataset=evaluation, data_collator=pad_batch
    )
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "kd_loss" in h)
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        with open(sys.argv[1], "w") as f:
            json.dump({"train": logged, "eval": metrics, "world_size": trainer.args.world_size}, f)
    end_distributed()  # a clean teardown: a live gloo group can abort the rank at exit
