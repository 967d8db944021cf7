"""ImpRAGModel against an explicit reference written here (DESIGN §1).

The reference builds the full ``[P; prompt]`` sequence of one example (P = the real
passage tokens concatenated), gives every token its paper position (passages 0..|P|-1,
prompt token i at k*l_max + i) and runs the HF decoder layers themselves with a
per-layer additive mask: prompt rows may see passage columns only in layers b..t.
"""

from __future__ import annotations

import pytest
import torch

from imprag_ray.model import ImpRAGConfig, ImpRAGModel
from tests.model.conftest import tiny_lm

TOL = 1e-4
L_MAX = 6


def reference_logits(lm, b, t, k, prompt, passages):
    """Logits [len(prompt), V] of the prompt, computed on the full sequence."""
    flat = [tok for p in passages for tok in p]
    n_p, n_q = len(flat), len(prompt)
    seq = torch.tensor([flat + prompt])
    pos = torch.tensor([list(range(n_p)) + [k * L_MAX + i for i in range(n_q)]])
    size = n_p + n_q
    causal = torch.ones(size, size, dtype=torch.bool).tril()
    is_prompt = torch.arange(size) >= n_p
    prompt_to_passage = is_prompt[:, None] & ~is_prompt[None, :]
    h = lm.model.embed_tokens(seq)
    cos, sin = lm.model.rotary_emb(h, pos)
    for layer_idx, layer in enumerate(lm.model.layers):
        allowed = causal if b <= layer_idx <= t else causal & ~prompt_to_passage
        additive = torch.zeros(size, size).masked_fill(~allowed, float("-inf"))[None, None]
        out = layer(h, attention_mask=additive, position_embeddings=(cos, sin), position_ids=pos)
        h = out[0] if isinstance(out, tuple) else out
    return lm.lm_head(lm.model.norm(h))[0, n_p:]


def make_batch(gen, vocab, prompt_lens, passage_lens, k):
    """Right-padded prompts [B, L] and passages [B, k, L_MAX] with random tokens >= 3."""
    bsz = len(prompt_lens)
    ids = torch.zeros(bsz, max(prompt_lens), dtype=torch.long)
    mask = torch.zeros_like(ids)
    p_ids = torch.zeros(bsz, k, L_MAX, dtype=torch.long)
    p_mask = torch.zeros_like(p_ids)
    prompts, passages = [], []
    for i, n in enumerate(prompt_lens):
        toks = torch.randint(3, vocab, (n,), generator=gen)
        ids[i, :n], mask[i, :n] = toks, 1
        prompts.append(toks.tolist())
        row = []
        for j, m in enumerate(passage_lens[i]):
            ptoks = torch.randint(3, vocab, (m,), generator=gen)
            p_ids[i, j, :m], p_mask[i, j, :m] = ptoks, 1
            p_ids[i, j, m:] = torch.randint(3, vocab, (L_MAX - m,), generator=gen)  # junk PAD ids
            row.append(ptoks.tolist())
        passages.append(row)
    return ids, mask, p_ids, p_mask, prompts, passages


def wrap(lm, b, t, k=3, post_rope=False):
    return ImpRAGModel(lm, ImpRAGConfig(b, t, L_MAX, k, post_rope)).eval()


BT = [(0, 1), (1, 3), (2, 4), (2, 5), (3, 4)]
PASSAGE_LENS = [[4, 6, 2], [6, 0, 3], [1, 5, 6]]  # different lengths, one empty slot
PROMPT_LENS = [7, 3, 5]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("b,t", BT)
def test_forward_with_passages_matches_reference(family, b, t):
    lm = tiny_lm(family)
    model = wrap(lm, b, t)
    gen = torch.Generator().manual_seed(b * 10 + t)
    ids, mask, p_ids, p_mask, prompts, passages = make_batch(
        gen, lm.config.vocab_size, PROMPT_LENS, PASSAGE_LENS, 3
    )
    with torch.no_grad():
        logits = model(ids, mask, p_ids, p_mask).logits
        for i, n in enumerate(PROMPT_LENS):
            ref = reference_logits(lm, b, t, 3, prompts[i], passages[i])
            assert (logits[i, :n] - ref).abs().max().item() <= TOL
    # passages must matter in the middle layers (guards against a mask that hides them)
    with torch.no_grad():
        alone = model(ids, mask).logits
    assert (alone[0, :7] - logits[0, :7]).abs().max().item() > 1e-3


