"""The numba.cuda kernels under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1, no GPU needed).

The simulator must be switched on before numba.cuda is first imported, so the checks run in
a subprocess; tiny shapes only (the simulator runs every thread in Python)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r"""
    import json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from numba import config
    assert config.ENABLE_CUDASIM
    from kcompile import kernels as K
    from kcompile.kernels import numba_cuda as KC
    from kcompile.kernels.plan import Geometry
    from kcompile.kernels.testing import KINDS, random_weight
    from test_kernels_reference import FORMS_OF, torch_conv
    rng = np.random.default_rng(0)
    results = []
    cases = [(4, 3, 1, (1, 1), (1, 1, 1, 1), (1, 1), 3, 3), (4, 2, 2, (2, 1), (0, 1, 1, 0), (1, 2), 3, 3),
             (3, 3, 1, (1, 2), (0, 0, 1, 2), (2, 1), 2, 3)]
    for kind in KINDS:
        for O, Cg, groups, stride, pad, dil, kh, kw in cases:
            if kind == "kse" and groups > 1:
                continue
            cw = random_weight(kind, (O, Cg, kh, kw), seed=len(results))
            g = Geometry.make(stride, pad, dil, groups)
            x = rng.standard_normal((2, Cg * groups, 5, 6)).astype(np.float32)
            b = rng.standard_normal(O).astype(np.float32)
            ref = torch_conv(x, cw, b, g)
            for form in FORMS_OF[kind]:
                y = K.prepare(cw, b, stride, pad, dil, groups, backend="cuda", form=form)(x)
                err = float(np.abs(y - ref).max() / max(float(ref.max() - ref.min()), 1e-30))
                results.append({"kind": kind, "form": form, "groups": groups, "err": err,
                                "shape_ok": y.shape == ref.shape})
    # a channel with more distinct products than shared memory holds falls back to the dense part
    KC.ZCAP = 2
    cw = random_weight("son", (6, 2, 3, 3), seed=7)
    x = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
    impl = K.prepare(cw, None, 1, (1, 1), backend="cuda", form="conv-then-add")
    ref = torch_conv(x, cw, None, Geometry.make(1, (1, 1)))
    y = impl(x)
    results.append({"kind": "son-overflow", "form": "conv-then-add", "groups": 1,
                    "err": float(np.abs(y - ref).max() / float(ref.max() - ref.min())),
                    "shape_ok": y.shape == ref.shape, "dense_part": impl._impl.dense is not None})
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def sim_results():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, here], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_unit_and_form_runs_under_the_simulator(sim_results):
    kinds = {(r["kind"], r["form"]) for r in sim_results}
    assert ("kse", "conv-then-add") in kinds and ("son", "add-then-conv") in kinds
    assert ("filter", "filter-gather") in kinds and ("row", "conv-then-add") in kinds
    assert all(r["shape_ok"] for r in sim_results)


def test_cuda_kernels_match_torch(sim_results):
    bad = [r for r in sim_results if not r["err"] <= 1e-4]
    assert not bad, bad


def test_shared_memory_overflow_goes_dense(sim_results):
    r = sim_results[-1]
    assert r["kind"] == "son-overflow" and r["dense_part"] and r["err"] <= 1e-4
