"""The offline CLIP tokenizer gives the reference ids, masks and decoded strings."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.language.tokenizer import BOS_ID, EOS_ID, VOCAB_PATH, ClipTokenizer, clean_text


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


def test_shipped_vocabulary_is_openai_clip_bpe(tokenizer: ClipTokenizer) -> None:
    digest = hashlib.sha256(VOCAB_PATH.read_bytes()).hexdigest()
    assert digest.startswith("924691ac") and digest.endswith("6804a")
    assert tokenizer.vocab_size == 49408
    assert tokenizer.encoder["<|startoftext|>"] == BOS_ID
    assert tokenizer.encoder["<|endoftext|>"] == EOS_ID


def test_all_reference_strings_tokenise_exactly(tokenizer: ClipTokenizer, reference_root: Path) -> None:
    checks = json.loads((reference_root / "xdecoder_focalt" / "tokenizer_checks.json").read_text())["checks"]
    assert len(checks) == 13
    input_ids, attention_mask = tokenizer.encode([c["text"] for c in checks])
    assert input_ids.dtype == torch.int64 and attention_mask.dtype == torch.int64
    for row, check in enumerate(checks):
        assert input_ids[row].tolist() == check["input_ids"], check["text"]
        assert attention_mask[row].tolist() == check["attention_mask"], check["text"]


def test_case_token_ids_match(tokenizer: ClipTokenizer, reference_root: Path) -> None:
    case_dir = reference_root / "xdecoder_focalt" / "case_a"
    case = json.loads((case_dir / "case.json").read_text())["tasks"]
    seg = np.load(case_dir / "seg.npz")
    ids, mask = tokenizer.encode(case["seg"]["first_class_prompts"])
    assert np.array_equal(ids.numpy(), seg["text.first_class_prompt_input_ids"])
    assert np.array_equal(mask.numpy(), seg["text.first_class_prompt_attention_mask"])

    grounding = np.load(case_dir / "grounding.npz")
    ids, mask = tokenizer.encode([case["grounding"]["phrase"]])
    assert np.array_equal(ids.numpy(), grounding["text.input_ids"])
    assert np.array_equal(mask.numpy(), grounding["text.attention_mask"])

    retrieval = np.load(case_dir / "retrieval.npz")
    ids, _ = tokenizer.encode(case["retrieval"]["captions"])
    assert np.array_equal(ids.numpy(), retrieval["retrieval.text_input_ids"])


def test_hand_checked_encoding(tokenizer: ClipTokenizer) -> None:
    # "a" is byte 97 -> "a</w>" has id 256 + (97 - 33) = 320; "." -> 256 + 13 = 269.
    ids, mask = tokenizer.encode(["A .", ""], context_length=6)
    assert ids.tolist() == [[BOS_ID, 320, 269, EOS_ID, EOS_ID, EOS_ID], [BOS_ID, EOS_ID] + [EOS_ID] * 4]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]


def test_truncation_keeps_eos_last(tokenizer: ClipTokenizer) -> None:
    ids, mask = tokenizer.encode(["a " * 10], context_length=5)
    assert ids.tolist() == [[BOS_ID, 320, 320, 320, EOS_ID]]
    assert mask.tolist() == [[1, 1, 1, 1, 1]]


def test_clean_text() -> None:
    assert clean_text("  Fish &amp;\tChips\n ") == "fish & chips"


def test_decode_matches_reference_caption(tokenizer: ClipTokenizer, reference_root: Path) -> None:
    case = json.loads((reference_root / "xdecoder_focalt" / "case_a" / "case.json").read_text())
    captioning = case["tasks"]["captioning"]
    assert tokenizer.decode(captioning["final_tokens"]) == captioning["batch_decode_raw"]


def test_decode_joins_words_and_cleans_spaces(tokenizer: ClipTokenizer) -> None:
    ids, _ = tokenizer.encode(["A photo of a dog, it's big!"], context_length=16)
    # Words end in "</w>" -> spaces; " ," " 's" " !" lose their space; specials are glued on.
    expected = "<|startoftext|>a photo of a dog, it's big! <|endoftext|>"
    assert tokenizer.decode(ids[0, :12].tolist()) == expected
    assert tokenizer.decode(torch.tensor([BOS_ID, 320])) == "<|startoftext|>a"
