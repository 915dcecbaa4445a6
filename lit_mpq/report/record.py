"""The run record: one typed object that collects what a run measured, filled stage by stage by the callbacks.

The plan (:class:`~lit_mpq.plan.QuantPlan`) says *what* was decided per layer; the run record says *how the run
went*: how many images calibrated, which probe ran and whether it came from the cache, which policy allocated and
under which budget, the energy report, and the seed. The ``Report`` callback turns it into ``results.json`` and the
quantization card; the sweep reads it after each point. Plain dataclasses, no Lightning.

Example:
    >>> record = RunRecord(seed_everything=0)
    >>> record.calibration = CalibrationRecord(images=256, images_per_rank=[256], seconds=1.5, settings={})
    >>> record.to_dict()["calibration"]["images"]
    256
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AllocationRecord",
    "CalibrationRecord",
    "LabelAwareRecord",
    "RoundingRecord",
    "RunRecord",
    "SensitivityRecord",
]


@dataclass
class CalibrationRecord:
    """What the ``Calibration`` callback did.

    Attributes:
        images: Calibration images seen, over all ranks.
        images_per_rank: Images each rank calibrated on, in rank order.
        seconds: Wall time of the calibration pass.
        settings: The quantizer settings (:class:`~lit_mpq.quant.apply.QuantSettings` as a dict).
    """

    images: int
    images_per_rank: list[int]
    seconds: float
    settings: dict[str, Any]


@dataclass
class SensitivityRecord:
    """What the ``SensitivityProbe`` callback did.

    Attributes:
        metric: Sensitivity metric name.
        candidate_bits: Probed bit widths.
        kinds: Probed tensors (``"w"``, ``"a"``).
        images: Images the probe saw.
        seconds: Wall time (probe or cache read).
        cache: ``"hit"``, ``"miss"`` or ``"off"``.
        cache_key: Key of the on-disk cache entry, when caching is on.
        subsample: Subsampling factor of the estimate (1 = exact).
    """

    metric: str
    candidate_bits: list[int]
    kinds: list[str]
    images: int
    seconds: float
    cache: str
    cache_key: str | None
    subsample: int = 1


@dataclass
class AllocationRecord:
    """What the ``BitAllocator`` callback did.

    Attributes:
        policy: One-line description of the policy and its budget.
        seconds: Wall time of the allocation.
        pinned: Layers whose bits were fixed by configuration (first/last layers, overrides).
    """

    policy: str
    seconds: float
    pinned: list[str] = field(default_factory=list)


@dataclass
class RoundingRecord:
    """What the ``WeightRounding`` callback did.

    Attributes:
        settings: The rounding settings (:class:`~lit_mpq.rounding.RoundingSettings` as a dict).
        images_per_rank: Calibration images the statistics came from, on this rank.
        seconds: Wall time of collection and rounding.
        layers: Per rounded layer: name, bits, relative output error with nearest and with the method's rounding
            (:class:`~lit_mpq.rounding.LayerRounding` as a dict), seconds, whether reused from an earlier run.
    """

    settings: dict[str, Any]
    images_per_rank: int
    seconds: float
    layers: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class LabelAwareRecord:
    """What the ``LabelAwareEvaluation`` callback measured: accuracy on similar, dissimilar and random class subsets.

    Attributes:
        subset_size: Classes per subset (``k``).
        selection: How the extreme subsets were found (exhaustive, or beam search).
        calibration_images: Images behind the class-similarity matrix (FP32 outputs), over all ranks.
        missing_classes: Classes without a calibration image (left out of every subset).
        rows: One per subset: ``kind``, ``classes``, ``names``, ``mean_divergence_nats`` (mean pairwise symmetric
            KL), ``images``, ``top1_fp32``, ``top1`` and ``drop`` (FP32 minus quantized), accuracy in %.
        seconds: Wall time of the class statistics and the subset selection.
    """

    subset_size: int
    selection: str
    calibration_images: int
    missing_classes: list[int]
    rows: list[dict[str, Any]]
    seconds: float


@dataclass
class RunRecord:
    """Everything a run measured besides the plan; one per ``MPQModule``.

    Attributes:
        calibration: Set by ``Calibration``.
        sensitivity: Set by ``SensitivityProbe``.
        allocation: Set by ``BitAllocator``.
        rounding: Set by ``WeightRounding``.
        refinement: The ranking-aware refinement's report (``AttentionRefinement``: factors, objectives, seconds).
        block_ranges: The block-output range search's report (``BlockRangeSearch``: factors, errors, seconds).
        energy: The energy report of ``EnergyMeter`` (:func:`lit_mpq.energy.energy_report`, plus measured energy).
        label_aware: Set by ``LabelAwareEvaluation``: accuracy on class subsets.
        export: Set by ``Export``: the files written, the packed size against the ideal, ONNX Runtime's top-1.
        pruning: Set by ``Pruning``: its settings, the sparsity, effective MACs, dense and sparsity-aware energy.
        training: Set by ``QuantizationAwareTraining`` / ``BitWidthLearning`` at the end of ``fit``: settings, epochs,
            time, the last validation metrics (and the learned widths).
        analog: Set by ``AnalogNoise``: the noise settings, each layer's energy per MAC, the analog MAC energy beside
            the digital model's, and (when allocated) the noise sensitivities and the solver's result.
        seed_everything: The run's global seed, as configured (``None`` when none was set).
    """

    calibration: CalibrationRecord | None = None
    sensitivity: SensitivityRecord | None = None
    allocation: AllocationRecord | None = None
    rounding: RoundingRecord | None = None
    energy: dict[str, Any] | None = None
    refinement: dict[str, Any] | None = None
    block_ranges: dict[str, Any] | None = None
    label_aware: LabelAwareRecord | None = None
    export: dict[str, Any] | None = None
    pruning: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    analog: dict[str, Any] | None = None
    seed_everything: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form; stages that did not run are left out."""
        out: dict[str, Any] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if value is None:
                continue
            out[item.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return out
