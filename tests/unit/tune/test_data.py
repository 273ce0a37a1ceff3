"""Dataset parsing, loss masks, truncation, the eval split and batching."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmo.tune.data import (
    IGNORE_INDEX,
    DatasetError,
    Record,
    collate,
    epoch_order,
    read_jsonl,
    split_eval,
    tokenize,
)

EOS = 0


class CharEncoder:
    """One token per character (code point + 1, so 0 stays the end-of-text id)."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) + 1 for c in text]


def write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_text_lines_learn_every_token_and_end_with_eos(tmp_path: Path) -> None:
    parsed = read_jsonl(write(tmp_path, '{"text": "abc"}'))
    [example] = tokenize(parsed.records, CharEncoder(), EOS, max_length=16)
    assert example.input_ids == [98, 99, 100, EOS]
    assert example.labels == example.input_ids


def test_prompt_completion_masks_the_prompt(tmp_path: Path) -> None:
    parsed = read_jsonl(write(tmp_path, '{"prompt": "Q:", "completion": "ok"}'))
    [example] = tokenize(parsed.records, CharEncoder(), EOS, max_length=16)
    assert example.input_ids == [82, 59, 112, 108, EOS]
    assert example.labels == [IGNORE_INDEX, IGNORE_INDEX, 112, 108, EOS]
    assert example.label_tokens == 3


def test_empty_prompt_keeps_one_context_token() -> None:
    [example] = tokenize([Record(1, prompt="", completion="xy")], CharEncoder(), EOS, max_length=8)
    assert example.input_ids == [121, 122, EOS]
    assert example.labels == [IGNORE_INDEX, 122, EOS]


def test_long_text_is_cut_into_windows() -> None:
    examples = tokenize([Record(1, text="abcdefghij")], CharEncoder(), EOS, max_length=4)
    assert [len(e.input_ids) for e in examples] == [4, 4, 3]  # 10 characters + eos
    assert [t for e in examples for t in e.input_ids] == [*CharEncoder().encode("abcdefghij"), EOS]


def test_long_pair_drops_the_start_of_the_prompt_first() -> None:
    [example] = tokenize([Record(1, prompt="0123456789", completion="ab")], CharEncoder(), EOS, max_length=6)
    assert example.input_ids == [*CharEncoder().encode("789"), *CharEncoder().encode("ab"), EOS]
    assert example.labels[:3] == [IGNORE_INDEX] * 3
    [clipped] = tokenize([Record(1, prompt="p", completion="abcdefgh")], CharEncoder(), EOS, max_length=4)
    assert len(clipped.input_ids) == 4 and clipped.labels[0] == IGNORE_INDEX


def test_collate_pads_without_loss() -> None:
    examples = tokenize([Record(1, text="abc"), Record(2, prompt="x", completion="y")], CharEncoder(), EOS, 8)
    batch = collate(examples, pad_id=7)
    assert batch["input_ids"].tolist() == [[98, 99, 100, EOS], [121, 122, EOS, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[98, 99, 100, EOS], [IGNORE_INDEX, 122, EOS, IGNORE_INDEX]]


@pytest.mark.parametrize(("line", "reason"), [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object, got list"),
    ('{"other": 1}', 'needs a "text" field'),
    ('{"text": ""}', '"text" must be a non-empty string'),
    ('{"text": 5}', '"text" must be a non-empty string'),
    ('{"prompt": 3, "completion": "x"}', '"prompt" must be a string'),
    ('{"prompt": "q"}', '"completion" must be a non-empty string'),
    ('{"text": "a", "prompt": "q", "completion": "c"}', "use one form per line"),
])
def test_a_bad_line_is_named_by_number(tmp_path: Path, line: str, reason: str) -> None:
    path = write(tmp_path, '{"text": "fine"}', "", line, '{"text": "also fine"}')
    with pytest.raises(DatasetError) as caught:
        read_jsonl(path)
    assert caught.value.line == 3  # the blank line still counts
    assert f"{path}: line 3: " in str(caught.value) and reason in str(caught.value)


def test_skip_bad_lines_counts_them(tmp_path: Path) -> None:
    parsed = read_jsonl(write(tmp_path, '{"text": "a"}', "oops", '{"text": 1}', '{"text": "b"}'),
                        skip_bad_lines=True)
    assert [r.text for r in parsed.records] == ["a", "b"]
    assert [line for line, _ in parsed.skipped] == [2, 3]


def test_a_dataset_without_usable_lines_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no usable lines \\(1 bad"):
        read_jsonl(write(tmp_path, "bad"), skip_bad_lines=True)


def test_non_utf8_bytes_name_their_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DatasetError, match="line 2: not UTF-8"):
        read_jsonl(path)


def test_eval_split_is_seeded_and_disjoint() -> None:
    records = [Record(i, text=str(i)) for i in range(1, 21)]
    train, held = split_eval(records, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert {r.line for r in train}.isdisjoint({r.line for r in held})
    assert split_eval(records, 0.25, seed=3) == (train, held)
    assert split_eval(records, 0.25, seed=4) != (train, held)
    assert split_eval(records, 0.0, seed=3)[1] == []
    with pytest.raises(ValueError, match="too few"):
        split_eval(records[:1], 0.5, seed=0)


def test_epoch_order_depends_only_on_seed_and_epoch() -> None:
    assert epoch_order(10, 1, 0) == epoch_order(10, 1, 0)
    assert epoch_order(10, 1, 0) != epoch_order(10, 1, 1)
    assert sorted(epoch_order(10, 1, 2)) == list(range(10))
