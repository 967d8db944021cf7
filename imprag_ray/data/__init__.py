"""Data layer: records, corpus/task readers, prompt templates, synthetic world, atomic I/O.

Free of Ray and vLLM (stdlib only; pyarrow is imported lazily for Parquet files).
"""

from imprag_ray.data.readers import iter_corpus, iter_tasks, read_corpus, read_tasks
from imprag_ray.data.records import FORMATS, DataError, Passage, TaskExample
from imprag_ray.data.templates import format_passage, format_prompt, format_target

__all__ = [
    "FORMATS",
    "DataError",
    "Passage",
    "TaskExample",
    "format_passage",
    "format_prompt",
    "format_target",
    "iter_corpus",
    "iter_tasks",
    "read_corpus",
    "read_tasks",
]
