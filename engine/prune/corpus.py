"""English text that ships with Python, for calibration and distillation: no download, ever.

The corpus is built at run time from the standard library's own documentation: the reference
topics of `pydoc_data.topics` (what `help("if")` prints), the docstrings of a fixed list of
modules and their members, then of the methods of the classes those modules define, split into
sentences. Each sentence lands in one split by a hash of its text, so the
calibration / train / validation splits do not depend on the order or on the Python version's
other sentences. `--text FILE` (one passage per line, UTF-8) replaces it.
"""
from __future__ import annotations

import importlib
import inspect
import re
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

from .granularity import PruneError

MODULES = ("argparse collections functools itertools json logging os pathlib re subprocess threading "
           "asyncio email http.client urllib.request csv datetime decimal fractions statistics textwrap "
           "typing unittest sqlite3 zipfile tarfile shutil socket ssl string heapq bisect enum dataclasses "
           "inspect ast random calendar "
           # added 2026-12-07 for more distillation text
           "abc base64 bz2 codecs concurrent.futures configparser contextlib copy difflib doctest filecmp "
           "fnmatch ftplib getopt gettext glob gzip hashlib hmac html.parser http.server imaplib io "
           "ipaddress locale lzma mailbox mimetypes multiprocessing numbers operator optparse pickle "
           "pkgutil platform plistlib poplib pprint queue sched secrets selectors shelve shlex signal "
           "smtplib socketserver struct sys sysconfig tempfile timeit tokenize traceback types uuid "
           "warnings weakref xml.dom.minidom xml.etree.ElementTree zipimport zoneinfo").split()
MIN_CHARS, MAX_CHARS = 30, 300
SPLITS = ("calib", "train", "val")


@dataclass
class Corpus:
    calib: list[str]
    train: list[str]
    val: list[str]
    source: str

    def samples(self, split: str, n: int) -> list[str]:
        """`n` texts of `split` in order, cycling when the split is shorter."""
        texts = getattr(self, split)
        return [texts[i % len(texts)] for i in range(n)] if texts else []


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
            if MIN_CHARS <= len(s) <= MAX_CHARS and not s.startswith((">>>", "..."))]


def stdlib_sentences() -> list[str]:
    """Deduplicated sentences, in a fixed order, of pydoc_data's topics and the modules' docstrings."""
    from pydoc_data.topics import topics
    docs = [topics[k] for k in sorted(topics)]
    with warnings.catch_warnings():  # getmembers touches deprecated aliases (typing.io, ...)
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in MODULES:
            mod = importlib.import_module(name)
            docs += [mod.__doc__] + [getattr(v, "__doc__", None) for _, v in inspect.getmembers(mod)
                                     if not inspect.ismodule(v)]  # submodules: there when imported
        for name in MODULES:  # then the methods of the classes each module defines
            for _, cls in inspect.getmembers(importlib.import_module(name), inspect.isclass):
                if cls.__module__ == name:
                    docs += [getattr(v, "__doc__", None) for v in vars(cls).values()]
    seen, out = set(), []
    for doc in docs:
        if isinstance(doc, str):
            for s in _sentences(doc):
                if s not in seen:
                    seen.add(s)
                    out.append(s)
    return out


def read_text(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file; a clear PruneError for a missing, non-UTF-8 or empty one."""
    path = Path(path)
    if not path.is_file():
        raise PruneError(f"--text {str(path)!r}: no such file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise PruneError(f"--text {str(path)!r}: not UTF-8 text (byte {e.start}: {e.reason}); give one "
                         "passage per line in UTF-8") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) < 3:
        raise PruneError(f"--text {str(path)!r}: holds {len(lines)} non-empty line(s); calibration, training "
                         "and validation need at least 3 passages (one per line)")
    return lines


def split(sentences: list[str], source: str) -> Corpus:
    """1 in 10 sentences to validation, 1 in 10 to calibration, the rest to training, by CRC-32 of the
    text; a split that comes out empty borrows from training so none is empty."""
    parts = {k: [] for k in SPLITS}
    for s in sentences:
        h = zlib.crc32(s.encode()) % 10
        parts["val" if h == 0 else "calib" if h == 1 else "train"].append(s)
    for k in ("val", "calib"):
        if not parts[k]:
            parts[k].append(parts["train"].pop())
    return Corpus(parts["calib"], parts["train"], parts["val"], source)


def load(text_file: str | Path | None = None) -> Corpus:
    if text_file is not None:
        return split(read_text(text_file), f"file {str(text_file)!r}")
    return split(stdlib_sentences(), "Python standard library documentation (pydoc_data.topics, docstrings)")
