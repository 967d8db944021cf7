"""Checkpoint creation (tokenizer + random model), content hash, presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from imprag_ray.model import ImpRAGModel
from imprag_ray.model.checkpoint import (
    checkpoint_hash,
    init_checkpoint,
    load_tokenizer,
    mean_init_unused_rows,
    used_token_ids,
)
from imprag_ray.model.presets import get_preset, llama3_1_8b, llama3_2_3b, llama_like

TEXTS = ["Elfen Arkra: Born in Caselva in 1797, Elfen Arkra was a painter."] * 20


def _init(tmp_path, name="ckpt"):
    shape = llama_like(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2,
                       num_kv_heads=1, head_dim=16, retrieval_layer=0, reader_last_layer=1)
    return init_checkpoint(shape, TEXTS, tmp_path / name, vocab_size=300)


def test_init_writes_a_loadable_checkpoint_with_tokenizer(tmp_path):
    path = _init(tmp_path)
    model = ImpRAGModel.from_pretrained(path)
    tok = load_tokenizer(path)
    assert (model.b, model.t) == (0, 1) and model.lm.config.vocab_size == len(tok)
    assert tok.padding_side == "right" and tok.convert_tokens_to_ids("[SEP]") != tok.unk_token_id
    text = "Q: Where was Elfen Arkra born? A: Caselva"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # byte-level: lossless
    with pytest.raises(FileExistsError, match="not empty"):
        _init(tmp_path)


def test_unused_token_rows_get_the_mean_of_the_used_ones(tmp_path):
    path = _init(tmp_path)
    model, tok = ImpRAGModel.from_pretrained(path), load_tokenizer(path)
    used = used_token_ids(tok, ["Elfen Arkra was a painter.", "Born in Caselva"], batch=1)
    assert used == set(tok("Elfen Arkra was a painter.")["input_ids"] + tok("Born in Caselva")["input_ids"])
    before = model.lm.get_input_embeddings().weight.detach().clone()
    changed = mean_init_unused_rows(model, used)
    after = model.lm.get_input_embeddings().weight.detach()
    rows = sorted(used)
    unused = [i for i in range(before.shape[0]) if i not in used]
    assert changed == len(unused) > 0
    assert torch.equal(after[rows], before[rows])  # trained rows stay as they were
    torch.testing.assert_close(after[unused], before[rows].mean(0).expand(len(unused), -1))
    slot_word = tok.convert_tokens_to_ids("[SEP]")  # a template token no text used
    assert slot_word in unused and not torch.equal(after[slot_word], before[slot_word])
    with pytest.raises(ValueError, match="no used token ids"):
        mean_init_unused_rows(model, [])


def test_checkpoint_hash_follows_the_weights(tmp_path):
    path = _init(tmp_path)
    first = checkpoint_hash(path)
    assert first == checkpoint_hash(path)
    model = ImpRAGModel.from_pretrained(path)
    with torch.no_grad():
        model.layers[0].self_attn.k_proj.weight[0, 0] += 1.0
    model.save_pretrained(tmp_path / "changed")
    assert checkpoint_hash(tmp_path / "changed") != first
    with pytest.raises(FileNotFoundError, match="no model weights"):
        checkpoint_hash(tmp_path)


def test_checkpoint_hash_covers_the_tokenizer_and_generation_config(tmp_path):
    import json
    import shutil

    path = _init(tmp_path)
    first = checkpoint_hash(path)
    copy = Path(shutil.copytree(path, tmp_path / "copy"))
    assert checkpoint_hash(copy) == first  # contents, not paths or mtimes
    changed = []
    tok_config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**tok_config, "pad_token": "</s>"}))
    changed.append(checkpoint_hash(copy))
    vocab = json.loads((copy / "tokenizer.json").read_text())
    vocab["model"]["vocab"]["Caselva"] = len(vocab["model"]["vocab"])  # one more token
    (copy / "tokenizer.json").write_text(json.dumps(vocab))
    changed.append(checkpoint_hash(copy))
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    changed.append(checkpoint_hash(copy))
    (copy / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    changed.append(checkpoint_hash(copy))
    assert len({first, *changed}) == 5  # every change gives a new hash
    (copy / "README.md").write_text("notes")  # files that change nothing computed are not hashed
    assert checkpoint_hash(copy) == changed[-1]


def test_paper_presets_have_the_paper_layer_split():
    p3, p8 = llama3_2_3b(), llama3_1_8b()
    assert (p3.num_layers, p3.retrieval_layer, p3.reader_last_layer) == (28, 7, 19)
    assert (p8.num_layers, p8.retrieval_layer, p8.reader_last_layer) == (32, 7, 23)
    assert p3.num_kv_heads * p3.head_dim == 1024 == p8.num_kv_heads * p8.head_dim  # embedding dim
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("llama-70b")


def test_embedding_init_std_sets_only_the_input_table(tmp_path):
    shape = llama_like(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2, num_kv_heads=1,
                       head_dim=16, retrieval_layer=0, reader_last_layer=1, tie_word_embeddings=False,
                       embedding_init_std=0.4, first_o_proj_init_std=0.2)
    model = ImpRAGModel.from_pretrained(init_checkpoint(shape, TEXTS, tmp_path / "big", vocab_size=300))
    emb, head = model.lm.get_input_embeddings().weight, model.lm.lm_head.weight
    assert emb.data_ptr() != head.data_ptr()
    assert 0.35 < emb.std().item() < 0.45 and 0.015 < head.std().item() < 0.025
    o_proj = [layer.self_attn.o_proj.weight.std().item() for layer in model.layers]
    assert 0.17 < o_proj[0] < 0.23 and all(0.01 < s < 0.03 for s in o_proj[1:])
    shape = llama_like(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2, num_kv_heads=1,
                       head_dim=16, retrieval_layer=0, reader_last_layer=1, embedding_init_std=None)
    plain = ImpRAGModel.from_pretrained(init_checkpoint(shape, TEXTS, tmp_path / "hf", vocab_size=300))
    # None: the HF init (initializer_range) for the input table too
    assert 0.015 < plain.lm.get_input_embeddings().weight.std().item() < 0.025
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        llama_like(tie_word_embeddings=True, embedding_init_std=0.4)
    with pytest.raises(ValueError, match="embedding_init_std must be > 0"):
        llama_like(embedding_init_std=0.0)
    with pytest.raises(ValueError, match="first_o_proj_init_std must be > 0"):
        llama_like(first_o_proj_init_std=-1.0)


def test_min_frequency_spells_rare_words_in_shared_pieces():
    from imprag_ray.model.checkpoint import train_tokenizer

    # nicknames of one prefix + one suffix, each nickname used twice; names used 40 times
    prefixes, suffixes = ["Swift", "Grey", "Iron", "Dark"], ["hood", "foot", "claw", "wing"]
    texts = [f"{p}{s} met Lona Zorkal." for p in prefixes for s in suffixes for _ in range(2)]
    texts += ["Lona Zorkal lived in Caselva."] * 8
    whole = train_tokenizer(texts, 400)
    assert whole.tokenize("Swifthood") == ["\u0120Swifthood"]
    split = train_tokenizer(texts, 400, min_frequency=5)
    pieces = split.tokenize("Swifthood")
    assert len(pieces) > 1 and "".join(pieces) == "\u0120Swifthood"
    assert split.tokenize("Lona Zorkal") == ["\u0120Lona", "\u0120Zorkal"]
    assert split.decode(split("Swifthood met Lona")["input_ids"]) == "Swifthood met Lona"
    # every piece of a rare nickname also spells other nicknames
    other = {tuple(split.tokenize(f"{p}{s}")) for p in prefixes for s in suffixes} - {tuple(pieces)}
    assert all(any(piece in o for o in other) for piece in pieces)
