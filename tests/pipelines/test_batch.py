"""Batch offline inference on Ray Data equals the Ray-free two-stage predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from imprag_ray.config.loader import ConfigError, load_config
from imprag_ray.config.schema import TrainJobConfig
from imprag_ray.data.readers import read_corpus, read_tasks
from imprag_ray.data.records import DataError
from imprag_ray.data.templates import format_prompt
from imprag_ray.data.tokenized import PassageStore
from imprag_ray.eval.predict import encode_corpus, predict
from imprag_ray.index.store import IndexMismatchError, PassageIndex, corpus_fingerprint
from imprag_ray.model.checkpoint import checkpoint_hash, load_tokenizer
from imprag_ray.model.imprag import ImpRAGModel
from imprag_ray.pipelines.batch import Generator, parse_tasks, run_batch
from imprag_ray.retrievers.teachers import build_teacher

FILES = ("qa", "entity_linking")
LIMIT = 6


@pytest.fixture(scope="module")
def setup(tiny_world, tmp_path_factory):
    """Model, store, a saved index (Ray-free build) and the job overrides."""
    tmp = tmp_path_factory.mktemp("batch")
    ckpt = tiny_world["ckpt"]
    model = ImpRAGModel.from_pretrained(ckpt).eval()
    tok = load_tokenizer(ckpt)
    corpus = tiny_world["world"] / "corpus.jsonl"
    passages = read_corpus(corpus)
    store = PassageStore(passages, tok, model.l_max)
    with torch.no_grad():
        dense = encode_corpus(model, store)
    fields = dict(
        checkpoint_hash=checkpoint_hash(ckpt),
        retrieval_layer=model.b,
        post_rope=False,
        corpus_fingerprint=corpus_fingerprint(corpus),
    )
    index = PassageIndex.build(
        [(dense.ids, dense.index.reconstruct_n(0, len(dense.ids)))],
        dim=model.embedding_dim,
        index_type="Flat",
        train_sample=None,
        manifest_fields=fields,
    )
    index.save(tmp / "index")
    inputs = [tiny_world["world"] / f"eval/{name}.jsonl" for name in FILES]
    cfg_inputs = (
        "[" + ",".join(f"{{path: {p}, format: {n}}}" for p, n in zip(inputs, FILES, strict=True)) + "]"
    )
    overrides = [
        f"batch.index_dir={tmp / 'index'}",
        "batch.num_cpus=0.5",
        f"batch.limit={LIMIT}",
        "batch.batch_size=4",
        "batch.threads=1",
        f"batch.inputs={cfg_inputs}",
    ]
    examples = [ex for path, name in zip(inputs, FILES, strict=True) for ex in read_tasks(path, name)[:LIMIT]]
    return {
        "tmp": tmp,
        "model": model,
        "tok": tok,
        "store": store,
        "index": dense,
        "passages": passages,
        "overrides": overrides,
        "examples": examples,
        "job": tiny_world["job"],
        "ckpt": str(ckpt),
    }


def _cfg(setup, *extra):
    return load_config(TrainJobConfig, setup["job"], [*setup["overrides"], *extra])


def _reference(setup, mode: str) -> list[dict]:
    """Ray-free predictions: the same checkpoint, greedy fp32, top_k = k = 3."""
    kwargs = dict(top_k=3, search_depth=10, max_new_tokens=6, max_prompt_tokens=80)
    out = []
    for name in FILES:  # one format per predict call, as the files are
        exs = [ex for ex in setup["examples"] if ex.format == name]
        if mode == "bm25":
            teacher = build_teacher("bm25", setup["passages"])

            def rank(batch, teacher=teacher):  # the whole prompt is the explicit query
                return [[p for p, _ in r] for r in teacher.rank([format_prompt(e) for e in batch], 10)]

            out += predict(
                setup["model"], setup["tok"], setup["store"], exs, index=None, rankings=rank, **kwargs
            )
        else:
            index = setup["index"] if mode == "imprag" else None
            out += predict(setup["model"], setup["tok"], setup["store"], exs, index=index, **kwargs)
    return out


@pytest.mark.parametrize(("mode", "suffix"), [("imprag", "jsonl"), ("bm25", "parquet"), ("none", "jsonl")])
def test_ray_batch_predictions_equal_ray_free_predict(setup, ray_local, mode, suffix):
    out = setup["tmp"] / f"pred-{mode}.{suffix}"
    lines: list[str] = []
    result = run_batch(_cfg(setup, f"batch.retriever={mode}", f"batch.output={out}"), echo=lines.append)
    assert result["count"] == len(setup["examples"]) and out.exists()
    rows = (
        pq.read_table(out).to_pylist()
        if suffix == "parquet"
        else [json.loads(x) for x in out.read_text().splitlines()]
    )
    ref = _reference(setup, mode)
    assert [r["id"] for r in rows] == [r["id"] for r in ref]  # input order kept
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in ref]
    assert [r["retrieved"] for r in rows] == [r["retrieved"] for r in ref]
    if mode == "imprag":
        for got, want in zip(rows, ref, strict=True):
            assert got["scores"] == pytest.approx(want["scores"], abs=1e-4)
    if mode == "none":
        assert all(r["retrieved"] == [] for r in rows)
    metrics = json.loads(Path(result["metrics_path"]).read_text())
    assert set(metrics) == set(FILES) and metrics == result["metrics"]
    assert all(m["n"] == LIMIT and m["missing"] == 0 for m in metrics.values())
    if mode != "none":
        assert metrics["qa"]["recall@10"] is not None
    assert any("predictions ->" in line for line in lines)


def test_batch_refuses_index_of_another_checkpoint_and_bad_settings(setup, tmp_path):
    manifest = json.loads((setup["tmp"] / "index/manifest.json").read_text())
    other = tmp_path / "other-index"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({**manifest, "checkpoint_hash": "0" * 64}))
    with pytest.raises(IndexMismatchError, match="rebuild it"):
        run_batch(_cfg(setup, f"batch.index_dir={other}"))
    with pytest.raises(FileNotFoundError, match=r"batch\.index_dir"):
        run_batch(_cfg(setup, f"batch.index_dir={tmp_path / 'missing'}"))
    with pytest.raises(ConfigError) as err:
        run_batch(_cfg(setup, "batch.top_k=4"))
    assert err.value.key == "batch.top_k"
    for override, key in [
        ("batch.output=out.csv", "batch.output"),
        ("batch.retriever=dense", "batch.retriever"),
        ("batch.search_depth=0", "batch.search_depth"),
        ("batch.engine=tgi", "batch.engine"),
    ]:
        with pytest.raises(ConfigError) as err:
            _cfg(setup, override)
        assert err.value.key == key
    with pytest.raises(ConfigError) as err:
        run_batch(_cfg(setup, f"batch.inputs=[{{path: {tmp_path / 'nope.jsonl'}, format: qa}}]"))
    assert err.value.key == "batch.inputs[0].path"


def test_malformed_task_rows_name_the_field(setup):
    ckpt = setup["ckpt"]
    good = parse_tasks(
        {"text": ['{"id": 1, "input": "who?"}']},
        path="f.jsonl",
        format="qa",
        checkpoint=ckpt,
        max_prompt_tokens=16,
    )
    assert (
        list(good["id"]) == ["1"] and good["prompt_text"][0] == "Q: who? A:" and bool(good["use_passages"][0])
    )
    with pytest.raises(DataError, match="field 'input'"):
        parse_tasks(
            {"text": ['{"id": 1, "question": "who?"}']},
            path="f.jsonl",
            format="qa",
            checkpoint=ckpt,
            max_prompt_tokens=16,
        )
    with pytest.raises(DataError, match="invalid JSON"):
        parse_tasks({"text": ["{oops"]}, path="f.jsonl", format="qa", checkpoint=ckpt, max_prompt_tokens=16)


def test_generator_hands_back_retrieval_columns_as_arrow_lists(setup):
    """Ray Data gives the generator cells that went through Arrow (numpy arrays); its output
    must convert back to Arrow lists, not fall back to a column of pickled objects."""
    import pyarrow as pa
    from ray.data.block import BlockAccessor

    ckpt = setup["ckpt"]
    rows = parse_tasks({"text": ['{"id": "a", "input": "who?"}', '{"id": "b", "input": "when?"}']},
                       path="f.jsonl", format="qa", checkpoint=ckpt, max_prompt_tokens=16)
    upstream = pa.table({
        **{k: list(v) for k, v in rows.items()},
        "retrieved": [["p1", "p2"], []],
        "scores": [[0.5, 0.25], []],
    })
    batch = BlockAccessor.for_block(upstream).to_batch_format("numpy")
    batch["use_passages"] = np.zeros(2, dtype=bool)  # closed book: no passage tokens needed
    assert isinstance(batch["retrieved"][0], np.ndarray)  # what an actor receives
    gen = Generator(kind="torch", checkpoint=ckpt, options={}, max_new_tokens=2, threads=1)
    block = BlockAccessor.batch_to_block(gen(batch))
    assert block.schema.field("retrieved").type == pa.list_(pa.string())
    assert block.schema.field("scores").type == pa.list_(pa.float64())
    assert block.column("retrieved").to_pylist() == [["p1", "p2"], []]
    assert block.column("scores").to_pylist() == [[0.5, 0.25], []]
