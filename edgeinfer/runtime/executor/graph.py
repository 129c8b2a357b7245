"""model.onnx as the executor sees it: nodes in order, inputs, outputs, initializers.

The graph is parsed without its external data; each external initializer must
match a manifest tensor exactly (file, offset, length), so a file cannot point
the runtime outside the model folder or at bytes the manifest did not checksum.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from edgeinfer.errors import ModelFormatError
from edgeinfer.format.constants import LOGITS, past_key_layer
from edgeinfer.format.manifest import Manifest

_MAX_NODES = 1_000_000


@dataclass
class Node:
    name: str
    op_type: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.domain or "", self.op_type)


@dataclass
class Graph:
    nodes: list[Node]
    inputs: list[str]
    outputs: list[str]
    external: dict[str, str]          # initializer name -> manifest tensor name (same name)
    inline: dict[str, np.ndarray]     # small constants stored inside model.onnx
    opsets: dict[str, int]


def load_graph(manifest: Manifest) -> Graph:
    path = manifest.path(manifest.graph)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and others
        raise ModelFormatError(f"{path} is not a readable ONNX model ({exc})") from None
    g = model.graph
    if len(g.node) > _MAX_NODES:
        raise ModelFormatError(f"{path}: {len(g.node)} nodes is more than this runtime accepts")
    external, inline = {}, {}
    for t in g.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            entry = manifest.tensors.get(t.name)
            if entry is None:
                raise ModelFormatError(f"initializer {t.name} is not in the manifest's tensor table")
            manifest.path(info.get("location", ""))  # refuses paths that escape the folder
            if (info.get("location") != entry.file or int(info.get("offset", 0)) != entry.offset
                    or int(info.get("length", -1)) != entry.nbytes or tuple(t.dims) != entry.shape):
                raise ModelFormatError(f"initializer {t.name}: model.onnx and manifest disagree on its location")
            external[t.name] = t.name
        else:
            if np.prod(t.dims, dtype=np.float64) > 1 << 26:
                raise ModelFormatError(f"inline initializer {t.name} is absurdly large")
            inline[t.name] = numpy_helper.to_array(t)
    nodes = []
    for n in g.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
        nodes.append(Node(n.name, n.op_type, n.domain, list(n.input), list(n.output), attrs))
    _check_config(manifest, g, nodes, path)
    return Graph(nodes=nodes, inputs=[i.name for i in g.input], outputs=[o.name for o in g.output],
                 external=external, inline=inline, opsets={o.domain: o.version for o in model.opset_import})


def _check_config(manifest: Manifest, g, nodes: list[Node], path) -> None:
    """The manifest's config sizes the KV cache and checks token ids: it must describe
    the graph it comes with (an edited or mismatched manifest fails here, clearly)."""
    c = manifest.config
    facts = {"num_layers": sum(1 for i in g.input if past_key_layer(i.name) is not None)}
    for o in g.output:
        dims = o.type.tensor_type.shape.dim
        if o.name == LOGITS and dims and dims[-1].HasField("dim_value"):
            facts["vocab_size"] = dims[-1].dim_value
    for n in nodes:
        if n.op_type == "Attention" and n.domain == "edgeinfer":
            facts.update(num_heads=n.attrs.get("num_heads"), num_kv_heads=n.attrs.get("num_kv_heads"),
                         head_dim=n.attrs.get("head_dim"))
        elif n.op_type == "BundledFFN":
            facts.update(hidden_size=n.attrs.get("hidden"), ffn_dim=n.attrs.get("ffn"))
    for key, actual in facts.items():
        if actual is not None and getattr(c, key, actual) != actual:
            raise ModelFormatError(f"{manifest.folder}: manifest config {key}={getattr(c, key)!r} does not match "
                                   f"{path.name} ({actual}); the manifest was edited or belongs to another export")
