"""The QuantPlan: one ordered row per quantizable layer, the only thing callbacks hand to each other.

A plan is plain data. ``LayerSpec`` is measured once from the model (parameters, MACs, activation sizes) and
never changes; ``LayerPlan`` holds what a policy decided (bit widths) and what a probe measured (sensitivities).
Plans round-trip through YAML, so an allocation can be saved, reviewed, edited by hand and re-applied with the
``FromFile`` policy.

Bit widths are integers; ``None`` means "not quantized" (the layer runs in FP32).

Example:
    >>> spec = LayerSpec(name="fc", kind="linear", params=20, macs=20, act_in=4, act_out=5, weight_shape=(5, 4))
    >>> plan = QuantPlan([spec])
    >>> plan["fc"].w_bits = 4
    >>> QuantPlan.from_dict(plan.to_dict())["fc"].w_bits
    4
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The bit-width vocabulary lives in lit_mpq.bits; the names stay importable from here, where they began.
from lit_mpq.bits import FLOAT_BITS as FLOAT_BITS
from lit_mpq.bits import SUPPORTED_BITS as SUPPORTED_BITS
from lit_mpq.bits import effective_bits, validate_bits

PLAN_FORMAT_VERSION = 1


@dataclass(frozen=True)
class LayerSpec:
    """What a quantizable layer is; measured once from the model with a dummy input.

    Attributes:
        name: Fully qualified module name, the key everywhere.
        kind: ``"conv2d"``, ``"linear"``, ``"matmul"`` (a product of two activations: an attention's q·kᵀ or
            softmax·V), ``"add"`` (a sum of two activations: a residual add) or ``"output"`` (the network's output,
            one activation and no ``w_bits``); see :data:`OPERATION_KINDS`.
        params: Number of weights (bias excluded: biases stay in 32 bits); 0 for a matmul, which stores none.
        macs: Multiply-accumulates per image.
        act_in: Input activation elements per image (a matmul's left operand: q, or the softmax output).
        act_out: Output activation elements per image.
        weight_shape: Shape of the weight tensor (empty for a matmul).
        act_other: Elements per image of a matmul's right-hand operand (k or v), 0 for a weight layer. A matmul row's
            ``w_bits`` is that operand's bit width: it plays the part a weight plays in a Linear (the stationary
            operand of the product), but it is an activation, read per image and never stored.
        nonzero_params: Weights that are not zero after pruning (:mod:`lit_mpq.pruning`), or ``None`` when nobody
            counted them (a dense layer, as in every plan written before pruning existed). Written to YAML only when
            set, so plans without pruning read and write as before.
    """

    name: str
    kind: str
    params: int
    macs: int
    act_in: int
    act_out: int
    weight_shape: tuple[int, ...] = ()
    act_other: int = 0
    nonzero_params: int | None = None

    @property
    def additions(self) -> int:
        """Integer additions per image outside the MACs: one per output element of an add, 0 for every other kind."""
        return self.act_out if self.kind == "add" else 0

    @property
    def density(self) -> float:
        """Fraction of the weights that are not zero (1.0 when :attr:`nonzero_params` is unknown or there are none)."""
        if self.nonzero_params is None or self.params == 0:
            return 1.0
        return self.nonzero_params / self.params

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for YAML/JSON (``nonzero_params`` only when set)."""
        data = asdict(self)
        data["weight_shape"] = list(self.weight_shape)
        if self.nonzero_params is None:
            del data["nonzero_params"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(
            name=str(data["name"]),
            kind=str(data["kind"]),
            params=int(data["params"]),
            macs=int(data["macs"]),
            act_in=int(data["act_in"]),
            act_out=int(data["act_out"]),
            weight_shape=tuple(int(d) for d in data.get("weight_shape", ())),
            act_other=int(data.get("act_other", 0)),
            nonzero_params=None if data.get("nonzero_params") is None else int(data["nonzero_params"]),
        )


OPERATION_KINDS = ("matmul", "add", "output")
"""Row kinds whose operands are all activations (no weights): ``w_bits`` is the right operand's width (none for
``"output"``), read per image like ``a_bits``'s."""


def uniform_setting(spec: LayerSpec, w_bits: int | None, a_bits: int | None) -> tuple[int | None, int | None]:
    """The ``(w_bits, a_bits)`` a uniform ``W<w_bits>A<a_bits>`` setting gives the row ``spec``.

    A uniform setting quantizes weights at ``w_bits`` and every activation at ``a_bits``; both operands of a matmul
    or an add are activations, so such a row gets ``(a_bits, a_bits)`` (its ``w_bits`` is its right-hand operand), and
    the output row ``(None, a_bits)``.

    Example:
        >>> uniform_setting(LayerSpec("attn.matmul_qk", "matmul", 0, 8, 4, 4, act_other=4), 4, 8)
        (8, 8)
    """
    if spec.kind == "output":
        return None, a_bits
    return (a_bits, a_bits) if spec.kind in OPERATION_KINDS else (w_bits, a_bits)


@dataclass
class LayerPlan:
    """What a policy decided for one layer, and what a probe measured for it.

    Attributes:
        w_bits: Weight bit width, or ``None`` for FP32 weights.
        a_bits: Input-activation bit width, or ``None`` for FP32 inputs.
        pinned: True when the bit widths were fixed by configuration (first/last layer, overrides), so that
            allocation policies leave them alone.
        sensitivity: ``{"w": {bits: score}, "a": {bits: score}}`` from a :class:`SensitivityProbe`.
    """

    w_bits: int | None = 8
    a_bits: int | None = 8
    pinned: bool = False
    sensitivity: dict[str, dict[int, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for YAML/JSON (sensitivity keys become ints, values plain floats)."""
        return {
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "pinned": self.pinned,
            "sensitivity": {
                kind: {int(b): float(s) for b, s in sorted(scores.items())} for kind, scores in self.sensitivity.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerPlan:
        """Inverse of :meth:`to_dict`; validates the bit widths."""
        sens = data.get("sensitivity") or {}
        return cls(
            w_bits=validate_bits(data.get("w_bits"), "w_bits"),
            a_bits=validate_bits(data.get("a_bits"), "a_bits"),
            pinned=bool(data.get("pinned", False)),
            sensitivity={str(k): {int(b): float(s) for b, s in v.items()} for k, v in sens.items()},
        )


class QuantPlan:
    """Ordered table ``name -> (LayerSpec, LayerPlan)`` for every quantizable layer of a model.

    Args:
        specs: The measured layers, in model order.
        layers: Optional decisions per layer name; missing ones get a default :class:`LayerPlan`.
    """

    def __init__(
        self,
        specs: list[LayerSpec],
        layers: Mapping[str, LayerPlan] | None = None,
        entry_layers: list[str] | None = None,
        exit_layers: list[str] | None = None,
        float_layers: Mapping[str, str] | None = None,
    ) -> None:
        self.specs: dict[str, LayerSpec] = {spec.name: spec for spec in specs}
        if len(self.specs) != len(specs):
            raise ValueError("QuantPlan: layer names must be unique")
        layers = dict(layers or {})
        unknown = set(layers) - set(self.specs)
        if unknown:
            raise ValueError(f"QuantPlan: decisions given for unknown layers {sorted(unknown)}")
        self.layers: dict[str, LayerPlan] = {name: layers.get(name, LayerPlan()) for name in self.specs}
        for name, spec in self.specs.items():
            if spec.kind == "output":  # one activation, no right-hand operand: no w_bits to decide
                self.layers[name].w_bits = None
        names = list(self.specs)
        self.entry_layers: list[str] = list(entry_layers) if entry_layers is not None else names[:1]
        """Layers that see the network input first (what ``first_last_bits`` pins as "first")."""
        self.exit_layers: list[str] = list(exit_layers) if exit_layers is not None else names[-1:]
        """The classifier head(s) producing the outputs (what ``first_last_bits`` pins as "last")."""
        self.float_layers: dict[str, str] = dict(float_layers or {})
        """Conv/Linear-like layers left in floating point, with the reason (reported in the plan and the card)."""
        for what, listed in (("entry_layers", self.entry_layers), ("exit_layers", self.exit_layers)):
            unknown_listed = [name for name in listed if name not in self.specs]
            if unknown_listed:
                raise ValueError(f"QuantPlan: {what} names unknown layers {unknown_listed[:5]}")
        both = [name for name in self.float_layers if name in self.specs]
        if both:
            raise ValueError(f"QuantPlan: layers listed both as quantized and as left in float: {both[:5]}")

    # ----------------------------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.specs)

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __contains__(self, name: object) -> bool:
        return name in self.specs

    def __getitem__(self, name: str) -> LayerPlan:
        return self.layers[name]

    @property
    def names(self) -> list[str]:
        """Layer names in model order."""
        return list(self.specs)

    def items(self) -> Iterator[tuple[LayerSpec, LayerPlan]]:
        """Yield ``(spec, decision)`` pairs in model order."""
        for name, spec in self.specs.items():
            yield spec, self.layers[name]

    def match(self, pattern: str) -> list[str]:
        """Names selected by ``pattern``: an exact name, or ``"re:<regex>"`` matched with ``re.fullmatch``.

        Raises:
            ValueError: If the regex is invalid.
        """
        if pattern.startswith("re:"):
            try:
                regex = re.compile(pattern[3:])
            except re.error as err:
                raise ValueError(f"invalid layer regex {pattern!r}: {err}") from err
            return [name for name in self.specs if regex.fullmatch(name)]
        return [pattern] if pattern in self.specs else []

    # --------------------------------------------------------------------------------------------- decisions
    def bits(self) -> dict[str, tuple[int | None, int | None]]:
        """The current allocation as ``{name: (w_bits, a_bits)}``."""
        return {name: (lp.w_bits, lp.a_bits) for name, lp in self.layers.items()}

    def set_bits(self, bits: Mapping[str, tuple[int | None, int | None]]) -> None:
        """Apply an allocation ``{name: (w_bits, a_bits)}``; unknown names or unsupported widths raise."""
        unknown = set(bits) - set(self.specs)
        if unknown:
            raise ValueError(f"allocation names layers that the model does not have: {sorted(unknown)}")
        for name, (w_bits, a_bits) in bits.items():
            w_bits = None if self.specs[name].kind == "output" else w_bits  # the output row has no w_bits
            self.layers[name].w_bits = validate_bits(w_bits, f"{name}.w_bits")
            self.layers[name].a_bits = validate_bits(a_bits, f"{name}.a_bits")

    # ------------------------------------------------------------------------------------------- summaries
    def average_weight_bits(self) -> float:
        """Parameter-weighted average weight bit width (FP32 layers count as 32)."""
        total = sum(spec.params for spec in self.specs.values())
        return sum(spec.params * effective_bits(lp.w_bits) for spec, lp in self.items()) / max(total, 1)

    def average_act_bits(self) -> float:
        """Element-weighted average activation bit width (FP32 inputs count as 32).

        Every activation operand counts: layer inputs at ``a_bits`` and a matmul's right-hand operand at its
        ``w_bits``.
        """
        total = sum(spec.act_in + spec.act_other for spec in self.specs.values())
        bits = sum(
            spec.act_in * effective_bits(lp.a_bits) + spec.act_other * effective_bits(lp.w_bits)
            for spec, lp in self.items()
        )
        return bits / max(total, 1)

    def weight_size_mb(self) -> float:
        """Size of the quantized layers' weights in megabytes (10^6 bytes), at their allocated bit widths."""
        return sum(spec.params * effective_bits(lp.w_bits) for spec, lp in self.items()) / 8 / 1e6

    def bit_ops(self) -> float:
        """Bit operations per image: sum over layers of MACs x w_bits x a_bits (the HAWQ-V3 definition)."""
        return float(
            sum(spec.macs * effective_bits(lp.w_bits) * effective_bits(lp.a_bits) for spec, lp in self.items())
        )

    # -------------------------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        """Plain-data form: ``{"version": 1, "layers": [{"spec": ..., "plan": ...}, ...]}``."""
        return {
            "version": PLAN_FORMAT_VERSION,
            "entry_layers": list(self.entry_layers),
            "exit_layers": list(self.exit_layers),
            "float_layers": dict(self.float_layers),
            "layers": [{"name": spec.name, "spec": spec.to_dict(), **lp.to_dict()} for spec, lp in self.items()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantPlan:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: If the data is not a plan written by :meth:`to_dict`.
        """
        if not isinstance(data, Mapping) or "layers" not in data:
            raise ValueError("not a lit_mpq plan: expected a mapping with a 'layers' list (written by plan.yaml)")
        if not isinstance(data["layers"], list):
            raise ValueError("not a lit_mpq plan: 'layers' must be a list of rows (written by plan.yaml)")
        specs, layers = [], {}
        for index, row in enumerate(data["layers"]):
            where = f"layers[{index}]" + (f" ({row.get('name')!r})" if isinstance(row, Mapping) else "")
            if not isinstance(row, Mapping) or not isinstance(row.get("spec"), Mapping):
                raise ValueError(f"plan row {where} has no 'spec' mapping: it was not written by a lit_mpq run")
            try:
                spec = LayerSpec.from_dict(row["spec"])
                layers[spec.name] = LayerPlan.from_dict(row)
            except (KeyError, TypeError, ValueError) as err:
                detail = f"missing field {err}" if isinstance(err, KeyError) else str(err)
                raise ValueError(f"plan row {where} is malformed: {detail}") from None
            specs.append(spec)
        return cls(
            specs,
            layers,
            entry_layers=data.get("entry_layers"),
            exit_layers=data.get("exit_layers"),
            float_layers=data.get("float_layers"),
        )

    def to_yaml(self, path: str | Path) -> Path:
        """Write the plan to ``path`` (parents created) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    @classmethod
    def from_yaml(cls, path: str | Path) -> QuantPlan:
        """Read a plan written by :meth:`to_yaml`.

        Raises:
            FileNotFoundError: If the file does not exist.
            ValueError: If the file is not a plan.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"plan file {str(path)!r} does not exist; give the plan.yaml written by a run")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"plan file {str(path)!r} is not valid YAML: {err}") from err
        return cls.from_dict(data)

    def summary_rows(self) -> list[dict[str, Any]]:
        """One flat dict per layer (name, kind, params, MACs, bits), for tables and CSV."""
        return [
            {
                "name": spec.name,
                "kind": spec.kind,
                "params": spec.params,
                "macs": spec.macs,
                "w_bits": lp.w_bits,
                "a_bits": lp.a_bits,
                "pinned": lp.pinned,
            }
            for spec, lp in self.items()
        ]
