"""The bounded evaluation sub-corpus of ``eval.corpus_sample`` (Ray-free).

Evaluation during training re-embeds the passages it searches with the current bottom
layers. Over a whole large corpus that is a full encoding pass on one rank per evaluation;
``eval.corpus_sample: N`` searches about N passages instead, chosen so that recall@k still
means something: every gold passage of the evaluated examples, the teacher's top passages
for them (hard negatives) where the teacher is cheap, and a seeded random sample of the
rest of the corpus up to N. The metrics then carry ``corpus_size`` / ``sub_corpus``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence

from imprag_ray.data.records import RETRIEVAL_FORMATS, TaskExample


def teacher_rankings(teacher, examples: Sequence[TaskExample], depth: int) -> list[list[str]]:
    """The teacher's top ``depth`` passage ids of each retrieval-format example it can rank
    (a labels file ranks only the ids it lists; the others are skipped)."""
    chosen = [ex for ex in examples if ex.format in RETRIEVAL_FORMATS]
    known = getattr(teacher, "rankings", None)  # LabelsTeacher: {query id: ranking}
    if known is not None:
        chosen = [ex for ex in chosen if ex.id in known]
    out: list[list[str]] = []
    for start in range(0, len(chosen), 512):
        part = chosen[start : start + 512]
        ranked = teacher.rank([ex.input for ex in part], depth, [ex.id for ex in part])
        out += [[pid for pid, _ in r] for r in ranked]
    return out


def eval_passage_ids(
    corpus_ids: Sequence[str],
    examples: Sequence[TaskExample],
    size: int,
    seed: int | str,
    rankings: Sequence[Sequence[str]] = (),
    gold_of: Callable[[TaskExample], Iterable[str]] | None = None,
) -> list[str]:
    """Passage ids to search at evaluation, in corpus order.

    Every gold id of ``examples`` that is in the corpus (``gold_of(example)``; default its
    provenance ids, which are passage ids under ``data.provenance: passage_id``), then the teacher's
    ``rankings`` rank by rank across examples (rank 0 of each, then rank 1, ...) while the
    set is below ``size``, then a ``seed``-ed random sample of the remaining corpus up to
    ``size``. Holds max(size, number of gold ids) passages at most.
    """
    known = set(corpus_ids)
    chosen: dict[str, None] = {}
    for ex in examples:
        chosen.update((pid, None) for pid in (gold_of(ex) if gold_of else ex.provenance) if pid in known)
    depth = max((len(r) for r in rankings), default=0)
    for rank in range(depth):
        for ranking in rankings:
            if len(chosen) >= size:
                break
            if rank < len(ranking) and ranking[rank] in known:
                chosen.setdefault(ranking[rank], None)
    rest = [pid for pid in corpus_ids if pid not in chosen]
    need = min(size - len(chosen), len(rest))
    if need > 0:
        chosen.update((pid, None) for pid in random.Random(seed).sample(rest, need))
    return [pid for pid in corpus_ids if pid in chosen]
