"""The decoding step of the Transformer decoder over cross-attention fusion, run by ONNX Runtime with int8 weights.

At batch 1 a decoding step is ~100 small operations, and what each costs to launch bounds it more than the
arithmetic does: TorchScript's interpreter runs the int8 step in ~0.42 ms here, ONNX Runtime the same step in
~0.33 ms (one thread, idle 2-core CPU). ``OnnxStepDecoder`` wraps the TorchScript decoder (``inference_decoder``)
and runs the step in ONNX Runtime for batches of a few images (where it is faster: ``runs_onnx``), TorchScript's
for larger ones. The graph is the decoder's own ``step`` (``TransformerDecoder.step``, the method TorchScript
compiles), traced by the exporter from a float copy of the decoder with fused q/k/v; ``_StackedStep`` only hands
it its state as two stacked tensors, which keeps the graph's inputs few (each costs ONNX Runtime's Python binding
a conversion per call). ONNX Runtime's ``quantize_dynamic`` makes its linear layers int8 (a scale per output row,
as the PyTorch int8 decoder's) and, as it does by default, the word and position tables that the step indexes
(``Gather``) uint8. The graph is cached on disk like the image encoder's (``vlfuse.runtime.cache``), and which
backend runs a batch is ``vlfuse.runtime.policy``'s choice (``step_runs_onnx``).
"""
from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Tuple

import torch
from torch import nn
from torch.onnx import symbolic_helper

from ..errors import ConfigError
from .cache import GraphCache, weights_key
from .decoder import inference_decoder
from .policy import step_runs_onnx
from .sessions import OPSET, session_options
from .torchscript import ScriptedDecoder, supports

log = logging.getLogger(__name__)
State = Dict[str, torch.Tensor]
STEP_VERSION = 3  # bump when the exported step changes shape or meaning (3: a copying decoder's copy input)
Names = List[Tuple[str, str]]  # the (keys, values) state entries of each block, in the order stacked


def _layout(decoder: nn.Module) -> Tuple[Names, Names]:
    """(the per-image memory entries of the cross-attending blocks, the past entries of every block): the state
    entries of ``decoder.step`` that the graph takes stacked, in its order."""
    fusion_names = decoder.fusion.state_names  # (past keys, past values, memory keys, memory values) per block
    memory = [(mk, mv) for _, _, mk, mv in fusion_names]
    past = [(k, v) for k, v, _, _ in fusion_names] + list(decoder.state_names)
    return memory, past


