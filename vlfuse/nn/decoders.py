"""Caption decoders. Each one owns a fusion module and exposes the same three calls:

- ``forward(image, tokens, mask)`` -> (logits (B, T, V), attention (B, T, N) | None) for teacher forcing;
- ``init_state(image)`` -> dict of batch-first tensors; ``per_image_state()`` names those of them kept once
  per image for all of its beams/samples;
- ``step(tokens (B, t), state)`` -> (logprobs (B, V), state), which :mod:`vlfuse.generation` drives.
"""
from __future__ import annotations

from typing import Dict, FrozenSet, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Part
from ..registry import DECODERS
from .fusion import build_fusion
from .fusion.base import expand_rows
from .layers import TransformerBlock, text_allow
from .vision import ImageFeatures

State = Dict[str, torch.Tensor]


@DECODERS.register("lstm")
class LSTMDecoder(nn.Module):
    """LSTM language model; at each step the fusion module combines the image with the previous hidden
    state and the result is fed, with the word embedding, into the LSTM (Show & Tell / Show, Attend and Tell)."""

    def __init__(self, vocab_size: int, image_dim: int, fusion: Part, embed_dim: int = 512,
                 hidden_dim: int = 512, dropout: float = 0.3):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.fusion = build_fusion(fusion.name, image_dim, hidden_dim, **fusion.kwargs)
        self.init_h = nn.Linear(image_dim, hidden_dim)
        self.init_c = nn.Linear(image_dim, hidden_dim)
        self.cell = nn.LSTMCell(embed_dim + self.fusion.out_dim, hidden_dim)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_dim, vocab_size)
        self.text_dim = hidden_dim

    def init_state(self, image: ImageFeatures) -> State:
        return {"grid": image.grid, "pooled": image.pooled, **self.fusion.init_cache(image),
                "h": torch.tanh(self.init_h(image.pooled)), "c": torch.tanh(self.init_c(image.pooled))}

    def per_image_state(self) -> FrozenSet[str]:
        return frozenset()  # the fusion reads the image with each row's own hidden state

    def _advance(self, word: torch.Tensor, state: State):
        state = dict(state)  # fusion.step extends its cache entries in the dict it is given
        query = state["h"][:, None]  # (B, 1, H): the previous hidden state asks where to look
        fused = self.fusion.step(query, state)
        context, att = fused.states, fused.attention
        x = torch.cat([self.embed(word), context[:, 0]], -1)  # (B, E + F)
        h, c = self.cell(x, (state["h"], state["c"]))
        new = dict(state, h=h, c=c)
        att = att[:, 0] if att is not None else None  # (B, N)
        return self.out(self.drop(h)), new, att

    def forward(self, image: ImageFeatures, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None,
                need_weights: bool = False, rows: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        state = self.init_state(expand_rows(image, rows))
        logits, atts = [], []
        for t in range(tokens.shape[1]):
            lg, state, att = self._advance(tokens[:, t], state)  # attention comes whenever the fusion attends
            logits.append(lg)
            atts.append(att)
        attention = torch.stack(atts, 1) if atts and atts[0] is not None else None  # (B, T, N)
        return torch.stack(logits, 1), attention  # (B, T, V)

    def step(self, tokens: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        logits, state, _ = self._advance(tokens[:, -1], state)
        return F.log_softmax(logits, -1), state


@DECODERS.register("transformer")
class TransformerDecoder(nn.Module):
    """Token + position embeddings -> fusion (causal) -> ``num_layers`` extra causal self-attention
    blocks (useful after vector fusions; 0 for cross-attention/joint, which carry their own) -> vocabulary."""

    def __init__(self, vocab_size: int, image_dim: int, fusion: Part, dim: int = 512, num_layers: int = 0,
                 num_heads: int = 8, max_len: int = 40, dropout: float = 0.1, tie_embeddings: bool = True,
                 copy: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        nn.init.normal_(self.embed.weight, std=dim ** -0.5)  # unit-variance after the sqrt(dim) scale below
        self.pos = nn.Parameter(torch.zeros(max_len + 2, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.fusion = build_fusion(fusion.name, image_dim, dim, **fusion.kwargs)
        self.fusion_out = nn.Linear(self.fusion.out_dim, dim) if self.fusion.out_dim != dim else nn.Identity()
        self.blocks = nn.ModuleList(TransformerBlock(dim, num_heads, dropout) for _ in range(num_layers))
        self.state_names = tuple((f"d{i}sk", f"d{i}sv") for i in range(num_layers))  # their keys/values in a step
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.out.weight = self.embed.weight
        self.text_dim = dim
        self.max_len = max_len
        # A copying mechanism (as LSTM-C, Yao et al. 2017, copies detected words): given per image a score for some
        # words (``copy``, (B_img, V): a caption model's concepts, their probabilities on their words), each
        # position adds gate x scale x score to those words' logits, the gate (0-1) read from its own state: the
        # decoder learns where a told word fits, whichever word it is. None: no copying.
        self.copy_gate: Optional[nn.Linear] = nn.Linear(dim, 1) if copy else None
        self.copy_scale = nn.Parameter(torch.tensor(4.0)) if copy else None

    def init_state(self, image: ImageFeatures) -> State:
        return {"grid": image.grid, "pooled": image.pooled, **self.fusion.init_cache(image)}

    def per_image_state(self) -> FrozenSet[str]:
        """State entries read once per image by all of its rows (see ``vlfuse.generation``); a copying decoder's
        ``copy`` scores are one of them."""
        return self.fusion.per_image_state() | ({"copy"} if self.copy_gate is not None else frozenset())

    def copied(self, logits: torch.Tensor, x: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
        """``logits`` (R, T, V) of rows that come R / B_img to an image (consecutive), their states ``x``
        (R, T, D) and the images' ``copy`` scores (B_img, V) -> the logits with the copied words' added."""
        assert self.copy_gate is not None and self.copy_scale is not None
        gate = torch.sigmoid(self.copy_gate(x)) * self.copy_scale  # (R, T, 1)
        images, vocab = copy.shape[0], copy.shape[1]
        out = logits.reshape(images, -1, logits.shape[1], vocab) + gate.reshape(images, -1, gate.shape[1], 1) \
            * copy.reshape(images, 1, 1, vocab)
        return out.reshape(logits.shape)

    @torch.jit.ignore  # teacher forcing: vlfuse.runtime.torchscript compiles ``step`` only
    def forward(self, image: ImageFeatures, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None,
                need_weights: bool = False, rows: Optional[torch.Tensor] = None, copy: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``rows`` (B,): the image row of each caption, when images (B_img) come once for several captions;
        ``copy`` (B_img, V): a copying decoder's word scores per image (``copied``)."""
        t = tokens.shape[1]
        x = self.drop(self.words(tokens, self.pos[:t]))  # (B, T, D)
        if rows is not None and self.fusion.accepts_rows:
            fused = self.fusion(image, x, mask, causal=True, need_weights=need_weights, rows=rows)
        else:
            fused = self.fusion(expand_rows(image, rows), x, mask, causal=True, need_weights=need_weights)
        x = self.fusion_out(fused.states)
        allow = text_allow(mask, t, True, x.device)
        for block in self.blocks:
            x, _ = block(x, allow)
        x = self.norm(x)
        logits = self.out(x)  # (B, T, V)
        if copy is not None and self.copy_gate is not None:
            logits = self.copied(logits, x, copy if rows is None else copy.index_select(0, rows))
        return logits, fused.attention

    def words(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) and their positions' embeddings (T, D) -> the blocks' input (B, T, D)."""
        return self.embed(tokens) * self.embed.embedding_dim ** 0.5 + positions

    @torch.jit.export
    def step(self, tokens: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        """Incremental: only the newest token is computed; earlier keys/values are cached in ``state``. Written
        in the subset of Python that TorchScript compiles and the ONNX exporter traces: the decoding fast paths
        (``vlfuse.runtime``) run this very method."""
        x = self.words(tokens[:, -1:], self.pos[tokens.shape[1] - 1])  # (B, 1, D)
        state = state.copy()  # the fusion and the blocks replace their entries
        x = self.fusion_out(self.fusion.step(x, state).states)
        for block, (k, v) in zip(self.blocks, self.state_names):
            x, state[k], state[v] = block.step(x, state.get(k), state.get(v))
        x = self.norm(x)
        logits = self.out(x)  # (B, 1, V)
        if self.copy_gate is not None and "copy" in state:
            logits = self.copied(logits, x, state["copy"])
        return F.log_softmax(logits[:, -1], -1), state
