"""The page at ``/`` (api_compat/static/page/) in a real headless Chromium, against the real server
(``python -m cli serve --api-key ...`` on the bundled demo model), and ``/docs`` / ``/redoc`` served offline.

The browser is Debian's ``chromium`` driven through its ``chromium-driver`` by selenium (.ci/run installs both);
without them the browser tests skip with the reason. Expectations of the screenshot, stated:
- layout: the prompt, model, steps, Generate button, progress bar and the result cards have non-empty bounding
  boxes inside a 1280-pixel-wide window, the form column left of the output column (no overlap);
- the image is not empty: the result card's rendered image has a pixel standard deviation above 20 (of 255),
  and, the demo model following its prompt "a large red circle in the middle on a blue background" (seed 1,
  CFG 1.5: tests/test_demo_model.py measures that it does), its centre is redder than blue and its corner
  bluer than red.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.api_support import wait_healthy
from tests.conftest import exclusive
from tests.queue_support import free_port

pytestmark = pytest.mark.slow  # the module's server exports the demo model unless another test did

ROOT = Path(__file__).resolve().parents[1]
KEY = "page-test-key"
PROMPT = "a large red circle in the middle on a blue background"


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_cache):
    """The real server with an API key, warmed up (the demo model exported and loaded, in the run's shared demo
    export cache) so that the browser test times the page, not the first export."""
    root = tmp_path_factory.mktemp("page-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = root / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SDENGINE_CACHE_DIR": str(demo_cache)}
    env.pop("SDENGINE_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--port", str(port), "--models-dir", str(root / "models"),
         "--results-dir", str(root / "results"), "--backend", "onnxruntime", "--api-key", KEY],
        env=env, cwd=ROOT, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)
    console = lambda: log_path.read_bytes().decode(errors="replace")[-3000:]  # noqa: E731
    try:
        wait_healthy(url, proc, console)
        with exclusive(demo_cache):
            r = requests.post(url + "/sdapi/v1/txt2img", headers={"X-API-Key": KEY}, timeout=600,
                              json={"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, "seed": 1})
        assert r.status_code == 200, r.text
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def browser():
    found = _chromium()
    if found is None:
        pytest.skip("no chromium + chromedriver here (apt-get install chromium chromium-driver; .ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the dev extra) is not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(condition, timeout: float = 60.0, what: str = "the condition", every: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def _png_pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB")).astype(np.float64)


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


def _script_urls(html: str) -> list[str]:
    return re.findall(r"""fetch\(\s*"([^"]+)"|url:\s*"([^"]+)\"""", html)


# --------------------------------------------------------------------------------------------- /docs offline
@pytest.mark.parametrize("page", ["/docs", "/redoc", "/"])
def test_docs_and_page_reference_only_local_urls(server, page):
    """/docs, /redoc and / name only this server's paths (no CDN), and each of them answers 200 without the
    API key (static files; /openapi.json itself stays behind the key)."""
    html = requests.get(server + page, timeout=30)
    assert html.status_code == 200 and "text/html" in html.headers["content-type"]
    parser = _Refs()
    parser.feed(html.text)
    urls = parser.urls + [u for pair in _script_urls(html.text) for u in pair if u]
    assert len(parser.urls) >= 2, parser.urls
    assert not re.search(r"https?:|[\"'(]//", html.text), "a URL to another host"
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        if url == "/openapi.json":
            assert requests.get(server + url, timeout=30).status_code == 401
            assert requests.get(server + url, headers={"X-API-Key": KEY}, timeout=30).status_code == 200
        else:
            assert requests.get(server + url, timeout=30).status_code == 200, url
    if page == "/":
        assert "default-src 'self'" in html.headers["content-security-policy"]


def test_only_the_static_files_are_public(server):
    """Paths that merely start like a static file's need the key (no dot segments, no nested names)."""
    import http.client

    port = int(server.rsplit(":", 1)[1])
    for path in ("/page/../openapi.json", "/page/%2e%2e/openapi.json", "/docs-assets/../sdapi/v1/sd-models",
                 "/page/x/../../sdapi/v1/options"):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", path)
        status = conn.getresponse().status
        conn.close()
        assert status == 401, (path, status)
    assert requests.get(server + "/page/nope.js", timeout=30).status_code == 404


def test_swagger_ui_renders_offline_with_the_stored_key(server, browser):
    """Swagger UI renders every route from the package's own assets; it sends the key the page stored."""
    from selenium.webdriver.common.by import By

    browser.get(server + "/page/style.css")  # same origin: store the key as the page does
    browser.execute_script("localStorage.setItem('sdengine.apiKey', arguments[0])", KEY)
    browser.get(server + "/docs")
    ops = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"), 30, "Swagger's routes")
    paths = {o.text.replace("\u200b", "") for o in ops}
    assert {"/sdapi/v1/txt2img", "/scc/sd_txt2img"} <= paths
    browser.execute_script("localStorage.removeItem('sdengine.apiKey')")


# ----------------------------------------------------------------------------------------------- the page
def test_page_generates_on_the_demo_model(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(server + "/")
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    find = browser.find_element

    # without the key: a clear prompt for it
    _wait(lambda: find(By.ID, "key-dialog").get_attribute("open") is not None, 15, "the API key dialog")
    assert "API key" in find(By.ID, "key-dialog").text
    assert find(By.ID, "server-status").text == "needs an API key"
    find(By.ID, "api-key").send_keys(KEY)
    find(By.ID, "key-save").click()
    _wait(lambda: find(By.ID, "server-status").text == "ready", 15, "the listings with the key")
    assert "sdengine-demo" in [o.text for o in find(By.ID, "model").find_elements(By.TAG_NAME, "option")]
    assert find(By.ID, "sampler").get_attribute("value") == "Euler a"
    assert "sdengine-demo-red2blue" in find(By.ID, "lora").text  # the bundled LoRA, from /sdapi/v1/loras

    # an error is shown next to the field it names
    steps = find(By.ID, "steps")
    steps.clear()
    steps.send_keys("0")
    find(By.ID, "generate").click()
    err = _wait(lambda: find(By.CSS_SELECTOR, "[data-field='steps'] .err").text, 30, "the steps error")
    assert "out of range" in err and "1 to 150" in err
    assert find(By.ID, "error").text == ""

    for field, value in (("steps", "24"), ("cfg_scale", "1.5"), ("seed", "1"), ("width", "64"), ("height", "64"),
                         ("batch_size", "2")):
        box = find(By.ID, field)
        box.clear()
        box.send_keys(value)
    find(By.ID, "prompt").send_keys(PROMPT)
    started = time.monotonic()
    find(By.ID, "generate").click()
    assert find(By.CSS_SELECTOR, "[data-field='steps'] .err").text == ""  # cleared by the new submit

    widths = set()  # the progress bar's width while the task runs

    def finished():
        widths.add(browser.execute_script("return document.getElementById('progress-bar').style.width"))
        return len(find(By.ID, "gallery").find_elements(By.CSS_SELECTOR, ".result")) >= 2 or find(By.ID, "error").text

    _wait(finished, 120, "the two images")
    took = time.monotonic() - started
    assert find(By.ID, "error").text == ""
    moving = sorted(int(w.rstrip("%")) for w in widths if w and w not in ("0%", "100%"))
    assert moving, f"no progress between 0 and 100% was shown: {widths}"
    assert int(find(By.ID, "progress").get_attribute("data-seen")) >= 1
    assert "done: 2 image(s)" in find(By.ID, "progress-text").text
    # the live preview (/sdapi/v1/progress current_image) was shown while it ran
    assert find(By.ID, "preview").get_attribute("src").startswith("data:image/png;base64,")

    cards = find(By.ID, "gallery").find_elements(By.CSS_SELECTOR, ".result")
    # newest first: the card of seed 1 is the first of its batch, shown last of the two
    first = cards[1]
    pre = first.find_element(By.CSS_SELECTOR, ".infotext")
    assert not pre.is_displayed()
    first.find_element(By.CSS_SELECTOR, "button.params").click()
    assert pre.is_displayed()
    text = pre.text
    assert text.startswith(PROMPT) and "Steps: 24" in text and "Seed: 1," in text and "Size: 64x64" in text

    # PNG download: the PNG itself, with the infotext in it
    href = first.find_element(By.CSS_SELECTOR, "a.download").get_attribute("href")
    assert href.startswith("data:image/png;base64,")
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1]))) as png:
        assert png.size == (64, 64) and png.text["parameters"] == text

    # the screenshot and the stated expectations
    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot))
    width = browser.execute_script("return window.innerWidth")
    boxes = {}
    for name, element in (("prompt", find(By.ID, "prompt")), ("model", find(By.ID, "model")),
                          ("steps", find(By.ID, "steps")), ("generate", find(By.ID, "generate")),
                          ("progress", find(By.ID, "progress")), ("result", first), ("form", find(By.ID, "gen-form")),
                          ("output", find(By.ID, "output"))):
        rect = element.rect
        assert rect["width"] > 0 and rect["height"] > 0 and rect["x"] >= 0, (name, rect)
        assert rect["x"] + rect["width"] <= width, (name, rect, width)
        boxes[name] = rect
    assert boxes["form"]["x"] + boxes["form"]["width"] <= boxes["output"]["x"], boxes
    image = _png_pixels(first.find_element(By.TAG_NAME, "img").screenshot_as_png)
    assert image.std() > 20, f"the image is flat (std {image.std():.1f})"
    h, w = image.shape[:2]
    centre = image[h * 3 // 8: h * 5 // 8, w * 3 // 8: w * 5 // 8].mean(axis=(0, 1))
    corner = image[: h // 8, : w // 8].mean(axis=(0, 1))
    assert centre[0] > centre[2] and corner[2] > corner[0], (centre, corner)

    # reuse parameters: the form takes the request back, with that image's seed
    find(By.ID, "prompt").clear()
    cards[0].find_element(By.CSS_SELECTOR, "button.reuse").click()
    assert find(By.ID, "prompt").get_attribute("value") == PROMPT
    assert find(By.ID, "seed").get_attribute("value") == "2" and find(By.ID, "steps").get_attribute("value") == "24"
    assert took < 60, f"the generation took {took:.1f} s in the page"


def test_page_inpaints_with_a_drawn_mask_and_shows_a_detected_map(server, browser, tmp_path):
    """img2img with an uploaded image and a mask drawn on the canvas: the unmasked top rows keep the init
    image's colour (as tests/test_api_http.py checks over the API); the ControlNet unit's detected map (canny of
    the uploaded image) is shown."""
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    init = np.zeros((64, 64, 3), np.uint8)
    init[:] = (200, 40, 40)
    init[24:40, 24:40] = (30, 30, 220)  # a square: edges for canny
    path = tmp_path / "init.png"
    Image.fromarray(init).save(path)

    browser.get(server + "/")
    browser.execute_script("localStorage.setItem('sdengine.apiKey', arguments[0])", KEY)
    browser.refresh()
    find = browser.find_element
    _wait(lambda: find(By.ID, "server-status").text == "ready", 15, "the listings")

    # the ControlNet unit's detected map
    find(By.ID, "cn-image").send_keys(str(path))
    _wait(lambda: find(By.ID, "cn-input").is_displayed(), 10, "the control image")
    assert find(By.ID, "cn-module").get_attribute("value") == "canny"
    find(By.ID, "cn-detect").click()
    _wait(lambda: find(By.ID, "cn-map").is_displayed() or find(By.ID, "cn-error").text, 60, "the detected map")
    assert find(By.ID, "cn-error").text == ""
    detected = _png_pixels(base64.b64decode(find(By.ID, "cn-map").get_attribute("src").split(",", 1)[1]))
    h, w = detected.shape[:2]
    inside = detected[int(h * 0.45): int(h * 0.55), int(w * 0.45): int(w * 0.55)]
    assert detected.max() == 255 and inside.max() == 0, "canny: edges on the square's border only"
    find(By.ID, "cn-enabled").click()  # the unit off for the inpainting below

    find(By.CSS_SELECTOR, ".tab[data-mode='img2img']").click()
    find(By.ID, "init-image").send_keys(str(path))
    canvas = _wait(lambda: find(By.ID, "mask-canvas").is_displayed() and find(By.ID, "mask-canvas"), 10, "the canvas")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    rect = canvas.rect
    chain = ActionChains(browser).move_to_element_with_offset(canvas, 0, int(rect["height"] * 0.25))
    chain.click_and_hold().move_by_offset(int(rect["width"] * 0.2), 0).release().perform()
    mask = _png_pixels(base64.b64decode(browser.execute_script("return maskB64()")))
    assert mask.shape[:2] == (64, 64) and mask[:16].max() == 0, "the drawn mask"
    assert (mask[48, 33:44] == 255).all(), "a stroke from the centre to the right, without gaps"
    for field, value in (("prompt", PROMPT), ("steps", "6"), ("seed", "3"), ("batch_size", "1")):
        box = find(By.ID, field)
        box.clear()
        box.send_keys(value)
    find(By.ID, "generate").click()
    _wait(lambda: find(By.ID, "progress-text").text.startswith(("done", "failed")), 120, "the inpainting")
    assert find(By.ID, "error").text == ""
    href = find(By.CSS_SELECTOR, "#gallery .result a.download").get_attribute("href")
    out = _png_pixels(base64.b64decode(href.split(",", 1)[1]))
    assert out.shape[:2] == (64, 64)
    assert np.abs(out[:8] - (200, 40, 40)).max() <= 2, "the unmasked pixels are the init image's"
    assert "Denoising strength: 0.75" in find(By.CSS_SELECTOR, "#gallery .result .infotext").get_attribute(
        "textContent")


def test_page_cancels_a_running_generation(server, browser):
    """Cancel (POST /sdapi/v1/interrupt) stops the running task: the page says so, and shows no new image."""
    from selenium.webdriver.common.by import By

    browser.get(server + "/")
    browser.execute_script("localStorage.setItem('sdengine.apiKey', arguments[0])", KEY)
    browser.refresh()
    find = browser.find_element
    _wait(lambda: find(By.ID, "server-status").text == "ready", 15, "the listings")
    for field, value in (("prompt", PROMPT), ("steps", "150"), ("width", "64"), ("height", "64"),
                         ("batch_size", "8")):
        box = find(By.ID, field)
        box.clear()
        box.send_keys(value)
    find(By.ID, "generate").click()
    _wait(lambda: find(By.ID, "progress-text").text.startswith("step "), 60, "the sampling steps")
    find(By.ID, "cancel").click()
    _wait(lambda: find(By.ID, "progress-text").text in ("cancelled", "failed") or
          find(By.ID, "progress-text").text.startswith("done"), 60, "the end of the task")
    assert find(By.ID, "progress-text").text == "cancelled" and find(By.ID, "error").text == ""
    assert not find(By.ID, "gallery").find_elements(By.CSS_SELECTOR, ".result")
    assert find(By.ID, "generate").is_enabled() and not find(By.ID, "cancel").is_enabled()
