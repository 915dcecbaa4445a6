"""Peer benchmark: Sony MCT 2.6.1 automatic mixed precision on the shared CIFAR-10 ResNet-20 (issue 13).

Measures what Sony's Model Compression Toolkit (PyPI ``model-compression-toolkit``) reaches with its own
mixed-precision search under the budgets of issue 13, on the model and images lit_mpq's benchmarks use. Run it with
the interpreter of ``benchmarks/peers/.venv-mct`` (made by ``benchmarks/peers/setup_mct.sh``); MCT is not a dependency
of lit_mpq::

    bash benchmarks/peers/setup_mct.sh
    benchmarks/peers/.venv-mct/bin/python benchmarks/peers/mct_resnet20.py --out mct_resnet20.jsonl
    benchmarks/peers/.venv-mct/bin/python benchmarks/peers/mct_resnet20.py --tpc pow2 --out mct_resnet20.jsonl

This file also holds the harness that ``aimet_resnet20.py`` reuses (data, model, rows, output); it imports MCT only
where MCT is used, so the AIMET venv can import it without MCT.

Data and model (as ``brevitas_resnet20.py``): ``shared/data/cifar10_resnet20.pt`` in lit_mpq's ``cifar_resnet20``
("option A" shortcuts), inputs normalized with the ImageNet mean/std; calibration on the first 512 images of
``cifar10_train_4k_lossless.npz`` (``--max-calib``), given to MCT as its representative dataset in batches of 64
(``--calib-batch-size``); top-1 on all 1000 images of ``cifar10_test_1k_lossless.npz`` (``--max-eval``; FP32 91.5 %).

The flow, for each row: ``mct.ptq.pytorch_post_training_quantization(model, representative_data_gen,
target_resource_utilization, core_config, target_platform_capabilities)`` with MCT's default ``QuantizationConfig``
(MSE threshold search for weights and activations, weight bias correction, shift-negative correction, linear and
residual collapsing), then the exported fake-quantized ``PytorchModel`` is evaluated in eval mode. MCT's graph is
strict: batch norm is folded into the convolutions, and every activation tensor is quantized (the network input,
each conv+ReLU and add+ReLU output, the conv outputs that feed an add, the pooled features and the logits;
``getitem``/``pad`` of the shortcuts are not quantized again). Only convolution and linear kernels are quantized
(per output channel); biases stay float, as the TPC says.

Target platform capabilities (``--tpc``): ``imx500`` (default) is MCT's default TPC, IMX500 v1.0 (kernels
``SYMMETRIC`` per channel, activations ``POWER_OF_TWO`` per tensor; mixed-precision candidates: kernels 8/4/2 bits,
activations 8 bits only). MCT 2.6.1 ships no power-of-two-weights TPC any more (the IMX500 ``v1_pot`` model of MCT
2.0-2.2 is gone), so ``pow2`` rebuilds it as that release defined it: the IMX500 v1.0 operator sets with
``POWER_OF_TWO`` kernels. Each row's TPC is made by the IMX500 v1.0 generator (``imx500_tpc.v1_0.tpc.generate_tpc``)
from that TPC's own op configs with only the bit widths changed (see :func:`build_tpc`); with kernels (8, 4, 2) and
activations 8 the result equals MCT's shipped default TPC (checked at run time).

Rows (``--rows``):

* ``uniform_w4a8``: every kernel 4-bit, every activation 8-bit; a single candidate, so no search.
* ``uniform_w4a4``: every kernel 4-bit and every activation 4-bit (input, adds, pooled features and logits too);
  no search.
* ``size_w4``: MCT's search with ``ResourceUtilization(weights_memory=B)``, B = the weight memory MCT counts for the
  uniform W4 model (kernel parameters x 4 bits / 8, in bytes; biases are float and not counted); candidates kernels
  (8, 4, 2), activations 8.
* ``bitops_w4a8``: ``ResourceUtilization(bops=B)``, B = MCT's BOPs of the uniform W4A8 model; candidates kernels
  (8, 4, 2), activations ``--act-bits`` (default 8, as the shipped TPC).
* ``bitops_1.09G``: ``bops`` = 0.42 x MCT's BOPs of the uniform W8A8 model (1.09 G); same candidates.

``--act-bits 8 4`` lets the bit-ops rows choose 4-bit activations too: the convolution/linear sets get one
configuration per (kernel bits, activation bits) and the ReLU and Add sets (whose configuration quantizes a fused
conv+ReLU or add+ReLU output) one per activation width; the input and the pooled features stay 8-bit (MCT's default
configuration must be a single one). MCT 2.6.1 accepts that TPC, but its BOPs-constrained search then returns
configurations whose BOPs, by MCT's own final count, exceed the target (``within_budget`` false), so the default
keeps 8-bit activations.

MCT's BOPs of a kernel node are MACs x its kernel bits x the bits of the activation feeding it (0 for nodes without a
kernel); the budget is computed with ``mct.core.pytorch_resource_utilization_data`` on the uniform TPC of that row,
so ``budget_as_counted`` is MCT's own number. The search (``MixedPrecisionQuantizationConfig`` defaults: 32 images,
``--mp-images``; average distance over interest points between the float and the mixed-precision model; an integer
program solved with PuLP's CBC; then a greedy refinement) never looks at labels, so ``evaluations`` is 0;
``mp_metric_calls`` counts how often it ran its sensitivity metric (one pass of a candidate model over its 32 images).

One JSON line per row to ``--out`` (appended) and a table on stdout: ``tool``, ``version``, ``tpc``, ``budget``,
``budget_as_counted`` (``value`` and ``unit``), ``top1`` (percent), ``seconds`` (the whole
``pytorch_post_training_quantization`` call: statistics, search and quantization; not the budget's resource count,
not the evaluation), ``evaluations``, ``mp_metric_calls``, ``resource_utilization`` (what MCT reports for the
chosen configuration, searched rows only), ``within_budget`` (that report against the target), ``bits``
(``weights``: kernel bits per layer; ``activations``: bits per activation quantizer) and ``correct`` (one ``0``/``1``
per test image, in order, for paired tests).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # lit_mpq need not be installed in the venv: the checkout is enough
    sys.path.insert(0, str(REPO))

from lit_mpq.data.cifar import NORMALIZATIONS, normalize_uint8  # noqa: E402
from lit_mpq.models.cifar_resnet import cifar_resnet20  # noqa: E402

DATA = REPO.parent / "shared" / "data"
ROWS = ("uniform_w4a8", "uniform_w4a4", "size_w4", "bitops_w4a8", "bitops_1.09G")
W8A8_FRACTION = 0.42
"""``bitops_1.09G``: the budget as a fraction of the W8A8 model's bit-ops (0.42 x 2.595 G = 1.09 G here)."""


