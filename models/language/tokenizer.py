"""The CLIP byte-level BPE tokenizer, fully offline.

The vocabulary is OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz`, shipped next to this file (taken from
the `open-clip-torch` wheel, see README.md in this folder). It is turned into 49,408 ids:

    0..255        the 256 byte symbols
    256..511      the same symbols with the end-of-word marker `</w>`
    512..49405    one id per merge, in merge order (48,894 merges)
    49406         <|startoftext|>  (BOS)
    49407         <|endoftext|>    (EOS, also used as padding)

`encode` gives what the HF slow `CLIPTokenizer` gives with `padding="max_length", truncation=True`,
and `decode` follows its `batch_decode(skip_special_tokens=False)`.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import ftfy
import regex
import torch

VOCAB_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_ID = 49406
EOS_ID = 49407
PERIOD_ID = 269  # "." (captions are cut at the first one)
PAD_ID = EOS_ID
VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894
END_OF_WORD = "</w>"

# Special tokens, contractions, runs of letters, single digits, runs of other non-space symbols.
_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")

# The fix-ups HF applies after decoding (`clean_up_tokenization_spaces`), as (before, after) pairs.
_CLEAN_UP_PAIRS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character, so BPE never sees whitespace or control bytes.

    Printable latin-1 bytes map to themselves; the 68 others map to chr(256), chr(257), ... in order.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def clean_text(text: str) -> str:
    """ftfy repair (which also unescapes HTML entities such as `&amp;`), whitespace collapse, lower case."""
    text = ftfy.fix_text(text)
    text = _WHITESPACE.sub(" ", text).strip()
    return text.lower()


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return {(word[i], word[i + 1]) for i in range(len(word) - 1)}


class ClipTokenizer:
    """CLIP BPE tokenizer: `encode` texts to padded id/mask tensors, `decode` ids back to text."""

    def __init__(self, vocab_path: str | Path = VOCAB_PATH) -> None:
        with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # The first line is a version header; the merges follow, one "a b" pair a line.
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{vocab_path} is not a CLIP BPE merge file ({len(merges)} merges)")

        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges]
        tokens += [BOS_TOKEN, EOS_TOKEN]
        self.encoder: dict[str, int] = {t: i for i, t in enumerate(tokens)}
        self.decoder: dict[int, str] = dict(enumerate(tokens))
        self.merge_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self._bpe_cache: dict[str, tuple[str, ...]] = {BOS_TOKEN: (BOS_TOKEN,), EOS_TOKEN: (EOS_TOKEN,)}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, token: str) -> tuple[str, ...]:
        """Split one pre-token (already byte-mapped) into BPE symbols; the last one carries `</w>`."""
        cached = self._bpe_cache.get(token)
        if cached is not None:
            return cached
        word = (*token[:-1], token[-1] + END_OF_WORD)
        while len(word) > 1:
            pair = min(_pairs(word), key=lambda p: self.merge_ranks.get(p, float("inf")))
            if pair not in self.merge_ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        self._bpe_cache[token] = word
        return word

    def tokenize(self, text: str) -> list[int]:
        """Ids of one text without BOS, EOS or padding."""
        ids: list[int] = []
        for piece in _WORD_PATTERN.findall(clean_text(text)):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self.bpe(mapped))
        return ids

    def encode(self, texts: Sequence[str], context_length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise texts to `input_ids` (N, context_length) and `attention_mask` (N, context_length), int64.

        Each row is [BOS, tokens..., EOS, PAD...]; over-long texts keep their first
        `context_length - 2` tokens and still end with EOS. The mask is 1 from BOS through EOS.
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts, not a single string")
        input_ids = torch.full((len(texts), context_length), PAD_ID, dtype=torch.int64)
        attention_mask = torch.zeros((len(texts), context_length), dtype=torch.int64)
        for row, text in enumerate(texts):
            ids = [BOS_ID, *self.tokenize(text)[: context_length - 2], EOS_ID]
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of a sequence of ids, special tokens kept, as HF `batch_decode(skip_special_tokens=False)`.

        The token strings are concatenated (no space around special tokens), byte-decoded, `</w>`
        becomes a space, the ends are stripped and HF's tokenization-space clean-up is applied.
        """
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        joined = "".join(self.decoder[int(i)] for i in token_ids)
        raw = bytearray(self.byte_decoder[c] for c in joined).decode("utf-8", errors="replace")
        text = raw.replace(END_OF_WORD, " ").strip()
        for before, after in _CLEAN_UP_PAIRS:
            text = text.replace(before, after)
        return text
