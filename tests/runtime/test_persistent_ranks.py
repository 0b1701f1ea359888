"""Ranks of the persistent step on one GPU or one GPU each (CPU checks; the GPU runs are in
test_persistent_step_gpu.py): SM shares per rank and where each rank's peer buffers live."""

from __future__ import annotations

import pytest
import torch

from tilert.engine.persistent import compile_ranks
from tilert.models.builder import build_step_graph
from tilert.models.config import load_config
from tilert.runtime.persistent.step import PeerGroup, PersistentError


def test_compile_ranks_gives_each_rank_its_share_of_the_sms():
    g = build_step_graph(load_config("tiny-gpu"), tokens=1, mode="decode", max_seq=256)
    _, one_gpu = compile_ranks(g, 256, 2)
    _, two_gpus = compile_ranks(g, 256, 2, gpus=2)
    assert [s.table.shape[0] for s in one_gpu] == [66, 66]
    assert [s.table.shape[0] for s in two_gpus] == [132, 132]
    with pytest.raises(ValueError, match="do not split evenly"):
        compile_ranks(g, 256, 2, gpus=3)


def test_peer_buffers_live_on_each_ranks_device():
    grp = PeerGroup(2, "cpu", devices=["cpu", "meta"])
    a, b = grp.buffers(("inbox", 3), (2, 4), torch.float32)
    assert a.device.type == "cpu" and b.device.type == "meta" and a.shape == b.shape == (2, 4)
    assert grp.buffers(("inbox", 3), (2, 4), torch.float32)[0] is a  # the first request allocates
    assert all(t.device.type == "cpu" for t in PeerGroup(3, "cpu").buffers(("x",), (1,), torch.int32))
    with pytest.raises(PersistentError, match="3 devices for 2 ranks"):
        PeerGroup(2, "cpu", devices=["cpu"] * 3)
