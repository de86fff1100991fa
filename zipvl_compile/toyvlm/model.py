"""The toy VLM: patch encoder -> projector -> ``transformers`` Llama decoder (LLaVA's shape).

Image tokens come first, then the text (``task`` token layout).  Patches carry no learned
position table (the task does not depend on where a patch is; the decoder's RoPE orders the
tokens), so one model takes images of any grid size and can be trained with a curriculum over
grid sizes.  The decoder is a
``LlamaModel`` built from a ``LlamaConfig`` with SDPA attention, so the zipvl backend sees the
graph a user's transformers model gives; it is ``model.language_model`` (what
``compile_language_model`` compiles).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import task

MAX_TOKENS = 8192   # positions RoPE is configured for (images up to ~90 x 90 patches)


@dataclass(frozen=True)
class ToyVLMConfig:
    grid: int = 16          # default image: grid x grid patches (the model takes any grid)
    vision_dim: int = 64
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256

    @property
    def patches(self) -> int:
        return self.grid * self.grid


class ToyVLM(nn.Module):
    def __init__(self, config: ToyVLMConfig):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        self.config = config
        c = config
        self.patch_encoder = nn.Sequential(nn.Linear(task.PATCH, c.vision_dim), nn.GELU(),
                                           nn.Linear(c.vision_dim, c.vision_dim))
        # what a patch shows (glyph or none, colour or none): the vision pre-training head
        self.patch_head = nn.Linear(c.vision_dim, task.N_GLYPHS + 1 + len(task.COLOURS) + 1)
        self.projector = nn.Sequential(nn.Linear(c.vision_dim, c.hidden), nn.GELU(),
                                       nn.Linear(c.hidden, c.hidden))
        lm = LlamaConfig(vocab_size=task.VOCAB, hidden_size=c.hidden,
                         intermediate_size=c.intermediate, num_hidden_layers=c.layers,
                         num_attention_heads=c.heads, num_key_value_heads=c.kv_heads,
                         max_position_embeddings=MAX_TOKENS, pad_token_id=task.PAD,
                         bos_token_id=task.BOS)
        lm._attn_implementation = "sdpa"
        self.language_model = LlamaModel(lm)
        self.lm_head = nn.Linear(c.hidden, task.VOCAB, bias=False)

    def embed(self, pixels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """pixels [B, P, PATCH], text [B, T] -> input embeddings [B, P + T, hidden]."""
        vis = self.projector(self.patch_encoder(pixels))
        return torch.cat([vis, self.language_model.embed_tokens(text)], dim=1)

    def patch_logits(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vision pre-training objective (LLaVA starts from a pre-trained encoder; this one learns
        to see alongside): logits of each patch's glyph [B, P, N_GLYPHS + 1] and colour
        [B, P, len(COLOURS) + 1] (last class: none)."""
        out = self.patch_head(self.patch_encoder(pixels))
        return out[..., :task.N_GLYPHS + 1], out[..., task.N_GLYPHS + 1:]

    def forward(self, pixels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Training: logits [B, 2, VOCAB] at the colour token (predicts ANS) and at ANS
        (predicts the answer); text is the full [BOS, QTYPE, COLOUR, ANS]."""
        h = self.language_model(inputs_embeds=self.embed(pixels, text)).last_hidden_state
        return self.lm_head(h[:, -2:])

    @torch.no_grad()
    def answer(self, pixels: torch.Tensor, text: torch.Tensor, cache=None) -> torch.Tensor:
        """Inference as a user runs it: prefill image + [BOS, QTYPE, COLOUR] into ``cache``
        (a transformers Cache; DynamicCache by default), then one decode step with ANS.
        Returns the answer logits [B, VOCAB]."""
        from transformers import DynamicCache

        cache = DynamicCache() if cache is None else cache
        self.language_model(inputs_embeds=self.embed(pixels, text[:, :3]), past_key_values=cache,
                            use_cache=True)
        step = self.language_model.embed_tokens(text[:, 3:4])
        h = self.language_model(inputs_embeds=step, past_key_values=cache,
                                use_cache=True).last_hidden_state
        return self.lm_head(h[:, -1])

    def config_dict(self) -> dict:
        return asdict(self.config)
