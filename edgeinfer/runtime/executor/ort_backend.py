"""onnxruntime segments: a run of consecutive graph nodes as one InferenceSession.

Each segment is a sub-model cut out of model.onnx: its nodes, the model-local
functions they use (the custom ops' bodies), their initializers, and the tensors
crossing its edges as inputs and outputs. Weights are not copied: the sub-model
keeps model.onnx's external-data entries, and every one is overridden with
SessionOptions.add_initializer over the resident numpy buffer (weights.py), so
onnxruntime reads the bytes edgeinfer loaded and checksummed. (A kernel that
prepacks its weights, as the CPU MatMulNBits does, still makes its own copy.)

Tensors passed from one segment to the next stay where the provider put them
(OrtValues through I/O binding); only what Numba or the caller reads comes back
to host memory. Inside the executor, Numba tensors have no batch axis ([S, ...],
batch 1) and onnxruntime tensors do ([1, S, ...]); the edges add or drop it.

KV cache: the engine's KVCache (numpy, [kv_heads, capacity, head_dim] per layer)
stays the one source of truth, so a cache means the same thing whichever backend
ran a layer. An Attention node run by onnxruntime reads past_key_values.N.* and
returns present.N.*; the segment also returns present's new rows (a Slice added
to the sub-model), which are written into the KVCache at the committed length.
The present OrtValue is kept per (cache, layer) and fed back as the next past, so
the cache stays on the device between steps; it is reused only while its length
and last row match the KVCache (after truncate, or a forward that failed half
way, the past is rebuilt from the KVCache).
"""
from __future__ import annotations

import threading
import warnings
import weakref
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeinfer.errors import ConstantFoldingWarning, EdgeInferError
from edgeinfer.format.constants import (
    LOGITS,
    PAST_PREFIX,
    PRESENT_PREFIX,
    past_key_layer,
    past_name,
)
from edgeinfer.runtime.executor.graph import Graph
from edgeinfer.runtime.executor.partition import (
    ORT,
    Segment,
    assign,
    partition,
    tensor_types,
)
from edgeinfer.runtime.executor.providers import (
    device_of,
    fallback_warning,
    ort_module,
    provider_name,
)

_ROWS_START = "edgeinfer.rows_start"      # 0: logits for every position; -1: the last only
_INT64_MAX = np.iinfo(np.int64).max
# MatMulNBits accuracy_level set in the sub-models, by weight bits. onnxruntime's CPU kernel
# for 8-bit weights has no float-activation path: at level 0 it dequantizes the whole
# matrix on every call (measured 0.1-0.3 GB/s of weights; the int8 lm_head of a 4-bit
# export alone took 7.5 ms of a 9 ms token). Level 4 quantizes activations to int8 per
# block: 40-50 GB/s, logits within ~0.05 of the float path (fixtures). 4-bit weights keep
# float activations, the numerics of the Numba kernels. Other providers ignore it.
ACCURACY_LEVEL = {8: 4}
# onnxruntime constant-folds a BundledFFN's function body into float32 weights, 8x the
# int4 bytes, and holds the intermediate tensors of the fold as well: a 520 MB int4
# export was killed for memory (23 GB machine). Above this many folded bytes per
# session, folding is off and a warning says so (the body then dequantizes per call).
FOLD_LIMIT = 256 << 20


# ---- building the sessions ---------------------------------------------------------------
def build_segments(graph: Graph, manifest, const, *, backend: str, plan, providers, threads=None,
                   numba_ops=(), activations: str = "float32") -> list["OrtSegment"]:
    """Assign nodes to backends and return the onnxruntime segments, ready to hand to
    Executor(segments=...). `numba_ops`: op keys that stay in Numba in hybrid mode.
    activations="int8" (RuntimeOptions.activations): every MatMulNBits at accuracy_level 4."""
    model = onnx.load(str(manifest.path(manifest.graph)), load_external_data=False)
    with_body = {(f.domain, f.name) for f in model.functions}
    streamed = {n.name for n in plan.streamed} if plan is not None else set()
    if backend == ORT and streamed:
        raise EdgeInferError(f"backend 'ort' runs every node in onnxruntime, which cannot stream weights, but this "
                             f"memory budget streams {len(streamed)} nodes: use backend='hybrid' (onnxruntime for "
                             "the rest, Numba for the streamed nodes) or raise the budget")
    assignment = assign(graph, backend, numba_ops=numba_ops, numba_nodes=streamed, ort_ops=with_body)
    segments = [s for s in partition(graph, assignment) if s.backend == ORT]
    runner = OrtRunner(model, graph, manifest, const, providers=providers, threads=threads,
                       spinning=len(segments) <= 1 and all(a == ORT for a in assignment),
                       accuracy_level={4: 4, 8: 4} if activations == "int8" else dict(ACCURACY_LEVEL))
    head, types = head_input(graph), tensor_types(graph, manifest)
    return [runner.segment(s, types, head) for s in segments]