def test_without_passages_is_the_base_llm(llama):
    model = wrap(llama, 2, 4)
    gen = torch.Generator().manual_seed(1)
    ids, mask, *_ = make_batch(gen, llama.config.vocab_size, PROMPT_LENS, PASSAGE_LENS, 3)
    with torch.no_grad():
        ours = model(ids, mask).logits
        hf = llama(input_ids=ids, attention_mask=mask).logits
    for i, n in enumerate(PROMPT_LENS):
        assert (ours[i, :n] - hf[i, :n]).abs().max().item() <= TOL


def test_all_passage_slots_empty_is_the_base_llm(llama):
    model = wrap(llama, 1, 3)
    gen = torch.Generator().manual_seed(2)
    ids, mask, p_ids, p_mask, prompts, _ = make_batch(
        gen, llama.config.vocab_size, [5, 4], [[0, 0, 0], [0, 0, 0]], 3
    )
    with torch.no_grad():
        ours = model(ids, mask, p_ids, p_mask).logits
        for i, n in enumerate([5, 4]):
            ref = reference_logits(llama, 1, 3, 3, prompts[i], [[], [], []])
            assert (ours[i, :n] - ref).abs().max().item() <= TOL


def test_batched_equals_one_by_one(llama):
    model = wrap(llama, 1, 4)
    gen = torch.Generator().manual_seed(3)
    ids, mask, p_ids, p_mask, *_ = make_batch(
        gen, llama.config.vocab_size, PROMPT_LENS, PASSAGE_LENS, 3
    )
    with torch.no_grad():
        batched = model(ids, mask, p_ids, p_mask).logits
        for i, n in enumerate(PROMPT_LENS):
            one = model(ids[i : i + 1, :n], mask[i : i + 1, :n], p_ids[i : i + 1], p_mask[i : i + 1])
            assert (batched[i, :n] - one.logits[0]).abs().max().item() <= TOL


def test_pad_ids_in_passage_region_are_invisible(llama):
    model = wrap(llama, 1, 4)
    gen = torch.Generator().manual_seed(4)
    ids, mask, p_ids, p_mask, *_ = make_batch(
        gen, llama.config.vocab_size, PROMPT_LENS, PASSAGE_LENS, 3
    )
    other = torch.where(p_mask.bool(), p_ids, (p_ids + 7) % llama.config.vocab_size)
    with torch.no_grad():
        a = model(ids, mask, p_ids, p_mask).logits
        c = model(ids, mask, other, p_mask).logits
    for i, n in enumerate(PROMPT_LENS):
        assert (a[i, :n] - c[i, :n]).abs().max().item() <= TOL


def _manual_layer_b(lm, b, ids, positions):
    """Input-normed hidden state entering layer b at the last token, via plain HF."""
    out = lm(input_ids=ids, position_ids=positions, output_hidden_states=True)
    return lm.model.layers[b].input_layernorm(out.hidden_states[b][:, -1])  # [1, D]


