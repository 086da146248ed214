"""The library end to end on tiny models: real SAM generator, from_pretrained, edge cases, config."""
from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from hybridgl import HybridGL, HybridGLConfig, ParsedExpression
from hybridgl.guidance import guidance_score, guided_map, position_prior
from hybridgl.proposals import Proposals, build_sam

from tiny_models import GOLDEN_DIR, PERMISSIVE, TINY_CLIP_DIR, build_tiny_sam, save_tiny_sam, tiny_clip, tiny_sam_builder

IMAGE = GOLDEN_DIR / "p00_cup_left_of_plate" / "image.png"


@pytest.fixture(scope="module")
def model_with_sam():
    return HybridGL.from_pretrained(clip=str(TINY_CLIP_DIR), sam=build_tiny_sam(), parser="rules",
                                    device="cpu", config=HybridGLConfig(**PERMISSIVE))


@pytest.fixture(scope="module")
def image():
    return Image.open(IMAGE).convert("RGB")


def test_real_generator_end_to_end(model_with_sam, image):
    view = model_with_sam.prepare(image)
    n = len(view)
    assert n > 1
    assert view.masks.shape == (n, image.height, image.width) and view.masks.dtype == bool
    assert view.features.shape == (n, 512)
    seg = model_with_sam.segment(view, "the cup to the left of the plate")
    assert seg.parse.noun_phrase == "the cup" and seg.parse.relation == "left"
    assert seg.mask.shape == (image.height, image.width) and seg.mask.dtype == bool
    np.testing.assert_array_equal(seg.mask, view.masks[seg.index])
    assert 0.0 <= seg.score <= 1.0
    assert seg.ranking[0]["index"] == seg.index
    assert sorted(r["index"] for r in seg.ranking) == list(range(n))
    # the score is the chosen candidate's softmax share of F / temperature
    F = seg.explain["F"].astype(np.float64) / model_with_sam.config.score_temperature
    assert seg.score == pytest.approx(np.exp(F.max()) / np.exp(F).sum(), rel=1e-6)
    for value in seg.explain.values():
        assert not np.isnan(np.asarray(value, dtype=np.float64)).any()


def test_segment_on_image_equals_segment_on_prepared_view(model_with_sam, image):
    view = model_with_sam.prepare(image)
    a = model_with_sam.segment(view, "the plate")
    b = model_with_sam.segment(image, "the plate")
    assert a.index == b.index and a.score == pytest.approx(b.score)
    # one prepared view serves several expressions without being altered
    features = view.features.clone()
    model_with_sam.segment(view, "the cup on the right")
    assert torch.equal(view.features, features)


def test_no_proposal_at_default_thresholds_is_a_normal_result(image):
    model = HybridGL.from_pretrained(clip=str(TINY_CLIP_DIR), sam=build_tiny_sam(), parser="rules", device="cpu")
    view = model.prepare(image)
    assert len(view) == 0
    seg = model.segment(view, "the cup")
    assert seg.mask is None and seg.index is None and seg.score == 0.0
    assert seg.reason == "no mask proposals" and seg.ranking == []


def test_prepare_without_sam_needs_proposals(tiny_model_nosam, image):
    with pytest.raises(ValueError, match="proposals"):
        tiny_model_nosam.prepare(image)
    with pytest.raises(ValueError, match="proposals must be bool"):
        tiny_model_nosam.prepare(image, proposals=np.zeros((2, 5, 5), bool))


