"""The retriever part of an ImpRAG checkpoint alone: layers 0..b-1 plus layer b's
input norm and q/k projections (arXiv 2506.02279 §3, "bottom" group; DESIGN §1).

Corpus encoding and stage-1 query encoding need nothing above layer b's projections,
so encoder replicas load only those weights (for Llama-3.2-3B with b=7: 7 of 28
layers). :class:`BottomModel` subclasses :class:`ImpRAGModel` and inherits its
``embed_passages`` / ``embed_queries`` / ``encode_prompt`` code unchanged, so its
embeddings are the full model's, computed by the same operations.

Weights are read tensor by tensor from the checkpoint's ``*.safetensors`` files (only
the needed keys; ``*.bin`` checkpoints are read whole, then filtered).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from imprag_ray.model.imprag import IMPRAG_CONFIG_NAME, SUPPORTED_MODEL_TYPES, ImpRAGConfig, ImpRAGModel

# Sub-modules of layer b the embeddings use; the rest of layer b is dropped.
LAYER_B_KEEP = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj")


class _BottomLM(nn.Module):
    """Stands in for the HF causal LM: ``.model`` (truncated decoder) and ``.config``."""

    def __init__(self, model: nn.Module, config):
        super().__init__()
        self.model = model
        self.config = config


class BottomModel(ImpRAGModel):
    """Layers 0..b-1 + layer b's norm and q/k projections of an ImpRAG checkpoint.

    Supports the embedding methods of :class:`ImpRAGModel` (``embed_passages``,
    ``embed_queries``, ``encode_prompt``); reading and generation need the full model.
    """

    def __init__(self, lm: _BottomLM, config: ImpRAGConfig):
        nn.Module.__init__(self)  # ImpRAGModel.__init__ checks t < N, which needs all layers
        model_type = getattr(lm.config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported; use one of {SUPPORTED_MODEL_TYPES}"
            )
        self.lm = lm
        self.imprag_config = config

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        path: str | os.PathLike,
        *,
        retrieval_layer: int | None = None,
        post_rope: bool | None = None,
        max_passage_tokens: int | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> BottomModel:
        """Load only the bottom group of the checkpoint at ``path``.

        ``retrieval_layer`` (b), ``post_rope`` and ``max_passage_tokens`` (l_max) default to
        ``imprag_config.json``. A plain HF snapshot (no such file, e.g. a base Llama-3) needs
        ``retrieval_layer`` and ``max_passage_tokens``; its reader split t is unused here.
        Raises FileNotFoundError (no weights) and ValueError (bad settings / missing keys).
        """
        from transformers import AutoConfig, AutoModel

        path = Path(path)
        hf_config = AutoConfig.from_pretrained(path)
        config = _bottom_config(path, hf_config, retrieval_layer, post_rope, max_passage_tokens)
        b = config.retrieval_layer
        n = hf_config.num_hidden_layers
        if not 0 <= b < n:
            raise ValueError(f"retrieval_layer b={b} must be in 0..{n - 1} for this {n}-layer checkpoint")
        cut = copy.deepcopy(hf_config)
        cut.num_hidden_layers = b + 1
        if hasattr(cut, "layer_types") and cut.layer_types is not None:
            cut.layer_types = list(cut.layer_types)[: b + 1]
        dtype = dtype or torch.float32
        with torch.device("meta"):
            decoder = AutoModel.from_config(cut, dtype=dtype)
        _drop_unused(decoder, b)
        device = torch.device(device or "cpu")
        decoder.to_empty(device=device)
        # Non-persistent buffers (RoPE inverse frequencies) are not in the checkpoint:
        # rebuild the rotary embedding on the real device.
        with torch.device("cpu"):
            decoder.rotary_emb = type(decoder.rotary_emb)(config=cut).to(device)
        _load_weights(decoder, path, dtype)
        model = cls(_BottomLM(decoder, hf_config), config)
        return model.eval()

    @property
    def loaded_layers(self) -> int:
        """Decoder layers held (b full layers + layer b's projections)."""
        return len(self.layers)

    def forward(self, *args, **kwargs):  # type: ignore[override]
        raise NotImplementedError("BottomModel only embeds; load ImpRAGModel to read and generate")

    def generate(self, *args, **kwargs):  # type: ignore[override]
        raise NotImplementedError("BottomModel only embeds; load ImpRAGModel to read and generate")


def _bottom_config(path: Path, hf_config, retrieval_layer, post_rope, max_passage_tokens) -> ImpRAGConfig:
    """The ImpRAG settings of a bottom model: the arguments, else ``imprag_config.json``."""
    conf = path / IMPRAG_CONFIG_NAME
    saved = json.loads(conf.read_text()) if conf.exists() else {}
    given = {
        "retrieval_layer": retrieval_layer,
        "post_rope": post_rope,
        "max_passage_tokens": max_passage_tokens,
    }
    saved.update({k: v for k, v in given.items() if v is not None})
    missing = [k for k in ("retrieval_layer", "max_passage_tokens") if saved.get(k) is None]
    if missing:
        raise ValueError(
            f"{path}: no {IMPRAG_CONFIG_NAME} (a plain HF snapshot?) and {missing} not given; pass "
            "them (retrieval_layer=b, max_passage_tokens=l_max) or use an ImpRAG checkpoint"
        )
    # The bottom group never reads passages: without a saved t, the last layer stands in.
    saved.setdefault("reader_last_layer", hf_config.num_hidden_layers - 1)
    return ImpRAGConfig(**saved)


def _drop_unused(decoder: nn.Module, b: int) -> None:
    """Remove the final norm and everything of layer b but its norm and q/k projections."""
    decoder.norm = None
    layer = decoder.layers[b]
    for name in ("mlp", "post_attention_layernorm"):
        if hasattr(layer, name):
            setattr(layer, name, None)
    for name in ("v_proj", "o_proj"):
        if hasattr(layer.self_attn, name):
            setattr(layer.self_attn, name, None)


def _checkpoint_tensors(path: Path, wanted: set[str]):
    """Yield (name, tensor) for the checkpoint keys in ``wanted`` only."""
    st_files = sorted(path.glob("*.safetensors"))
    if st_files:
        from safetensors import safe_open

        for file in st_files:
            with safe_open(str(file), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open is not iterable
                    if key in wanted:
                        yield key, fh.get_tensor(key)
        return
    bin_files = sorted(path.glob("*.bin"))
    if not bin_files:
        raise FileNotFoundError(f"{path}: no model weights (*.safetensors / *.bin) found")
    for file in bin_files:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        for key, value in state.items():
            if key in wanted:
                yield key, value


def _load_weights(decoder: nn.Module, path: Path, dtype: torch.dtype) -> None:
    """Copy checkpoint tensors ``model.<name>`` into ``decoder.<name>``; all must be found."""
    params = dict(decoder.named_parameters())
    wanted = {f"model.{name}": name for name in params}
    found: set[str] = set()
    with torch.no_grad():
        for key, tensor in _checkpoint_tensors(path, set(wanted)):
            target = params[wanted[key]]
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(
                    f"{path}: {key} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
                )
            target.copy_(tensor.to(dtype))
            found.add(wanted[key])
    missing = sorted(set(params) - found)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {missing[:3]}{'...' if len(missing) > 3 else ''}")
