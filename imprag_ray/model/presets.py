"""Model shapes: one parameterised builder plus zero-argument presets.

``tiny()`` is what the demo and the tests train from scratch on a laptop; the Llama-3
presets describe the paper's models (b=7, t=19 for Llama-3.2-3B; b=7, t=23 for
Llama-3.1-8B) so cluster configs and GPU shape checks use exactly those shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class ModelPreset:
    """Architecture + ImpRAG layer split of one model size."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    retrieval_layer: int  # b
    reader_last_layer: int  # t
    max_passage_tokens: int = 64  # l_max
    num_passages: int = 10  # k
    max_position_embeddings: int = 8192
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # std of the input embedding table at init (None = initializer_range, the HF default);
    # only for untied models (a tied table is also the LM head, whose init it would blow up)
    embedding_init_std: float | None = None
    # std of layer 0's attention output projection (o_proj) at init (None = initializer_range)
    first_o_proj_init_std: float | None = None

    def __post_init__(self) -> None:
        for key in ("embedding_init_std", "first_o_proj_init_std"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"{key} must be > 0, got {value}")
        if self.embedding_init_std is not None and self.tie_word_embeddings:
            raise ValueError(
                "embedding_init_std needs tie_word_embeddings=False (a tied table "
                "is also the LM head); drop one of the two"
            )

    def hf_config(self, vocab_size: int | None = None, **special_ids: int):
        """A transformers ``LlamaConfig`` of this shape (vocab from the tokenizer if given)."""
        from transformers import LlamaConfig

        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
        return LlamaConfig(
            vocab_size=vocab_size or self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters=rope,
            tie_word_embeddings=self.tie_word_embeddings,
            rms_norm_eps=1e-5,
            initializer_range=self.initializer_range,
            **special_ids,
        )


def llama_like(**overrides) -> ModelPreset:
    """The fully parameterised builder (every field can be overridden)."""
    return replace(tiny(), **overrides)


def tiny() -> ModelPreset:
    """~3M parameters (tied embeddings): trains from random init on the 2-core demo box in minutes."""
    return ModelPreset(
        name="tiny",
        hidden_size=192,
        intermediate_size=512,
        num_layers=6,
        num_heads=6,
        num_kv_heads=2,  # a 64-dim embedding; a base with 6 read worse (pretrain_base.TOKENIZER_MIN_FREQUENCY)
        head_dim=32,
        vocab_size=4096,
        # b=1: the prompt reads the passages from layer 1 on. With b=2 this model learned
        # neither to copy from the passage slots (no progress in 600 steps vs ~250 with b=1,
        # measured on a synthetic copy task) nor to retrieve well (demo QA R@10 10% vs 54.5%
        # with b=1 after 400 steps). Stage 1 of imprag model pretrain-base (its init, a tokenizer of
        # minimum frequency 30) at b=2: dev QA EM 2%, recall@1/4/10 11/23/34% at step 2,100 against
        # 21%, 56/72/79% at b=1. The price of b=1: the implicit query is layer 0's attention at the
        # last prompt token, a bag of the prompt's tokens weighed by identity and distance alone,
        # which cannot use the markers around a mention (README, what the tiny demo shows).
        retrieval_layer=1,
        reader_last_layer=4,
        max_passage_tokens=64,
        num_passages=4,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        # Tied, with the HF init (std 0.02). Measured alternatives (tiny shape, b=1, t=4):
        # * untied, input table std 0.4 (embedding_init_std): layer 0's random outputs no
        #   longer swamp the token embeddings, so passage keys at layer b=1 still tell tokens
        #   apart and reading starts (held-out "List the facts" value accuracy, gold passage in
        #   the slots, lr 1e-3, batch 16: 19% after 600 steps vs 2-3% = guessing after 1,200
        #   steps with this init); but the demo's ImpRAG job (300 steps) then ended at QA
        #   recall@10 0% (also with std 0.1) vs 36% with this init, whose layer-1 state of the
        #   last prompt token is mostly layer 0's average over the prompt (a bag of words);
        # * the same plus layer 0's o_proj at std 0.2 (first_o_proj_init_std), so that layer 0's
        #   average is as loud as the token: value accuracy 77% after 900 steps, and the
        #   demo's ImpRAG job ended at QA recall@1/4/10 8.5/17.5/30% (this init: 10.5/21.5/36%).
        tie_word_embeddings=True,
    )


def medium() -> ModelPreset:
    """~54M parameters (12 layers, hidden 512, 8 q / 2 kv heads, tied), k=10, l_max=128:
    the benchmark shape between tiny and Llama-3 (b, t at the 3B split's depth ratio)."""
    return ModelPreset(
        name="medium",
        hidden_size=512,
        intermediate_size=2048,
        num_layers=12,
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
        vocab_size=16384,
        retrieval_layer=3,
        reader_last_layer=8,
        max_passage_tokens=128,
        num_passages=10,
        max_position_embeddings=4096,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    )


def llama3_2_3b() -> ModelPreset:
    """Llama-3.2-3B shape (28 layers, 24 q / 8 kv heads); paper split b=7, t=19."""
    return ModelPreset(
        name="llama3.2-3b",
        hidden_size=3072,
        intermediate_size=8192,
        num_layers=28,
        num_heads=24,
        num_kv_heads=8,
        head_dim=128,
        vocab_size=128256,
        retrieval_layer=7,
        reader_last_layer=19,
        max_passage_tokens=192,
        num_passages=10,
        max_position_embeddings=131072,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=True,
    )


def llama3_1_8b() -> ModelPreset:
    """Llama-3.1-8B shape (32 layers, 32 q / 8 kv heads); paper split b=7, t=23."""
    return replace(
        llama3_2_3b(),
        name="llama3.1-8b",
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        reader_last_layer=23,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False,
    )


PRESETS = {"tiny": tiny, "medium": medium, "llama3.2-3b": llama3_2_3b, "llama3.1-8b": llama3_1_8b}


def _field_parser(annotation: str):
    """How ``--set`` parses a field of this annotation; None = not settable (name, dicts)."""
    base = annotation.replace(" | None", "")
    return {"bool": bool, "int": int, "float": float}.get(base)


def with_settings(preset: ModelPreset, settings: list[str]) -> ModelPreset:
    """``preset`` with ``field=value`` settings applied (``imprag model init --set``).

    Values parse by the field's type: int, float, true/false, and none for the optional
    init stds; the name and dict fields (rope_scaling) cannot be set this way."""
    types = {f.name: f.type for f in fields(ModelPreset)}
    parsers = {name: _field_parser(annotation) for name, annotation in types.items()}
    settable = sorted(k for k, parse in parsers.items() if parse)
    changes: dict = {}
    for item in settings:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        parse = parsers.get(key)
        if not sep or parse is None:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {settable}")
        try:
            if types[key].endswith("| None") and raw.lower() in ("none", "null"):
                value = None
            elif parse is bool:
                if raw.lower() not in ("true", "false"):
                    raise ValueError
                value = raw.lower() == "true"
            else:
                value = parse(raw)
        except ValueError:
            kind = "true/false" if parse is bool else parse.__name__
            raise ValueError(f"--set {key}={raw!r}: {key} takes a {kind} value") from None
        changes[key] = value
    return replace(preset, **changes)


def get_preset(name: str) -> ModelPreset:
    """Preset by name; unknown names list the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
