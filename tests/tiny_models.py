"""Tiny models for tests: the golden tiny CLIP and a tiny SAM built in code.

Real weights cannot be downloaded here, so tests run the real code paths on small random
models: the tiny CLIP of the golden cases (Hugging Face format) and a SAM with the real
architecture classes at a tiny width. Random SAM weights give no masks at the method's
thresholds; `PERMISSIVE` lowers them so the real generator returns masks.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_CLIP_DIR = FIXTURES / "tiny-clip"
GOLDEN_DIR = FIXTURES / "golden"

# Thresholds at which the tiny random SAM does return masks (tests only). Its masks are speckled
# across the whole image, so their boxes coincide and NMS must be off (box_nms_thresh 1.0).
PERMISSIVE = {"pred_iou_thresh": -10.0, "stability_score_thresh": 0.0, "min_mask_region_area": 0,
              "points_per_side": 2, "box_nms_thresh": 1.0}


def build_tiny_sam(checkpoint: str | None = None, seed: int = 0) -> Sam:
    """A SAM with segment-anything's own classes at width 32; loads `checkpoint` (a state dict) if given."""
    torch.manual_seed(seed)
    dim, size, patch = 32, 1024, 16
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=size, patch_size=patch, embed_dim=dim, depth=1, num_heads=2,
                                      mlp_ratio=2.0, out_chans=dim, qkv_bias=True, use_rel_pos=False,
                                      window_size=8, global_attn_indexes=()),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(size // patch, size // patch),
                                     input_image_size=(size, size), mask_in_chans=8),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
                                 transformer_dim=dim, iou_head_depth=2, iou_head_hidden_dim=32),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()
    if checkpoint is not None:
        sam.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return sam


def build_sharp_sam() -> Sam:
    """The tiny SAM with its hypernetworks' outputs scaled by 30: logits far from the mask threshold,
    so its masks do not hang on the last bits of a computation (comparisons with segment-anything)."""
    sam = build_tiny_sam()
    with torch.no_grad():
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(30)
            mlp.layers[-1].bias.mul_(30)
    return sam


def save_tiny_sam(path: str | Path, seed: int = 0) -> Path:
    path = Path(path)
    torch.save(build_tiny_sam(seed=seed).state_dict(), path)
    return path


def tiny_clip():
    """(CLIPModel, CLIPTokenizer) of the golden tiny CLIP, fp32."""
    from transformers import CLIPModel, CLIPTokenizer

    return (CLIPModel.from_pretrained(str(TINY_CLIP_DIR), dtype=torch.float32).eval(),
            CLIPTokenizer.from_pretrained(str(TINY_CLIP_DIR)))


def tiny_hybridgl(sam: bool = True, parser: str = "rules", config=None, **overrides):
    """A HybridGL on the tiny CLIP (loaded through `from_pretrained`) and, if asked, the tiny SAM.

    overrides: HybridGLConfig fields; with a SAM and no config, the permissive thresholds apply.
    """
    from hybridgl import HybridGL, HybridGLConfig

    if config is None:
        config = HybridGLConfig(**({**PERMISSIVE, **overrides} if sam else overrides))
    return HybridGL.from_pretrained(clip=str(TINY_CLIP_DIR), sam=build_tiny_sam() if sam else None,
                                    parser=parser, device="cpu", config=config)


# The tiny SAM's architecture as a builder (checkpoint=...) for `hybridgl.proposals.build_sam`.
tiny_sam_builder = partial(build_tiny_sam)


# The message of the sticky CUDA error a broken GPU gives (torch raises it as a RuntimeError).
CUDA_ERROR = "CUDA error: an illegal memory access was encountered"


class StickyCudaError:
    """The simulated hardware fault, the only thing the device-failure tests fake: a forward pre-hook
    on a module of the model (e.g. the tiny CLIP's `vision_model.embeddings.patch_embedding`) that
    lets `after` calls through, then raises CUDA_ERROR on every later call, as a GPU does once a
    sticky CUDA error broke the process's context. A context manager: the hook is removed at exit
    (the tests share their models)."""

    def __init__(self, module: torch.nn.Module, after: int = 0):
        self.module, self.after, self.calls = module, after, 0
        self.handle = None

    def __call__(self, module, args):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError(CUDA_ERROR)

    def __enter__(self) -> "StickyCudaError":
        self.handle = self.module.register_forward_pre_hook(self)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def vision_entry(model) -> torch.nn.Module:
    """The first module of CLIP's image encoder (runs in every `prepare`)."""
    return model.clip.vision_model.embeddings.patch_embedding


def text_entry(model) -> torch.nn.Module:
    """The first module of CLIP's text encoder, after emptying the model's text cache: it runs in
    `segment` for every text the cache does not hold yet (a text encoded before is served from it)."""
    model.text_cache.clear()
    return model.clip.text_model.embeddings


# A server process whose GPU fails once: its SAM builder (HYBRIDGL_SAM_MODEL=tiny_models:
# tiny_sam_builder_on_a_gpu_that_fails_once) also hooks every CLIP text encoder of the process, so that
# the first expression encoded while the file GPU_FAILS_ONCE_MARKER names does not exist yet (created
# then) raises CUDA_ERROR: the process that met it must end, the next one (the marker exists) works.
GPU_FAILS_ONCE_MARKER = "HYBRIDGL_TEST_GPU_FAILS_ONCE"


def _fail_once(module, args):
    marker = os.environ.get(GPU_FAILS_ONCE_MARKER)
    if type(module).__name__ == "CLIPTextEmbeddings" and marker and not os.path.exists(marker):
        Path(marker).touch()
        raise RuntimeError(CUDA_ERROR)


def tiny_sam_builder_on_a_gpu_that_fails_once(checkpoint: str | None = None) -> Sam:
    torch.nn.modules.module.register_module_forward_pre_hook(_fail_once)
    return build_tiny_sam(checkpoint)
