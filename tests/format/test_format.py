"""The format's one home (edgeinfer/format): constants, graph I/O names, the reference
MatMulNBits pack/unpack/dequantize, and the byte formatter people read sizes in."""
from __future__ import annotations

import numpy as np
import pytest

from edgeinfer.format import bundle, constants, experts, quant
from edgeinfer.format.constants import (
    ALIGN,
    find_multiple,
    past_key_layer,
    past_name,
    present_name,
)
from edgeinfer.units import fmt_bytes


def test_find_multiple_rounds_up_ints_and_arrays():
    assert [find_multiple(n, 64) for n in (0, 1, 63, 64, 65)] == [0, 64, 64, 64, 128]
    np.testing.assert_array_equal(find_multiple(np.array([1, 4096, 4097]), ALIGN), [4096, 4096, 8192])


def test_graph_io_names_and_the_layer_of_a_past_key():
    assert past_name(3, "key") == "past_key_values.3.key" and present_name(3, "value") == "present.3.value"
    assert past_key_layer(past_name(12, "key")) == 12
    for other in (past_name(1, "value"), present_name(1, "key"), "past_key_values.x.key", constants.LOGITS,
                  "past_key_values.1.key.extra"):
        assert past_key_layer(other) is None


def test_exported_graph_uses_the_format_names(exported):
    import onnx

    folder = exported("llama-relu-8m", "int4")
    g = onnx.load(str(folder / constants.GRAPH_FILE), load_external_data=False).graph
    inputs, outputs = [i.name for i in g.input], [o.name for o in g.output]
    layers = sorted(n for n in map(past_key_layer, inputs) if n is not None)
    assert inputs[:2] == [constants.INPUT_IDS, constants.POSITION_IDS] and outputs[0] == constants.LOGITS
    assert layers == list(range(len(layers))) and layers
    assert {present_name(i, kv) for i in layers for kv in ("key", "value")} <= set(outputs)
    assert {constants.MANIFEST, constants.WEIGHTS_FILE, constants.FFN_FILE} <= {p.name for p in folder.iterdir()}


def test_weight_writer_aligns_every_tensor(tmp_path):
    from edgeinfer.export.writer import WeightFileWriter

    w = WeightFileWriter(tmp_path, constants.WEIGHTS_FILE)
    offsets = [w.append(np.ones(n, np.uint8))[0] for n in (1, ALIGN + 1, 7)]
    w.close()
    assert offsets == [0, ALIGN, 3 * ALIGN]


@pytest.mark.parametrize("bits", quant.SUPPORTED_BITS)
def test_pack_unpack_round_trip(bits):
    codes = np.random.default_rng(bits).integers(0, 1 << bits, (3, 5, 32), dtype=np.uint8)
    packed = quant.pack(codes, bits)
    assert packed.shape == (3, 5, 32 * bits // 8)
    np.testing.assert_array_equal(quant.unpack(packed, bits), codes)


def test_matmulnbits_nibble_order_and_zero_point():
    """4 bits: element 2j in the low nibble; code 8 stands for 0.0 (MatMulNBits' default zero point)."""
    packed = np.array([[[0x9F, 0x08]]], np.uint8)             # elements 15, 9, 8, 0
    scales = np.array([[0.5]], np.float32)
    np.testing.assert_array_equal(quant.dequantize(packed, scales, 4), [[3.5, 0.5, 0.0, -4.0]])
    assert quant.zero_point(4) == 8 and quant.zero_point(2) == 2


def test_quant_names_and_their_inverse():
    assert all(quant.QUANT_NAMES[b] == name for name, b in quant.QUANT_BITS.items())
    assert set(quant.WEIGHT_QUANTS) | set(quant.EXPERT_LOW_QUANTS) <= set(quant.QUANT_BITS)
    assert all(a in quant.QUANT_BITS for a in quant.QUANT_ALIASES.values())


@pytest.mark.parametrize("bits", [4, 8])
def test_bundle_and_expert_records_decode_with_the_reference(bits):
    """Both record layouts decode through quant.dequantize (one reference, not three)."""
    from edgeinfer.export.quantize import quantize

    rng = np.random.default_rng(bits)
    d, f, g = 64, 32, 32
    gate, up = rng.standard_normal((f, d), dtype=np.float32), rng.standard_normal((f, d), dtype=np.float32)
    down = rng.standard_normal((d, f), dtype=np.float32)
    lay = bundle.BundleLayout(d, f, bits, g, gated=True)
    got = bundle.decode(lay, bundle.encode(lay, gate, up, down, quantize))
    for w, dec in zip((gate, up, down.T), got):
        p, s = quantize(np.ascontiguousarray(w), bits, g)
        # the bundle keeps float16 scales
        np.testing.assert_array_equal(dec, quant.dequantize(p, s.astype(np.float16).astype(np.float32), bits))
    fmt = experts.RecordFormat(d, f, (bits,), g)
    rec, levels = experts.encode(fmt, (gate, up, down), quantize)
    for want, dec in zip(levels[-1], experts.decode(fmt, rec)):
        np.testing.assert_array_equal(dec, want)
    assert fmt.stage_bytes(bits) % ALIGN == 0


@pytest.mark.parametrize("n,text", [(0, "0 B"), (512, "512 B"), (4096, "4 KiB"), (12 << 10, "12 KiB"),
                                    (1 << 20, "1 MiB"), (3 << 19, "1.5 MiB"), (int(7.6 * 2**30), "7.6 GiB"),
                                    (8 << 30, "8 GiB"), (-(1 << 20), "-1 MiB")])
def test_fmt_bytes(n, text):
    assert fmt_bytes(n) == text
