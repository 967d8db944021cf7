"""Create checkpoints from nothing: a BPE tokenizer trained on the corpus and a randomly
initialised Llama-family model of a preset shape, saved in HF format with the ImpRAG
config (``imprag model init``). Also the checkpoint content hash used by manifests."""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from imprag_ray.data.io import atomic_dir
from imprag_ray.model.imprag import IMPRAG_CONFIG_NAME, ImpRAGConfig, ImpRAGModel
from imprag_ray.model.presets import ModelPreset

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "[SEP]", "[START]", "[END]", "[MASK]"]
# Template words the tokenizer must know even if the corpus never uses them.
TEMPLATE_TEXT = (
    "Q: A: Is this statement true? true false Provide the answer corresponding to the relation "
    "specified after [SEP] for the entity mentioned before [SEP] Output the Wikipedia page title "
    "of the entity mentioned between [START] and [END] in the given text"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 0):
    """Byte-level BPE (GPT-2 style) trained on ``texts`` -> ``PreTrainedTokenizerFast``.

    Byte-level means any string round-trips, so no input is ever ``<unk>``. A word at the
    start of a text gets the same token as after a space (``add_prefix_space``, the dummy
    prefix of Llama's SentencePiece tokenizers): without it "Lona" opening a slot-filling
    input ("{entity} [SEP] ...") is another token than " Lona" inside a question, and the
    tiny model's implicit query missed it (measured on the demo model: slot-filling template
    recall@1/10 4.0/16.5%, the same prompts with a leading space 24.0/60.0%).

    ``min_frequency``: a merge needs that many uses in ``texts``, so a rare word (a nickname
    used by one or two people) is spelled in pieces that common words share, as a pretrained
    LLM's tokenizer spells a rare name, instead of getting a token of its own whose embedding
    no training text reaches (0 = merge until ``vocab_size``). The eval templates' words
    (``TEMPLATE_TEXT``) stay whole tokens all the same.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    # ...and decoding drops that one space again, as Llama's decoder does (decode(encode(s)) == s)
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Fuse(), decoders.Strip(content=" ", left=1, right=0)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_with_templates(texts, max(1, min_frequency)), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )


def _with_templates(texts: Iterable[str], times: int = 1) -> Iterable[str]:
    """The templates' words as often as a merge needs: each stays one token however rare."""
    for _ in range(times):
        yield TEMPLATE_TEXT
    yield from texts


def tokenizer_texts(corpus: str | os.PathLike, task_files: Iterable[str | os.PathLike] = ()):
    """Texts a tokenizer should learn: every passage ("title: text") plus the inputs and
    answers of KILT task files (questions use words the corpus never does)."""
    import json

    from imprag_ray.data.readers import iter_corpus
    from imprag_ray.data.templates import format_passage

    for passage in iter_corpus(corpus):
        yield format_passage(passage)
    for path in task_files:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    answers = [o.get("answer", "") for o in row.get("output", []) if isinstance(o, dict)]
                    yield " ".join([str(row.get("input", ""))] + [str(a) for a in answers])


