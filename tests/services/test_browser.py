"""The page at `/` in headless Chromium (Debian `chromium`): it loads, samples on `?run=1` through the streaming
endpoint, shows per-call progress and the grid.

Fails (does not skip) without Chromium: `apt-get install -y chromium`.
"""

import base64
import io
import json
import shutil
import subprocess
import time
from contextlib import contextmanager

import numpy as np
import requests
from PIL import Image
from websockets.sync.client import connect

from tests.conftest import free_port
from tests.services.conftest import DIGIT_NAMES

WINDOW = (900, 700)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    raise AssertionError("headless Chromium is required for this test: install it with `apt-get install -y chromium` "
                         "(Debian/Ubuntu) — CI's setup script does")


@contextmanager
def page(tmp_path, url: str):
    """Headless Chromium on `url`, driven in real time over the DevTools protocol (virtual time would run past a
    streamed response): yields `evaluate(js) -> value`; the browser is killed afterwards."""
    port = free_port()
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", f"--remote-debugging-port={port}",
               f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars", url]
    browser = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                targets = requests.get(f"http://127.0.0.1:{port}/json", timeout=5).json()
                target = next(t for t in targets if t.get("type") == "page")
                break
            except (requests.RequestException, StopIteration):
                assert time.monotonic() < deadline and browser.poll() is None, "Chromium did not start"
                time.sleep(0.3)
        with connect(target["webSocketDebuggerUrl"], max_size=2**26) as socket:
            ids = iter(range(1, 10**9))

            def call(method: str, **params) -> dict:
                number = next(ids)
                socket.send(json.dumps({"id": number, "method": method, "params": params}))
                while True:
                    message = json.loads(socket.recv(timeout=60))
                    if message.get("id") == number:
                        assert "error" not in message, message
                        return message["result"]

            def evaluate(expression: str):
                return call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

            evaluate.call = call
            yield evaluate
    finally:
        browser.kill()
        browser.wait(10)


def wait_for(evaluate, expression: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while not (value := evaluate(expression)):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.2)
    return value


def test_page_samples_and_renders(served, tmp_path):
    url = served.url + "?run=1&sampler=ddim&steps=5&n=16&seed=0"
    with page(tmp_path, url) as evaluate:
        wait_for(evaluate, "document.body.dataset.sampled === '1'")
        dom = evaluate("document.documentElement.outerHTML")
        assert "done: 16 images, ddim 5 steps, seed 0" in dom and "(5 model calls)" in dom
        assert 'data-progress="5/5"' in dom  # the streamed per-call progress reached the page
        assert 'src="data:image/png;base64,' in dom
        wait_for(evaluate, "document.getElementById('model').textContent.includes('@champion')")
        assert "digits-tiny v1 @champion" in evaluate("document.getElementById('model').textContent")
        # an unconditional model: no class picker, no guidance slider
        assert evaluate("document.getElementById('cls-field').hidden && document.getElementById('gs-field').hidden")
        evaluate.call("Emulation.setDeviceMetricsOverride", width=WINDOW[0], height=WINDOW[1], deviceScaleFactor=1,
                      mobile=False)
        shot = evaluate.call("Page.captureScreenshot", format="png")["data"]
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(shot))).convert("RGB")).astype(int)
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


def test_page_class_picker_and_guidance_slider(served_conditional, tmp_path):
    """A class-conditional model: the picker lists its classes, `class` and `guidance` prefill picker and slider,
    and the sample request carries both."""
    url = served_conditional.url + "?run=1&sampler=ddim&steps=3&n=4&seed=0&class=seven&guidance=2.5"
    with page(tmp_path, url) as evaluate:
        wait_for(evaluate, "document.body.dataset.sampled === '1'")
        assert evaluate("!document.getElementById('cls-field').hidden && !document.getElementById('gs-field').hidden")
        options = evaluate("[...document.getElementById('cls').options].map((o) => o.text)")
        assert options == ["none", "each (cycled)"] + [f"{k}: {name}" for k, name in enumerate(DIGIT_NAMES)]
        assert evaluate("document.getElementById('cls').value") == "7"
        assert evaluate("document.getElementById('gs-value').textContent") == "2.5"
        assert "done: 4 images, ddim 3 steps, seed 0, class seven, guidance 2.5" in \
            evaluate("document.getElementById('status').textContent")
        assert "10 classes" in evaluate("document.getElementById('model').textContent")
        # every class, one per image, unguided: the slider is disabled without a class and the request has none
        evaluate("document.getElementById('cls').value = 'each'; document.getElementById('n').value = '12';"
                 "document.body.dataset.sampled = '';"
                 "document.getElementById('form').requestSubmit()")
        wait_for(evaluate, "document.body.dataset.sampled === '1'")
        assert "done: 12 images, ddim 3 steps, seed 0, 10 classes, guidance 2.5" in \
            evaluate("document.getElementById('status').textContent")
        evaluate("document.getElementById('cls').value = ''; document.getElementById('cls').dispatchEvent("
                 "new Event('change'))")
        assert evaluate("document.getElementById('gs').disabled")
