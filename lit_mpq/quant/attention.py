"""Quantized attention: the two matmuls of self-attention (q·kᵀ and softmax·V) as quantizable layers.

A vision transformer's ``Linear`` layers are quantized like any other layer, but its attention also multiplies two
activations twice per head: the scores ``q·kᵀ`` and the mixing ``softmax(scores)·V``, 14 % of DeiT-Tiny's MACs.
An integer accelerator runs both on quantized operands, so lit_mpq quantizes and costs them too:

- :class:`QuantMatmul` is one product ``a @ b`` of two activations with a quantizer on each operand. It is a row of
  the plan (``kind="matmul"``): ``a_bits`` is the left operand's width (q, or the softmax output), ``w_bits`` the
  right operand's (k or v: the stationary operand, in the role a weight has in a Linear). Its MACs, operand sizes,
  energy and sensitivities are measured like a layer's.
- :func:`quant_attention_class` gives timm's ``Attention`` (ViT, DeiT, and every timm model built on it) a twin
  whose forward runs q·kᵀ and softmax·V through two such children, ``matmul_qk`` and ``matmul_av``.

timm computes attention either with the fused ``F.scaled_dot_product_attention`` or step by step (its
``fused_attn`` flag). The twin keeps the fused kernel whenever it can give the same result: when q, k and v are
quantized (or not) and the softmax output is not. Quantizing, observing or probing the softmax output needs it as a
tensor, so then, and whenever a hook is attached to a matmul (tracing and probing attach them), the twin runs the
steps. The query is quantized before it is multiplied by ``head_dim ** -0.5``: the scale folds into q's quantization
scale on hardware, and the fused kernel applies it internally, so both paths quantize the same tensor.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lit_mpq.quant.modules import ActivationQuantizer, _rebuild
from lit_mpq.quant.operations import QuantOperation


class QuantMatmul(QuantOperation):
    """``a @ b`` with both operands fake-quantized: one attention matmul, one row of the plan.

    Args:
        input_quantizer: Quantizer of the left operand ``a`` (the plan's ``a_bits``).
        other_quantizer: Quantizer of the right operand ``b`` (the plan's ``w_bits``).
        input_scale: A constant the quantized left operand is multiplied by before the product (the attention scale
            ``head_dim ** -0.5`` for q·kᵀ), or None.
    """

    kind = "matmul"

    def __init__(
        self, input_quantizer: ActivationQuantizer, other_quantizer: ActivationQuantizer, input_scale: float | None
    ) -> None:
        super().__init__()
        self.input_quantizer = input_quantizer
        self.other_quantizer = other_quantizer
        self.input_scale = input_scale

    def product(self, a: Tensor, b: Tensor) -> Tensor:
        """The float product of operands as the layer sees them (after quantization): ``(a · input_scale) @ b``.

        Linear in each operand, so the probes compute output errors as the product of a perturbation alone.
        """
        if self.input_scale is not None:
            a = a * self.input_scale
        return a @ b

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """Quantize both operands as the quantizers' modes say, then multiply."""
        return self.product(self.input_quantizer(a), self.other_quantizer(b))

    def operand_error(self, kind: str, delta: Tensor, operands: tuple[Tensor, ...]) -> Tensor:
        """The product is linear in each operand: the output changes by the product with the operand's change."""
        a, b = operands
        return self.product(delta, b) if kind == "a" else self.product(a, delta)

    def extra_repr(self) -> str:  # noqa: D102
        return f"input_scale={self.input_scale}" if self.input_scale is not None else ""


def _is_hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


class _QuantAttentionForward:
    """timm ``Attention.forward`` (timm 1.0) with its two matmuls through :class:`QuantMatmul` children."""

    float_class: ClassVar[type[nn.Module]]
    matmul_qk: QuantMatmul
    matmul_av: QuantMatmul

    def _fused_ok(self) -> bool:
        probs = self.matmul_av.input_quantizer
        probs_untouched = probs.mode == "off" or (probs.mode == "quant" and probs.bits is None)
        return self.fused_attn and probs_untouched and not (_is_hooked(self.matmul_qk) or _is_hooked(self.matmul_av))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """Self-attention with quantized q, k, v and softmax output (see the module docstring for the two paths)."""
        from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

        B, N, C = x.shape  # noqa: N806 - timm's names
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)

        if self._fused_ok():
            q = self.matmul_qk.input_quantizer(q)
            k = self.matmul_qk.other_quantizer(k)
            v = self.matmul_av.other_quantizer(v)
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0, is_causal=is_causal
            )
        else:
            attn = self.matmul_qk(q, k.transpose(-2, -1))
            attn_bias = resolve_self_attn_mask(N, attn, attn_mask, is_causal)
            attn = maybe_add_mask(attn, attn_bias)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = self.matmul_av(attn, v)

        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        x = self.proj_drop(x)
        return x

    def to_float(self) -> nn.Module:
        """The float attention again: an instance of :attr:`float_class` sharing this one's modules, no matmuls."""
        return _rebuild(self, self.float_class, drop=("matmul_qk", "matmul_av"))

    def __reduce_ex__(self, protocol: Any) -> tuple:
        # The twin is made at run time: pickle (and deepcopy) rebuild it from the float class, as for quant layers.
        return _new_quant_attention, (self.float_class,), self.__getstate__()


