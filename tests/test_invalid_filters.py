"""kcompile.invalid_filters: per-layer and total counts of filters with small L1 norm."""

import pytest
import torch

import kcompile
from kcompile.errors import UsageError
from kcompile.invalid_filters import filter_l1, invalid_filters
from tiny_models import tiny


def test_counts_by_hand():
    m = tiny(width=4)
    with torch.no_grad():
        m.stem.weight.fill_(0.01)               # 27 weights per filter: L1 0.27 -> valid at 0.1
        m.stem.weight[1].fill_(0.001)           # L1 0.027 -> invalid
        m.stem.weight[2].zero_()                # invalid
        m.conv.weight.fill_(1.0)
        m.pw.weight.fill_(1.0)
        m.pw.weight[:3] = 0.05                  # 4 weights: L1 0.2 -> invalid at 0.3, valid at 0.1
        m.dw.weight.fill_(1.0)
    r = invalid_filters(m, 0.1)
    assert r["layers"]["stem"] == {"filters": 4, "invalid": 2, "min_l1": 0.0}
    assert r["layers"]["pw"]["invalid"] == 0 and r["layers"]["conv"]["invalid"] == 0
    assert r["invalid"] == 2 and r["filters"] == 4 + 4 + 8 + 8
    r3 = invalid_filters(m, 0.3)
    assert r3["layers"]["stem"]["invalid"] == 4 and r3["layers"]["pw"]["invalid"] == 3 and r3["invalid"] == 7
    torch.testing.assert_close(filter_l1(m.pw.weight)[:3], torch.full((3,), 0.2))


def test_clustered_model_and_bad_threshold():
    m = tiny()
    cm = kcompile.cluster(m, "dkm", rate=0.25, iters=3)
    r = invalid_filters(cm)
    assert set(r["layers"]) == {"stem", "conv", "pw", "dw"} and r["filters"] == 8 + 8 + 16 + 16
    with pytest.raises(UsageError):
        invalid_filters(m, 0)
