"""GraphBuilder: writes the ONNX graph directly from weights with small make_* helpers.

Linear layers become com.microsoft MatMulNBits (int8/int4: plain onnxruntime
runs them with its own kernels) or edgeinfer MatMulF16; the rest are standard
ops or edgeinfer custom ops whose ONNX function bodies live in functions.py.
"""
from __future__ import annotations

import numpy as np
import onnx
from edgeinfer.export import functions
from edgeinfer.export.quantize import quantize, relative_error
from edgeinfer.export.writer import ModelFolderWriter
from onnx import TensorProto, helper

from edgeinfer.format.constants import WEIGHTS_FILE

IR_VERSION = 10  # onnxruntime 1.18+ loads it; onnx 1.23 would write 14 by default
MS_DOMAIN = "com.microsoft"


class GraphBuilder:
    def __init__(self, writer: ModelFolderWriter, *, bits: int | None, group_size: int):
        self.writer = writer
        self.bits = bits            # None: float16 weights
        self.group_size = group_size
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.functions: dict[str, onnx.FunctionProto] = {}
        self.quant_report: dict[str, float] = {}

    # -- primitives ---------------------------------------------------------------------
    def weight(self, name: str, array: np.ndarray, file: str = WEIGHTS_FILE) -> str:
        self.initializers.append(self.writer.add_tensor(name, array, file))
        return name

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str] | str, *, name: str,
             domain: str = "", **attrs) -> str | list[str]:
        outs = [outputs] if isinstance(outputs, str) else outputs
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs))
        return outputs

    def function(self, key: str, make) -> None:
        if key not in self.functions:
            self.functions[key] = make()

    # -- layers ---------------------------------------------------------------------------
    def quantized(self, name: str, w: np.ndarray, bits: int, file: str) -> tuple[str, str]:
        packed, scales = quantize(w, bits, self.group_size)
        self.quant_report[name] = round(relative_error(w, packed, scales, bits), 6)
        return (self.weight(f"{name}.qweight", packed, file),
                self.weight(f"{name}.scales", scales.reshape(-1), file))

    def linear(self, name: str, x: str, w: np.ndarray, bias: np.ndarray | None = None, *,
               file: str = WEIGHTS_FILE, bits: int | None = -1, tensors: tuple[str, ...] | None = None,
               out: str | None = None) -> str:
        """y = x @ w.T (+ bias); w is [N, K] as nn.Linear stores it.

        `tensors` reuses already-written weights (a tied lm_head uses the embedding's).
        """
        bits = self.bits if bits == -1 else bits
        n, k = w.shape
        y = f"{name}.out" if out is None or bias is not None else out
        if bits is None:
            wname = tensors[0] if tensors else self.weight(f"{name}.weight", w.astype(np.float16), file)
            self.function("MatMulF16", functions.matmul_f16)
            self.node("MatMulF16", [x, wname], y, name=name, domain=functions.DOMAIN)
        else:
            qw, sc = tensors if tensors else self.quantized(name, w, bits, file)
            self.node("MatMulNBits", [x, qw, sc], y, name=name, domain=MS_DOMAIN,
                      K=k, N=n, bits=bits, block_size=self.group_size)
        if bias is not None:
            b = self.weight(f"{name}.bias", bias.astype(np.float32), file)
            y = self.node("Add", [y, b], out or f"{name}.biased", name=f"{name}.add_bias")
        return y

    def embedding(self, name: str, ids: str, table: np.ndarray, bits: int | None) -> tuple[str, tuple[str, ...]]:
        """Gather rows of `table` [V, K]; returns (output, stored tensor names for a tied lm_head)."""
        y = f"{name}.out"
        if bits is None:
            w = self.weight(f"{name}.weight", table.astype(np.float16))
            g = self.node("Gather", [w, ids], f"{name}.f16", name=name, axis=0)
            self.node("Cast", [g], y, name=f"{name}.cast", to=TensorProto.FLOAT)
            return y, (w,)
        qw, sc = self.quantized(name, table, bits, WEIGHTS_FILE)
        k = table.shape[1]
        self.function(f"GatherNBits{bits}", lambda: functions.gather_nbits(bits, self.group_size, k))
        self.node("GatherNBits", [qw, sc, ids], y, name=name, domain=functions.DOMAIN,
                  bits=bits, block_size=self.group_size, K=k)
        return y, (qw, sc)

    def norm(self, name: str, x: str, kind: str, w: np.ndarray, b: np.ndarray | None, eps: float) -> str:
        wn = self.weight(f"{name}.weight", w.astype(np.float32))
        y = f"{name}.out"
        if kind == "layernorm":
            bn = self.weight(f"{name}.bias", (b if b is not None else np.zeros_like(w)).astype(np.float32))
            self.node("LayerNormalization", [x, wn, bn], y, name=name, axis=-1, epsilon=eps)
        else:
            self.function("RMSNorm", lambda: functions.rms_norm(eps))
            self.node("RMSNorm", [x, wn], y, name=name, domain=functions.DOMAIN, epsilon=eps)
        return y

    # -- model ----------------------------------------------------------------------------
    def model(self, doc: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "edgeinfer_decoder", self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", functions.OPSET), helper.make_opsetid(MS_DOMAIN, 1),
                  helper.make_opsetid(functions.DOMAIN, 1)]
        m = helper.make_model(graph, opset_imports=opsets, functions=list(self.functions.values()),
                              ir_version=IR_VERSION, producer_name="edgeinfer", doc_string=doc)
        return m

    def input(self, name: str, dtype: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def output(self, name: str, dtype: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))
