"""Command line: `python -m hybridgl segment IMAGE "expression" --out mask.png` (and `parse`, `evaluate`, `tune`)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import zipfile
from pathlib import Path

import numpy as np


class UsageError(Exception):
    """A bad input the user can fix: reported as one line, no traceback."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("models")
    g.add_argument("--clip", default=os.environ.get("HYBRIDGL_CLIP_MODEL", "openai/clip-vit-base-patch16"),
                   help="CLIP: Hugging Face id or local directory (env HYBRIDGL_CLIP_MODEL)")
    g.add_argument("--sam", default=os.environ.get("HYBRIDGL_SAM_MODEL", "vit_h"),
                   help="SAM model type vit_h|vit_l|vit_b, or 'none' with --proposals (env HYBRIDGL_SAM_MODEL)")
    g.add_argument("--sam-checkpoint", default=os.environ.get("HYBRIDGL_SAM_CHECKPOINT"),
                   help="SAM checkpoint path or URL (default: the official one, cached)")
    g.add_argument("--parser", default=os.environ.get("HYBRIDGL_PARSER", "auto"),
                   choices=["auto", "stanza", "rules"], help="expression parser (default auto)")
    g.add_argument("--device", default=os.environ.get("DEVICE"), help="cuda, cuda:1, cpu (default: cuda if present)")
    g.add_argument("--config", default=os.environ.get("HYBRIDGL_CONFIG"),
                   help="JSON or TOML file of HybridGLConfig overrides (env HYBRIDGL_CONFIG)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value (JSON value syntax), repeatable")
    g.add_argument("--offline", action="store_true", help="never touch the network (as HF_HUB_OFFLINE=1)")


def build_config(args: argparse.Namespace):
    from .config import HybridGLConfig

    try:
        values = HybridGLConfig.load(args.config).to_dict() if args.config else {}
        for item in args.set:
            key, sep, raw = item.partition("=")
            if not sep:
                raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
            try:
                values[key.strip()] = json.loads(raw)
            except json.JSONDecodeError:
                values[key.strip()] = raw
        return HybridGLConfig.from_dict(values)
    except FileNotFoundError as exc:
        raise UsageError(f"config file not found: {exc.filename}") from exc
    except OSError as exc:  # a folder, no permission
        raise UsageError(f"config file not readable: {exc.filename} ({exc.strerror})") from exc
    except (ValueError, TypeError) as exc:
        raise UsageError(f"bad config: {exc}") from exc


def load_model(args: argparse.Namespace, need_sam: bool = True):
    from .allocator import keep_freed_memory
    from .pipeline import HybridGL

    keep_freed_memory()  # this program runs the method: freed tensors' memory kept for the next pass
    sam = None if (args.sam or "").lower() in ("", "none") or not need_sam else args.sam
    return HybridGL.from_pretrained(clip=args.clip, sam=sam, sam_checkpoint=args.sam_checkpoint,
                                    parser=args.parser, device=args.device, config=build_config(args),
                                    offline=True if args.offline else None)


