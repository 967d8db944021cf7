"""Hand-computed cases for the ImpRAG retrieval losses."""

from __future__ import annotations

import math

import pytest
import torch

from imprag_ray.model.losses import answer_loglik, distillation_kl, multi_positive_nce, response_nll


def test_nce_with_several_positives_matches_hand_computation():
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0, 9.0], [0.5, 3.0, 1.0, 0.0, 0.0]])
    pos = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    neg = torch.tensor([[0, 0, 1, 1, 0], [1, 0, 1, 1, 0]], dtype=torch.bool)  # 9.0 ignored
    negs0 = math.exp(0.0) + math.exp(-1.0)
    q0 = -math.log(math.e**2 / (math.e**2 + negs0)) - math.log(math.e / (math.e + negs0))
    negs1 = math.exp(0.5) + math.exp(1.0) + 1.0
    q1 = -math.log(math.exp(3.0) / (math.exp(3.0) + negs1))
    got = multi_positive_nce(scores, pos, neg)
    assert got.item() == pytest.approx((q0 + q1) / 2, abs=1e-6)
    # temperature divides the scores
    got_t = multi_positive_nce(scores * 2, pos, neg, temperature=2.0)
    assert got_t.item() == pytest.approx(got.item(), abs=1e-6)


def test_nce_positives_do_not_compete_and_overlap_is_refused():
    scores = torch.tensor([[5.0, 5.0, 0.0]])
    neg = torch.tensor([[0, 0, 1]], dtype=torch.bool)
    one = multi_positive_nce(scores, torch.tensor([[1, 0, 0]], dtype=torch.bool), neg)
    two = multi_positive_nce(scores, torch.tensor([[1, 1, 0]], dtype=torch.bool), neg)
    assert two.item() == pytest.approx(2 * one.item(), abs=1e-6)
    with pytest.raises(ValueError, match="both a positive and a negative"):
        multi_positive_nce(scores, neg, neg)


def test_nce_gradient_pushes_positive_up_and_negative_down():
    scores = torch.tensor([[1.0, 1.0]], requires_grad=True)
    loss = multi_positive_nce(scores, torch.tensor([[True, False]]), torch.tensor([[False, True]]))
    loss.backward()
    assert scores.grad[0, 0] < 0 < scores.grad[0, 1]


def test_distillation_kl_hand_computed_with_stop_gradient():
    student = torch.tensor([[1.0, 0.0, 2.0]], requires_grad=True)
    teacher = torch.tensor([[-1.0, -3.0, -2.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])  # third candidate is padding
    loss = distillation_kl(student, teacher, mask, tau_r=0.5, tau_t=2.0)
    pt = torch.softmax(torch.tensor([-1.0, -3.0]) / 2.0, 0)
    ps = torch.softmax(torch.tensor([1.0, 0.0]) / 0.5, 0)
    expected = float((pt * (pt.log() - ps.log())).sum())
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert teacher.grad is None  # the teacher side gets no gradient
    assert student.grad is not None and student.grad[0, :2].abs().sum() > 0
    assert student.grad[0, 2].item() == 0.0


def test_distillation_kl_is_zero_when_distributions_agree():
    s = torch.tensor([[0.3, -0.2, 1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert distillation_kl(s, s * 2.0, mask, tau_r=1.0, tau_t=2.0).item() == pytest.approx(0, abs=1e-6)


def test_answer_loglik_sums_label_token_logprobs():
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, -100, 3, 1], [-100, 2, -100, -100]])
    logp = logits.log_softmax(-1)
    expected = torch.stack([logp[0, 1, 3] + logp[0, 2, 1], logp[1, 0, 2]])
    assert torch.allclose(answer_loglik(logits, labels), expected, atol=1e-6)


def test_distillation_kl_ignores_queries_without_candidates():
    s = torch.tensor([[1.0, 0.0], [0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [False, False]])
    loss = distillation_kl(s, torch.tensor([[0.0, -1.0], [0.0, 0.0]]), mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert s.grad[1].abs().sum() == 0


def test_response_nll_token_and_example_averages_match_hand_computation():
    # vocab 2, uniform logits except where set; labels shifted by one (HF style)
    logits = torch.zeros(2, 4, 2)
    logits[0, 0] = torch.tensor([0.0, math.log(3.0)])  # P(1) = 3/4
    logits[1, 0] = torch.tensor([math.log(3.0), 0.0])  # P(0) = 3/4
    labels = torch.tensor([[-100, 1, -100, -100],  # one response token: -log(3/4)
                           [-100, 0, 1, 1]])  # three: -log(3/4), -log(1/2), -log(1/2)
    a, b = -math.log(0.75), -math.log(0.5)
    by_token = (a + a + b + b) / 4
    by_example = (a + (a + 2 * b) / 3) / 2
    assert response_nll(logits, labels).item() == pytest.approx(by_token, abs=1e-6)
    assert response_nll(logits, labels, "example").item() == pytest.approx(by_example, abs=1e-6)
    # rows without any response token are left out of the example mean
    empty = torch.cat([labels, torch.full((1, 4), -100)])
    got = response_nll(torch.cat([logits, torch.zeros(1, 4, 2)]), empty, "example")
    assert got.item() == pytest.approx(by_example, abs=1e-6)
    with pytest.raises(ValueError, match="'token' or 'example'"):
        response_nll(logits, labels, "sequence")
