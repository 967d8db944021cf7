"""CUDA code paths of the model core (marked ``gpu``; deselected by default, CI has no GPU).

Run on a GPU machine with ``python -m pytest -m gpu tests/model/test_gpu.py -s``.
Set IMPRAG_GPU_REPORT=path.json to keep the measured numbers.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from imprag_ray.model import ImpRAGConfig, ImpRAGModel
from imprag_ray.model.losses import multi_positive_nce
from imprag_ray.model.presets import llama3_1_8b, llama3_2_3b
from tests.model.conftest import tiny_lm
from tests.model.test_imprag_exact import PASSAGE_LENS, PROMPT_LENS, make_batch, reference_logits

pytestmark = pytest.mark.gpu
CUDA = torch.cuda.is_available()
REPORT: dict = {}


def _report(key, value):
    REPORT[key] = value
    print(key, value)
    path = os.environ.get("IMPRAG_GPU_REPORT")
    if path:
        with open(path, "w") as fh:
            json.dump(REPORT, fh, indent=2)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_fp32_cuda_matches_the_explicit_reference():
    lm_cpu = tiny_lm("llama")  # the reference runs on the CPU copy of the same weights
    lm = tiny_lm("llama").cuda()
    model = ImpRAGModel(lm, ImpRAGConfig(2, 4, 6, 3)).eval()
    gen = torch.Generator().manual_seed(0)
    ids, mask, p_ids, p_mask, prompts, passages = make_batch(gen, 97, PROMPT_LENS, PASSAGE_LENS, 3)
    with torch.no_grad():
        logits = model(ids.cuda(), mask.cuda(), p_ids.cuda(), p_mask.cuda()).logits.cpu()
        worst = 0.0
        for i, n in enumerate(PROMPT_LENS):
            ref = reference_logits(lm_cpu, 2, 4, 3, prompts[i], passages[i])
            worst = max(worst, (logits[i, :n] - ref).abs().max().item())
    _report("fp32_cuda_max_abs_dlogit", worst)
    assert worst <= 1e-4


def _big(preset, dtype=torch.bfloat16):
    from transformers import AutoModelForCausalLM

    cfg = preset.hf_config()
    with torch.device("cuda"):
        lm = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return ImpRAGModel(lm, ImpRAGConfig(preset.retrieval_layer, preset.reader_last_layer,
                                        preset.max_passage_tokens, preset.num_passages))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", [llama3_2_3b, llama3_1_8b], ids=["3b", "8b"])
def test_bf16_train_step_at_paper_shapes(preset):
    """J_gen + warmup NCE forward/backward in bf16 with k=10 passages of l_max=192 tokens."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    p = preset()
    model = _big(p)
    bsz, prompt_len, k, l_max = 2, 96, p.num_passages, p.max_passage_tokens
    vocab = model.lm.config.vocab_size
    ids = torch.randint(3, vocab, (bsz, prompt_len), device="cuda")
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : prompt_len - 16] = -100
    p_ids = torch.randint(3, vocab, (bsz, k, l_max), device="cuda")
    p_mask = torch.ones_like(p_ids)
    p_mask[:, :, l_max - 40 :] = 0  # every passage shorter than l_max
    pool = torch.randint(3, vocab, (bsz * 4, l_max), device="cuda")
    pool_mask = torch.ones_like(pool)
    torch.cuda.synchronize()
    t0 = time.time()
    out = model(ids, mask, p_ids, p_mask, labels=labels)
    emb = model.embed_passages(pool, pool_mask)
    scores = out.query_embedding.float() @ emb.float().T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[0, 0] = positive[1, 4] = True
    loss = out.loss + multi_positive_nce(scores, positive, ~positive)
    loss.backward()
    torch.cuda.synchronize()
    seconds = time.time() - t0
    grads = [q.grad for q in model.parameters() if q.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert out.query_embedding.shape == (bsz, p.num_kv_heads * p.head_dim)
    _report(f"bf16_{p.name}_train_step", {
        "params_b": round(sum(q.numel() for q in model.parameters()) / 1e9, 3),
        "loss": round(loss.item(), 4),
        "seconds": round(seconds, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "passage_tokens": int(p_mask.sum()),
    })
    del model, out, loss, grads
    torch.cuda.empty_cache()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_bf16_cached_generation_agrees_with_the_full_forward():
    """bf16 kernels differ in reduction order: compare teacher-forced top-1 and |dlogprob|."""
    p = llama3_2_3b()
    model = _big(p).eval()
    vocab = model.lm.config.vocab_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(3, vocab, (3, 40), device="cuda", generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    p_ids = torch.randint(3, vocab, (3, p.num_passages, p.max_passage_tokens), device="cuda", generator=gen)
    p_mask = torch.ones_like(p_ids)
    p_mask[:, :, 100:] = 0
    with torch.no_grad():
        t0 = time.time()
        new = model.generate(ids, mask, p_ids, p_mask, max_new_tokens=8)
        torch.cuda.synchronize()
        seconds = time.time() - t0
        agree, worst = 0, 0.0
        total = 0
        for i in range(3):
            n = int(mask[i].sum())
            seq = torch.cat([ids[i, :n], new[i]]).unsqueeze(0)
            full = model(seq, torch.ones_like(seq), p_ids[i : i + 1], p_mask[i : i + 1]).logits[0].float()
            logp = full.log_softmax(-1)
            for s in range(new.shape[1]):
                row = logp[n - 1 + s]
                total += 1
                agree += int(row.argmax() == new[i, s])
                worst = max(worst, (row.max() - row[new[i, s]]).item())
    _report("bf16_3b_generate", {"tokens": total, "top1_agree": agree, "max_dlogprob_of_chosen": round(worst, 4),
                                 "seconds_8_tokens_x3": round(seconds, 3)})
    assert agree >= total - 2  # divergence only at near-ties
    assert worst < 0.5
