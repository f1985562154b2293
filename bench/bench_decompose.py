"""Cost of the decomposition relative to a plain ``encode_image`` forward pass.

Variants (random-init open_clip model, CPU, one batch):

* ``plain``  : ``model.encode_image(images)``
* ``heads``  : ``decompose(model, images, token_layers=None)`` and materialising
  ``.heads`` ``[B, L, H, D]`` and ``.total()``
* ``tokens`` : ``decompose(model, images, token_layers=<last k>)`` and
  ``.head_token_scores(texts)`` ``[B, k, N, H, T]`` against T random unit texts

Time: every repeat runs the three variants back to back (interleaved, so a shared
CPU slows them alike); the median wall time and the median process CPU time are
reported, with ratios to ``plain``.

Memory: each variant runs once in a fresh subprocess that loads the model, creates
its inputs, then resets the kernel's peak-RSS mark (``/proc/self/clear_refs``) and
reports ``VmHWM - VmRSS`` (the peak resident memory added by the variant). glibc's
dynamic mmap threshold is pinned (``MALLOC_MMAP_THRESHOLD_``) so large tensors are
returned to the OS when freed and RSS tracks live memory.

Example::

    python bench/bench_decompose.py --model ViT-B-16 --batch 8 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

VARIANTS = ("plain", "heads", "tokens")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default="ViT-B-16", help="open_clip architecture (random init)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first")
    p.add_argument("--texts", type=int, default=10, help="number of text embeddings for the token scores")
    p.add_argument("--token-layers", type=int, default=4, help="last k layers kept at token level")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def setup(args):
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from clipdecomp.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        lm = load_model(args.model)
    g = torch.Generator().manual_seed(0)
    h, w = lm.image_size
    images = torch.randn(args.batch, 3, h, w, generator=g)
    D = lm.clip.visual.output_dim
    texts = torch.nn.functional.normalize(torch.randn(args.texts, D, generator=g), dim=-1)
    return lm, images, texts


def make_runner(name, lm, images, texts, k):
    import torch

    from clipdecomp.decomposition import decompose

    L = len(lm.clip.visual.transformer.resblocks)
    last_k = list(range(L - k, L))

    def plain():
        with torch.no_grad():
            return lm.clip.encode_image(images)

    def heads():
        dec = decompose(lm, images, token_layers=None)
        return dec.heads, dec.total()

    def tokens():
        dec = decompose(lm, images, token_layers=last_k)
        return dec.head_token_scores(texts)

    return {"plain": plain, "heads": heads, "tokens": tokens}[name]


def _status_kb():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def child(args) -> None:
    lm, images, texts = setup(args)
    run = make_runner(args.child, lm, images, texts, args.token_layers)
    gc.collect()
    base = _status_kb()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark to the current RSS
    out = run()
    peak = _status_kb()["VmHWM"]
    del out
    print(json.dumps({"variant": args.child, "baseline_mb": base / 1024, "peak_increase_mb": (peak - base) / 1024}))


def measure_memory(args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    res = {}
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "--child", v, "--model", args.model, "--batch", str(args.batch),
               "--texts", str(args.texts), "--token-layers", str(args.token_layers), "--threads", str(args.threads)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        res[v] = json.loads(out.stdout.strip().splitlines()[-1])
    return res


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    import torch

    lm, images, texts = setup(args)
    runs = {v: make_runner(v, lm, images, texts, args.token_layers) for v in VARIANTS}
    # correctness guard: the decomposition reproduces the forward pass
    dec_total = runs["heads"]()[1]
    ref = runs["plain"]()
    rel = float((dec_total - ref).norm() / ref.norm())
    for _ in range(args.warmup):
        for v in VARIANTS:
            runs[v]()
    wall = {v: [] for v in VARIANTS}
    cpu = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for v in VARIANTS:
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            runs[v]()
            wall[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)

    med_w = {v: statistics.median(wall[v]) for v in VARIANTS}
    med_c = {v: statistics.median(cpu[v]) for v in VARIANTS}
    L = len(lm.clip.visual.transformer.resblocks)
    print(f"model={args.model} (random init) batch={args.batch} threads={torch.get_num_threads()} "
          f"repeats={args.repeats} texts={args.texts} token_layers=last {args.token_layers} of {L}")
    print(f"decomposition check: |total - encode_image| / |encode_image| = {rel:.2e}")
    print(f"{'variant':8s} {'wall med (s)':>13s} {'ratio':>6s} {'cpu med (s)':>12s} {'ratio':>6s}   wall all")
    for v in VARIANTS:
        print(f"{v:8s} {med_w[v]:13.3f} {med_w[v] / med_w['plain']:6.2f} {med_c[v]:12.3f} "
              f"{med_c[v] / med_c['plain']:6.2f}   {' '.join(f'{t:.2f}' for t in wall[v])}")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "rel_err": rel, "wall": wall, "cpu": cpu}
    if not args.no_memory:
        mem = measure_memory(args)
        base = mem["plain"]["peak_increase_mb"]
        print(f"{'variant':8s} {'peak RSS increase (MB)':>23s} {'ratio':>6s}   (fresh subprocess per variant)")
        for v in VARIANTS:
            inc = mem[v]["peak_increase_mb"]
            print(f"{v:8s} {inc:23.1f} {inc / base:6.2f}")
        result["memory"] = mem
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
