from __future__ import annotations

from pathlib import Path

import pytest

from llmo.inference.tokenizer import ChatTemplateError, IncrementalDetokenizer, TextTokenizer

TEXT = "Café naïve 日本語 emoji 🙂 ünïcödé 👩‍👩‍👧 done"


def test_incremental_detokenization_never_splits_a_character(tokenizer_files: Path) -> None:
    tok = TextTokenizer.from_dir(tokenizer_files)
    ids = tok.encode(TEXT)
    # Byte-level BPE splits rare characters into byte tokens; check that some delta would be partial.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tok)
    detok.prime(tok.encode("Prompt:"))
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids)


def test_flush_emits_a_trailing_incomplete_character(tokenizer_files: Path) -> None:
    tok = TextTokenizer.from_dir(tokenizer_files)
    ids = tok.encode("🙂")
    detok = IncrementalDetokenizer(tok)
    partial = "".join(detok.add(i) for i in ids[:-1])
    assert partial == ""
    assert detok.flush() == tok.decode(ids[:-1])


def test_chat_template(tokenizer_files: Path, tmp_path: Path) -> None:
    tok = TextTokenizer.from_dir(tokenizer_files)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "user: hi\nassistant:"
    assert tok.encode_chat([{"role": "user", "content": "hi"}]) == tok.encode(text, add_special_tokens=False)
    (tmp_path / "tokenizer.json").write_bytes((tokenizer_files / "tokenizer.json").read_bytes())
    bare = TextTokenizer.from_dir(tmp_path)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
