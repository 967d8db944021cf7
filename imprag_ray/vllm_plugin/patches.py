"""Work-arounds for vLLM 0.32 bugs that ImpRAG's request shapes hit (worker side).

Seeded sampling + chunked prefill on CPU: after a step in which a seeded request was only
partly prefilled, vLLM's model runner rewinds that request's generator with
``gen.set_offset(gen.get_offset() - 4)``, which CPU generators do not support
("CPU Generator does not use offset"): the worker dies. ImpRAG requests (k * l_max
region + prompt) are chunked whenever they exceed ``max_num_batched_tokens``.
The patch snapshots the state of such CPU generators before sampling and restores it
in place of the offset rewind: the same effect (the discarded sample consumes no
randomness), so seeded outputs stay reproducible. CUDA generators are left to vLLM.
"""

from __future__ import annotations

import functools

import numpy as np

_APPLIED = False


def apply_cpu_seed_patch() -> None:
    """Patch ``GPUModelRunner`` (CPUModelRunner's base) once per process."""
    global _APPLIED
    if _APPLIED:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    sample, bookkeeping = GPUModelRunner._sample, GPUModelRunner._bookkeeping_sync

    @functools.wraps(sample)
    def _sample(self, *args, **kwargs):
        snapshots = {}
        num_reqs = self.input_batch.num_reqs
        for i in np.nonzero(self.discard_request_mask.np[:num_reqs])[0]:
            gen = self.input_batch.generators.get(int(i))
            if gen is not None and gen.device.type == "cpu":
                snapshots[int(i)] = (gen, gen.get_state())
        self._imprag_generator_snapshots = snapshots
        return sample(self, *args, **kwargs)

    @functools.wraps(bookkeeping)
    def _bookkeeping_sync(self, *args, **kwargs):
        snapshots = getattr(self, "_imprag_generator_snapshots", {})
        self._imprag_generator_snapshots = {}
        generators = self.input_batch.generators
        for i in snapshots:  # hidden from vLLM's offset rewind
            generators.pop(i, None)
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            for i, (gen, state) in snapshots.items():
                gen.set_state(state)
                generators[i] = gen

    GPUModelRunner._sample = _sample  # type: ignore[method-assign]
    GPUModelRunner._bookkeeping_sync = _bookkeeping_sync  # type: ignore[method-assign]
    _APPLIED = True
