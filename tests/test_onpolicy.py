"""On-policy batches (GKD): prompts split from labelled batches, responses sampled from the model."""

import pytest
import torch
from conftest import tiny_llama

from hf_distill.onpolicy import sample_responses, split_prompts


def test_split_prompts_left_pads_the_prompt_part():
    inputs = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 11, 12, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]),
        "labels": torch.tensor([[-100, -100, -100, 8, 9, -100], [-100, -100, 11, 12, -100, -100]]),
    }
    prompts, mask = split_prompts(inputs)
    assert prompts.tolist() == [[5, 6, 7], [0, 5, 6]] and mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    with pytest.raises(ValueError, match="need labels"):
        split_prompts({"input_ids": inputs["input_ids"]})
    with pytest.raises(ValueError, match="starts at position 0"):
        split_prompts({**inputs, "labels": inputs["input_ids"]})


def test_sampled_batch_labels_the_response_through_eos():
    model = tiny_llama(num_layers=1).eval()
    prompts, mask = torch.tensor([[0, 5, 6], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    greedy = {"pad_token_id": 0, "max_new_tokens": 4, "temperature": 1.0, "do_sample": False}
    free = sample_responses(model, prompts, mask, eos_token_id=None, **greedy)["input_ids"][:, 3:]
    eos = int(free[0, 1])  # call row 0's second greedy token EOS: its response must stop there
    out = sample_responses(model, prompts, mask, eos_token_id=eos, **greedy)
    assert out["input_ids"].shape == (2, 7) and torch.equal(out["input_ids"][:, :3], prompts)
    assert (out["labels"][:, :3] == -100).all()
    response, labels = out["input_ids"][:, 3:], out["labels"][:, 3:]
    for row in range(2):
        tokens = response[row].tolist()
        stop = tokens.index(eos) + 1 if eos in tokens else len(tokens)
        assert row == 1 or stop <= 2
        assert labels[row, :stop].tolist() == tokens[:stop] and (labels[row, stop:] == -100).all()
        assert out["attention_mask"][row, 3:].tolist() == [1] * stop + [0] * (4 - stop)
    assert not model.training


def test_sampling_follows_the_seed_and_restores_train_mode():
    model = tiny_llama(num_layers=1).train()
    prompts, mask = torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long)
    kwargs = {"pad_token_id": 0, "eos_token_id": None, "max_new_tokens": 6, "temperature": 2.0}
    torch.manual_seed(1)
    first = sample_responses(model, prompts, mask, **kwargs)["input_ids"]
    torch.manual_seed(1)
    assert torch.equal(sample_responses(model, prompts, mask, **kwargs)["input_ids"], first)
    assert model.training