def head_input(graph: Graph) -> tuple[int, int]:
    """(node index, input slot) of the lm_head matmul's activation input: the last
    position is sliced there when only the next token's logits are wanted."""
    producer = {o: i for i, n in enumerate(graph.nodes) for o in n.outputs}
    i = producer.get(LOGITS)
    if i is None:
        raise EdgeInferError("graph has no 'logits' output")
    if graph.nodes[i].op_type == "Add":
        i = producer.get(graph.nodes[i].inputs[0], i)
    return i, 0


@dataclass
class _KV:
    layer: int
    past: tuple[str, str]        # past_key_values.N.key / .value (sub-model inputs)
    present: tuple[str, str]     # present.N.key / .value
    rows: tuple[str, str]        # present's new rows, returned to host for the KVCache


@dataclass
class _Past:
    """One layer's past as onnxruntime holds it for one KVCache."""
    key: object                  # OrtValue [1, KVH, length, D] on the provider's device
    value: object
    length: int
    last: np.ndarray | None      # the last key row written, to tell a changed cache apart
    keep: tuple = ()             # numpy arrays an OrtValue wraps


class OrtRunner:
    """The sessions of one executor: shared options, providers, and the per-cache KV state."""

    def __init__(self, model: onnx.ModelProto, graph: Graph, manifest, const, *, providers, threads, spinning,
                 accuracy_level=None):
        self.model, self.graph, self.manifest, self.const = model, graph, manifest, const
        self.accuracy_level = ACCURACY_LEVEL if accuracy_level is None else accuracy_level   # by weight bits
        self.providers = list(providers)
        self.device = device_of(self.providers)
        self.threads = threads
        self.spinning = spinning
        self._inits = {t.name: t for t in model.graph.initializer}
        self._functions = {(f.domain, f.name): f for f in model.functions}
        self._ortvalues: dict[str, object] = {}       # shared initializers, one OrtValue each
        self._pasts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # KVCache -> {layer: _Past}
        self._lock = threading.Lock()
        self._checked = False

    # -- sub-model -------------------------------------------------------------------------
    def segment(self, seg: Segment, types: dict[str, int], head: tuple[int, int]) -> "OrtSegment":
        g = self.model.graph
        nodes = [self._copy(g.node[i]) for i in seg.nodes]
        inputs = [i for i in seg.inputs if not i.startswith(PAST_PREFIX)]
        outputs = [o for o in seg.outputs if not o.startswith(PRESENT_PREFIX)]
        extra_inits, kvs = [], []
        head_here = head[0] in seg.nodes
        if head_here:   # logits for the last position only when asked (decode), from a fed start row
            node = nodes[seg.nodes.index(head[0])]
            x = node.input[head[1]]
            node.input[head[1]] = f"{x}.rows"
            nodes.insert(seg.nodes.index(head[0]), helper.make_node(
                "Slice", [x, _ROWS_START, "edgeinfer.int64_max", "edgeinfer.axis1"], [f"{x}.rows"],
                name=f"{node.name}.rows"))
            extra_inits += [_i64("edgeinfer.int64_max", _INT64_MAX), _i64("edgeinfer.axis1", 1)]
        for n in list(nodes):
            if (n.domain, n.op_type) == ("edgeinfer", "Attention"):
                kvs.append(self._kv_rows(n, nodes, extra_inits))
        used = {i for n in nodes for i in n.input if i}
        inits = [self._inits[name] for name in sorted(used) if name in self._inits] + extra_inits
        graph_inputs = [helper.make_tensor_value_info(i, types.get(i, TensorProto.FLOAT), None)
                        for i in inputs + [p for kv in kvs for p in kv.past]]
        if head_here:
            graph_inputs.append(helper.make_tensor_value_info(_ROWS_START, TensorProto.INT64, [1]))
        graph_outputs = [helper.make_tensor_value_info(o, types.get(o, TensorProto.FLOAT), None)
                         for o in outputs + [p for kv in kvs for p in kv.present + kv.rows]]
        sub = helper.make_graph(nodes, f"segment_{seg.nodes[0]}_{seg.nodes[-1]}", graph_inputs, graph_outputs,
                                inits)
        sub_model = helper.make_model(sub, opset_imports=list(self.model.opset_import),
                                      functions=self._functions_for(nodes), ir_version=self.model.ir_version,
                                      producer_name="edgeinfer")
        fold = sum(_folded_bytes(self.graph.nodes[i]) for i in seg.nodes)
        if fold > FOLD_LIMIT:
            msg = (f"onnxruntime would constant-fold the BundledFFN bodies of nodes {seg.nodes[0]}..{seg.nodes[-1]} "
                   f"into {fold / 2**30:.1f} GiB of float32 weights (plus the fold's intermediates): folding is off "
                   "for this session, so the bundles are dequantized on every call (slow). Use backend='hybrid' "
                   "(the bundled FFN in Numba) or export with bundle=False to run this model in onnxruntime")
            warnings.warn(msg, ConstantFoldingWarning, stacklevel=5)
        session = self._session(sub_model, [t.name for t in inits if t.data_location == TensorProto.EXTERNAL],
                                fold=fold <= FOLD_LIMIT)
        host = {o for o in outputs if o in seg.host_outputs or self.device == "cpu"}
        return OrtSegment(self, session, seg.nodes, inputs, outputs, host, kvs, head_here)

    def _copy(self, node):
        n = onnx.NodeProto()
        n.CopyFrom(node)
        if (n.domain, n.op_type) == ("com.microsoft", "MatMulNBits"):
            attrs = {a.name: a for a in n.attribute}
            level = self.accuracy_level.get(attrs["bits"].i if "bits" in attrs else 4)
            if level is not None and "accuracy_level" not in attrs:
                n.attribute.append(helper.make_attribute("accuracy_level", level))
        return n

    def _kv_rows(self, n, nodes, extra_inits) -> _KV:
        pk, pv = n.input[3], n.input[4]
        layer = past_key_layer(pk)
        if layer is None:
            raise EdgeInferError(f"node {n.name}: past_key input must be a graph input {past_name('N', 'key')}")
        length = f"{pk}.length"
        rows = (f"{n.output[1]}.rows", f"{n.output[2]}.rows")
        if "edgeinfer.int64_max" not in {t.name for t in extra_inits}:
            extra_inits.append(_i64("edgeinfer.int64_max", _INT64_MAX))
        if "edgeinfer.axis2" not in {t.name for t in extra_inits}:
            extra_inits.append(_i64("edgeinfer.axis2", 2))
        nodes.append(helper.make_node("Shape", [pk], [length], name=f"{n.name}.past_length", start=2, end=3))
        for present, r in zip(n.output[1:3], rows):
            nodes.append(helper.make_node("Slice", [present, length, "edgeinfer.int64_max", "edgeinfer.axis2"], [r],
                                          name=f"{r}.slice"))
        return _KV(layer, (pk, pv), (n.output[1], n.output[2]), rows)

    def _functions_for(self, nodes) -> list:
        out, todo, seen = [], [(n.domain, n.op_type) for n in nodes], set()
        while todo:
            key = todo.pop()
            f = self._functions.get(key)
            if f is None or key in seen:
                continue
            seen.add(key)
            out.append(f)
            todo += [(n.domain, n.op_type) for n in f.node]
        return out

    def _session(self, model: onnx.ModelProto, shared: list[str], fold: bool = True):
        ort = ort_module()
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = int(self.threads or 0)
        so.inter_op_num_threads = 1
        # Between segments Numba computes: onnxruntime's threads must not spin on its cores.
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        # External-data entries are resolved against the model folder, but every one is
        # overridden below: onnxruntime uses edgeinfer's resident buffer, zero-copy.
        so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                    str(self.manifest.folder))
        for name in shared:
            so.add_initializer(name, self._ortvalue(name))
        try:
            session = ort.InferenceSession(model.SerializeToString(), so, providers=self.providers,
                                           disabled_optimizers=None if fold else ["ConstantFolding"])
        except Exception as exc:   # onnxruntime raises its own exception types
            raise EdgeInferError(f"onnxruntime could not build a session for {model.graph.name} ({exc})") from None
        if not self._checked:      # a provider that loaded but did not take the session is a fallback too
            self._checked = True
            got = session.get_providers()
            lost = [provider_name(p) for p in self.providers if provider_name(p) not in got]
            if lost:
                fallback_warning(lost, "installed, but onnxruntime did not create it", got, got)
        return session

    def _ortvalue(self, name: str):
        v = self._ortvalues.get(name)
        if v is None:
            arr = self.const(name)
            if arr is None:
                raise EdgeInferError(f"initializer {name} is not resident; onnxruntime segments need it in memory")
            if not arr.flags.c_contiguous:
                arr = np.ascontiguousarray(arr)
            v = self._ortvalues[name] = (ort_module().OrtValue.ortvalue_from_numpy(arr), arr)
        return v[0]

    # -- KV state ----------------------------------------------------------------------------
    def past(self, cache, kv: _KV) -> _Past:
        """This layer's past for `cache`, rebuilt from the KVCache unless the kept one matches it."""
        with self._lock:
            pasts = self._pasts.get(cache)
            if pasts is None:
                pasts = self._pasts[cache] = {}
        p = pasts.get(kv.layer)
        n = cache.length
        if p is not None and p.length == n and (n == 0 or np.array_equal(p.last, cache.k[kv.layer][:, n - 1])):
            return p
        ov = ort_module().OrtValue.ortvalue_from_numpy
        k = np.ascontiguousarray(cache.k[kv.layer][None, :, :n]) if cache.k else _empty(cache)
        v = np.ascontiguousarray(cache.v[kv.layer][None, :, :n]) if cache.v else _empty(cache)
        p = pasts[kv.layer] = _Past(ov(k, self.device, 0), ov(v, self.device, 0), n, None, (k, v))
        return p

    def keep(self, cache, kv: _KV, key, value, length: int, last) -> None:
        self._pasts[cache][kv.layer] = _Past(key, value, length, last)


