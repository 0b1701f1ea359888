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


def test_attrs_are_typed_with_defaults_filled_and_stored_as_set():
    g = small_graph()
    norm = g.nodes[0]
    assert norm.a.eps == 1e-6 and norm.attrs == (("eps", 1e-6),)
    mm = g.nodes[-1]
    assert mm.attrs == () and mm.a.out_dtype == "bf16"  # the default, not stored: the forms stay as set
    assert "matmul(%rms_norm, %dequant)\n" in g.to_text()
    assert Graph.from_json(g.to_json()).to_json() == g.to_json()


@pytest.mark.parametrize(("attrs", "msg"), [
    ({"eps": "small"}, "node 0 \\(rms_norm\\): attribute 'eps' = 'small' is not float"),
    ({"eps": 1e-6, "epsilon": 1e-6}, "node 0 \\(rms_norm\\): unknown attribute 'epsilon' \\(known: eps\\)"),
    ({}, "node 0 \\(rms_norm\\): missing attribute 'eps'"),
    ({"eps": True}, "attribute 'eps' = True is not float"),
])  # fmt: skip
def test_verify_rejects_unknown_missing_and_mistyped_attrs(attrs, msg):
    g = small_graph()
    n = g.nodes[0]
    g.nodes[0] = Node(n.op, n.inputs, n.outputs, tuple(sorted(attrs.items())))
    with pytest.raises(IRError, match=msg):
        g.verify()


def test_attrs_types_follow_the_annotations():
    from tilert.ir.opset.fused import AttentionBlockAttrs, MoeAttrs

    a = MoeAttrs.parse({"top_k": 8, "n_local": 48, "scaling": 2})  # an int is a float
    assert (a.n_group, a.normalize, a.norm_eps, a.scaling) == (1, True, None, 2)
    assert MoeAttrs.parse({"top_k": 8, "n_local": 48, "norm_eps": 1e-6}).norm_eps == 1e-6
    with pytest.raises(IRError, match="'norm_eps' = 'x' is not float | None"):
        MoeAttrs.parse({"top_k": 8, "n_local": 48, "norm_eps": "x"})
    with pytest.raises(IRError, match="'top_k' = 8.0 is not int"):
        MoeAttrs.parse({"top_k": 8.0, "n_local": 48})
    base = dict(heads=4, kv_heads=1, head_dim=64, v_head_dim=64, scale=0.125, rope_dim=32, theta=1e4)
    assert AttentionBlockAttrs.parse(base).window == 0
    with pytest.raises(IRError, match="'causal' = 1 is not bool"):
        AttentionBlockAttrs.parse({**base, "causal": 1})


def test_references_take_exactly_the_attrs_without_defaults():
    """Every kind's defaults are written once, in its attributes class: a reference's keyword
    arguments are the class's fields, with no default of their own."""
    import dataclasses
    import inspect

    for name, opdef in all_ops().items():
        params = inspect.signature(opdef.reference).parameters.values()
        kw = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        assert {p.name for p in kw} == {f.name for f in dataclasses.fields(opdef.attrs)}, name
        assert all(p.default is inspect.Parameter.empty for p in kw), name


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


def test_compiled_rank_graphs_round_trip_exactly():
    """Fused kinds (typed attributes, set by the passes) keep their JSON and text forms."""
    from tilert.passes import PassContext, compile_graph

    g = build_step_graph(load_config("tiny"), tokens=4, mode="verify", max_seq=64)
    for rg in compile_graph(g, PassContext(world=2, max_seq=64)):
        s, text = rg.to_json(), rg.to_text()
        g2 = Graph.from_json(s).verify()
        assert g2.to_json() == s and g2.to_text() == text and g2.nodes == rg.nodes


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
