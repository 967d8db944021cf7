"""GPU check of the Ray-free training recipe at Llama-3.2-3B's shape (``make gpu-check``).

    python -m imprag_ray.bench.gpu_check                       # full shape on CUDA (the GPU box)
    python -m imprag_ray.bench.gpu_check --shape micro --device cpu   # the same script, tiny, on CPU

It runs :class:`~imprag_ray.train.recipe.ImpRAGRecipe` exactly as a training job does, with
random weights of the chosen shape (full: 28 layers, hidden 3072, 24 query / 8 KV heads of 128,
MLP 8192, vocab 128256, tied embeddings, b=7, t=19, k=10, l_max=192) and a synthetic world
written to a temp dir (passages lengthened to fill l_max, a labels teacher built from the gold
passages), in bf16 mixed precision (``model.dtype: bfloat16``: fp32 master weights and AdamW
state, bf16 autocast). Phases, each measured on its own:

* ``setup``: load the checkpoint, move it to the device, build the optimizer;
* ``warmup``: NCE steps; ``distill``: self-distillation steps (teacher scoring of every
  candidate); ``evaluate``: the dev set over the ``eval.corpus_sample`` sub-corpus
  (passage encoding, query embedding, KV-cached decoding);
* ``save``: the checkpoint (bf16 HF weights + fp32 optimizer state); ``resume``: a new recipe
  from it (weights, then optimizer state onto the device) and one more step.

It prints ONE JSON object: per phase the wall seconds, the seconds of each step, peak GPU
memory (``torch.cuda.max_memory_allocated``, reset per phase; null on CPU), and which
scaled-dot-product-attention kernels ran (flash / efficient / cudnn / math, forward and
backward, seen by a dispatch-mode watcher during the phase's first step, the whole
evaluation); ``checks`` (saved dtype, resumed step and optimizer-state placement),
``findings`` (out of memory, a math-kernel fallback on CUDA, errors: reported, never hidden)
and ``ok``. Exit status 0 when every phase ran, else 1.

Imports: torch, transformers (5.x, as pinned: the presets use ``rope_parameters``; with
tokenizers, safetensors, PyYAML) and numpy only; no Ray, vLLM, FAISS (evaluation falls back
to exact torch search), bm25s or pyarrow (``tests/bench/test_gpu_check.py`` runs it with
those blocked).

Time: at full shape on one H100 an estimated 4-8 minutes, most of it disk I/O (a 6.4 GB random
checkpoint written and read twice, 25.6 GB of optimizer state saved and loaded); the training
steps themselves take seconds. Not yet measured on a GPU: no GPU was available when it was
written. Disk: about 40 GB in the temp dir (removed at the end unless ``--keep``). Memory:
fp32 masters + AdamW state are 16 bytes per parameter, 51 GB of the H100's 80 GB.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# ATen op -> SDPA backend (the dispatcher picks one of these under scaled_dot_product_attention)
SDPA_OPS = (
    ("flash_attention_for_cpu", "flash_cpu"),
    ("flash_attention", "flash"),
    ("efficient_attention", "efficient"),
    ("cudnn_attention", "cudnn"),
    ("attention_math", "math"),
    ("fused_attention_overrideable", "overrideable"),
)
PHASES = ("setup", "warmup", "distill", "evaluate", "save", "resume")


def preset_of(shape: str):
    """The model shape: ``full`` = Llama-3.2-3B; ``micro`` = the same 28 layers and split
    at toy widths (the CPU test of this script)."""
    from imprag_ray.model.presets import llama3_2_3b, llama_like

    if shape == "full":
        return llama3_2_3b()
    return llama_like(
        name="micro",
        hidden_size=64,
        intermediate_size=128,
        num_layers=28,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        vocab_size=0,
        retrieval_layer=7,
        reader_last_layer=19,
        max_passage_tokens=32,
        num_passages=3,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )


# ------------------------------------------------------------------ inputs
def write_world(root: Path, n_passages: int, seed: int = 1) -> Path:
    """A synthetic world whose passages are lengthened with other passages' text (so that
    every passage fills l_max after truncation, the worst case for memory)."""
    from imprag_ray.data.io import write_jsonl_atomic
    from imprag_ray.data.readers import read_corpus
    from imprag_ray.data.synth import synthesize

    world = root / "world"
    synthesize(world, seed=seed, n_passages=n_passages)
    passages = read_corpus(world / "corpus.jsonl")
    texts = [p.text for p in passages]
    rows = [
        {"id": p.id, "title": p.title, "text": " ".join([p.text, *texts[i + 1 : i + 9]])}
        for i, p in enumerate(passages)
    ]
    write_jsonl_atomic(world / "corpus.jsonl", rows)
    return world


def write_labels(world: Path, out: Path, depth: int = 60, seed: int = 0) -> Path:
    """A labels teacher (no BM25 here): each training example's gold passage first, then a
    seeded random ranking of the others."""
    from imprag_ray.data.io import write_jsonl_atomic
    from imprag_ray.data.readers import read_corpus, read_tasks

    ids = [p.id for p in read_corpus(world / "corpus.jsonl")]
    known = set(ids)
    rng = random.Random(seed)
    rows = []
    for ex in read_tasks(world / "train" / "qa.jsonl", "qa"):
        gold = [pid for pid in ex.provenance if pid in known]
        rows.append({"id": ex.id, "ranking": gold + [p for p in rng.sample(ids, depth) if p not in gold]})
    write_jsonl_atomic(out, rows)
    return out


def write_checkpoint(preset, world: Path, out: Path, device: torch.device) -> Path:
    """A BPE tokenizer trained on the world and a random model of ``preset``'s shape (built on
    ``device`` in bf16, as a Meta snapshot is stored), saved with its ImpRAG config."""
    from transformers import AutoModelForCausalLM

    from imprag_ray.data.readers import iter_corpus
    from imprag_ray.data.templates import format_passage
    from imprag_ray.model.checkpoint import train_tokenizer
    from imprag_ray.model.imprag import ImpRAGConfig, ImpRAGModel

    tokenizer = train_tokenizer((format_passage(p) for p in iter_corpus(world / "corpus.jsonl")), 2000)
    vocab = max(preset.vocab_size, len(tokenizer))  # full: Llama-3's 128256 rows (most unused)
    config = preset.hf_config(
        vocab_size=vocab,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = ImpRAGModel(
        lm,
        ImpRAGConfig(
            preset.retrieval_layer, preset.reader_last_layer, preset.max_passage_tokens, preset.num_passages
        ),
    )
    out.mkdir(parents=True)
    model.write_files(out)
    tokenizer.save_pretrained(out)
    del model, lm
    return out


def job_config(root: Path, world: Path, ckpt: Path, labels: Path, args) -> Any:
    """The training job (bf16 mixed precision, labels teacher, bounded evaluation corpus)."""
    from imprag_ray.config.loader import from_dict
    from imprag_ray.config.schema import TrainJobConfig

    return from_dict(
        TrainJobConfig,
        {
            "name": "gpu-check",
            "output_dir": str(root / "run"),
            "threads": 1 if args.device == "cpu" else None,  # 2-core CI boxes: no thread contention
            "model": {"path": str(ckpt), "dtype": "bfloat16"},
            "data": {
                "corpus": str(world / "corpus.jsonl"),
                "train": [{"path": str(world / "train" / "qa.jsonl"), "format": "qa", "limit": 64}],
                "dev": [{"path": str(world / "dev" / "qa.jsonl"), "format": "qa"}],
                "max_prompt_tokens": 128,
                "max_target_tokens": 48,
            },
            "teacher": {"kind": "labels", "path": str(labels)},
            "train": {
                "epochs": 3,
                "warmup_epochs": 1,
                "steps_per_epoch": args.steps,
                "batch_size": args.batch_size,
                "lr": 2e-5,
                "warmup_steps": 1,
                "log_every": 1000,
            },
            "eval": {
                "recall_ks": [1, 5, 10],
                "max_new_tokens": 8,
                "batch_size": 4,
                "limit": args.eval_examples,
                "corpus_sample": args.corpus_sample,
            },
        },
    )


# ------------------------------------------------------------- measurement
class Probe:
    """Per-phase wall time, step times, peak GPU memory and SDPA kernels; failures become
    findings (an out-of-memory is reported as such) and stop the later phases."""

    def __init__(self, device: torch.device):
        self.device = device
        self.phases: dict[str, dict[str, Any]] = {}
        self.findings: list[str] = []
        self.failed = False

    def run(self, name: str, body: Callable[[dict[str, Any]], None]) -> None:
        """Run ``body(record)`` as phase ``name`` (skipped after a failed phase)."""
        record: dict[str, Any] = {"status": "skipped"}
        self.phases[name] = record
        if self.failed:
            return
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            body(record)
            record["status"] = "ok"
        except torch.cuda.OutOfMemoryError as err:  # torch.OutOfMemoryError in torch >= 2.5
            record.update(status="out_of_memory", error=str(err).splitlines()[0][:400])
            self.findings.append(f"{name}: out of memory ({record['error']})")
            self.failed = True
        except Exception as err:  # reported in the JSON, not hidden: the check goes on to print
            record.update(
                status="error",
                error=f"{type(err).__name__}: {err}"[:400],
                traceback=traceback.format_exc(limit=6)[-2000:],
            )
            self.findings.append(f"{name}: {record['error']}")
            self.failed = True
        if cuda:
            torch.cuda.synchronize()
            record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        else:
            record["peak_memory_gib"] = None
        record["seconds"] = round(time.perf_counter() - start, 2)

    def timed(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start


def sdpa_kernels(fn: Callable[[], Any]) -> tuple[Any, list[str]]:
    """Run ``fn`` and watch which kernels ran its scaled-dot-product attention -> (its result,
    the backends, forward and backward: ``flash``, ``efficient``, ``cudnn``, ``flash_cpu``,
    ``math``).

    A ``TorchDispatchMode`` sees the fused kernel the dispatcher chose under
    ``F.scaled_dot_product_attention`` (e.g. ``aten._scaled_dot_product_efficient_attention``);
    the math fallback decomposes into plain matmuls and softmax, so a ``TorchFunctionMode``
    counts the SDPA calls and every call without a fused kernel counts as ``math``. Both cost
    microseconds per op (the torch profiler's event processing took seconds here).
    """
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchFunctionMode):
        count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                self.count += 1
            return func(*args, **(kwargs or {}))

    class Kernels(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if "scaled_dot_product" in name:
                self.ops[name] = self.ops.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    calls, kernels = Calls(), Kernels()
    with calls, kernels:
        out = fn()
    found, fused = set(), 0
    for name, count in kernels.ops.items():
        backend = next((b for op, b in SDPA_OPS if op in name), "math")
        backward = "_backward" in name
        found.add(backend + ("_backward" if backward else ""))
        fused += 0 if backward or backend == "math" else count
    if calls.count > fused:
        found.add("math")
    return out, sorted(found)


class Phases:
    """The phases of one check: they share the recipe, the saved checkpoint and ``checks``."""

    def __init__(self, cfg, device: torch.device, root: Path, probe: Probe):
        from imprag_ray.train.recipe import ImpRAGRecipe

        self.cfg, self.device, self.root, self.probe = cfg, device, root, probe
        self.recipe = ImpRAGRecipe(cfg, device=device)
        self.checks: dict[str, Any] = {}
        self.saved: Path | None = None
        self.saved_step = -1

    def setup(self, record: dict[str, Any]) -> None:
        self.recipe.setup()
        params = list(self.recipe.model.parameters())
        record.update(
            params_billion=round(sum(p.numel() for p in params) / 1e9, 3), param_dtype=str(params[0].dtype)
        )

    def train(self, record: dict[str, Any]) -> None:
        """One epoch (warmup or distill by the recipe's epoch): every step timed, the first
        one watched for attention kernels."""
        recipe = self.recipe
        steps: list[float] = []
        losses: list[float] = []
        for i, batch in enumerate(recipe.epoch_batches(recipe.epoch)):
            step = functools.partial(recipe.train_step, batch)
            if i == 0:
                (metrics, record["attention"]), seconds = self.probe.timed(
                    functools.partial(sdpa_kernels, step)
                )
            else:
                metrics, seconds = self.probe.timed(step)
            steps.append(round(seconds, 3))
            losses.append(round(metrics["loss"], 4))
        record.update(stage=recipe.stage(recipe.epoch), step_seconds=steps, loss=losses)
        recipe.epoch += 1
        if not all(abs(v) < float("inf") for v in losses):  # also false for NaN
            raise FloatingPointError(f"non-finite training loss {losses}")

    def evaluate(self, record: dict[str, Any]) -> None:
        results, kernels = sdpa_kernels(lambda: self.recipe.evaluate("dev", write=False))
        qa = results["qa"]
        record.update(
            attention=kernels,
            examples=qa["n"],
            corpus_size=qa.get("corpus_size"),
            sub_corpus=qa.get("sub_corpus"),
            em=qa["em"],
            recall_at_10=qa.get("recall@10"),
        )

    def save(self, record: dict[str, Any]) -> None:
        self.saved, self.saved_step = self.recipe.save_checkpoint(self.root / "ckpt"), self.recipe.step
        record["gib_on_disk"] = round(sum(f.stat().st_size for f in self.saved.iterdir()) / 2**30, 2)
        self.checks["saved_weight_dtype"] = saved_dtype(self.saved)

    def resume(self, record: dict[str, Any]) -> None:
        """A new recipe from the saved checkpoint (the first one freed first), one step."""
        from imprag_ray.train.recipe import ImpRAGRecipe

        del self.recipe
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        recipe = self.recipe = ImpRAGRecipe(self.cfg, device=self.device)
        _, load_seconds = self.probe.timed(lambda: recipe.setup(resume_from=self.saved))
        self.checks.update(
            resumed_step=recipe.step,
            resumed_step_matches=recipe.step == self.saved_step,
            optimizer_state_on_param_device=optimizer_state_placed(recipe),
        )
        batch = next(recipe.epoch_batches(recipe.epoch))
        metrics, seconds = self.probe.timed(lambda: recipe.train_step(batch))
        record.update(
            load_seconds=round(load_seconds, 2),
            step_seconds=[round(seconds, 3)],
            loss=[round(metrics["loss"], 4)],
        )


def check(args) -> dict[str, Any]:
    """Build the inputs under ``args.out``, run every phase, return the report."""
    device = torch.device(args.device)
    preset = preset_of(args.shape)
    root = Path(args.out)
    started = time.perf_counter()
    world = write_world(root, args.passages)
    ckpt = write_checkpoint(preset, world, root / "init", device)
    cfg = job_config(root, world, ckpt, write_labels(world, root / "labels.jsonl"), args)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    inputs_seconds = round(time.perf_counter() - started, 2)
    probe = Probe(device)
    phases = Phases(cfg, device, root, probe)
    for name, body in (
        ("setup", phases.setup),
        ("warmup", phases.train),
        ("distill", phases.train),
        ("evaluate", phases.evaluate),
        ("save", phases.save),
        ("resume", phases.resume),
    ):
        probe.run(name, body)
    return report(args, preset, device, probe, phases.checks, inputs_seconds, time.perf_counter() - started)


def saved_dtype(ckpt: Path) -> str:
    """The dtype of the floating-point tensors in a checkpoint's safetensors files."""
    from safetensors import safe_open

    dtypes: set[str] = set()
    for file in ckpt.glob("*.safetensors"):
        with safe_open(str(file), "pt") as fh:
            dtypes.update(str(fh.get_slice(k).get_dtype()) for k in fh.keys())  # noqa: SIM118
    return ",".join(sorted(dtypes))


def optimizer_state_placed(recipe) -> bool:
    """Every AdamW state tensor shaped like its parameter sits on its device, in fp32."""
    for group in recipe.optimizer.param_groups:
        for p in group["params"]:
            for value in recipe.optimizer.state.get(p, {}).values():
                if (
                    torch.is_tensor(value)
                    and value.shape == p.shape
                    and (value.device != p.device or value.dtype != torch.float32)
                ):
                    return False
    return bool(recipe.optimizer.state)


def report(args, preset, device, probe: Probe, checks: dict, inputs_seconds: float, total: float) -> dict:
    """The JSON object: shape, device, phases, attention kernels per phase, checks, findings."""
    import transformers

    findings = list(probe.findings)
    attention = {name: rec["attention"] for name, rec in probe.phases.items() if "attention" in rec}
    for name, kernels in attention.items():
        if device.type == "cuda" and any(k.startswith("math") for k in kernels):
            findings.append(
                f"{name}: scaled_dot_product_attention ran the math kernel (O(L^2) memory), "
                f"not a fused one: {kernels}"
            )
    if checks.get("saved_weight_dtype") not in (None, "BF16"):
        findings.append(f"save: checkpoint weights are {checks['saved_weight_dtype']}, expected BF16")
    for key in ("resumed_step_matches", "optimizer_state_on_param_device"):
        if checks.get(key) is False:
            findings.append(f"resume: {key} is false")
    ok = all(rec["status"] == "ok" for rec in probe.phases.values()) and not any(
        checks.get(k) is False for k in ("resumed_step_matches", "optimizer_state_on_param_device")
    )
    return {
        "check": "imprag_ray.bench.gpu_check",
        "shape": {
            "name": args.shape,
            "layers": preset.num_layers,
            "hidden": preset.hidden_size,
            "heads": preset.num_heads,
            "kv_heads": preset.num_kv_heads,
            "head_dim": preset.head_dim,
            "intermediate": preset.intermediate_size,
            "b": preset.retrieval_layer,
            "t": preset.reader_last_layer,
            "k": preset.num_passages,
            "l_max": preset.max_passage_tokens,
            "batch_size": args.batch_size,
        },
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "precision": "bf16 autocast, fp32 master weights and AdamW state",
        "inputs_seconds": inputs_seconds,
        "total_seconds": round(total, 2),
        "phases": probe.phases,
        "attention": attention,
        "checks": checks,
        "findings": findings,
        "ok": ok,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m imprag_ray.bench.gpu_check", description=__doc__.split("\n")[0]
    )
    p.add_argument("--shape", choices=("full", "micro"), default="full")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="steps per training phase (warmup, distill)")
    p.add_argument("--passages", type=int, default=300, help="synthetic corpus size")
    p.add_argument("--corpus-sample", type=int, default=200, help="eval.corpus_sample of the evaluation")
    p.add_argument("--eval-examples", type=int, default=8)
    p.add_argument("--out", default=None, help="work dir (default: a temp dir, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--json", default=None, help="also write the report to this file")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    temp = args.out is None
    args.out = args.out or tempfile.mkdtemp(prefix="imprag-gpu-check-")
    try:
        result = check(args)
    except Exception as err:  # the inputs could not be built: still one JSON object
        result = {
            "check": "imprag_ray.bench.gpu_check",
            "ok": False,
            "phases": {},
            "findings": [f"inputs: {type(err).__name__}: {err}"[:400]],
            "traceback": traceback.format_exc(limit=6),
        }
    finally:
        if temp and not args.keep:
            shutil.rmtree(args.out, ignore_errors=True)
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
