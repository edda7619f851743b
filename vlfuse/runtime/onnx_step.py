"""The decoding step of the Transformer decoder over cross-attention fusion, run by ONNX Runtime with int8 weights.

At batch 1 a decoding step is ~100 small operations, and what each costs to launch bounds it more than the
arithmetic does: TorchScript's interpreter runs the int8 step in ~0.42 ms here, ONNX Runtime the same step in
~0.33 ms (one thread, idle 2-core CPU). ``OnnxStepDecoder`` wraps the TorchScript decoder (``inference_decoder``)
and runs the step in ONNX Runtime for batches of a few images (where it is faster: ``runs_onnx``), TorchScript's
for larger ones. The graph restates ``vlfuse.runtime.torchscript.ScriptableCrossAttentionStep`` over stacked state
(``_ExportStep``), is exported from a float copy of the decoder with fused q/k/v, and its linear layers are
quantized to int8 weights (a scale per output row, as the PyTorch int8 decoder's) by ONNX Runtime's
``quantize_dynamic``. It is cached on disk like the image encoder's graph (``vlfuse.runtime.cache``), and which
backend runs a batch is ``vlfuse.runtime.policy``'s choice (``step_runs_onnx``).
"""
from __future__ import annotations

import functools
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from .cache import GraphCache, weights_key
from .decoder import inference_decoder
from .policy import step_runs_onnx
from .sessions import OPSET, session_options
from .torchscript import ScriptableCrossAttentionStep

log = logging.getLogger(__name__)
State = Dict[str, torch.Tensor]
STEP_VERSION = 1  # bump when the exported step changes shape or meaning


class _ExportStep(nn.Module):
    """``ScriptableCrossAttentionStep`` restated for export, over stacked state: (the last tokens (B, 1), the
    position (1,), the per-image memory keys/values of every cross-attending block (B_img, L_c, 2, H, S, hd),
    the past keys/values of every block (B, L, 2, H, t, hd)) -> (log-probabilities (B, V), the past with this
    position appended (B, L, 2, H, t+1, hd)). The same arithmetic as the scripted step (tests compare them),
    written so the graph needs few shape computations (one new token a step: (B, 1, D) reshapes to (B, H, 1, hd)
    without a transpose; the attention scale is a constant) and has few inputs, each of which costs ONNX
    Runtime's Python binding a conversion per call: ~120 operations a step instead of the ~230 of the traced
    scripted step."""

    def __init__(self, step: ScriptableCrossAttentionStep):
        super().__init__()
        self.step = step
        self.blocks = list(step.fusion_blocks) + list(step.blocks)

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.softmax((q * scale) @ k.transpose(-1, -2), -1) @ v

    def _block(self, block, x: torch.Tensor, past_k, past_v, memory_k, memory_v):
        h, hd, d = block.num_heads, block.head_dim, x.shape[-1]
        scale = hd ** -0.5
        q, k, v = block.qkv(block.ln1(x)).split(d, -1)  # each (B, 1, D)
        k = torch.cat([past_k, k.reshape(-1, h, 1, hd)], 2)
        v = torch.cat([past_v, v.reshape(-1, h, 1, hd)], 2)
        x = x + block.self_out(self._attend(q.reshape(-1, h, 1, hd), k, v, scale).reshape(-1, 1, d))
        if block.cross:  # memory (B_img, H, S, hd), shared by the g consecutive rows of an image
            q = block.cross_q(block.ln_c(x)).reshape(memory_k.shape[0], -1, h, hd).transpose(1, 2)  # (B_img,H,g,hd)
            y = self._attend(q, memory_k, memory_v, scale).transpose(1, 2).reshape(-1, 1, d)
            x = x + block.cross_out(y)
        return x + block.fc2(block.act(block.fc1(block.ln2(x)))), k, v

    def forward(self, last: torch.Tensor, position: torch.Tensor, memory: torch.Tensor, past: torch.Tensor):
        step = self.step
        x = step.text_in(step.embed(last) * step.scale + step.pos[position])  # (B, 1, D)
        cached, m = [], 0
        for i, block in enumerate(self.blocks):
            if i == len(step.fusion_blocks):
                x = step.fusion_out(step.fusion_norm(x))
            mk, mv = (memory[:, m, 0], memory[:, m, 1]) if block.cross else (None, None)
            m += int(block.cross)
            x, k, v = self._block(block, x, past[:, i, 0], past[:, i, 1], mk, mv)
            cached.append(torch.stack([k, v], 1))
        if len(self.blocks) == len(step.fusion_blocks):
            x = step.fusion_out(step.fusion_norm(x))
        logp = torch.log_softmax(step.out(step.norm(x))[:, -1], -1)
        return logp, torch.stack(cached, 1)


