"""The paper jobs rehearsed end to end on CPU (``make rehearsal``).

``jobs/llama3_2_3b_imprag.yaml`` and ``jobs/serve_llama3_2_3b.yaml`` run through the
``imprag`` CLI, each through ONE override file in this folder that changes sizes, paths and
resources only, against:

* a micro Llama-3.2 snapshot with every property of a real one (``tests/llama3_micro.py``:
  ``save_pretrained`` layout with nothing of ours, 28 layers so b=7 / t=19 stand, llama3 rope
  scaling, tied embeddings, GQA, Llama-3's tokenizer specials, no pad token, three eos ids, a
  chat template);
* Atlas passages and KILT task files in their real formats, passage ids colliding with the
  KILT page ids of other pages, and a precomputed teacher labels file (``tests/kilt_micro.py``);
* a two-node local Ray cluster (two raylets).

Stages, in order: index of the base snapshot in 2 parts -> training with 2 workers in bf16
mixed precision through warmup into self-distillation, one worker SIGKILLed and the run
resumed, bounded evaluation -> index of the trained checkpoint -> batch inference with the
vLLM engine -> the serve job on the 2-part index answering the ``openai`` client.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.rehearsal, pytest.mark.timeout(1800)]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
JOB = HERE / "llama3_2_3b_cpu.yaml"
SERVE_JOB = HERE / "serve_llama3_2_3b_cpu.yaml"
RUN = Path("runs/llama3-2-3b-imprag")  # output_dir of JOB, relative to the work dir
TRAINED = RUN / "checkpoints/epoch-002"
API_KEY = "rehearsal-key"


def _env(cluster) -> dict:
    return {
        **cluster.env,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "IMPRAG_API_KEY": API_KEY,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def _imprag(work: Path, env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``imprag ARGS`` in ``work`` as a user would; fail with its output on error."""
    cmd = [sys.executable, "-m", "imprag_ray.cli", *args]
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
        )
    return done


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _kill_rank_in_epoch(out: Path, epoch: int, done: threading.Event, record: dict) -> None:
    """SIGKILL worker rank 1 once a training step of ``epoch`` (0-based) is logged."""
    metrics = out / "metrics.jsonl"
    while not done.is_set():
        try:
            rows = _rows(metrics) if metrics.exists() else []
        except json.JSONDecodeError:  # a row being written
            rows = []
        if any(r.get("event") is None and r.get("epoch") == epoch for r in rows):
            info = json.loads((out / "workers/rank-1.json").read_text())
            os.kill(info["pid"], signal.SIGKILL)
            record.update(info, killed_after_step=max(r.get("step", 0) for r in rows))
            return
        time.sleep(0.2)


def _train_with_a_kill(work: Path, env: dict, address: str) -> dict:
    done, record = threading.Event(), {}
    killer = threading.Thread(target=_kill_rank_in_epoch, args=(work / RUN, 1, done, record), daemon=True)
    killer.start()
    try:
        _imprag(
            work, env, "train", "--config", str(JOB), "--address", address, "--json", "runs/train-eval.json"
        )
    finally:
        done.set()
    return record


def _serve_and_ask(work: Path, env: dict, address: str, questions: list[str]) -> list:
    """Start the serve job (blocking CLI) in the background, ask with the openai client, stop it."""
    import openai

    from imprag_ray.bench.serve import free_port

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "imprag_ray.cli",
        "serve",
        "--config",
        str(SERVE_JOB),
        "--address",
        address,
        f"http.port={port}",
    ]
    with open(work / "runs/serve.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while "ready at" not in (work / "runs/serve.log").read_text():
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(
                    f"imprag serve did not come up:\n{(work / 'runs/serve.log').read_text()[-8000:]}"
                )
            time.sleep(1)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, timeout=120, max_retries=0
        )
        model = client.models.list().data[0].id
        return [
            client.completions.create(model=model, prompt=q, max_tokens=16, temperature=0) for q in questions
        ]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> dict:
    from tests.kilt_micro import write_kilt_world
    from tests.llama3_micro import build_snapshot
    from tests.multinode import local_cluster

    start = time.time()
    work = tmp_path_factory.mktemp("rehearsal")
    world = write_kilt_world(work / "data")
    build_snapshot(work / "data/models/Llama-3.2-3B", world["texts"])
    (work / "runs").mkdir()
    seconds: dict[str, float] = {"data": time.time() - start}
    # The serve job names its API key by environment variable (auth.api_key_env), which a cluster
    # gives every node (KubeRay: from a Secret); here the raylets inherit it from this process.
    saved_key = os.environ.get("IMPRAG_API_KEY")
    os.environ["IMPRAG_API_KEY"] = API_KEY
    try:
        with local_cluster((2, 2), object_store_mb=300) as cluster:
            return _run_stages(work, world, cluster, seconds, start)
    finally:
        if saved_key is None:
            os.environ.pop("IMPRAG_API_KEY", None)
        else:
            os.environ["IMPRAG_API_KEY"] = saved_key


