"""Gold passages of an example from its KILT provenance (Ray-free, torch-free).

KILT provenance names Wikipedia PAGES: ``wikipedia_id`` is a page id and ``title`` the page
title. The retrieval corpus (Atlas enwiki-dec2021) is split into ~100-word passages with their
own ids; a page has several passages, which carry the page ``title``. Page ids and passage ids
are both integers, so comparing them finds spurious "hits" (passage 3012 is not page 3012).
``data.provenance`` says how provenance names passages:

* ``passage_id`` - ``wikipedia_id`` already IS a passage id of the corpus (the synthetic world
  writes its passage ids there); the gold passages are those ids.
* ``page_title`` - join through the page: the gold passages of an example are all corpus
  passages whose title is one of its provenance titles (KILT + Atlas). Titles are compared
  after :func:`normalize_title` (Unicode NFC, ``_`` as space, squeezed whitespace, first letter
  upper-cased as MediaWiki does); a page missing from the corpus gives no gold passage.

One :class:`ProvenanceResolver` answers every question the evaluator and the training recipe
ask: ``gold_ids(example)``, ``is_gold(example, passage_id)``, ``recall_at_k(example, ranked, k)``,
``order_gold(example, ranking)`` (positives for provenance-first training) and
``reading_passage(example, texts)`` (the gold passage a reading item puts in context).
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Collection, Iterable, Mapping, Sequence

from imprag_ray.data.readers import PROVENANCE_MODES, TITLE_FIX, iter_corpus
from imprag_ray.data.records import DataError, Passage, TaskExample

__all__ = ["PROVENANCE_MODES", "ProvenanceResolver", "normalize_title"]


def normalize_title(title: str) -> str:
    """The form page titles are compared in: NFC, ``_`` -> space, whitespace squeezed,
    first character upper-cased (MediaWiki titles are case-insensitive in their first letter)."""
    t = " ".join(unicodedata.normalize("NFC", title).replace("_", " ").split())
    return t[:1].upper() + t[1:]


def check_mode(mode: str) -> str:
    if mode not in PROVENANCE_MODES:
        raise ValueError(f"data.provenance must be one of {', '.join(PROVENANCE_MODES)}, got {mode!r}")
    return mode


class ProvenanceResolver:
    """Gold passage ids of examples, built once from the corpus passages.

    passages: the corpus (only titles and ids are kept: title -> passage ids in corpus order);
        not needed, and ignored, in ``passage_id`` mode.
    titles: keep only these page titles (any spelling; normalised here) - for streaming a
        large corpus when the examples are known (:meth:`from_corpus`); None keeps every page.
    """

    def __init__(
        self,
        passages: Iterable[Passage] = (),
        mode: str = "passage_id",
        *,
        titles: Collection[str] | None = None,
    ) -> None:
        self.mode = check_mode(mode)
        self._pages: dict[str, list[str]] = {}
        # (provenance ids, titles) -> (gold ids, their set): gold depends on nothing else
        self._gold_cache: dict[tuple, tuple[list[str], frozenset[str]]] = {}
        if self.mode != "page_title":
            return
        keep = None if titles is None else {normalize_title(t) for t in titles}
        for p in passages:
            key = normalize_title(p.title)
            if key and (keep is None or key in keep):
                self._pages.setdefault(key, []).append(p.id)

    @classmethod
    def from_corpus(
        cls,
        corpus_path: str | os.PathLike | None,
        mode: str,
        examples: Iterable[TaskExample] | None = None,
    ) -> ProvenanceResolver:
        """Stream the corpus file, keeping only the pages the examples name (all pages when
        examples is None). ``passage_id`` mode reads nothing."""
        if check_mode(mode) == "passage_id":
            return cls(mode=mode)
        if corpus_path is None:
            raise ValueError(
                "data.provenance: page_title needs the corpus to map page titles to passages; "
                "pass the corpus file (imprag eval --corpus FILE)"
            )
        titles = None
        if examples is not None:
            titles = {t for ex in examples for t in cls._titles(ex)}
        return cls(iter_corpus(corpus_path, check_duplicates=False), mode, titles=titles)

    # ------------------------------------------------------------------ queries
    @staticmethod
    def _titles(ex: TaskExample) -> list[str]:
        """The example's provenance titles; DataError where one is missing."""
        titles = list(ex.provenance_titles)
        if ex.provenance and (not titles or not all(t.strip() for t in titles)):
            missing = ex.provenance[titles.index("")] if "" in titles else ex.provenance[0]
            raise DataError(
                f"example {ex.id!r}",
                "output[].provenance[].title",
                f"missing (provenance wikipedia_id {missing!r} has no title)",
                TITLE_FIX,
            )
        return titles

    def has_provenance(self, ex: TaskExample) -> bool:
        """Whether the example names gold passages at all (recall by provenance applies)."""
        return bool(ex.provenance)

    def _gold(self, ex: TaskExample) -> tuple[list[str], frozenset[str]]:
        key = (ex.provenance, ex.provenance_titles)
        cached = self._gold_cache.get(key)
        if cached is not None:
            return cached
        if self.mode == "passage_id":
            ids = list(dict.fromkeys(ex.provenance))
        else:
            ids = list(
                dict.fromkeys(
                    pid for t in self._titles(ex) for pid in self._pages.get(normalize_title(t), ())
                )
            )
        out = (ids, frozenset(ids))
        self._gold_cache[key] = out
        return out

    def gold_ids(self, ex: TaskExample) -> list[str]:
        """Gold passage ids: ``passage_id`` - the provenance ids; ``page_title`` - every corpus
        passage of the provenance pages (pages in provenance order, passages in corpus order).
        Empty when the example has no provenance or none of its pages is in the corpus."""
        return list(self._gold(ex)[0])

    def is_gold(self, ex: TaskExample, passage_id: str) -> bool:
        return str(passage_id) in self._gold(ex)[1]

    def recall_at_k(self, ex: TaskExample, retrieved: Sequence[str], k: int) -> float:
        """1.0 if any of the top-k retrieved passage ids is gold for ``ex``, else 0.0."""
        gold = self._gold(ex)[1]
        return float(any(str(r) in gold for r in retrieved[:k]))

    def unmatched(self, ex: TaskExample) -> bool:
        """The example has provenance but no gold passage in the corpus (``page_title``: none of
        its pages is in the corpus, e.g. renamed between the KILT and the corpus snapshot)."""
        return bool(ex.provenance) and not self._gold(ex)[0]

    def order_gold(self, ex: TaskExample, ranking: Sequence[str] = ()) -> list[str]:
        """The gold ids, those the teacher ranked first (in its order), then the others (in
        :meth:`gold_ids` order): positives for ``teacher.provenance_positives``."""
        gold = self._gold(ex)[1]
        ranked = [pid for pid in dict.fromkeys(ranking) if pid in gold]
        seen = set(ranked)
        return ranked + [pid for pid in self._gold(ex)[0] if pid not in seen]

    def reading_passage(self, ex: TaskExample, texts: Mapping[str, str] | None = None) -> str | None:
        """The gold passage a reading item puts in context: the first gold passage whose text
        (``texts``: id -> reader text) holds a gold answer, else the first gold passage; None
        without gold passages. A KILT page has many passages; most do not hold the answer."""
        gold = self._gold(ex)[0]
        if not gold:
            return None
        if texts is not None and ex.answers:
            from imprag_ray.eval.metrics import answer_in_text  # lazy: eval imports this module

            for pid in gold:
                if answer_in_text(texts.get(pid, ""), ex.answers):
                    return pid
        return gold[0]
