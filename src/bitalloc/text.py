"""Offline English text: the Wikipedia sample that the PyPI package ``gensim``
ships, stripped of wiki markup and split into two disjoint parts.

The split is by article, fixed: in file order, after dropping redirects and
non-article pages, article i goes to *evaluation* when i is even and to
*calibration* when i is odd. No article, hence no sentence, is in both.
Inside an article only prose paragraphs are kept (at least 12 words, ending
in sentence punctuation), so captions, tables and lists do not skew the
perplexity.
"""

from __future__ import annotations

import bz2
import importlib.util
import os
import re
from pathlib import Path

from bitalloc.errors import BitallocError
from bitalloc.fileio import write_atomic

WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SPLIT_VERSION = 1
PARTS = ("eval", "calib")
_MIN_WORDS = 12


def cache_dir() -> Path:
    return Path(os.environ.get("BITALLOC_CACHE", Path.home() / ".cache" / "bitalloc"))


def wiki_dump_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise BitallocError("The offline text needs the package gensim: `pip install gensim` (make does this).")
    path = Path(list(spec.submodule_search_locations)[0]) / WIKI_FILE
    if not path.is_file():
        raise BitallocError(f"gensim is installed but its Wikipedia sample is missing at {path}.")
    return path


def clean_article(markup_free: str) -> str:
    """Prose paragraphs of one article, after gensim's ``filter_wiki``."""
    text = re.sub(r"'{2,}", "", markup_free)  # bold/italic quotes
    paragraphs = []
    for line in text.split("\n"):
        line = re.sub(r"\s+", " ", line).strip()
        if line.startswith("=") or len(line.split()) < _MIN_WORDS or line[-1] not in '.!?"':
            continue
        paragraphs.append(line)
    return "\n\n".join(paragraphs)


def _extract_articles(path: Path) -> list[str]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.BZ2File(path) as f:
        for _title, raw, _pid in extract_pages(f, filter_namespaces=("0",)):
            if raw.lstrip().lower().startswith("#redirect"):
                continue
            body = clean_article(filter_wiki(raw))
            if body:
                articles.append(body)
    return articles


def split_articles(articles: list[str]) -> dict[str, str]:
    return {
        "eval": "\n\n".join(a for i, a in enumerate(articles) if i % 2 == 0),
        "calib": "\n\n".join(a for i, a in enumerate(articles) if i % 2 == 1),
    }


def wiki_text(part: str) -> str:
    """The 'eval' or 'calib' part of the offline Wikipedia text (cached)."""
    if part not in PARTS:
        raise BitallocError(f"The 'part' parameter must be one of {list(PARTS)}. Got {part!r} instead.")
    cached = cache_dir() / f"wiki-v{SPLIT_VERSION}-{part}.txt"
    if not cached.is_file():
        parts = split_articles(_extract_articles(wiki_dump_path()))
        for name, text in parts.items():
            write_atomic(cache_dir() / f"wiki-v{SPLIT_VERSION}-{name}.txt", lambda tmp, t=text: Path(tmp).write_text(t))
    return cached.read_text()


WIKITEXT2 = "wikitext2"  # --text / --calib-text value that selects WikiText-2 through `datasets`


def wikitext2(split: str) -> str:
    """WikiText-2 (raw) through Hugging Face `datasets`: 'test' for evaluation,
    'train' for calibration. Needs the network or a local datasets cache."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise BitallocError("--text wikitext2 needs the package datasets: `pip install 'bitalloc[hub]'`.") from None
    try:
        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    except Exception as e:  # datasets raises many kinds when offline
        raise BitallocError(
            f"Could not load WikiText-2 ({e.__class__.__name__}): no network and no local cache. Use the offline "
            "default (omit --text) or pass a text file."
        ) from None
    return "".join(rows)


def check_encoding(name: str) -> str:
    """A codec name Python knows, normalised; a clear error otherwise."""
    import codecs

    try:
        return codecs.lookup(name).name
    except LookupError:
        raise BitallocError(f"--encoding {name!r} is not a text encoding Python knows; use e.g. utf-8, latin-1, "
                            "cp1252.") from None


def read_text_file(path: str, encoding: str = "utf-8") -> str:
    """A user's text file, decoded strictly: bytes that are not valid in
    ``encoding`` are an error, never silently replaced."""
    if path == WIKITEXT2:
        return wikitext2("test")
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a folder" if p.is_dir() else "does not exist"
        raise BitallocError(f"Text file {path!r} {what}. Pass a UTF-8 text file with --text.")
    raw = p.read_bytes()
    try:
        text = raw.decode(check_encoding(encoding))
    except UnicodeDecodeError as e:
        raise BitallocError(
            f"Text file {path!r} is not valid {encoding} (byte 0x{raw[e.start]:02x} at offset {e.start}). Convert it "
            "to UTF-8, or name its encoding with --encoding (e.g. latin-1)."
        ) from None
    if "\x00" in text:
        raise BitallocError(f"Text file {path!r} holds NUL characters: it looks binary, not text. Pass a text file.")
    if not text.strip():
        raise BitallocError(f"Text file {path!r} is empty.")
    return text


def calibration_text(path: str | None, encoding: str = "utf-8") -> str:
    if path == WIKITEXT2:
        return wikitext2("train")  # disjoint from the 'test' split used for evaluation
    return read_text_file(path, encoding) if path else wiki_text("calib")
