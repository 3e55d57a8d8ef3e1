"""`python -m wellocr.predict` — transcribe header images with a run's adapter.

    python -m wellocr.predict --run RUN_DIR IMAGE... [--checkpoint final|best|latest|PATH] [--json]
                              [--batch-size B]

IMAGE is a file or a folder (its *.png, *.jpg, *.jpeg, *.tif, *.tiff, *.webp, sorted by name). Images are prepared
(pixel budget, processor grid) and prompted exactly as in training, then decoded greedily in batches.

The prompt: rows of a data set may carry their own instruction (the synthetic set does), and the model learnt
to answer that one, so the instruction of the first row of the run's training split is used when the data set
can be read (a local directory, or a hub data set in the local cache); otherwise `data.instruction`, with a note.

Output: `== path ==` then the transcription, per image; with --json one JSON array of
{"image": path, "text": transcription, "fields": {LABEL: value}} (fields: wellocr.metrics.parse_fields).
An empty transcription is said so (in the block, and a warning on stderr that points at the adapter and
eval.max_new_tokens), never printed as an empty block.
An unreadable image, or one the processor cannot take (say an aspect ratio over 200), is skipped with a warning;
when none is left the exit code is 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from wellocr.artifacts import load_run_config, resolve_checkpoint
from wellocr.cli import UserErrorParser, positive_int, run_command
from wellocr.config import Config
from wellocr.data import training_instruction
from wellocr.errors import UserError
from wellocr.inference import generate_batch, load_model, prepare_backend
from wellocr.metrics import parse_fields
from wellocr.model import Backend

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")
NO_TEXT = "(the model produced no text)"


def find_images(arguments: list[str]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted); a missing path or no image is a UserError."""
    found: list[Path] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"{argument}: no such file or folder; give image files or folders of images")
    if not found:
        raise UserError(f"no images found in {', '.join(arguments)} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return found


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def readable(paths: list[Path]) -> list[Path]:
    """The paths whose image header parses (cheap: no pixel decode); the others are skipped with a warning."""
    from PIL import Image

    ok = []
    for path in paths:
        try:
            with Image.open(path):
                ok.append(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, never a crash
            warn(f"skipping {path}: not a readable image ({type(exc).__name__}: {exc})")
    return ok


def load_image(path: Path, cfg: Config) -> Any:
    """The image prepared exactly as training and evaluation prepare theirs (`wellocr.data.prepare_image`), so the
    model is shown the pixels it learnt on; ValueError for an image the processor cannot take."""
    from PIL import Image

    from wellocr.data import prepare_image

    with Image.open(path) as img:
        return prepare_image(img, cfg.data.min_pixels, cfg.data.max_pixels)


def transcribe(model: Any, processor: Any, cfg: Config, paths: list[Path], instruction: str,
               batch_size: int, backend: Backend) -> list[tuple[Path, str]]:
    """(path, transcription) for every image that decodes, in order; decoding failures are warned and skipped."""
    results = []
    for start in range(0, len(paths), batch_size):
        images, batch_paths = [], []
        for path in paths[start:start + batch_size]:
            try:
                images.append(load_image(path, cfg))
                batch_paths.append(path)
            except Exception as exc:  # noqa: BLE001
                warn(f"skipping {path}: cannot decode ({type(exc).__name__}: {exc})")
        if images:
            texts = generate_batch(model, processor, images, [instruction] * len(images), cfg.eval.max_new_tokens,
                                   backend=backend)
            results.extend(zip(batch_paths, texts))
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = UserErrorParser(prog="python -m wellocr.predict", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="run directory (holds config.yaml)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    parser.add_argument("--checkpoint", default="final",
                        help="final (default), best (lowest eval loss), latest, or a checkpoint directory")
    parser.add_argument("--json", action="store_true", help="print one JSON array instead of text blocks")
    parser.add_argument("--batch-size", type=positive_int, help="images per batch (default: eval.batch_size)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[tuple[Path, str]]:
    paths = find_images(args.images)
    if not args.run.is_dir():
        raise UserError(f"--run {args.run}: no such directory")
    cfg = load_run_config(args.run)
    adapter_dir, _ = resolve_checkpoint(args.run, args.checkpoint)
    paths = readable(paths)
    if not paths:
        raise UserError("none of the images could be read (see the warnings above)")
    backend = prepare_backend(cfg)
    instruction = training_instruction(cfg.data)
    model, processor = load_model(cfg, backend, adapter_dir)
    results = transcribe(model, processor, cfg, paths, instruction, args.batch_size or cfg.eval.batch_size, backend)
    if not results:
        raise UserError("none of the images could be decoded (see the warnings above)")
    if args.json:
        print(json.dumps([{"image": str(p), "text": t, "fields": parse_fields(t)} for p, t in results],
                         indent=2, ensure_ascii=False))
    else:
        for path, text in results:
            print(f"== {path} ==\n{text or NO_TEXT}\n")
    empty = sum(not text for _, text in results)
    if empty:
        warn(f"the model produced no text for {empty} of {len(results)} image(s): it ended its answer at once (or "
             f"gave only special tokens within eval.max_new_tokens={cfg.eval.max_new_tokens}). Check that the "
             f"adapter ({adapter_dir}) is a trained one (python -m wellocr.evaluate --run {args.run}, or "
             "--checkpoint best|latest) and that eval.max_new_tokens is large enough for a whole header")
    return results


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: run(parse_args(argv)), log_level=logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
