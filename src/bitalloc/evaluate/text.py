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
import codecs
import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

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


SMALL_TEXT_BYTES = 4 << 20  # a text file up to this size is read and tokenized whole
LARGE_TEXT_CAP = 4 << 20  # of a larger file, bitalloc reads at most its first this many bytes
CHUNK_BYTES = 256 << 10  # calibration tokenizes a larger file in chunks of about this size, cut at line ends
FIRST_PREFIX = 64 << 10  # evaluation reads a larger file's first 64 KB, then twice as much, ... until enough


@dataclass(frozen=True)
class LargeText:
    """A text file over ``SMALL_TEXT_BYTES``, never read whole; decoded
    strictly, and read only as far as the windows need:

    - evaluation windows (consecutive from the start): the first 64 KB,
      128 KB, ... (cut at a line end), each prefix tokenized in one call,
      until it holds enough tokens; the tokens used are those of the whole
      text (the few hundred past them are a margin), up to LARGE_TEXT_CAP;
    - calibration windows (spread over the text): its first LARGE_TEXT_CAP
      bytes, tokenized in chunks of about CHUNK_BYTES cut at line ends (a
      token that would span a cut is split there).

    Memory and time stay bounded whatever the file's size."""

    path: str
    encoding: str
    size: int  # bytes

    def chunks(self, limit: int | None = None, chunk: int = CHUNK_BYTES) -> Iterator[str]:
        """The decoded text in pieces of about ``chunk`` bytes, each ending at a
        line end (the last at ``limit`` bytes or the end of the file)."""
        decoder = codecs.getincrementaldecoder(check_encoding(self.encoding))(errors="strict")
        done, pending = 0, ""
        with open(self.path, "rb") as f:
            while limit is None or done < limit:
                raw = f.read(chunk if limit is None else min(chunk, limit - done))
                last = not raw or (limit is not None and done + len(raw) >= limit)
                try:
                    piece = pending + decoder.decode(raw, final=last)
                except UnicodeDecodeError as e:
                    raise BitallocError(f"Text file {self.path!r} is not valid {self.encoding} (near byte offset "
                                        f"{done + e.start}). Convert it to UTF-8, or name its encoding with "
                                        "--encoding (e.g. latin-1).") from None
                done += len(raw)
                if "\x00" in piece:
                    raise BitallocError(f"Text file {self.path!r} holds NUL characters: it looks binary, not text. "
                                        "Pass a text file.")
                cut = len(piece) if last else piece.rfind("\n") + 1
                if not cut and len(piece) >= chunk:  # a very long line: cut at a space, or anywhere
                    cut = piece.rfind(" ") + 1 or len(piece)
                if cut:
                    yield piece[:cut]
                pending = piece[cut:]
                if last:
                    return

    def head(self, limit: int) -> str:
        """The decoded text of about its first ``limit`` bytes, cut at a line end."""
        return "".join(self.chunks(limit, chunk=min(limit, 1 << 20)))

    def digest(self) -> str:
        """sha256 of the bytes bitalloc can read (the first LARGE_TEXT_CAP) and of the file's size."""
        h = hashlib.sha256(f"{self.size}:".encode())
        with open(self.path, "rb") as f:
            h.update(f.read(LARGE_TEXT_CAP))
        return h.hexdigest()


Text = Union[str, LargeText]


def text_digest(text: Text) -> str:
    return text.digest() if isinstance(text, LargeText) else hashlib.sha256(text.encode()).hexdigest()


def token_ids(tokenizer, text: Text, needed: int | None = None) -> list[int]:
    """The token ids of ``text`` (no special tokens). A string is tokenized
    whole; a ``LargeText`` as its docstring says: with ``needed``, from the
    start until there are that many tokens and a margin, else over its first
    LARGE_TEXT_CAP bytes in chunks."""
    if not isinstance(text, LargeText):
        return tokenizer(text, add_special_tokens=False).input_ids
    if needed is None:
        ids: list[int] = []
        for piece in text.chunks(LARGE_TEXT_CAP):
            ids.extend(tokenizer(piece, add_special_tokens=False).input_ids)
        return ids
    limit = FIRST_PREFIX
    while True:
        ids = tokenizer(text.head(limit), add_special_tokens=False).input_ids
        if len(ids) >= needed + 256 or limit >= min(LARGE_TEXT_CAP, text.size):
            return ids
        limit *= 2


def read_text_file(path: str, encoding: str = "utf-8") -> Text:
    """A user's text file, decoded strictly: bytes that are not valid in
    ``encoding`` are an error, never silently replaced. A file over
    SMALL_TEXT_BYTES comes back as a ``LargeText``, read only as needed."""
    if path == WIKITEXT2:
        return wikitext2("test")
    p = Path(path).expanduser()
    if not p.is_file():
        what = ("is a folder" if p.is_dir() else
                "is not a regular file (a device, pipe or socket): bitalloc reads a text file from its start more "
                "than once" if p.exists() else "does not exist")
        raise BitallocError(f"Text file {path!r} {what}. Pass a UTF-8 text file with --text.")
    size = p.stat().st_size
    if size > SMALL_TEXT_BYTES:
        large = LargeText(str(p), encoding, size)
        next(large.chunks(CHUNK_BYTES), None)  # an undecodable or binary start fails now
        return large
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


def calibration_text(path: str | None, encoding: str = "utf-8") -> Text:
    if path == WIKITEXT2:
        return wikitext2("train")  # disjoint from the 'test' split used for evaluation
    return read_text_file(path, encoding) if path else wiki_text("calib")
