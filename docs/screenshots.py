"""The README's TensorBoard screenshots, taken from real runs by a real TensorBoard in headless Chromium.

    sudo apt-get install chromium && pip install playwright
    python docs/screenshots.py [--logdir lightning_logs] [--runs lenet_no_bn lenet_bn_scratch lenet_bn_torch]

Serves the newest version of each named run (as produced by ``python -m bn_lightning fit --config
configs/<run>.yaml``) on a free loopback port and writes into docs/images/ one PNG per custom-scalars
category in ``CATEGORIES`` and one of the HParams table.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

IMAGES = Path(__file__).resolve().parent / "images"
CATEGORIES = {  # custom-scalars category title -> image name
    "Training": "training.png",
    "BN running mean per channel": "bn_running_mean.png",
    "Activation input, one unit: p15 / p50 / p85": "activation_unit_percentiles.png",
}


def newest_version(logdir: Path, run: str) -> Path:
    versions = sorted((logdir / run).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not versions:
        sys.exit(f"no run {run!r} under {logdir}: train it first with python -m bn_lightning fit --config configs/{run}.yaml")
    return versions[-1]


def serve(logdir: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            with urllib.request.urlopen(f"{url}/data/plugin/custom_scalars/layout", timeout=5) as response:
                if json.load(response).get("category"):
                    return server, url
        except OSError:
            pass
        time.sleep(0.5)
    server.kill()
    sys.exit("TensorBoard did not serve a custom-scalars layout within 60 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", type=Path, default=Path("lightning_logs"))
    parser.add_argument("--runs", nargs="+", default=["lenet_no_bn", "lenet_bn_scratch", "lenet_bn_torch"])
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the browser executable")
    args = parser.parse_args()

    IMAGES.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:  # one folder per run, so TensorBoard names the runs by config
            (Path(tmp) / run).symlink_to(newest_version(args.logdir, run).resolve())
        server, url = serve(Path(tmp))
        try:
            with urllib.request.urlopen(f"{url}/data/plugin/custom_scalars/layout") as response:
                titles = [category["title"] for category in json.load(response)["category"]]
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"{url}/#custom_scalars")
                page.wait_for_timeout(8000)
                views = page.locator("tf-category-paginated-view")  # one per category, in the layout's order
                for title, image in CATEGORIES.items():
                    view = views.nth(titles.index(title))
                    view.scroll_into_view_if_needed()
                    page.wait_for_timeout(3000)  # the charts draw once they are in view
                    view.screenshot(path=IMAGES / image)
                page.set_viewport_size({"width": 1800, "height": 400})
                page.goto(f"{url}/#hparams")
                page.wait_for_timeout(8000)
                page.screenshot(path=IMAGES / "hparams.png")
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
    print("written:", ", ".join(sorted(p.name for p in IMAGES.glob("*.png"))))


if __name__ == "__main__":
    main()
