"""Cost records that add up, and energy tables loaded from data files.

``Accesses`` counts the events of one layer under the dataflow model of ``eyeriss.py``:
MAC-equivalent operations, scalar multiplications and additions, and word accesses at each
memory level (register file, inter-PE array, global buffer, DRAM). Two of them add up
(``a + b``), so a model's total is ``sum(layers, Accesses())``.

``EnergyTable`` holds the per-event energies: a *normalised* section (relative to one MAC,
Eyeriss: MAC 1, RF 1, array 2, buffer 6, DRAM 200) and an *absolute* section in picojoules
(Horowitz 45 nm: 32-bit int/fp multiply and add, 32-bit SRAM and DRAM reads). The tables are
data (``tables/*.json``); a user passes their own JSON or TOML file with either section,
and the keys it gives replace the defaults.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from kcompile.errors import UsageError

TABLES_DIR = Path(__file__).resolve().parent / "tables"
NORMALISED_KEYS = ("mac", "rf", "array", "buffer", "dram")
ABSOLUTE_KEYS = ("mult_fp32", "add_fp32", "mult_int32", "add_int32", "sram_read_32", "dram_read_32")


class Summable:
    """Fieldwise ``+`` for frozen dataclasses of numbers; ``sum(costs)`` works (0 + c is c)."""

    def __add__(self, other):
        if not isinstance(other, type(self)):
            return NotImplemented
        return type(self)(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __radd__(self, other):
        return self if other == 0 else self.__add__(other)


@dataclass(frozen=True)
class Accesses(Summable):
    """Event counts of a layer (floats: batch included). Memory counts are in words.

    macs    MAC-equivalent operations (a factorised layer's products + accumulations)
    mults   scalar multiplications          adds    scalar additions
    rf      register-file accesses          array  inter-PE (array) transfers
    buffer  global-buffer accesses          dram   DRAM accesses
    """

    macs: float = 0.0
    mults: float = 0.0
    adds: float = 0.0
    rf: float = 0.0
    array: float = 0.0
    buffer: float = 0.0
    dram: float = 0.0

    def scaled(self, factor: float) -> "Accesses":
        return Accesses(**{f.name: getattr(self, f.name) * factor for f in fields(self)})

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Energy(Summable):
    """An energy split into compute and data movement (same unit for both)."""

    compute: float = 0.0
    data: float = 0.0

    @property
    def total(self) -> float:
        return self.compute + self.data

    def as_dict(self) -> dict:
        return {"compute": self.compute, "data": self.data, "total": self.total}


@dataclass(frozen=True)
class EnergyTable:
    """Per-event energies. ``normalised``: relative to one MAC; ``absolute_pj``: picojoules."""

    name: str = "eyeriss-normalised + horowitz-45nm"
    mac: float = 1.0
    rf: float = 1.0
    array: float = 2.0
    buffer: float = 6.0
    dram: float = 200.0
    mult_fp32: float = 3.7
    add_fp32: float = 0.9
    mult_int32: float = 3.1
    add_int32: float = 0.1
    sram_read_32: float = 5.0
    dram_read_32: float = 640.0
    source: str = ""

    # ------------------------------------------------------------ normalised (MAC units)
    def normalised(self, a: Accesses) -> Energy:
        """Eyeriss-style energy in units of one MAC."""
        return Energy(compute=a.macs * self.mac,
                      data=a.rf * self.rf + a.array * self.array + a.buffer * self.buffer + a.dram * self.dram)

    # ------------------------------------------------------------ absolute (joules)
    def mult_pj(self, bw: int, bx: int) -> float:
        """Integer multiply of bw x bx bits: the 32-bit figure scaled by (bw*bx)/32^2 (array multiplier)."""
        return self.mult_int32 * bw * bx / 1024.0

    def add_pj(self, bits: int) -> float:
        """Integer add of ``bits`` bits: the 32-bit figure scaled linearly (ripple adder)."""
        return self.add_int32 * bits / 32.0

    def joules(self, a: Accesses, bw: int, bx: int, acc_bits: int) -> Energy:
        """Absolute energy in joules.

        Multiplications and additions at the given widths; buffer and DRAM accesses from the
        32-bit SRAM/DRAM read energies scaled to a max(bw, bx)-bit word; register-file and
        array accesses have no 45 nm figure in the table, so they are charged the Eyeriss
        ratios (rf/mac, array/mac) times the energy of one MAC at these widths.
        """
        word = max(bw, bx) / 32.0
        mac_pj = self.mult_pj(bw, bx) + self.add_pj(acc_bits)
        compute = a.mults * self.mult_pj(bw, bx) + a.adds * self.add_pj(acc_bits)
        data = ((a.rf * self.rf + a.array * self.array) / self.mac * mac_pj
                + a.buffer * self.sram_read_32 * word + a.dram * self.dram_read_32 * word)
        return Energy(compute * 1e-12, data * 1e-12)

    def describe(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _read_table_file(path: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"energy table {path} does not exist")
    try:
        text = path.read_text()
        if path.suffix.lower() == ".toml":
            return tomllib.loads(text)
        return json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"energy table {path} is not valid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'}: {msg}") from None


def _section_values(data: dict, section: str, keys: tuple[str, ...], path) -> dict:
    sec = data.get(section)
    if sec is None:
        return {}
    if not isinstance(sec, dict):
        raise UsageError(f"energy table {path}: [{section}] must be a table of numbers")
    unknown = sorted(set(sec) - set(keys))
    if unknown:
        raise UsageError(f"energy table {path}: unknown key {section}.{unknown[0]} (known: {', '.join(keys)})")
    out = {}
    for k, v in sec.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise UsageError(f"energy table {path}: {section}.{k} must be a finite number >= 0 (got {v!r})")
        out[k] = float(v)
    if section == "normalised" and out.get("mac", 1.0) <= 0:
        raise UsageError(f"energy table {path}: normalised.mac must be > 0 (everything is relative to it)")
    return out


def table_from_dict(data, path="<table>", base: EnergyTable | None = None) -> EnergyTable:
    """An EnergyTable from a parsed table file; keys given replace ``base``'s (default table)."""
    if not isinstance(data, dict):
        raise UsageError(f"energy table {path} must be an object with 'normalised' and/or 'absolute_pj'")
    unknown = sorted(set(data) - {"name", "source", "normalised", "absolute_pj"})
    if unknown:
        raise UsageError(f"energy table {path}: unknown key {unknown[0]!r} (expected name, source, normalised, absolute_pj)")
    norm = _section_values(data, "normalised", NORMALISED_KEYS, path)
    absol = _section_values(data, "absolute_pj", ABSOLUTE_KEYS, path)
    if not norm and not absol:
        raise UsageError(f"energy table {path} gives neither 'normalised' nor 'absolute_pj' energies")
    base = base or default_table()
    kw = {f.name: getattr(base, f.name) for f in fields(base)}
    kw.update(norm)
    kw.update(absol)
    kw["name"] = str(data.get("name", Path(str(path)).stem))
    kw["source"] = str(data.get("source", str(path)))
    return EnergyTable(**kw)


_DEFAULT: EnergyTable | None = None


def default_table() -> EnergyTable:
    """Eyeriss normalised costs + Horowitz 45 nm energies, read from ``tables/``."""
    global _DEFAULT
    if _DEFAULT is None:
        kw = {}
        names, sources = [], []
        for fname, section, keys in (("eyeriss.json", "normalised", NORMALISED_KEYS),
                                     ("horowitz45.json", "absolute_pj", ABSOLUTE_KEYS)):
            data = json.loads((TABLES_DIR / fname).read_text())
            kw.update(_section_values(data, section, keys, TABLES_DIR / fname))
            names.append(data.get("name", fname))
            sources.append(data.get("source", ""))
        _DEFAULT = EnergyTable(name=" + ".join(names), source="; ".join(sources), **kw)
    return _DEFAULT


def load_table(table=None) -> EnergyTable:
    """``None`` -> default; an EnergyTable as is; a dict; or a path to a JSON/TOML file."""
    if table is None:
        return default_table()
    if isinstance(table, EnergyTable):
        return table
    if isinstance(table, dict):
        return table_from_dict(table)
    path = Path(table)
    if not path.is_absolute() and not path.exists() and (TABLES_DIR / path).is_file():
        path = TABLES_DIR / path  # a shipped table by file name
    return table_from_dict(_read_table_file(path), path)


def parse_bits(bits) -> tuple[int, int]:
    """(B_w, B_x) from a pair or a 'W,A' string; each an integer in 1..32, else UsageError."""
    if isinstance(bits, str):
        parts = [p.strip() for p in bits.split(",")]
        if len(parts) != 2:
            raise UsageError(f"invalid bit widths {bits!r}: expected W,A like 8,8")
        try:
            bits = tuple(int(p) for p in parts)
        except ValueError:
            raise UsageError(f"invalid bit widths {bits!r}: expected W,A like 8,8") from None
    try:
        bw, bx = bits
    except (TypeError, ValueError):
        raise UsageError(f"invalid bit widths {bits!r}: expected two integers (weights, activations)") from None
    for name, b in (("weight", bw), ("activation", bx)):
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 32:
            raise UsageError(f"invalid {name} bit width {b!r}: expected an integer in 1..32")
    return int(bw), int(bx)
