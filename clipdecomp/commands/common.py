"""Arguments every command shares: which model to load, and where."""

from __future__ import annotations

import argparse
from typing import Any, Union

ArgumentTarget = Union[argparse.ArgumentParser, "argparse._ArgumentGroup"]


def add_model_arguments(p: ArgumentTarget) -> None:
    """``--model``, ``--pretrained``, ``--device`` (a parser or an argument group)."""
    p.add_argument("--model", default=None,
                   help="open_clip architecture, 'hf-hub:ORG/REPO' or 'local-dir:PATH' (default: the bundled toy model)")
    p.add_argument("--pretrained", default=None, help="pretrained tag or weights file for --model")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def load_from_args(args: argparse.Namespace) -> Any:
    """``load_model(args.model, args.pretrained, device=args.device)``."""
    from ..loading import load_model

    return load_model(args.model, args.pretrained, device=args.device)
