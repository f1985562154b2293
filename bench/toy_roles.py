"""Acceptance check of head roles on the bundled toy model: for every toy-world factor,
does some late head get that factor's role, and does that head carry the factor?

The exact commands (from the repository root) that produce
``assets/toyclip_textspan.json`` and the table::

    python bench/toy_roles.py write-scenes /tmp/toy_scenes --n 2000 --seed 777
    python -m clipdecomp.cli textspan --images /tmp/toy_scenes --pool general \\
        --layers 4 --k 60 --rank 80 --batch-size 64 --seed 0 --out assets/toyclip_textspan.json
    python bench/toy_roles.py check --results assets/toyclip_textspan.json --n 2000 --seed 778

(The toy model's D is 64, so ``--rank 80`` means no rank reduction.)
``write-scenes`` renders held-out scenes (every factor drawn independently, no
spurious cue) with their factors in ``factors.csv``. ``check`` renders *another*
set of scenes (``--seed``), decomposes them with the model of the results, and
prints, per factor, the role heads, the head of another role it is compared with,
their probe accuracies and eta^2, and whether the factor passes; the definitions are
in ``clipdecomp/toyworld/role_check.py``. A factor passes when at least one head with
its role reads it ``--margin`` (default 0.10) better than the other head.

The exit status is 0 when every factor passes.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from clipdecomp.io import atomic_path, atomic_write_text  # noqa: E402
from clipdecomp.toyworld.role_check import check_roles, head_contributions, probe_scenes  # noqa: E402
from clipdecomp.toyworld.world import FACTORS, render  # noqa: E402


def write_scenes(out: Path, n: int, seed: int) -> None:
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", *FACTORS])
    for i, s in enumerate(tqdm(probe_scenes(n, seed), desc="render", unit="scene")):
        name = f"scene_{i:05d}.png"
        with atomic_path(out / name) as tmp:
            render(s)[0].save(tmp, format="PNG")
        w.writerow([name, *(s.factors()[f] for f in FACTORS)])
    atomic_write_text(out / "factors.csv", buf.getvalue())
    print(f"wrote {n} scenes and factors.csv to {out}")


def check(results_path: Path, n: int, seed: int, margin: float) -> int:
    from clipdecomp.loading import load_model
    from clipdecomp.textspan_results import TextSpanResults

    res = TextSpanResults.load(results_path)
    lm = load_model(res.model, res.pretrained)
    scenes = probe_scenes(n, seed)
    parts, total = head_contributions(lm, scenes, res.layers)
    rows = check_roles(res, parts, total, scenes, margin=margin, seed=seed)

    def name(key: tuple[int, int] | None) -> str:
        return "-" if key is None else f"L{key[0]}.H{key[1]}"

    print(f"results: {results_path} (pool {res.pool}, layers {res.layers}, k {res.k}, {res.n_images} images)")
    print(f"probe scenes: {n} (seed {seed}); margin {margin:.2f}\n")
    print("roles of the late heads:")
    print(res.format_table(3))
    print(f"\n{'factor':<10} {'top head':>8} {'score':>5} {'probe':>5} | {'best head':>9} {'probe':>5} {'eta2':>5} | "
          f"{'other head':>10} {'other role':<20} {'probe':>5} {'eta2':>5} | {'best other':>10} | {'image':>5} "
          f"{'chance':>6}  top ok  pass")
    for r in rows:
        mark = " " if r.n_role_heads else "*"
        print(f"{r.factor:<10} {name(r.top_head) + mark:>8} {r.top_score:>5.2f} {r.top_probe:>5.2f} | "
              f"{name(r.best_head):>9} {r.best_probe:>5.2f} {r.best_eta2:>5.2f} | {name(r.other_head):>10} "
              f"{r.other_role or '-':<20} {r.other_probe:>5.2f} {r.other_eta2:>5.2f} | {r.best_other_probe:>10.2f} | "
              f"{r.image_probe:>5.2f} {r.chance:>6.2f}  {'yes' if r.top_passed else 'no':>6}  {'yes' if r.passed else 'NO'}")
    print("\n* no head has this role; the head with the largest share of the category is shown")
    return 0 if all(r.passed for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write-scenes", help="render held-out toy scenes into a folder")
    w.add_argument("out", type=Path)
    w.add_argument("--n", type=int, default=2000)
    w.add_argument("--seed", type=int, default=777)
    c = sub.add_parser("check", help="the acceptance table")
    c.add_argument("--results", type=Path, default=Path("assets/toyclip_textspan.json"))
    c.add_argument("--n", type=int, default=2000, help="probe scenes")
    c.add_argument("--seed", type=int, default=778, help="seed of the probe scenes and splits")
    c.add_argument("--margin", type=float, default=0.10, help="required probe advantage of the role head")
    args = p.parse_args(argv)
    if args.command == "write-scenes":
        write_scenes(args.out, args.n, args.seed)
        return 0
    return check(args.results, args.n, args.seed, args.margin)


if __name__ == "__main__":
    sys.exit(main())
