"""The page at `/` in headless Chromium (Debian `chromium`): it loads, samples on `?run=1` and shows the grid.

Fails (does not skip) without Chromium: `apt-get install -y chromium`.
"""

import shutil
import subprocess

import numpy as np
from PIL import Image

WINDOW = (900, 700)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    raise AssertionError("headless Chromium is required for this test: install it with `apt-get install -y chromium` "
                         "(Debian/Ubuntu) — CI's setup script does")


def run_chromium(tmp_path, url: str, *action: str) -> subprocess.CompletedProcess:
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
               f"--window-size={WINDOW[0]},{WINDOW[1]}", "--virtual-time-budget=20000", "--hide-scrollbars",
               *action, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_page_samples_and_renders(served, tmp_path):
    url = served.url + "?run=1&sampler=ddim&steps=5&n=16&seed=0"
    dom = run_chromium(tmp_path, url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-sampled="1"' in dom.stdout, f"page never showed samples:\n{dom.stdout[-3000:]}"
    assert "done: 16 images, ddim 5 steps, seed 0" in dom.stdout
    assert 'src="data:image/png;base64,' in dom.stdout
    assert "digits-tiny v1 @champion" in dom.stdout  # the model line, filled from /v1/models

    shot = tmp_path / "page.png"
    result = run_chromium(tmp_path, url, f"--screenshot={shot}")
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (WINDOW[1], WINDOW[0])
    # The page is light (#f4f5f7) with dark text above y ≈ 190 (heading, model line, form, status); below that the
    # sample grid, 384 px wide, is the only dark area (digits on a black background).
    dark = pixels.sum(axis=2) < 120
    grid = dark[200:]
    rows, cols = np.nonzero(grid)
    assert grid.mean() > 0.03, f"no sample grid visible: only {grid.mean():.3f} of the lower page is dark"
    assert 250 <= cols.max() - cols.min() + 1 <= 400, \
        f"grid should be ~384 px wide, dark pixels span x = {cols.min()}…{cols.max()}"
    assert dark[:200].mean() < 0.05, "the upper page should be light with text only"
    # the title is drawn in the page's accent blue (#1f4fd1)
    blue = (abs(pixels[..., 0] - 0x1f) < 40) & (abs(pixels[..., 1] - 0x4f) < 40) & (abs(pixels[..., 2] - 0xd1) < 40)
    assert blue[:80].sum() > 50, "heading not rendered"
