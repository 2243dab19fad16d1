"""The CLIP-style text encoder of X-Decoder (a causal pre-norm transformer plus a projection).

    ids (N, L) -> token_embedding + positional_embedding[:L]
               -> 12 x [x + attn(ln_1(x)) with a causal mask; x + mlp(ln_2(x)) with QuickGELU]
               -> ln_final                                   = hidden_states (N, L, width)
    token_features = hidden_states @ lang_proj                (N, L, projection_dim)
    eos_features   = hidden_states[first EOS] @ lang_proj     (N, projection_dim)

The attention is causal only (no padding mask), so the state at position i depends on ids[:i + 1]
alone; running on a prefix of the ids gives the same states for the positions it keeps. For the same
reason ids can be fed one position at a time (`token_features_step`), each step attending to the
keys and values that earlier steps left in a `TextKVCache`. The state-dict keys are those of the
official `sem_seg_head.predictor.lang_encoder.` subtree with that prefix removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.language.prompts import PROMPT_TEMPLATES, prompts_for
from models.language.tokenizer import ClipTokenizer


@dataclass
class TextEncoderConfig:
    """The CLIP-style text encoder; the `text` part of every named model config (models.configs)."""

    width: int = 512
    layers: int = 12
    heads: int = 8
    context_length: int = 77
    vocab_size: int = 49408
    projection_dim: int = 512
    layer_norm_eps: float = 1e-12
    # Prompts per forward pass in `encode_class_names` (sorted by length first): bounds memory for
    # large vocabularies and lets short prompts skip the padding of long ones.
    prompt_chunk_size: int = 256


@dataclass
class TextKVCache:
    """Keys and values of every layer for the positions run so far, for one-token steps.

    keys, values: per layer (N, heads, context_length, head_dim), filled up to `length`.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0


class Float32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype, cast back afterwards."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask; parameter names follow nn.MultiheadAttention."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, L, width) -> (N, L, width)."""
        n, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))

    def step(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: int) -> torch.Tensor:
        """One new position x (N, 1, width): its key and value are written into keys/values
        (N, heads, context_length, head_dim) at `position`; it attends to positions 0..position."""
        n, _, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(n, 1, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        keys[:, :, position : position + 1] = k
        values[:, :, position : position + 1] = v
        out = F.scaled_dot_product_attention(q, keys[:, :, : position + 1], values[:, :, : position + 1])
        return self.out_proj(out.reshape(n, 1, width))


class ResidualBlock(nn.Module):
    def __init__(self, width: int, heads: int, eps: float) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(width, heads)
        self.ln_1 = Float32LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        self.ln_2 = Float32LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def step(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: int) -> torch.Tensor:
        """`forward` for one new position x (N, 1, width), with this layer's cached keys/values."""
        x = x + self.attn.step(self.ln_1(x), keys, values, position)
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """Embeddings, the residual blocks and the final LayerNorm (official name: `lang_encoder`)."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.zeros(config.context_length, config.width))
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.resblocks = nn.ModuleList(
            ResidualBlock(config.width, config.heads, config.layer_norm_eps) for _ in range(config.layers)
        )
        self.ln_final = Float32LayerNorm(config.width, eps=config.layer_norm_eps)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (N, L) with L <= context_length -> last hidden state (N, L, width)."""
        length = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.positional_embedding[:length]
        for block in self.resblocks:
            x = block(x)
        return self.ln_final(x)

    def step(self, input_ids: torch.Tensor, cache: TextKVCache) -> torch.Tensor:
        """input_ids (N, 1) at position `cache.length` -> its last hidden state (N, 1, width); the
        cache grows by one position."""
        position = cache.length
        x = self.token_embedding(input_ids) + self.positional_embedding[position : position + 1]
        for block, keys, values in zip(self.resblocks, cache.keys, cache.values, strict=True):
            x = block.step(x, keys, values, position)
        cache.length += 1
        return self.ln_final(x)


class LanguageEncoder(nn.Module):
    """Text transformer, its output projection `lang_proj` and the (0-d) `logit_scale` parameter."""

    def __init__(self, config: TextEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config or TextEncoderConfig()
        self.lang_proj = nn.Parameter(torch.empty(self.config.width, self.config.projection_dim))
        self.logit_scale = nn.Parameter(torch.tensor(2.6592600))  # log(1 / 0.07)
        self.lang_encoder = TextTransformer(self.config)
        nn.init.normal_(self.lang_proj, std=self.config.width**-0.5)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (N, L) -> last hidden state after ln_final (N, L, width)."""
        return self.lang_encoder(input_ids)

    def token_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (N, L) -> projected per-token features (N, L, projection_dim), unnormalised."""
        return self.hidden_states(input_ids) @ self.lang_proj

    def new_cache(self, batch: int) -> TextKVCache:
        """An empty key/value cache for `token_features_step` on `batch` sequences."""
        cfg = self.config
        shape = (batch, cfg.heads, cfg.context_length, cfg.width // cfg.heads)
        like = self.lang_proj
        return TextKVCache(
            [like.new_empty(shape) for _ in range(cfg.layers)],
            [like.new_empty(shape) for _ in range(cfg.layers)],
        )

    def token_features_step(self, input_ids: torch.Tensor, cache: TextKVCache) -> torch.Tensor:
        """The ids (N, 1) of the next position -> its token features (N, 1, projection_dim).

        Feeding positions 0..L-1 one step each gives `token_features(ids[:, :L])` (up to float
        rounding), at the cost of one position per step.
        """
        return self.lang_encoder.step(input_ids, cache) @ self.lang_proj

    def eos_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (N, L) -> projected feature at each row's first EOS (N, projection_dim), unnormalised.

        EOS (49407) is the largest id, so argmax finds the first one. Only the positions up to the
        last row's EOS are run, which gives the same result because the attention is causal.
        """
        eos_positions = input_ids.argmax(dim=1)
        hidden = self.hidden_states(input_ids[:, : int(eos_positions.max()) + 1])
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), eos_positions]
        return pooled @ self.lang_proj

    def encode_class_names(self, names: Sequence[str], tokenizer: ClipTokenizer) -> torch.Tensor:
        """Class names -> class embeddings (C, projection_dim), each of unit norm.

        Per name: the 81 template prompts, their EOS features each divided by (norm + 1e-7), the
        mean over the prompts, divided by its norm (no epsilon).
        """
        if len(names) == 0:
            return self.lang_proj.new_zeros(0, self.config.projection_dim)
        prompts = [prompt for name in names for prompt in prompts_for(name)]
        input_ids, _ = tokenizer.encode(prompts, context_length=self.config.context_length)
        input_ids = input_ids.to(self.lang_proj.device)
        # Chunks of prompts of similar length, so each chunk runs only up to its own longest EOS.
        order = input_ids.argmax(dim=1).argsort(stable=True)
        per_prompt = self.lang_proj.new_empty(len(prompts), self.config.projection_dim)
        for chunk in order.split(self.config.prompt_chunk_size):
            features = self.eos_features(input_ids[chunk]).float()  # bf16/fp16 under autocast
            per_prompt[chunk] = features / (features.norm(dim=-1, keepdim=True) + 1e-7)
        mean = per_prompt.view(len(names), len(PROMPT_TEMPLATES), -1).mean(dim=1)
        return mean / mean.norm(dim=-1, keepdim=True)
