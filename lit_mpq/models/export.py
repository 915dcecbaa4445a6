"""Export a Lightning checkpoint's backbone weights as a plain state_dict.

``python -m lit_mpq.models.export logs/digits_fit/version_0/checkpoints/last.ckpt lit_mpq/assets/digits_cnn.pt``
is how the embedded default's checkpoint is produced from ``python cli.py fit --config configs/digits_fit.yaml``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

BACKBONE_PREFIX = "model."


def export_backbone(checkpoint: str | Path, output: str | Path) -> Path:
    """Write the ``model.*`` tensors of a Lightning checkpoint, prefix stripped, to ``output``.

    Raises:
        FileNotFoundError: If ``checkpoint`` does not exist.
        ValueError: If it holds no backbone weights.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} does not exist")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
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
    print(export_backbone(args.checkpoint, args.output))


if __name__ == "__main__":
    main()
