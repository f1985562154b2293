"""Zero-shot accuracy of a model on held-out toy-world scenes, factor by factor.

    python -m clipdecomp.toyworld.evaluate            # the bundled model
    python -m clipdecomp.toyworld.evaluate --model local-dir:runs/toyclip --n 1000
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from ..commands.common import add_model_arguments, load_from_args
from ..errors import ClipDecompError
from ..zeroshot import prompt_set_classifier
from .batches import to_tensor
from .captions import zero_shot_prompts
from .world import FACTORS, render, sample_scene

EVAL_SEED = 20240501
FACTOR_BARS = {"colour": 0.90, "shape": 0.90, "region": 0.90, "background": 0.90, "count": 0.75, "texture": 0.0}


def heldout_scenes(n: int, seed: int = EVAL_SEED, spurious: float | None = None) -> list:
    """`n` held-out scenes, every factor drawn independently (no spurious cue) unless asked."""
    rng = np.random.default_rng([seed, 1])
    return [sample_scene(rng, spurious=spurious) for _ in range(n)]


@torch.no_grad()
def encode_scenes(model, scenes: list, batch_size: int = 256) -> torch.Tensor:
    """Unit-normalised image embeddings `[N, D]` of rendered scenes."""
    cfg = model.visual.preprocess_cfg
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out = []
    for i in range(0, len(scenes), batch_size):
        images = [render(s)[0] for s in scenes[i : i + batch_size]]
        x = to_tensor(images, cfg["mean"], cfg["std"]).to(device, dtype)
        out.append(model.encode_image(x, normalize=True))
    return torch.cat(out)


def zero_shot_factor_accuracy(model, tokenizer, scenes: list, image_emb: torch.Tensor | None = None) -> dict[str, float]:
    """Accuracy of zero-shot prediction of every factor over `scenes`."""
    image_emb = encode_scenes(model, scenes) if image_emb is None else image_emb
    result = {}
    for factor in FACTORS:
        prompts = zero_shot_prompts(factor)
        values, emb = list(prompts), prompt_set_classifier(model, prompts, tokenizer=tokenizer)
        pred = (image_emb @ emb.T).argmax(-1)
        truth = torch.tensor([values.index(getattr(s, factor)) for s in scenes])
        result[factor] = float((pred.cpu() == truth).float().mean())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--n", type=int, default=1000, help="number of held-out scenes (default 1000)")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="seed of the held-out scenes")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")
    try:
        loaded = load_from_args(args)
    except ClipDecompError as e:
        print(f"clipdecomp toyworld eval: error: {e}", file=sys.stderr)
        return 2
    acc = zero_shot_factor_accuracy(loaded.clip, loaded.tokenizer, heldout_scenes(args.n, args.seed))
    if args.json:
        print(json.dumps(acc, indent=2))
    else:
        print(f"zero-shot accuracy on {args.n} held-out toy scenes (seed {args.seed}):")
        for factor, value in acc.items():
            print(f"  {factor:<11} {value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