def read_image(path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    from .pipeline import load_image

    if not Path(path).is_file():
        raise UsageError(f"image not found: {path}")
    try:
        return load_image(path)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UsageError(f"not a readable image: {path} ({exc})") from exc


def read_proposals(path: str | None) -> np.ndarray | None:
    """Masks from a .npy (bool [N,H,W]) or .npz (key 'masks')."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise UsageError(f"proposals file not found: {path}")
    try:  # an .npz reads its members lazily: a torn one fails at data["masks"]
        data = np.load(path)
        if hasattr(data, "files") and "masks" not in data.files:
            raise UsageError(f"{path} has no 'masks' array (it holds {', '.join(data.files) or 'nothing'})")
        masks = np.asarray(data["masks"] if hasattr(data, "files") else data)
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as exc:  # empty, torn, pickled, not numpy
        raise UsageError(f"not a readable proposals file: {path} ({exc})") from exc
    return masks.astype(bool)


def cmd_segment(args: argparse.Namespace) -> int:
    from PIL import Image

    from .visualize import overlay

    if not args.expression.strip():
        raise UsageError("empty expression")
    image = read_image(args.image)
    proposals = read_proposals(args.proposals)
    model = load_model(args, need_sam=proposals is None)
    view = model.prepare(image, proposals=proposals)
    seg = model.segment(view, args.expression)
    h, w = view.output_size
    mask = seg.mask if seg.mask is not None else np.zeros((h, w), bool)
    Image.fromarray(mask.astype(np.uint8) * 255).save(args.out)
    if args.overlay:
        runner_ups = [view.masks[r["index"]] for r in seg.ranking[1:1 + args.runner_ups]]
        chosen = view.masks[seg.index] if seg.index is not None else None  # drawn on the image the model saw
        overlay(view.image, chosen, args.expression, seg.score, runner_ups).save(args.overlay)
    summary = {"image": str(args.image), "expression": args.expression, "size": [h, w],
               "model_version": model.model_version, "parser": model.parser_name, **seg.to_dict(),
               "mask_area": int(mask.sum()), "proposals": len(view)}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    print(f"{args.out}: score {seg.score:.3f}, proposal {seg.index} of {len(view)}"
          + (f" ({seg.reason})" if seg.reason else ""))
    return 0


def cmd_parse(args: argparse.Namespace) -> int:
    """Print how each expression is parsed: what CLIP encodes and which spatial guidance it gets."""
    from .parsing import make_parser

    try:
        parser = make_parser(args.parser)
    except RuntimeError as exc:
        raise UsageError(str(exc)) from exc
    for expression in args.expression:
        if not expression.strip():
            raise UsageError("empty expression")
        parsed = parser(expression)
        if args.json:
            print(json.dumps({"expression": expression, **parsed.to_dict()}))
            continue
        print(f"{expression!r} (parser: {parsed.parser})")
        for label, value in (("sentence", parsed.sentence), ("noun phrase", parsed.noun_phrase),
                             ("other nouns", " | ".join(parsed.other_nouns) or "-"),
                             ("relation", parsed.relation), ("direction", parsed.direction)):
            print(f"  {label:<12} {value}")
        if args.tree:
            words = parser.tree(expression)
            for i, w in enumerate(words):
                print(f"  {i + 1:>3} {w.text:<14} {w.upos:<6} {0 if w.head == i else w.head + 1:<4} {w.deprel}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybridgl", description="HybridGL referring segmentation")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "WARNING"))
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment the object an expression refers to")
    seg.add_argument("image")
    seg.add_argument("expression")
    seg.add_argument("--out", required=True, help="mask PNG (0/255)")
    seg.add_argument("--overlay", help="overlay PNG: mask tinted, runner-ups outlined, text and score")
    seg.add_argument("--json", help="result JSON: score, parse, ranking")
    seg.add_argument("--proposals", help="use these masks (.npy bool [N,H,W] or .npz 'masks') instead of SAM")
    seg.add_argument("--runner-ups", type=int, default=2, help="runner-up proposals outlined in the overlay")
    add_model_arguments(seg)
    seg.set_defaults(func=cmd_segment)

    pa = sub.add_parser("parse", help="show how expressions are parsed (noun phrase, relation, direction)")
    pa.add_argument("expression", nargs="+")
    pa.add_argument("--parser", default=os.environ.get("HYBRIDGL_PARSER", "auto"),
                    choices=["auto", "stanza", "rules"], help="expression parser (default auto)")
    pa.add_argument("--json", action="store_true", help="one JSON object per expression")
    pa.add_argument("--tree", action="store_true", help="also print the dependency tree the parse was read from")
    pa.set_defaults(func=cmd_parse)

    try:
        from .evaluation import cli as evaluation_cli
    except ImportError:  # pragma: no cover - evaluation extras missing
        evaluation_cli = None
    if evaluation_cli is not None:
        ev = sub.add_parser("evaluate", help="oIoU / mIoU on RefCOCO(+/g), PhraseCut or a Label Studio export")
        evaluation_cli.add_arguments(ev)
        ev.set_defaults(func=evaluation_cli.main)
        from .tuning import cli as tuning_cli

        tune = sub.add_parser("tune", help="tune the re-scorable parameters and calibrate the score on reviewed tasks")
        tuning_cli.add_arguments(tune)
        tune.set_defaults(func=tuning_cli.main)

    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(levelname)s %(name)s: %(message)s")
    from .distributed import DeviceFailure  # (no Ray import)

    try:
        return int(args.func(args) or 0)
    except DeviceFailure as exc:  # the run stopped on a broken GPU: one line that says what is kept
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
