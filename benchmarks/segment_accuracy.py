"""Accuracy of the shipped segmentation model on the validation split, and its temporal stability.

Usage::

    python benchmarks/segment_accuracy.py [--model-dir models/usguide-seg] [--data DIR] [--seed 0]
                                          [--sector | --looks]

1. Per-class Dice with bootstrap 95% intervals (resampling whole near-duplicate groups) on the
   validation split (the split training used,
   same seed), at each image's native size through the runtime stage, for every inference
   engine installed and every model file in the folder side by side (model.onnx as shipped,
   model_fp32.onnx):
   nerve and vessel on USGRA-Seg, fascia on DL_Track, and the needle rendered
   ``NEEDLES_PER_IMAGE`` times onto every validation image at native size (a fixed seed,
   independent of the renders seen in training). A render counts for the needle class only: the
   anatomy under it is the same image, already counted once. With ``--sector`` every validation
   image is shown as a convex probe would show its tissue (:func:`usguide.data.augment.sector_view`,
   the default fan; black beside it), masks converted alike, needles drawn straight and cut to
   the fan; only this part runs.
   With ``--looks`` (only this part runs), the same real images (no needles) as other scanners
   and settings would show them (:data:`LOOKS`): grey maps, edge enhancement, blur, lower
   resolution, speckle reduction, JPEG compression. Sites differ in these far more than in
   anatomy; the validation split comes from one nerve scanner.
2. Temporal stability: label agreement between consecutive frames (mean over classes present of
   the Dice between frame t and t+1) on slowly moving sequences: validation frames under smooth
   simulated probe motion, and the real 120-frame SonoSite cine. With and without smoothing.
3. Fluid beside the nerve: ``POCKETS_PER_IMAGE`` anechoic pockets (injectate, hydrodissection)
   drawn against the nerve of every USGRA-Seg validation image with one
   (:func:`usguide.data.injectate_render.random_pocket`): the share of fluid pixels the model
   calls nerve (an intraneural warning waiting to happen) and the nerve's Dice with fluid beside
   it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
from machine import machine_line

from usguide.data.augment import sector_view
from usguide.data.datasets import DlTrackApo, UsgraSeg, split
from usguide.data.needle_render import random_pose, render_needle
from usguide.evaluate import DiceTable, dice, format_table
from usguide.frame import Frame, Region
from usguide.imaging_region import find_imaging_region
from usguide.labels import N_CLASSES, NEEDLE, NERVE
from usguide.segment import Segmenter, available_engines
from usguide.sources.dicom import DicomSource

REPO = Path(__file__).resolve().parents[1]
# Needle poses vary far more than the anatomy under them: several per image steady the figure.
NEEDLES_PER_IMAGE = 3
NEEDLE_ONLY = tuple(c == NEEDLE for c in range(N_CLASSES))
POCKETS_PER_IMAGE = 3


def validation_triples(
    root: str | None, seed: int, sector: bool = False
) -> Iterator[tuple[np.ndarray, np.ndarray, tuple[bool, ...], str, str]]:
    """(image, truth, labelled, kind, group) for the validation split, plus needle renders; the
    group is the image's near-duplicate group, shared by its renders."""
    rng = np.random.default_rng(seed + 20_000)
    for dataset in (UsgraSeg(root), DlTrackApo(root)):
        _, val = split(dataset, val_fraction=0.2, seed=seed)
        for i in val:
            s = dataset[i]
            image, truth = s.image, s.mask
            # A needle is only imaged inside the imaging region: outside it (scanner UI, black
            # borders) the runtime labels nothing, so a needle drawn there would be unmatchable.
            box = find_imaging_region(image)
            imaged = None
            if sector:
                box = box or (0, 0, image.shape[1] - 1, image.shape[0] - 1)
                grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
                image, truth, imaged = sector_view(grey, truth, box)
                image, truth = image * imaged, truth * imaged
            group = f"{dataset.__class__.__name__}/{s.group}"
            yield image, truth, s.labelled, dataset.__class__.__name__, group
            for _ in range(NEEDLES_PER_IMAGE):
                pose = random_pose(image.shape, rng, region=box)
                rendered = render_needle(image, pose, rng=rng, region=box)
                drawn = rendered.mask if imaged is None else rendered.mask & imaged
                mask = truth.copy()
                mask[drawn] = NEEDLE
                shown = rendered.image if imaged is None else rendered.image * imaged
                yield shown, mask, NEEDLE_ONLY, "needle", group