def test_whole_image_mask_has_no_outside_and_no_nan(tiny_model_nosam, image):
    h, w = image.height, image.width
    masks = np.zeros((3, h, w), bool)
    masks[0] = True  # the whole image
    masks[1, : h // 2, : w // 2] = True
    masks[2, h // 2:, w // 2:] = True
    seg = tiny_model_nosam.segment(tiny_model_nosam.prepare(image, proposals=masks), "the left cup")
    A = seg.explain["gem_Aprime"]
    b = float(seg.explain["black"])
    assert seg.explain["G"][0] == pytest.approx((2 - b) * A.mean(), abs=1e-5)  # outside term 0
    assert seg.explain["G"][1] == pytest.approx(
        (2 - b) * A[masks[1]].mean() - b * A[~masks[1]].mean(), abs=1e-5)
    for value in seg.explain.values():
        assert not np.isnan(np.asarray(value, dtype=np.float64)).any()


def test_k_clamped_per_image_not_per_run(tiny_model_nosam, image):
    h, w = image.height, image.width
    two = np.zeros((2, h, w), bool)
    two[0, :, : w // 2] = True
    two[1, :, w // 2:] = True
    small = tiny_model_nosam.segment(tiny_model_nosam.prepare(image, proposals=two), "the cup left of the plate")
    assert int(small.explain["k1"]) == 2 and int(small.explain["k2"]) == 2
    data = np.load(GOLDEN_DIR / "p02_bird_above_tree" / "case.npz")
    big = tiny_model_nosam.segment(tiny_model_nosam.prepare(Image.open(GOLDEN_DIR / "p02_bird_above_tree" /
                                                                       "image.png"), proposals=data["masks"]),
                                   "the bird above the tree")
    assert int(big.explain["k1"]) == 3 and int(big.explain["k2"]) == 6


def test_exif_orientation_is_applied(tiny_model_nosam):
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :30] = 255
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    shown = Image.open(io.BytesIO(buf.getvalue()))
    view = tiny_model_nosam.prepare(shown, proposals=np.ones((1, 60, 40), bool))
    assert view.size == (60, 40)


def test_model_version_tracks_weights_and_config(tiny_clip_pair):
    clip, tok = tiny_clip_pair
    a = HybridGL(clip, tok, parser="rules", device="cpu")
    b = HybridGL(clip, tok, parser="rules", device="cpu")
    assert a.model_version == b.model_version and a.model_version.startswith("hybridgl-")
    c = HybridGL(clip, tok, parser="rules", device="cpu", config={"alpha": 0.5})
    assert c.model_version != a.model_version
    from tiny_models import tiny_clip

    other, _ = tiny_clip()
    with torch.no_grad():
        other.visual_projection.weight[0, 0] += 0.01
    d = HybridGL(other, tok, parser="rules", device="cpu")
    assert d.model_version != a.model_version


def test_long_expression_truncated_with_warning(tiny_model_nosam, image, caplog):
    masks = np.zeros((2, image.height, image.width), bool)
    masks[0, :50] = True
    masks[1, 50:] = True
    view = tiny_model_nosam.prepare(image, proposals=masks)
    text = "the man " + "with a very long red umbrella " * 30
    with caplog.at_level(logging.WARNING, logger="hybridgl.text"):
        seg = tiny_model_nosam.segment(view, text)
    assert seg.index in (0, 1)
    assert any("truncated" in r.message for r in caplog.records)


def test_empty_expression_is_refused(tiny_model_nosam, image):
    view = tiny_model_nosam.prepare(image, proposals=np.ones((1, image.height, image.width), bool))
    for text in ("", "   "):
        with pytest.raises(ValueError, match="empty expression"):
            tiny_model_nosam.segment(view, text)


def test_given_parse_bypasses_the_parser(tiny_model_nosam, image):
    masks = np.zeros((3, image.height, image.width), bool)
    masks[0, :, :100] = masks[1, :, 100:300] = masks[2, :, 300:] = True
    view = tiny_model_nosam.prepare(image, proposals=masks)
    given = ParsedExpression("zzz", "zzz", (), "none", "right")
    seg = tiny_model_nosam.segment(view, "ignored text about the left", parse=given)
    assert seg.parse is given
    # the right ramp divided by its mean: the rightmost column is the largest
    A = seg.explain["gem_Aprime"]
    assert A[:, -1].mean() > A[:, 0].mean()


def test_all_fusion_modes_run_and_differ(tiny_clip_pair, image):
    masks = np.zeros((2, image.height, image.width), bool)
    masks[0, 100:200, 100:200] = True
    masks[1, :, 250:] = True
    feats = {}
    for mode in ("G2L", "L2G", "G2L+L2G", "G+L", "local", "global"):
        model = HybridGL(*tiny_clip_pair, parser="rules", device="cpu",
                         config={"fusion_mode": mode, "use_coherence": False})
        view = model.prepare(image, proposals=masks)
        assert view.tokens is None
        feats[mode] = view.features
        assert torch.isfinite(view.features).all()
    modes = list(feats)
    for i, a in enumerate(modes):
        for b in modes[i + 1:]:
            assert not torch.allclose(feats[a], feats[b]), (a, b)
    # a later fusion start block changes G2L features
    late = HybridGL(*tiny_clip_pair, parser="rules", device="cpu",
                    config={"fusion_start_block": 11, "use_coherence": False}).prepare(image, proposals=masks)
    assert not torch.allclose(late.features, feats["G2L"])


def test_position_prior_shapes():
    cfg = HybridGLConfig()
    left = position_prior("left", 4, 5, cfg)
    np.testing.assert_allclose(left[0].numpy(), [1, 0.75, 0.5, 0.25, 0])
    middle = position_prior("middle", 2, 5, cfg)
    np.testing.assert_allclose(middle[1].numpy(), [0, 1, 1, 0.5, 0])
    assert torch.equal(position_prior("up", 3, 3, cfg), torch.ones(3, 3))  # vertical prior off by default
    up = position_prior("up", 3, 2, cfg.replace(vertical_prior=True))
    np.testing.assert_allclose(up[:, 0].numpy(), [1, 0.5, 0])
    down = position_prior("down", 3, 2, cfg.replace(vertical_prior=True))
    np.testing.assert_allclose(down[:, 1].numpy(), [0, 0.5, 1])


def test_guided_map_without_mass_is_uniform():
    out = guided_map(torch.zeros(3, 4), torch.ones(3, 4))
    assert torch.equal(out, torch.ones(3, 4))
    G = guidance_score(out, torch.zeros(1, 3, 4, dtype=torch.bool), 1.8)
    assert torch.isfinite(G).all()


def test_inside_outside_means_are_each_masks_float64_means():
    """Every mask at once (chunks of masks: 20 of 512x512 take two), the same means as one mask at a
    time in float64, with the empty mask's inside and the whole image's outside 0."""
    from hybridgl.guidance import inside_outside_means

    gen = torch.Generator().manual_seed(0)
    guided = torch.rand(512, 512, generator=gen) * 3
    masks = torch.rand(20, 512, 512, generator=gen) > torch.linspace(0.05, 0.95, 20)[:, None, None]
    masks[3] = False
    masks[7] = True
    mean_in, mean_out = inside_outside_means(guided, masks)
    assert mean_in.dtype == mean_out.dtype == torch.float64 and mean_in.shape == mean_out.shape == (20,)
    g = guided.double()
    want_in = [g[m].mean().item() if m.any() else 0.0 for m in masks]
    want_out = [g[~m].mean().item() if (~m).any() else 0.0 for m in masks]
    np.testing.assert_allclose(mean_in.numpy(), want_in, rtol=1e-12)
    np.testing.assert_allclose(mean_out.numpy(), want_out, rtol=1e-12)
    assert mean_in[3] == 0 and mean_out[7] == 0
    empty = inside_outside_means(guided, masks[:0])
    assert [t.shape for t in empty] == [(0,), (0,)]


def test_text_features_come_from_the_models_cache_bit_for_bit(tiny_clip_pair):
    """A text encoded once is not encoded again (noun phrases and GEM prompts recur), the cached
    feature is the computed one, a caller cannot change it, and the least recently used goes first."""
    from golden_cases import CASES, load_case

    from hybridgl.text import TextCache, encode_text

    clip, tokenizer = tiny_clip_pair
    passes = []
    hook = clip.text_model.register_forward_hook(lambda *_: passes.append(1))
    try:
        cache = TextCache(capacity=2)
        first = encode_text(clip, tokenizer, "a photo of cup", "cpu", cache)
        again = encode_text(clip, tokenizer, "a photo of cup", "cpu", cache)
        assert len(passes) == 1 and torch.equal(first, again)
        assert torch.equal(first, encode_text(clip, tokenizer, "a photo of cup", "cpu"))  # no cache: the same
        again.zero_()
        assert torch.equal(encode_text(clip, tokenizer, "a photo of cup", "cpu", cache), first)
        encode_text(clip, tokenizer, "plate", "cpu", cache)
        encode_text(clip, tokenizer, "ball", "cpu", cache)  # over capacity: "a photo of cup" goes
        before = len(passes)
        encode_text(clip, tokenizer, "ball", "cpu", cache)
        encode_text(clip, tokenizer, "a photo of cup", "cpu", cache)
        assert (len(passes) - before, len(cache)) == (1, 2)
        cache.clear()
        encode_text(clip, tokenizer, "ball", "cpu", cache)
        assert (len(passes) - before, len(cache)) == (2, 1)
    finally:
        hook.remove()

    data, image, parse = load_case(CASES[0])
    warm = HybridGL(clip, tokenizer, sam=None, parser="rules", device="cpu")
    view = warm.prepare(image, proposals=data["masks"])
    warm.segment(view, parse=parse)
    misses = warm.text_cache.misses
    cached = warm.segment(view, parse=parse)
    assert warm.text_cache.misses == misses and warm.text_cache.hits >= 3  # sentence, noun phrase, GEM prompt
    cold = HybridGL(clip, tokenizer, sam=None, parser="rules", device="cpu")
    computed = cold.segment(cold.prepare(image, proposals=data["masks"]), parse=parse)
    for key in ("S", "p", "G", "F"):
        np.testing.assert_array_equal(cached.explain[key], computed.explain[key], err_msg=key)
    assert cached.index == computed.index


def test_tiny_sam_checkpoint_round_trip(tmp_path, image):
    path = save_tiny_sam(tmp_path / "tiny_sam.pth", seed=3)
    loaded = build_sam("tiny", path, builder=tiny_sam_builder)
    fresh = build_tiny_sam(seed=3)
    for (k, v), (k2, v2) in zip(loaded.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with pytest.raises(ValueError, match="unknown SAM model type"):
        build_sam("vit_x", path)


def test_injected_boxes_use_sams_convention():
    m = np.zeros((1, 10, 12), bool)
    m[0, 2:5, 3:9] = True  # rows 2..4, cols 3..8
    p = Proposals.from_masks(m, 10, 12)
    np.testing.assert_array_equal(p.boxes_xywh, [[3, 2, 5, 2]])


def test_config_files_and_validation(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"alpha": 0.3, "fill_value": [0, 0, 0]}))
    (tmp_path / "c.toml").write_text("[hybridgl]\nalpha = 0.4\nfusion_mode = \"L2G\"\n")
    a = HybridGLConfig.from_file(tmp_path / "c.json")
    assert a.alpha == 0.3 and a.fill_value == (0.0, 0.0, 0.0)
    b = HybridGLConfig.from_file(tmp_path / "c.toml")
    assert b.alpha == 0.4 and b.fusion_mode == "L2G"
    assert a.fingerprint() != HybridGLConfig().fingerprint()
    assert HybridGLConfig().fingerprint() == HybridGLConfig().fingerprint()
    with pytest.raises(ValueError, match="unknown HybridGL config keys: bogus"):
        HybridGLConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="fusion_mode"):
        HybridGLConfig(fusion_mode="X")
    with pytest.raises(Exception):
        HybridGLConfig().alpha = 0.1  # frozen


def test_16_bit_grayscale_images_keep_their_tones():
    """A 16-bit grayscale PNG (Pillow mode I;16) is scaled to 8 bits, not clipped at 255 (which made
    every value above 255 of 65535 white); an HxWx1 array is grayscale like an HxW one."""
    from hybridgl.pipeline import to_rgb_array

    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")
    sixteen = Image.open(io.BytesIO(buf.getvalue()))
    assert sixteen.mode.startswith("I;16")
    rgb = to_rgb_array(sixteen)
    assert rgb.shape == (1, 4, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], [[0, 1, 128, 255]])
    assert (rgb == rgb[..., :1]).all()
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(to_rgb_array(gray[..., None]), to_rgb_array(gray))
    # 32-bit integer and float images, and the backend's decoder on the same files
    from backend.images import decode_image

    for im in (Image.fromarray(values.astype(np.int32)), Image.fromarray(values.astype(np.float32))):
        np.testing.assert_array_equal(to_rgb_array(im)[..., 0], [[0, 1, 128, 255]], err_msg=im.mode)
    np.testing.assert_array_equal(rgb, decode_image(buf.getvalue(), 10**6))


