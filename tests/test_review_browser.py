"""The review loop in Label Studio's own UI, in a real browser (headless Chromium, Selenium).

Needs .venv-ls (Label Studio 1.23.2), Debian's chromium and chromium-driver, and selenium
(`bash scripts/setup.sh --dev --e2e` installs all three). Skipped without them, except under
HYBRIDGL_REQUIRE_E2E=1 (CI), where that is a failure.

The project is set up as the README says (its labelling config, verbatim; Connect Model), then
pre-annotated by `python -m backend.preannotate --project N --sampling uncertainty` with three
predictions per task (HYBRIDGL_ALTERNATIVES=3), as its own process. With no further step, the
browser must show:

- the Data Manager's Prediction score column filled with each task's best-mask score (the task
  whose image is missing: 0), and sorted ascending by it;
- Label All Tasks (Uncertainty sampling) serving the lowest score first, then the next lowest;
- the editor pre-filling the best mask, the alternatives told apart by rank and score;
- the mask drawn over the image covering the pixels of the prediction's RLE (not flipped, not
  shifted), for an upright PNG and for a JPEG with EXIF orientation 6.

HYBRIDGL_SCREENSHOTS=DIR keeps the screenshots (docs/review.md shows the ones taken with DIR=docs).
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import urlopen

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from backend.labeling import config_version, parse_config
from tiny_models import GOLDEN_DIR

sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))
from browser import Browser, correlation, require_browser  # noqa: E402
from harness import ROOT, Backend, LabelStudio, readme_config, require_label_studio  # noqa: E402
from serve_tiny import tiny_environment  # noqa: E402

pytestmark = pytest.mark.e2e

EMAIL, PASSWORD = "e2e@example.com", "e2e-password-123"  # the harness's Label Studio user
IMAGE_UPRIGHT = (GOLDEN_DIR / "p00_cup_left_of_plate" / "image.png").read_bytes()


def exif6_jpeg() -> bytes:
    """A JPEG whose pixels are stored rotated, with EXIF orientation 6 (shown upright by browsers)."""
    upright = Image.open(GOLDEN_DIR / "p07_chair_in_middle" / "image.png").convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns it back 90° clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    stored.save(out, "JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


def mask_of(prediction: dict) -> np.ndarray:
    (region,) = prediction["result"]
    h, w = region["original_height"], region["original_width"]
    return np.asarray(decode_rle(region["value"]["rle"])).reshape(h, w, 4)[:, :, 3] > 0


@pytest.fixture(scope="module")
def review(tmp_path_factory):
    """Label Studio + our backend + a project pre-annotated as the README says; then a browser."""
    require_label_studio()
    require_browser()
    work = tmp_path_factory.mktemp("review")
    started = []
    try:
        started.append(Backend(work, "backend", ["--alternatives", "3"]))
        ls = LabelStudio(work)
        started.append(ls)
        backend = started[0].wait()
        project = ls.api("POST", "/api/projects", {"title": "review", "label_config":
                                                   '<View><Image name="image" value="$image"/></View>'})["id"]
        upright = ls.upload(project, "upright.png", IMAGE_UPRIGHT)
        rotated = ls.upload(project, "exif6.jpg", exif6_jpeg())
        ls.api("PATCH", f"/api/projects/{project}", {"label_config": readme_config()})
        data = [{"image": upright, "text": "the cup on the left"}, {"image": upright, "text": "the plate"},
                {"image": rotated, "text": "the chair in the middle"},
                {"image": upright.rsplit("/", 1)[0] + "/missing.png", "text": "the lamp"}]
        tasks = ls.api("POST", f"/api/projects/{project}/import?return_task_ids=true", data)["task_ids"]
        ml = ls.api("POST", "/api/ml", {"url": backend.url, "project": project, "title": "hybridgl",
                                        "is_interactive": True})
        assert ml["state"] == "CO", ml

        env = {k: v for k, v in os.environ.items() if not k.startswith(("HYBRIDGL_", "LABEL_STUDIO_"))}
        env.update(tiny_environment(work, alternatives=3))
        env.update({"MODEL_DIR": str(work / "model-dir"), "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])})
        run = subprocess.run([sys.executable, "-m", "backend.preannotate", "--url", ls.url, "--api-key", ls.token,
                              "--project", str(project), "--sampling", "uncertainty", "--no-progress", "--json"],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 1, run.stderr[-3000:]  # one task failed (its image is missing), the rest done
        summary = json.loads(run.stdout.strip().splitlines()[-1])
        version = config_version(json.load(urlopen(backend.url + "/health", timeout=10))["model_version"],
                                 parse_config(readme_config()))  # the backend's, for this config
        assert summary["model_version"] == version and summary["done"] == 3 and summary["failed"] == 1

        browser = Browser()
        started.append(browser)
        browser.login(ls.url, EMAIL, PASSWORD)
        shots = os.environ.get("HYBRIDGL_SCREENSHOTS")
        yield {"ls": ls, "backend": backend, "project": project, "tasks": tasks, "version": version,
               "browser": browser,
               "shots": Path(shots) if shots else None}
    finally:
        for thing in reversed(started):
            thing.quit() if isinstance(thing, Browser) else thing.stop()


def predictions(ls: LabelStudio, task: int) -> list[dict]:
    return sorted(ls.api("GET", f"/api/predictions?task={task}"), key=lambda p: p["id"])


def best_scores(r) -> dict[int, float]:
    """Each task's score as the API has it: its prediction of the project's version."""
    out = {}
    for task in r["tasks"]:
        (best,) = [p for p in predictions(r["ls"], task) if p["model_version"] == r["version"]]
        out[task] = best["score"]
    return out


def shot(r, name: str) -> Path | None:
    return r["shots"] / f"review-{name}.png" if r["shots"] else None


def test_data_manager_shows_and_sorts_the_scores(review):
    r, b = review, review["browser"]
    scores = best_scores(r)
    assert scores[r["tasks"][3]] == 0.0  # the task whose image is missing
    b.driver.get(f"{r['ls'].url}/projects/{r['project']}/data")
    b.wait("the task table", lambda: len(b.table()) == len(r["tasks"]))
    assert "Prediction score" not in b.table()[0]  # Label Studio hides the column by default
    want = sorted(scores, key=lambda t: (scores[t], t))

    def show_sorted_by_score():
        """Columns -> Prediction score, Order by -> Prediction score; redone while the Data Manager,
        still loading its view, resets them."""
        rows = b.table()
        if rows and "Prediction score" not in rows[0]:
            b.click_on("the Columns button", lambda: b.by_text("Columns"))
            b.click_on("the Prediction score column", lambda: b.by_text("Prediction score", "//label"))
            b.driver.find_element("tag name", "body").send_keys("\ue00c")  # Escape closes the menu
            still_open = b.by_text("Prediction model versions", "//label")  # only the Columns menu lists it
            if still_open is not None and still_open.is_displayed():  # Escape went unheard: toggle it shut
                b.click(b.by_text("Columns"))
        elif rows and [int(x["ID"]) for x in rows] != want and b.by_text("Order by"):
            b.click(b.by_text("Order by"))
            # the Order by entry, never the Columns menu's checkbox of the same name (that hides the column)
            b.click_on("the Order by menu", lambda: next(
                (e for e in b.driver.find_elements("xpath", "//*[contains(@class, 'menu')]//*[normalize-space("
                 "text())='Prediction score'][not(ancestor-or-self::label)]") if e.is_displayed()), None))
            b.driver.find_element("tag name", "body").send_keys("\ue00c")
        elif rows and [int(x["ID"]) for x in rows] == want:
            return rows
        time.sleep(2)  # let the Data Manager apply it
        return None

    rows = b.wait("the table with the Prediction score column, sorted by it", show_sorted_by_score, 180)
    shown = {int(x["ID"]): float(x["Prediction score"]) for x in rows}
    assert shown == pytest.approx(scores, abs=5e-4)  # the column shows 3 decimals
    assert [shown[int(x["ID"])] for x in rows] == sorted(shown.values())
    b.screenshot(shot(r, "data-manager"))


def test_review_queue_serves_the_lowest_score_first(review):
    r, b = review, review["browser"]
    scores = best_scores(r)
    queue = sorted(scores, key=lambda t: scores[t])
    b.driver.get(f"{r['ls'].url}/projects/{r['project']}/data")
    b.click_on("Label All Tasks", lambda: b.by_text("Label All Tasks"))
    assert b.wait("the first task of the queue", b.editor_task_id) == queue[0]  # the failed task: 0
    b.screenshot(shot(r, "queue-failed"))
    b.click_on("the Skip button", lambda: b.by_text("Skip"))
    assert b.wait("the next task of the queue", lambda: (
        t if (t := b.editor_task_id()) != queue[0] else None)) == queue[1]  # then the lowest real score


def test_editor_prefills_the_best_mask_and_draws_it_where_the_rle_says(review):
    r, b = review, review["browser"]
    task = r["tasks"][0]
    preds = predictions(r["ls"], task)
    # stored worst first; only the best has the project's version, the others say their rank
    assert [p["model_version"] for p in preds] == [r["version"] + "-rank3", r["version"] + "-rank2", r["version"]]
    best, rank2, rank3 = preds[2], preds[1], preds[0]
    assert best["score"] >= rank2["score"] >= rank3["score"]
    b.driver.get(f"{r['ls'].url}/projects/{r['project']}/data?task={task}")
    tabs = b.wait("the annotation tabs", lambda: [t for t in b.driver.execute_script(
        "return Array.from(document.querySelectorAll('.lsf-annotation-button')).map(e => e.innerText)")
        if "%" in t])
    # each prediction's tab shows its version (rank) and score, best first
    for p, tab in zip((best, rank2, rank3), tabs):
        assert f"{100 * p['score']:.2f}%" in tab, tabs
    assert "rank2" in tabs[1] and "rank3" in tabs[2] and "rank" not in tabs[0], tabs
    # the pre-filled draft holds the best mask: its region shows the best score ...
    assert b.wait("the draft's region", lambda: b.by_text(f"{best['score']:.2f}"))
    # ... and the mask drawn over the image is the best mask's RLE, in place
    m_best = mask_of(best)
    drawn = b.wait("the best mask drawn", lambda: _drawn(b, m_best))
    c = correlation(drawn, m_best)
    assert c > max(correlation(drawn, mask_of(rank2)), correlation(drawn, mask_of(rank3))) + 0.05
    _assert_in_place(drawn, m_best, c)
    b.screenshot(shot(r, "editor"))


def test_exif_rotated_jpeg_mask_is_drawn_upright_in_place(review):
    r, b = review, review["browser"]
    task = r["tasks"][2]
    best = [p for p in predictions(r["ls"], task) if p["model_version"] == r["version"]][0]
    mask = mask_of(best)
    upright = Image.open(GOLDEN_DIR / "p07_chair_in_middle" / "image.png")
    assert mask.shape == (upright.height, upright.width)  # the RLE is at the upright size
    b.driver.get(f"{r['ls'].url}/projects/{r['project']}/data?task={task}")
    drawn = b.wait("the mask drawn", lambda: _drawn(b, mask))
    c = correlation(drawn, mask)
    _assert_in_place(drawn, mask, c)
    b.screenshot(shot(r, "exif"))


def _drawn(b: Browser, mask: np.ndarray) -> np.ndarray | None:
    """What the page draws once it matches `mask` (correlation > 0.8), else None: the editor may still
    be loading the image or the region, or showing the previously opened task's."""
    drawn = b.drawn_mask(mask.shape)
    seen = drawn[~np.isnan(drawn)]
    return drawn if seen.size and seen.max() > 0 and correlation(drawn, mask) > 0.8 else None


