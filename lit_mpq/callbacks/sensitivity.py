"""The ``SensitivityProbe`` callback.

Measures every layer's sensitivity to every candidate bit width, weights and input activations separately, and
writes the table into the plan (and to ``sensitivity.json`` at once, so it survives a later failure). Results are
cached on disk (:mod:`lit_mpq.sensitivity.cache`) under a key made of the model's weights, the calibration pixels
and every setting that changes the scores, so a second run with another budget or policy does not probe again.
"""

from __future__ import annotations

import json
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_mpq.bits import validate_candidates
from lit_mpq.callbacks._common import (
    calibration_batches,
    calibration_shard,
    gather_rows,
    is_quant_run,
    measure_phase,
    quantizes_in_stage,
    require_before,
    require_plan,
    run_dir,
    timer,
    trained_model_is_final,
)
from lit_mpq.callbacks.calibration import Calibration
from lit_mpq.plan import QuantPlan
from lit_mpq.quant.checks import check_finite_scores
from lit_mpq.report.record import SensitivityRecord
from lit_mpq.sensitivity import SENSITIVITY_METRICS, SensitivityStats
from lit_mpq.sensitivity.cache import ProbeCache, probe_cache_key

KINDS = ("w", "a")


class SensitivityProbe(Callback):
    """Probe ``S[layer, bits]`` for weights and activations.

    Metrics (``metric``):

    - ``output_l2``: the seed metric ``||y_full - y_quant(b)||_2`` of each layer's output over the calibration set;
    - ``output_l2_normalized``: the same divided by ``||y_full||_2``;
    - ``fisher``: gradient-weighted (empirical Fisher) loss increase ``E[sum (g * delta_b)^2]``, one backward pass;
    - ``kl``: end to end, mean ``KL(p_float || p_quant)`` with one layer quantized at a time (slow reference).

    Args:
        metric: One of the metrics above.
        candidate_bits: Bit widths to probe (every width a policy may choose must be probed).
        num_samples: Calibration images used; default: all (for ``kl``, consider 256 or fewer).
        kinds: Tensors to probe: ``["w", "a"]``, ``["w"]`` or ``["a"]``.
        cache_dir: Directory of the on-disk probe cache; null disables caching.
        subsample: Estimate from every ``subsample``-th image of each batch (output metrics: also every
            ``subsample``-th output row and column, or token), scaled up: an unbiased estimate at a fraction of the
            extra work (not for ``kl``); 1 is exact.

    Raises:
        ValueError: On an unknown metric or kind, unsupported bits, or a non-positive ``num_samples``.
    """

    def __init__(
        self,
        metric: str = "output_l2",
        candidate_bits: list[int] = [4, 6, 8],  # noqa: B006 - shown as the default by jsonargparse
        num_samples: int | None = None,
        kinds: list[str] = ["w", "a"],  # noqa: B006
        cache_dir: str | None = "logs/probe_cache",
        subsample: int = 1,
    ) -> None:
        if metric not in SENSITIVITY_METRICS:
            raise ValueError(f"unknown sensitivity metric {metric!r}; choose one of {list(SENSITIVITY_METRICS)}")
        candidate_bits = validate_candidates(candidate_bits, "SensitivityProbe.candidate_bits")
        if num_samples is not None and num_samples <= 0:
            raise ValueError(f"SensitivityProbe.num_samples must be positive or null (all), got {num_samples}")
        if not kinds or any(kind not in KINDS for kind in kinds):
            raise ValueError(f"kinds must be a non-empty subset of {list(KINDS)}, got {kinds}")
        self.metric = metric
        self.candidate_bits = sorted(set(candidate_bits))
        self.num_samples = num_samples
        self.kinds = [kind for kind in KINDS if kind in kinds]
        if subsample < 1:
            raise ValueError(f"SensitivityProbe.subsample must be a positive integer (1 = exact), got {subsample}")
        self.cache_dir = cache_dir
        self.subsample = subsample
        self._done = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if quantizes_in_stage(trainer, stage):
            require_before(trainer, self, Calibration, "needs calibrated activation quantizers")

    def cache_key(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        """Key of this probe's result: the model's weights, the calibration pixels and every setting that matters.

        See :mod:`lit_mpq.sensitivity.cache`; the device count and the evaluation data are not part of it.
        """
        calibration = next(cb for cb in trainer.callbacks if isinstance(cb, Calibration))
        record = pl_module.record.calibration
        loader, probe_images = calibration_shard(trainer, self.num_samples)
        settings = {
            "calibration": record.settings if record is not None else {},
            "calibration_images": record.images if record is not None else 0,
            "batch_size": loader.batch_size,
            "probe_images": probe_images,
            "metric": self.metric,
            "candidate_bits": self.candidate_bits,
            "kinds": self.kinds,
            "subsample": self.subsample,
        }
        return probe_cache_key(pl_module.model.state_dict(), calibration.image_digests, settings)

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, plan: QuantPlan) -> tuple[dict, int]:
        """Probe batch by batch and add the per-batch sums in global batch order, so any device count agrees."""
        probe, transform = SENSITIVITY_METRICS[self.metric]
        extra = {"subsample": self.subsample} if self.metric != "kl" else {}
        rows = [
            probe(pl_module.model, [x], self.candidate_bits, kinds=tuple(self.kinds), **extra).as_tensor(
                plan.names, self.candidate_bits
            )
            for x in calibration_batches(trainer, f"sensitivity probe ({self.metric})", self.num_samples)
        ]
        width = len(plan.names) * (2 * len(self.candidate_bits) + 1) + 1
        local = torch.stack(rows) if rows else torch.zeros((0, width), dtype=torch.float64)
        packed = gather_rows(trainer, local).sum(dim=0)
        stats = SensitivityStats.from_tensor(packed, plan.names, self.candidate_bits)
        scores = stats.scores(transform)
        return {name: {k: table[k] for k in self.kinds} for name, table in scores.items()}, stats.num_samples

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._done or not is_quant_run(trainer) or trained_model_is_final(pl_module, "SensitivityProbe"):
            return
        plan = require_plan(pl_module, "SensitivityProbe")
        start = timer()
        key = self.cache_key(trainer, pl_module) if self.cache_dir else None
        cache = ProbeCache(self.cache_dir) if self.cache_dir else None
        cached: Any = None
        if trainer.is_global_zero and cache is not None and key is not None:
            cached = cache.load(key)
        cached = trainer.strategy.broadcast(cached, src=0)
        if cached is not None:
            scores = {
                n: {k: {int(b): s for b, s in t.items()} for k, t in v.items()} for n, v in cached["layers"].items()
            }
            images = int(cached["images"])
        else:
            with measure_phase(pl_module, "probe"):
                scores, images = self._probe(trainer, pl_module, plan)
        check_finite_scores(scores, self.metric)
        for name, table in scores.items():
            plan[name].sensitivity = table
        seconds = timer() - start
        self._done = True
        pl_module.record.sensitivity = SensitivityRecord(
            metric=self.metric,
            candidate_bits=list(self.candidate_bits),
            kinds=list(self.kinds),
            images=images,
            seconds=seconds,
            cache="hit" if cached is not None else ("miss" if key else "off"),
            cache_key=key,
            subsample=self.subsample,
        )
        out = run_dir(trainer)  # trainer.log_dir is a collective under DDP: every rank asks
        if trainer.is_global_zero:
            document = {"metric": self.metric, "images": images, "layers": scores}
            out.mkdir(parents=True, exist_ok=True)
            (out / "sensitivity.json").write_text(json.dumps(document, indent=2, allow_nan=False))
            if cache is not None and key is not None and cached is None:
                cache.store(key, document)
        pl_module.log("time/probe_s", seconds)
        pl_module.log("sens/images", float(images))
        pl_module.log("sens/cache_hit", float(cached is not None))