def _folded_bytes(node) -> int:
    """float32 bytes onnxruntime's constant folding makes of a BundledFFN's weights."""
    if (node.domain, node.op_type) != ("edgeinfer", "BundledFFN"):
        return 0
    a = node.attrs
    return int(a["ffn"]) * int(a["hidden"]) * 4 * (3 if a["gated"] else 2)


def _empty(cache) -> np.ndarray:
    return np.zeros((1, cache.kv_heads, 0, cache.head_dim), np.float32)


def _i64(name: str, value: int) -> TensorProto:
    return helper.make_tensor(name, TensorProto.INT64, [1], [value])


@dataclass
class OrtSegment:
    """Callable the executor runs in place of the nodes it covers: fn(state, *inputs) -> outputs."""
    runner: OrtRunner
    session: object
    nodes: list[int]
    inputs: list[str]
    outputs: list[str]
    host: set[str]
    kvs: list[_KV] = field(default_factory=list)
    head: bool = False

    def __call__(self, state, *args):
        runner = self.runner
        io = self.session.io_binding()
        for name, value in zip(self.inputs, args):
            if isinstance(value, np.ndarray):
                io.bind_cpu_input(name, np.ascontiguousarray(value[None]))   # Numba side has no batch axis
            else:
                io.bind_ortvalue_input(name, value)
        if self.head:
            io.bind_cpu_input(_ROWS_START, np.array([-1 if state.last_only else 0], np.int64))
        cache = state.kv
        pasts = []
        for kv in self.kvs:
            p = runner.past(cache, kv)
            pasts.append(p)
            io.bind_ortvalue_input(kv.past[0], p.key)
            io.bind_ortvalue_input(kv.past[1], p.value)
        for name in self.outputs:
            io.bind_output(name, "cpu" if name in self.host else runner.device)
        for kv in self.kvs:
            io.bind_output(kv.present[0], runner.device)
            io.bind_output(kv.present[1], runner.device)
            io.bind_output(kv.rows[0], "cpu")
            io.bind_output(kv.rows[1], "cpu")
        self.session.run_with_iobinding(io)
        got = io.get_outputs()
        n = len(self.outputs)
        for j, (kv, p) in enumerate(zip(self.kvs, pasts)):
            key, value, rk, rv = got[n + 4 * j:n + 4 * j + 4]
            rk, rv = rk.numpy()[0], rv.numpy()[0]          # [KVH, S, D]
            start, s = p.length, rk.shape[1]
            cache.k[kv.layer][:, start:start + s] = rk
            cache.v[kv.layer][:, start:start + s] = rv
            runner.keep(cache, kv, key, value, start + s, rk[:, -1].copy())
        return tuple(got[i].numpy()[0] if name in self.host else got[i] for i, name in enumerate(self.outputs))
