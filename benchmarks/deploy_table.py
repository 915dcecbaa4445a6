"""Benchmark: the seed's deployment table, measured on this machine's CPU with real kernels where they exist.

Rows per model x precision; columns: top-1, latency at batch 1 and 64 (median of ``--repeats`` after warm-up, with
min-max), speed-up against FP32 in the same runtime, peak memory of one batch-64 inference, size of the saved
artifact, bit-ops and analytic energy of the plan that matches the row::

    python benchmarks/deploy_table.py [--quick] [--models resnet20,vgg11,mobilenetv2,deit,deit_energy] [--repeats 5]
    python benchmarks/deploy_table.py --models vgg11,mobilenetv2 --pipelines-only    # lit_mpq's plans on the shapes

Runtimes: ONNX Runtime (CPU EP, 2 intra-op threads) for the CNNs' FP32 and INT8 rows (``quantize_dynamic`` and
``quantize_static`` of the FP32 ONNX, QOperator format, per-channel weights, calibrated on the first 512 lossless
CIFAR-10 training images) and for lit_mpq's QDQ exports; torch eager for FP16/BF16 (``.half()`` / ``.bfloat16()``)
and FP32 next to them; torchao for DeiT-Tiny's INT8/INT4 rows (``quantize_`` configs from a plan through
:func:`lit_mpq.deploy.torchao_configs.apply_torchao_plan`, eager; INT8 static through torchao's PT2E
``X86InductorQuantizer`` and ``torch.compile``). A row without a CPU kernel is marked ``sim``: its top-1 is lit_mpq's
fake-quantized accuracy and it has no latency. Timing is interleaved (every repeat times every row of a model once,
in turn), so that load from other processes falls on all rows alike.

Peak memory: the growth of the process's peak resident set (``VmHWM`` after resetting it through
``/proc/self/clear_refs``) over its resident set just before one batch-64 inference; the model is already loaded,
so this is the working memory of the inference, not the weights (those are the size column).
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from _runs import cached_batches, evenly_spaced, imagenet_data, quiet_run_args
from torch import nn

from lit_mpq.allocation import ExactAllocation, LinearLowBits, Policy, Uniform, VarianceMixed
from lit_mpq.callbacks import BitAllocator, Export, Report, SensitivityProbe, WeightRounding
from lit_mpq.cli import main as cli_main
from lit_mpq.deploy.onnx_export import EXACT_SESSION_CONFIG
from lit_mpq.deploy.torchao_configs import apply_torchao_plan
from lit_mpq.energy import HorowitzEnergyModel, plan_energy
from lit_mpq.models import create_backbone, load_checkpoint
from lit_mpq.plan import QuantPlan
from lit_mpq.quant.apply import QuantSettings, measure_model, quantize_model

DATA = Path("../shared/data")
CIFAR_MEAN, CIFAR_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the shared ResNet-20's "imagenet" statistics
THREADS = 2
CNNS = {
    "resnet20": ("cifar_resnet20", DATA / "cifar10_resnet20.pt"),
    "vgg11": ("cifar_vgg11_bn", None),
    "mobilenetv2": ("torchvision:mobilenet_v2", None),
}
ENERGY = HorowitzEnergyModel()
FP32, FP16, INT8, INT4 = None, 16, 8, 4


@dataclass
class Row:
    """One line of the table."""

    model: str
    precision: str
    runtime: str
    kernels: str
    bits: dict[str, tuple[int | None, int | None]] | None = None  # the plan matching the row, for bit-ops/energy
    run: Callable[[torch.Tensor], object] | None = None  # one inference on a batch
    top1: float | None = None
    top1_note: str = ""
    size_mb: float | None = None
    baseline: str = ""  # precision of the same-runtime FP32 row
    times: dict[int, list[float]] = field(default_factory=lambda: {1: [], 64: []})
    peak_mb: float | None = None
    compiled: bool = False  # torch.compile'd: its first batch-64 call compiles
    bit_ops_g: float | None = None
    energy_uj: float | None = None


# ------------------------------------------------------------------------------------------------ measurement
def peak_memory_mb(run: Callable[[torch.Tensor], object], x: torch.Tensor) -> float:
    """Growth of the peak resident set over the resident set during one call (Linux ``clear_refs`` 5)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    run(x)
    return (_status_kb("VmHWM") - before) / 1024


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def time_rows(rows: list[Row], inputs: dict[int, torch.Tensor], repeats: int) -> None:
    """Warm every row up at each batch size, then time ``repeats`` rounds, each row once per round, interleaved."""
    timed = [row for row in rows if row.run is not None]
    for batch, x in inputs.items():
        for row in timed:
            with torch.inference_mode():
                if batch == 64 and row.peak_mb is None and not row.compiled:
                    row.peak_mb = peak_memory_mb(row.run, x)  # the first batch-64 call: nothing cached yet
                row.run(x)  # warm-up (and torch.compile's compilation)
                if batch == 64 and row.peak_mb is None:
                    row.peak_mb = peak_memory_mb(row.run, x)
        for _ in range(repeats):
            for row in timed:
                with torch.inference_mode():
                    start = time.perf_counter()
                    row.run(x)
                    row.times[batch].append(time.perf_counter() - start)


