"""Command-line entry point: ``python cli.py validate --config configs/default.yaml``."""

from lit_mpq.cli import main

if __name__ == "__main__":
    main()