@pytest.mark.parametrize("post_rope", [False, True])
@pytest.mark.parametrize("b", [0, 2, 3])
def test_embeddings_match_manual_layer_b_projections(llama, b, post_rope):
    model = wrap(llama, b, 4, post_rope=post_rope)
    attn = llama.model.layers[b].self_attn
    d_h, h_kv = attn.head_dim, llama.config.num_key_value_heads
    gen = torch.Generator().manual_seed(5)
    ids, mask, *_ = make_batch(gen, llama.config.vocab_size, PROMPT_LENS, PASSAGE_LENS, 3)
    with torch.no_grad():
        q_emb = model.embed_queries(ids, mask)
        p_emb = model.embed_passages(ids, mask)
        for i, n in enumerate(PROMPT_LENS):
            row = ids[i : i + 1, :n]
            # query: prompt at positions k*l_max + i, q_proj, mean over each GQA group
            q_pos = torch.arange(n).unsqueeze(0) + 3 * L_MAX
            x = _manual_layer_b(llama, b, row, q_pos)
            q = attn.q_proj(x).view(1, -1, 1, d_h)  # [1, h_q, 1, d_h]
            if post_rope:
                cos, sin = llama.model.rotary_emb(q, q_pos[:, -1:])
                q = q * cos[:, None] + torch.cat([-q[..., d_h // 2 :], q[..., : d_h // 2]], -1) * sin[:, None]
            q = q.view(h_kv, -1, d_h).mean(1).reshape(-1)
            assert q_emb.shape == (3, h_kv * d_h)
            assert (q_emb[i] - q).abs().max().item() <= TOL
            # passage: positions 0..n-1, k_proj at the last token
            p_pos = torch.arange(n).unsqueeze(0)
            x = _manual_layer_b(llama, b, row, p_pos)
            k = attn.k_proj(x).view(1, -1, 1, d_h)
            if post_rope:
                cos, sin = llama.model.rotary_emb(k, p_pos[:, -1:])
                k = k * cos[:, None] + torch.cat([-k[..., d_h // 2 :], k[..., : d_h // 2]], -1) * sin[:, None]
            assert (p_emb[i] - k.reshape(-1)).abs().max().item() <= TOL


def test_embed_passages_runs_only_bottom_layers(llama, monkeypatch):
    model = wrap(llama, 2, 4)
    called = []
    for idx, layer in enumerate(llama.model.layers):
        monkeypatch.setattr(layer, "forward", lambda *a, _i=idx, **kw: called.append(_i))
    ids = torch.randint(3, 90, (2, 5))
    with torch.no_grad():
        model.embed_passages(ids, torch.ones_like(ids))
    assert called == []  # our path calls sub-modules, never whole HF layers ...
    calls = []
    for idx, layer in enumerate(llama.model.layers):
        monkeypatch.setattr(layer.mlp, "forward", lambda x, _i=idx, _f=layer.mlp.forward: (calls.append(_i), _f(x))[1])
    with torch.no_grad():
        model.embed_passages(ids, torch.ones_like(ids))
    assert calls == [0, 1]  # ... and only layers 0..b-1 do any work


def test_prompt_state_is_reused_by_stage_2(llama):
    model = wrap(llama, 2, 4)
    gen = torch.Generator().manual_seed(6)
    ids, mask, p_ids, p_mask, *_ = make_batch(
        gen, llama.config.vocab_size, PROMPT_LENS, PASSAGE_LENS, 3
    )
    with torch.no_grad():
        state = model.encode_prompt(ids, mask, num_passages=3)
        h, kv = model.continue_prompt(state, model.encode_passage_kv(p_ids, p_mask))
        full = model(ids, mask, p_ids, p_mask)
    assert len(kv) == llama.config.num_hidden_layers
    assert torch.equal(state.query_embedding, full.query_embedding)
    assert (model.lm_logits(h) - full.logits).abs().max().item() <= TOL


def test_loss_is_response_only_cross_entropy(llama):
    model = wrap(llama, 1, 3)
    ids = torch.randint(3, 90, (2, 6))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(ids, mask, labels=labels)
    logp = out.logits.log_softmax(-1)
    manual = -torch.stack([logp[i, j - 1, ids[i, j]] for i in range(2) for j in (4, 5)]).mean()
    assert abs(out.loss.item() - manual.item()) <= 1e-5
    out.loss.backward()
    assert llama.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_bad_shapes_and_config_are_rejected(llama):
    with pytest.raises(ValueError, match="retrieval_layer"):
        wrap(llama, 4, 4)
    with pytest.raises(ValueError, match="reader_last_layer"):
        wrap(llama, 1, 6)
    model = wrap(llama, 1, 3)
    ids = torch.randint(3, 90, (1, 4))
    with pytest.raises(ValueError, match="max_passage_tokens"):
        model(ids, torch.ones_like(ids), torch.ones(1, 2, L_MAX + 1, dtype=torch.long),
              torch.ones(1, 2, L_MAX + 1, dtype=torch.long))


def test_save_and_load_round_trip(llama, tmp_path):
    model = wrap(llama, 2, 4, post_rope=True)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = ImpRAGModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.imprag_config == model.imprag_config
    ids = torch.randint(3, 90, (2, 5))
    with torch.no_grad():
        assert torch.allclose(model(ids, torch.ones_like(ids)).logits,
                              loaded(ids, torch.ones_like(ids)).logits, atol=1e-6)
    assert ImpRAGModel.from_pretrained(tmp_path / "ckpt", reader_last_layer=5).t == 5
    assert not list(tmp_path.glob(".ckpt*"))  # no temp dirs left behind


def test_query_index_gives_the_prompt_embedding_inside_a_longer_sequence(llama):
    model = wrap(llama, 2, 4)
    prompt = torch.randint(3, 90, (2, 5))
    longer = torch.cat([prompt, torch.randint(3, 90, (2, 3))], dim=1)
    with torch.no_grad():
        alone = model.embed_queries(prompt, torch.ones_like(prompt))
        inside = model(longer, torch.ones_like(longer), query_index=torch.tensor([4, 4])).query_embedding
        last = model(longer, torch.ones_like(longer)).query_embedding
    assert (alone - inside).abs().max().item() <= TOL
    assert (alone - last).abs().max().item() > 1e-3
