"""Latency of one Heatmaps request through the running demo, as a client sees it.

    python bench/bench_app.py [--runs 20] [--threads N]

Starts the app in-process on the bundled model (127.0.0.1, a free port) and times
``gradio_client.Client.predict(..., api_name="/heatmap")`` for the default example (three
texts, the late layers): the upload of the image, the queued request, and the download of
the four result images. Also reports the same call without downloading the results, the
server-side computation alone (:func:`demo.heatmap_tab.compute_heatmaps`), a no-op
endpoint's round trip (Gradio's own floor on this machine) and the load average, since
the numbers are only comparable on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stats(xs: list[float]) -> str:
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]
    return f"median {1000 * statistics.median(xs):6.0f} ms   p90 {1000 * p90:6.0f} ms   min {1000 * xs[0]:6.0f} ms"


def _time(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)

    import gradio as gr
    import torch
    from gradio_client import Client, handle_file

    from demo.examples import default_example
    from demo.heatmap_tab import compute_heatmaps
    from demo.limits import load_image
    from demo.state import DemoConfig, DemoState
    from demo.ui import build_app, launch

    if args.threads:
        torch.set_num_threads(args.threads)
    state = DemoState(DemoConfig(cache_dir=Path(tempfile.mkdtemp(prefix="bench-app-"))))
    app = build_app(state)
    def echo(x: str) -> str:
        return x

    with app:  # a no-op endpoint: the floor of a queued request
        gr.api(echo, api_name="bench_echo")
    port = _free_port()
    launch(app, port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    ex = default_example(True)
    texts = ex.texts
    layers = state.bundle.late_layers()
    with tempfile.TemporaryDirectory() as dl:
        full = Client(url, verbose=False, download_files=dl)
        bare = Client(url, verbose=False, download_files=False)

        def request(client: Client) -> None:
            client.predict(handle_file(ex.path), texts, layers, False, api_name="/heatmap")

        for _ in range(3):  # warm-up: caches, first-call overheads
            request(full)
        t_full = _time(lambda: request(full), args.runs)
        t_bare = _time(lambda: request(bare), args.runs)
        t_echo = _time(lambda: bare.predict("x", api_name="/bench_echo"), args.runs)
    image = load_image(ex.path)
    t_compute = _time(lambda: compute_heatmaps(state.bundle, image, texts, layers), args.runs)
    app.close()

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"heatmap request, bundled model, {len(texts.splitlines())} texts, layers {layers}, {args.runs} runs, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, load average {load[0]:.1f}")
    print(f"  end to end (upload, request, download 4 images): {_stats(t_full)}")
    print(f"  without downloading the results:                 {_stats(t_bare)}")
    print(f"  server computation (compute_heatmaps):          {_stats(t_compute)}")
    print(f"  no-op endpoint round trip (Gradio floor):        {_stats(t_echo)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
