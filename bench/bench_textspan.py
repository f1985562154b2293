"""Benchmark TextSpan (clipdecomp.textspan) on random data.

Times the fast ``textspan_heads`` on a ViT-L-14-shaped problem (default: the
last 4 layers x 16 heads, D=768, N=5000 images, T=3500 texts, k=60, rank 80)
against a 30 s target, then compares it with ``direct_textspan`` on a smaller
problem, checking both pick the same texts and reporting the speed-up.

Timings depend on other processes using the CPU at the same time: the wall
clock is what the target is about; the process CPU time (summed over threads)
is less sensitive to contention.  On a shared, busy CPU ``--threads 1`` avoids
thread-oversubscription stalls.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from clipdecomp.textspan import direct_textspan, textspan, textspan_heads  # noqa: E402


def random_problem(n: int, layers: int, heads: int, d: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random per-head outputs ``[N, L, H, D]`` (anisotropic) and unit texts ``[T, D]``."""
    scales = torch.logspace(0, -2, d)  # decaying spectrum so rank reduction matters
    contribs = torch.randn(n, layers, heads, d) * scales
    contribs = contribs @ torch.linalg.qr(torch.randn(d, d)).Q  # random rotation
    texts = torch.nn.functional.normalize(torch.randn(t, d), dim=1)
    return contribs, texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=5000, help="images N")
    p.add_argument("--layers", type=int, default=4, help="layers L")
    p.add_argument("--heads", type=int, default=16, help="heads per layer H")
    p.add_argument("--d", type=int, default=768, help="embedding dim D")
    p.add_argument("--t", type=int, default=3500, help="candidate texts T")
    p.add_argument("--k", type=int, default=60, help="texts chosen per head")
    p.add_argument("--rank", type=int, default=80, help="rank reduction (<=0: none)")
    p.add_argument("--target", type=float, default=30.0, help="target seconds for the full run")
    p.add_argument("--small-n", type=int, default=1000)
    p.add_argument("--small-t", type=int, default=500)
    p.add_argument("--small-k", type=int, default=10)
    p.add_argument("--small-heads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rank = args.rank if args.rank > 0 else None
    torch.manual_seed(args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    contribs, texts = random_problem(args.n, args.layers, args.heads, args.d, args.t)
    t0, c0 = time.perf_counter(), time.process_time()
    out = textspan_heads(contribs, texts, k=args.k, rank=rank)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    fracs = torch.stack([r.cumulative_fraction[-1] for r in out.values()])
    print(f"fast: {len(out)} heads, N={args.n} D={args.d} T={args.t} k={args.k} rank={rank}: "
          f"{secs:.2f} s ({secs / len(out) * 1e3:.0f} ms/head), "
          f"ratio to {args.target:g} s target = {secs / args.target:.3f} "
          f"[{'PASS' if secs < args.target else 'FAIL'}]; process CPU time {cpu:.2f} s; "
          f"mean explained fraction {float(fracs.mean()):.3f}")
    del contribs, out

    contribs, texts = random_problem(args.small_n, 1, args.small_heads, args.d, args.small_t)
    heads = [contribs[:, 0, h] for h in range(args.small_heads)]
    t0 = time.perf_counter()
    fast = [textspan(c, texts, args.small_k, rank) for c in heads]
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = [direct_textspan(c, texts, args.small_k, rank) for c in heads]
    t_ref = time.perf_counter() - t0
    same = all(f.indices == r.indices for f, r in zip(fast, ref))
    ev_err = max(float(((f.explained_variance - r.explained_variance).abs()
                        / r.explained_variance.abs()).max()) for f, r in zip(fast, ref))
    print(f"small: {args.small_heads} heads, N={args.small_n} T={args.small_t} k={args.small_k}: "
          f"fast {t_fast:.3f} s, direct {t_ref:.3f} s, speed-up {t_ref / t_fast:.1f}x; "
          f"same texts: {same}, max rel. explained-variance diff {ev_err:.1e}")
    if not same:
        raise SystemExit("fast and direct TextSpan disagree")


if __name__ == "__main__":
    main()
