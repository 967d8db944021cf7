"""Evaluation: exact match and retrieval recall@k over KILT-style task files (Ray-free)."""
