"""Graph IR: verifier, text form, JSON round trip (hypothesis), registry."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tilert.ir.builder import GraphBuilder
from tilert.ir.dtypes import BF16, F32, FP8, I32, MXFP4
from tilert.ir.graph import Graph, IRError, Node, Sharding, Value
from tilert.ir.registry import all_ops, get_op
from tilert.models.builder import build_step_graph
from tilert.models.config import load_config
from tilert.models.drafter import build_drafter_graph


def small_graph() -> Graph:
    b = GraphBuilder("t")
    x = b.input("x", (3, 64), BF16)
    w = b.param("w", (32, 64), MXFP4, linear=("w",))
    n = b.param("n", (64,), BF16, tensor="n.weight")
    h = b.op("rms_norm", x, n, eps=1e-6)
    y = b.op("matmul", h, b.op("dequant", w))
    b.output(y)
    return b.finish()


def test_verify_accepts_builder_output_and_text_form():
    g = small_graph()
    text = g.to_text()
    assert "rms_norm(%x, %n) {eps=1e-06}" in text
    assert "param %w: mxfp4[32x64]" in text
    assert text.strip().endswith("}")


def test_verify_rejects_use_before_def():
    g = small_graph()
    g.nodes = list(reversed(g.nodes))
    with pytest.raises(IRError, match="used before it is defined"):
        g.verify()


def test_verify_rejects_unknown_op_and_bad_shape():
    g = small_graph()
    g.nodes[0] = Node("frobnicate", g.nodes[0].inputs, g.nodes[0].outputs)
    with pytest.raises(IRError, match="unknown op kind 'frobnicate'"):
        g.verify()
    g = small_graph()
    out = g.nodes[-1].outputs[0]
    g.values[out] = Value(out, (3, 31), BF16)
    with pytest.raises(IRError, match="infers bf16\\[3, 32\\]"):
        g.verify()


def test_matmul_on_quantised_weight_is_rejected():
    b = GraphBuilder("t")
    x = b.input("x", (1, 64), BF16)
    w = b.param("w", (32, 64), FP8, linear=("w",))
    with pytest.raises(IRError, match="needs dequant"):
        b.op("matmul", x, w)


def test_state_updated_twice_is_rejected():
    b = GraphBuilder("t")
    kc, vc = b.state("kc", (1, 8, 4), BF16), b.state("vc", (1, 8, 4), BF16)
    k, v, p = b.input("k", (1, 4), BF16), b.input("v", (1, 4), BF16), b.input("p", (1,), I32)
    b.op("kv_append", kc, vc, k, v, p)
    b.op("kv_append", kc, vc, k, v, p)
    with pytest.raises(IRError, match="already updated"):
        b.finish()


def test_dtype_bytes():
    assert MXFP4.nbytes((2048, 6144)) == 2048 * 6144 // 2 + 2048 * 6144 // 32
    assert FP8.nbytes((256, 130)) == 256 * 130 + 4 * 2 * 2
    assert BF16.nbytes((3, 5)) == 30 and F32.nbytes((4,)) == 16


def test_every_op_has_a_docstring_or_reference():
    for name, opdef in all_ops().items():
        assert callable(opdef.reference) and callable(opdef.infer), name
    assert get_op("all_reduce").collective


@pytest.mark.parametrize("model", ["tiny", "tiny-flash", "mimo-v2-flash", "mimo-v2.5-pro"])
def test_model_graphs_round_trip_exactly(model):
    cfg = load_config(model)
    for g in (build_step_graph(cfg, tokens=8, mode="verify", max_seq=256), build_drafter_graph(cfg, context=8)):
        s = g.to_json()
        g2 = Graph.from_json(s)
        assert g2.to_json() == s
        assert g2.values == g.values and g2.nodes == g.nodes and g2.outputs == g.outputs
        g2.verify()


names = st.text("abcdefgh._", min_size=1, max_size=8)
attr_values = st.recursive(
    st.one_of(
        st.integers(-(2**40), 2**40),
        st.floats(allow_nan=False, allow_infinity=False),
        st.booleans(),
        st.text(max_size=6),
    ),
    lambda c: st.lists(c, max_size=3),
    max_leaves=6,
)


@given(
    shapes=st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=3), min_size=1, max_size=5),
    attrs=st.dictionaries(names, attr_values, max_size=4),
    shard=st.sampled_from(["R", "S(0)", "S(1)", "P(sum)", "P(argmax)"]),
)
def test_json_round_trip_property(shapes, attrs, shard):
    """Arbitrary values, attrs (nested lists, floats, strings) and shardings survive JSON exactly."""
    g = Graph("h", meta={"k": [1, 2.5, "x"]})
    prev = None
    for i, s in enumerate(shapes):
        v = Value(f"v{i}", tuple(s), BF16, "input" if prev is None else "act", Sharding.parse(shard), source=())
        g.add_value(v)
        if prev is not None:
            g.values[v.name] = Value(v.name, g.values[prev].shape, BF16, "act", Sharding.parse(shard))
            g.nodes.append(Node("scale", (prev,), (v.name,), tuple(sorted({**attrs, "factor": 2.0}.items()))))
        prev = v.name
    from tilert.ir.graph import freeze_attrs

    g.nodes = [Node(n.op, n.inputs, n.outputs, freeze_attrs(dict(n.attrs))) for n in g.nodes]
    s = g.to_json()
    g2 = Graph.from_json(s)
    assert g2.nodes == g.nodes and g2.values == g.values and g2.meta == g.meta
    assert json.loads(g2.to_json()) == json.loads(s)


def test_from_json_rejects_other_formats():
    with pytest.raises(IRError, match="not a tilert graph"):
        Graph.from_dict({"format": "onnx"})
