"""clipdecomp heatmap: where in an image does each text's score come from?

    clipdecomp heatmap --image cat.png --text "a red circle" --text "a blue square" --out maps.png
    clipdecomp heatmap --model ViT-B-16 --pretrained laion2b_s34b_b88k --image cat.jpg \\
        --text "a cat" --text "a dog" --relative --layers last4 --out cat-vs-dog.png

One forward pass decomposes the image; for every --text the map is the per-patch direct
contribution (summed over all heads of --layers; class token excluded) read along the text
embedding, upsampled bilinearly over the model's input crop. The PNG shows the input crop,
then one overlay per text (--normalize: minus the mean map of all the texts, the paper's
normalisation), or, with --relative and two texts, the single signed map text1 - text2.
Written atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from ..errors import ClipDecompError, InputError
from .common import add_model_arguments, load_from_args

__all__ = ["add_model_arguments", "load_from_args", "parse_layers", "model_input", "build_parser", "main"]


# ----------------------------------------------------------------------------- shared helpers


def parse_layers(spec: str, n_layers: int) -> Union[str, list[int]]:
    """``'all'`` -> ``'all'``; ``'lastN'`` -> the last N layers; ``'1,2,-1'`` -> absolute indices.

    Negative indices count from the end (write ``--layers=-2,-1`` on the command line).
    """
    s = spec.strip().lower()
    if s == "all":
        return "all"
    if s.startswith("last"):
        try:
            k = int(s[4:])
        except ValueError:
            k = 0
        if not 1 <= k <= n_layers:
            raise InputError(f"--layers {spec!r}: lastN needs 1 <= N <= {n_layers}.")
        return list(range(n_layers - k, n_layers))
    try:
        idx = [int(t) for t in s.split(",") if t.strip()]
    except ValueError:
        idx = []
    if not idx or any(not -n_layers <= i < n_layers for i in idx):
        raise InputError(
            f"--layers {spec!r}: expected 'all', 'lastN' or comma-separated layer indices in "
            f"[-{n_layers}, {n_layers}) for this {n_layers}-layer model."
        )
    return sorted({i % n_layers for i in idx})


def model_input(lm: Any, path: Union[str, Path]) -> tuple[torch.Tensor, Any]:
    """Read an image file; return the preprocessed ``[1, 3, H, W]`` tensor and the RGB PIL
    image the model actually sees (the tensor with the normalisation undone)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            pil = im.convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise InputError(f"cannot read image {path}: {e}") from e
    x = lm.preprocess(pil)
    cfg = getattr(lm.visual, "preprocess_cfg", {}) or {}
    mean = torch.tensor(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))).view(3, 1, 1)
    std = torch.tensor(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))).view(3, 1, 1)
    shown = ((x.float() * std + mean).clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    return x[None].to(lm.device, lm.dtype), Image.fromarray(shown, "RGB")


# ----------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipdecomp heatmap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--image", type=Path, required=True, help="image file")
    p.add_argument("--text", action="append", required=True, help="a text (repeat for several)")
    p.add_argument("--layers", default="all", help="'all' (default), 'lastN' or comma-separated indices")
    p.add_argument("--relative", action="store_true", help="with exactly two texts: one signed map, text1 - text2")
    p.add_argument("--normalize", action="store_true", help="subtract the mean map of all the texts (needs >= 2)")
    p.add_argument("--cmap", default=None, help="matplotlib colormap (default: jet; RdBu_r for signed maps)")
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity in [0, 1]")
    p.add_argument("--colorbar", action="store_true", help="add a colour bar to each overlay")
    p.add_argument("--out", type=Path, required=True, help="output PNG")
    return p


def render_heatmaps(
    lm: Any,
    image: Union[str, Path],
    texts: Sequence[str],
    *,
    layers: Union[str, list[int]] = "all",
    relative: bool = False,
    normalize: bool = False,
    cmap: Optional[str] = None,
    alpha: float = 0.5,
    colorbar: bool = False,
):
    """The command's figure as a PIL image (input crop + one overlay per map)."""
    from ..decomposition import decompose
    from ..heatmaps import relative_heatmap, text_heatmaps
    from ..overlay import image_grid, render_overlay
    from ..zeroshot import text_embeddings

    texts = list(texts)
    if relative and len(texts) != 2:
        raise InputError(f"--relative needs exactly two --text, got {len(texts)}.")
    if normalize and len(texts) < 2:
        raise InputError("--normalize needs at least two --text (it subtracts their mean map).")
    x, shown = model_input(lm, image)
    dec = decompose(lm, x, token_layers=layers)
    emb = text_embeddings(lm, texts)
    signed = relative or normalize
    if relative:
        maps = relative_heatmap(dec, emb[0], emb[1])[:, None]  # [1, 1, gh, gw]
        captions = [f"{texts[0]} - {texts[1]}"]
    else:
        maps = text_heatmaps(dec, emb, normalizer=emb if normalize else None)  # [1, T, gh, gw]
        captions = texts
    cm = cmap or ("RdBu_r" if signed else "jet")
    panels = [shown] + [
        render_overlay(shown, maps[0, i], cmap=cm, alpha=alpha, symmetric=signed, colorbar=colorbar)
        for i in range(maps.shape[1])
    ]
    cell = max(192, shown.width)
    if colorbar:  # overlays are wider than the crop: keep their aspect by padding, not squashing
        return _row(panels, ["input"] + captions, cell)
    return image_grid(panels, ncols=len(panels), captions=["input"] + captions, cell=cell)


def _row(panels: list, captions: list[str], height: int):
    from PIL import Image, ImageDraw

    scaled = [p.resize((round(p.width * height / p.height), height), Image.BICUBIC) for p in panels]
    W = sum(p.width for p in scaled) + 4 * (len(scaled) + 1)
    canvas = Image.new("RGB", (W, height + 22), "white")
    draw = ImageDraw.Draw(canvas)
    x = 4
    for p, c in zip(scaled, captions):
        canvas.paste(p, (x, 4))
        draw.text((x, height + 6), c[: max(4, p.width // 6)], fill=(0, 0, 0))
        x += p.width + 4
    return canvas


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from ..overlay import save_png

        if args.out.suffix.lower() != ".png":
            raise InputError(f"--out must name a .png file, got {args.out}.")
        lm = load_from_args(args)
        layers = parse_layers(args.layers, len(lm.visual.transformer.resblocks))
        figure = render_heatmaps(
            lm, args.image, args.text, layers=layers, relative=args.relative, normalize=args.normalize,
            cmap=args.cmap, alpha=args.alpha, colorbar=args.colorbar,
        )
        save_png(figure, args.out)
    except ClipDecompError as e:
        print(f"clipdecomp heatmap: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
