"""Browser check of the demo: start ``app.py``, load the page in headless Chromium, wait
until the Heatmaps tab shows its overlays (the app computes them on page load from the
default example), and save a screenshot.

    python tools/screenshot_app.py --out /tmp/demo.png
    python tools/screenshot_app.py --out /tmp/demo.png --url http://127.0.0.1:7860/   # a running app
    python tools/screenshot_app.py --out /tmp/b16.png -- --model ViT-B-16 --pretrained laion2b_s34b_b88k

Needs Chromium (``apt-get install -y chromium``) and, for waiting on the result, the
``playwright`` Python package (``pip install playwright``; it drives the system Chromium,
no browser download). Without playwright it falls back to ``chromium --headless
--screenshot`` with a virtual-time budget, which may capture the page before the result
arrives (a warning says so). Exit status 0 when the overlays were seen, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
OVERLAYS = "#heatmap-overlays img"
# true once the gallery shows images and every one of them has loaded
_LOADED_JS = """(selector) => {
    const images = [...document.querySelectorAll(selector)];
    return images.length > 0 && images.every((i) => i.complete && i.naturalWidth > 0);
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float, proc: Optional[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the app exited with status {proc.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"no answer from {url} within {timeout:.0f} s")


def _chromium() -> Optional[str]:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def shoot_playwright(url: str, out: Path, size: tuple[int, int], timeout: float) -> bool:
    """Screenshot once the overlays have loaded; True if they did."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        exe = _chromium()
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"]) if exe else p.chromium.launch()
        page = browser.new_page(viewport={"width": size[0], "height": size[1]})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        ok = True
        try:
            page.wait_for_function(_LOADED_JS, arg=OVERLAYS, timeout=timeout * 1000)
            page.wait_for_timeout(500)  # let the layout settle
        except PlaywrightTimeout:
            ok = False
        page.screenshot(path=str(out), full_page=True)
        browser.close()
    for e in errors:
        print(f"page error: {e}", file=sys.stderr)
    return ok and not errors


def shoot_cli(url: str, out: Path, size: tuple[int, int], timeout: float) -> bool:
    exe = _chromium()
    if exe is None:
        raise RuntimeError("no Chromium found: apt-get install -y chromium")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={size[0]},{size[1]}",
           f"--virtual-time-budget={int(timeout * 1000)}", f"--screenshot={out}", url]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout + 60)
    print("warning: without playwright the screenshot may show the page before the heatmaps arrive", file=sys.stderr)
    return out.is_file()


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--url", default=None, help="screenshot this running app instead of starting one")
    p.add_argument("--size", default="1400x1000", help="viewport WIDTHxHEIGHT (default 1400x1000)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the app and the result")
    p.add_argument("app_args", nargs="*", help="arguments for app.py (after --)")
    args = p.parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    proc = None
    url = args.url
    try:
        if url is None:
            port = _free_port()
            url = f"http://127.0.0.1:{port}/"
            env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
            env.setdefault("CLIPDECOMP_DEMO_CACHE", str(Path(tempfile.gettempdir()) / "clipdecomp-demo-screenshot"))
            proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port), *args.app_args],
                                    cwd=REPO, env=env)
        _wait_http(url, args.timeout, proc)
        try:
            import playwright  # noqa: F401
        except ImportError:
            ok = shoot_cli(url, args.out, size, args.timeout)
        else:
            ok = shoot_playwright(url, args.out, size, args.timeout)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"wrote {args.out} ({'heatmap overlays shown' if ok else 'overlays NOT seen'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
