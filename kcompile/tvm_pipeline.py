"""The Relax pipeline ``compile_model`` builds llvm modules with.

``tvm.compile``'s default pipeline on CPU only legalises and lowers: every operator that is
not one of kcompile's conv kernels becomes its own PrimFunc, unscheduled (one thread,
scalar loops), and constant sub-expressions (the classifier's transposed weight) are
recomputed on every call. This pipeline instead:

0. :func:`kcompile.relax_rewrites.relu_after_max_pool_pass` (ReLU moved after max-pooling,
   where it fuses into the pool);
1. ``LegalizeOps`` (TVM's operators -> PrimFuncs), ``AnnotateTIROpPattern``;
2. ``FoldConstant`` + ``DeadCodeElimination`` (weight transposes done once at compile time;
   the unused max-pool index tensor dropped);
3. ``FuseOps`` + ``FuseTIR``: chains of elementwise ops become one PrimFunc (the conv
   kernels are opaque calls and are not fused into here; the batch-norm, residual add and
   ReLU right after a conv are already in its kernel, see :mod:`kcompile.epilogue_fusion`);
4. :func:`kcompile.kernels.tvm_model_schedule.schedule_module_pass`: parallel + vectorised
   schedules for those PrimFuncs (the conv kernels keep their own);
5. TVM's CPU dataflow-lowering and finalisation passes (as in ``tvm.compile``).
"""

from __future__ import annotations


def llvm_pipeline(target):
    """A Relax ``module_pass`` compiling a kcompile model module for the llvm ``target``."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    from .kernels.tvm_model_schedule import schedule_module_pass
    from .relax_rewrites import relu_after_max_pool_pass

    @tvm.transform.module_pass(opt_level=0, name="KcompileLlvmPipeline")
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential([
                *cpu_generic.library_dispatch_passes(target),
                relu_after_max_pool_pass(),
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(),
                relax.transform.CanonicalizeBindings(),
                relax.transform.DeadCodeElimination(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
                schedule_module_pass(),
                *cpu_generic.dataflow_lower_passes(target),
                *cpu_generic.finalize_passes(target),
            ])
            return seq(mod)

    return _pipeline
