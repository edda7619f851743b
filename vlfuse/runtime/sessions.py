"""ONNX Runtime sessions as vlfuse opens them, for image encoders and decoding steps alike."""
from __future__ import annotations

OPSET = 17  # the ONNX opset every graph is exported with (part of each graph's cache key)


def session_options(threads: int, prepack: bool = False, arena: bool = True):
    """ONNX Runtime session options for inference on a small CPU: ``threads`` intra-op threads that do not spin
    (a spinning pool takes cores from the work that runs between calls). Without ``prepack``, no prepacked weight
    copies: for the image encoder they cost ~40 MB more resident memory and were no faster here (9.2 vs 9.4 ms an
    image)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if not arena:
        options.enable_cpu_mem_arena = False
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initializers etc. are not the user's concern
    return options
