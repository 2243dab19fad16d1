"""Prompt templates and the CLIP-style text encoder: structure, causal truncation, reference parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import reference_checkpoint
from models.language.prompts import PROMPT_TEMPLATES, clean_class_name, prompts_for
from models.language.text_encoder import LanguageEncoder, TextEncoderConfig
from models.language.tokenizer import EOS_ID, ClipTokenizer
from models.reference_compare import compare_array

PREFIX = "sem_seg_head.predictor.lang_encoder."


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


def small_encoder(seed: int = 0) -> LanguageEncoder:
    torch.manual_seed(seed)
    config = TextEncoderConfig(width=32, layers=2, heads=4, projection_dim=16, prompt_chunk_size=50)
    return LanguageEncoder(config).eval()


def test_templates_are_the_reference_list(reference_root: Path) -> None:
    expected = json.loads((reference_root / "xdecoder_focalt" / "templates.json").read_text())
    assert list(PROMPT_TEMPLATES) == expected
    assert len(PROMPT_TEMPLATES) == 81


def test_prompts_strip_coco_suffixes(reference_root: Path) -> None:
    assert clean_class_name("wall-other-merged") == "wall"
    assert clean_class_name("grass-merged") == "grass"
    assert clean_class_name("playingfield-stuff") == "playingfield"
    assert prompts_for("sky-other")[:2] == ["sky.", "a photo of a sky."]
    case = json.loads((reference_root / "xdecoder_focalt" / "case_a" / "case.json").read_text())
    assert prompts_for("person") == case["tasks"]["seg"]["first_class_prompts"]


def test_state_dict_keys_are_the_official_subtree(reference_root: Path) -> None:
    entries = json.loads((reference_root / "xdecoder_focalt" / "keys.json").read_text())["entries"]
    expected = {e["key"][len(PREFIX) :]: e["shape"] for e in entries if e["key"].startswith(PREFIX)}
    state = LanguageEncoder().state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == expected


def test_shorter_inputs_give_the_same_leading_states() -> None:
    encoder = small_encoder()
    ids = torch.randint(0, 49406, (3, 77))
    with torch.no_grad():
        full = encoder.hidden_states(ids)
        prefix = encoder.hidden_states(ids[:, :9])
    assert prefix.shape == (3, 9, 32)
    torch.testing.assert_close(prefix, full[:, :9], rtol=1e-5, atol=1e-5)
    # Changing a later token must not change earlier states (causal attention, no padding mask).
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 49406
    with torch.no_grad():
        torch.testing.assert_close(encoder.hidden_states(changed)[:, :9], full[:, :9], rtol=1e-5, atol=1e-5)


def test_token_and_eos_features(tokenizer: ClipTokenizer) -> None:
    encoder = small_encoder()
    ids, _ = tokenizer.encode(["a red car", "the dog"])
    with torch.no_grad():
        hidden = encoder.hidden_states(ids)
        tokens = encoder.token_features(ids)
        eos = encoder.eos_features(ids)
    torch.testing.assert_close(tokens, hidden @ encoder.lang_proj)
    # First EOS: position 4 for "a red car" ([BOS, a, red, car, EOS]), 3 for "the dog".
    assert ids[0, 4] == EOS_ID and ids[1, 3] == EOS_ID
    expected = torch.stack([tokens[0, 4], tokens[1, 3]])
    torch.testing.assert_close(eos, expected, rtol=1e-5, atol=1e-5)


def test_class_embeddings_average_normalised_prompts(tokenizer: ClipTokenizer) -> None:
    encoder = small_encoder()
    names = ["cat", "traffic light", "wall-other-merged"]
    with torch.no_grad():
        embeddings = encoder.encode_class_names(names, tokenizer)
        rows = []
        for name in names:  # the definition, one name at a time at full length
            ids, _ = tokenizer.encode(prompts_for(name))
            hidden = encoder.hidden_states(ids)
            feats = hidden[torch.arange(81), ids.argmax(dim=1)] @ encoder.lang_proj
            mean = (feats / (feats.norm(dim=-1, keepdim=True) + 1e-7)).mean(dim=0)
            rows.append(mean / mean.norm())
    assert embeddings.shape == (3, 16)
    torch.testing.assert_close(embeddings, torch.stack(rows), rtol=1e-5, atol=1e-6)
    assert encoder.encode_class_names([], tokenizer).shape == (0, 16)


@pytest.fixture(scope="module")
def reference_encoder(reference_root: Path, cache_dir: Path) -> LanguageEncoder:
    path = reference_checkpoint(reference_root / "xdecoder_focalt" / "keys.json", cache_dir)
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    encoder = LanguageEncoder().eval()
    encoder.load_state_dict(
        {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}, strict=True
    )
    return encoder


@pytest.mark.slow
def test_reference_parity_case_a(
    reference_encoder: LanguageEncoder, tokenizer: ClipTokenizer, reference_root: Path
) -> None:
    case_dir = reference_root / "xdecoder_focalt" / "case_a"
    case_json = json.loads((case_dir / "case.json").read_text())
    tasks = case_json["tasks"]
    seg, grounding, retrieval = (np.load(case_dir / f"{t}.npz") for t in ("seg", "grounding", "retrieval"))
    results = {}
    with torch.inference_mode():
        results["seg text.class_embeddings"] = compare_array(
            "text.class_embeddings",
            reference_encoder.encode_class_names(tasks["seg"]["names_with_background"], tokenizer),
            seg,
            case_json,
        )
        ids, _ = tokenizer.encode(tasks["seg"]["first_class_prompts"])
        first = reference_encoder.eos_features(ids)
        first = first / (first.norm(dim=-1, keepdim=True) + 1e-7)
        results["seg text.first_class_prompt_embeddings"] = compare_array(
            "text.first_class_prompt_embeddings", first, seg, case_json
        )
        results["seg text.logit_scale"] = compare_array(
            "text.logit_scale", reference_encoder.logit_scale, seg, case_json
        )

        ids, mask = tokenizer.encode([tasks["grounding"]["phrase"]])
        token_emb = reference_encoder.token_features(ids)
        results["grounding text.token_emb"] = compare_array("text.token_emb", token_emb, grounding, case_json)
        results["grounding text.class_emb"] = compare_array(
            "text.class_emb", reference_encoder.eos_features(ids), grounding, case_json
        )
        tokens = token_emb[mask.bool()].unsqueeze(1)
        results["grounding text.grounding_tokens"] = compare_array(
            "text.grounding_tokens", tokens, grounding, case_json
        )

        ids, _ = tokenizer.encode(tasks["retrieval"]["captions"])
        results["retrieval.text_embeds"] = compare_array(
            "retrieval.text_embeds", reference_encoder.eos_features(ids), retrieval, case_json
        )
    failed = {name: r for name, r in results.items() if not r[0]}
    assert not failed, failed
