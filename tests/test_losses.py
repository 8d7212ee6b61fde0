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


# --- probability 0: -inf logits ---------------------------------------------------------------------------------

INF = float("inf")
ZERO_TEACHER = torch.tensor([[1.5, 3.0, -INF, 0.0, 0.1], [0.0, 1.0, 2.0, -INF, -INF]])
ZERO_STUDENT = torch.tensor([[1.0, 2.0, 0.5, -1.0, 0.3], [0.2, -0.4, 1.5, 0.0, 0.9]])


@pytest.mark.parametrize(
    ("loss", "params", "expected"),
    [("forward_kl", {}, 1.487313), ("jsd", {"jsd_beta": 0.5}, 0.469977), ("skew_kl", {"skew_lambda": 0.1}, 1.290192)],
)
def test_teacher_probability_zero_gives_the_reported_values(loss, params, expected):
    student = ZERO_STUDENT.clone().requires_grad_(True)
    value = distillation_loss(student, ZERO_TEACHER, loss=loss, temperature=2.0, **params)
    assert value.item() == pytest.approx(expected, abs=1e-6)
    (grad,) = torch.autograd.grad(value, student)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def _xlogy_kl(p, q):
    """KL(p || q) in float64 with 0·log 0 = 0 and +inf where q = 0 < p."""
    total = 0.0
    for pi, qi in zip(p.tolist(), q.tolist(), strict=True):
        if pi > 0:
            total += INF if qi == 0 else pi * math.log(pi / qi)
    return total


def _by_hand(loss, s, t, beta=0.5, lam=0.1):
    p, q = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    if loss == "forward_kl":
        return _xlogy_kl(p, q)
    if loss == "reverse_kl":
        return _xlogy_kl(q, p)
    if loss == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * _xlogy_kl(p, m) + (1 - beta) * _xlogy_kl(q, m)
    if loss == "skew_kl":
        return _xlogy_kl(p, lam * p + (1 - lam) * q)
    if loss == "skew_reverse_kl":
        return _xlogy_kl(q, lam * q + (1 - lam) * p)
    if loss == "tvd":
        return 0.5 * float((p - q).abs().sum())
    finite = torch.isfinite(s) & torch.isfinite(t)
    return float(((s - t)[finite] ** 2).mean())


BUILT_IN = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "mse"]


@pytest.mark.parametrize("student_zeros", [False, True], ids=["student_finite", "student_zero_too"])
@pytest.mark.parametrize("loss", BUILT_IN)
def test_every_loss_treats_zero_probability_exactly(loss, student_zeros):
    student = ZERO_STUDENT.clone()
    if student_zeros:  # the student also gives 0 where the teacher does: every divergence is finite
        student[torch.isinf(ZERO_TEACHER)] = -INF
    student.requires_grad_(True)
    value = distillation_loss(student, ZERO_TEACHER, loss=loss, scale_by_t2=False)
    expected = sum(_by_hand(loss, student[i].detach(), ZERO_TEACHER[i]) for i in range(2)) / 2
    assert not torch.isnan(value)
    if math.isinf(expected):  # reverse KL: the student puts mass where the teacher has none
        assert value.item() == INF
        return
    assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    (grad,) = torch.autograd.grad(value, student)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("loss", BUILT_IN)
def test_garbage_at_masked_positions_does_not_leak(loss):
    """NaN or inf at a masked (padded) position must not reach the value or the other positions' gradients."""
    student = torch.cat([ZERO_STUDENT, torch.full((1, 5), float("nan"))]).requires_grad_(True)
    teacher = torch.cat([ZERO_TEACHER, torch.tensor([[INF, 0.0, 0.0, 0.0, 0.0]])])
    mask = torch.tensor([True, True, False])
    value = distillation_loss(student, teacher, loss=loss, mask=mask, scale_by_t2=False)
    reference = distillation_loss(ZERO_STUDENT, ZERO_TEACHER, loss=loss, scale_by_t2=False)
    assert value.item() == pytest.approx(reference.item(), rel=1e-6)
    if torch.isfinite(value):
        (grad,) = torch.autograd.grad(value, student)
        assert torch.isfinite(grad[:2]).all()


