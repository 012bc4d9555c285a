"""Relax graph rewrites kcompile applies before legalisation (llvm pipeline).

``max_pool2d(relu(x)) -> relu(max_pool2d(x))``: ReLU is monotone and every pooling window
holds at least one element of x (the pad value is -inf), so both are equal; afterwards the
ReLU runs on the 4x smaller pooled tensor and FuseOps fuses it into the pool as an
epilogue, instead of being a full elementwise pass over the stem's (N, 64, 112, 112)
output on its own (FuseOps does not fuse an elementwise producer into a pool). A ReLU right
after a kcompile conv kernel never reaches this rewrite: it is fused into the kernel first
(:mod:`kcompile.epilogue_fusion`); this covers ReLUs after other producers.
"""

from __future__ import annotations


def relu_after_max_pool(func):
    """``func`` (a Relax function) with every ``max_pool2d(relu(x))`` rewritten as
    ``relu(max_pool2d(x))`` (same attributes)."""
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    x = wildcard()
    relu = is_op("relax.nn.relu")(x)
    pool = is_op("relax.nn.max_pool2d")(relu)

    def rewrite(expr, matches):
        call = matches[pool]
        return relax.op.nn.relu(relax.Call(call.op, [matches[x]], call.attrs))

    return rewrite_call(pool, rewrite, func)


def relu_after_max_pool_pass():
    """A module pass applying :func:`relu_after_max_pool` to every Relax function."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="KcompileReluAfterMaxPool")
    def _pass(mod, _ctx):
        updates = {gv: relu_after_max_pool(f) for gv, f in mod.functions_items() if isinstance(f, relax.Function)}
        for gv, f in updates.items():
            mod[gv] = f
        return mod

    return _pass
