"""Fine-tune data: reading, packing, the seeded shuffle, the batch stream across epochs and resumes, MLM masks,
and the too-little-text errors. No model, a few seconds."""

import pytest
import torch

from hf_posenc.training.config import DataArgs
from hf_posenc.training.data import (
    Blocks, DataError, EpochShuffle, check_enough_blocks, chunks, eval_windows, load_corpus, mask_for_mlm, mask_seed,
    token_stream,
)


def corpus(tiny_tokenizer, tmp_path, text=None, seq_len=32, longest_eval=128, **data):
    if text is not None:
        (tmp_path / "a.txt").write_text(text)
        data.setdefault("files", [str(tmp_path / "a.txt")])
    return load_corpus(DataArgs(**data), tiny_tokenizer, "causal", seq_len, longest_eval)


def test_packing_joins_documents_with_eos_and_fills_every_block(tiny_tokenizer, tmp_path, text_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "one.txt").write_text("To be, or not to be.")
    (tmp_path / "docs" / "two.md").write_text("That is the question.")
    (tmp_path / "docs" / "skip.bin").write_text("not text")
    stream = token_stream(tiny_tokenizer, ["To be, or not to be.", "That is the question."], 2)
    data = DataArgs(files=[str(tmp_path / "docs"), str(text_path)])
    c = load_corpus(data, tiny_tokenizer, "causal", seq_len=32, longest_eval=64)
    assert torch.equal(c.train[: stream.numel()], stream)  # folder files first (sorted), .bin ignored
    assert (stream == tiny_tokenizer.eos_token_id).sum() == 2 and stream[-1] == tiny_tokenizer.eos_token_id
    blocks = c.blocks(32)
    assert blocks.shape == (c.train.numel() // 32, 32) and torch.equal(blocks.flatten(), c.train[: blocks.numel()])
    assert c.heldout.numel() >= 64 and "2 file(s)" not in c.description  # 3 files read


def test_heldout_is_the_end_of_the_stream_or_separate_files(tiny_tokenizer, tmp_path, text_path):
    whole = token_stream(tiny_tokenizer, [text_path.read_text()], tiny_tokenizer.eos_token_id)
    c = load_corpus(DataArgs(files=[str(text_path)], heldout_fraction=0.1), tiny_tokenizer, "causal", 32, 128)
    assert torch.equal(torch.cat([c.train, c.heldout]), whole)
    assert abs(c.heldout.numel() - 0.1 * whole.numel()) <= 1
    (tmp_path / "h.txt").write_text(text_path.read_text()[:3000])
    c = load_corpus(DataArgs(files=[str(text_path)], heldout_files=[str(tmp_path / "h.txt")]),
                    tiny_tokenizer, "causal", 32, 128)
    assert c.train.numel() == whole.numel() and c.heldout.numel() < 3000


def test_max_train_tokens_caps_the_stream(tiny_tokenizer, text_path):
    c = load_corpus(DataArgs(files=[str(text_path)], max_train_tokens=500), tiny_tokenizer, "causal", 32, 64)
    assert c.train.numel() == 500


def test_chunks_split_long_text_at_paragraphs_and_lose_nothing():
    text = ("line one\nline two\n\n" * 50) + "tail"
    pieces = list(chunks(text, size=100))
    assert "".join(pieces) == text and all(len(p) <= 100 for p in pieces)
    assert all(p.endswith("\n\n") for p in pieces[:-1])


def test_missing_data_fails(tiny_tokenizer, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        corpus(tiny_tokenizer, tmp_path, files=[str(tmp_path / "nope.txt")])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="holds no .txt/.md files"):
        corpus(tiny_tokenizer, tmp_path, files=[str(tmp_path / "empty_dir")])


def test_empty_data_fails(tiny_tokenizer, tmp_path):
    with pytest.raises(DataError, match="holds no text"):
        corpus(tiny_tokenizer, tmp_path, text="")
    with pytest.raises(DataError, match="holds no text"):
        corpus(tiny_tokenizer, tmp_path, text="\n\n  \n")


def test_text_shorter_than_one_sequence_fails(tiny_tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"shorter than one sequence \(seq_len=512\)"):
        corpus(tiny_tokenizer, tmp_path, text="Full fathom five thy father lies. " * 20, seq_len=512)


def test_heldout_too_short_for_the_longest_eval_fails(tiny_tokenizer, tmp_path, text_path):
    with pytest.raises(DataError, match="evaluation needs a window of 100000"):
        corpus(tiny_tokenizer, tmp_path, files=[str(text_path)], longest_eval=100_000)


def test_too_few_blocks_for_one_batch_fails():
    check_enough_blocks(8, batch_size=4, processes=2, seq_len=32)
    with pytest.raises(DataError, match="batch_size x processes = 16"):
        check_enough_blocks(8, batch_size=8, processes=2, seq_len=32)


def test_dataset_source_reads_a_column(tiny_tokenizer, tmp_path, text_path):
    import json

    rows = [{"body": para} for para in text_path.read_text().split("\n\n") if para.strip()]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = DataArgs(dataset="json", data_files=[str(tmp_path / "d.jsonl")], column="body")
    c = load_corpus(data, tiny_tokenizer, "causal", 32, 64)
    assert c.train.numel() > 10_000 and "dataset 'json'" in c.description
    with pytest.raises(DataError, match="column 'text' is not in dataset"):
        load_corpus(DataArgs(dataset="json", data_files=[str(tmp_path / "d.jsonl")]), tiny_tokenizer, "causal", 32, 64)


def test_shuffle_depends_only_on_seed_and_epoch():
    a, b = EpochShuffle(50, seed=1), EpochShuffle(50, seed=1)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    b.set_epoch(1)
    assert list(a) != list(b) and sorted(b) == list(range(50))
    assert list(EpochShuffle(50, seed=2)) != list(a)


def test_batch_stream_resumes_mid_epoch_and_crosses_epochs():
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from hf_posenc.training.loop import batch_stream

    accelerator = Accelerator(cpu=True)
    blocks = torch.arange(20).view(20, 1)

    def first_ids(start, n):
        sampler = EpochShuffle(20, seed=0)
        loader = accelerator.prepare(DataLoader(Blocks(blocks), batch_size=4, sampler=sampler, drop_last=True))
        stream = batch_stream(accelerator, loader, sampler, start)
        return [next(stream)[:, 0].tolist() for _ in range(n)]

    straight = first_ids(0, 12)  # 5 batches per epoch: crosses two epoch ends
    assert straight[5] != straight[0] and sorted(sum(straight[:5], [])) == list(range(20))
    for start in (3, 5, 7):
        assert first_ids(start, 12 - start) == straight[start:]


def test_mlm_masks_depend_only_on_the_seed(tiny_tokenizer):
    from transformers import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(tiny_tokenizer, mlm_probability=0.15)
    ids = torch.randint(4, 320, (4, 64))
    ids[:, 10] = tiny_tokenizer.eos_token_id
    state = torch.get_rng_state()
    a, b = mask_for_mlm(collator, ids, 5), mask_for_mlm(collator, ids, 5)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    masked = a["labels"] != -100
    assert 0.05 < masked.float().mean() < 0.3 and not masked[:, 10].any()  # separators are never masked
    assert torch.equal(a["labels"][masked], ids[masked])
    assert not torch.equal(mask_for_mlm(collator, ids, 6)["labels"], a["labels"])
    assert mask_seed(0, 3, 0) != mask_seed(0, 3, 1) != mask_seed(0, 4, 0)


def test_eval_windows_cover_the_budget():
    heldout = torch.arange(1000)
    assert eval_windows(heldout, 100, 250).shape == (3, 100)
    assert eval_windows(heldout, 100, 10).shape == (1, 100)
    assert eval_windows(heldout, 300, 10_000).shape == (3, 300)


def test_unknown_named_corpus_fails(tiny_tokenizer):
    with pytest.raises(DataError, match="data.text: unknown source 'no-such-corpus'"):
        load_corpus(DataArgs(text="no-such-corpus"), tiny_tokenizer, "causal", 32, 64)
