"""fp16 ONNX models with fp32 inputs/outputs and chosen fp32 islands.

Written on onnx's own API rather than onnxconverter-common: the exported BranchedERFNet graph holds only
seven op types, so the conversion is short and fully visible here (no extra dependency, no surprises with
shared initialisers). Each node runs either in fp16 or in fp32; a ``Cast`` is inserted wherever a tensor
crosses between the two, and at the graph inputs and outputs, so the model's interface stays fp32.

What stays fp32 was decided by measurement (``benchmarks/bench_fp16.py``, ``benchmarks/results/
fp16_error.md``). Node selection is structural, not by name, so it works for the legacy and the dynamo
exporter alike:

* ``heads``: the nodes that feed the final output ``Concat`` (one output conv per decoder branch);
* ``bn``: the ``BatchNormalization`` nodes left after export (the downsamplers' and upsamplers', which
  follow a ``Concat``/``ConvTranspose`` and are not folded into a conv);
* ``first``: the nodes that read the graph input (the first downsampler's conv and max-pool).

Default ``heads`` + ``bn`` (9 of ~220 nodes in 2D, ~300 in 3D): on the trained upstream fixtures it
halves the 3D sigma error (2.0 % -> 1.1 %) and cuts the 2D offset error by a fifth (0.019 -> 0.015 px);
``first`` adds little. Labels agree with fp32 at AP@0.5 = 1.0 for every choice.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .choices import DEFAULT_KEEP, KEEP_CHOICES

# Ops that compute in whatever float type their inputs have and carry no type in their attributes.
FP16_SAFE_OPS = frozenset(
    {"Conv", "ConvTranspose", "BatchNormalization", "MaxPool", "AveragePool", "Concat", "Add", "Sub", "Mul",
     "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Identity"}
)  # fmt: skip
FP16_MAX = float(np.finfo(np.float16).max)


class Fp16Error(ValueError):
    """The model cannot be converted to fp16 (overflowing weights, unexpected structure)."""


def select_fp32_nodes(graph: onnx.GraphProto, keep: Iterable[str]) -> set[str]:
    """Names of the nodes that ``keep`` (a subset of :data:`KEEP_CHOICES`) keeps in fp32."""
    keep = set(keep)
    unknown = keep - set(KEEP_CHOICES)
    if unknown:
        raise Fp16Error(f"unknown fp32 keep choice(s) {sorted(unknown)}; choose from {KEEP_CHOICES}")
    producer = {out: node for node in graph.node for out in node.output}
    graph_inputs = {i.name for i in graph.input}
    chosen: set[str] = set()
    if "heads" in keep:
        for out in graph.output:
            final = producer[out.name]
            heads = (
                [producer[i] for i in final.input if i in producer] if final.op_type == "Concat" else [final]
            )
            chosen |= {n.name for n in heads}
    if "bn" in keep:
        chosen |= {n.name for n in graph.node if n.op_type == "BatchNormalization"}
    if "first" in keep:
        chosen |= {n.name for n in graph.node if graph_inputs & set(n.input)}
    return chosen


def convert_to_fp16(model: onnx.ModelProto, keep: Iterable[str] = DEFAULT_KEEP) -> onnx.ModelProto:
    """A copy of the fp32 ``model`` running in fp16 except the nodes ``keep`` names; fp32 I/O."""
    model = _with_unique_node_names(model)
    graph = model.graph
    keep_fp32 = select_fp32_nodes(graph, keep)
    keep_fp32 |= {n.name for n in graph.node if n.op_type not in FP16_SAFE_OPS}
    inits = {t.name: t for t in graph.initializer}
    float_names = _float32_tensors(model)

    new_inits: dict[str, TensorProto] = {}
    casts: dict[tuple[str, int], str] = {}
    cast_nodes: list[onnx.NodeProto] = []
    dtype_of = {i.name: TensorProto.FLOAT for i in graph.input}  # activations' current element type

    def as_type(name: str, to: int) -> str:
        if name in inits:
            if to == TensorProto.FLOAT16:
                return _fp16_initializer(inits[name], new_inits)
            return name
        if dtype_of.get(name, TensorProto.FLOAT) == to:
            return name
        key = (name, to)
        if key not in casts:
            casts[key] = f"{name}__as_{'fp16' if to == TensorProto.FLOAT16 else 'fp32'}"
            cast_nodes.append(
                helper.make_node("Cast", [name], [casts[key]], to=to, name=f"{casts[key]}/Cast")
            )
        return casts[key]

    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        to = TensorProto.FLOAT if node.name in keep_fp32 else TensorProto.FLOAT16
        for k, name in enumerate(node.input):
            if name and name in float_names:
                node.input[k] = as_type(name, to)
        nodes.extend(cast_nodes)
        cast_nodes.clear()
        nodes.append(node)
        for out in node.output:
            if out in float_names:
                dtype_of[out] = to

    # Outputs stay fp32: rename a fp16 producer's output and cast back under the original name.
    for out in graph.output:
        if dtype_of.get(out.name) == TensorProto.FLOAT16:
            inner = f"{out.name}__fp16"
            for node in nodes:
                node.output[:] = [inner if o == out.name else o for o in node.output]
            nodes.append(
                helper.make_node("Cast", [inner], [out.name], to=TensorProto.FLOAT, name=f"{out.name}/Cast")
            )

    used = {i for n in nodes for i in n.input}
    kept_inits = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + [t for t in new_inits.values() if t.name in used])
    del graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def precision_of_nodes(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> "fp16"/"fp32" (the element type of its first input) for every non-Cast node."""
    g = onnx.shape_inference.infer_shapes(model).graph
    types = {t.name: t.data_type for t in g.initializer}
    types |= {
        i.name: i.type.tensor_type.elem_type for i in list(g.input) + list(g.value_info) + list(g.output)
    }
    return {
        n.name: "fp16" if types.get(n.input[0]) == TensorProto.FLOAT16 else "fp32"
        for n in g.node
        if n.op_type != "Cast" and n.input
    }


def _fp16_initializer(tensor: TensorProto, cache: dict[str, TensorProto]) -> str:
    name = f"{tensor.name}__fp16"
    if name not in cache:
        values = numpy_helper.to_array(tensor)
        peak = float(np.abs(values).max()) if values.size else 0.0
        if peak > FP16_MAX:
            raise Fp16Error(
                f"weight {tensor.name!r} has |value| {peak:g} > fp16 max {FP16_MAX:g}; keep its node fp32"
            )
        cache[name] = numpy_helper.from_array(values.astype(np.float16), name)
    return name


def _float32_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of every float32 tensor in the graph (inputs, initializers, intermediate values, outputs)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    names = {t.name for t in g.initializer if t.data_type == TensorProto.FLOAT}
    for info in list(g.input) + list(g.value_info) + list(g.output):
        if info.type.tensor_type.elem_type == TensorProto.FLOAT:
            names.add(info.name)
    return names


def _with_unique_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    seen: set[str] = set()
    for k, node in enumerate(copy.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{k}"
        seen.add(node.name)
    return copy
