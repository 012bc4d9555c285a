"""Fuse the residual add, ReLU and max-pool that follow a conv kernel into the kernel's ``out`` stage.

``compile_model`` imports a model into Relax with every conv as a ``call_tir`` of a
scheduled kcompile kernel (batch-norms already folded into it). The ops after a conv --
ResNet's ``relu(conv)`` and ``relu(conv + shortcut)`` -- would each be one more elementwise
pass over the conv's output, and one more function call. This rewrite replaces the chain

    y = call_tir(kc_conv, (x, *tables))
    [s = add(y, r) | add(r, y)]          (r of the output's shape; y used only here)
    [o = relu(s or y)]                   (s / y used only here)
    [m = max_pool2d(o or s or y)]        (NCHW, square, dilation 1, floor mode, padding < kernel)

by one ``call_tir(kc_conv_<tag>, (x, [r], *tables))`` whose kernel applies the residual add,
the ReLU and the max-pool where it writes its output (``tvm_compute.Epilogue``); the kernel is
the same compute and schedule with a longer ``out`` expression (pooled: of the pooled shape,
so the conv's full-size output is never written; resnet18's stem + 3x3/2 max-pool). Chains
whose intermediate value is used elsewhere are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class _Chain:
    call: object       # the kernel's call_tir
    dead: tuple        # Vars of the chain before its last (the conv's, the add's): removed
    last: object       # Var of the last fused op (the add, relu or max-pool): rebound to the fused call
    residual: object   # the residual operand (a Relax expr) or None
    relu: bool
    pool: tuple | None = None  # (kernel, stride, padding) of a fused max-pool


def _uses(func) -> dict:
    """{Var: number of references} over the bindings and the body of ``func``."""
    from tvm import relax

    counts: dict = {}

    def visit(expr):
        for v in relax.analysis.free_vars(expr):
            counts[v] = counts.get(v, 0) + 1

    for block in func.body.blocks:
        for b in block.bindings:
            visit(b.value)
    visit(func.body.body)
    return counts


def _called(func) -> set:
    """Names of the functions ``func``'s call_tir bindings call."""
    return {b.value.args[0].name_hint for block in func.body.blocks for b in block.bindings
            if _op_name(b.value) == "relax.call_tir"}


def _op_name(value) -> str | None:
    from tvm import relax

    if isinstance(value, relax.Call) and hasattr(value.op, "name"):
        return value.op.name
    return None


