"""Loss maths against values computed by hand, on random tensors, without a Trainer."""

import math

import pytest
import torch

from hf_distill.losses import (
    KD_LOSSES,
    attention_kl,
    distillation_loss,
    hidden_state_loss,
    register_kd_loss,
    value_relation_kl,
)


def _probs(logits, t=1.0):
    return torch.softmax(logits / t, -1)


def _kl_by_hand(p, q):
    return sum(float(p[i]) * math.log(float(p[i]) / float(q[i])) for i in range(len(p)))


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)


def test_forward_kl_matches_hand_computation_with_t2(pair):
    s, t = pair
    temperature = 2.0
    expected = (
        sum(_kl_by_hand(_probs(t[i], temperature), _probs(s[i], temperature)) for i in range(6)) / 6 * temperature**2
    )
    got = distillation_loss(s, t, loss="forward_kl", temperature=temperature)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    unscaled = distillation_loss(s, t, loss="forward_kl", temperature=temperature, scale_by_t2=False)
    assert unscaled.item() == pytest.approx(expected / temperature**2, rel=1e-5)


def test_reverse_kl_is_kl_the_other_way(pair):
    s, t = pair
    expected = sum(_kl_by_hand(_probs(s[i]), _probs(t[i])) for i in range(6)) / 6
    assert distillation_loss(s, t, loss="reverse_kl").item() == pytest.approx(expected, rel=1e-5)


def test_jsd_by_hand_and_endpoints(pair):
    s, t = pair
    beta = 0.3
    expected = 0.0
    for i in range(6):
        p, q = _probs(t[i]), _probs(s[i])
        m = beta * p + (1 - beta) * q
        expected += beta * _kl_by_hand(p, m) + (1 - beta) * _kl_by_hand(q, m)
    assert distillation_loss(s, t, loss="jsd", jsd_beta=beta).item() == pytest.approx(expected / 6, rel=1e-5)
    fwd = distillation_loss(s, t, loss="forward_kl")
    rev = distillation_loss(s, t, loss="reverse_kl")
    assert torch.allclose(distillation_loss(s, t, loss="jsd", jsd_beta=0.0), fwd)
    assert torch.allclose(distillation_loss(s, t, loss="jsd", jsd_beta=1.0), rev)
    # Near the endpoints the normalised divergence tends to the matching KL.
    assert (distillation_loss(s, t, loss="jsd", jsd_beta=1e-4) / 1e-4).item() == pytest.approx(fwd.item(), rel=1e-2)
    assert (distillation_loss(s, t, loss="jsd", jsd_beta=1 - 1e-4) / 1e-4).item() == pytest.approx(rev.item(), rel=1e-2)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_equals_trl_gkd_loss(beta):
    """Our `jsd` is TRL's GKD loss (same beta convention, same masking), so benchmarks against GKDTrainer compare
    trainers, not objectives."""
    gkd = pytest.importorskip("trl.experimental.gkd")
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 7, 11, generator=g), torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = -100  # a masked prompt
    labels[2, 5:] = -100  # padding
    theirs = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta)
    ours = distillation_loss(student, teacher, loss="jsd", jsd_beta=beta, mask=labels != -100)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_skew_losses_by_hand_and_limits(pair):
    s, t = pair
    lam = 0.1
    expected = sum(_kl_by_hand(_probs(t[i]), lam * _probs(t[i]) + (1 - lam) * _probs(s[i])) for i in range(6)) / 6
    assert distillation_loss(s, t, loss="skew_kl", skew_lambda=lam).item() == pytest.approx(expected, rel=1e-5)
    expected_r = sum(_kl_by_hand(_probs(s[i]), lam * _probs(s[i]) + (1 - lam) * _probs(t[i])) for i in range(6)) / 6
    got_r = distillation_loss(s, t, loss="skew_reverse_kl", skew_lambda=lam)
    assert got_r.item() == pytest.approx(expected_r, rel=1e-5)
    assert torch.allclose(
        distillation_loss(s, t, loss="skew_kl", skew_lambda=0.0), distillation_loss(s, t, loss="forward_kl")
    )
    assert torch.allclose(
        distillation_loss(s, t, loss="skew_reverse_kl", skew_lambda=0.0), distillation_loss(s, t, loss="reverse_kl")
    )
    # λ → 1 mixes the target into itself: the divergence vanishes.
    assert distillation_loss(s, t, loss="skew_kl", skew_lambda=0.999).item() < 1e-3