def test_cached_teacher_with_zero_probabilities_stays_exact():
    from hf_distill.cache import dense_teacher_logits

    temperature = 2.0
    full = dense_teacher_logits(
        ZERO_TEACHER, torch.arange(5).expand(2, 5), torch.zeros(2), num_classes=5, temperature=temperature
    )
    student = ZERO_STUDENT.clone().requires_grad_(True)
    cached = distillation_loss(student, full, loss="forward_kl", temperature=temperature)
    assert cached.item() == pytest.approx(1.487313, abs=1e-6)
    # A partial cache whose top-k holds a -inf logit: that class keeps probability exactly 0.
    values, indices = ZERO_TEACHER.topk(4, dim=-1)
    probs = torch.softmax(ZERO_TEACHER / temperature, -1)
    rest = (1 - probs.gather(-1, indices).sum(-1)).clamp_min(0)
    partial = dense_teacher_logits(values, indices, rest, num_classes=5, temperature=temperature)
    rebuilt = torch.softmax(partial / temperature, -1)
    assert rebuilt[1, 3] == 0 or rebuilt[1, 4] == 0  # row 1 has two -inf logits; one is in its top 4
    torch.testing.assert_close(rebuilt[0], probs[0], atol=1e-6, rtol=0)
    for loss in BUILT_IN:
        if loss in ("reverse_kl", "mse"):
            continue
        value = distillation_loss(student, partial, loss=loss, temperature=temperature)
        (grad,) = torch.autograd.grad(value, student)
        assert torch.isfinite(value) and torch.isfinite(grad).all(), loss


# --- multi-label (sigmoid) heads and hard losses ------------------------------------------------------------------


def test_multi_label_kd_is_a_bernoulli_divergence_per_class():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 3, generator=g), 2 * torch.randn(4, 3, generator=g)
    temperature = 2.0
    ps, pt = torch.sigmoid(s.double() / temperature), torch.sigmoid(t.double() / temperature)
    bernoulli_kl = pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps))
    expected = float(bernoulli_kl.mean()) * temperature**2
    got = distillation_loss(s, t, loss="forward_kl", temperature=temperature, multi_label=True)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert distillation_loss(t, t, loss="jsd", multi_label=True).abs().item() < 1e-6
    per_example = distillation_loss(s, t, loss="tvd", multi_label=True, reduction="none", scale_by_t2=False)
    assert per_example.shape == (4,)
    assert torch.allclose(per_example.double(), (torch.sigmoid(s.double()) - torch.sigmoid(t.double())).abs().mean(-1))


def test_hard_label_losses_match_torch():
    from hf_distill.losses import MULTI_LABEL, REGRESSION, hard_label_loss

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 3, generator=g)
    labels = torch.tensor([0, 2, 1, 1, 0])
    smoothed = hard_label_loss(logits, labels, label_smoothing=0.1)
    assert torch.allclose(
        smoothed, torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1, reduction="none")
    )
    multi_hot = (torch.rand(5, 3, generator=g) > 0.5).float()
    bce = hard_label_loss(logits, multi_hot, problem_type=MULTI_LABEL)
    assert bce.mean().item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(logits, multi_hot).item(), rel=1e-6
    )
    targets = torch.randn(5, generator=g)
    mse = hard_label_loss(logits[:, :1], targets, problem_type=REGRESSION)
    assert torch.allclose(mse, (logits[:, 0] - targets) ** 2)
    with pytest.raises(ValueError, match="multi_label_classification"):
        hard_label_loss(logits, multi_hot)
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1 smooths a softmax"):
        hard_label_loss(logits, multi_hot, problem_type=MULTI_LABEL, label_smoothing=0.1)
    with pytest.raises(ValueError, match="needs 3 target value"):
        hard_label_loss(logits, labels.float(), problem_type=MULTI_LABEL)