def _static_shape(e):
    """(shape tuple of ints, dtype) of a tensor expression, or None when not static."""
    t = e.ty
    shape = getattr(t, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    try:
        return tuple(int(v) for v in shape.values), str(t.dtype)
    except (TypeError, ValueError):
        return None


def _same_shape(a, b) -> bool:
    sa = _static_shape(a)
    return sa is not None and sa == _static_shape(b)


def _chains(func, kernel_names) -> list[_Chain]:
    """The fusable chains of ``func`` (module doc)."""
    from tvm import relax

    uses = _uses(func)
    value_of, user_of, order = {}, {}, {}
    for block in func.body.blocks:
        for b in block.bindings:
            value_of[b.var] = b.value
            order[b.var] = len(order)
            for v in relax.analysis.free_vars(b.value):
                user_of.setdefault(v, []).append(b.var)
    chains = []
    for var, value in value_of.items():
        if _op_name(value) != "relax.call_tir" or value.args[0].name_hint not in kernel_names:
            continue
        chain, residual, relu = [var], None, False
        nxt = user_of.get(var, [])
        if uses.get(var, 0) == 1 and len(nxt) == 1 and _op_name(value_of[nxt[0]]) == "relax.add":
            lhs, rhs = value_of[nxt[0]].args
            other = rhs if lhs.same_as(var) else lhs
            # conv + conv (ResNet's main path + a downsample conv): the later call takes the
            # add, the earlier one's output is its residual
            later = other in order and order[other] > order[var]
            if not other.same_as(var) and _same_shape(other, var) and not later:
                residual = other
                chain.append(nxt[0])
                nxt = user_of.get(nxt[0], [])
        if uses.get(chain[-1], 0) == 1 and len(nxt) == 1 and _op_name(value_of[nxt[0]]) == "relax.nn.relu":
            relu = True
            chain.append(nxt[0])
            nxt = user_of.get(nxt[0], [])
        pool = None
        if uses.get(chain[-1], 0) == 1 and len(nxt) == 1 and _op_name(value_of[nxt[0]]) == "relax.nn.max_pool2d":
            pool = _fusable_pool(value_of[nxt[0]].attrs)
            if pool is not None:
                chain.append(nxt[0])
        if len(chain) > 1:
            chains.append(_Chain(value, tuple(chain[:-1]), chain[-1], residual, relu, pool))
    return chains


def _fusable_pool(attrs) -> tuple[int, int, int] | None:
    """(kernel, stride, padding) of a max_pool2d the ``out`` stage can apply (NCHW, square
    window and stride, equal padding below kernel, dilation 1, floor mode), else None."""
    k, s, p, d = (tuple(int(v) for v in getattr(attrs, a)) for a in ("pool_size", "strides", "padding", "dilation"))
    if attrs.ceil_mode or str(attrs.layout) != "NCHW" or str(attrs.out_layout) != "NCHW":
        return None
    if len(set(k)) != 1 or len(set(s)) != 1 or len(set(p)) != 1 or set(d) != {1} or not p[0] < k[0]:
        return None
    return k[0], s[0], p[0]


def fuse_conv_epilogues(mod, kernels: dict, target_kind: str, threads: int):
    """``mod`` with the chains of its ``main`` fused (module doc).

    ``kernels``: {kernel function name: (ConvSpec, ConvArrays, registry entry, tiles)} as
    filled in by the importer; a fused kernel keeps its layer's tiles, and the entry's
    ``info`` gets the fused function's name and the ``epilogue`` tag."""
    from tvm import relax

    from .kernels.tvm_compute import epilogue_out_shape, with_epilogue
    from .kernels.tvm_schedule import layer_module

    func = mod["main"]
    chains = _chains(func, set(kernels))
    if not chains:
        return mod
    bb = relax.BlockBuilder(mod)
    replace, drop = [], []
    for ch in chains:
        call = ch.call
        gv = call.args[0]
        spec, arrays, entry, tiles = kernels[gv.name_hint]
        arrays = with_epilogue(arrays, residual=ch.residual is not None, relu=ch.relu, pool=ch.pool)
        ep = arrays.meta["epilogue"]
        tag = ep.tag
        name = f"{gv.name_hint}_{tag}"
        lm = layer_module(spec, arrays, target_kind, threads, name=name, tiles=tiles)
        new_gv = bb.add_func(lm.mod[name].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8), name)
        x, *tables = call.args[1].fields
        args = [x, *([ch.residual] if ch.residual is not None else []), *tables]
        out_ty = call.ty_args[0] if ep.pool is None else relax.TensorType(epilogue_out_shape(spec, ep), "float32")
        replace.append((ch.last, relax.call_tir(new_gv, args, out_ty)))
        drop.extend(ch.dead)
        entry.info["function"] = name
        entry.info["epilogue"] = tag
        entry.info["output_shape"] = epilogue_out_shape(spec, ep)
    blocks = []
    for block in func.body.blocks:
        bindings = []
        for b in block.bindings:
            if any(b.var.same_as(v) for v in drop):
                continue
            hit = next((e for v, e in replace if b.var.same_as(v)), None)
            bindings.append(relax.VarBinding(b.var, hit) if hit is not None else b)
        blocks.append(type(block)(bindings))
    new = relax.Function(func.params, relax.SeqExpr(blocks, func.body.body), func.ret_ty,
                         func.is_pure, func.attrs)
    mod = bb.get()
    mod["main"] = new
    mod = relax.transform.DeadCodeElimination(["main"])(mod)
    # the unfused kernels are public PrimFuncs (global_symbol), which DCE keeps: drop them
    unused = {ch.call.args[0].name_hint for ch in chains} - _called(mod["main"])
    return mod.__class__({gv: f for gv, f in mod.functions_items() if gv.name_hint not in unused},
                         attrs=mod.attrs, global_infos=mod.global_infos)
