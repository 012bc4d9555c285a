"""kcompile.graft: entropy and coefficient by hand, the graft rule, 2-rank runs, failure and resume."""

import json
import math
import os

import pytest
import torch

from kcompile.errors import KcompileError, UsageError
from kcompile.graft import (GraftConfig, dlr_lr, graft_coefficient, graft_plan, graft_states,
                            layer_entropy, load_checkpoints, run_graft, train_rank)
from tiny_models import tiny


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_layer_entropy_by_hand():
    # ten values, one per bin: H = ln 10
    assert layer_entropy(torch.arange(10.0)) == pytest.approx(math.log(10), abs=1e-12)
    # [0, 0, 0, 1]: 3/4 in the first bin, 1/4 in the last (closed) bin
    assert layer_entropy(torch.tensor([0.0, 0, 0, 1])) == pytest.approx(
        -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), abs=1e-12)
    # range [0, 10]: bins of width 1; 0.5 -> bin 0, 1.5 and 1.7 -> bin 1, 9.99 and 10 -> bin 9
    w = torch.tensor([0.0, 0.5, 1.5, 1.7, 9.99, 10.0]).reshape(2, 3)
    p = [2 / 6, 2 / 6, 2 / 6]
    assert layer_entropy(w) == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-12)
    assert layer_entropy(torch.full((3, 3), 0.7)) == 0.0


def test_coefficient_by_hand():
    assert graft_coefficient(1.0, 1.0) == 0.5
    # c * dH = 500 * 0.002 = 1 -> 0.4 / pi * pi / 4 + 0.5 = 0.6
    assert graft_coefficient(2.002, 2.0) == pytest.approx(0.6, abs=1e-9)
    assert graft_coefficient(2.0, 2.002) == pytest.approx(0.4, abs=1e-9)
    # large gaps saturate at 0.5 +- a/2
    assert graft_coefficient(3.0, 0.0) == pytest.approx(0.7, abs=1e-3)
    assert graft_coefficient(0.0, 3.0, a=0.2) == pytest.approx(0.4, abs=1e-3)
    assert dlr_lr(0.1, 2, 2) == pytest.approx(0.1) and dlr_lr(0.1, 1, 2) == pytest.approx(0.05)
    assert [round(dlr_lr(1.0, i, 3), 6) for i in (1, 2, 3)] == [0.25, 0.75, 1.0]


def test_plan_and_graft_rule():
    m = tiny(width=4)
    plan = dict(graft_plan(m))
    assert plan["stem.weight"] == "stem.weight"
    assert plan["bn.weight"] == plan["bn.running_mean"] == "stem.weight"  # BN after stem
    assert plan["conv.bias"] == "conv.weight"
    assert plan["fc.weight"] == plan["fc.bias"] == "dw.weight"  # linear takes the last conv's
    assert "bn.num_batches_tracked" not in plan
    own, peer = tiny(seed=1, width=4).state_dict(), tiny(seed=2, width=4).state_dict()
    new, coeff = graft_states(own, peer, graft_plan(m))
    for conv in ("stem.weight", "conv.weight", "pw.weight", "dw.weight"):
        w = graft_coefficient(layer_entropy(own[conv]), layer_entropy(peer[conv]))
        assert coeff[conv] == pytest.approx(w)
        torch.testing.assert_close(new[conv], w * own[conv] + (1 - w) * peer[conv])
    w = coeff["dw.weight"]
    torch.testing.assert_close(new["fc.bias"], w * own["fc.bias"] + (1 - w) * peer["fc.bias"])
    assert torch.equal(new["bn.num_batches_tracked"], own["bn.num_batches_tracked"])
    assert not torch.equal(own["stem.weight"], new["stem.weight"])  # inputs untouched, output new


def _cfg(tmp_path, **kw):
    base = dict(arch="zoo:digits-resnet", out=str(tmp_path / "g"), num=2, epochs=2, subset=128,
                batch_size=64, lr=0.05, timeout=20, verbose=False)
    base.update(kw)
    return GraftConfig(**base)


