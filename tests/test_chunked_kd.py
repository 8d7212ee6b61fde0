"""The chunked KD loss equals the unchunked one; online top-k equals the cache; DistillationConfig checks."""

import pytest
import torch
from conftest import distill_args, lm_dataset, tiny_llama

from hf_distill import DistillationTrainer, cache_teacher_logits
from hf_distill.cache import pad_batch
from hf_distill.chunked_kd import HardRows, chunked_distillation_loss
from hf_distill.losses import KD_LOSSES, distillation_loss
from hf_distill.teacher_logits import TeacherLogits, topk_summary

PARAMS = {"jsd": {"jsd_beta": 0.3}, "skew_kl": {"skew_lambda": 0.2}, "skew_reverse_kl": {"skew_lambda": 0.2}}


def _logits(seed, shape=(3, 7, 11)):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(*shape, generator=g)


def _mask():
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, :3] = False  # a prompt
    mask[2, 4:] = False  # padding
    return mask.reshape(-1)


def _reference(student, teacher, mask, loss, **options):
    values = distillation_loss(student, teacher, loss=loss, reduction="none", **options)
    return torch.where(mask, values, torch.zeros_like(values))


@pytest.mark.parametrize("loss", sorted(KD_LOSSES))
@pytest.mark.parametrize("chunk", [1, 4, 64])  # 4 does not divide the 16 loss positions
def test_chunked_equals_unchunked_values_and_gradients(loss, chunk):
    student = _logits(0).reshape(-1, 11).requires_grad_(True)
    teacher = _logits(1).reshape(-1, 11)
    teacher[5, 2] = float("-inf")  # a masked class: 0·log 0 stays exact chunk by chunk
    teacher[1] = float("nan")  # garbage at an ignored position must not leak
    mask = _mask()
    options = dict(temperature=2.0, **PARAMS.get(loss, {}))
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(2))  # any upstream gradient

    expected = _reference(student, teacher, mask, loss, **options)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), student)
    got = chunked_distillation_loss(student, teacher, mask, loss=loss, chunk_size=chunk, **options)
    (got_grad,) = torch.autograd.grad((got * weights).sum(), student)

    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # reverse_kl is +inf where the teacher has probability 0: its gradient there is NaN either way.
    torch.testing.assert_close(got_grad[mask], expected_grad[mask], atol=1e-5, rtol=1e-5, equal_nan=True)
    # Ignored positions get gradient 0 exactly; the unchunked loss lets the NaN garbage of row 1 into its gradient.
    assert bool((got_grad[~mask] == 0).all()) and torch.isfinite(got_grad[~mask]).all()


def test_chunked_compares_the_first_classes_and_reads_a_bf16_teacher_per_chunk():
    student = _logits(3, (12, 14)).requires_grad_(True)
    teacher = _logits(4, (12, 16)).bfloat16()  # a padded, wider vocabulary in the teacher's own dtype
    mask = torch.arange(12) % 5 != 0
    expected = _reference(student[:, :11], teacher[:, :11].float(), mask, "forward_kl")
    (expected_grad,) = torch.autograd.grad(expected.sum(), student)
    view = TeacherLogits.dense(teacher)
    assert view.logits.dtype == torch.bfloat16  # no fp32 copy of the whole teacher
    got = chunked_distillation_loss(student, view, mask, chunk_size=5, num_classes=11)
    (got_grad,) = torch.autograd.grad(got.sum(), student)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad, expected_grad, atol=1e-5, rtol=1e-5)
    assert bool((got_grad[:, 11:] == 0).all())


def test_teacher_view_follows_indexing_and_reshaping_like_a_tensor():
    logits = _logits(5)
    view = TeacherLogits.dense(logits)[:, :-1].reshape(-1, 99)  # the class size named does not matter
    assert view.shape == (18, 11)
    torch.testing.assert_close(view.to_dense(), logits[:, :-1].reshape(-1, 11))


def test_multi_label_chunked_equals_unchunked():
    student, teacher = _logits(6, (10, 4)).requires_grad_(True), _logits(7, (10, 4))
    mask = torch.ones(10, dtype=torch.bool)
    expected = _reference(student, teacher, mask, "forward_kl", multi_label=True)
    got = chunked_distillation_loss(student, teacher, mask, chunk_size=3, multi_label=True)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        torch.autograd.grad(got.sum(), student)[0], torch.autograd.grad(expected.sum(), student)[0]
    )


def test_topk_summary_keeps_top_probabilities():
    logits = _logits(8)
    values, indices, rest = topk_summary(logits, 3, 2.0)
    probs = torch.softmax(logits / 2.0, -1)
    torch.testing.assert_close(values, logits.topk(3, -1).values)
    torch.testing.assert_close(rest, 1 - probs.gather(-1, indices).sum(-1))
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 11\]"):
        topk_summary(logits, 12, 2.0)