def plan_costs(row: Row, plan: QuantPlan) -> None:
    """Bit-ops (G per image) and analytic energy (µJ per image) of ``plan`` at the row's widths."""
    if row.bits is None:
        return
    trial = copy.deepcopy(plan)
    trial.set_bits({name: row.bits.get(name, (FP32, FP32)) for name in trial})
    row.bit_ops_g = trial.bit_ops() / 1e9
    row.energy_uj = plan_energy(trial, ENERGY).total_pj / 1e6


def uniform_bits(plan: QuantPlan, w_bits: int | None, a_bits: int | None, linear_only: bool = False) -> dict:
    """Every row (or every Linear row, the rest FP32) at ``(w_bits, a_bits)``; a matmul's operands are activations."""
    bits = {}
    for name, spec in plan.specs.items():
        if linear_only and spec.kind != "linear":
            bits[name] = (FP32, FP32)
        else:
            bits[name] = (a_bits, a_bits) if spec.kind == "matmul" else (w_bits, a_bits)
    return bits


def model_plan(model: nn.Module, input_size: tuple[int, ...]) -> QuantPlan:
    """lit_mpq's plan of ``model`` (its layers, MACs, parameters), measured on a fake-quantized copy."""
    twin = copy.deepcopy(model)
    quantize_model(twin, QuantSettings())
    return measure_model(twin.eval(), torch.zeros(1, *input_size))


def file_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def torch_size_mb(model: nn.Module, folder: Path, name: str) -> float:
    path = folder / f"{name}.pt"
    torch.save(model.state_dict(), path)
    return file_mb(path)


def top1_torch(model: Callable[[torch.Tensor], torch.Tensor], batches, dtype: torch.dtype = torch.float32) -> float:
    correct = total = 0
    with torch.inference_mode():
        for x, y in batches:
            correct += int((model(x.to(dtype)).float().argmax(1) == y).sum())
            total += int(y.numel())
    return 100.0 * correct / total


# ----------------------------------------------------------------------------------------------- ONNX Runtime
def export_fp32_onnx(model: nn.Module, input_size: tuple[int, ...], path: Path) -> Path:
    """The float model as ONNX (opset 18, dynamic batch), the FP32 baseline of the ORT rows."""
    torch.onnx.export(
        model,
        torch.zeros(2, *input_size),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=18,
        dynamo=False,
    )
    return path


