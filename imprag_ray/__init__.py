"""imprag-ray: train and serve ImpRAG models (arXiv 2506.02279) on Ray.

The Ray-free core lives in :mod:`imprag_ray.model`, :mod:`imprag_ray.data` and
:mod:`imprag_ray.index`; Ray is applied at the edges (training, Ray Data, Serve).
"""

__version__ = "0.1.0"
