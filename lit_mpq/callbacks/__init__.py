"""Lightning callbacks that run quantization during ``trainer.validate`` (and, for training, ``fit``), one per file."""

from lit_mpq.callbacks.allocation import BitAllocator, BitOverride
from lit_mpq.callbacks.analog import AnalogNoise
from lit_mpq.callbacks.block_ranges import BlockRangeSearch
from lit_mpq.callbacks.calibration import Calibration
from lit_mpq.callbacks.energy import EnergyMeter
from lit_mpq.callbacks.export import Export
from lit_mpq.callbacks.label_aware import LabelAwareEvaluation
from lit_mpq.callbacks.learned_bits import BitWidthLearning
from lit_mpq.callbacks.pruning import Pruning
from lit_mpq.callbacks.qat import QuantizationAwareTraining
from lit_mpq.callbacks.refinement import AttentionRefinement
from lit_mpq.callbacks.report import Report
from lit_mpq.callbacks.rounding import WeightRounding
from lit_mpq.callbacks.sensitivity import SensitivityProbe

__all__ = [
    "AnalogNoise",
    "AttentionRefinement",
    "BitAllocator",
    "BitOverride",
    "BitWidthLearning",
    "BlockRangeSearch",
    "Calibration",
    "EnergyMeter",
    "Export",
    "LabelAwareEvaluation",
    "Pruning",
    "QuantizationAwareTraining",
    "Report",
    "SensitivityProbe",
    "WeightRounding",
]
