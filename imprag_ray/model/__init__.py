"""ImpRAG model core (Ray-free, vLLM-free): attention pattern, embeddings, losses,
reference generation engine. See DESIGN §1 and arXiv 2506.02279 §3."""

from imprag_ray.model.attention import LayerKV, PassageKV
from imprag_ray.model.imprag import ImpRAGConfig, ImpRAGModel, ImpRAGOutput, PromptState

__all__ = [
    "ImpRAGConfig",
    "ImpRAGModel",
    "ImpRAGOutput",
    "LayerKV",
    "PassageKV",
    "PromptState",
]
