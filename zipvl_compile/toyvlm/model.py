"""The toy VLM: patch encoder -> projector -> ``transformers`` Llama decoder (LLaVA's shape).

Image tokens come first, then the text (``task`` token layout); with ``bos_first`` the BOS token
precedes the image, as in LLaVA's prompts.  Patches carry no learned
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
    # BOS before the image, as LLaVA's prompts put it (False: after it, the first model's
    # layout): a token every query can find by its content, where attention sinks form
    bos_first: bool = False

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
        """pixels [B, P, PATCH], text [B, T] (BOS first) -> input embeddings [B, P + T, hidden]:
        image then text, or with ``bos_first`` BOS, image, then the rest of the text."""
        vis = self.projector(self.patch_encoder(pixels))
        words = self.language_model.embed_tokens(text)
        if self.config.bos_first:
            return torch.cat([words[:, :1], vis, words[:, 1:]], dim=1)
        return torch.cat([vis, words], dim=1)

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

    def forward_with_attention_entropy(self, pixels: torch.Tensor, text: torch.Tensor):
        """``forward`` plus, per layer, the entropy (nats) of where the layer's attention mass
        lands: the column sums of its attention (every query row and head), normalized, one
        distribution per sample: ``[layers]``, the batch mean.  ZipVL keeps the fewest keys
        holding a fraction tau of that mass, so a penalty on it makes the layer's attention
        gather on few keys shared by all queries (sinks, the tokens a question needs), as in
        trained LVLMs; concentrating each row alone does not (every token attending to itself
        is concentrated and spreads the mass over every key).  Needs the decoder in eager
        attention (``language_model.set_attn_implementation("eager")``): SDPA returns no
        weights."""
        out = self.language_model(inputs_embeds=self.embed(pixels, text), output_attentions=True)
        if not out.attentions or out.attentions[0] is None:
            raise RuntimeError("attention weights need language_model.set_attn_implementation"
                               "('eager')")
        entropy = []
        for a in out.attentions:                     # [B, H, n, n], rows sum to 1
            mass = a.sum((1, 2))                      # [B, n]
            p = mass / mass.sum(-1, keepdim=True)
            entropy.append(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())
        return self.lm_head(out.last_hidden_state[:, -2:]), torch.stack(entropy)

    @torch.no_grad()
    def answer(self, pixels: torch.Tensor, text: torch.Tensor, cache=None) -> torch.Tensor:
        """Inference as a user runs it: prefill image + [BOS, QTYPE, COLOUR] into ``cache``
        (a transformers Cache; DynamicCache by default), then one decode step with ANS.
        Returns the answer logits [B, VOCAB]."""
        from transformers import DynamicCache

        from ..helpers import cache_kwarg

        lm = self.language_model
        kw = cache_kwarg(lm, DynamicCache() if cache is None else cache)
        lm(inputs_embeds=self.embed(pixels, text[:, :3]), use_cache=True, **kw)
        step = lm.embed_tokens(text[:, 3:4])
        h = lm(inputs_embeds=step, use_cache=True, **kw).last_hidden_state
        return self.lm_head(h[:, -1])

    def config_dict(self) -> dict:
        return asdict(self.config)
