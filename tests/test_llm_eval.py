"""evaluate_generation: ROUGE-L of greedy answers, the teacher's perplexity of them, samples; hf-distill evaluate."""

import json
import math

import datasets
import pytest
import torch
from llm_assets import tiny_chat_llama

from hf_distill.cli import main
from hf_distill.llm_eval import evaluate_generation, rouge_l

ROWS = datasets.Dataset.from_dict(
    {
        "prompt": ["the capital of france", "hello world", "a gripping film"],
        "response": ["paris is the capital", "how are you today", "a funny film"],
    }
)


@pytest.fixture(scope="module")
def models():
    student, tokenizer = tiny_chat_llama(seed=0)
    teacher, _ = tiny_chat_llama(seed=1)
    return student, teacher, tokenizer


def test_rouge_l_of_identical_disjoint_and_partial_text():
    assert rouge_l(["The cat sat on the mat."], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert rouge_l(["dogs bark loudly"], ["the cat sat"]) == 0.0
    # LCS "the cat" of 2 words: precision 2/2, recall 2/4, F1 2/3; the mean over two rows is (100 + 66.7) / 2.
    assert rouge_l(["the cat", "a b"], ["the cat sat down", "a b"]) == pytest.approx((200 / 3 + 100) / 2)
    with pytest.raises(ValueError, match="as many predictions as references"):
        rouge_l(["a"], [])


def _ids(encoded):
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _hand_perplexity(teacher, tokenizer, prompts, responses):
    """exp(mean NLL) of the response tokens (through the end-of-turn marker), one conversation at a time."""
    total, count = 0.0, 0
    for prompt, response in zip(prompts, responses, strict=True):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        start = len(_ids(tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True)))
        ids = torch.tensor([_ids(tokenizer.apply_chat_template(messages))])
        with torch.no_grad():
            logp = torch.log_softmax(teacher(input_ids=ids).logits[0].float(), -1)
        for t in range(start, ids.shape[1]):
            total -= float(logp[t - 1, ids[0, t]])
            count += 1
    return math.exp(total / count)


def test_scores_samples_and_teacher_perplexity(models):
    student, teacher, tokenizer = models
    result = evaluate_generation(student, tokenizer, ROWS, teacher, max_new_tokens=5, batch_size=2, num_samples=2)
    assert result.num_rows == 3 and len(result.responses) == 3
    assert result.rouge_l == pytest.approx(rouge_l(result.responses, ROWS["response"]))
    assert [s["prompt"] for s in result.samples] == list(ROWS["prompt"])[:2]
    assert result.samples[0]["response"] == result.responses[0]
    expected = _hand_perplexity(teacher, tokenizer, ROWS["prompt"], result.responses)
    assert result.teacher_perplexity == pytest.approx(expected, rel=1e-4)
    # Its own answers as references: every row that has a word scores 100.
    own = ROWS.remove_columns("response").add_column("response", result.responses)
    again = evaluate_generation(student, tokenizer, own, max_new_tokens=5, batch_size=3)
    assert again.responses == result.responses and again.teacher_perplexity is None
    assert again.rouge_l == pytest.approx(rouge_l(result.responses, result.responses))
    assert json.dumps(again.to_dict())


def test_bad_rows_raise(models):
    student, _, tokenizer = models
    with pytest.raises(ValueError, match="missing: \\['response'\\]"):
        evaluate_generation(student, tokenizer, ROWS.remove_columns("response"))
    with pytest.raises(ValueError, match="empty"):
        evaluate_generation(student, tokenizer, ROWS.select([]))


def test_cli_evaluate_writes_json(tmp_path, capsys):
    folder = tmp_path / "student"
    tiny_chat_llama(folder)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS.to_list()))
    out = tmp_path / "eval.json"
    args = [str(folder), str(data), "--teacher", str(folder), "--limit", "2", "--max-new-tokens", "4"]
    assert main(["evaluate", *args, "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["num_rows"] == 2 and report["teacher_perplexity"] > 1
    assert "ROUGE-L" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--output", "no_such_folder/e.json"], "its folder does not exist"), (["--limit", "0"], "--limit must be >= 1")],
)
def test_cli_evaluate_checks_output_and_limit_before_loading(tmp_path, capsys, extra, message):
    # The model folder does not exist: the argument error must come before any loading.
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS.to_list()))
    extra = [str(tmp_path / x) if x.endswith(".json") else x for x in extra]
    assert main(["evaluate", str(tmp_path / "no_model"), str(data), *extra]) == 2
    assert message in capsys.readouterr().err