def test_tvd_and_mse_by_hand(pair):
    s, t = pair
    tvd = sum(0.5 * float((_probs(t[i]) - _probs(s[i])).abs().sum()) for i in range(6)) / 6
    assert distillation_loss(s, t, loss="tvd").item() == pytest.approx(tvd, rel=1e-5)
    mse = float(((s - t) ** 2).mean())
    # Logit MSE ignores temperature and T².
    assert distillation_loss(s, t, loss="mse", temperature=4.0).item() == pytest.approx(mse, rel=1e-5)


@pytest.mark.parametrize("name", sorted(KD_LOSSES))
def test_every_loss_is_zero_on_equal_inputs_and_positive_otherwise(name, pair):
    s, t = pair
    assert distillation_loss(t.clone(), t, loss=name).abs().item() < 1e-6
    assert distillation_loss(s, t, loss=name).item() > 0


def test_mask_averages_only_unmasked_positions(pair):
    s, t = pair
    mask = torch.tensor([True, False, True, False, False, True])
    masked = distillation_loss(s, t, mask=mask)
    assert masked.item() == pytest.approx(distillation_loss(s[mask], t[mask]).item(), rel=1e-6)
    total = distillation_loss(s, t, mask=mask, reduction="sum")
    assert total.item() == pytest.approx(masked.item() * 3, rel=1e-6)
    # Garbage in masked positions changes nothing.
    s2 = s.clone()
    s2[~mask] = 1e4
    assert torch.allclose(distillation_loss(s2, t, mask=mask), masked)


def test_gradient_flows_to_student_only(pair):
    s, t = pair
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    distillation_loss(s, t, temperature=3.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_errors_name_the_problem(pair):
    s, t = pair
    with pytest.raises(ValueError, match="Unknown KD loss 'nope'"):
        distillation_loss(s, t, loss="nope")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        distillation_loss(s, t, temperature=0)
    with pytest.raises(ValueError, match="share the label set"):
        distillation_loss(s, t[:, :4])


def test_registry_accepts_new_losses(pair):
    @register_kd_loss("test_l1_probs")
    def l1(student_logits, teacher_logits):
        return (torch.softmax(student_logits, -1) - torch.softmax(teacher_logits, -1)).abs().sum(-1)

    try:
        s, t = pair
        expected = 2 * distillation_loss(s, t, loss="tvd")
        assert torch.allclose(distillation_loss(s, t, loss="test_l1_probs"), expected)
        with pytest.raises(ValueError, match="already registered"):
            register_kd_loss("test_l1_probs")(l1)
    finally:
        KD_LOSSES.pop("test_l1_probs")


def test_hidden_losses():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    mse = hidden_state_loss(a, b, loss="mse", mask=mask)
    assert mse.item() == pytest.approx(float(((a - b) ** 2).mean(-1)[mask].mean()), rel=1e-6)
    cos = hidden_state_loss(a, b, loss="cosine")
    assert cos.item() == pytest.approx(float((1 - torch.cosine_similarity(a, b, dim=-1)).mean()), rel=1e-5)
    assert hidden_state_loss(a, 3 * a, loss="cosine").item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="Project the student"):
        hidden_state_loss(a, b[..., :4])


def test_attention_and_value_relation_kl():
    g = torch.Generator().manual_seed(2)
    s = torch.softmax(torch.randn(2, 4, 5, 5, generator=g), -1)
    t = torch.softmax(torch.randn(2, 4, 5, 5, generator=g), -1)
    per_query = attention_kl(s, t)
    by_hand = (t * (t.log() - s.log())).sum(-1).mean(1)
    assert torch.allclose(per_query, by_hand, atol=1e-6)
    assert attention_kl(t, t).abs().max() < 1e-6
    values = torch.randn(2, 4, 5, 8, generator=g)
    assert value_relation_kl(values, values).abs().max() < 1e-6
    assert value_relation_kl(values, torch.randn(2, 4, 5, 8, generator=g)).mean() > 0
