"""The strict graph: quantized residual adds and a quantized output, for targets that quantize every activation.

:func:`~lit_mpq.quant.apply.quantize_model` quantizes the inputs of convolutions, Linear layers and attention
matmuls. A target that quantizes every activation (:mod:`lit_mpq.quant.targets`) also needs

- **every add of two activations** (``bn2(conv2(x)) + shortcut(x)`` in a ResNet block, ``x + attn(norm1(x))`` in a
  transformer block) to add quantized operands. Adds are Python operators inside a module's ``forward``, not
  modules, so :func:`quantize_adds` traces each module's own forward with ``torch.fx`` (every child a leaf, so the
  graph holds only the module's own code), and replaces the module by a ``GraphModule`` in which each such add calls
  a :class:`~lit_mpq.quant.operations.QuantAdd` child ``add_<i>``. The children, parameters and module names stay
  as they were (``layer1.0.conv1`` is still ``layer1.0.conv1``), so plans, checkpoints and overrides keep working.
  An add with a parameter or buffer operand (a ViT's ``x + pos_embed``) is not one: a constant added to a layer's
  output folds into that layer's integer accumulator, like a bias;
- **the network's output** quantized: :func:`quantize_output` registers a
  :class:`~lit_mpq.quant.operations.QuantOutput` as ``output_quantizer`` on the model and a forward hook that
  passes the output through it.

A module whose forward cannot be traced (data-dependent control flow) is named in a warning and keeps its adds in
float; an add of two activations in the model's own top-level forward is an error (the model object itself would
have to be replaced).
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, fx, nn

from lit_mpq.quant.attention import is_quant_attention
from lit_mpq.quant.modules import ActivationQuantizer, is_quant_layer
from lit_mpq.quant.operations import QuantAdd, QuantOperation, QuantOutput

__all__ = ["StrictGraphError", "activation_adds", "quantize_adds", "quantize_output"]

_ADDS = (operator.add, operator.iadd, torch.add)


class StrictGraphError(ValueError):
    """The model's graph cannot be made strict as asked."""


class _OwnForwardTracer(fx.Tracer):
    """Traces one module's own forward: every child module is a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:  # noqa: D102
        return True


def _is_activation(arg: object) -> bool:
    # A graph value that is not a parameter/buffer (get_attr) nor a plain Python constant.
    return isinstance(arg, fx.Node) and arg.op != "get_attr"


def activation_adds(graph: fx.Graph) -> list[fx.Node]:
    """The add nodes of ``graph`` whose two operands are both computed values (neither a constant nor an attribute).

    An operand that turns out to be a Python number at run time (``x.shape[0] + 1``) is left to
    :class:`~lit_mpq.quant.operations.QuantAdd`'s caller: see :func:`quantize_adds`.
    """
    return [
        node
        for node in graph.nodes
        if node.op == "call_function"
        and node.target in _ADDS
        and len(node.args) == 2
        and not node.kwargs
        and all(_is_activation(arg) for arg in node.args)
    ]


def _trace_own_forward(module: nn.Module) -> fx.Graph:
    return _OwnForwardTracer().trace(module)


def _skipped(module: nn.Module) -> bool:
    """Modules whose forward holds no add of ours to find: torch.nn's own, lit_mpq's quantized ones, graph modules."""
    origin = type(module).__module__
    return (
        isinstance(module, fx.GraphModule | QuantOperation)
        or is_quant_layer(module)
        or is_quant_attention(module)
        or origin.startswith("torch.")
        or origin.startswith("lit_mpq.quant.")
    )


class _PlainAdd(nn.Module):
    """What a :class:`QuantAdd` becomes when the forward only ever adds numbers with it: a plain ``a + b``."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:  # noqa: D102
        return a + b


def quantize_adds(model: nn.Module, make_quantizer: Callable[[], ActivationQuantizer]) -> list[str]:
    """Give every add of two activations inside ``model``'s submodules quantized operands (see the module docstring).

    Idempotent: a module already turned into a ``GraphModule`` is not traced again.

    Args:
        model: The model, after :func:`~lit_mpq.quant.apply.quantize_model`.
        make_quantizer: Makes one operand's quantizer (called twice per add).

    Returns:
        The names of the new :class:`~lit_mpq.quant.operations.QuantAdd` modules.

    Raises:
        StrictGraphError: If the model's own top-level forward adds two activations.
    """
    from lit_mpq.quant.apply import _replace

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    added: list[str] = []
    for name, module in list(model.named_modules()):
        if _skipped(module):
            continue
        try:
            graph = _trace_own_forward(module)
        except Exception as exc:  # noqa: BLE001 - any tracing failure means the same thing here
            warnings.warn(
                f"integer-only target: the forward of {name or 'the model'} ({type(module).__name__}) cannot be traced "
                f"with torch.fx ({type(exc).__name__}: {str(exc)[:160]}); any add of two activations in it stays in "
                "float",
                stacklevel=2,
            )
            continue
        adds = activation_adds(graph)
        if not adds:
            continue
        if not name:
            raise StrictGraphError(
                f"the model's own forward ({type(module).__name__}.forward) adds two activations "
                f"({', '.join(node.name for node in adds[:3])}); lit_mpq quantizes adds inside submodules only: move "
                "the add into a submodule, or use the 'lenient' target"
            )
        for index, node in enumerate(adds):
            child = f"add_{index}"
            if hasattr(module, child):
                raise StrictGraphError(f"{name} already has an attribute {child!r}; cannot add its quantized add")
            module.add_module(child, QuantAdd(make_quantizer(), make_quantizer()).to(device))
            with graph.inserting_before(node):
                replacement = graph.call_module(child, node.args)
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
            added.append(f"{name}.{child}")
        graph.lint()
        traced = fx.GraphModule(module, graph, class_name=type(module).__name__)
        traced.train(module.training)
        _replace(model, name, traced)
    return added


def drop_unused_adds(model: nn.Module, unused: set[str]) -> list[str]:
    """Turn the :class:`QuantAdd` modules named in ``unused`` into plain adds (never called with two tensors)."""
    from lit_mpq.quant.apply import _replace

    dropped = [name for name, m in model.named_modules() if isinstance(m, QuantAdd) and name in unused]
    for name in dropped:
        _replace(model, name, _PlainAdd())
    return dropped


def _quantize_output_hook(module: nn.Module, args: tuple, output: object) -> object:
    """Forward hook of the model: its output through ``module.output_quantizer`` (tensors in a tuple each)."""
    quantizer = module.output_quantizer
    if isinstance(output, Tensor):
        return quantizer(output)
    if isinstance(output, tuple | list) and all(isinstance(item, Tensor) for item in output):
        return type(output)(quantizer(item) for item in output)
    return output


def quantize_output(model: nn.Module, make_quantizer: Callable[[], ActivationQuantizer]) -> str:
    """Quantize ``model``'s output: an ``output_quantizer`` child and a forward hook (idempotent).

    Returns:
        ``"output_quantizer"``, the row's name.
    """
    if not isinstance(getattr(model, "output_quantizer", None), QuantOutput):
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        model.output_quantizer = QuantOutput(make_quantizer()).to(device)
    if _quantize_output_hook not in model._forward_hooks.values():
        model.register_forward_hook(_quantize_output_hook)
    return "output_quantizer"