class _StackedStep(nn.Module):
    """``decoder.step`` over stacked state, the exported graph's inputs and outputs: (tokens (B, t), the per-image
    memory keys/values of every cross-attending block (B_img, L_c, 2, H, S, hd), the past keys/values of every block
    (B, L, 2, H, t - 1, hd)) -> (log-probabilities (B, V), the past with this position appended (B, L, 2, H, t, hd)).
    It unstacks and stacks; the arithmetic is ``decoder.step``'s."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder
        self.memory_names, self.past_names = _layout(decoder)

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor, past: torch.Tensor,
                copy: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        state = {} if copy is None else {"copy": copy}
        for i, (k, v) in enumerate(self.memory_names):
            state[k], state[v] = memory[:, i, 0], memory[:, i, 1]
        for i, (k, v) in enumerate(self.past_names):
            state[k], state[v] = past[:, i, 0], past[:, i, 1]
        logp, state = self.decoder.step(tokens, state)
        return logp, torch.stack([torch.stack([state[k], state[v]], 1) for k, v in self.past_names], 1)


@symbolic_helper.parse_args("v", "v", "v", "v", "f", "b", "f", "b")
def _attention_onnx(g, query, key, value, attn_mask, dropout_p: float, is_causal: bool, scale: float,
                    enable_gqa: bool):
    """ONNX for ``F.scaled_dot_product_attention`` as a decoding step calls it (no mask, no dropout, the scale
    given): softmax(q · scale @ kᵀ) @ v. The exporter's own translation multiplies q and k by √scale each: one
    more multiplication per attention (of the memory's keys, too) than this, the graph the int8 step was measured
    with."""
    if not attn_mask.node().mustBeNone() or dropout_p or is_causal or enable_gqa:
        raise ConfigError("the ONNX decoding step exports attention without a mask or dropout only")
    scaled = g.op("Mul", query, g.op("Constant", value_t=torch.tensor(scale)))
    scores = g.op("MatMul", scaled, g.op("Transpose", key, perm_i=[0, 1, 3, 2]))
    return g.op("MatMul", g.op("Softmax", scores, axis_i=-1), value)


def step_key(decoder: nn.Module) -> str:
    """A hash of what the quantized graph depends on: the (trained, unfused) decoder's weights and the versions
    that export and quantize it."""
    import onnxruntime

    return weights_key(decoder, f"step{STEP_VERSION}|{torch.__version__}|{onnxruntime.__version__}|{OPSET}")


def covers(decoder: nn.Module) -> bool:
    """Whether the export covers a (trained, unfused) decoder: a Transformer decoder over cross-attention fusion
    whose blocks all have the same heads and head width (their keys/values stack)."""

    if not supports(decoder):
        return False
    blocks = list(decoder.fusion.blocks) + list(decoder.blocks)
    return len({(b.self_attn.num_heads, b.self_attn.head_dim) for b in blocks}) == 1


def step_graph_name(decoder: nn.Module) -> str:
    """The file name of ``decoder``'s int8 step graph in a cache folder."""
    return f"{step_key(decoder)}.step.onnx"


def export_step(decoder: nn.Module, quantize: bool = True) -> bytes:
    """The int8 ONNX graph of ``decoder``'s step (a float decoder with fused q/k/v: ``inference_decoder(...,
    int8=False, script=False)``); float with ``quantize=False``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    step = _StackedStep(decoder).eval()
    attn = decoder.fusion.blocks[0].self_attn
    # two rows of one image, three words so far: every dimension the exporter must keep symbolic differs
    example = (torch.ones(2, 3, dtype=torch.long),
               torch.zeros(1, len(step.memory_names), 2, attn.num_heads, 5, attn.head_dim),
               torch.zeros(2, len(step.past_names), 2, attn.num_heads, 2, attn.head_dim))
    axes = {"tokens": {0: "rows", 1: "length"}, "memory": {0: "images", 4: "cells"}, "past": {0: "rows", 4: "past"},
            "logp": {0: "rows"}, "new_past": {0: "rows", 4: "length"}}
    inputs = ["tokens", "memory", "past"]
    if copies(decoder):  # a copying decoder's word scores per image
        example += (torch.zeros(1, decoder.out.out_features),)
        axes["copy"] = {0: "images"}
        inputs.append("copy")
    with tempfile.TemporaryDirectory() as tmp:
        float_path, int8_path = os.path.join(tmp, "step.onnx"), os.path.join(tmp, "step.int8.onnx")
        torch.onnx.register_custom_op_symbolic("aten::scaled_dot_product_attention", _attention_onnx, OPSET)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript-based exporter is marked deprecated; it works
                torch.onnx.export(step, example, float_path, dynamo=False, input_names=inputs,
                                  output_names=["logp", "new_past"], opset_version=OPSET, dynamic_axes=axes)
        finally:
            torch.onnx.unregister_custom_op_symbolic("aten::scaled_dot_product_attention", OPSET)
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


def copies(decoder: nn.Module) -> bool:
    """Whether ``decoder`` copies told words (``TransformerDecoder.copy_gate``): its step takes a ``copy`` input."""
    return getattr(decoder, "copy_gate", None) is not None


class OnnxStepDecoder(nn.Module):
    """``base`` (``inference_decoder(decoder)``) whose step runs in ONNX Runtime when a batch holds at most
    ``max_images`` images (default: ``vlfuse.runtime.policy.step_runs_onnx``'s measured limits). The int8 graph is
    exported from a float copy of ``decoder`` with fused q/k/v, made only when it is not in ``cache`` yet. The image
    side (``init_state``) is ``base``'s; its per-image memory keys/values are stacked once per batch, and the past
    keys/values of all blocks travel as one tensor, so a step hands ONNX Runtime three inputs."""

    def __init__(self, base: nn.Module, decoder: nn.Module, cache: GraphCache, max_images: Optional[int] = None):
        super().__init__()
        import onnxruntime as ort

        self.base, self.max_images = base, max_images
        self.memory_names, self.past_names = _layout(base.decoder)

        def export() -> bytes:
            return export_step(inference_decoder(decoder, int8=False, script=False))

        graph = cache.graph(step_graph_name(decoder), export)
        self.session = ort.InferenceSession(graph, session_options(1, prepack=True, arena=False),
                                            providers=["CPUExecutionProvider"])
        self.copies = "copy" in {i.name for i in self.session.get_inputs()}

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
        memory = [torch.stack([state.pop(k), state.pop(v)], 1) for k, v in self.memory_names]  # (n, 2, H, S, hd)
        state[MEMORY] = torch.stack(memory, 1)
        heads, head_dim = memory[0].shape[2], memory[0].shape[4]
        state[PAST] = memory[0].new_zeros(n, len(self.past_names), 2, heads, 0, head_dim)
        return state

    def per_image_state(self) -> FrozenSet[str]:
        return (self.base.per_image_state() - {name for names in self.memory_names for name in names}) | {MEMORY}

    def step(self, tokens: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        if PAST not in state:
            return self.base.step(tokens, state)
        feeds = {"tokens": tokens.contiguous().numpy(), "memory": state[MEMORY].contiguous().numpy(),
                 "past": state[PAST].contiguous().numpy()}
        if self.copies:
            feeds["copy"] = state["copy"].float().contiguous().numpy()
        logp, past = self.session.run(None, feeds)
        state = dict(state)
        state[PAST] = torch.from_numpy(past)
        return torch.from_numpy(logp), state


def onnx_step_decoder(base: nn.Module, decoder: nn.Module, onnx: Optional[bool], cache: GraphCache) -> nn.Module:
    """``base`` (``inference_decoder(decoder)``, int8) with its step run by ONNX Runtime where the export covers
    the architecture (the TorchScript step's: a Transformer decoder over cross-attention fusion), else ``base``
    itself; the graph is read from or written to ``cache``. An export or runtime failure falls back to ``base``
    with a warning, or raises ConfigError where ``onnx`` is True (asked for explicitly)."""

    if not isinstance(base, ScriptedDecoder) or not covers(decoder):
        return base
    try:
        return OnnxStepDecoder(base, decoder, cache)
    except Exception as exc:  # noqa: BLE001 — an exporter or runtime limitation: TorchScript still decodes
        if onnx:
            raise ConfigError(f"could not run the decoding step with ONNX Runtime: {exc}") from exc
        log.warning("decoding step: ONNX Runtime export failed (%s); using TorchScript", exc)
        return base
