"""The method's float32 is IEEE float32 even where the process let torch use TF32 or bfloat16 for it.

torch's defaults send float32 convolutions on Ampere+ GPUs to TF32 (10 mantissa bits), and a
`torch.set_float32_matmul_precision("medium")` anywhere in the process (training code, other
libraries) sends float32 matmuls to TF32 on a GPU and bfloat16 on an AMX CPU. The exact mode's near
ties are decided in float32's last bits, so every pass must run with IEEE flags and give the process
its own settings back. No GPU here: the tests read the flags in force at each module of CLIP and SAM
as it runs (forward hooks), which is what cuDNN, cuBLAS and oneDNN would read.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from hybridgl.coherence import gem_tokens
from hybridgl.hybrid_features import hybrid_features
from hybridgl.text import encode_text

from tiny_models import tiny_hybridgl

IEEE = ("ieee", "ieee", "ieee", "ieee")


def flags_now() -> tuple[str, ...]:
    b = torch.backends
    return (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision,
            b.mkldnn.matmul.fp32_precision, b.mkldnn.conv.fp32_precision)


@pytest.fixture(scope="module")
def model():
    return tiny_hybridgl(sam=True)


@pytest.fixture
def seen(model):
    """Flags in force at each conv and linear module of CLIP and SAM when it runs: {module name: {flags}}."""
    record: dict[str, set] = {}
    handles = []
    for prefix, root in (("clip", model.clip), ("sam", model.sam)):
        for name, module in root.named_modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                key = f"{prefix}.{name}"
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, key=key: record.setdefault(key, set()).add(flags_now())))
    yield record
    for h in handles:
        h.remove()


@pytest.fixture
def process_asked_for_speed():
    """What training code does: matmuls at 'medium' (TF32 / bfloat16) through the legacy call;
    cuDNN convolutions are TF32 by torch's default."""
    torch.set_float32_matmul_precision("medium")
    before = flags_now()
    assert before[0] == "tf32" and before[1] == "tf32" and before[2] == "bf16"
    yield before
    torch.set_float32_matmul_precision("highest")


def image(seed=0, h=48, w=64):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def assert_ieee_everywhere(seen, *must_run):
    assert seen, "no module ran"
    for key in must_run:
        assert key in seen, f"{key} did not run"
    wrong = {k: v for k, v in seen.items() if v != {IEEE}}
    assert not wrong, f"modules computed with non-IEEE float32 flags: {sorted(wrong)[:5]}"


def test_prepare_and_segment_compute_ieee_float32_and_give_the_process_its_settings_back(
        model, seen, process_asked_for_speed):
    view = model.prepare(image())
    seg = model.segment(view, "the red ball on the left of the cup")
    assert seg.mask is not None
    assert_ieee_everywhere(seen, "clip.vision_model.embeddings.patch_embedding", "sam.image_encoder.patch_embed.proj",
                           "sam.image_encoder.neck.0", "sam.mask_decoder.output_upscaling.0",
                           "clip.text_model.encoder.layers.0.mlp.fc1")
    assert flags_now() == process_asked_for_speed
    # the legacy getters still answer (torch refuses them where the new and legacy flags disagree)
    assert torch.get_float32_matmul_precision() == "medium"
    assert torch.backends.cudnn.allow_tf32 is True


def test_the_stage_functions_alone_compute_ieee_float32(model, seen, process_asked_for_speed):
    img = image(1)
    masks = np.zeros((2, 48, 64), dtype=bool)
    masks[0, :20, :30] = True
    masks[1, 10:, 20:] = True
    hybrid_features(model.clip, img, masks, model.config, "cpu")
    gem_tokens(model.clip, img, model.config, "cpu")
    encode_text(model.clip, model.tokenizer, "a ball", "cpu")
    model.proposer(img)
    assert_ieee_everywhere(seen, "clip.vision_model.embeddings.patch_embedding", "sam.image_encoder.patch_embed.proj",
                           "clip.text_model.encoder.layers.0.mlp.fc1")
    assert flags_now() == process_asked_for_speed


def test_concurrent_and_nested_passes_restore_the_settings_once_the_last_ends(model, seen, process_asked_for_speed):
    views = [model.prepare(image(s)) for s in (2, 3)]
    errors = []

    def work(view):
        try:
            for _ in range(3):
                model.segment(view, "the ball on the right")
                model.segment(model.prepare(image(4)), "the cup")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(v,)) for v in views]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert_ieee_everywhere(seen, "clip.vision_model.embeddings.patch_embedding")
    assert flags_now() == process_asked_for_speed


def test_an_exception_inside_a_pass_restores_the_settings(model, process_asked_for_speed):
    def fail(module, args):
        raise RuntimeError("out of memory inside CLIP")

    handle = model.clip.vision_model.embeddings.patch_embedding.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="out of memory inside CLIP"):
            model.segment(image(6), "the ball")
    finally:
        handle.remove()
    assert flags_now() == process_asked_for_speed


def test_an_ieee_process_is_left_as_it_was(model):
    before = flags_now()
    model.segment(image(5), "the ball")
    assert flags_now() == before


def test_on_a_torch_without_per_backend_flags_the_legacy_switches_are_guarded(model, monkeypatch):
    """torch < 2.9 has only the legacy switches (the installed torch has both; the guard picks by
    which exists, so the older torch's branch is selected here by hand)."""
    from hybridgl import precision

    monkeypatch.setattr(precision, "_NEW_API", False)
    legacy = []
    handle = model.clip.vision_model.embeddings.patch_embedding.register_forward_pre_hook(
        lambda m, args: legacy.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                                       torch.get_float32_matmul_precision())))
    torch.set_float32_matmul_precision("high")
    try:
        model.segment(image(7), "the ball")
        assert legacy and set(legacy) == {(False, False, "highest")}
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.get_float32_matmul_precision()) == (True, True, "high")
    finally:
        handle.remove()
        torch.set_float32_matmul_precision("highest")
