"""Export a Lightning checkpoint's backbone weights as a plain state_dict.

``python -m lit_mpq.models.export logs/digits_fit/version_0/checkpoints/last.ckpt lit_mpq/assets/digits_cnn.pt``
is how the embedded default's checkpoint is produced from ``python cli.py fit --config configs/digits_fit.yaml``.
The checkpoint is read with ``torch.load(weights_only=True)`` (see :func:`lit_mpq.models.factory.load_weights_file`):
a file whose unpickling could run code is refused.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import torch

from lit_mpq.models.factory import load_weights_file

__all__ = ["BACKBONE_PREFIX", "export_backbone", "main"]

BACKBONE_PREFIX = "model."
"""Prefix of the backbone's tensors in an ``MPQModule`` checkpoint (the module stores it as ``self.model``)."""


def export_backbone(checkpoint: str | Path, output: str | Path) -> Path:
    """Write the ``model.*`` tensors of a Lightning checkpoint, prefix stripped, to ``output``.

    Args:
        checkpoint: A Lightning checkpoint written by ``python cli.py fit``.
        output: Where to write the plain state_dict (parent folders are created).

    Returns:
        ``output`` as a ``Path``.

    Raises:
        FileNotFoundError: If ``checkpoint`` does not exist.
        ValueError: If it cannot be read weights-only, or holds no backbone weights.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} does not exist")
    content = load_weights_file(checkpoint)
    state = content.get("state_dict") if isinstance(content, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"{str(checkpoint)!r} has no 'state_dict' entry: is it a Lightning checkpoint?")
    weights = {k[len(BACKBONE_PREFIX) :]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    if not weights:
        raise ValueError(f"{str(checkpoint)!r} has no '{BACKBONE_PREFIX}*' tensors: is it an MPQModule checkpoint?")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(weights, output)
    return output


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="Lightning checkpoint written by `python cli.py fit`")
    parser.add_argument("output", help="where to write the plain state_dict (.pt)")
    args = parser.parse_args()
    try:
        print(export_backbone(args.checkpoint, args.output))
    except (FileNotFoundError, ValueError) as exc:  # a user's file: the message says what to do, no traceback
        parser.exit(1, f"error: {exc}\n")


if __name__ == "__main__":
    main()