def test_a_damaged_sam_checkpoint_names_the_file(tmp_path):
    """torch.load's own error on a truncated or corrupted file does not name it and suggests loading
    with weights_only=False; the error says which file and how to check it."""
    good = save_tiny_sam(tmp_path / "tiny_sam.pth")
    bad = tmp_path / "cut.pth"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.pth.*damaged or incomplete.*--verify"):
        build_sam("tiny", bad, builder=tiny_sam_builder)
    with pytest.raises(TypeError):  # the builder's own errors are left alone
        build_sam("tiny", good, builder=lambda **kw: (_ for _ in ()).throw(TypeError("bad builder")))


def test_gem_depth_is_validated():
    """gem_blocks 13 made `len(layers) - gem_blocks` negative: GEM silently started at the last block."""
    assert HybridGLConfig(gem_blocks=0).gem_blocks == 0 and HybridGLConfig(gem_blocks=12).gem_blocks == 12
    for bad in (-1, 13):
        with pytest.raises(ValueError, match="gem_blocks"):
            HybridGLConfig(gem_blocks=bad)


def test_a_clip_shallower_than_the_config_is_a_clear_error():
    """A CLIP with fewer blocks than gem_blocks or fusion_start_block asks for: GEM started at a
    negative block index (silently on the last blocks only) and the fusion never ran; now a ValueError."""
    from hybridgl.coherence import gem_tokens
    from hybridgl.hybrid_features import hybrid_features

    clip = tiny_clip()[0]
    clip.vision_model.encoder.layers = clip.vision_model.encoder.layers[:4]
    image = np.full((64, 64, 3), 128, np.uint8)
    masks = np.zeros((1, 64, 64), bool)
    masks[0, 10:30, 10:30] = True
    with pytest.raises(ValueError, match="gem_blocks=6 exceeds this CLIP's 4 blocks"):
        gem_tokens(clip, image, HybridGLConfig())
    with pytest.raises(ValueError, match="fusion_start_block=9 is not a block of this CLIP"):
        hybrid_features(clip, image, masks, HybridGLConfig())
    assert gem_tokens(clip, image, HybridGLConfig(gem_blocks=4)).shape[-1] == clip.visual_projection.out_features
    assert hybrid_features(clip, image, masks, HybridGLConfig(fusion_start_block=3)).shape == (1, clip.visual_projection.out_features)


