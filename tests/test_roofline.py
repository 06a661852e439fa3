"""benchmarks.roofline.count_macs against a hand count on a small graph with every counted op, dynamic axes
fixed by the request's shapes (exact integers: the count is arithmetic, not an estimate)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks.roofline import count_macs


def graph():
    """x (B, 3, H, W) -> Conv 3->8 k3 pad1 -> ConvTranspose 8->4 k2 s2 -> Reshape (B, 4*2H, 2W) ->
    MatMul with W1 (2W, 16) -> batched MatMul with its own transpose (attention scores) -> Gemm on a (5, 6) input."""
    g = np.random.default_rng(0)
    inits = [numpy_helper.from_array(g.standard_normal(s).astype(np.float32), n) for n, s in
             (("wc", (8, 3, 3, 3)), ("wt", (8, 4, 2, 2)), ("w1", (32, 16)), ("wg", (6, 7)), ("bg", (7,)))]
    nodes = [
        helper.make_node("Conv", ["x", "wc"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["c", "wt"], ["t"], strides=[2, 2]),
        helper.make_node("Shape", ["t"], ["ts"]),
        helper.make_node("Gather", ["ts", "i0"], ["b"], axis=0),
        helper.make_node("Concat", ["b", "rest"], ["target"], axis=0),
        helper.make_node("Reshape", ["t", "target"], ["r"]),
        helper.make_node("MatMul", ["r", "w1"], ["m"]),
        helper.make_node("Transpose", ["m"], ["mt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["m", "mt"], ["s"]),
        helper.make_node("Gemm", ["y", "wg", "bg"], ["z"]),
    ]
    inits += [numpy_helper.from_array(np.array([0], np.int64), "i0"),
              numpy_helper.from_array(np.array([-1, 32], np.int64), "rest")]
    return helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, "H", "W"]),
                     helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 6])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, ["B", "R", "R"]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [5, 7])], initializer=inits))


def test_count_macs_matches_the_hand_count():
    model = graph()
    onnx.checker.check_model(model)
    b, h, w = 2, 16, 16
    got = count_macs(model, {"x": (b, 3, h, w), "y": (5, 6)})
    conv = b * 8 * h * w * (3 * 3 * 3)  # each output element: C_in x kernel MACs
    convt = b * 8 * h * w * (4 * 2 * 2)  # each input element scatters C_out x kernel MACs
    rows = 4 * (2 * h) * (2 * w) // 32  # (B, rows, 32) after the reshape
    matmul = b * rows * 16 * 32 + b * rows * rows * 16  # projection, then scores (B, rows, rows) over K = 16
    gemm = 5 * 7 * 6
    assert got["unresolved"] == []
    assert got["by_op"] == {"Conv": conv, "ConvTranspose": convt, "MatMul": matmul, "Gemm": gemm}
    assert got["macs"] == conv + convt + matmul + gemm
    # the count follows the request's shapes
    assert count_macs(model, {"x": (1, 3, h, w), "y": (5, 6)})["by_op"]["Conv"] == conv // 2


def test_openvino_shapes_fill_what_onnx_inference_leaves(tmp_path):
    """Attention's Reshape targets come from Shape -> Gather -> Div -> Concat; ONNX's data propagation does not
    fold the Div, OpenVINO's frontend does: with the graph's file the MatMul behind such a Reshape is counted."""
    g = np.random.default_rng(0)
    nodes = [
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Gather", ["xs", "i1"], ["n"], axis=0),
        helper.make_node("Div", ["n", "two"], ["half"]),
        helper.make_node("Concat", ["b2", "half", "c"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["r"]),  # (B, N, 8) -> (2B, N/2, 8)... as heads split
        helper.make_node("MatMul", ["r", "w"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array([1], np.int64), "i1"),
             numpy_helper.from_array(np.array([2], np.int64), "two"),
             numpy_helper.from_array(np.array([-1], np.int64), "b2"),
             numpy_helper.from_array(np.array([8], np.int64), "c"),
             numpy_helper.from_array(g.standard_normal((8, 5)).astype(np.float32), "w")]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits),
        opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    shapes = {"x": (3, 40, 8)}
    onnx_only = count_macs(model, shapes)
    both = count_macs(model, shapes, path)
    assert both["unresolved"] == [] and both["by_op"]["MatMul"] == 3 * 40 * 8 * 5  # (6, 20, 8) @ (8, 5)
    assert onnx_only["unresolved"] or onnx_only["by_op"]["MatMul"] == both["by_op"]["MatMul"]
