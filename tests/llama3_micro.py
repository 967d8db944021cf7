"""A micro Llama-3.x snapshot built in code, with every property of a real one that our code
must handle, and nothing of ours in it.

- transformers ``save_pretrained`` layout: config.json, generation_config.json,
  model.safetensors (bf16, as Meta's snapshots are stored), tokenizer.json +
  tokenizer_config.json (+ chat_template.jinja); no ``imprag_config.json``;
- 28 layers, so the paper's b=7, t=19 for Llama-3.2-3B stand as written;
- ``rope_type: llama3`` scaling, rope_theta 500000, max_position_embeddings 131072;
- tied embeddings (as Llama-3.2-1B/3B), GQA (4 query / 2 KV heads) and a head size that is
  not hidden / heads (32 vs 64 / 4);
- a byte-level BPE tokenizer with Llama-3's pre-tokenizer regex, ``<|begin_of_text|>``
  added by the post-processor, and Llama-3's 256 special tokens after the regular vocabulary
  (``<|finetune_right_pad_id|>``, ``<|start_header_id|>``, ``<|eot_id|>``, ...);
- no pad token; an instruct snapshot lists several eos ids in generation_config.json
  (``<|end_of_text|>``, ``<|eom_id|>``, ``<|eot_id|>``) and has Llama-3's chat template.

Random weights would almost never emit ``<|eot_id|>``, so the instruct snapshot is trained
for a few steps (fp32, before it is saved in bf16) to reply to a prompt with one word
and ``<|eot_id|>``: greedy decoding then stops at ``<|eot_id|>`` after a few tokens, as an
instruct model's does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 28, 4, 2, 32
B, T = 7, 19  # Llama-3.2-3B's split in the paper
# Llama-3's pre-tokenizer split (tokenizer.json of Meta's snapshots)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NAMED_SPECIALS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    2: "<|reserved_special_token_0|>",
    3: "<|reserved_special_token_1|>",
    4: "<|finetune_right_pad_id|>",
    5: "<|reserved_special_token_2|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
    10: "<|python_tag|>",
}
SPECIALS = [NAMED_SPECIALS.get(i, f"<|reserved_special_token_{i - 8}|>") for i in range(256)]
# Llama-3 (8B-Instruct) chat template
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """A Llama-3-style byte-level BPE (``PreTrainedTokenizerFast``) with no pad token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(SPECIALS)  # ids vocab_size .. vocab_size + 255, as 128000.. in Llama-3
    bos = SPECIALS[0]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=SPECIALS[1], model_max_length=131072
    )


def build_snapshot(
    out_dir: str | Path, texts: Iterable[str], *, instruct: bool = True, seed: int = 0, vocab_size: int = 1024
) -> Path:
    """Write a micro Llama-3.2-style snapshot (instruct: chat template, eos ``<|eot_id|>`` and
    three eos ids in generation_config.json) to ``out_dir``; returns it."""
    import torch

    out = Path(out_dir)
    texts = list(texts)
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # a 64-wide model: more threads only contend (measured 33 s vs 307 s on a loaded box)
    try:
        return _build(out, texts, instruct, seed, vocab_size)
    finally:
        torch.set_num_threads(threads)


def _build(out: Path, texts: list[str], instruct: bool, seed: int, vocab_size: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    tokenizer = build_tokenizer(texts, vocab_size)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIALS[:11]}
    eos_ids = [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]
    if instruct:
        tokenizer.eos_token = "<|eot_id|>"
        tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=131072,
        rope_parameters=dict(ROPE),
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        initializer_range=0.02,
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=eos_ids if instruct else ids["<|end_of_text|>"],
    )
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if instruct:
        _teach_to_stop(lm, tokenizer, texts, ids["<|eot_id|>"])
    lm.generation_config = GenerationConfig(
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=eos_ids if instruct else ids["<|end_of_text|>"],
        do_sample=True,
        temperature=0.6,
        top_p=0.9,
    )
    lm.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _teach_to_stop(lm, tokenizer, texts: list[str], eot: int, max_steps: int = 400) -> None:
    """fp32 AdamW steps (until the loss stays below 0.01) on prompts (chat turns and plain ``Q: ... A:`` prompts) whose reply
    is one token and ``<|eot_id|>``, so greedy decoding answers briefly and stops at
    ``<|eot_id|>``, as an instruct model does (a random model repeats one token and never emits
    it). Half of the rows read two passages through ImpRAG's reader layers (b=7, t=19, as an
    ImpRAG job of this snapshot will), so the stop holds with retrieved passages too."""
    import torch

    from imprag_ray.model.imprag import ImpRAGConfig, ImpRAGModel

    # One reply for every prompt, a word then <|eot_id|>: with varied or longer replies this
    # small model learnt "<|eot_id|>" as the likeliest first token, or never to emit it.
    reply = [tokenizer(" " + texts[0], add_special_tokens=False)["input_ids"][0], eot]
    rows = []
    for i, text in enumerate(texts[:64]):
        if i % 2:  # a chat turn, or the plain prompt a base-style template gives (bos + text)
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": text[:80]}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )["input_ids"]
        else:
            prompt = tokenizer(f"Q: {text[:80]} A:")["input_ids"]
        rows.append((prompt, reply))
    l_max, k = 32, 2
    passages = [tokenizer(t, add_special_tokens=False)["input_ids"][:l_max] for t in texts]
    model = ImpRAGModel(lm, ImpRAGConfig(B, T, l_max, k))
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    model.train()
    gen = torch.Generator().manual_seed(0)
    recent: list[float] = []
    for step in range(max_steps):
        batch = [rows[int(i)] for i in torch.randint(len(rows), (8,), generator=gen)]
        width = max(len(p) + len(r) for p, r in batch)
        ids = torch.full((len(batch), width), eot)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, (p, r) in enumerate(batch):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
            mask[i, : len(p) + len(r)] = 1
        p_ids = p_mask = None
        if step % 2:  # [8, k, l_max] random passages
            p_ids = torch.zeros(len(batch), k, l_max, dtype=torch.long)
            p_mask = torch.zeros_like(p_ids)
            for i in range(len(batch)):
                for j in range(k):
                    tok = passages[int(torch.randint(len(passages), (1,), generator=gen))]
                    p_ids[i, j, : len(tok)], p_mask[i, j, : len(tok)] = torch.tensor(tok), 1
        loss = model(ids, mask, p_ids, p_mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        recent = [*recent[-9:], loss.item()]
        if len(recent) == 10 and max(recent) < 0.01:  # both tokens of the reply are near-certain
            break
    model.eval()


def read_generation_eos(path: str | Path) -> list[int]:
    """The eos ids of a snapshot's generation_config.json (a list, as Meta's instruct files have)."""
    eos = json.loads((Path(path) / "generation_config.json").read_text())["eos_token_id"]
    return eos if isinstance(eos, list) else [eos]
