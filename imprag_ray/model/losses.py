"""Training objectives of ImpRAG (arXiv 2506.02279, §3.2; DESIGN §1 "Training objective").

``J = J_gen + lambda * J_ret``:

* ``J_gen`` — next-token loss on response tokens only (labels are -100 elsewhere).
* ``J_ret`` warmup — multi-label NCE: for each teacher positive p of query q,
  ``-log( e^{s(q,p)} / (e^{s(q,p)} + sum_{n in N(q)} e^{s(q,n)}) )``; positives do not
  compete with each other, negatives are teacher hard negatives plus every other
  passage of the (globally gathered) batch.
* ``J_ret`` self-distillation — ``KL(teacher || student)`` with teacher
  ``softmax(log P_LM(answer | p, q) / tau_t)`` (no gradient) and student
  ``softmax(s(q, p) / tau_r)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NEG_INF = float("-inf")


def response_nll(logits: Tensor, labels: Tensor, average: str = "token") -> Tensor:
    """HF-style shifted cross entropy over tokens whose label is not -100.

    logits: [B, L, V]; labels: [B, L]. ``average="token"``: mean over all response tokens of
    the batch; ``"example"``: mean over each row's response tokens, then over the rows that
    have any (every example weighs the same, whatever its response length).
    """
    if average == "token":
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
        )
    if average != "example":
        raise ValueError(f"average must be 'token' or 'example', got {average!r}")
    target = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), target, ignore_index=-100, reduction="none")
    count = (target != -100).sum(dim=1)
    rows = count > 0
    return (nll.sum(dim=1)[rows] / count[rows]).mean()


def answer_loglik(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of log P(label tokens) per row -> [B] (the self-distillation teacher signal)."""
    logp = logits[:, :-1].float().log_softmax(-1)  # [B, L-1, V]
    target = labels[:, 1:]
    keep = target != -100
    picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # [B, L-1]
    return (picked * keep).sum(dim=1)


def multi_positive_nce(
    scores: Tensor, positive: Tensor, negative: Tensor, temperature: float = 1.0
) -> Tensor:
    """Warmup retrieval loss.

    Args:
        scores: [B, M] s(q, p) of each query against every candidate passage.
        positive: [B, M] bool, teacher positives P(q).
        negative: [B, M] bool, negatives N(q) (must not overlap ``positive``).
        temperature: scores are divided by it.
    Returns:
        mean over queries (with >= 1 positive) of the sum over positives of the NCE term.
    """
    if bool((positive & negative).any()):
        raise ValueError("a passage cannot be both a positive and a negative of one query")
    s = scores.float() / temperature
    neg_lse = s.masked_fill(~negative, NEG_INF).logsumexp(dim=1, keepdim=True)  # [B, 1]
    per_pos = -(s - torch.logaddexp(s, neg_lse))  # -log(e^s / (e^s + sum_n e^n)), [B, M]
    per_query = per_pos.masked_fill(~positive, 0.0).sum(dim=1)  # [B]
    has_pos = positive.any(dim=1)
    if not bool(has_pos.any()):
        return scores.sum() * 0.0
    return per_query[has_pos].mean()


def distillation_kl(
    student_scores: Tensor,
    teacher_logliks: Tensor,
    mask: Tensor,
    tau_r: float = 1.0,
    tau_t: float = 1.0,
) -> Tensor:
    """Self-distillation retrieval loss ``KL(teacher || student)`` over each query's candidates.

    Args:
        student_scores: [B, C] retrieval scores s(q, p) (gradient flows here).
        teacher_logliks: [B, C] log P_LM(answer | p, q); detached here (stop-gradient).
        mask: [B, C] bool, real candidates.
    Returns: mean over queries (with >= 1 candidate) of the KL divergence.
    """
    rows = mask.any(dim=1)
    if not bool(rows.any()):
        return student_scores.sum() * 0.0
    student_scores, teacher_logliks, mask = student_scores[rows], teacher_logliks[rows], mask[rows]
    teacher = (teacher_logliks.detach().float() / tau_t).masked_fill(~mask, NEG_INF)
    student = (student_scores.float() / tau_r).masked_fill(~mask, NEG_INF)
    log_t = teacher.log_softmax(dim=1)
    log_s = student.log_softmax(dim=1)
    kl = (log_t.exp() * (log_t - log_s)).masked_fill(~mask, 0.0).sum(dim=1)  # [B]
    return kl.mean()
