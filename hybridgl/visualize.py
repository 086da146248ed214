"""Overlay pictures: the chosen mask tinted on the image, runner-ups outlined, text and score written."""
from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

CHOSEN = (0, 200, 0)
RUNNER_UPS = [(255, 160, 0), (0, 160, 255), (230, 0, 230), (255, 255, 0)]


def overlay(image: np.ndarray, mask: np.ndarray | None, expression: str, score: float,
            runner_ups: list[np.ndarray] = (), alpha: float = 0.5) -> Image.Image:
    """image: uint8 [H,W,3]; mask: bool [H,W] or None; runner_ups: bool masks outlined in colour."""
    canvas = image.astype(np.float32).copy()
    if mask is not None:
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * np.array(CHOSEN, np.float32)
    canvas = np.ascontiguousarray(canvas.clip(0, 255).astype(np.uint8))
    thickness = max(1, round(min(image.shape[:2]) / 250))
    for k, other in enumerate(runner_ups):
        contours, _ = cv2.findContours(other.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, RUNNER_UPS[k % len(RUNNER_UPS)], thickness)
    if mask is not None:
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, CHOSEN, thickness + 1)
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    try:
        font = ImageFont.load_default(size=max(12, min(image.shape[:2]) // 25))
    except TypeError:  # Pillow < 10.1 (requirements allow 10.0): the fixed-size bitmap font
        font = ImageFont.load_default()
    label = f'"{expression}"  score {score:.2f}' if mask is not None else f'"{expression}"  no mask'
    box = draw.textbbox((0, 0), label, font=font)
    pad = 4
    draw.rectangle((0, 0, box[2] + 2 * pad, box[3] + 2 * pad), fill=(0, 0, 0))
    draw.text((pad, pad), label, fill=(255, 255, 255), font=font)
    return picture
