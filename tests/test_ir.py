"""The clustered-weight IR: decoding of every unit, storage accounting, op counts."""

import math

import pytest
import torch

from kcompile.ir import ClusteredWeight, bits_for, lead_dims, narrowest_uint


def test_lead_dims_and_dtypes():
    assert [lead_dims(u, 4) for u in ("filter", "kernel", "row", "scalar")] == [1, 2, 3, 4]
    assert lead_dims("scalar", 2) == 2
    assert narrowest_uint(255) == torch.uint8 and narrowest_uint(256) == torch.uint16
    assert narrowest_uint(70000) == torch.uint32
    assert [bits_for(n) for n in (0, 1, 2, 3, 256, 257)] == [0, 0, 1, 2, 8, 9]


@pytest.mark.parametrize("unit,lead", [("filter", (4,)), ("kernel", (4, 3)), ("row", (4, 3, 2)), ("scalar", (4, 3, 2, 5))])
def test_decode_is_gather_of_codebook(unit, lead):
    g = torch.Generator().manual_seed(0)
    shape = (4, 3, 2, 5)
    D = math.prod(shape[len(lead):])
    book = torch.randn(6, D, generator=g)
    idx = torch.randint(0, 6, lead, generator=g)
    cw = ClusteredWeight(unit, shape, book, idx.to(torch.uint8))
    expect = book[idx.reshape(-1)].reshape(shape)
    assert torch.equal(cw.decode(), expect)


def test_decode_transform_scale_offset_pruned():
    book = torch.arange(4 * 9, dtype=torch.float32).reshape(4, 9)
    perms = torch.stack([torch.arange(9), torch.arange(9).reshape(3, 3).flip(1).reshape(-1)])
    idx = torch.tensor([[0, 1], [1, 0]], dtype=torch.uint8)
    tr = torch.tensor([[0, 1], [1, 0]], dtype=torch.uint8)
    scale = torch.tensor([[2.0, -1.0], [0.5, 0.0]], dtype=torch.float16)
    offset = torch.tensor([0, 2])
    cw = ClusteredWeight("kernel", (2, 2, 3, 3), book, idx, scale=scale, transform=tr, transform_perms=perms,
                         offset=offset, pruned=torch.tensor([False, True]))
    w = cw.decode()
    assert torch.equal(w[0, 0], book[0].reshape(3, 3) * 2)
    assert torch.equal(w[1, 0], book[1].reshape(3, 3).flip(1) * 0.5)
    assert torch.count_nonzero(w[:, 1]) == 0  # pruned channel
    cw2 = ClusteredWeight("kernel", (2, 2, 3, 3), book, idx, offset=offset)
    assert torch.equal(cw2.decode()[0, 1], book[3].reshape(3, 3))  # local index 1 of book at offset 2
    assert cw2.book_sizes().tolist() == [2, 2]


def test_decode_is_differentiable_in_codebook_and_scale():
    book = torch.randn(3, 9, requires_grad=True)
    scale = torch.ones(2, 2, requires_grad=True)
    cw = ClusteredWeight("kernel", (2, 2, 3, 3), book, torch.tensor([[0, 0], [0, 2]], dtype=torch.uint8), scale=scale)
    cw.decode().sum().backward()
    assert book.grad[0].tolist() == [3.0] * 9  # three members
    assert book.grad[1].abs().sum() == 0 and book.grad[2].tolist() == [1.0] * 9


def test_zero_centroid_gets_no_gradient():
    book = torch.randn(3, 3, requires_grad=True)
    cw = ClusteredWeight("row", (2, 1, 2, 3), book, torch.tensor([[[0, 1]], [[2, 0]]], dtype=torch.uint8), zero_centroid=True)
    w = cw.decode()
    assert torch.count_nonzero(w[0, 0, 0]) == 0
    w.sum().backward()
    assert book.grad[0].abs().sum() == 0


def test_shape_validation():
    with pytest.raises(ValueError):
        ClusteredWeight("kernel", (2, 2, 3, 3), torch.zeros(4, 8), torch.zeros(2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError):
        ClusteredWeight("kernel", (2, 2, 3, 3), torch.zeros(4, 9), torch.zeros(2, 3, dtype=torch.uint8))


def test_storage_bits_and_entropy():
    idx = torch.tensor([[0, 1], [2, 3]], dtype=torch.uint8)
    cw = ClusteredWeight("kernel", (2, 2, 3, 3), torch.zeros(4, 9), idx, scale=torch.ones(2, 2, dtype=torch.float16))
    bits = cw.storage_bits()
    assert bits == {"codebook": 4 * 9 * 32, "index": 4 * 2, "scale": 4 * 16, "total": 4 * 9 * 32 + 8 + 64}
    assert cw.entropy_index_bits() == pytest.approx(2.0)
    # per-channel books: channel 0 has 1 centroid (0 bits), channel 1 has 3 (2 bits)
    kse = ClusteredWeight("kernel", (2, 2, 3, 3), torch.zeros(4, 9), torch.zeros(2, 2, dtype=torch.uint8), offset=torch.tensor([0, 1]))
    assert kse.storage_bits()["index"] == 2 * 0 + 2 * 2
    assert kse.index_bits() == 2


def test_conv_macs_by_hand():
    # O=2, C=2, 3x3. idx[:,0] = {0,0} (1 distinct), idx[:,1] = {1,2} (2 distinct)
    idx = torch.tensor([[0, 1], [0, 2]], dtype=torch.uint8)
    cw = ClusteredWeight("kernel", (2, 2, 3, 3), torch.zeros(3, 9), idx)
    m = cw.conv_macs((4, 4))
    assert m["dense"] == 2 * 2 * 9 * 16
    # conv-then-add: 3 distinct * 9 * 16 + O*C*HW = 432 + 64; add-then-conv: (2 + 2) * 9 * 16 + 64
    assert m["shared"] == 3 * 9 * 16 + 2 * 2 * 16 and m["form"] == "conv-then-add"
    # filter unit: 1 distinct filter computed once
    f = ClusteredWeight("filter", (4, 2, 3, 3), torch.zeros(2, 18), torch.tensor([1, 1, 1, 1], dtype=torch.uint8))
    assert f.conv_macs((4, 4))["shared"] == 1 * 18 * 16


def test_grouped_conv_does_not_share_across_groups():
    # depthwise: O=4 groups of one; all kernels use centroid 0, but no two outputs read the same channel
    cw = ClusteredWeight("kernel", (4, 1, 3, 3), torch.zeros(1, 9), torch.zeros(4, 1, dtype=torch.uint8))
    assert cw.distinct_per_group((1,), groups=4) == 4
    assert cw.distinct_per_group((1,), groups=1) == 1