cfg = distill_args


def _padded_lm_batch(n=5):
    data = lm_dataset(8, 1).map(
        lambda ex, i: {k: ex[k][: 6 + i % 5] for k in ("input_ids", "attention_mask", "labels")}, with_indices=True
    )
    data = data.map(lambda ex: {"labels": [-100] * 2 + ex["labels"][2:]})  # an unlabelled prompt
    return data, pad_batch([data[i] for i in range(n)])


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("kd_loss", ["forward_kl", "jsd"])
def test_trainer_loss_and_gradients_do_not_depend_on_the_chunk_size(out_dir, kd_loss):
    teacher = tiny_llama(2, seed=1)
    data, batch = _padded_lm_batch()
    results = []
    for chunk in (0, 3, 1000):
        trainer = DistillationTrainer(
            model=tiny_llama(2, seed=2),
            teacher=teacher,
            args=cfg(out_dir, kd_chunk_size=chunk, kd_loss=kd_loss),
            train_dataset=data,
            data_collator=pad_batch,
        )
        results.append(_loss_and_grads(trainer, batch))
    (loss0, grads0), *others = results
    for loss, grads in others:
        torch.testing.assert_close(loss, loss0, atol=1e-6, rtol=1e-5)
        for name in grads0:
            torch.testing.assert_close(grads[name], grads0[name], atol=1e-6, rtol=1e-5)


def test_online_top_k_equals_the_cached_top_k(out_dir):
    teacher = tiny_llama(2, seed=1)
    data, _ = _padded_lm_batch()
    cached = cache_teacher_logits(teacher, data, top_k=5, temperature=2.0)
    online = DistillationTrainer(
        model=tiny_llama(2, seed=2),
        teacher=teacher,
        args=cfg(out_dir, teacher_top_k=5, kd_chunk_size=4),
        train_dataset=data,
        data_collator=pad_batch,
    )
    offline = DistillationTrainer(
        model=tiny_llama(2, seed=2), args=cfg(out_dir, kd_chunk_size=4), train_dataset=cached, data_collator=pad_batch
    )
    rows = [dict(cached[i]) for i in range(5)]
    loss_off, grads_off = _loss_and_grads(offline, offline.data_collator(rows))
    loss_on, grads_on = _loss_and_grads(online, pad_batch([data[i] for i in range(5)]))
    torch.testing.assert_close(loss_on, loss_off, atol=1e-6, rtol=1e-5)
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], atol=1e-6, rtol=1e-5)
    full = DistillationTrainer(
        model=tiny_llama(2, seed=2), teacher=teacher, args=cfg(out_dir), train_dataset=data, data_collator=pad_batch
    )
    assert full.compute_loss(full.model, pad_batch([data[i] for i in range(5)])).item() != pytest.approx(
        loss_on.item(), rel=1e-4
    )  # top-5 of 24 is an approximation: the online summary is really used


def test_online_top_k_trains_and_is_checked(out_dir):
    teacher = tiny_llama(2, seed=1)
    data, _ = _padded_lm_batch()
    trainer = DistillationTrainer(
        model=tiny_llama(2, seed=2),
        teacher=teacher,
        args=cfg(out_dir, teacher_top_k=4, max_steps=2),
        train_dataset=data,
        data_collator=pad_batch,
    )
    trainer.train()
    assert trainer.state.global_step == 2
    with pytest.raises(ValueError, match=r"teacher_top_k=30, but the KD loss compares 24 classes"):
        DistillationTrainer(
            model=tiny_llama(2), teacher=teacher, args=cfg(out_dir, teacher_top_k=30), train_dataset=data
        )
    with pytest.raises(ValueError, match="teacher_top_k=4 keeps probabilities, but kd_loss=.mse. compares raw logits"):
        DistillationTrainer(
            model=tiny_llama(2), teacher=teacher, args=cfg(out_dir, teacher_top_k=4, kd_loss="mse"), train_dataset=data
        )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kd_chunk_size": -1}, r"kd_chunk_size must be an integer >= 0 .* got -1\. Use e\.g\. 64, or 0"),
        ({"teacher_top_k": 0}, r"teacher_top_k must be an integer >= 1 .* got 0\. Use e\.g\. 50, or None"),
    ],
)
def test_config_checks_name_value_and_fix(out_dir, overrides, message):
    with pytest.raises(ValueError, match=message):
        cfg(out_dir, **overrides)