def _grey(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def _curve(f: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """A grey map from ``f`` over [0, 1] (rescaled to reach 0 and 1)."""
    v = f(np.linspace(0.0, 1.0, 256))
    lut = np.clip(255.0 * (v - v[0]) / (v[-1] - v[0]) + 0.5, 0, 255).astype(np.uint8)
    return lambda image: cv2.LUT(_grey(image), lut)


def _half_resolution(image: np.ndarray) -> np.ndarray:
    g = _grey(image)
    h, w = g.shape
    small = cv2.resize(g, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _edge_enhanced(image: np.ndarray) -> np.ndarray:
    g = _grey(image).astype(np.float32)
    out = g + 1.0 * (g - cv2.GaussianBlur(g, (0, 0), 2.0))
    return np.clip(out, 0, 255).astype(np.uint8)


def _jpeg(image: np.ndarray) -> np.ndarray:
    return cv2.imdecode(cv2.imencode(".jpg", _grey(image), [cv2.IMWRITE_JPEG_QUALITY, 25])[1], 0)


# Other scanners' and settings' renderings of the same tissue. Training with scanner_looks
# draws power-law grey maps and unsharp masks (GreyMap, EdgeEnhance: marked *); the S-curve,
# log compression and the rest are outside what any training run draws.
LOOKS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "as acquired": _grey,
    "grey map, power 0.6 *": _curve(lambda v: v**0.6),
    "grey map, power 1.6 *": _curve(lambda v: v**1.6),
    "grey map, S-curve": _curve(lambda v: 1.0 / (1.0 + np.exp(-8.0 * (v - 0.5)))),
    "grey map, log compression": _curve(lambda v: np.log1p(10.0 * v)),
    "edge enhancement *": _edge_enhanced,
    "blur 1.5 px": lambda image: cv2.GaussianBlur(_grey(image), (0, 0), 1.5),
    "half resolution": _half_resolution,
    "speckle reduction (bilateral)": lambda image: cv2.bilateralFilter(_grey(image), 7, 40, 5),
    "JPEG quality 25": _jpeg,
}


def scanner_looks(models: list[Path], root: str | None, seed: int) -> None:
    """Print Dice of nerve, vessel and fascia on the real validation images under each look."""
    real = [t for t in validation_triples(root, seed) if t[3] != "needle"]
    print("\n## other scanners' looks (real validation images, no needles)\n")
    print("| model | look | nerve | vessel | fascia |")
    print("|---|---|---:|---:|---:|")
    for model in models:
        seg = Segmenter(model)
        for name, look in LOOKS.items():
            table = DiceTable()
            for image, truth, labelled, _, group in real:
                table.add(seg(as_frame(look(image))).copy(), truth, labelled, group)
            d = {k: v["dice"] for k, v in table.summary(seed=seed).items()}
            print(
                f"| {model.name} | {name} | {d['nerve']:.3f} | {d['vessel']:.3f} "
                f"| {d['fascia']:.3f} |"
            )


def fluid_beside_nerve(model: Path, root: str | None, seed: int) -> tuple[float, float, int]:
    """Mean share of fluid pixels labelled nerve, mean nerve Dice, number of renders."""
    from usguide.data.injectate_render import random_pocket

    rng = np.random.default_rng(seed + 30_000)
    seg = Segmenter(model)
    usgra = UsgraSeg(root)
    _, val = split(usgra, val_fraction=0.2, seed=seed)
    as_nerve, nerve_dice = [], []
    for i in val:
        s = usgra[i]
        if not (s.mask == NERVE).any():
            continue
        for _ in range(POCKETS_PER_IMAGE):
            image, truth = random_pocket(s.image, s.mask, rng, beside_nerve=1.0)
            # Fluid: where the pocket darkened the tissue (excluded nerve pixels never are).
            fluid = image.astype(np.int16) < s.image.astype(np.int16) - 30
            labels = seg(as_frame(image))
            if fluid.sum() >= 50:
                as_nerve.append(float((labels[fluid] == NERVE).mean()))
            nerve_dice.append(dice(labels == NERVE, truth == NERVE))
    return float(np.mean(as_nerve)), float(np.mean(nerve_dice)), len(nerve_dice)


def as_frame(image: np.ndarray) -> Frame:
    """The image as the CLI would see it: its imaging area found in the pixels."""
    box = find_imaging_region(image)
    region = Region(box, None, True, "detected") if box else Region.whole(*image.shape[:2])
    return Frame(image, 0, None, None, region, "validation")


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice between two label maps over the classes either shows."""
    classes = [c for c in range(1, 5) if (a == c).any() or (b == c).any()]
    if not classes:
        return 1.0
    return float(np.mean([dice(a == c, b == c) for c in classes]))


def moving_sequence(image: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A slow smooth drift (up to ~3 % of the width over the sequence) and a small rotation."""
    h, w = image.shape
    shift = np.cumsum(rng.normal(0, 0.15, (n, 2)), axis=0) * (w / 256)
    angle = np.cumsum(rng.normal(0, 0.03, n))
    frames = []
    for k in range(n):
        m = cv2.getRotationMatrix2D((w / 2, h / 2), float(angle[k]), 1.0)
        m[:, 2] += shift[k]
        frames.append(
            cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        )
    return frames


def stability(
    model: Path, frames_sets: list[list[np.ndarray]], smoothing: float, engine: str = "auto"
) -> float:
    seg = Segmenter(model, smoothing=smoothing, engine=engine)
    values = []
    for frames in frames_sets:
        seg.reset()
        previous = None
        for f in frames:
            labels = seg(f if isinstance(f, Frame) else as_frame(f)).copy()
            if previous is not None:
                values.append(agreement(previous, labels))
            previous = labels
    return float(np.mean(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=str(REPO / "models" / "usguide-seg"))
    parser.add_argument("--data", default=None)
    parser.add_argument("--seed", type=int, default=0)
    views = parser.add_mutually_exclusive_group()
    views.add_argument(
        "--sector", action="store_true", help="the images as a curvilinear probe would show them"
    )
    views.add_argument(
        "--looks", action="store_true", help="the images as other scanners and settings show them"
    )
    args = parser.parse_args()
    models = [
        p
        for p in (Path(args.model_dir) / n for n in ("model.onnx", "model_fp32.onnx"))
        if p.exists()
    ]
    if args.looks:
        scanner_looks(models, args.data, args.seed)
        return
    triples = list(validation_triples(args.data, args.seed, args.sector))
    print(
        f"# segmentation accuracy: validation split seed {args.seed}, {len(triples)} images "
        f"(real and with rendered needles), {machine_line()}"
        + ("; shown as a curvilinear probe's sector" if args.sector else "")
    )
    for engine in available_engines():
        for model in models:
            seg = Segmenter(model, engine=engine)
            table = DiceTable()
            for image, truth, labelled, _, group in triples:
                table.add(seg(as_frame(image)).copy(), truth, labelled, group)
            print(f"\n## {model.name}, {engine}\n")
            print(format_table(table.summary(seed=args.seed)))
    if args.sector:
        return

    rng = np.random.default_rng(args.seed)
    usgra = UsgraSeg(args.data)
    _, val = split(usgra, val_fraction=0.2, seed=args.seed)
    synthetic = [moving_sequence(usgra[i].image, 30, rng) for i in val[:10]]
    with DicomSource(REPO / "tests" / "data" / "dicom" / "color3d_jpeg_baseline.dcm") as src:
        cine = [[f for f in src]]
    print("\n## temporal stability (mean Dice between consecutive label maps)\n")
    print("| model | sequence | smoothing 0 | smoothing 0.5 |")
    print("|---|---|---:|---:|")
    for model in models:
        for name, sets in (
            ("10 val frames x 30, slow probe drift", synthetic),
            ("SonoSite cine, 120 frames", cine),
        ):
            raw = stability(model, sets, 0.0)
            smooth = stability(model, sets, 0.5)
            print(f"| {model.name} | {name} | {raw:.3f} | {smooth:.3f} |")

    print("\n## fluid beside the nerve (USGRA-Seg validation images with a nerve)\n")
    print("| model | renders | fluid labelled nerve | nerve Dice |")
    print("|---|---:|---:|---:|")
    for model in models:
        share, nerve, n = fluid_beside_nerve(model, args.data, args.seed)
        print(f"| {model.name} | {n} | {share:.3f} | {nerve:.3f} |")


if __name__ == "__main__":
    main()
