"""ImpRAG inside vLLM: the only package of imprag_ray that imports vLLM.

* :mod:`.layout`: the fixed passage-region layout (prompt after ``k * l_max`` slots;
  passage / PAD flags carried in the token ids). No vLLM import.
* :mod:`.attention`: a custom vLLM attention backend applying ImpRAG's reader mask.
* :mod:`.model`: ``ImpRAGLlamaForCausalLM``, vLLM's Llama on that backend.
* :mod:`.worker`: the worker extension that pushes new weights into a running engine.
* :mod:`.engine`: ``VLLMEngine``, the :class:`~imprag_ray.engine.GenerationEngine` on vLLM.

vLLM calls :func:`register` in every process it starts through the
``vllm.general_plugins`` entry point (``pyproject.toml``).
"""

from __future__ import annotations

ARCHITECTURE = "ImpRAGLlamaForCausalLM"


def register() -> None:
    """Register the ImpRAG model and its attention backend with vLLM (idempotent)."""
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "imprag_ray.vllm_plugin.model:ImpRAGLlamaForCausalLM")
    register_backend(AttentionBackendEnum.CUSTOM, "imprag_ray.vllm_plugin.attention.ImpRAGAttentionBackend")
