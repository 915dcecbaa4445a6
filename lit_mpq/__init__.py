"""lit_mpq: energy-aware mixed-precision post-training quantization of image classifiers with Lightning."""

__version__ = "0.1.0"