# ---------------------------------------------------------------------------------------------------------------------
# Harness shared with aimet_resnet20.py
# ---------------------------------------------------------------------------------------------------------------------


def load_npz(path: Path, start: int = 0, stop: int | None = None) -> tuple[Tensor, Tensor]:
    """Return ImageNet-normalized images ``[N, 3, 32, 32]`` and labels of ``images[start:stop]`` of a CIFAR ``.npz``."""
    with np.load(path) as data:
        pixels = torch.from_numpy(np.ascontiguousarray(data["images"][start:stop])).permute(0, 3, 1, 2)
        labels = torch.from_numpy(data["labels"][start:stop]).long()
    mean, std = NORMALIZATIONS["imagenet"]
    return normalize_uint8(pixels, mean, std), labels


def float_model(weights: Path) -> nn.Module:
    """Return ResNet-20 with the shared weights, in eval mode."""
    model = cifar_resnet20()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


@torch.no_grad()
def predictions(model: nn.Module, images: Tensor, batch_size: int = 250) -> Tensor:
    """Arg-max class of each image (in order), the model in eval mode on its own device."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(x.to(device)).argmax(1).cpu() for x in images.split(batch_size)])


def bit_string(correct: Tensor) -> str:
    """``"1"``/``"0"`` per image, the ``correct`` field of a row."""
    return "".join("1" if c else "0" for c in correct.tolist())


def harness_parser(description: str) -> argparse.ArgumentParser:
    """Options every peer script takes: rows, output, data files and smoke-run limits."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--out", type=Path, default=None, help="append one JSON line per row here")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--weights", type=Path, default=DATA / "cifar10_resnet20.pt")
    p.add_argument("--train-npz", type=Path, default=DATA / "cifar10_train_4k_lossless.npz")
    p.add_argument("--test-npz", type=Path, default=DATA / "cifar10_test_1k_lossless.npz")
    p.add_argument("--max-calib", type=int, default=512, help="calibration images, from the first (default 512)")
    p.add_argument("--max-eval", type=int, default=None, help="test images, from the first (default: all 1000)")
    p.add_argument("--calib-batch-size", type=int, default=64)
    return p


