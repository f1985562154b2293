"""clipdecomp retrieve: nearest images by chosen heads, next to ordinary CLIP retrieval.

    clipdecomp retrieve --gallery DIR --query IMAGE --head 5.2 --k 8 --out runs/ret
    clipdecomp retrieve --evaluate-factor colour --out runs/ret-colour          # toy world only
    clipdecomp retrieve --evaluate-factor colour --roles textspan.json --out runs/ret-colour

Retrieval: every image under --gallery (recursive) is decomposed once (cached in
OUT/gallery.safetensors, or --cache FILE, reused when the file list, model and layers
match); the query is represented by the sum of the --head contributions (LAYER.HEAD,
repeatable) and by its full embedding; neighbours by cosine similarity (--center: minus the
gallery mean first). Writes OUT/grid.png (row 1: query + neighbours by the heads; row 2:
query + neighbours by the full embedding) and OUT/neighbours.csv.

--evaluate-factor FACTOR (colour, shape, texture, region, count, background): draws toy-world
scenes with known factors, a probe set (--probe-n) and an evaluation set (--eval-n) from
different seeds; picks the head for FACTOR (--head, else the role from --roles via
clipdecomp.roles.heads_for_role, else the head whose contributions a ridge linear probe on the
probe set predicts FACTOR best); then reports leave-one-out precision@k of "same FACTOR" on
the evaluation set for that head and for the full embedding. Writes
OUT/factor_precision.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import ClipDecompError, InputError
from ..retrieval import Contributions, factor_precision_at_k, gallery_contributions, nearest, parse_head, probe_accuracy
from .common import add_model_arguments, load_from_args
from .heatmap import model_input, parse_layers

__all__ = ["build_parser", "main", "retrieve", "toy_scenes", "evaluate_factor"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipdecomp retrieve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--gallery", type=Path, help="folder of gallery images (recursive)")
    p.add_argument("--query", type=Path, help="query image")
    p.add_argument("--head", action="append", default=[], help="LAYER.HEAD, e.g. 5.2 (repeat to sum several heads)")
    p.add_argument("--k", type=int, default=8, help="neighbours per query / precision@k")
    p.add_argument("--layers", default="all", help="layers whose heads are cached: 'all', 'lastN' or indices")
    p.add_argument("--center", action="store_true", help="subtract the gallery mean before cosine similarity")
    p.add_argument("--cache", type=Path, default=None, help="gallery cache file (default OUT/gallery.safetensors)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--evaluate-factor", default=None, help="toy world: measure precision@k of a factor instead")
    p.add_argument("--roles", type=Path, default=None, help="TextSpan results JSON: pick the head by role")
    p.add_argument("--eval-n", type=int, default=600, help="toy scenes in the evaluation set")
    p.add_argument("--probe-n", type=int, default=600, help="toy scenes for the linear-probe head choice")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# ----------------------------------------------------------------------------- retrieval


def _gallery(lm: Any, folder: Path, layers: Any, cache: Path, batch_size: int, progress: bool) -> Contributions:
    from ..images import image_loader, list_image_files

    files = [str(f) for f in list_image_files(folder)]
    if cache.is_file():
        try:
            c = Contributions.load(cache)
            want = tuple(range(len(lm.visual.transformer.resblocks))) if layers == "all" else tuple(layers)
            if c.files == files and c.model == lm.name and c.layers == want:
                return c
        except ClipDecompError:
            pass  # stale or foreign file: recompute and replace
    loader = image_loader(folder, lm.preprocess, batch_size)
    c = gallery_contributions(lm, loader, layers=layers, total=len(files), files=files, progress=progress)
    c.save(cache)
    return c


def retrieve(lm: Any, gallery: Contributions, query_image: Path, heads: Sequence[tuple[int, int]], k: int,
             center: bool) -> dict[str, Any]:
    """Neighbours of one query by the heads and by the full embedding."""
    x, shown = model_input(lm, query_image)
    q = gallery_contributions(lm, [x], layers=list(gallery.layers), progress=False)
    out: dict[str, Any] = {"query": shown}
    for name, sel in (("heads", list(heads)), ("full", None)):
        idx, scores = nearest(q, gallery, sel, k, center=center)
        out[name] = list(zip(idx[0].tolist(), scores[0].tolist()))
    return out


def _write_retrieval(res: dict[str, Any], gallery: Contributions, heads: Sequence[tuple[int, int]], out: Path) -> None:
    from PIL import Image

    from ..io import atomic_write_text
    from ..overlay import image_grid, save_png

    label = "+".join(f"L{l}.H{h}" for l, h in heads)
    images, captions = [], []
    rows = []
    for name, title in (("heads", label), ("full", "full embedding")):
        images.append(res["query"])
        captions.append(f"query | {title}")
        for rank, (i, s) in enumerate(res[name], 1):
            with Image.open(gallery.files[i]) as im:
                images.append(im.convert("RGB"))
            captions.append(f"{rank}: {s:.3f}")
            rows.append([title, rank, gallery.files[i], f"{s:.6f}"])
    k = len(res["heads"])
    save_png(image_grid(images, ncols=k + 1, captions=captions, cell=max(96, res["query"].width)), out / "grid.png")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["representation", "rank", "file", "cosine"])
    w.writerows(rows)
    atomic_write_text(out / "neighbours.csv", buf.getvalue())


# ----------------------------------------------------------------------------- toy factor evaluation


def toy_scenes(lm: Any, n: int, seed: int) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """``n`` preprocessed toy-world scenes (every factor uniform) ``[n, 3, H, W]`` and their factors."""
    from ..toyworld.world import render, sample_scene

    rng = np.random.default_rng([seed, 505])
    images, factors = [], []
    for _ in range(n):
        scene = sample_scene(rng, spurious=None)
        images.append(lm.preprocess(render(scene)[0]))
        factors.append(scene.factors())
    return torch.stack(images).to(lm.device, lm.dtype), factors


def _role_heads(path: Path, factor: str) -> list[tuple[int, int]]:
    from ..roles import heads_for_role
    from ..textspan_results import TextSpanResults

    match = heads_for_role(TextSpanResults.load(path), factor, top_n=1)
    return [(match[0].layer, match[0].head)]


def evaluate_factor(
    lm: Any,
    factor: str,
    *,
    heads: Optional[Sequence[tuple[int, int]]] = None,
    roles: Optional[Path] = None,
    n_eval: int = 600,
    n_probe: int = 600,
    k: int = 8,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Precision@k of "same ``factor``" for a head versus the full embedding on toy scenes."""
    from ..toyworld.world import FACTORS

    if factor not in FACTORS:
        raise InputError(f"--evaluate-factor {factor!r}: accepted toy-world factors are {', '.join(FACTORS)}.")

    def contribs(n: int, s: int) -> tuple[Contributions, list[Any]]:
        x, f = toy_scenes(lm, n, s)
        c = gallery_contributions(lm, x.split(batch_size), total=n, progress=progress)
        return c, [d[factor] for d in f]

    ev, y_ev = contribs(n_eval, seed)
    how = "given (--head)"
    probe = None
    if not heads:
        if roles is not None:
            heads, how = _role_heads(roles, factor), f"TextSpan role from {roles}"
        else:
            pr, y_pr = contribs(n_probe, seed + 1)
            m = n_probe // 2  # probe fit on one half, scored on the other: the eval set stays unseen
            probe = probe_accuracy(pr.heads[:m], y_pr[:m], pr.heads[m:], y_pr[m:])  # [L, H]
            l, h = divmod(int(probe.argmax()), probe.shape[1])
            heads, how = [(pr.layers[l], h)], f"best ridge linear probe on {n_probe} separate scenes (fit {m}, scored {n_probe - m})"
    heads = list(heads)
    result: dict[str, Any] = {
        "factor": factor, "heads": [f"L{l}.H{h}" for l, h in heads], "head_choice": how, "k": k,
        "n_eval": n_eval, "chance": _chance(y_ev),
        "precision": {},
    }
    for center in (False, True):
        tag = "centred" if center else "raw"
        result["precision"][f"heads ({tag})"] = factor_precision_at_k(ev.features(heads), y_ev, k, center=center)
        result["precision"][f"full embedding ({tag})"] = factor_precision_at_k(ev.features(None), y_ev, k, center=center)
    if probe is not None:
        top = torch.argsort(probe.flatten(), descending=True)[:5].tolist()
        result["probe_top5"] = {f"L{ev.layers[i // probe.shape[1]]}.H{i % probe.shape[1]}": float(probe.flatten()[i]) for i in top}
    return result


