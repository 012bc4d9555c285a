"""kcompile.energy: Deep k-Means metrics and an Eyeriss-style estimate, per layer and total.

``estimate(model, input_shape=(1, 3, 32, 32), table=None, bits=(8, 8)) -> EnergyReport``
works on any ``nn.Module``: dense ``nn.Conv2d`` / ``nn.Linear`` and clustered layers
(duck-typed through ``clustered_weight()`` and ``conv_params()``) are modelled; every other
leaf module that does work is listed in ``report.not_modelled`` with its MACs.

Per layer (batch included):
- ``fa_compute``, ``weight_rep``, ``activation_rep``, ``dkm`` (their sum in MAC units):
  Deep k-Means metrics (``dkm_metrics``);
- ``eyeriss``: normalised energy (one MAC = 1) from the access counts of ``eyeriss``;
- ``joules_45nm``: the same access counts priced with the 45 nm table (``costs``);
- ``dense``: the same numbers for the dense layer the clustered one replaces.

This package is a leaf: it imports only ``kcompile.ir`` / ``kcompile.errors``, numpy, torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch.nn as nn

from .costs import Accesses, Energy, EnergyTable, default_table, load_table, parse_bits
from .dkm_metrics import DKMCost, adder_width, dkm_cost, fa, fa_mac
from .eyeriss import Dataflow, accesses
from .layers import LayerSpec, NotModelled, describe_model, op_counts, weight_bits

__all__ = [
    "estimate", "estimate_specs", "layer_energy", "EnergyReport", "LayerEnergy", "LayerSpec",
    "NotModelled", "describe_model", "EnergyTable", "Accesses", "Energy", "DKMCost",
    "Dataflow", "load_table", "default_table", "parse_bits", "fa", "fa_mac", "dkm_cost", "accesses",
]


@dataclass(frozen=True)
class LayerEnergy:
    """All estimates of one layer (see the package docstring)."""

    name: str
    kind: str
    form: str
    macs: float
    dense_macs: float
    dkm: DKMCost
    access: Accesses
    eyeriss: Energy
    joules: Energy
    weight_bits: float
    dense: "LayerEnergy | None" = None

    def as_dict(self) -> dict:
        d = {
            "name": self.name, "kind": self.kind, "form": self.form,
            "macs": self.macs, "dense_macs": self.dense_macs,
            "fa_compute": self.dkm.fa_compute, "weight_rep": self.dkm.weight_rep,
            "activation_rep": self.dkm.activation_rep, "dkm_mac_units": self.dkm.mac_units,
            "eyeriss": self.eyeriss.total, "eyeriss_compute": self.eyeriss.compute,
            "eyeriss_data": self.eyeriss.data,
            "joules_45nm": self.joules.total, "joules_45nm_compute": self.joules.compute,
            "joules_45nm_data": self.joules.data,
            "weight_bits": self.weight_bits, "accesses": self.access.as_dict(),
        }
        if self.dense is not None:
            d["dense"] = {k: v for k, v in self.dense.as_dict().items() if k not in ("dense", "name", "accesses")}
        return d


def layer_energy(spec: LayerSpec, table: EnergyTable, bw: int, bx: int,
                 flow: Dataflow = Dataflow(), with_dense: bool = True) -> LayerEnergy:
    """Every estimate of one layer; for a clustered layer also its dense counterpart."""
    acc = accesses(spec, bw, bx, flow)
    ops = op_counts(spec, flow.factorise)
    d_eff = spec.D + (1 if spec.bias else 0)
    dense = None
    if spec.cw is not None and with_dense:
        dense = layer_energy(replace(spec, cw=None, kind=spec.kind.replace("clustered-", "")),
                             table, bw, bx, flow, with_dense=False)
    return LayerEnergy(
        name=spec.name, kind=spec.kind, form=ops.form, macs=float(spec.batch * ops.macs),
        dense_macs=float(spec.dense_macs), dkm=dkm_cost(spec, bw, bx, flow.factorise), access=acc,
        eyeriss=table.normalised(acc), joules=table.joules(acc, bw, bx, adder_width(d_eff, bw, bx)),
        weight_bits=weight_bits(spec, bw), dense=dense if dense is not None else None,
    )


@dataclass(frozen=True)
class EnergyReport:
    """Per-layer estimates, the not-modelled layers, and the settings used."""

    layers: list[LayerEnergy]
    not_modelled: list[NotModelled]
    bits: tuple[int, int]
    table: EnergyTable
    input_shape: tuple[int, ...] | None = None
    flow: Dataflow = field(default_factory=Dataflow)

    def _sum(self, dense: bool) -> dict:
        rows = [(l.dense or l) if dense else l for l in self.layers]
        dkm = sum((l.dkm for l in rows), DKMCost())
        ey = sum((l.eyeriss for l in rows), Energy())
        jo = sum((l.joules for l in rows), Energy())
        return {
            "macs": sum(l.macs for l in rows), "dense_macs": sum(l.dense_macs for l in rows),
            "fa_compute": dkm.fa_compute, "weight_rep": dkm.weight_rep,
            "activation_rep": dkm.activation_rep, "dkm_mac_units": dkm.mac_units,
            "eyeriss": ey.total, "eyeriss_compute": ey.compute, "eyeriss_data": ey.data,
            "joules_45nm": jo.total, "joules_45nm_compute": jo.compute, "joules_45nm_data": jo.data,
            "weight_bits": sum(l.weight_bits for l in rows),
            "not_modelled_macs": sum(n.macs for n in self.not_modelled),
        }

    @property
    def total(self) -> dict:
        return self._sum(dense=False)

    @property
    def dense_total(self) -> dict:
        return self._sum(dense=True)

    def as_dict(self) -> dict:
        return {
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "bits": {"weights": self.bits[0], "activations": self.bits[1]},
            "table": self.table.describe(),
            "dataflow": {"out_tile": self.flow.out_tile, "in_tile": self.flow.in_tile,
                         "factorise": self.flow.factorise},
            "layers": [l.as_dict() for l in self.layers],
            "not_modelled": [{"name": n.name, "kind": n.kind, "macs": n.macs} for n in self.not_modelled],
            "total": self.total,
            "dense_total": self.dense_total,
            "units": {"fa_compute": "1-bit full adders", "weight_rep": "bits x uses",
                      "activation_rep": "bits x uses", "dkm_mac_units": "MACs",
                      "eyeriss": "MACs (normalised)", "joules_45nm": "J"},
        }


def estimate_specs(specs, not_modelled=(), table=None, bits=(8, 8), input_shape=None,
                   flow: Dataflow = Dataflow()) -> EnergyReport:
    """An EnergyReport from LayerSpecs built elsewhere (``describe_model`` or by hand)."""
    bw, bx = parse_bits(bits)
    tab = load_table(table)
    layers = [layer_energy(s, tab, bw, bx, flow) for s in specs]
    return EnergyReport(layers, list(not_modelled), (bw, bx), tab,
                        None if input_shape is None else tuple(input_shape), flow)


def estimate(model: nn.Module, input_shape=(1, 3, 32, 32), table=None, bits=(8, 8),
             flow: Dataflow = Dataflow()) -> EnergyReport:
    """Per-layer energy estimates of ``model`` for one forward pass on ``input_shape``.

    ``table``: None (Eyeriss normalised + Horowitz 45 nm), an EnergyTable, a dict, or a
    JSON/TOML path; ``bits``: (B_w, B_x). Invalid bits or tables raise UsageError.
    The model is not modified.
    """
    bw, bx = parse_bits(bits)
    tab = load_table(table)
    specs, others = describe_model(model, input_shape)
    return estimate_specs(specs, others, tab, (bw, bx), input_shape, flow)
