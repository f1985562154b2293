"""The `clipdecomp` command: one entry point, one subcommand per job.

    clipdecomp --help
    clipdecomp toyworld make-datasets OUT
    clipdecomp textspan --help

Each subcommand lives in its own module with a `main(argv) -> int` and its own
argparse `--help`; this file only dispatches, importing the module on demand so
that `clipdecomp --help` stays fast.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv), one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "toyworld make-datasets": ("clipdecomp.toyworld.datasets", "write the toy Waterbirds, segmentation and classification sets"),
    "toyworld train": ("clipdecomp.toyworld.train", "train the toy-world CLIP model"),
    "toyworld eval": ("clipdecomp.toyworld.evaluate", "zero-shot accuracy of a model on held-out toy scenes"),
    "decompose": ("clipdecomp.commands.decompose", "decompose an image folder into safetensors shards (resumable)"),
    "textspan": ("clipdecomp.commands.textspan", "TextSpan text bases and roles for the heads of the last layers"),
    "heatmap": ("clipdecomp.commands.heatmap", "per-patch heatmaps of texts over an image (overlay PNG)"),
    "segment-eval": ("clipdecomp.commands.segment_eval", "zero-shot segmentation on gtsegs_ijcv.mat: ours vs attention / rollout / GradCAM"),
    "retrieve": ("clipdecomp.commands.retrieve", "nearest images by chosen heads vs the full embedding; toy factor precision@k"),
    "repair": ("repair.cli", "mean-ablate heads chosen by TextSpan role, bake into a stock open_clip model, export (hub layout)"),
    "waterbirds-eval": ("repair.waterbirds_eval", "zero-shot Waterbirds group accuracies: base, exact / baked repair, random heads"),
    "reproduce": ("clipdecomp.experiments.reproduce", "run every experiment with data given (toy data by default); report.md with tables, plots, CSVs"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: clipdecomp COMMAND [options]   (clipdecomp COMMAND --help for each)", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    for words in (2, 1):
        name = " ".join(argv[:words])
        if name in COMMANDS:
            module = importlib.import_module(COMMANDS[name][0])
            sys.argv[0] = f"clipdecomp {name}"
            return int(module.main(argv[words:]) or 0)
    print(f"clipdecomp: unknown command {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