@functools.cache
def supported_attention_classes() -> tuple[type[nn.Module], ...]:
    """Attention classes whose forward :class:`_QuantAttentionForward` reproduces (timm's ``Attention``)."""
    try:
        from timm.layers.attention import Attention
    except ImportError:  # pragma: no cover - timm is a dependency of lit_mpq, not of this package
        return ()
    return (Attention,)


def _forward_owner(cls: type) -> type:
    return next(klass for klass in cls.__mro__ if "forward" in vars(klass))


def is_supported_attention(module: nn.Module) -> bool:
    """Whether ``module`` is a float attention whose matmuls lit_mpq can quantize (its own forward is timm's)."""
    if isinstance(module, _QuantAttentionForward):
        return False
    return _forward_owner(type(module)) in supported_attention_classes()


def is_quant_attention(module: nn.Module) -> bool:
    """Whether ``module`` is an attention twin made by :func:`quantize_attention`."""
    return isinstance(module, _QuantAttentionForward)


_TWINS: dict[type[nn.Module], type] = {}


def quant_attention_class(float_cls: type[nn.Module]) -> type:
    """The twin of an attention class: the quantized forward first, then ``float_cls`` (so isinstance still holds)."""
    if float_cls not in _TWINS:
        _TWINS[float_cls] = type(
            f"Quant{float_cls.__name__}",
            (_QuantAttentionForward, float_cls),
            {
                "__module__": __name__,
                "__doc__": f"``{float_cls.__module__}.{float_cls.__qualname__}`` with quantized matmuls.",
                "float_class": float_cls,
            },
        )
    return _TWINS[float_cls]


def _new_quant_attention(float_cls: type[nn.Module]) -> nn.Module:
    cls = quant_attention_class(float_cls)
    return cls.__new__(cls)


def quantize_attention(attention: nn.Module, make_quantizer, make_softmax_quantizer) -> nn.Module:
    """The twin of a timm ``Attention`` with quantizers on q, k, v and the softmax output (modules shared).

    Args:
        attention: A module for which :func:`is_supported_attention` holds.
        make_quantizer: Makes the quantizer of q, k and v (called three times).
        make_softmax_quantizer: Makes the quantizer of the softmax output.
    """
    twin = _rebuild(attention, quant_attention_class(type(attention)))
    device = attention.qkv.weight.device
    twin.matmul_qk = QuantMatmul(make_quantizer(), make_quantizer(), input_scale=attention.scale).to(device)
    twin.matmul_av = QuantMatmul(make_softmax_quantizer(), make_quantizer(), input_scale=None).to(device)
    # Children in execution order (qkv, the two matmuls, proj), so that the plan lists the rows as they run.
    children = twin._modules
    order = [key for key in children if key not in ("matmul_qk", "matmul_av")]
    at = order.index("proj") if "proj" in order else len(order)
    order[at:at] = ["matmul_qk", "matmul_av"]
    twin._modules = type(children)((key, children[key]) for key in order)
    return twin


def is_quant_matmul(module: nn.Module) -> bool:
    """Whether ``module`` is a :class:`QuantMatmul`."""
    return isinstance(module, QuantMatmul)