def _run_stages(work: Path, world: dict, cluster, seconds: dict, start: float) -> dict:
    """Every stage of the rehearsal on ``cluster``, through the ``imprag`` CLI in ``work``."""
    env, address = _env(cluster), cluster.address

    def stage(name, fn, *args):
        t = time.time()
        out = fn(*args)
        seconds[name] = round(time.time() - t, 1)
        return out

    stage(
        "index_base",
        _imprag,
        work,
        env,
        "index",
        "build",
        "--config",
        str(JOB),
        "--address",
        address,
        "--json",
        "runs/index-base.json",
    )
    killed = stage("train", _train_with_a_kill, work, env, address)
    stage(
        "index_trained",
        _imprag,
        work,
        env,
        "index",
        "build",
        "--config",
        str(JOB),
        "--address",
        address,
        f"index.checkpoint={TRAINED}",
        "index.out_dir=runs/indexes/trained",
        "index.shard_dir=runs/indexes/trained-embeddings",
        "--json",
        "runs/index-trained.json",
    )
    stage(
        "batch",
        _imprag,
        work,
        env,
        "batch",
        "--config",
        str(JOB),
        "--address",
        address,
        f"batch.checkpoint={TRAINED}",
        "batch.index_dir=runs/indexes/trained",
        "batch.output=runs/batch/predictions.jsonl",
        "--json",
        "runs/batch-metrics.json",
    )
    questions = [ex["input"] for ex in _rows(work / "data/kilt/nq-dev-kilt.jsonl")[:3]]
    answers = stage("serve", _serve_and_ask, work, env, address, questions)
    seconds["total"] = round(time.time() - start, 1)
    print(f"\nrehearsal seconds: {json.dumps(seconds)}")
    return {"work": work, "world": world, "killed": killed, "answers": answers, "seconds": seconds}


def test_base_index_is_built_in_two_parts_from_a_snapshot_without_imprag_config(rehearsal):
    work = rehearsal["work"]
    assert not (work / "data/models/Llama-3.2-3B/imprag_config.json").exists()
    index = work / "runs/indexes/base"
    parts = json.loads((index / "parts.json").read_text())
    assert len(parts) == 2
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["retrieval_layer"] == 7 and manifest["dim"] == 64  # 2 KV heads x head size 32


def test_training_resumed_after_a_killed_worker_and_reached_self_distillation(rehearsal):
    out = rehearsal["work"] / RUN
    rows = _rows(out / "metrics.jsonl")
    assert rehearsal["killed"], "no worker was killed"
    setups = [r for r in rows if r.get("event") == "setup"]
    assert len(setups) >= 2 and setups[-1]["resumed_from"], setups
    stages = {r["stage"] for r in rows if r.get("event") is None and "stage" in r}
    assert stages == {"warmup", "distill"}
    assert any("j_ret" in r for r in rows if r.get("stage") == "distill")
    assert (out / "checkpoints/epoch-002/imprag_config.json").exists()
    cfg = json.loads((out / "checkpoints/epoch-002/config.json").read_text())
    assert cfg["dtype"] == "bfloat16"


def test_bounded_evaluation_reads_a_sub_corpus(rehearsal):
    out = rehearsal["work"] / RUN
    dev = [r for r in _rows(out / "metrics.jsonl") if r.get("event") == "epoch" and "dev" in r]
    assert dev, "no dev evaluation was logged"
    qa = dev[-1]["dev"]["nq-dev-kilt"]
    corpus = len(_rows(rehearsal["work"] / "data/atlas/enwiki-dec2021/passages.jsonl"))
    assert 0 < qa["corpus_size"] < corpus


def test_batch_recall_is_recall_through_page_titles(rehearsal):
    work = rehearsal["work"]
    titles = {p["id"]: p["title"] for p in _rows(work / "data/atlas/enwiki-dec2021/passages.jsonl")}
    preds = {str(p["id"]): p for p in _rows(work / "runs/batch/predictions.jsonl")}
    metrics = json.loads((work / "runs/batch-metrics.json").read_text())
    checked = 0
    for name in ("nq-dev-kilt", "trex-dev-kilt"):
        examples = _rows(work / f"data/kilt/{name}.jsonl")[:8]  # batch.limit
        for k in (1, 5, 10):
            hits = 0
            for ex in examples:
                gold = {p["title"] for o in ex["output"] for p in o.get("provenance") or []}
                hits += bool(gold & {titles[pid] for pid in preds[str(ex["id"])]["retrieved"][:k]})
            assert metrics[name][f"recall@{k}"] == pytest.approx(hits / len(examples)), (name, k)
            checked += 1
    assert checked == 6


def test_served_answers_stop_at_eot(rehearsal):
    answers = rehearsal["answers"]
    assert answers
    for a in answers:
        assert a.choices[0].finish_reason == "stop", a
        assert a.usage.completion_tokens < 16


def _changed_fraction(work: Path, dtype: str) -> float:
    """Share of weights that 20 AdamW steps at lr 2e-5 of the rehearsal job change at all."""
    from imprag_ray.cli import load_train_config
    from imprag_ray.train.recipe import ImpRAGRecipe

    here = Path.cwd()
    os.chdir(work)
    try:
        cfg = load_train_config(
            JOB,
            [
                f"model.dtype={dtype}",
                "train.lr=2e-5",
                "train.warmup_steps=1",
                "train.steps_per_epoch=20",
                "train.epochs=1",
                "train.batch_size=2",
                f"output_dir=runs/precision-{dtype}",
            ],
        )
    finally:
        os.chdir(here)
    recipe = ImpRAGRecipe(cfg)
    recipe.setup()
    before = {n: p.detach().float().clone() for n, p in recipe.model.named_parameters()}
    for batch in recipe.epoch_batches(0):
        recipe.train_step(batch)
    changed = total = 0
    for n, p in recipe.model.named_parameters():
        changed += int((p.detach().float() != before[n]).sum())
        total += p.numel()
    return changed / total


def test_bf16_mixed_precision_moves_weights_as_fp32_does(rehearsal):
    fp32 = _changed_fraction(rehearsal["work"], "float32")
    bf16 = _changed_fraction(rehearsal["work"], "bfloat16")
    print(f"\nchanged weights after 20 steps at lr 2e-5: fp32 {fp32:.4f}, bf16 mixed {bf16:.4f}")
    assert fp32 > 0.9
    assert abs(bf16 - fp32) < 0.05
