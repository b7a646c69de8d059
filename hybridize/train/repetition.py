"""Where a document starts repeating itself.

A small teacher sampled at temperature 0.9 falls into loops. In the retention recipe's corpora (SmolLM2-135M,
2026-12-02), 10-12% of the 128-token windows of its 768-token samples are more than half repeated 4-grams (by
`repeated_ngrams`), against 0.03% in Shakespeare's plays; of the 4-grams in a 500-token stretch of its 2,047-token
samples, 16% repeat one seen earlier in the stretch at their start and 56% at tokens 1,500-2,000. Distilling on a
loop teaches the student to copy the loop, so a source can be cut where it begins (`max_repetition`)."""

from __future__ import annotations

import numpy as np

NGRAM = 4
WINDOW = 128

# odd 64-bit multipliers: the n-gram hash is a polynomial in them, wrapping modulo 2**64
_MULT = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93], dtype=np.uint64)


def repeated_ngrams(ids: np.ndarray, offsets: np.ndarray, n: int = NGRAM, window: int = WINDOW) -> np.ndarray:
    """A flag per n-gram start (aligned with `ids`): this n-gram, inside its document, already began at one of the
    `window` positions before it. Positions whose n-gram would run past the end of their document are False."""
    N = len(ids)
    if N < n:
        return np.zeros(N, dtype=bool)
    doc = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    ends = offsets[1:][doc]
    pos = np.arange(N)
    valid = pos + n <= ends
    x = ids.astype(np.uint64)
    h = np.zeros(N, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n):
            shifted = np.zeros(N, dtype=np.uint64)
            shifted[: N - i] = x[i:]
            h = h * _MULT[i % len(_MULT)] + shifted + np.uint64(i + 1)
    order = np.lexsort((pos, h))  # equal n-grams next to each other, earlier positions first
    same = h[order[1:]] == h[order[:-1]]
    prev = np.full(N, -1, dtype=np.int64)
    prev[order[1:][same]] = order[:-1][same]
    ok = prev >= 0
    rep = np.zeros(N, dtype=bool)
    j = pos[ok]
    p = prev[ok]
    rep[j] = valid[j] & valid[p] & (doc[p] == doc[j]) & (j - p <= window)
    return rep


def repetition_cuts(ids: np.ndarray, offsets: np.ndarray, threshold: float, n: int = NGRAM,
                    window: int = WINDOW) -> np.ndarray:
    """Each document's kept length: up to the first window of `window` n-grams of which more than `threshold` repeat
    (`repeated_ngrams`), or the whole document. Documents shorter than one window are kept whole."""
    lengths = np.diff(offsets).astype(np.int64)
    keep = lengths.copy()
    rep = repeated_ngrams(ids, offsets, n, window).astype(np.int64)
    if not len(rep):
        return keep
    c = np.concatenate([[0], np.cumsum(rep)])
    doc = np.repeat(np.arange(len(lengths)), lengths)
    start = offsets[:-1][doc]
    end = np.arange(len(ids)) + 1  # a window ends after n-gram e; it holds n-grams e - window + 1 .. e
    first = end - window
    full = (first >= start) & (end + n - 1 <= offsets[1:][doc])  # every n-gram of the window inside the document
    share = np.zeros(len(ids))
    share[full] = (c[end[full]] - c[first[full]]) / window
    bad = np.nonzero(full & (share > threshold))[0]
    if len(bad):
        docs, idx = np.unique(doc[bad], return_index=True)
        keep[docs] = first[bad[idx]] - start[bad[idx]]
    return keep


def cut_repetition(ids: np.ndarray, offsets: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, int]:
    """The documents cut where they start repeating themselves (`repetition_cuts`): new ids, offsets (the same number
    of documents, some possibly empty, so that per-document choices such as the held-out split keep their meaning)
    and how many tokens were cut."""
    keep = repetition_cuts(ids, offsets, threshold)
    lengths = np.diff(offsets)
    if (keep == lengths).all():
        return ids, offsets, 0
    mask = np.arange(len(ids)) - np.repeat(offsets[:-1], lengths) < np.repeat(keep, lengths)
    new_offsets = np.concatenate([[0], np.cumsum(keep)]).astype(np.int64)
    return ids[mask], new_offsets, int(len(ids) - mask.sum())