def test_teacher_head_runs_per_chunk_and_equals_the_full_logits(out_dir):
    teacher = tiny_llama(2, seed=1)
    data, batch = _padded_lm_batch()
    trainer = DistillationTrainer(
        model=tiny_llama(2, seed=2), teacher=teacher, args=cfg(out_dir, kd_chunk_size=3), train_dataset=data
    )
    assert trainer.teacher_head is teacher.get_output_embeddings()
    outputs, view = trainer._teacher_forward(dict(batch), {"use_cache": False})
    assert view.hidden is not None and outputs.logits is None  # the teacher's full logits were never computed
    streamed = _loss_and_grads(trainer, batch)
    trainer.teacher_head = None  # the full-logits path
    full = _loss_and_grads(trainer, batch)
    torch.testing.assert_close(streamed[0], full[0], atol=1e-6, rtol=1e-5)
    for name in full[1]:
        torch.testing.assert_close(streamed[1][name], full[1][name], atol=1e-6, rtol=1e-5)


def test_soft_capped_teacher_keeps_its_full_logits(out_dir, caplog):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=24,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=0.5,  # small enough that capping changes every logit
        pad_token_id=0,
    )
    data, batch = _padded_lm_batch()
    with caplog.at_level("WARNING", logger="hf_distill.teacher_logits"):
        trainer = DistillationTrainer(
            model=tiny_llama(2), teacher=Gemma2ForCausalLM(config), args=cfg(out_dir), train_dataset=data
        )
    assert trainer.teacher_head is None and "not its LM head applied" in caplog.text
    assert torch.isfinite(trainer.compute_loss(trainer.model, dict(batch)))


def test_fused_hard_loss_equals_separate_terms_and_checks_its_weights():
    student = _logits(7).reshape(-1, 11).requires_grad_(True)
    teacher = _logits(8).reshape(-1, 11)
    mask = _mask()
    labels = torch.randint(0, 11, (21,), generator=torch.Generator().manual_seed(9))
    labelled = mask.clone()
    labelled[7:10] = False  # an example's positions with the soft loss only
    kd_weight = torch.where(torch.arange(21) < 7, 1.0, 0.4)
    hard_weight = 0.6 * labelled.float()

    def ce(logits, target, _labelled):
        return torch.nn.functional.cross_entropy(logits, target, reduction="none")

    hard = HardRows(ce, labels, labelled, kd_weight, hard_weight)
    kd, ce_values = chunked_distillation_loss(student, teacher, mask, loss="jsd", chunk_size=4, hard=hard, jsd_beta=0.3)
    ((kd_weight * kd + hard_weight * ce_values).sum() / 9.0).backward()
    fused_grad, student.grad = student.grad.clone(), None
    reference_kd = _reference(student, teacher, mask, "jsd", jsd_beta=0.3)
    reference_ce = torch.where(labelled, ce(student, labels, labelled), torch.zeros(21))
    ((kd_weight * reference_kd + hard_weight * reference_ce).sum() / 9.0).backward()
    torch.testing.assert_close(kd, reference_kd.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ce_values, reference_ce.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused_grad, student.grad, atol=1e-6, rtol=1e-5)
    # Weights other than the declared ones would get a wrong gradient: refused in backward.
    kd, ce_values = chunked_distillation_loss(student, teacher, mask, loss="jsd", chunk_size=4, hard=hard, jsd_beta=0.3)
    with pytest.raises(RuntimeError, match="other weights than HardRows"):
        (kd.sum() + ce_values.sum()).backward()


def test_trainer_fuses_the_hard_loss_at_alpha_below_one(out_dir, monkeypatch):
    teacher = tiny_llama(2, seed=1)
    data, batch = _padded_lm_batch()
    batch["labels"][1] = -100  # an unlabelled example: soft loss only, at weight 1
    calls = []
    original = HardRows.values
    monkeypatch.setattr(HardRows, "values", lambda self, *a: calls.append(1) or original(self, *a))
    results = []
    for chunk in (0, 3):
        trainer = DistillationTrainer(
            model=tiny_llama(2, seed=2).train(),
            teacher=teacher,
            args=cfg(out_dir, kd_chunk_size=chunk, alpha=0.3),
            train_dataset=data,
            data_collator=pad_batch,
        )
        results.append(_loss_and_grads(trainer, batch))
    assert calls  # the chunked run went through the fused pass, the unchunked one did not need to
    (loss0, grads0), (loss3, grads3) = results
    torch.testing.assert_close(loss3, loss0, atol=1e-6, rtol=1e-5)
    for name in grads0:
        torch.testing.assert_close(grads3[name], grads0[name], atol=1e-6, rtol=1e-5)
