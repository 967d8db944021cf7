"""Worker extension: push new weights into a running vLLM engine (no restart).

Mixed into every vLLM worker (``worker_extension_cls``) and driven from the engine by
``collective_rpc("imprag_load_weights", args=(source,))``. ``source`` is a checkpoint
directory on a filesystem the workers see, or the bytes of ``torch.save(state_dict)``
(for workers on other machines). The weights go through the worker's
``reload_weights(..., is_checkpoint_format=True)``: the model's own ``load_weights``
maps HF names (q/k/v -> qkv_proj, ...) as at start-up. The caller resets the prefix
cache afterwards: cached passage KV belongs to the old weights.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import torch


def iter_checkpoint_weights(source: str | bytes) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a HF checkpoint directory (*.safetensors, else *.bin)
    or of ``torch.save`` bytes of a state dict."""
    if isinstance(source, bytes | bytearray):
        state = torch.load(io.BytesIO(source), map_location="cpu", weights_only=True)
        yield from state.items()
        return
    path = Path(source)
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors.torch import safe_open

        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as fh:
                for name in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                    yield name, fh.get_tensor(name)
        return
    bins = sorted(path.glob("*.bin"))
    if not bins:
        raise FileNotFoundError(f"{path}: no *.safetensors or *.bin weights")
    for file in bins:
        yield from torch.load(file, map_location="cpu", weights_only=True).items()


class ImpRAGWorkerExtension:
    """Methods added to vLLM's worker class (``self`` is the worker)."""

    def imprag_load_weights(self, source: str | bytes) -> int:
        """Load all weights from ``source`` in place; returns the number of tensors."""
        count = 0

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for item in iter_checkpoint_weights(source):
                count += 1
                yield item

        self.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)  # type: ignore[attr-defined]
        return count

    def imprag_attention_stats(self) -> dict[str, int]:
        """Query rows (and calls) the ImpRAG attention layers ran through vLLM's paged
        kernel and through the gather path, summed over layers since start-up."""
        return dict(self.model_runner.model.flags.stats)  # type: ignore[attr-defined]