def write_rows(rows: Iterable[dict[str, Any]], out: Path | None) -> list[dict[str, Any]]:
    """Append each row's JSON line to ``out`` as it comes, then print a short table on stdout."""
    done = []
    for row in rows:
        if out is not None:
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
        print({k: v for k, v in row.items() if k not in ("correct", "bits")}, file=sys.stderr, flush=True)
        done.append(row)
    print(f"{'tool':<26} {'budget':<13} {'as counted':>22} {'top1':>6} {'seconds':>8} {'evals':>6}")
    for row in done:
        counted = row["budget_as_counted"]
        shown = "-" if counted is None else f"{counted['value']:.4g} {counted['unit'].split()[0]}"
        tool = f"{row['tool']} {row['version']} {row.get('tpc', '')}".strip()
        print(
            f"{tool:<26} {row['budget']:<13} {shown:>22} {row['top1']:>6.1f} {row['seconds']:>8.1f} "
            f"{row['evaluations']:>6}"
        )
    return done


# ---------------------------------------------------------------------------------------------------------------------
# MCT
# ---------------------------------------------------------------------------------------------------------------------


def candidates(name: str, act_bits: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """A row's (kernel bits, activation candidates, bits of the activations without candidates): see build_tpc."""
    if name == "uniform_w4a8":
        return (4,), (8,), 8
    if name == "uniform_w4a4":
        return (4,), (4,), 4
    if name == "size_w4":
        return (8, 4, 2), (8,), 8
    return (8, 4, 2), tuple(sorted(act_bits, reverse=True)), 8


def build_tpc(tpc: str, weight_bits: Sequence[int], act_bits: Sequence[int], other_act_bits: int) -> Any:
    """IMX500 v1.0 TPC with the given candidates (``tpc="pow2"``: power-of-two kernels, as the old ``v1_pot``).

    Convolution and linear get one configuration per (weight bits, activation bits); with more than one activation
    width, the ReLU and Add operator sets get one configuration per activation width too (a fused conv+ReLU or
    add+ReLU output is quantized with the ReLU's configuration); every other operator gets the default configuration
    with ``other_act_bits``.
    """
    from mct_quantizers import QuantizationMethod
    from model_compression_toolkit.target_platform_capabilities.constants import (
        KERNEL_ATTR,
        WEIGHTS_N_BITS,
        WEIGHTS_QUANTIZATION_METHOD,
    )
    from model_compression_toolkit.target_platform_capabilities.schema import mct_current_schema as schema
    from model_compression_toolkit.target_platform_capabilities.tpc_models.imx500_tpc.v1_0 import tpc as imx500

    linear_8bit, _, default = imx500.get_op_quantization_configs()
    if tpc == "pow2":
        linear_8bit = linear_8bit.clone_and_edit(
            attr_to_edit={KERNEL_ATTR: {WEIGHTS_QUANTIZATION_METHOD: QuantizationMethod.POWER_OF_TWO}}
        )
    act_bits = sorted(act_bits, reverse=True)
    options = [
        # simd_size as in the shipped TPC: 32 lanes at 8 bits, 64 at 4, 128 at 2.
        linear_8bit.clone_and_edit(
            attr_to_edit={KERNEL_ATTR: {WEIGHTS_N_BITS: w}},
            activation_n_bits=a,
            simd_size=linear_8bit.simd_size * 8 // w,
        )
        for w, a in itertools.product(sorted(weight_bits, reverse=True), act_bits)
    ]
    generated = imx500.generate_tpc(
        default_config=default.clone_and_edit(activation_n_bits=other_act_bits),
        base_config=options[0],
        mixed_precision_cfg_list=options,
        name="imx500_tpc" if tpc == "imx500" else "imx500_pot_tpc",
    )
    if len(act_bits) == 1:
        return generated
    activation_options = schema.QuantizationConfigOptions(
        quantization_configurations=tuple(default.clone_and_edit(activation_n_bits=a) for a in act_bits),
        base_config=default.clone_and_edit(activation_n_bits=act_bits[0]),
    )
    with_activation_options = {schema.OperatorSetNames.RELU, schema.OperatorSetNames.ADD}
    operator_set = tuple(
        schema.OperatorsSet(name=op.name, qc_options=activation_options) if op.name in with_activation_options else op
        for op in generated.operator_set
    )
    return generated.model_copy(update={"operator_set": operator_set})


def layer_bits(qmodel: nn.Module) -> dict[str, dict[str, int]]:
    """Kernel bits per quantized layer and bits per activation quantizer of MCT's exported model."""
    from mct_quantizers import PytorchActivationQuantizationHolder, PytorchQuantizationWrapper

    bits: dict[str, dict[str, int]] = {"weights": {}, "activations": {}}
    for name, module in qmodel.named_modules():
        if isinstance(module, PytorchQuantizationWrapper):
            for attr, quantizer in module.weights_quantizers.items():
                bits["weights"][name if attr == "weight" else f"{name}.{attr}"] = int(quantizer.num_bits)
        elif isinstance(module, PytorchActivationQuantizationHolder):
            bits["activations"][name] = int(module.activation_holder_quantizer.num_bits)
    return bits


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send file descriptor 1 to 2 meanwhile: the CBC solver of MCT's search prints its log on stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


class MetricCounter:
    """Count calls of MCT's mixed-precision sensitivity metric while in a ``with`` block."""

    def __enter__(self) -> MetricCounter:
        from model_compression_toolkit.core.common.mixed_precision.sensitivity_eval.sensitivity_evaluation import (
            SensitivityEvaluation,
        )

        self.calls = 0
        self._cls = SensitivityEvaluation
        self._original = SensitivityEvaluation.compute_metric
        counter = self

        def counted(evaluation: Any, *args: Any, **kwargs: Any) -> float:
            counter.calls += 1
            return counter._original(evaluation, *args, **kwargs)

        SensitivityEvaluation.compute_metric = counted
        return self

    def __exit__(self, *exc: object) -> None:
        self._cls.compute_metric = self._original


def mct_rows(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Quantize and evaluate each selected row with MCT."""
    import model_compression_toolkit as mct

    calib, _ = load_npz(args.train_npz, 0, args.max_calib)
    test_images, test_labels = load_npz(args.test_npz, 0, args.max_eval)
    model = float_model(args.weights)

    def representative_data_gen() -> Iterator[list[np.ndarray]]:
        for batch in calib.split(args.calib_batch_size):
            yield [batch.numpy()]

    def max_utilization(tpc: Any) -> Any:
        """MCT's resource count of ``model`` at the largest candidate of every layer of ``tpc``."""
        return mct.core.pytorch_resource_utilization_data(
            model, representative_data_gen, mct.core.CoreConfig(), target_platform_capabilities=tpc
        )

    shipped = build_tpc("imx500", (8, 4, 2), (8,), 8)
    if shipped != mct.get_target_platform_capabilities():
        raise RuntimeError("the rebuilt IMX500 v1.0 TPC differs from MCT's default TPC")

    for name in args.rows:
        tpc = build_tpc(args.tpc, *candidates(name, args.act_bits))
        target, counted = None, None
        if name == "size_w4":
            value = max_utilization(build_tpc(args.tpc, (4,), (8,), 8)).weights_memory
            target, counted = mct.core.ResourceUtilization(weights_memory=value), {"value": value, "unit": "bytes"}
        elif name == "bitops_w4a8":
            value = max_utilization(build_tpc(args.tpc, (4,), (8,), 8)).bops
            target, counted = mct.core.ResourceUtilization(bops=value), {"value": int(value), "unit": "BOPs"}
        elif name == "bitops_1.09G":
            value = W8A8_FRACTION * max_utilization(build_tpc(args.tpc, (8,), (8,), 8)).bops
            target, counted = mct.core.ResourceUtilization(bops=value), {"value": int(value), "unit": "BOPs"}
        core_config = mct.core.CoreConfig(
            mixed_precision_config=mct.core.MixedPrecisionQuantizationConfig(num_of_images=args.mp_images)
        )
        with MetricCounter() as counter, stdout_to_stderr():
            start = time.perf_counter()
            qmodel, info = mct.ptq.pytorch_post_training_quantization(
                model,
                representative_data_gen,
                target_resource_utilization=target,
                core_config=core_config,
                target_platform_capabilities=tpc,
            )
            seconds = time.perf_counter() - start
        correct = predictions(qmodel, test_images) == test_labels
        reported = info.final_resource_utilization if target is not None else None
        within = None if reported is None else bool(target.is_satisfied_by(reported))
        yield {
            "tool": "mct",
            "version": mct.__version__,
            "tpc": args.tpc,
            "budget": name,
            "budget_as_counted": counted,
            "top1": round(100.0 * float(correct.float().mean()), 2),
            "seconds": round(seconds, 2),
            "evaluations": 0,
            "mp_metric_calls": counter.calls,
            "resource_utilization": None
            if reported is None
            else {"weights_memory_bytes": float(reported.weights_memory), "bops": float(reported.bops)},
            "within_budget": within,
            "bits": layer_bits(qmodel),
            "correct": bit_string(correct),
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness_parser(__doc__.split("\n\n")[0])
    p.add_argument("--tpc", choices=("imx500", "pow2"), default="imx500", help="target platform capabilities")
    p.add_argument(
        "--act-bits", type=int, nargs="+", default=[8], help="activation candidates of the bitops rows (default 8)"
    )
    p.add_argument("--mp-images", type=int, default=32, help="MixedPrecisionQuantizationConfig.num_of_images (32)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import model_compression_toolkit  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        sys.exit(f"mct_resnet20.py needs MCT ({exc}); run benchmarks/peers/setup_mct.sh and use its venv.")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    write_rows(mct_rows(args), args.out)


if __name__ == "__main__":
    main()