def test_text_is_cleaned_as_clip_tokenize_cleans_it(tiny_clip_pair):
    """OpenAI's clip.tokenize (the reference's) runs ftfy.fix_text and html.unescape before BPE;
    Hugging Face's CLIP tokenizer does neither, so without them "&amp;", curly quotes and
    full-width letters would encode as other tokens than the reference's."""
    from hybridgl.text import clip_clean, encode_text

    clip, tok = tiny_clip_pair
    assert clip_clean("man&amp;dog") == "man&dog"
    assert clip_clean("the man\u2019s  hat\n") == "the man's hat"
    assert clip_clean("\uff4d\uff41\uff4e") == "man"  # full-width letters
    same = [("the man &amp; the dog", "the man & the dog"),
            ("the man\u2019s umbrella", "the man's umbrella"),
            ("the &amp;lt;man&amp;gt;", "the <man>")]  # unescaped twice, as the reference does
    for raw, clean in same:
        assert torch.equal(encode_text(clip, tok, raw), encode_text(clip, tok, clean)), raw
    assert not torch.equal(encode_text(clip, tok, "the man's umbrella"), encode_text(clip, tok, "the man umbrella"))


def test_a_pickled_view_is_device_free_and_its_mask_copy_follows_the_device_asked(tiny_model_nosam, image):
    """Views travel between processes (Ray) and may be segmented by a model on another device: the
    pickle holds CPU tensors and no device copy of the masks (a GPU index the receiver may lack
    would fail torch's unpickling), and the masks' device copy is made for the device asked."""
    import pickle

    masks = np.zeros((3, image.height, image.width), dtype=bool)
    masks[0, :10, :10] = masks[1, 5:, 5:] = masks[2] = True
    view = tiny_model_nosam.prepare(image, proposals=masks)
    seg = tiny_model_nosam.segment(view, "the thing on the left")
    assert view._device_masks is not None  # made by segment
    state = view.__getstate__()
    assert state["_device_masks"] is None
    assert state["features"].device.type == "cpu"
    back = pickle.loads(pickle.dumps(view))
    assert tiny_model_nosam.segment(back, "the thing on the left").index == seg.index
    cpu = back.device_masks(torch.device("cpu"))
    meta = back.device_masks(torch.device("meta"))  # another device: its own copy, not the CPU one
    assert cpu.device.type == "cpu" and meta.device.type == "meta"
    assert back.device_masks(torch.device("cpu")).device.type == "cpu"