def _assert_in_place(drawn: np.ndarray, mask: np.ndarray, c: float) -> None:
    """Not flipped, not transposed back, not shifted: every such variant correlates clearly less."""
    variants = {"upside down": mask[::-1], "mirrored": mask[:, ::-1]}
    variants.update({f"shifted {dy},{dx}": np.roll(mask, (dy, dx), (0, 1))
                     for dy in (-2, 0, 2) for dx in (-2, 0, 2) if (dy, dx) != (0, 0)})
    for name, variant in variants.items():
        assert correlation(drawn, variant) < c - 0.1, name


def test_smart_tools_and_prompt_each_bring_a_suggestion(review):
    """Auto-Annotation on: a point clicked with *Click the object*, a box drawn with *Box the object*
    and an expression typed in the TextArea each make Label Studio ask the backend, and the editor
    offers the answer as a suggestion."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    r, b = review, review["browser"]
    b.driver.get(f"{r['ls'].url}/projects/{r['project']}/data?task={r['tasks'][1]}")
    b.wait("the image", lambda: b.driver.find_elements(By.CSS_SELECTOR, ".konvajs-content canvas"))
    b.click_on("the Auto-Annotation switch", lambda: b.driver.find_element(
        By.CSS_SELECTOR, "[data-testid=bottombar-auto-annotation-toggle]"))
    b.wait("the smart tools", lambda: b.driver.find_elements(By.CSS_SELECTOR, "[aria-label=key-point-tool]"))

    def ask(tool: str | None, label: str | None, gesture) -> None:
        before = interactive_requests(r)
        if tool:
            b.click_on(tool, lambda: b.driver.find_element(By.CSS_SELECTOR, f"[aria-label={tool}]"))
            b.click_on(label, lambda: b.by_text(label))
        canvas = b.driver.find_elements(By.CSS_SELECTOR, ".konvajs-content canvas")[-1]  # the stage, as now
        b.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)  # a label click scrolls
        gesture(canvas)
        b.wait(f"the backend to be asked ({tool or 'prompt'})", lambda: interactive_requests(r) > before, 120)
        rejects = lambda: b.driver.find_elements(By.CSS_SELECTOR, "[data-testid=bottombar-reject-suggestions-button]")
        b.wait(f"the suggestion ({tool or 'prompt'})", rejects, 120)
        assert "1 suggestion" in b.driver.find_element(By.TAG_NAME, "body").text
        b.screenshot(shot(r, f"smart-{tool or 'prompt'}"))
        b.click_on("Reject", lambda: rejects()[0])  # the next tool starts from a clean slate
        b.wait("the suggestion to go", lambda: not b.driver.find_elements(
            By.CSS_SELECTOR, "[data-testid=bottombar-reject-suggestions-button]"))

    ask("key-point-tool", "Click the object",
        lambda canvas: ActionChains(b.driver).move_to_element_with_offset(canvas, -60, 60).click().perform())
    ask("rectangle-tool", "Box the object", lambda canvas: ActionChains(b.driver).move_to_element_with_offset(
        canvas, -200, -100).click_and_hold().move_by_offset(60, 40).move_by_offset(60, 40).release().perform())

    def type_prompt(_canvas):
        box = b.driver.find_element(By.CSS_SELECTOR, "[aria-label='TextArea Input']")
        box.send_keys("the plate")
        box.send_keys(Keys.ENTER)

    ask(None, None, type_prompt)


def interactive_requests(r) -> int:
    """/predict requests the backend answered (Label Studio forwards the editor's smart tools there)."""
    return json.load(urlopen(r["backend"].url + "/metrics", timeout=10))["counts"].get("requests.predict", 0)
