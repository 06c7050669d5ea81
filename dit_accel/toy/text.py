"""The toy model's text side: a fixed word vocabulary and a small trained encoder.

The vocabulary lives in the encoder's config, so ``save_pretrained`` / ``from_pretrained`` carry it and no tokenizer
component is needed. Like Wan's T5 path, padded positions come out as zeros and the uncond branch is the empty
prompt, so the transformer sees the same kind of text tokens a real Wan pipeline gives it.
"""

from __future__ import annotations

import re

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .data import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, to_device

PAD, UNK = "<pad>", "<unk>"
_WORDS = (
    ["a", "and", "over", "background", "moves", "along", "curve", "grows", "rotates", "while", "the", "camera", "pans"]
    + list(COLORS)
    + list(SHAPES)
    + list(DIRECTIONS)
    + list(BACKGROUNDS)
)
VOCAB: tuple[str, ...] = (PAD, UNK, *dict.fromkeys(_WORDS))


class ToyVocabularyWarning(UserWarning):
    """A prompt holds words the toy text encoder does not know (they are read as ``<unk>``) or more words than it
    reads; ``dit-accel render`` shows it as one ``warning:`` line."""


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


class ToyTextEncoder(ModelMixin, ConfigMixin):
    """Word embeddings plus a light transformer encoder: (prompts) -> (B, max_length, embed_dim)."""

    @register_to_config
    def __init__(
        self,
        vocab: tuple[str, ...] | list[str] = VOCAB,
        embed_dim: int = 64,
        num_layers: int = 1,
        num_heads: int = 4,
        ffn_dim: int = 128,
        max_length: int = 24,
    ) -> None:
        super().__init__()
        self.word_to_id = {w: i for i, w in enumerate(vocab)}
        self.embed = nn.Embedding(len(vocab), embed_dim)
        self.pos = nn.Parameter(torch.randn(1, max_length, embed_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            embed_dim, num_heads, ffn_dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embed_dim)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower-case word split; unknown words map to <unk>, long prompts are cut at ``max_length``."""
        n, unk = self.config.max_length, self.word_to_id[UNK]
        rows = []
        for text in prompts:
            row = [self.word_to_id.get(w, unk) for w in _words(text)[:n]]
            rows.append(row + [0] * (n - len(row)))
        ids = torch.tensor(rows, dtype=torch.long).reshape(len(prompts), n)
        return ids, ids != 0

    def prompt_problems(self, prompts: list[str]) -> str | None:
        """One line naming the words of ``prompts`` the encoder ignores (outside its vocabulary, or past
        ``max_length``), with the vocabulary; None when every word is read."""
        known = [w for w in self.config.vocab if w not in (PAD, UNK)]
        unknown = list(dict.fromkeys(w for text in prompts for w in _words(text) if w not in self.word_to_id))
        cut = [text for text in prompts if len(_words(text)) > self.config.max_length]
        parts = []
        if unknown:
            parts.append(
                f"prompt words outside the toy model's vocabulary are ignored: {', '.join(map(repr, unknown))}"
            )
        if cut:
            n = self.config.max_length
            parts.append(f"the toy model reads the first {n} words of a prompt; the rest is ignored")
        if not parts:
            return None
        return "; ".join(parts) + f" (vocabulary: {' '.join(known)})"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encode token ids; padded positions are zeroed (an empty prompt gives all zeros)."""
        x = self.embed(input_ids) + self.pos[:, : input_ids.shape[1]]
        # Fully padded rows (empty prompt) would make the key mask all-False and produce NaNs: unmask them.
        key_pad = ~attention_mask & attention_mask.any(1, keepdim=True)
        x = self.encoder(x, src_key_padding_mask=key_pad)
        return self.norm(x) * attention_mask[..., None].to(x.dtype)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompts to embeddings on this module's device and dtype."""
        ids, mask = self.tokenize(prompts)
        return self(to_device(ids, self.device), to_device(mask, self.device))
