"""The backend in-process: every endpoint, config shape, image source and error, on the tiny models.

A small stdlib HTTP server on 127.0.0.1 plays Label Studio's file endpoints (uploads with token
auth, the PAT refresh, cloud presign redirects) so that the real download code runs.
"""
from __future__ import annotations

import base64
import io
import json
import threading
import time
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from backend._wsgi import create_app
from backend.images import decode_image
from backend.labeling import TaskError, config_version, parse_config
from backend.model import HybridGLBackend, is_our_version
from backend.settings import Settings

from local_http import LocalServer, QuietHandler
from tiny_models import GOLDEN_DIR, tiny_hybridgl

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Text name="expr" value="$text"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Target"/><Label value="Other"/>
  </BrushLabels>
</View>"""
TOKEN = "legacy-token-0123456789"
PAT = ".".join(base64.urlsafe_b64encode(json.dumps(p).encode()).decode().rstrip("=")
               for p in ({"alg": "HS256", "typ": "JWT"}, {"token_type": "refresh"})) + ".c2ln"
IMAGE_A = (GOLDEN_DIR / "p00_cup_left_of_plate" / "image.png").read_bytes()
IMAGE_B = (GOLDEN_DIR / "p07_chair_in_middle" / "image.png").read_bytes()


class FakeLabelStudio(LocalServer):
    """Uploads at /data/upload/<name> (Token or refreshed Bearer auth), /api/token/refresh, presign."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.log: list[tuple[str, str | None]] = []
        outer = self

        class Handler(QuietHandler):
            def authorized(self) -> bool:
                return self.headers.get("Authorization") in (f"Token {TOKEN}", "Bearer access-1")

            def do_POST(self):
                outer.log.append((self.path, self.headers.get("Authorization")))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/api/token/refresh" and body.get("refresh") == PAT:
                    self.send_body(json.dumps({"access": "access-1"}).encode())
                else:
                    self.send_error(401)

            def do_GET(self):
                outer.log.append((self.path, self.headers.get("Authorization")))
                url = urlparse(self.path)
                if url.path.startswith("/tasks/") and url.path.endswith("/presign/"):
                    uri = base64.urlsafe_b64decode(parse_qs(url.query)["fileuri"][0]).decode()
                    if not self.authorized():
                        return self.send_error(401)
                    self.send_response(302)
                    self.send_header("Location", "/bucket/" + uri.split("/")[-1])
                    self.end_headers()
                    return
                name = url.path.split("/")[-1]
                if url.path.startswith("/data/upload/") and not self.authorized():
                    return self.send_error(401)
                if name not in outer.files:
                    return self.send_error(404)
                self.send_body(outer.files[name])

        super().__init__(Handler)


