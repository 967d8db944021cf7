"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for ImpRAG training (torch only, no Ray).

ImpRAGModel runs each decoder layer's projections and norms itself (layer-group
attention, arXiv 2506.02279 §3.1) and the recipe calls ``embed_passages`` and teacher
scoring outside ``forward``. So the FSDP units here are the modules the model calls:
every module that holds parameters directly (q/k/v/o projections, MLP projections,
norms, embeddings; a tied embedding and LM head form one unit), plus the parameter-less
root. Whatever path calls a module, its hooks all-gather the weights first and free
them after; backward reduce-scatters the gradients.

FSDP's collectives run per module call, so every rank must make the same module calls in
the same order: :class:`imprag_ray.pipelines.train_worker.DistributedRecipe` pads the
data-dependent calls (passage reading, retrieval loss, teacher scoring) for that.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def shard_model(model: nn.Module, device: torch.device, *, bf16: bool = False) -> nn.Module:
    """Shard ``model`` (an ImpRAGModel, in place) over all ranks of the default group.

    ``bf16``: mixed precision (``model.dtype: bfloat16``): the fp32 parameters stay the
    sharded master copy; each unit's all-gather casts them to bf16 for forward/backward and
    gradients are reduce-scattered in fp32 (``MixedPrecisionPolicy``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kw = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
    lm = model.lm
    embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    grouped = {id(embed), id(head)} if tied else set()
    for module in model.modules():
        if module is model or id(module) in grouped:
            continue
        if any(True for _ in module.parameters(recurse=False)):
            fully_shard(module, **kw)
    if tied:
        fully_shard([embed, head], **kw)
    fully_shard(model, **kw)
    # The root must be initialised before any non-forward call (embed_passages) runs.
    model._get_fsdp_state()._lazy_init()
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state dict on CPU on rank 0, {} elsewhere (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded tensor gathered to CPU: the same
    format as a plain optimizer's (collective; all ranks get it)."""
    from torch.distributed.tensor import DTensor

    sd = optimizer.state_dict()
    state = {
        key: {n: (v.full_tensor().cpu() if isinstance(v, DTensor) else v) for n, v in entry.items()}
        for key, entry in sd["state"].items()
    }
    return {**sd, "state": state}


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, full: dict) -> None:
    """Load a plain optimizer state dict (full tensors) into an optimizer over sharded
    parameters: each state tensor shaped like its parameter is sharded like it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for key, entry in full["state"].items():
        p = params[int(key)]
        state[key] = {
            n: (
                distribute_tensor(v.to(p.device, p.dtype), p.device_mesh, p.placements)
                if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape
                else v
            )
            for n, v in entry.items()
        }
    optimizer.load_state_dict({**full, "state": state})


def plain_copy(model: nn.Module, state: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """An unsharded ImpRAGModel with the weights ``state`` (from :func:`full_state`) and
    the buffers of ``model`` (rank-local work: evaluation, checkpoint writing)."""
    from transformers import AutoModelForCausalLM

    from imprag_ray.model.imprag import ImpRAGModel

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(model.lm.config)
    copy = ImpRAGModel(lm, model.imprag_config)
    copy.load_state_dict(state, strict=False, assign=True)
    for name, buf in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        sub = copy.get_submodule(owner)
        sub._buffers[leaf] = buf.detach().clone()
    if getattr(lm.config, "tie_word_embeddings", False):
        lm.get_output_embeddings().weight = lm.get_input_embeddings().weight
    missing = [n for n, p in copy.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"the gathered FSDP state lacks {missing[:3]}")
    return copy.to(device).eval()