def init_checkpoint(
    preset: ModelPreset,
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    vocab_size: int | None = None,
    min_frequency: int = 0,
) -> Path:
    """Train a tokenizer on ``texts``, build a random model of ``preset``'s shape and save
    both (plus ``imprag_config.json``) to ``out_dir`` atomically. Returns ``out_dir``."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(texts, vocab_size or preset.vocab_size, min_frequency)
    hf_config = preset.hf_config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    with torch.no_grad():
        if preset.embedding_init_std is not None:
            lm.get_input_embeddings().weight.normal_(0.0, preset.embedding_init_std)
        if preset.first_o_proj_init_std is not None:
            lm.model.layers[0].self_attn.o_proj.weight.normal_(0.0, preset.first_o_proj_init_std)
    config = ImpRAGConfig(
        preset.retrieval_layer,
        preset.reader_last_layer,
        preset.max_passage_tokens,
        preset.num_passages,
    )
    model = ImpRAGModel(lm, config)
    with atomic_dir(out_dir) as tmp:  # refuses a non-empty out_dir
        model.write_files(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def mean_init_unused_rows(model: ImpRAGModel, used_ids: Iterable[int]) -> int:
    """Give every input-embedding row whose token is not in ``used_ids`` the mean of the used
    rows, as new tokens of a pretrained vocabulary are initialised (Hewitt 2021); returns how
    many rows changed.

    A tiny model trained from a random init keeps random rows, as loud as trained ones, for
    tokens no text of its worlds uses (the template words its tokenizer was given, such as
    the slot-filling instruction's "Provide", "corresponding", "[SEP]"). They are noise in
    every prompt that holds them: on the demo's ImpRAG model, slot-filling recall@1/10 was
    14/52.5% with them and 73/96.5% with the mean (measured).
    """
    table = model.lm.get_input_embeddings().weight
    used = torch.zeros(table.shape[0], dtype=torch.bool)
    used[torch.tensor(sorted(set(used_ids)), dtype=torch.long)] = True
    if not used.any():
        raise ValueError("no used token ids: the mean of no rows is undefined")
    with torch.no_grad():
        table[~used] = table[used].float().mean(0).to(table.dtype)
    return int((~used).sum())


def used_token_ids(tokenizer, texts: Iterable[str], batch: int = 2048) -> set[int]:
    """Ids of every token the tokenizer produces for ``texts``."""
    used: set[int] = set()
    texts = iter(texts)
    while chunk := list(itertools.islice(texts, batch)):
        used.update(i for ids in tokenizer(chunk)["input_ids"] for i in ids)
    return used


# Pad tokens to use when a tokenizer names none (Meta's Llama-3 snapshots name none): the
# first of these in the vocabulary, else the eos token. Pad positions are always masked, so
# any id works; a token no text contains keeps logs and PAD-slot checks unambiguous.
PAD_FALLBACKS = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<pad>")


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved next to a checkpoint (right padding, as the model expects).

    A tokenizer without a pad token (Llama-3) gets one of :data:`PAD_FALLBACKS` (else its
    eos token), so every batch can be padded.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "right"
    if tok.pad_token_id is None:
        vocab = tok.get_vocab()
        tok.pad_token = next((t for t in PAD_FALLBACKS if t in vocab), tok.eos_token)
    if tok.pad_token_id is None:
        raise ValueError(f"{path}: the tokenizer has neither a pad nor an eos token; add one to "
                         "tokenizer_config.json (pad_token)")
    return tok


def stop_token_ids(path: str | os.PathLike, tokenizer=None) -> list[int]:
    """Every id that ends a generated answer: ``eos_token_id`` of generation_config.json (a
    list in instruct snapshots, e.g. ``<|end_of_text|>``, ``<|eom_id|>``, ``<|eot_id|>``), else of
    config.json, plus the tokenizer's eos token; deduplicated, in that order."""
    import json

    path = Path(path)
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        file = path / name
        if not file.exists():
            continue
        eos = json.loads(file.read_text()).get("eos_token_id")
        if eos is not None:
            ids += eos if isinstance(eos, list) else [eos]
            break
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return [int(i) for i in dict.fromkeys(ids)]


# Files besides the weights that change what a checkpoint computes or emits, hashed with
# them: the model and ImpRAG configs; the tokenizer (another vocabulary, merges or special
# tokens turn the same text into other ids, so an index of its passages and the queries of
# the model no longer meet; HF fast (tokenizer.json), SentencePiece (tokenizer.model) and
# BPE/WordPiece (vocab/merges) layouts); the chat template (the prompts it builds); and
# generation_config.json (eos ids, where answers stop).
HASHED_FILES = (
    "config.json",
    IMPRAG_CONFIG_NAME,
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def checkpoint_hash(path: str | os.PathLike) -> str:
    """sha256 over the weight files, configs, tokenizer files and generation config of a
    checkpoint (:data:`HASHED_FILES` present in it), each as its name, size and bytes, in
    name order: the same directory contents give the same hash on any machine.

    Indexes and serving replicas record it so a mismatched pairing is refused.
    """
    path = Path(path)
    names = sorted(
        p.name
        for p in path.iterdir()
        if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name in HASHED_FILES)
    )
    if not any(n.endswith((".safetensors", ".bin")) for n in names):
        raise FileNotFoundError(f"{path}: no model weights (*.safetensors / *.bin) found")
    digest = hashlib.sha256()
    for name in names:
        # name and size first: the boundary between two files' bytes is unambiguous
        digest.update(f"{name}\0{(path / name).stat().st_size}\0".encode())
        with open(path / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
