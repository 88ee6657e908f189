"""The ``driffusion`` command (``driffusion.cli.main``): every subcommand's flags in one home."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
