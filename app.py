"""The clipdecomp demo (Gradio; the Hugging Face Space entry point).

    python app.py                                              # bundled toy model, offline
    python app.py --model ViT-B-16 --pretrained laion2b_s34b_b88k
    python app.py --port 7861 --share

Settings also come from the environment (for a Space): ``CLIPDECOMP_MODEL``,
``CLIPDECOMP_PRETRAINED``, ``CLIPDECOMP_TEXTSPAN`` (TextSpan results file of that model),
``CLIPDECOMP_DEMO_CACHE`` (cache folder), ``CLIPDECOMP_ALLOW_MODEL_SWITCH`` (1/0; off by
default on a Space), ``CLIPDECOMP_FOLDER_ROOT`` (server folders typed into the UI must lie
inside it). Command-line flags win over the environment. Input limits: see
:mod:`demo.limits`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

__all__ = ["build_parser", "config_from_args", "main"]


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python app.py",
        description="Interactive demo of clipdecomp: text heatmaps, head roles, retrieval by head, and "
                    "head-ablation repair of an OpenCLIP ViT (default: the bundled toy-world model, offline).",
        epilog=__doc__.split("\n\n", 2)[2].replace("``", "").replace(":mod:", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=os.environ.get("CLIPDECOMP_MODEL") or None,
                   help="open_clip ViT architecture ('ViT-B-16'), 'hf-hub:ORG/REPO' or 'local-dir:PATH' "
                        "(default: $CLIPDECOMP_MODEL, else the bundled toy model)")
    p.add_argument("--pretrained", default=os.environ.get("CLIPDECOMP_PRETRAINED") or None,
                   help="pretrained tag or weights file for --model (default: $CLIPDECOMP_PRETRAINED)")
    p.add_argument("--textspan", type=Path, default=os.environ.get("CLIPDECOMP_TEXTSPAN") or None,
                   help="TextSpan results FILE.json of this model (from `clipdecomp textspan`); the bundled model's "
                        "ship with the repository")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 to serve the network)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                   help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also serve through a temporary public gradio.live link")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="cache folder (default: $CLIPDECOMP_DEMO_CACHE, else ~/.cache/clipdecomp-demo)")
    switch = p.add_mutually_exclusive_group()
    switch.add_argument("--allow-model-switch", dest="allow_switch", action="store_true", default=None,
                        help="let visitors load another model from the UI (default: yes, except on a Space)")
    switch.add_argument("--no-model-switch", dest="allow_switch", action="store_false",
                        help="keep the model fixed")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return p


def config_from_args(args: argparse.Namespace):
    """The :class:`demo.state.DemoConfig` of parsed arguments."""
    from demo.state import DemoConfig

    allow = args.allow_switch
    if allow is None:
        allow = _env_flag("CLIPDECOMP_ALLOW_MODEL_SWITCH", default="SPACE_ID" not in os.environ)
    cfg = DemoConfig(model=args.model, pretrained=args.pretrained, textspan=args.textspan,
                     allow_model_switch=allow, device=args.device)
    if args.cache_dir is not None:
        cfg.cache_dir = args.cache_dir
    return cfg


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        print(f"error: --port must be in 1..65535, got {args.port}", file=sys.stderr)
        return 2
    from clipdecomp.errors import ClipDecompError
    from demo.state import DemoState
    from demo.ui import build_app, launch, warm_up

    state = DemoState(config_from_args(args))
    try:
        app = build_app(state)  # loads the model: a bad name fails here, before serving
    except ClipDecompError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warm_up(state)
    launch(app, host=args.host, port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
