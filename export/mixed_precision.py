"""ONNX graph surgery for the FP16 engines of the ``gpu-trt`` target: which nodes stay FP32, and the
mixed-precision graph that strongly typed TensorRT builds parse.

ViTs in plain FP16 lose accuracy in LayerNorm (a mean and a variance over 1024 channels) and in the
attention softmax (exponentials of large logits), so every ``LayerNormalization`` / normalisation /
``Softmax`` node, and the ReduceMean/Sub/Pow/Sqrt/Div chain of a LayerNorm that an exporter
decomposed, stays FP32 (:func:`fp32_nodes`). TensorRT 10 keeps them FP32 with weak typing
(:mod:`mofserve.export.tensorrt_engine` pins their layers); TensorRT 11 removed those flags and
builds strongly typed networks only, so there the graph itself is rewritten to mixed precision
first (:func:`to_mixed_precision`, what ModelOpt AutoCast does, without the dependency).

Why its own module: this is plain Python over the ONNX graph that needs neither TensorRT nor a GPU,
and is tested on the CPU machines; the engine builder (``tensorrt_engine.py``) calls it for every build.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

# Node types kept in FP32 wherever they appear: normalisations and softmax.
FP32_OP_TYPES = frozenset({
    "LayerNormalization", "RMSNormalization", "GroupNormalization", "InstanceNormalization",
    "BatchNormalization", "LpNormalization", "Softmax", "LogSoftmax",
})


# ---- which ONNX nodes stay FP32 ----------------------------------------------------------------


def _consumers(graph) -> dict[str, list]:
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                users.setdefault(name, []).append(node)
    return users


def _producers(graph) -> dict[str, object]:
    return {out: node for node in graph.node for out in node.output if out}


def _is_square(node, producers: Mapping[str, object], constants: Mapping[str, np.ndarray]) -> bool:
    """``Pow(d, 2)`` or ``Mul(d, d)``."""
    if node.op_type == "Mul":
        return len(node.input) == 2 and node.input[0] == node.input[1]
    if node.op_type != "Pow" or len(node.input) != 2:
        return False
    exponent = constants.get(node.input[1])
    return exponent is not None and exponent.size == 1 and float(exponent.reshape(-1)[0]) == 2.0


def _is_one(value: np.ndarray | None) -> bool:
    return value is not None and value.size == 1 and float(value.reshape(-1)[0]) == 1.0


def _constant_values(graph) -> dict[str, np.ndarray]:
    """Small constants (initializers and Constant nodes) by tensor name, for pattern matching."""
    from onnx import numpy_helper  # lazy: onnx loads only when a graph is inspected

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer if np.prod(t.dims) <= 16}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and np.prod(attr.t.dims) <= 16:
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def decomposed_layer_norms(model) -> list[list[str]]:
    """LayerNorms an exporter spelled out (opset < 17, or RMSNorm), as lists of node names.

    Mean/variance form: ``m = ReduceMean(x); d = x - m; v = ReduceMean(d * d or Pow(d, 2));
    s = Sqrt(v + eps); y = d / s`` (or ``d * Reciprocal(s)``). RMS form: the same without the mean.
    The affine ``* gamma + beta`` that follows is ordinary FP16 work and is left out.
    """
    graph = model.graph
    users, producers, constants = _consumers(graph), _producers(graph), _constant_values(graph)
    found: list[list[str]] = []

    def only(tensor: str, op_types: Iterable[str]):
        nodes = [n for n in users.get(tensor, []) if n.op_type in op_types]
        return nodes[0] if len(nodes) == 1 else None

    def tail(square, centred: str) -> list | None:
        """square -> ReduceMean -> Add(eps) -> Sqrt -> Div(centred, .) | Reciprocal -> Mul(centred, .)."""
        var = only(square.output[0], ("ReduceMean",))
        add = var and only(var.output[0], ("Add",))
        sqrt = add and only(add.output[0], ("Sqrt",))
        if not sqrt:
            return None
        div = next((n for n in users.get(sqrt.output[0], []) if n.op_type == "Div" and n.input[0] == centred), None)
        if div is not None:
            return [var, add, sqrt, div]
        # 1 / s as Reciprocal(s) or Div(1, s) (torch's rsqrt), then a Mul with the centred input
        recip = next((n for n in users.get(sqrt.output[0], []) if n.op_type == "Reciprocal" or (
            n.op_type == "Div" and n.input[1] == sqrt.output[0] and _is_one(constants.get(n.input[0])))), None)
        mul = recip and next((n for n in users.get(recip.output[0], [])
                              if n.op_type == "Mul" and centred in n.input), None)
        return [var, add, sqrt, recip, mul] if mul is not None else None

    claimed: set[str] = set()
    for mean in (n for n in graph.node if n.op_type == "ReduceMean"):
        x = mean.input[0]
        subs = [n for n in users.get(mean.output[0], []) if n.op_type == "Sub" and list(n.input) == [x, mean.output[0]]]
        for sub in subs:
            centred = sub.output[0]
            for square in (n for n in users.get(centred, []) if _is_square(n, producers, constants)):
                rest = tail(square, centred)
                if rest:
                    chain = [mean, sub, square, *rest]
                    found.append([n.name for n in chain])
                    claimed.update(n.name for n in chain)
    # RMS form: square(x) -> ReduceMean -> Add -> Sqrt -> Div(x, .), x not centred by a mean
    for square in (n for n in graph.node if n.op_type in ("Pow", "Mul") and n.name not in claimed):
        if _is_square(square, producers, constants):
            rest = tail(square, square.input[0])
            if rest:
                found.append([square.name, *(n.name for n in rest)])
    return found


def fp32_nodes(model) -> set[str]:
    """Names of the nodes an FP16 engine keeps in FP32 (see the module docstring)."""
    keep = {n.name for n in model.graph.node if n.op_type in FP32_OP_TYPES}
    for chain in decomposed_layer_norms(model):
        keep.update(chain)
    return keep


def name_nodes(model) -> None:
    """Give every unnamed node a unique name (TensorRT layers and our FP32 set refer to nodes by name)."""
    seen = {n.name for n in model.graph.node if n.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)


# ---- mixed precision graph (strongly typed builds: TensorRT 11, or typing="strong") ----------------


def to_mixed_precision(model, keep: set[str]):
    """A copy of ``model`` with FP32 tensors turned FP16, except the inputs and outputs of ``keep``.

    Graph inputs and outputs keep their types (Casts at the boundary); weights and float constants
    are converted where FP16 nodes read them (a weight read only by an FP32 node, e.g. a
    LayerNorm's scale, stays FP32); a Cast is inserted wherever an FP32 node reads an FP16 tensor or
    the other way round, once per tensor and type, so that a chain of FP32 nodes never round-trips
    through FP16. ``Cast(to=FLOAT)`` and ``ConstantOfShape`` in FP16 nodes are retargeted.
    """
    # lazy: onnx loads only when a graph is rewritten
    import onnx
    from onnx import TensorProto, helper, numpy_helper  # lazy: see the line above

    src = onnx.shape_inference.infer_shapes(model)
    graph = src.graph
    if any(n.op_type in ("If", "Loop", "Scan") for n in graph.node):
        raise ValueError("mixed precision: graphs with control flow (If/Loop/Scan) are not supported")
    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    types: dict[str, int] = {}
    for info in [*graph.input, *graph.output, *graph.value_info]:
        types[info.name] = info.type.tensor_type.elem_type
    initializers = {t.name: t for t in graph.initializer}
    for t in graph.initializer:
        types[t.name] = t.data_type
    constant_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    for name, node in constant_nodes.items():
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if value is not None:
            types[name] = value.data_type

    out = onnx.ModelProto()
    out.CopyFrom(src)
    del out.graph.node[:]
    del out.graph.initializer[:]
    del out.graph.value_info[:]
    # tensor name -> {dtype: name holding it in that dtype}
    available: dict[str, dict[int, str]] = {}
    new_nodes: list = []
    new_inits: list = []

    def is_float(name: str) -> bool:
        return types.get(name) == FLOAT

    def constant_as(name: str, dtype: int) -> str:
        """A float constant (initializer or Constant node) in ``dtype``, converted once."""
        have = available.setdefault(name, {})
        if dtype in have:
            return have[dtype]
        new_name = name if dtype == FLOAT else f"{name}__fp16"
        if name in initializers:
            array = numpy_helper.to_array(initializers[name])
            new_inits.append(numpy_helper.from_array(_as_float(array, dtype == HALF), new_name))
        else:
            node = constant_nodes[name]
            value = numpy_helper.to_array(next(a.t for a in node.attribute if a.name == "value"))
            tensor = numpy_helper.from_array(_as_float(value, dtype == HALF), new_name)
            new_nodes.append(helper.make_node("Constant", [], [new_name], name=f"{node.name or name}__{dtype}",
                                              value=tensor))
        have[dtype] = new_name
        return new_name

    def tensor_as(name: str, dtype: int) -> str:
        if name in initializers or name in constant_nodes:
            return constant_as(name, dtype)
        have = available[name]
        if dtype in have:
            return have[dtype]
        source = next(iter(have.values()))
        cast_name = f"{name}__{'fp16' if dtype == HALF else 'fp32'}"
        new_nodes.append(helper.make_node("Cast", [source], [cast_name], name=f"{cast_name}__cast", to=dtype))
        have[dtype] = cast_name
        return cast_name

    for info in graph.input:
        if info.name not in initializers:
            available[info.name] = {info.type.tensor_type.elem_type: info.name}
    for t in graph.initializer:
        if not is_float(t.name):
            new_inits.append(t)
            available[t.name] = {t.data_type: t.name}
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] in types and is_float(node.output[0]):
            continue  # emitted on demand, in the dtype each reader needs
        dtype = FLOAT if node.name in keep else HALF
        clone = onnx.NodeProto()
        clone.CopyFrom(node)
        for i, name in enumerate(node.input):
            if name and is_float(name):
                clone.input[i] = tensor_as(name, dtype)
        if dtype == HALF:
            for attr in clone.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
                    attr.i = HALF
                if node.op_type == "ConstantOfShape" and attr.name == "value" and attr.t.data_type == FLOAT:
                    attr.t.CopyFrom(numpy_helper.from_array(_as_float(numpy_helper.to_array(attr.t), True)))
        for i, name in enumerate(node.output):
            if not name:
                continue
            if is_float(name):
                produced = name if dtype == FLOAT or name not in outputs else f"{name}__fp16"
                clone.output[i] = produced
                available[name] = {dtype: produced}
            else:
                available[name] = {types.get(name, 0): name}
        new_nodes.append(clone)
    for o in graph.output:  # graph outputs keep their declared type
        if is_float(o.name) and available[o.name].get(FLOAT) != o.name:
            new_nodes.append(helper.make_node("Cast", [available[o.name][HALF]], [o.name],
                                              name=f"{o.name}__output_cast", to=FLOAT))
    out.graph.node.extend(new_nodes)
    out.graph.initializer.extend(new_inits)
    kept_inputs = [i for i in out.graph.input if i.name not in initializers]  # IR < 4 lists weights as inputs
    del out.graph.input[:]
    out.graph.input.extend(kept_inputs)
    return out


FP16_MAX = float(np.finfo(np.float16).max)


def _as_float(array: np.ndarray, half: bool) -> np.ndarray:
    """``array`` as float16 (finite values clipped to +-65504, as attention masks of float32 min are:
    an overflow would make them -inf and a fully masked row NaN) or float32."""
    if not half:
        return array.astype(np.float32)
    finite = np.isfinite(array)
    return np.where(finite, np.clip(array, -FP16_MAX, FP16_MAX), array).astype(np.float16)
