"""The built-in text corpus: deterministic, disjoint splits chosen by each sentence's own text."""
from __future__ import annotations

import importlib
import inspect
import zlib

from engine.prune import corpus


def test_corpus_is_deterministic_with_disjoint_splits_chosen_by_text():
    a, b = corpus.load(), corpus.load()
    assert (a.calib, a.train, a.val) == (b.calib, b.train, b.val)
    assert len(a.train) > 5000 and len(a.val) > 500 and len(a.calib) > 500
    splits = {"calib": set(a.calib), "train": set(a.train), "val": set(a.val)}
    assert not (splits["calib"] & splits["train"] or splits["calib"] & splits["val"] or splits["train"] & splits["val"])
    for name, texts in splits.items():
        for s in texts:
            h = zlib.crc32(s.encode()) % 10
            assert name == ("val" if h == 0 else "calib" if h == 1 else "train"), s
            assert corpus.MIN_CHARS <= len(s) <= corpus.MAX_CHARS


def test_corpus_holds_module_member_and_method_docstrings():
    sentences = set(corpus.stdlib_sentences())
    mod = importlib.import_module(corpus.MODULES[-1])
    classes = [c for _, c in inspect.getmembers(mod, inspect.isclass) if c.__module__ == mod.__name__]
    methods = [v.__doc__ for c in classes for v in vars(c).values() if isinstance(getattr(v, "__doc__", None), str)]
    expected = [s for doc in [mod.__doc__] + methods for s in corpus._sentences(doc or "")]
    assert expected and set(expected) <= sentences