def ort_session(path: Path, optimized: Path | None = None, arena: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = arena
    # Idle ORT threads otherwise spin for a while after each run, stealing the 2 cores from the next row's timing.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for key, value in EXACT_SESSION_CONFIG.items():  # 4-bit MatMulNBits on float inputs, not int8 on the fly
        options.add_session_config_entry(key, value)
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_kernels(optimized: Path) -> str:
    """The compute ops of the graph ORT optimized (what really ran): e.g. ``QLinearConv x19, QLinearMatMul x1``."""
    import onnx

    graph = onnx.load(str(optimized)).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        if any(k in node.op_type for k in ("Conv", "MatMul", "Gemm")):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return ", ".join(f"{op} x{n}" for op, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def ort_row(model: str, precision: str, path: Path, batches, folder: Path, baseline: str = "FP32 (ORT)") -> Row:
    optimized = folder / f"{path.stem}.optimized.onnx"
    session = ort_session(path, optimized)
    input_name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> object:
        return session.run(None, {input_name: x.numpy()})

    row = Row(model, precision, "ORT", ort_kernels(optimized), run=run, size_mb=file_mb(path), baseline=baseline)
    # Peak memory on a second session without ORT's memory arena, which would keep the first run's buffers resident.
    bare = ort_session(path, arena=False)
    zeros = np.zeros((64, *session.get_inputs()[0].shape[1:]), np.float32)
    bare.run(None, {input_name: zeros[:1]})
    row.peak_mb = peak_memory_mb(lambda x: bare.run(None, {input_name: x}), zeros)
    if batches is not None:
        correct = total = 0
        for x, y in batches:
            correct += int((torch.from_numpy(run(x)[0]).argmax(1) == y).sum())
            total += int(y.numel())
        row.top1 = 100.0 * correct / total
    return row


class CalibrationReader:
    """ORT's calibration reader over the first ``count`` lossless CIFAR-10 training images."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int = 64) -> None:
        self.feeds = iter([{input_name: images[i : i + batch]} for i in range(0, len(images), batch)])

    def get_next(self) -> dict | None:
        """The next feed, or ``None`` when the images are exhausted."""
        return next(self.feeds, None)


def cifar_arrays(path: Path, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(path)
    images = data["images"][:count].astype(np.float32) / 255.0
    mean, std = np.array(CIFAR_MEAN, np.float32), np.array(CIFAR_STD, np.float32)
    images = ((images - mean) / std).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images), data["labels"][:count]


# ------------------------------------------------------------------------------------------ lit_mpq pipelines
def lit_mpq_run(
    config: str,
    out: Path,
    policy: Policy,
    export: bool,
    quick: bool,
    extra: list[str] = (),
    rounding: str | None = None,
    calibration: int | None = None,
) -> dict:
    """Run ``config``'s calibrate-probe-allocate pipeline with ``policy``; fake-quantized top-1, plan, exports.

    ``rounding`` adds a ``WeightRounding`` step after the allocation (and the attention refinement); ``calibration``
    sets the number of calibration images (``--quick``: 128).
    """
    from lightning.pytorch.callbacks import Callback

    class VarianceObserver(Callback):
        """Gives a ``VarianceMixed`` policy the calibrated model's weight variances before ``BitAllocator`` runs.

        That is what ``BitAllocator`` itself would do for a policy with ``requires_weights``.
        """

        def on_validation_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            if getattr(policy, "requires_weights", False):
                policy.observe(pl_module.model, pl_module.plan)

    args = [*quiet_run_args(config, out), "--model.init_args.fp32_reference=false", *extra]
    if quick or calibration is not None:
        args += [f"--data.init_args.num_calibration_samples={128 if quick else calibration}"]
    cli = cli_main(args, run=False)
    callbacks = cli.trainer.callbacks
    if rounding is not None:
        after = max(i for i, cb in enumerate(callbacks) if type(cb).__name__ in ("BitAllocator", "AttentionRefinement"))
        callbacks.insert(after + 1, WeightRounding(method=rounding))
    if not policy.requires_sensitivity:
        callbacks[:] = [cb for cb in callbacks if not isinstance(cb, SensitivityProbe)]
    for cb in callbacks:
        if isinstance(cb, BitAllocator):
            cb.policy = policy
        if isinstance(cb, SensitivityProbe) and hasattr(policy, "w_candidates"):  # probe every width it may give
            cb.candidate_bits = sorted(set(cb.candidate_bits) | set(policy.w_candidates) | set(policy.a_candidates))
    allocator = next(i for i, cb in enumerate(callbacks) if isinstance(cb, BitAllocator))
    callbacks.insert(allocator, VarianceObserver())
    folder = Path(cli.trainer.default_root_dir) / "export"
    if export:
        report = next((i for i, cb in enumerate(callbacks) if isinstance(cb, Report)), len(callbacks))
        callbacks.insert(report, Export(output_dir=str(folder), evaluate_onnx=False))
    metrics = cli.trainer.validate(cli.model, cli.datamodule, verbose=False)[0]
    return {"top1": metrics["val/top1"], "plan": cli.model.plan, "folder": folder, "module": cli.model}


def packed_mb(folder: Path) -> float | None:
    path = folder / "quantized.pt"
    return file_mb(path) if path.is_file() else None


# ------------------------------------------------------------------------------------------------------- CNNs
def cnn_rows(key: str, args: argparse.Namespace, folder: Path) -> list[Row]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    backbone, weights = CNNS[key]
    real = weights is not None
    kwargs = {"num_classes": 10} if backbone.startswith("torchvision:") else {}
    model = create_backbone(backbone, **kwargs).eval()
    if real:
        load_checkpoint(model, str(weights))
    input_size = (3, 32, 32)
    plan = model_plan(model, input_size)
    count = 200 if args.quick else None
    images, labels = cifar_arrays(DATA / "cifar10_test_1k_lossless.npz", count)
    batches = None
    if real:
        batches = [
            (torch.from_numpy(images[i : i + 200]), torch.from_numpy(labels[i : i + 200]))
            for i in range(0, len(images), 200)
        ]

    fp32_onnx = export_fp32_onnx(model, input_size, folder / f"{key}_fp32.onnx")
    rows = [
        Row(
            key,
            "FP32",
            "torch",
            "aten (oneDNN) conv",
            uniform_bits(plan, FP32, FP32),
            run=model,
            size_mb=torch_size_mb(model, folder, f"{key}_fp32"),
            baseline="FP32 (torch)",
        ),
        ort_row(key, "FP32", fp32_onnx, batches, folder),
    ]
    rows[0].top1 = top1_torch(model, batches) if real else None
    rows[1].bits = uniform_bits(plan, FP32, FP32)
    for precision, dtype in (("FP16", torch.float16), ("BF16", torch.bfloat16)):
        low = copy.deepcopy(model).to(dtype)
        row = Row(
            key,
            precision,
            "torch",
            f"aten {dtype} conv",
            uniform_bits(plan, FP16, FP16),
            run=lambda x, low=low, dtype=dtype: low(x.to(dtype)),
            size_mb=torch_size_mb(low, folder, f"{key}_{precision}"),
            baseline="FP32 (torch)",
        )
        row.top1 = top1_torch(low, batches, dtype) if real else None
        rows.append(row)
    # ONNX Runtime's recommended pre-processing (shape inference, graph optimization) before its quantizer: without it
    # the quantizer stops on VGG-11 and MobileNetV2 with "'NoneType' object has no attribute 'data_type'".
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = folder / f"{key}_fp32_prepared.onnx"
    quant_pre_process(str(fp32_onnx), str(prepared))
    dynamic = folder / f"{key}_int8_dynamic.onnx"
    quantize_dynamic(str(prepared), str(dynamic), weight_type=QuantType.QInt8, per_channel=True)
    row = ort_row(key, "INT8 dynamic", dynamic, batches, folder)
    row.bits = uniform_bits(plan, INT8, INT8)
    rows.append(row)
    calib, _ = cifar_arrays(DATA / "cifar10_train_4k_lossless.npz", 128 if args.quick else 512)
    for fmt, name in ((QuantFormat.QOperator, "qop"), (QuantFormat.QDQ, "qdq")):
        static = folder / f"{key}_int8_static_{name}.onnx"
        quantize_static(
            str(prepared),
            str(static),
            CalibrationReader("images", calib),
            quant_format=fmt,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        row = ort_row(key, f"INT8 static ({'QOperator' if name == 'qop' else 'QDQ'})", static, batches, folder)
        row.bits = uniform_bits(plan, INT8, INT8)
        rows.append(row)

    config = "configs/resnet20_energy.yaml"
    extra = [] if real else [f"--model.init_args.backbone={backbone}", "--model.init_args.checkpoint_path=null"]
    if not real and kwargs:
        extra.append("--model.init_args.num_classes=10")
    simulated = [
        ("INT8 weight-only", Uniform(w_bits=8, a_bits=None)),
        ("INT4 weight-only", Uniform(w_bits=4, a_bits=None)),
        ("Linear-INT4/rest-FP16", LinearLowBits()),
    ]
    for precision, policy in simulated:
        row = Row(key, precision, "sim", "no CPU kernel (ORT/torch): lit_mpq fake-quant", baseline="")
        if real:
            result = lit_mpq_run(config, folder / "runs", policy, export=False, quick=args.quick)
            row.top1, row.top1_note = result["top1"], "fake-quant"
            row.bits = result["plan"].bits()
        else:
            trial = copy.deepcopy(plan)
            policy.check_plan(trial)
            row.bits = {**trial.bits(), **policy.allocate(trial)}
        rows.append(row)
    for precision, policy in (
        ("Variance-mixed W4/W8 A8", VarianceMixed(low_bits=4, high_bits=8, a_bits=8)),
        (
            "lit_mpq energy (<= W4A4)",
            ExactAllocation(
                energy_relative_to="W4A4", energy_ratio=1.0, w_candidates=[2, 3, 4, 6, 8], a_candidates=[3, 4, 6, 8]
            ),
        ),
    ):
        if not real and not args.shape_pipelines:
            rows.append(Row(key, precision, "—", "not run: random weights (--shape-pipelines runs it)"))
            continue
        result = lit_mpq_run(config, folder / "runs", policy, export=True, quick=args.quick, extra=extra)
        onnx_path = result["folder"] / "model.onnx"
        row = ort_row(key, precision + " (QDQ)", onnx_path, batches, folder)
        if real:
            row.top1_note = f"fake-quant {result['top1']:.2f}"
        row.bits = result["plan"].bits()
        row.size_mb = packed_mb(result["folder"])
        row.kernels += f"; size: quantized.pt (ONNX {file_mb(onnx_path):.2f} MB)"
        rows.append(row)

    if args.pipelines_only:  # the FP32 baselines and lit_mpq's two plans: rows measured side by side in this run
        rows = [
            row for row in rows if row.precision == "FP32" or row.runtime in ("ORT", "—") and "(QDQ)" in row.precision
        ]
    for row in rows:
        plan_costs(row, plan)
    batch64 = torch.from_numpy(np.repeat(images[:64], 1, axis=0)) if len(images) >= 64 else torch.zeros(64, 3, 32, 32)
    time_rows(rows, {1: batch64[:1].contiguous(), 64: batch64.contiguous()}, args.repeats)
    return rows


# -------------------------------------------------------------------------------------------------- DeiT-Tiny
def deit_setup(args: argparse.Namespace) -> tuple[nn.Module, QuantPlan, object, list]:
    """DeiT-Tiny with the shared weights, its plan, the shared ImageNet data and the evaluation batches."""
    name = "deit_tiny_patch16_224"
    model = create_backbone(name).eval()
    load_checkpoint(model, str(DATA / "deit_tiny_patch16_224.pt"))
    plan = model_plan(model, (3, 224, 224))
    data = imagenet_data(DATA, name, calibration=64)
    images = args.deit_images if not args.quick else 64
    return model, plan, data, cached_batches(evenly_spaced(data.val_set, images), 64, 2)


def time_deit_rows(rows: list[Row], batches: list, repeats: int) -> None:
    """Time ``rows`` at batch 1 and 64 on the first evaluation images."""
    x64 = torch.cat([x for x, _ in batches])[:64]
    if len(x64) < 64:
        x64 = x64.repeat(64 // len(x64) + 1, 1, 1, 1)[:64]
    time_rows(rows, {1: x64[:1].contiguous(), 64: x64.contiguous()}, repeats)


def deit_rows(args: argparse.Namespace, folder: Path) -> list[Row]:
    import torch._inductor.config as inductor_config

    model, plan, data, batches = deit_setup(args)
    calibration = next(iter(data.calib_dataloader()))[0][:32]
    rows: list[Row] = []

    def add(row: Row, net: nn.Module | None = None, dtype: torch.dtype = torch.float32, accuracy: bool = True) -> Row:
        if accuracy and row.run is not None:
            row.top1 = top1_torch(row.run, batches, dtype)
        if net is not None and row.size_mb is None:
            row.size_mb = torch_size_mb(net, folder, f"deit_{len(rows)}")
        rows.append(row)
        return row

    add(
        Row(
            "deit",
            "FP32",
            "torch",
            "aten linear (oneDNN/MKL sgemm)",
            uniform_bits(plan, FP32, FP32),
            run=model,
            baseline="FP32 (torch)",
        ),
        model,
    )
    for precision, dtype in (("FP16", torch.float16), ("BF16", torch.bfloat16)):
        low = copy.deepcopy(model).to(dtype)
        add(
            Row(
                "deit",
                precision,
                "torch",
                f"aten {dtype} linear",
                uniform_bits(plan, FP16, FP16),
                run=lambda x, low=low, dtype=dtype: low(x.to(dtype)),
                baseline="FP32 (torch)",
            ),
            low,
            dtype,
        )

    def torchao_row(precision: str, bits: dict, base: nn.Module | None = None, dtype=torch.float32) -> Row:
        net = copy.deepcopy(base if base is not None else model)
        linear = {n: b for n, b in bits.items() if plan.specs[n].kind == "linear"}
        report = apply_torchao_plan(net, linear)
        kinds: dict[str, int] = {}
        for layer in report:
            kind = f"{layer.config or 'float'}/{layer.tensor}"
            kinds[kind] = kinds.get(kind, 0) + 1
        kernels = ", ".join(f"{k} x{n}" for k, n in kinds.items())
        return add(
            Row("deit", precision, "torchao", kernels, bits, run=lambda x: net(x.to(dtype)), baseline="FP32 (torch)"),
            net,
            dtype,
        )

    torchao_row("INT8 dynamic", uniform_bits(plan, INT8, INT8, linear_only=True))
    torchao_row("INT8 weight-only", uniform_bits(plan, INT8, FP32, linear_only=True))
    torchao_row("INT4 weight-only", uniform_bits(plan, INT4, FP32, linear_only=True))
    mixed = copy.deepcopy(plan)
    mixed.set_bits(LinearLowBits().allocate(mixed))
    torchao_row(
        "Linear-INT4/rest-FP16", mixed.bits(), base=copy.deepcopy(model).to(torch.bfloat16), dtype=torch.bfloat16
    ).kernels += " (rest in BF16: CPU int4 kernel takes bf16 inputs)"
    variance = VarianceMixed(low_bits=4, high_bits=8, a_bits=None)
    variance.observe(model, plan)
    vplan = copy.deepcopy(plan)
    vplan.set_bits(variance.allocate(vplan))
    torchao_row("Variance-mixed W4/W8 (weight-only)", vplan.bits())

    # INT8 static: torchao's PT2E flow (X86InductorQuantizer), lowered by torch.compile to oneDNN qlinear.
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    inductor_config.freezing = True
    batch = torch.export.Dim("batch", min=1, max=512)
    exported = torch.export.export(model, (calibration[:2],), dynamic_shapes=({0: batch},)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        prepared(calibration)
    converted = convert_pt2e(prepared)
    size = torch_size_mb(converted, folder, "deit_pt2e")
    compiled = torch.compile(converted)
    add(
        Row(
            "deit",
            "INT8 static (PT2E+compile)",
            "torchao",
            "onednn.qlinear_pointwise (Inductor, freezing)",
            uniform_bits(plan, INT8, INT8, linear_only=True),
            run=compiled,
            size_mb=size,
            baseline="FP32 (torch)",
            compiled=True,
        )
    )
    fp32_compiled = torch.compile(model)
    add(
        Row(
            "deit",
            "FP32 (compile)",
            "torch",
            "Inductor, freezing (for the static row)",
            uniform_bits(plan, FP32, FP32),
            run=fp32_compiled,
            baseline="FP32 (torch)",
            compiled=True,
        ),
        accuracy=False,
    )

    for row in rows:
        plan_costs(row, plan)
    time_deit_rows(rows, batches, args.repeats)
    return rows


# ------------------------------------------------------------------------------------ DeiT-Tiny, lit_mpq energy
DEIT_W4A4_ROW_UJ = 1055.1
"""Analytic energy (µJ/image) of DeiT-Tiny's uniform W4A4 row (patch embedding and head at W8A8; docs/vit.md)."""


def deit_energy_rows(args: argparse.Namespace, folder: Path) -> list[Row]:
    """DeiT-Tiny under lit_mpq's energy allocation, exported as QDQ ONNX and run by ONNX Runtime, next to FP32.

    The recipe of docs/vit.md's best allocator row: ``configs/deit.yaml`` (log√2 softmax below 6 bits, RepQ-ViT
    LayerNorm reparameterization, twin-uniform fc2 inputs, Fisher probe), ``ExactAllocation`` at the uniform W4A4
    row's energy with activations of at least 4 bits, GPTQ rounding. FP32 rows: torch eager and the FP32 ONNX in ORT.
    """
    model, plan, data, batches = deit_setup(args)
    fp32_onnx = export_fp32_onnx(model, (3, 224, 224), folder / "deit_fp32.onnx")
    fp32 = Row("deit", "FP32", "torch", "aten linear (oneDNN/MKL sgemm)", uniform_bits(plan, FP32, FP32), run=model)
    fp32.baseline = "FP32 (torch)"
    fp32.top1 = top1_torch(model, batches)
    fp32.size_mb = torch_size_mb(model, folder, "deit_fp32")
    fp32_ort = ort_row("deit", "FP32", fp32_onnx, batches, folder)
    fp32_ort.bits = uniform_bits(plan, FP32, FP32)
    policy = ExactAllocation(energy_uj=DEIT_W4A4_ROW_UJ, w_candidates=[3, 4, 6, 8], a_candidates=[4, 6, 8])
    result = lit_mpq_run(
        "configs/deit.yaml",
        folder / "runs",
        policy,
        export=True,
        quick=args.quick,
        extra=["--data.init_args.num_workers=0"],
        rounding="gptq",
        calibration=512,
    )
    onnx_path = result["folder"] / "model.onnx"
    row = ort_row("deit", "lit_mpq energy (<= W4A4 row) (QDQ)", onnx_path, batches, folder)
    fake_quant = top1_torch(result["module"].model.eval(), batches)
    row.top1_note = f"fake-quant {fake_quant:.2f}; {result['top1']:.2f} on all 1,300"
    row.bits = result["plan"].bits()
    row.size_mb = packed_mb(result["folder"])
    row.kernels += f"; size: quantized.pt (ONNX {file_mb(onnx_path):.2f} MB)"
    rows = [fp32, fp32_ort, row]
    for each in rows:
        plan_costs(each, plan)
    time_deit_rows(rows, batches, args.repeats)
    return rows


# ---------------------------------------------------------------------------------------------------- printing
def spread(times: list[float]) -> str:
    if not times:
        return "—"
    ms = [t * 1e3 for t in times]
    return f"{statistics.median(ms):.1f} ({min(ms):.1f}–{max(ms):.1f})"


def print_table(rows: list[Row]) -> None:
    medians = {(r.model, f"{r.precision} ({r.runtime})"): statistics.median(r.times[64]) for r in rows if r.times[64]}
    header = (
        "| model | precision | runtime | top-1 % | ms batch 1 (min–max) | ms batch 64 (min–max) | speed-up b64 | "
        "peak MB b64 | size MB | G bit-ops/img | µJ/img | kernels |"
    )
    print(header)
    print("|" + "|".join("---" for _ in range(12)) + "|")
    for r in rows:
        top1 = "—" if r.top1 is None else f"{r.top1:.2f}"
        if r.top1_note:
            top1 += f" ({r.top1_note})"
        base = medians.get((r.model, r.baseline))
        speed = f"{base / statistics.median(r.times[64]):.2f}x" if base and r.times[64] else "—"
        cells = [
            r.model,
            r.precision,
            r.runtime,
            top1,
            spread(r.times[1]),
            spread(r.times[64]),
            speed,
            "—" if r.peak_mb is None else f"{r.peak_mb:.0f}",
            "—" if r.size_mb is None else f"{r.size_mb:.2f}",
            "—" if r.bit_ops_g is None else f"{r.bit_ops_g:.2f}",
            "—" if r.energy_uj is None else f"{r.energy_uj:.1f}",
            r.kernels,
        ]
        print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer images and repeats")
    parser.add_argument("--models", default="resnet20,vgg11,mobilenetv2,deit", help="comma-separated subset")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--deit-images", type=int, default=512, help="ImageNet val images for DeiT's top-1")
    parser.add_argument("--shape-pipelines", action="store_true", help="also allocate the random-weight CNNs")
    parser.add_argument(
        "--pipelines-only",
        action="store_true",
        help="CNNs: time only the FP32 rows and lit_mpq's variance-mixed and energy plans (implies --shape-pipelines)",
    )
    args = parser.parse_args()
    if args.quick:
        args.repeats = min(args.repeats, 2)
    args.shape_pipelines |= args.pipelines_only
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    lanes = {"deit": deit_rows, "deit_energy": deit_energy_rows}
    unknown = [m for m in models if m not in (*CNNS, *lanes)]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; choose from {[*CNNS, *lanes]}")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="deploy_table_") as tmp:
        for key in models:
            start = time.perf_counter()
            folder = Path(tmp) / key
            folder.mkdir()
            try:
                model_rows = lanes[key](args, folder) if key in lanes else cnn_rows(key, args, folder)
            except Exception as err:  # one model's failure must not lose the others' rows
                print(f"[{key}: FAILED: {type(err).__name__}: {err}]", flush=True)
                continue
            print(f"[{key}: {time.perf_counter() - start:.0f} s]", flush=True)
            print_table(model_rows)
            rows += model_rows
    print("\nAll models:")
    print_table(rows)


if __name__ == "__main__":
    main()