def test_two_rank_grafting(tmp_path):
    cfg = _cfg(tmp_path, dlr=True, cos=True)
    s = run_graft(cfg)
    nets = s["networks"]
    assert [n["rank"] for n in nets] == [0, 1]
    assert nets[0]["lr"] == pytest.approx(0.025) and nets[1]["lr"] == pytest.approx(0.05)
    h0, h1 = nets[0]["history"], nets[1]["history"]
    assert len(h0) == 2 and "accuracy_after_graft" in h0[0] and "accuracy_after_graft" not in h0[-1]
    # ring of two: the coefficients are mirror images (w and 1 - w)
    assert h0[0]["graft_w_mean"] + h1[0]["graft_w_mean"] == pytest.approx(1.0, abs=1e-9)
    out = tmp_path / "g"
    assert json.loads((out / "graft.json").read_text())["networks"][1]["rank"] == 1
    for r in (0, 1):
        state = torch.load(out / f"net{r}.pth", weights_only=True)
        assert "conv1.weight" in state
        assert max(load_checkpoints(out, r)) == 2
    assert nets[0]["filters"] > 0 and nets[0]["invalid_filters"] >= 0


def _die_in_epoch_2(rank, world, cfg):
    def hook(r, epoch):
        if r == 1 and epoch == 1:
            os._exit(3)
    return train_rank(rank, world, cfg, hook=hook)


def test_dead_rank_fails_fast_then_resume(tmp_path):
    cfg = _cfg(tmp_path, epochs=3, timeout=5)
    with pytest.raises(KcompileError) as e:
        run_graft(cfg, hook_fn=_die_in_epoch_2)
    msg = str(e.value)
    assert "rank 1" in msg and "\n" not in msg, msg
    out = tmp_path / "g"
    assert max(load_checkpoints(out, 0)) in (1, 2) and max(load_checkpoints(out, 1)) == 1
    s = run_graft(GraftConfig(**{**cfg.__dict__, "resume": True}))
    for n in s["networks"]:
        assert [h["epoch"] for h in n["history"]] == [1, 2, 3]
        assert max(load_checkpoints(out, n["rank"])) == 3


def test_bad_config(tmp_path):
    with pytest.raises(UsageError):
        run_graft(_cfg(tmp_path, num=0))
    with pytest.raises(UsageError):
        run_graft(_cfg(tmp_path, arch="zoo:nope"))


@pytest.mark.slow
def test_torchrun_graft(tmp_path):
    """The same run under torchrun (no --num: torchrun's parser would take it for --numa-binding)."""
    import shutil
    import subprocess

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    r = subprocess.run(["torchrun", "--nproc-per-node", "2", "-m", "kcompile.cli", "graft", "--arch",
                        "zoo:digits-resnet", "--data", "digits", "--epochs", "2", "-o", str(tmp_path / "t")],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "t" / "graft.json").read_text())
    assert [n["rank"] for n in s["networks"]] == [0, 1] and "accuracy_after_graft" in s["networks"][0]["history"][0]


@pytest.mark.parametrize("args, code, text", [
    (["--num", "0"], 2, "--num must be >= 1"),
    (["--arch-kwargs", "{nope"], 2, "--arch-kwargs is not valid JSON"),
    (["--data", "/no/such.npz"], 1, "no such file"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, code, text):
    from kcompile.cli import main

    base = {"--arch": "zoo:digits-resnet", "--data": "digits", "--epochs": "1", "-o": str(tmp_path / "o")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    with pytest.raises(SystemExit) as e:
        main(["graft", *[x for kv in base.items() for x in kv]])
    err = capsys.readouterr().err.strip()
    assert e.value.code == code and text in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def _exchange_or_hang(rank, world):
    import time

    from kcompile.graft import exchange_ring

    if rank == 1:
        time.sleep(6)  # alive, but does not take part in the exchange
        return None
    t0 = time.monotonic()
    try:
        exchange_ring(torch.ones(4), rank, world, timeout=2)
    except Exception as e:  # noqa: BLE001
        return ("raised", time.monotonic() - t0, str(e).splitlines()[0][:200])
    return ("returned", time.monotonic() - t0, "")


def test_ring_exchange_times_out_on_a_hanging_peer():
    from kcompile import distributed as kd

    status, seconds, msg = kd.spawn(_exchange_or_hang, 2, timeout=30)[0]
    assert status == "raised" and seconds < 5.5, (status, seconds, msg)


def _exchange_pair(rank, world):
    from kcompile.graft import exchange_ring

    return exchange_ring(torch.full((3,), float(rank)), rank, world, timeout=10)


def test_ring_exchange_three_ranks():
    from kcompile import distributed as kd

    out = kd.spawn(_exchange_pair, 3, timeout=20)
    assert [float(o[0]) for o in out] == [2.0, 0.0, 1.0]  # each rank holds its predecessor's