def step_key(decoder: nn.Module) -> str:
    """A hash of what the quantized graph depends on: the (trained, unfused) decoder's weights and the versions
    that export and quantize it."""
    import onnxruntime

    return weights_key(decoder, f"step{STEP_VERSION}|{torch.__version__}|{onnxruntime.__version__}|{OPSET}")


def covers(decoder: nn.Module) -> bool:
    """Whether the export covers a (trained, unfused) decoder: a Transformer decoder over cross-attention fusion
    whose blocks all have the same heads and head width."""
    from ..nn.decoders import TransformerDecoder
    from ..nn.fusion.cross_attention import CrossAttentionFusion

    if not (isinstance(decoder, TransformerDecoder) and isinstance(decoder.fusion, CrossAttentionFusion)):
        return False
    blocks = list(decoder.fusion.blocks) + list(decoder.blocks)
    return len({(b.self_attn.num_heads, b.self_attn.head_dim) for b in blocks}) == 1


def step_graph_name(decoder: nn.Module) -> str:
    """The file name of ``decoder``'s int8 step graph in a cache folder."""
    return f"{step_key(decoder)}.step.onnx"


def _layout(step: ScriptableCrossAttentionStep) -> Tuple[List[str], List[str], Tuple[int, int]]:
    """(the scripted state's per-image memory entries, in the order stacked; its past entries; (heads, head_dim))."""
    blocks = list(step.fusion_blocks) + list(step.blocks)
    memory = [name for b in blocks if b.cross for name in (b.mk_key, b.mv_key)]
    past = [name for b in blocks for name in (b.k_key, b.v_key)]
    return memory, past, (blocks[0].num_heads, blocks[0].head_dim)


