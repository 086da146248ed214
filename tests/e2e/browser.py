"""Headless Chromium (Debian's `chromium` and `chromium-driver` packages) driven by Selenium, for the
browser tests. No browser is downloaded: the system binaries are used, or the test is skipped
(a failure under HYBRIDGL_REQUIRE_E2E=1, as in CI). Every wait is bounded.
"""
from __future__ import annotations

import base64
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

CHROMIUM = os.environ.get("HYBRIDGL_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("HYBRIDGL_CHROMEDRIVER", "/usr/bin/chromedriver")
# what Chromium needs to run as root in a container, without reaching out to the network
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         "--window-size=1400,900", "--force-device-scale-factor=1"]


def require_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (requirements-dev.txt)")
    if not missing:
        return
    message = f"no browser for the UI test: {', '.join(missing)} missing (bash scripts/setup.sh --dev --e2e)"
    if os.environ.get("HYBRIDGL_REQUIRE_E2E") == "1":
        pytest.fail(message + "; HYBRIDGL_REQUIRE_E2E=1 makes this a failure")
    pytest.skip(message)


class Browser:
    """One headless Chromium with a throw-away profile; `quit()` ends it and removes the profile."""

    def __init__(self, timeout: float = 60):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="hybridgl-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS + [f"--user-data-dir={self.profile}"]:
            options.add_argument(flag)
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.set_page_load_timeout(timeout)
        self.driver.set_script_timeout(timeout)
        self.timeout = timeout

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)

    # -- waiting and finding --------------------------------------------------------------------------
    def wait(self, what: str, condition: Callable[[], Any], timeout: float | None = None) -> Any:
        """Poll condition() until it returns something truthy; bounded, with what it waited for on failure."""
        deadline = time.time() + (timeout or self.timeout)
        last: Exception | None = None
        while time.time() < deadline:
            try:
                value = condition()
                if isinstance(value, np.ndarray) or value:
                    return value
            except Exception as exc:  # noqa: BLE001 - the page is still changing; retried
                last = exc
            time.sleep(0.25)
        shot = Path(self.profile).with_name(Path(self.profile).name + "-timeout.png")
        self.driver.save_screenshot(str(shot))  # what the page showed, for the failure message
        raise TimeoutError(f"waited {timeout or self.timeout:.0f} s for {what}" + (f" (last error: {last})" if last else "")
                           + f"; the page: {shot}")

    def by_text(self, text: str, within: str = ""):
        """The visible element whose own text (or a button whose text) is `text`, within an XPath prefix."""
        from selenium.webdriver.common.by import By

        q = _xpath_str(text)
        for element in self.driver.find_elements(
                By.XPATH, f"{within}//*[normalize-space(text())={q}] | {within}//button[normalize-space(.)={q}]"):
            if element.is_displayed() or within:
                return element
        return None

    def click(self, element) -> None:
        """Click through JavaScript: the element may sit in a scrolled menu."""
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].click();", element)

    def click_on(self, what: str, find: Callable[[], Any], timeout: float | None = None) -> None:
        """Find and click, retried (bounded) while the page re-renders under it (stale or absent element)."""
        def attempt():
            element = find()
            if element:
                self.click(element)
                return True
            return None

        self.wait(what, attempt, timeout)

    def screenshot(self, path: Path | None) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.driver.save_screenshot(str(path))

    # -- Label Studio ---------------------------------------------------------------------------------
    def login(self, url: str, email: str, password: str) -> None:
        from selenium.webdriver.common.by import By

        self.driver.get(url + "/user/login/")
        self.wait("the login form", lambda: self.driver.find_elements(By.NAME, "email"))
        self.driver.find_element(By.NAME, "email").send_keys(email)
        self.driver.find_element(By.NAME, "password").send_keys(password)
        self.driver.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
        self.wait("the login to finish", lambda: "/user/login" not in self.driver.current_url)

    def table(self) -> list[dict[str, str]]:
        """The Data Manager's task table as shown: one {column title: cell text} per row, in order."""
        return self.driver.execute_script("""
            const head = Array.from(document.querySelectorAll('.lsf-table-head > *')).map(h => h.innerText.trim());
            return Array.from(document.querySelectorAll('.lsf-table-row')).map(row => {
              const cells = Array.from(row.querySelectorAll(':scope > .lsf-table__cell')).map(c => c.innerText.trim());
              const out = {}; head.forEach((h, i) => { if (h && i < cells.length) out[h] = cells[i]; }); return out;
            });""")

    def editor_task_id(self) -> int | None:
        """The task id the editor shows in its bottom bar (the "#12" of the label stream)."""
        text = self.driver.execute_script("""
            const e = document.querySelector('.lsf-current-task__task-id');
            return e && e.firstChild && e.firstChild.nodeType === Node.TEXT_NODE ? e.firstChild.textContent : null;""")
        text = (text or "").strip().lstrip("#")
        return int(text) if text.isdigit() else None

    def drawn_mask(self, size: tuple[int, int]) -> np.ndarray:
        """What the editor draws over the image, as the image's pixels see it: float [H,W] (size = (H, W)).

        Every canvas layer of the image stage except the image itself (the opaque one) is read back,
        their alpha composed (max), and each displayed pixel is mapped to the image pixel it covers
        through the rectangle of the editor's <img> (the largest on the page; the stage can be a window
        into a larger image).
        The result is the mean alpha of the screen pixels that fall on each image pixel.
        """
        data = self.driver.execute_script("""
            const area = i => { const r = i.getBoundingClientRect(); return r.width * r.height; };
            const img = Array.from(document.querySelectorAll('img')).sort((a, b) => area(b) - area(a))[0];
            if (!img || !img.complete || !img.naturalWidth) return null;
            let stage = null, alpha = null;
            for (const c of document.querySelectorAll('.konvajs-content canvas')) {
              const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
              let opaque = 0; for (let i = 3; i < px.length; i += 4) if (px[i] === 255) opaque++;
              if (opaque > 0.99 * c.width * c.height) continue;  // the image layer
              if (!alpha) { alpha = new Uint8Array(c.width * c.height); stage = c; }
              if (c.width * c.height !== alpha.length) continue;
              for (let i = 0; i < alpha.length; i++) alpha[i] = Math.max(alpha[i], px[4 * i + 3]);
            }
            if (!alpha) return null;
            let s = ''; for (let i = 0; i < alpha.length; i += 8192) s += String.fromCharCode.apply(null, alpha.subarray(i, i + 8192));
            const r = stage.getBoundingClientRect(), q = img.getBoundingClientRect();
            return {alpha: btoa(s), w: stage.width, h: stage.height, stage: [r.x, r.y, r.width, r.height],
                    img: [q.x, q.y, q.width, q.height], natural: [img.naturalWidth, img.naturalHeight]};""")
        if not data:
            raise AssertionError("no image or no drawn layer on the page")
        h, w = size
        if tuple(data["natural"]) != (w, h):
            raise AssertionError(f"the browser shows the image at {data['natural']}, the prediction is {w}x{h}")
        alpha = np.frombuffer(base64.b64decode(data["alpha"]), dtype=np.uint8).reshape(data["h"], data["w"])
        sx, sy, sw, sh = data["stage"]
        ix, iy, iw, ih = data["img"]
        ys, xs = np.mgrid[0:data["h"], 0:data["w"]]
        page_x = sx + (xs + 0.5) * sw / data["w"]
        page_y = sy + (ys + 0.5) * sh / data["h"]
        col = np.floor((page_x - ix) / iw * w).astype(int)
        row = np.floor((page_y - iy) / ih * h).astype(int)
        inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        total = np.zeros(h * w)
        count = np.zeros(h * w)
        np.add.at(total, row[inside] * w + col[inside], alpha[inside].astype(float))
        np.add.at(count, row[inside] * w + col[inside], 1)
        out = np.full(h * w, np.nan)
        seen = count > 0
        out[seen] = total[seen] / count[seen]
        return out.reshape(h, w)


def correlation(drawn: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation between the drawn alpha and a bool mask, over the image pixels on screen."""
    seen = ~np.isnan(drawn)
    x = drawn[seen] - drawn[seen].mean()
    y = mask[seen].astype(float) - mask[seen].mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom else 0.0


def _xpath_str(text: str) -> str:
    return f'"{text}"' if '"' not in text else "concat('" + text.replace("'", "',\"'\",'") + "')"