def png(array: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def ls():
    server = FakeLabelStudio({"a.png": IMAGE_A, "b.png": IMAGE_B, "broken.png": IMAGE_A[:300],
                              "text.png": b"this is not an image"})
    yield server
    server.close()


@pytest.fixture(scope="module")
def model():
    return tiny_hybridgl(sam=True)


def make_client(model, **settings):
    backend = HybridGLBackend(model, Settings(**settings))
    return backend, create_app(backend).test_client()


@pytest.fixture(scope="module")
def client(model, ls):
    return make_client(model, label_studio_url=ls.url, label_studio_api_key=TOKEN)


def task(i, image="a.png", text="the cup to the left of the plate"):
    return {"id": i, "data": {"image": f"/data/upload/1/{image}", "text": text}}


def predict(client, tasks, config=CONFIG, context=None):
    r = client.post("/predict", json={"tasks": tasks, "label_config": config, "params": {"context": context}})
    assert r.status_code == 200
    return r.get_json()["results"]


def decoded(region) -> np.ndarray:
    h, w = region["original_height"], region["original_width"]
    return decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0


def test_health_setup_webhook_metrics(client):
    backend, c = client
    health = c.get("/health").get_json()
    assert health["status"] == "UP" and health["model_class"] == "HybridGLBackend"
    assert health["device"] == "cpu" and health["parser"] == "rules"
    assert c.get("/").get_json() == health
    first = c.post("/setup", json={"project": "1.1", "schema": CONFIG}).get_json()
    second = c.post("/setup", json={"project": "1.1", "schema": CONFIG}).get_json()
    # the version of the config's predictions (Label Studio asks only for tasks without one)
    assert first == second == {"model_version": config_version(health["model_version"], parse_config(CONFIG))}
    assert c.post("/setup", json={"project": "1.1"}).get_json() == first  # the config it keeps for the project
    # a config edit that hides the stored predictions (another label, a renamed tag): another version
    for edited in (CONFIG.replace('BrushLabels name="mask"', 'BrushLabels name="brush"'),
                   CONFIG.replace("<BrushLabels ", '<BrushLabels hybridgl_label="Other" ')):
        version = c.post("/setup", json={"project": "1.1", "schema": edited}).get_json()["model_version"]
        assert version.startswith(health["model_version"] + "-cfg") and version != first["model_version"]
    assert c.post("/setup", json={"project": "9.1", "schema": "<View/>"}).get_json() == \
        {"model_version": health["model_version"]}  # a config it cannot predict for: the model's
    for action in ("ANNOTATION_CREATED", "PROJECT_UPDATED", "START_TRAINING", "whatever"):
        assert c.post("/webhook", json={"action": action}).status_code == 200
    assert c.get("/metrics").get_json()["counts"]["webhook.START_TRAINING"] == 1


def test_prediction_matches_the_library(client, model):
    backend, c = client
    (result,) = predict(c, [task(1)])
    assert result["model_version"] == config_version(backend.model_version, parse_config(CONFIG))
    (region,) = result["result"]
    assert region["type"] == "brushlabels" and region["from_name"] == "mask" and region["to_name"] == "image"
    assert region["value"]["brushlabels"] == ["Target"] and region["image_rotation"] == 0
    image = Image.open(io.BytesIO(IMAGE_A))
    assert (region["original_width"], region["original_height"]) == image.size
    seg = model.segment(model.prepare(image), "the cup to the left of the plate")
    np.testing.assert_array_equal(decoded(region), seg.mask)
    assert result["score"] == pytest.approx(seg.score) and region["score"] == pytest.approx(seg.score)


def test_batch_order_shared_image_cache_and_bad_tasks(client):
    backend, c = client
    before = backend.counters.snapshot()
    tasks = [task(10, "a.png", "the plate"), task(11, "missing.png"), task(12, "b.png", "the chair"),
             task(13, "a.png", "the cup"), {"id": 14, "data": {"image": "/data/upload/1/a.png"}},
             task(15, "broken.png"), task(16, "text.png"), task(17, "a.png", "   ")]
    results = predict(c, tasks)
    assert len(results) == len(tasks)
    ok = [i for i, r in enumerate(results) if "error" not in r]
    assert ok == [0, 2, 3]
    version = config_version(backend.model_version, parse_config(CONFIG))
    for i in ok:
        assert len(results[i]["result"]) == 1 and results[i]["score"] > 0 and results[i]["model_version"] == version
    # a failure of the task's own data is an empty prediction scored 0 of our version, which Label
    # Studio stores: the task sorts first for review and is not asked again on every opening
    for i in (1, 4, 5, 6, 7):
        r = results[i]
        assert (r["result"], r["score"], r["model_version"], r["task"]) == ([], 0.0, version, tasks[i]["id"])
        assert r["reason"] == f"{r['kind']}: {r['error']}"
    kinds = [r.get("kind") for r in results]
    assert kinds[1] == "missing_image" and kinds[4] == "no_expression" and kinds[5] == "bad_image"
    assert kinds[6] == "bad_image" and kinds[7] == "no_expression"
    after = backend.counters.snapshot()
    assert after.get("errors.missing_image", 0) - before.get("errors.missing_image", 0) == 1
    assert after.get("errors.bad_image", 0) - before.get("errors.bad_image", 0) == 2
    # two tasks on a.png: the second reuses the prepared image (the first may be cached already)
    assert after.get("cache.hits", 0) - before.get("cache.hits", 0) >= 1
    metrics = c.get("/metrics").get_json()["counts"]
    assert metrics["errors.no_expression"] >= 2


@pytest.mark.parametrize("config, message", [
    ("<View><Text name='t' value='$text'/></View>", "no <Image"),
    ("<View><Image name='image' value='$image'/><Text name='t' value='$text'/></View>", "no <BrushLabels>"),
    ("<View><Image name='image' value='$image'/><BrushLabels name='m' toName='image'><Label value='A'/>"
     "</BrushLabels></View>", "no <Text"),
    ("<View><Image", "not valid XML"),
    ("", "no labelling config"),
])
def test_wrong_configs_give_a_clear_error_per_task(client, config, message):
    _, c = client
    results = predict(c, [task(1), task(2)], config=config)
    assert len(results) == 2
    for r in results:
        assert "result" not in r and r["kind"] == "config" and message in r["error"]


def test_config_attribute_chooses_label_and_text_field():
    xml = ("<View><Image name='img' value='$photo'/><Text name='a' value='$caption'/><Text name='b' value='$ref'/>"
           "<BrushLabels name='m' toName='img' hybridgl_label='Other' hybridgl_text='ref'>"
           "<Label value='Target'/><Label value='Other'/></BrushLabels></View>")
    ui = parse_config(xml)
    assert (ui.image_name, ui.image_field, ui.brush_name, ui.label, ui.text_field) == ("img", "photo", "m", "Other", "ref")
    with pytest.raises(TaskError, match="not a Label"):
        parse_config(xml.replace("hybridgl_label='Other'", "hybridgl_label='Nope'"))


def test_long_configs_are_parsed_but_not_cached():
    """parse_config's cache held its last 64 configs whatever their size (a /predict may carry one of
    up to 128 MB): configs longer than CACHED_CONFIG_CHARS are parsed each time instead."""
    from backend import labeling

    labeling._cached_config.cache_clear()
    long = CONFIG.replace("</View>", "<!--" + "x" * labeling.CACHED_CONFIG_CHARS + "--></View>")
    assert parse_config(long) == parse_config(CONFIG)
    assert labeling._cached_config.cache_info().currsize == 1  # CONFIG only


def test_alternatives_and_interactive_context(model, ls):
    backend, c = make_client(model, label_studio_url=ls.url, label_studio_api_key=TOKEN, alternatives=3)
    assert backend.model_version == model.model_version  # the best mask does not change with alternatives
    (preds,) = predict(c, [task(1)])
    assert isinstance(preds, list) and len(preds) == 3
    # worst first, best last (the editor lists the newest first); only the best has the version
    # Label Studio's score column averages, the others are told apart by rank
    model_v, v = backend.model_version, config_version(backend.model_version, parse_config(CONFIG))
    assert [p["model_version"] for p in preds] == [v + "-rank3", v + "-rank2", v]
    assert [is_our_version(p["model_version"], model_v) for p in preds] == [True] * 3
    assert is_our_version(model_v, model_v) and is_our_version(model_v + "-rank2", model_v)  # before config_version
    assert not is_our_version(v + "-rank", model_v) and not is_our_version("x" + v, model_v)
    assert not is_our_version(model_v + "-cfg", model_v) and not is_our_version(None, model_v)
    preds = preds[::-1]
    masks = [decoded(p["result"][0]) for p in preds]
    assert not np.array_equal(masks[0], masks[1])
    assert preds[0]["score"] >= preds[1]["score"] >= preds[2]["score"]
    # each score is the mask's own confidence (its softmax share among the candidates), whatever
    # the number of alternatives asked for: the best mask's score is the same with one prediction
    _, c1 = make_client(model, label_studio_url=ls.url, label_studio_api_key=TOKEN, alternatives=1)
    (single,) = predict(c1, [task(1)])
    assert single["score"] == preds[0]["score"] and single["model_version"] == v
    np.testing.assert_array_equal(decoded(single["result"][0]), masks[0])
    # a TextArea prompt replaces the task's text; a clicked point restricts the candidates
    view = backend.prepared(IMAGE_A, decode_image(IMAGE_A, 10**8))
    y, x = np.argwhere(view.masks[0])[0]
    h, w = view.size
    context = {"result": [
        {"type": "textarea", "from_name": "prompt", "value": {"text": ["the plate"]}},
        {"type": "keypointlabels", "is_positive": True, "value": {"x": 100 * (x + 0.5) / w, "y": 100 * (y + 0.5) / h}},
    ]}
    config = CONFIG.replace("</View>", "<TextArea name='prompt' toName='image'/></View>")
    (pred,) = predict(c, [task(1, text="ignored")], config=config, context=context)
    assert isinstance(pred, dict)  # interactive: the one best suggestion
    m = decoded(pred["result"][0])
    assert m[y, x]  # the chosen proposal contains the clicked point
    allowed = [i for i in range(len(view)) if view.masks[i, y, x]]
    expected = backend.model.segment(view.subset(allowed), "the plate")
    np.testing.assert_array_equal(m, view.masks[allowed[expected.index]])


def test_empty_proposals_give_an_empty_prediction_with_score_zero(ls):
    strict = tiny_hybridgl(sam=True, config=None, pred_iou_thresh=0.99, stability_score_thresh=0.99)
    _, c = make_client(strict, label_studio_url=ls.url, label_studio_api_key=TOKEN)
    (result,) = predict(c, [task(1)])
    assert result["result"] == [] and result["score"] == 0.0


def test_personal_access_token_is_refreshed(model, ls):
    _, c = make_client(model, label_studio_url=ls.url, label_studio_api_key=PAT)
    (result,) = predict(c, [task(1)])
    assert "error" not in result
    assert ("/api/token/refresh", None) in ls.log
    assert any(auth == "Bearer access-1" and path.startswith("/data/upload/") for path, auth in ls.log)


def test_setup_hostname_and_token_take_precedence(model, ls):
    _, c = make_client(model)  # nothing in the environment
    (result,) = predict(c, [task(1)])
    assert result["kind"] == "no_label_studio"
    c.post("/setup", json={"hostname": ls.url, "access_token": TOKEN})
    (result,) = predict(c, [task(1)])
    assert "error" not in result


def test_cloud_uri_goes_through_presign(client, ls):
    _, c = client
    (result,) = predict(c, [{"id": 77, "data": {"image": "s3://bucket/b.png", "text": "the chair"}}])
    assert "error" not in result
    assert any(p.startswith("/tasks/77/presign/?fileuri=") for p, _ in ls.log)


def test_local_files_root_and_traversal_refused(model, tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(IMAGE_A)
    (tmp_path / "secret.png").write_bytes(IMAGE_A)
    _, c = make_client(model, local_files_root=tmp_path / "imgs")
    ok, outside, absent = predict(c, [
        {"id": 1, "data": {"image": "/data/local-files/?d=a.png", "text": "the cup"}},
        {"id": 2, "data": {"image": "/data/local-files/?d=../secret.png", "text": "the cup"}},
        {"id": 3, "data": {"image": "/data/local-files/?d=nope.png", "text": "the cup"}},
    ])
    assert "error" not in ok and outside["kind"] == "forbidden" and absent["kind"] == "missing_image"


def test_local_files_decode_d_like_label_studio_and_bad_names_are_task_errors(model, tmp_path):
    """Label Studio builds `?d=quote(path)` and its view reads request.GET['d'] (decoded once, the last
    value, a leading '/' dropped): a file whose name holds '%41' must not become 'A'; a name too long
    for the OS is a missing image, not an internal error."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "cup%41.png").write_bytes(IMAGE_A)  # as quote() writes it: ?d=cup%2541.png
    (tmp_path / "imgs" / "cupA.png").write_bytes(IMAGE_B)  # what a second decoding would read instead
    (tmp_path / "imgs" / "b.png").write_bytes(IMAGE_B)
    (tmp_path / "imgs" / "loop1").symlink_to("loop2")
    (tmp_path / "imgs" / "loop2").symlink_to("loop1")
    backend, c = make_client(model, local_files_root=tmp_path / "imgs")
    assert backend.fetcher.fetch("/data/local-files/?d=cup%2541.png") == IMAGE_A
    assert backend.fetcher.fetch("/data/local-files/?d=%2Fb.png") == IMAGE_B  # Label Studio: relative to the root
    assert backend.fetcher.fetch("/data/local-files/?d=a.png&d=b.png") == IMAGE_B  # the last value, as Django
    long_name, deep, loop, ok = predict(c, [
        {"id": 1, "data": {"image": "/data/local-files/?d=" + "x" * 300 + ".png", "text": "the cup"}},
        {"id": 2, "data": {"image": "/data/local-files/?d=" + "d/" * 3000 + "x.png", "text": "the cup"}},
        {"id": 3, "data": {"image": "/data/local-files/?d=loop1/x.png", "text": "the cup"}},
        {"id": 4, "data": {"image": "/data/local-files/?d=b.png", "text": "the cup"}},
    ])
    assert [r.get("kind") for r in (long_name, deep, loop)] == ["missing_image"] * 3, (long_name, deep, loop)
    assert "error" not in ok


def test_foreign_hosts_need_the_allow_list(model, ls):
    foreign = ls.url.replace("127.0.0.1", "localhost") + "/bucket/a.png"
    _, c = make_client(model, label_studio_url=ls.url, label_studio_api_key=TOKEN)
    (result,) = predict(c, [{"id": 1, "data": {"image": foreign, "text": "the cup"}}])
    assert result["kind"] == "forbidden" and "HYBRIDGL_ALLOWED_HOSTS" in result["error"]
    # an allowed name that resolves to a loopback address needs that network allowed too
    _, c = make_client(model, label_studio_url=ls.url, label_studio_api_key=TOKEN, allowed_hosts=("localhost",))
    (result,) = predict(c, [{"id": 1, "data": {"image": foreign, "text": "the cup"}}])
    assert result["kind"] == "forbidden" and "HYBRIDGL_ALLOWED_NETWORKS" in result["error"]
    _, c = make_client(model, label_studio_url=ls.url, label_studio_api_key=TOKEN, allowed_hosts=("localhost",),
                       allowed_networks=("127.0.0.0/8",))
    (result,) = predict(c, [{"id": 1, "data": {"image": foreign, "text": "the cup"}}])
    assert "error" not in result
    assert not any(auth and path == "/bucket/a.png" for path, auth in ls.log)  # no token to other hosts


def test_basic_auth(model):
    _, c = make_client(model, basic_auth_user="ls", basic_auth_pass="pw")
    assert c.get("/health").status_code == 401
    good = {"Authorization": "Basic " + base64.b64encode(b"ls:pw").decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(b"ls:no").decode()}
    assert c.get("/health", headers=good).status_code == 200
    assert c.post("/setup", json={}, headers=bad).status_code == 401


def test_malformed_requests(client):
    _, c = client
    assert c.post("/predict", data="nope", content_type="application/json").status_code == 400
    assert c.post("/predict", json={"tasks": "x"}).status_code == 400
    (r,) = predict(c, [task(1, text="x" * 5000)])
    assert r["kind"] == "bad_expression"


@pytest.mark.parametrize("make, shape", [
    (lambda: png((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)), (48, 64, 3)),  # 16-bit grey
    (lambda: png(np.full((20, 30), 7, np.uint8), "L"), (20, 30, 3)),
    (lambda: png(np.zeros((20, 30, 4), np.uint8), "RGBA"), (20, 30, 3)),
    (lambda: _save(Image.new("P", (30, 20))), (20, 30, 3)),
    (lambda: _save(Image.new("CMYK", (30, 20), (0, 255, 0, 0)), "JPEG"), (20, 30, 3)),
])
def test_image_modes_decode_to_rgb(make, shape):
    out = decode_image(make(), 10**8)
    assert out.shape == shape and out.dtype == np.uint8


def test_cmyk_colour_and_bombs():
    cyan = decode_image(_save(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "TIFF"), 10**8)
    assert tuple(cyan[0, 0]) == (0, 255, 255)
    with pytest.raises(TaskError, match="exceeds HYBRIDGL_MAX_IMAGE_PIXELS"):
        decode_image(png(np.zeros((100, 100, 3), np.uint8)), 5000)
    with pytest.raises(TaskError, match="not an image"):
        decode_image(b"GIF89a-not-really", 10**8)


def test_health_answers_while_a_prediction_runs(model, ls):
    backend, c = make_client(model, label_studio_url=ls.url, label_studio_api_key=TOKEN, cache_images=0)
    app = create_app(backend)
    done = threading.Event()

    def slow():
        with app.test_client() as cc:
            cc.post("/predict", json={"tasks": [task(i) for i in range(3)], "label_config": CONFIG})
        done.set()

    with backend.gpu_lock:  # hold the model: /predict must wait, /health and /setup must not
        t = threading.Thread(target=slow)
        t.start()
        start = time.time()
        assert app.test_client().get("/health").status_code == 200
        assert app.test_client().post("/setup", json={}).status_code == 200
        assert time.time() - start < 1.0 and not done.is_set()
    t.join(120)
    assert done.is_set()


def _save(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


# -- EXIF, interactive hints, connections, limits, logs ---------------------------------------------

def exif_rotated_jpeg() -> tuple[bytes, Image.Image]:
    """A 64x48 JPEG stored sideways with EXIF orientation 6 (shown 48 wide, 64 high), and how it shows."""
    stored = Image.open(io.BytesIO(IMAGE_A)).convert("RGB").resize((64, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    data = buf.getvalue()
    from PIL import ImageOps

    return data, ImageOps.exif_transpose(Image.open(io.BytesIO(data)))


def test_exif_orientation_gives_the_displayed_size(model, ls):
    data, shown = exif_rotated_jpeg()
    assert shown.size == (48, 64)
    ls.files["rotated.jpg"] = data
    _, c = make_client(model, label_studio_url=ls.url, label_studio_api_key=TOKEN)
    (result,) = predict(c, [task(1, "rotated.jpg", "the cup")])
    region = result["result"][0]
    assert (region["original_width"], region["original_height"]) == (48, 64)
    seg = model.segment(model.prepare(shown), "the cup")
    np.testing.assert_array_equal(decoded(region), seg.mask)


def test_rectangle_and_negative_point_restrict_the_candidates(model, ls):
    backend, c = make_client(model, label_studio_url=ls.url, label_studio_api_key=TOKEN)
    view = backend.prepared(IMAGE_A, decode_image(IMAGE_A, 10**8))
    h, w = view.size
    # a rectangle equal to one proposal's box: that box (and any with IoU >= 0.5) is a candidate
    bx, by, bw, bh = (int(v) for v in view.boxes_xywh[1])
    rect = {"type": "rectanglelabels", "value": {"x": 100 * bx / w, "y": 100 * by / h,
                                                   "width": 100 * bw / w, "height": 100 * bh / h}}
    (pred,) = predict(c, [task(1, text="the plate")], context={"result": [rect]})
    boxes = view.boxes_xywh.astype(float)
    ix = np.clip(np.minimum(boxes[:, 0] + boxes[:, 2], bx + bw) - np.maximum(boxes[:, 0], bx), 0, None)
    iy = np.clip(np.minimum(boxes[:, 1] + boxes[:, 3], by + bh) - np.maximum(boxes[:, 1], by), 0, None)
    iou = ix * iy / (boxes[:, 2] * boxes[:, 3] + bw * bh - ix * iy)
    allowed = np.flatnonzero(iou >= 0.5)
    assert 1 in allowed
    expected = model.segment(view.subset(allowed), "the plate")
    np.testing.assert_array_equal(decoded(pred["result"][0]), view.masks[allowed[expected.index]])
    # a negative point removes the proposals containing it
    coverage = view.masks.sum(axis=0)
    y, x = np.argwhere((coverage > 0) & (coverage < len(view)))[0]
    neg = {"type": "keypointlabels", "is_positive": False, "value": {"x": 100 * (x + .5) / w, "y": 100 * (y + .5) / h}}
    (pred,) = predict(c, [task(1, text="the plate")], context={"result": [neg]})
    allowed = [i for i in range(len(view)) if not view.masks[i, y, x]]
    expected = model.segment(view.subset(allowed), "the plate")
    np.testing.assert_array_equal(decoded(pred["result"][0]), view.masks[allowed[expected.index]])
    assert not decoded(pred["result"][0])[y, x]
    # a point outside every proposal, and a malformed region: clear per-task errors
    (r,) = predict(c, [task(1)], context={"result": [{"type": "keypointlabels", "value": {"x": "a", "y": 1}}]})
    assert r["kind"] == "bad_context"


def test_label_studio_unreachable_is_a_task_error_and_the_server_keeps_serving(model, ls):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed
    backend, c = make_client(model, label_studio_url=dead, label_studio_api_key=TOKEN, fetch_timeout=5)
    (r,) = predict(c, [task(1)])
    assert r["kind"] == "unreachable" and "could not reach" in r["error"]
    assert c.get("/metrics").get_json()["counts"]["errors.unreachable"] == 1
    assert c.get("/health").status_code == 200
    # a /setup hostname that is unreachable from the backend (e.g. `localhost` in a container) falls back
    # to LABEL_STUDIO_URL, with the token /setup sent when the environment has none
    _, c = make_client(model, label_studio_url=ls.url)
    c.post("/setup", json={"project": "5.1", "hostname": dead, "access_token": TOKEN, "schema": CONFIG})
    (r,) = predict(c, [task(1)])
    assert "error" not in r


def test_setup_remembers_the_config_and_connection_per_project(model, ls):
    _, c = make_client(model)
    c.post("/setup", json={"project": "7.1", "hostname": ls.url, "access_token": TOKEN, "schema": CONFIG})
    r = c.post("/predict", json={"tasks": [task(1)], "project": "7.1"})  # no label_config: the project's
    assert "error" not in r.get_json()["results"][0]
    r = c.post("/predict", json={"tasks": [task(1)], "project": "8.1"})  # unknown project, no config
    assert r.get_json()["results"][0]["kind"] == "config"


def test_tokens_never_reach_the_logs(model, ls, caplog):
    caplog.set_level("DEBUG")
    for token in (TOKEN, PAT):
        _, c = make_client(model, label_studio_url=ls.url, label_studio_api_key=token)
        c.post("/setup", json={"project": "1.1", "hostname": ls.url, "access_token": token})
        predict(c, [task(1), task(2, "missing.png"), task(3, "text.png")])
        _, c = make_client(model, label_studio_url=ls.url + "/nowhere", label_studio_api_key=token)
        predict(c, [task(1)])
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert "task 2: missing_image" in caplog.text  # the reasons are logged, with the task id
    for secret in (TOKEN, PAT, "access-1"):
        assert secret not in text
    assert TOKEN not in repr(Settings(label_studio_api_key=TOKEN).describe())


def test_an_image_host_that_is_temporarily_unavailable_is_retried_not_recorded(model):
    """An image host answering 429, 502, 503 or 504 (busy, or down behind its proxy) was a "fetch"
    failure of the task: its empty score-0 prediction was stored, so no retrieval or rerun ever
    tried the task again. Those are now `unreachable` (nothing stored: retried later); a 500 or
    410 stays the task's failure (Label Studio answers 500 for a missing upload)."""
    class Flaky(QuietHandler):
        def do_GET(self):
            self.send_response(int(self.path.strip("/").split(".")[0]))
            self.send_header("Content-Length", "0")
            self.end_headers()

    with LocalServer(Flaky) as server:
        _, c = make_client(model, allowed_hosts=("127.0.0.1",))
        codes = (429, 502, 503, 504, 500, 410)
        results = predict(c, [{"id": i, "data": {"image": f"{server.url}/{code}.png", "text": "the cup"}}
                              for i, code in enumerate(codes)])
    for code, r in zip(codes, results):
        if code in (500, 410):
            assert r["score"] == 0.0 and r["result"] == [] and "fetch" in r["reason"], (code, r)
        else:
            assert r["kind"] == "unreachable" and "result" not in r and f"HTTP {code}" in r["error"], (code, r)


def test_redirects_from_allowed_hosts_must_stay_on_allowed_hosts(model):
    class Redirector(QuietHandler):
        def do_GET(self):
            if self.path == "/image.png":
                self.send_body(IMAGE_A)
                return
            target = "http://localhost:%d/image.png" if self.path == "/elsewhere" else "http://127.0.0.1:%d/image.png"
            self.send_response(302)
            self.send_header("Location", target % self.server.server_address[1])
            self.end_headers()

    with LocalServer(Redirector) as server:
        base = server.url
        _, c = make_client(model, allowed_hosts=("127.0.0.1",))  # an address named: explicitly allowed
        same, other = predict(c, [{"id": 1, "data": {"image": base + "/here", "text": "the cup"}},
                                  {"id": 2, "data": {"image": base + "/elsewhere", "text": "the cup"}}])
        assert "error" not in same
        assert other["kind"] == "forbidden" and "localhost" in other["error"]


def test_limits_on_tasks_and_image_bytes(model, ls):
    _, c = make_client(model, label_studio_url=ls.url, label_studio_api_key=TOKEN, max_tasks=2)
    results = predict(c, [task(1), task(2), task(3)])
    assert [r["kind"] for r in results] == ["too_many_tasks"] * 3
    _, c = make_client(model, label_studio_url=ls.url, label_studio_api_key=TOKEN, max_image_bytes=1000)
    (r,) = predict(c, [task(1)])
    assert r["kind"] == "bad_image" and "HYBRIDGL_MAX_IMAGE_MB" in r["error"]
    (r,) = predict(c, ["not a task"])
    assert r["kind"] == "bad_task"
    (r,) = predict(c, [task(1, text=["a", "list"])])
    assert r["kind"] == "bad_expression"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_refused_by_pillow_too():
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    def bomb(side: int) -> bytes:  # side² pixels of 1-bit zeros: a few kB compressed
        z = zlib.compressobj(9)
        row = b"\0" * (1 + side // 8)
        body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                + chunk(b"IDAT", body) + chunk(b"IEND", b""))

    small, large = bomb(10_000), bomb(20_000)  # 100 M and 400 M pixels
    assert len(large) < 200_000
    with pytest.raises(TaskError, match="exceeds HYBRIDGL_MAX_IMAGE_PIXELS"):
        decode_image(small, 60_000_000)  # our limit, checked before any pixel is decoded
    with pytest.raises(TaskError, match="decompression bomb"):
        decode_image(large, 10**12)  # with our limit off, Pillow's own guard still refuses it


def test_sixteen_bit_scaling_and_truncated_jpeg():
    grey16 = np.array([[0, 65535], [32768, 257]], dtype=np.uint16)
    out = decode_image(png(grey16), 10**8)
    assert out[:, :, 0].tolist() == [[0, 255], [127, 1]] and (out[..., 0] == out[..., 2]).all()
    jpeg = _save(Image.fromarray(np.full((64, 64, 3), 200, np.uint8)), "JPEG")
    with pytest.raises(TaskError) as info:
        decode_image(jpeg[: len(jpeg) // 2], 10**8)
    assert info.value.kind == "bad_image"


def test_webhook_answers_200_to_anything_and_errors_are_json(client):
    _, c = client
    assert c.post("/webhook", data="not json", content_type="application/json").status_code == 200
    assert c.post("/webhook", json=["a", "list"]).status_code == 200
    r = c.get("/nowhere")
    assert r.status_code == 404 and "error" in r.get_json()
    assert c.get("/predict").status_code == 405


def test_gpu_work_is_serialised_across_threads(ls):
    """Concurrent /predict requests never run two model passes at once (the library's calls are
    wrapped only to record overlap, and slowed to widen the window)."""
    from tiny_models import tiny_hybridgl

    model = tiny_hybridgl(sam=True)
    state = {"active": 0, "max": 0, "calls": 0}
    lock = threading.Lock()

    def tracked(fn):
        def run(*a, **kw):
            with lock:
                state["active"] += 1
                state["calls"] += 1
                state["max"] = max(state["max"], state["active"])
            try:
                time.sleep(0.05)
                return fn(*a, **kw)
            finally:
                with lock:
                    state["active"] -= 1
        return run

    model.prepare, model.segment = tracked(model.prepare), tracked(model.segment)
    backend, _ = make_client(model, label_studio_url=ls.url, label_studio_api_key=TOKEN, cache_images=0)
    app = create_app(backend)
    out = []

    def client_thread(i):
        with app.test_client() as cc:
            out.append(cc.post("/predict", json={"tasks": [task(i, "ab"[i % 2] + ".png", "the cup")],
                                                 "label_config": CONFIG}).get_json())

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(out) == 4 and all("error" not in r["results"][0] for r in out)
    assert state["calls"] == 8 and state["max"] == 1


def test_the_reusable_path_takes_any_image_source(model):
    """predict_tasks: no HTTP, images from a callable; outcomes carry the library's answer."""
    backend = HybridGLBackend(model, Settings(alternatives=2))
    images = {"a": IMAGE_A, "b": IMAGE_B}

    def fetch(url, task_id):
        if url not in images:
            raise TaskError("missing_image", f"no {url}")
        return images[url]

    tasks = [{"id": 1, "data": {"image": "a", "text": "the cup"}}, {"id": 2, "data": {"image": "zz", "text": "x"}},
             {"id": 3, "data": {"image": "b", "text": "the chair"}}]
    ok, missing, ok2 = backend.predict_tasks(tasks, parse_config(CONFIG), fetch=fetch)
    assert ok.ok and not missing.ok and missing.error.kind == "missing_image" and ok2.ok
    assert missing.predictions == [{"result": [], "score": 0.0,
                                    "model_version": config_version(backend.model_version, parse_config(CONFIG)),
                                    "reason": "missing_image: no zz"}]
    assert missing.to_label_studio() == {**missing.predictions[0], "error": "no zz", "kind": "missing_image",
                                         "task": 2}
    seg = model.segment(model.prepare(Image.open(io.BytesIO(IMAGE_A))), "the cup")
    assert ok.expression == "the cup" and ok.segmentation.index == seg.index
    assert [p["score"] for p in ok.predictions] == pytest.approx([r["score"] for r in seg.ranking[:2]])
    assert ok.to_label_studio() == ok.predictions[::-1] and ok.seconds > 0
    (one,) = backend.predict_tasks(tasks[:1], parse_config(CONFIG), fetch=fetch, alternatives=1)
    assert isinstance(one.to_label_studio(), dict)


def test_prepared_image_cache_is_bounded_by_count_and_bytes(model):
    from backend.model import view_bytes

    images = [(GOLDEN_DIR / name / "image.png").read_bytes()
              for name in ("p00_cup_left_of_plate", "p01_red_ball", "p07_chair_in_middle")]
    backend = HybridGLBackend(model, Settings(cache_images=2))
    views = [backend.prepared(raw, decode_image(raw, 10**8)) for raw in images]
    assert backend.cache_size() == 2  # the oldest was evicted
    assert backend.prepared(images[2], decode_image(images[2], 10**8)) is views[2]
    assert backend.counters.snapshot()["cache.misses"] == 3
    # a byte budget that holds the largest view but not two of them keeps only the newest
    budget = max(map(view_bytes, views))
    tight = HybridGLBackend(model, Settings(cache_images=10, cache_mb=-(-budget // 2**20)))
    assert 2 * min(map(view_bytes, views)) > tight.settings.cache_mb * 2**20  # no two views fit
    for raw in images:
        tight.prepared(raw, decode_image(raw, 10**8))
    assert tight.cache_size() == 1
    assert tight.busy == 0  # every prepare released its slot


def test_a_trickling_image_host_cannot_hold_a_request_past_the_fetch_timeout(model):
    """HYBRIDGL_FETCH_TIMEOUT bounds one whole download: a host that sends a byte just faster than the
    socket timeout must not keep the request (and its admission slot) for hours."""
    stop = threading.Event()

    class Handler(QuietHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(IMAGE_A)))
            self.end_headers()
            for b in IMAGE_A:
                if stop.wait(0.2):
                    return
                self.wfile.write(bytes([b]))
                self.wfile.flush()

    with LocalServer(Handler) as slow:
        _, c = make_client(model, label_studio_url=slow.url, fetch_timeout=1.0)
        t0 = time.time()
        try:
            (result,) = predict(c, [{"id": 1, "data": {"image": "/data/upload/1/a.png", "text": "the cup"}}])
        finally:
            stop.set()
        assert time.time() - t0 < 4, "the download ran past HYBRIDGL_FETCH_TIMEOUT"
        assert result["kind"] in ("fetch", "unreachable") and "HYBRIDGL_FETCH_TIMEOUT" in result["error"], result


# -- device failure: a sticky CUDA error (simulated by a hook on the tiny CLIP, the only thing faked) --------

def test_a_device_failure_is_raised_not_recorded_as_the_tasks_internal_error(model):
    """After a sticky CUDA error every later CUDA call of the process fails: predict_task must raise
    DeviceFailure (the callers stop or restart the process), not record an "internal" outcome and go on
    failing every later task; and it refuses model work from then on. An ordinary error stays the task's."""
    from hybridgl.distributed import DeviceFailure, is_device_failure
    from tiny_models import CUDA_ERROR, StickyCudaError, vision_entry

    def fetch(url, task_id):
        return {"a": IMAGE_A, "b": IMAGE_B}[url]

    interface = parse_config(CONFIG)
    tasks = [{"id": 1, "data": {"image": "a", "text": "the cup"}},
             {"id": 2, "data": {"image": "b", "text": "the chair"}}]

    backend = HybridGLBackend(model, Settings(cache_images=0))
    with StickyCudaError(vision_entry(model), after=0):
        with pytest.raises(DeviceFailure, match=CUDA_ERROR) as failed:
            backend.predict_tasks(tasks, interface, fetch=fetch)
    assert is_device_failure(failed.value) and "task 1" in str(failed.value)
    assert backend.device_failure.startswith("device failure on cpu (task 1): RuntimeError: " + CUDA_ERROR)
    counts = backend.counters.snapshot()
    assert counts["errors.device"] == 1 and "errors.internal" not in counts and "tasks.ok" not in counts
    # the device is not asked again, even once it would answer: the process must be replaced
    with StickyCudaError(vision_entry(model), after=10**9) as calls, pytest.raises(DeviceFailure):
        backend.predict_task(tasks[1], interface, fetch=fetch)
    assert calls.calls == 0

    # an ordinary exception in the model is still the task's internal error; the batch goes on
    class Bug(StickyCudaError):
        def __call__(self, module, args):
            raise ValueError("a bug in the model code")

    backend = HybridGLBackend(model, Settings(cache_images=0))
    with Bug(vision_entry(model)):
        first, second = backend.predict_tasks(tasks, interface, fetch=fetch)
    assert [o.error.kind for o in (first, second)] == ["internal", "internal"] and first.predictions == []
    assert str(first.error) == "internal error: ValueError" and backend.device_failure is None
    assert backend.predict_task(tasks[0], interface, fetch=fetch).ok  # and the backend keeps working


def test_the_server_answers_503_on_a_device_failure_and_ends_its_process_once(model, ls):
    """/predict that meets the device failure: 503 and a JSON error saying so; /health from then on 503
    DEVICE_FAILURE with the reason (the container turns unhealthy), /predict 503 at once, nothing computed;
    the process is ended once (its exit action, recorded here instead of SIGTERM to pytest) after the
    first answer was sent, so that gunicorn or Docker starts a fresh one."""
    from tiny_models import CUDA_ERROR, StickyCudaError, vision_entry

    exits = []
    backend = HybridGLBackend(model, Settings(label_studio_url=ls.url, label_studio_api_key=TOKEN, cache_images=0,
                                              retry_after=3))
    c = create_app(backend, exit_process=lambda: exits.append(time.time())).test_client()
    assert c.get("/health").status_code == 200
    body = {"tasks": [task(1), task(2, "b.png")], "label_config": CONFIG}
    with StickyCudaError(vision_entry(model), after=0):
        r = c.post("/predict", json=body, buffered=True)  # buffered: closed as a WSGI server closes it
    assert r.status_code == 503 and r.headers["Retry-After"] == "3"
    error = r.get_json()
    assert error["status"] == "DEVICE_FAILURE" and "the GPU failed" in error["error"] and CUDA_ERROR in error["error"]
    assert "restarting" in error["error"] and len(exits) == 1
    health = c.get("/health")
    assert health.status_code == 503 and health.get_json()["status"] == "DEVICE_FAILURE"
    assert health.get_json()["reason"].startswith("device failure on cpu (task 1): RuntimeError: " + CUDA_ERROR)
    assert health.get_json()["model_version"] == backend.model_version
    with StickyCudaError(vision_entry(model), after=10**9) as calls:  # a working device: still not asked
        again = c.post("/predict", json=body, buffered=True)
    assert again.status_code == 503 and again.get_json()["status"] == "DEVICE_FAILURE" and calls.calls == 0
    assert len(exits) == 1  # ended once
    counts = c.get("/metrics").get_json()["counts"]
    assert counts["requests.predict_device_failure"] == 1 and "errors.internal" not in counts
    assert c.post("/setup", json={}).status_code == 200  # the rest answers while the process ends


def test_the_ray_preannotate_work_lets_a_device_failure_reach_its_actor(model):
    """`ray_preannotate._predict` runs predict_task on a Ray model actor: the DeviceFailure must leave it
    (the actor's `_Worker` then exits, and Ray redoes the image on a fresh actor), not become the tasks'
    failures."""
    from backend import ray_preannotate
    from hybridgl.distributed import DeviceFailure, is_device_failure
    from tiny_models import StickyCudaError, vision_entry

    interface = parse_config(CONFIG)
    item = (interface, [{"id": 1, "data": {"image": "a", "text": "the cup"}},
                        {"id": 2, "data": {"image": "a", "text": "the plate"}}], [])
    backend = HybridGLBackend(model, Settings())
    with StickyCudaError(vision_entry(model)), pytest.raises(DeviceFailure) as failed:
        ray_preannotate._predict(backend, item, {"raw": IMAGE_A})
    assert is_device_failure(failed.value)
    done = ray_preannotate._predict(HybridGLBackend(model, Settings()), item, {"raw": IMAGE_A})
    assert [o["error"] for o in done["outcomes"]] == [None, None] and done["prepared"] == 1