def export_step(decoder: nn.Module, quantize: bool = True) -> bytes:
    """The int8 ONNX graph of ``decoder``'s step (a float decoder with fused q/k/v: ``inference_decoder(...,
    int8=False, script=False)``); float with ``quantize=False``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    step = ScriptableCrossAttentionStep(decoder).eval()
    memory_names, past_names, (heads, hd) = _layout(step)
    # two rows of one image, two past positions: every dimension the exporter must keep symbolic differs
    example = (torch.ones(2, 1, dtype=torch.long), torch.tensor([2]),
               torch.zeros(1, len(memory_names) // 2, 2, heads, 5, hd),
               torch.zeros(2, len(past_names) // 2, 2, heads, 2, hd))
    axes = {"last": {0: "rows"}, "memory": {0: "images", 4: "cells"}, "past": {0: "rows", 4: "past"},
            "logp": {0: "rows"}, "new_past": {0: "rows", 4: "length"}}
    with tempfile.TemporaryDirectory() as tmp:
        float_path, int8_path = os.path.join(tmp, "step.onnx"), os.path.join(tmp, "step.int8.onnx")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter is marked deprecated; it works
            torch.onnx.export(_ExportStep(step), example, float_path, dynamo=False,
                              input_names=["last", "position", "memory", "past"],
                              output_names=["logp", "new_past"], opset_version=OPSET, dynamic_axes=axes)
        if not quantize:
            return Path(float_path).read_bytes()
        # int8 weights with a scale per output row, as the PyTorch int8 decoder has them. The quantizer logs a
        # generic hint ("consider pre-processing") through the root logger, which is not the user's concern.
        logging.disable(logging.WARNING)
        try:
            quantize_dynamic(float_path, int8_path, weight_type=QuantType.QInt8, per_channel=True)
        finally:
            logging.disable(logging.NOTSET)
        return Path(int8_path).read_bytes()


MEMORY, PAST = "onnx_memory", "onnx_past"  # this decoder's state entries (stacked over blocks)


class OnnxStepDecoder(nn.Module):
    """``base`` (``inference_decoder(decoder)``) whose step runs in ONNX Runtime when a batch holds at most
    ``max_images`` images (default: ``vlfuse.runtime.policy.step_runs_onnx``'s measured limits). The int8 graph is
    exported from a float copy of ``decoder`` with fused q/k/v, made only when it is not in ``cache`` yet. The image
    side (``init_state``) is ``base``'s; its per-image memory keys/values are stacked once per batch, and the past
    keys/values of all blocks travel as one tensor, so a step hands ONNX Runtime four inputs."""

    def __init__(self, base: nn.Module, decoder: nn.Module, cache: GraphCache, max_images: Optional[int] = None):
        super().__init__()
        import onnxruntime as ort

        self.base, self.max_images = base, max_images
        self.memory_names, self.past_names, (self.heads, self.head_dim) = _layout(
            ScriptableCrossAttentionStep(base.decoder))  # the same modules; nothing is copied

        def export() -> bytes:
            return export_step(inference_decoder(decoder, int8=False, script=False))

        graph = cache.graph(step_graph_name(decoder), export)
        self.session = ort.InferenceSession(graph, session_options(1, prepack=True, arena=False),
                                            providers=["CPUExecutionProvider"])

    def runs_onnx(self, images: int) -> bool:
        """Whether a batch of ``images`` decodes in ONNX Runtime (else in ``base``, TorchScript's step)."""
        return step_runs_onnx(images, self.max_images)

    def backend_for(self, images: int) -> str:
        """What runs the decoding steps of a batch of ``images`` images (``vlfuse.runtime.backend``)."""
        return "onnxruntime" if self.runs_onnx(images) else self.base.backend_for(images)

    def init_state(self, image) -> State:
        state = self.base.init_state(image)
        n = image.pooled.shape[0]
        if not self.runs_onnx(n) or image.pooled.device.type != "cpu":  # base's state: base's step decodes
            return state
        memory = [state.pop(name) for name in self.memory_names]
        state[MEMORY] = torch.stack([torch.stack(memory[i:i + 2], 1) for i in range(0, len(memory), 2)], 1)
        state[PAST] = memory[0].new_zeros(n, len(self.past_names) // 2, 2, self.heads, 0, self.head_dim)
        return state

    def per_image_state(self) -> FrozenSet[str]:
        return (self.base.per_image_state() - frozenset(self.memory_names)) | {MEMORY}

    def step(self, tokens: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        if PAST not in state:
            return self.base.step(tokens, state)
        logp, past = self.session.run(None, {
            "last": tokens[:, -1:].contiguous().numpy(), "position": _position(tokens.shape[1] - 1),
            "memory": state[MEMORY].contiguous().numpy(), "past": state[PAST].contiguous().numpy()})
        state = dict(state)
        state[PAST] = torch.from_numpy(past)
        return torch.from_numpy(logp), state


@functools.lru_cache(maxsize=64)
def _position(t: int) -> np.ndarray:
    return np.array([t], dtype=np.int64)


def onnx_step_decoder(base: nn.Module, decoder: nn.Module, onnx: Optional[bool], cache: GraphCache) -> nn.Module:
    """``base`` (``inference_decoder(decoder)``, int8) with its step run by ONNX Runtime where the export covers
    the architecture (the TorchScript step's: a Transformer decoder over cross-attention fusion), else ``base``
    itself; the graph is read from or written to ``cache``. An export or runtime failure falls back to ``base``
    with a warning, or raises ConfigError where ``onnx`` is True (asked for explicitly)."""
    from .torchscript import ScriptedDecoder

    if not isinstance(base, ScriptedDecoder) or not covers(decoder):
        return base
    try:
        return OnnxStepDecoder(base, decoder, cache)
    except Exception as exc:  # noqa: BLE001 — an exporter or runtime limitation: TorchScript still decodes
        if onnx:
            raise ConfigError(f"could not run the decoding step with ONNX Runtime: {exc}") from exc
        log.warning("decoding step: ONNX Runtime export failed (%s); using TorchScript", exc)
        return base
