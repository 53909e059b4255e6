"""PassageLocator.from_store: the training inputs' provenance locator over the memory-mapped passage
store's sorted pid index (re2g.data.provenance.SortedPidLocator) answers exactly as the dict-of-pages
locator built from the same pids (``PassageLocator.from_pids``), which re2g/train/api.py used before."""

from __future__ import annotations

import random

import numpy as np
import pytest

from re2g.data import provenance
from re2g.data.passage_files import load_passage_lookup, write_passages
from re2g.data.provenance import PassageLocator, SortedPidLocator

TRICKY = ["1::[0,0]", "1::[2,3]", "1::[1,1]", "1::[1,1]#2", "12::[0,4]", "1::x::[5,5]", "1:[0,0]", "1::[a,b]",
          "é::[3,3]", "é::[0,1]#3", "q::[١,٢]", "n::[1,2]\n", "plain-id", "7::[0,0]#0", ":: [1,1]", "::[1,1]",
          "x::[1,1]y", "Ω::[10,12]", "1::[2,3]#10"]


def _store(tmp_path, pids):
    rows = [{"pid": p, "title": f"T{i}", "text": f"text {i}", "wikipedia_id": None} for i, p in enumerate(pids)]
    write_passages(rows, str(tmp_path / "p"))
    return load_passage_lookup(str(tmp_path / "p"))


def _provenance(wid, start=None, end=None):
    return {"wikipedia_id": wid, "start_paragraph_id": start, "end_paragraph_id": end}


def test_same_answers_as_the_dict_locator(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "PARSE_CHUNK", 7)          # several parse chunks
    rng = random.Random(0)
    pids = TRICKY + [f"r{rng.randrange(40)}::[{s},{s + rng.randrange(3)}]" + (f"#{k}" if k else "")
                     for s, k in ((rng.randrange(9), rng.randrange(3)) for _ in range(300))]
    store = _store(tmp_path, pids)
    new, old = PassageLocator.from_store(store), PassageLocator.from_pids(store)
    assert isinstance(new, SortedPidLocator) and not isinstance(old, SortedPidLocator)
    assert len(new) == len(old) and new.pages == old.pages
    pages = {p.split("::")[0] for p in pids} | {"1::x", "é", "q", "n", "Ω", "", "nope", "1:"}
    for wid in sorted(pages):
        assert new.passages(wid) == old.passages(wid), wid
        assert (wid in new) == (wid in old) and new.unranged(wid) == old.unranged(wid) == (), wid
        for span in [(None, None), (0, 0), (1, 2), (2, 3), (0, 9), (5, 5)]:
            prov = [_provenance(wid, *span)]
            for t in (0.75, 0.3, 1.0):
                assert new.positive_pids(prov, t) == old.positive_pids(prov, t), (wid, span, t)
    assert new.passages("1") == ((0, 0, "1::[0,0]"), (1, 1, "1::[1,1]"), (1, 1, "1::[1,1]#2"), (2, 3, "1::[2,3]"),
                                 (2, 3, "1::[2,3]#10"))
    assert new.passages("1::x") == ((5, 5, "1::x::[5,5]"),) and new.passages("q") == ((1, 2, "q::[١,٢]"),)
    assert new.passages("n") == ((1, 2, "n::[1,2]\n"),)            # Python's $ before a final newline
    assert 12 not in new and new.passages(12) == old.passages(12) == ((0, 4, "12::[0,4]"),)


def test_tiny_corpus_locator_equals_from_pids(tiny_passages):
    """The sample task's passages: every page, and the training positives of its queries."""
    store = load_passage_lookup(str(tiny_passages))
    new, old = PassageLocator.from_store(store), PassageLocator.from_pids(store)
    assert len(new) == len(old) == len(store) and new.pages == old.pages
    for wid in {p.split("::")[0] for p in store}:
        assert new.passages(wid) == old.passages(wid)


def test_other_mappings_and_bad_arrays():
    loc = PassageLocator.from_store({"3::[0,1]": ("T", "x", None)})   # a plain mapping: from_pids
    assert not isinstance(loc, SortedPidLocator) and loc.passages("3") == ((0, 1, "3::[0,1]"),)
    with pytest.raises(ValueError, match="1-d bytes array"):
        SortedPidLocator(np.array([1, 2]))
    empty = SortedPidLocator(np.array([], dtype="S4"))
    assert len(empty) == 0 and empty.pages == 0 and empty.passages("1") == ()
