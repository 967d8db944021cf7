"""Generation engines behind one interface (stage 2 of ImpRAG inference).

``torch``: the reference engine of :mod:`imprag_ray.model.generation` (exact, any device).
``vllm``: vLLM with the out-of-tree ImpRAG model (:mod:`imprag_ray.vllm_plugin`).
Batch inference and the Serve generation stage pick one by name (``build_engine``).
"""

from imprag_ray.engine.base import (
    ENGINE_KINDS,
    EngineError,
    GenerationEngine,
    GenerationRequest,
    GenerationResult,
    RequestAbortedError,
    Sampling,
    build_engine,
)

__all__ = [
    "ENGINE_KINDS",
    "EngineError",
    "GenerationEngine",
    "GenerationRequest",
    "GenerationResult",
    "RequestAbortedError",
    "Sampling",
    "build_engine",
]