def test_flipped_or_strided_proposals_are_read_like_contiguous_ones(tiny_model_nosam):
    """Masks given as a view with negative strides (np.flip, [:, ::-1]) failed inside torch ("At least one
    stride in the given numpy array is negative"); masks of a non-numeric dtype failed there too."""
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    masks = np.zeros((2, 40, 60), bool)
    masks[0, :, :20], masks[1, 10:30, 30:] = True, True
    flipped = masks[:, ::-1, ::-1]
    view = tiny_model_nosam.prepare(image, proposals=flipped)
    np.testing.assert_array_equal(view.masks, flipped)
    expected = tiny_model_nosam.prepare(image, proposals=flipped.copy())
    assert view.boxes_xywh.tolist() == expected.boxes_xywh.tolist()
    with pytest.raises(TypeError, match="proposals must be bool"):
        tiny_model_nosam.prepare(image, proposals=np.full((1, 40, 60), "x"))


@pytest.mark.parametrize("shape", [(0, 0, 3), (0, 7, 3), (7, 0, 3)])
def test_an_image_without_pixels_gets_no_proposals(model_with_sam, shape):
    """SAM's crop resize divided by the longest side: a 0x0 image raised ZeroDivisionError (a 0xW one
    already gave zero proposals, the normal outcome the generator documents)."""
    view = model_with_sam.prepare(np.zeros(shape, np.uint8))
    assert len(view) == 0
    seg = model_with_sam.segment(view, "the cup")
    assert seg.mask is None and seg.score == 0.0 and seg.reason == "no mask proposals"