def _chance(labels: Sequence[Any]) -> float:
    """Expected leave-one-out precision of random neighbours: P(another image shares the label)."""
    from collections import Counter

    n = len(labels)
    return sum(c * (c - 1) for c in Counter(labels).values()) / (n * (n - 1))


def factor_markdown(r: dict[str, Any]) -> str:
    lines = [
        f"Precision@{r['k']} of same {r['factor']} (leave-one-out, {r['n_eval']} toy scenes; chance {r['chance']:.3f})",
        f"heads {', '.join(r['heads'])}: {r['head_choice']}",
        "",
        "| representation | precision@k |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {v:.3f} |" for name, v in r["precision"].items()]
    if "probe_top5" in r:
        lines += ["", "probe accuracy (top 5 heads): " + ", ".join(f"{h} {a:.3f}" for h, a in r["probe_top5"].items())]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from ..io import atomic_write_text

        if args.k < 1 or args.batch_size < 1:
            raise InputError(f"--k and --batch-size must be >= 1, got {args.k} and {args.batch_size}.")
        heads = [parse_head(h) for h in args.head]
        lm = load_from_args(args)
        L = len(lm.visual.transformer.resblocks)
        H = lm.visual.transformer.resblocks[0].attn.num_heads
        heads = [(l % L if -L <= l < L else l, h) for l, h in heads]
        bad = [f"{l}.{h}" for l, h in heads if not (0 <= l < L and 0 <= h < H)]
        if bad:
            raise InputError(f"--head {bad[0]} is out of range: this model has {L} layers x {H} heads.")
        if args.evaluate_factor:
            r = evaluate_factor(lm, args.evaluate_factor, heads=heads, roles=args.roles, n_eval=args.eval_n,
                                n_probe=args.probe_n, k=args.k, seed=args.seed, batch_size=args.batch_size,
                                progress=not args.quiet)
            atomic_write_text(args.out / "factor_precision.json", json.dumps(r, indent=2) + "\n")
            atomic_write_text(args.out / "factor_precision.md", factor_markdown(r))
            print(factor_markdown(r), end="")
            return 0
        if args.gallery is None or args.query is None or not heads:
            raise InputError("retrieval needs --gallery DIR, --query IMAGE and at least one --head L.H "
                             "(or use --evaluate-factor FACTOR).")
        layers = parse_layers(args.layers, L)
        if layers != "all" and any(l not in layers for l, _ in heads):
            raise InputError(f"--head layers {[l for l, _ in heads]} must be within --layers {layers}.")
        cache = args.cache or args.out / "gallery.safetensors"
        gallery = _gallery(lm, args.gallery, layers, cache, args.batch_size, not args.quiet)
        if args.k > len(gallery):
            raise InputError(f"--k {args.k} is larger than the gallery ({len(gallery)} images).")
        res = retrieve(lm, gallery, args.query, heads, args.k, args.center)
        _write_retrieval(res, gallery, heads, args.out)
    except ClipDecompError as e:
        print(f"clipdecomp retrieve: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out / 'grid.png'} and {args.out / 'neighbours.csv'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
