"""Train the toy-world CLIP: a stock open_clip model, contrastively, on generated scenes.

    python -m clipdecomp.toyworld.train --out runs/toyclip            # the bundled model's recipe
    python -m clipdecomp.toyworld.train --out /tmp/smoke --steps 3 --batch-size 16 --eval-n 32

The recipe in brief: 2-D sin-cos positions in the image tower (so that where an
object is reaches the class token at first order from the start), batches of
hard-negative groups (`batches.py`), and a text tower locked at its random
initialisation for the first 1,200 steps, so that the image tower learns to
separate what the random text features already separate before the text tower
is free to collapse it (`text_parameters`). The loss also (`--direct-penalty`, 0 turns it off)
penalises the share of the embedding written directly by the MLPs, the embedding term
and the attention layers before the last `--late-layers`, so that, as in real CLIP, the
late attention heads carry the representation (`direct_paths.py`). The training log
records that share (`direct_share`) either way.

Deterministic by seed: batch k is a pure function of (seed, k), and the model's
initialisation is seeded. An interrupted run resumes from `train_state.pt` in
the output folder. The result is written in open_clip's hub layout
(`open_clip_config.json` + `open_clip_model.safetensors`), so
`open_clip.create_model_and_transforms("local-dir:OUT")` loads it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..io import atomic_write_text, atomic_path
from ..registry import TOY_MODEL_NAME, register_model_configs
from .batches import FOCUS_PROBS, to_tensor, training_batch
from .direct_paths import ClassTokenWrites, direct_share_of_model
from .evaluate import heldout_scenes, zero_shot_factor_accuracy

STATE_FILE = "train_state.pt"


def build_model(seed: int, config: str = TOY_MODEL_NAME) -> torch.nn.Module:
    register_model_configs()
    torch.manual_seed(seed)
    return open_clip.create_model(config)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on gains, biases, embeddings and the logit scale (open_clip's rule)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def text_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The text tower's parameters (everything but `visual.*` and the logit scale).

    Locking them for the first steps of training keeps the captions' random initial
    embeddings apart. Left free, factors that the image tower cannot yet tell apart
    at initialisation (region, which reaches the class token only through position)
    collapse on the text side within ~20 steps: identical text embeddings for
    "in the top left" and "in the top right" are the quickest way to the chance-level
    loss, and from there the contrastive gradient on either side is zero
    (docs/toyworld-training.md).
    """
    return [p for name, p in model.named_parameters() if not name.startswith("visual.") and name != "logit_scale"]


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base_lr * (1 + math.cos(math.pi * progress))


def export_hub_folder(
    model: torch.nn.Module, out: Path, half: bool = True, metadata: dict[str, str] | None = None, config_name: str = TOY_MODEL_NAME
) -> None:
    """Write `open_clip_config.json` + `open_clip_model.safetensors` (atomically, file by file)."""
    register_model_configs()
    config = {
        "model_cfg": open_clip.get_model_config(config_name),
        "preprocess_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in model.visual.preprocess_cfg.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "open_clip_config.json", json.dumps(config, indent=2) + "\n")
    dtype = torch.float16 if half else torch.float32
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / "open_clip_model.safetensors") as tmp:
        save_file(state, str(tmp), metadata=metadata or {})