@pytest.mark.parametrize("key", ["clip_input_size", "gem_input_size"])
def test_an_input_size_below_one_clip_patch_is_refused_by_the_model(tiny_clip_pair, key):
    """clip_input_size=8 (or gem_input_size) for a CLIP with 16-pixel patches failed at the first image
    inside torch's convolution ("Kernel size can't be greater than actual input size")."""
    with pytest.raises(ValueError, match=f"{key}=8 is smaller than this CLIP's 16-pixel patches"):
        HybridGL(*tiny_clip_pair, sam=None, parser="rules", device="cpu", config={key: 8})
    HybridGL(*tiny_clip_pair, sam=None, parser="rules", device="cpu", config={key: 16})


def test_an_expression_or_parse_of_another_type_is_a_type_error(tiny_model_nosam):
    """bytes (text read from a file in binary mode) were refused as an "empty expression", and a parse
    given as a dict failed deep in the text encoding with an AttributeError."""
    view = tiny_model_nosam.prepare(np.zeros((8, 8, 3), np.uint8), proposals=np.ones((1, 8, 8), bool))
    with pytest.raises(TypeError, match="expression must be a str, got bytes"):
        tiny_model_nosam.segment(view, b"the cup")
    with pytest.raises(TypeError, match="parse must be a ParsedExpression, got dict"):
        tiny_model_nosam.segment(view, parse={"sentence": "the cup", "noun_phrase": "the cup"})


def test_a_float_image_with_an_infinite_pixel_keeps_its_tones():
    """Pillow mode F (float TIFFs, depth maps that mark no return with inf): inf became the largest float,
    so every other pixel fell to 0 (a black image) and the range computation overflowed."""
    from hybridgl.pipeline import to_rgb_array

    values = np.array([[0.0, 0.5, 1.0, np.inf, -np.inf, np.nan]], dtype=np.float32)
    with np.errstate(all="raise"):
        rgb = to_rgb_array(Image.fromarray(values))
    np.testing.assert_array_equal(rgb[..., 0], [[0, 127, 255, 255, 0, 0]])