def parse_focus(spec: str, parser: argparse.ArgumentParser) -> dict[str | None, float]:
    """`"shape=0.3,none=0.1"` -> {"shape": 0.3, None: 0.1}, normalised to sum to 1."""
    probs: dict[str | None, float] = {}
    for item in spec.split(","):
        name, _, value = item.partition("=")
        key = None if name.strip() == "none" else name.strip()
        if key is not None and key not in FOCUS_PROBS or not value:
            parser.error(f"--focus: bad item {item!r}; use FACTOR=P with FACTOR in {[k for k in FOCUS_PROBS if k]} or none")
        probs[key] = float(value)
    total = sum(probs.values())
    if total <= 0:
        parser.error("--focus: probabilities must sum to more than 0")
    return {k: v / total for k, v in probs.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (hub layout, plus train_state.pt for resuming)")
    parser.add_argument("--steps", type=int, default=4200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=4, help="scenes per hard-negative group")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--spurious", type=float, default=0.95, help="P(triangle on water) = P(square on land) in training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default=TOY_MODEL_NAME, help=f"registered open_clip model config (default {TOY_MODEL_NAME})")
    parser.add_argument("--focus", default=None, help='focus probabilities of hard-negative groups, e.g. "shape=0.3,region=0.3,none=0.1"')
    parser.add_argument("--lock-text-steps", type=int, default=1200,
                        help="keep the text tower at its initialisation for this many first steps (see text_parameters)")
    parser.add_argument("--direct-penalty", type=float, default=1.0,
                        help="weight of the share of the embedding written directly by the embedding term, MLPs and "
                             "early attention layers (direct_paths.py); 0 turns it off (default 1.0)")
    parser.add_argument("--late-layers", type=int, default=4,
                        help="attention layers at the end whose direct writes --direct-penalty leaves free")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="steps between resumable checkpoints")
    parser.add_argument("--eval-every", type=int, default=300, help="steps between zero-shot evaluations (0: only at the end)")
    parser.add_argument("--eval-n", type=int, default=300, help="held-out scenes per evaluation")
    parser.add_argument("--fp32", action="store_true", help="save float32 weights (default float16, to keep the asset small)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 2 or args.group_size < 1:
        parser.error("--steps must be >= 1, --batch-size >= 2, --group-size >= 1")
    if args.direct_penalty < 0 or args.late_layers < 0:
        parser.error(f"--direct-penalty and --late-layers must be >= 0, got {args.direct_penalty}, {args.late_layers}")

    focus = parse_focus(args.focus, parser) if args.focus else None
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.seed, args.config)
    n_layers = len(model.visual.transformer.resblocks)
    if args.late_layers > n_layers:
        parser.error(f"--late-layers {args.late_layers} exceeds the image tower's {n_layers} layers")
    model.train()
    tokenizer = open_clip.get_tokenizer(args.config)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    cfg = model.visual.preprocess_cfg
    text_params = text_parameters(model)

    start, wall, log = 0, 0.0, []
    state_path = args.out / STATE_FILE
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, wall, log = int(state["step"]), float(state["wall"]), json.loads(state["log"])
        print(f"resuming from step {start} ({wall / 60:.1f} min already spent)", file=sys.stderr)

    def save_state(step: int) -> None:
        with atomic_path(state_path) as tmp:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "wall": wall, "log": json.dumps(log)}, tmp)

    eval_scenes = heldout_scenes(args.eval_n)
    t0 = time.time()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train", dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.lr, args.warmup, args.steps)
        images, captions, _ = training_batch(args.seed, step, args.batch_size, args.group_size, args.spurious, focus)
        x = to_tensor(images, cfg["mean"], cfg["std"])
        with ClassTokenWrites(model.visual) as rec:
            image_features, text_features, logit_scale = model(x, tokenizer(captions))[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        entry = {"step": step + 1, "loss": round(loss.item(), 4)}
        share = direct_share_of_model(model.visual, rec, args.late_layers)
        entry["direct_share"] = round(share.item(), 4)
        if args.direct_penalty > 0:
            loss = loss + args.direct_penalty * share
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step < args.lock_text_steps:
            for p in text_params:
                p.grad = None  # AdamW skips parameters without a gradient, weight decay included
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix({k: v for k, v in entry.items() if k != "step"})
        done = step + 1
        if (args.eval_every and done % args.eval_every == 0) or done == args.steps:
            model.eval()
            entry["zero_shot"] = zero_shot_factor_accuracy(model, tokenizer, eval_scenes)
            model.train()
            tqdm.write(f"step {done}: " + " ".join(f"{k}={v:.2f}" for k, v in entry["zero_shot"].items()))
        log.append(entry)
        if done % args.checkpoint_every == 0 or done == args.steps:
            wall += time.time() - t0
            t0 = time.time()
            save_state(done)

    model.eval()
    metadata = {"clipdecomp_command": " ".join(["python -m clipdecomp.toyworld.train", *(argv if argv is not None else sys.argv[1:])]),
                "seed": str(args.seed), "steps": str(args.steps)}
    export_hub_folder(model, args.out, half=not args.fp32, metadata=metadata, config_name=args.config)
    summary = {
        "command": metadata["clipdecomp_command"],
        "args": {k: str(v) for k, v in vars(args).items()},
        "focus_probs": {str(k or "none"): v for k, v in (focus or FOCUS_PROBS).items()},
        "wall_time_minutes": round(wall / 60, 2),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {args.threads} threads",
        "final": log[-1] if log else {},
        "log": log,
    }
    atomic_write_text(args.out / "training.json", json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["final"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
