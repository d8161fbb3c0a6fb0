"""Train the segmentation model on the real scans, with needles rendered onto them.

Reproducible from a seed: data split, augmentation, needle renders, initial weights and batch order
all draw from generators seeded by the config (the initial weights come from a file instead with
``init_weights``). Runs on the CPU (two cores: about 25 s an epoch) or on a GPU when torch sees
one; the exported model runs on the CPU either way. Each run writes ``weights.pt`` beside the
model for a later run to start from.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from usguide.data.needle_render import NEEDLE_BRIGHTNESS
from usguide.labels import CLASS_NAMES, NEEDLE
from usguide.segment import histogram_reference, normalise, without_histogram_matching

# The settings live in a torch-free module (checked before torch loads); imported from here too.
from usguide.training.config import TrainConfig

Log = Callable[[str], None]


@dataclass
class Prepared:
    """A sample brought to the network's input size once, before training."""

    image: np.ndarray  # (H, W) uint8 at input size
    mask: np.ndarray  # (H, W) uint8 at input size
    labelled: np.ndarray  # (C,) bool
    name: str
    native_image: np.ndarray  # the imaging area at its own size, for needle rendering
    native_mask: np.ndarray


# Fan shapes drawn for sector samples (see usguide.data.augment.sector_mask): from a phased
# array's near-point apex to a wide abdominal convex probe whose sides reach the box low down.
SECTOR_APEX_ABOVE = (0.05, 2.0)
SECTOR_SIDES_AT = (0.2, 0.9)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_samples(config: TrainConfig, log: Log) -> tuple[list[Prepared], list[Prepared]]:
    """Both data sets, split by subject group with the config's validation seed, each image
    cropped to its imaging area as the run-time stage crops it, and resized to input size."""
    from usguide.data.augment import resize_pair
    from usguide.data.datasets import open_dataset, split
    from usguide.imaging_region import find_imaging_region

    train: list[Prepared] = []
    val: list[Prepared] = []
    for name in config.datasets:
        # A published set's name, or the path of an exported annotation folder.
        dataset = open_dataset(name, config.data_root)
        train_idx, val_idx = split(
            dataset, val_fraction=config.val_fraction, seed=config.validation_seed
        )
        if config.max_samples is not None:
            train_idx, val_idx = train_idx[: config.max_samples], val_idx[: config.max_samples]
        for indices, out in ((train_idx, train), (val_idx, val)):
            for i in indices:
                s = dataset[i]
                box = find_imaging_region(s.image)
                image, mask = s.image, s.mask
                if box is not None:
                    x0, y0, x1, y1 = box
                    image, mask = image[y0 : y1 + 1, x0 : x1 + 1], mask[y0 : y1 + 1, x0 : x1 + 1]
                small, small_mask = resize_pair(image, mask, config.input_size)
                labelled = np.asarray(s.labelled, bool)
                out.append(Prepared(small, small_mask, labelled, s.name, image, mask))
        log(f"{name}: {len(train_idx)} train, {len(val_idx)} validation images")
    return train, val


def with_needle(
    sample: Prepared,
    rng: np.random.Generator,
    size: tuple[int, int],
    varied_look: bool = False,
    **pose_options: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """The sample with a needle rendered at the image's own resolution (as a real needle is
    imaged), then brought to input ``size``: image and mask (needle class where drawn).
    ``pose_options`` go to :func:`usguide.data.needle_render.random_pose`; with ``varied_look``
    the needle's brightness, reverberation and shadow are drawn as in the benchmark's sequences
    (:func:`usguide.data.needle_render.random_appearance`), else the renderer's defaults."""
    from usguide.data.augment import resize_pair

    brightness = NEEDLE_BRIGHTNESS if varied_look else None
    image, mask = _draw_needle(
        sample.native_image, sample.native_mask, rng, brightness, **pose_options
    )
    return resize_pair(image, mask, size)


def _draw_needle(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    brightness: tuple[float, float] | None,
    **pose_options: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """A needle drawn on the image, its pixels labelled needle in the mask. With a
    ``brightness`` range its look varies (:func:`usguide.data.needle_render.random_appearance`),
    else the renderer's defaults."""
    from usguide.data.needle_render import random_appearance, random_pose, render_needle

    pose = random_pose(image.shape, rng, **pose_options)
    look = random_appearance(rng, brightness) if brightness is not None else {}
    rendered = render_needle(image, pose, rng=rng, **look)
    mask = mask.copy()
    mask[rendered.mask] = NEEDLE
    return rendered.image, mask


class Batches:
    """Augmented training batches as tensors, reproducible from the generator it is given."""

    def __init__(self, samples: list[Prepared], config: TrainConfig) -> None:
        from usguide.data.augment import UltrasoundAugment, default_transforms

        self.samples = samples
        self.config = config
        self.augment = UltrasoundAugment(default_transforms(config.scanner_looks))
        # Only the runtime matches histograms. Trained on the augmented images as they are, the
        # network keeps what the augmentation teaches it (gain, depth gain); matched in training
        # too, it held up less under other grey maps (the model card).
        self._normalisation = without_histogram_matching(config.normalisation)
        self._x = np.empty((1, *config.input_size), np.float32)

    def epoch(
        self, rng: np.random.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        from usguide.data.augment import convex_view_pair, resize_pair, sector_mask
        from usguide.data.injectate_render import random_pocket

        cfg = self.config
        order = rng.permutation(len(self.samples))
        bs = cfg.batch_size
        for start in range(0, len(order) - bs + 1, bs):
            xs, ys, ls = [], [], []
            for i in order[start : start + bs]:
                s = self.samples[i]
                image, mask = s.native_image, s.native_mask
                # No draw when off: the same seed then gives the same batches as before.
                sector = cfg.sector_probability > 0 and rng.random() < cfg.sector_probability
                if sector:
                    fan_shape = (rng.uniform(*SECTOR_APEX_ABOVE), rng.uniform(*SECTOR_SIDES_AT))
                    image, mask = convex_view_pair(image, mask, *fan_shape)
                needle = rng.random() < cfg.needle_probability
                if needle:
                    image, mask = _draw_needle(
                        image,
                        mask,
                        rng,
                        cfg.needle_brightness_range if cfg.needle_varied_look else None,
                        min_length_mm=cfg.needle_min_length_mm,
                        angle_range_deg=cfg.needle_angle_range_deg,
                    )
                # No draw when off: the same seed then gives the same batches as before.
                pocket = cfg.injectate_probability > 0 and rng.random() < cfg.injectate_probability
                if pocket:
                    image, mask = random_pocket(image, mask, rng)
                if sector:
                    # A needle drawn beside the fan is not imaged there.
                    fan = sector_mask(*image.shape, *fan_shape)
                    image[~fan] = 0
                    mask[~fan] = 0
                if needle or pocket or sector:
                    image, mask = resize_pair(image, mask, cfg.input_size)
                else:
                    image, mask = s.image, s.mask
                image, mask = self.augment(image, mask, rng)
                x = np.empty(image.shape, np.float32)
                normalise(image, self._normalisation, x)
                xs.append(x)
                ys.append(mask.astype(np.int64))
                ls.append(s.labelled)
            yield (
                torch.from_numpy(np.stack(xs)[:, None]),
                torch.from_numpy(np.stack(ys)),
                torch.from_numpy(np.stack(ls)),
            )


def validation_set(val: list[Prepared], seed: int, size: tuple[int, int]) -> list[Prepared]:
    """Validation images as they are, plus each with a needle rendered from a fixed seed.

    The needles use :func:`~usguide.data.needle_render.random_pose`'s defaults, whatever the
    run's needle settings, so every run is measured with the same yardstick.
    """
    rng = np.random.default_rng(seed + 10_000)
    out = list(val)
    for s in val:
        image, mask = with_needle(s, rng, size)
        out.append(Prepared(image, mask, s.labelled, s.name + "+needle", image, mask))
    return out


@torch.no_grad()
def predict(model: torch.nn.Module, images: list[np.ndarray], config: TrainConfig) -> list:
    model.eval()
    out = []
    for image in images:
        x = np.empty(image.shape, np.float32)
        normalise(image, config.normalisation, x)
        logits = model(torch.from_numpy(x)[None, None])
        out.append(logits.argmax(1)[0].numpy().astype(np.uint8))
    return out


def score(model: torch.nn.Module, val: list[Prepared], config: TrainConfig) -> dict[str, Any]:
    from usguide.evaluate import DiceTable

    table = DiceTable()
    for s, pred in zip(val, predict(model, [s.image for s in val], config), strict=True):
        table.add(pred, s.mask, s.labelled)
    return table.summary()


@torch.no_grad()
def update_average(
    averaged: torch.nn.Module, model: torch.nn.Module, decay: float, step: int
) -> None:
    """Move ``averaged`` towards ``model``'s weights and normalisation statistics.

    ``step`` counts the optimiser steps taken. The decay is ramped up to ``decay`` as
    ``(1 + step) / (10 + step)`` so the first steps' random weights are soon forgotten; integer
    buffers (batch counts) are copied.
    """
    d = min(decay, (1 + step) / (10 + step))
    for a, m in zip(averaged.state_dict().values(), model.state_dict().values(), strict=True):
        if a.dtype.is_floating_point:
            a.mul_(d).add_(m.detach(), alpha=1 - d)
        else:
            a.copy_(m)


WEIGHTS_FILE = "weights.pt"
WEIGHTS_FORMAT = "usguide-segnet-weights/1"


def save_weights(model: torch.nn.Module, config: TrainConfig, path: Path) -> None:
    """The network's weights with what they fit (classes, channels, depth, input size), for a
    later run to start from (``init_weights``)."""
    torch.save(
        {
            "format": WEIGHTS_FORMAT,
            "name": config.name,
            "version": config.version,
            "class_names": list(CLASS_NAMES),
            "channels": list(config.channels),
            "depth": list(config.depth),
            "input_size": list(config.input_size),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        },
        path,
    )


def load_weights(model: torch.nn.Module, config: TrainConfig, path: str | Path) -> str:
    """Load weights saved by :func:`save_weights` into ``model`` (built from ``config``).

    Returns the name and version they came from. ValueError naming the file when it is not such
    a file or was saved for another network (classes, channels, depth).
    """
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"init_weights: {path}: no such file") from None
    except (pickle.UnpicklingError, EOFError, RuntimeError):
        # torch's message suggests loading with weights_only=False: never, for a file not ours.
        raise ValueError(
            f"init_weights: {path}: not a weights file (it does not read as saved tensors)"
        ) from None
    if not isinstance(saved, dict) or saved.get("format") != WEIGHTS_FORMAT:
        raise ValueError(
            f"init_weights: {path}: not a usguide weights file (expected {WEIGHTS_FORMAT}, "
            "as a training run writes beside its model.onnx)"
        )
    want = {
        "class_names": list(CLASS_NAMES),
        "channels": list(config.channels),
        "depth": list(config.depth),
    }
    for key, value in want.items():
        if saved.get(key) != value:
            raise ValueError(
                f"init_weights: {path}: saved for {key} = {saved.get(key)}, this run has {value}"
            )
    model.load_state_dict(saved["state_dict"])
    return f"{saved.get('name')} {saved.get('version')}"


def mean_dice(summary: dict[str, Any]) -> float:
    values = [v["dice"] for v in summary.values() if v["dice"] is not None]
    return float(np.mean(values)) if values else 0.0


def train(config: TrainConfig, log: Log = print) -> Path:
    """Train, keep the best epoch by mean validation Dice, export ONNX (and int8) to config.out.

    Returns the path of the shipped ``model.onnx``.
    """
    from usguide.training.export import export_onnx, quantize_int8
    from usguide.training.loss import marginal_cross_entropy, soft_dice_loss
    from usguide.training.model import SegNet

    config.validate()  # settings changed since it was built (the CLI's --data and --out)
    torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    train_set, val_set = load_samples(config, log)
    if len(train_set) < config.batch_size:
        # Only whole batches are trained: the run would export its starting weights.
        raise ValueError(
            f"the training split holds {len(train_set)} samples, fewer than batch_size = "
            f"{config.batch_size}: no batch would be trained (lower batch_size or add data)"
        )
    if config.normalisation.get("histogram_match") and "histogram_reference" not in (
        config.normalisation
    ):
        # The training images' grey levels: the runtime takes each frame's towards them.
        reference = histogram_reference(s.image for s in train_set)
        config.normalisation = {**config.normalisation, "histogram_reference": reference}
    val_full = validation_set(val_set, config.validation_seed, config.input_size)
    model = SegNet(len(CLASS_NAMES), config.channels, config.depth)
    if config.init_weights is not None:
        # After the random initialisation: the data and batches follow the seed as without it.
        source = load_weights(model, config, config.init_weights)
        log(f"starting from the weights of {source} ({config.init_weights})")
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    batches = Batches(train_set, config)
    steps = max(1, config.epochs * (len(train_set) // config.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=config.lr, total_steps=steps, pct_start=0.1
    )
    rng = np.random.default_rng(config.seed)
    decay = config.weight_average_decay
    averaged = None if decay is None else copy.deepcopy(model)
    kept = model if averaged is None else averaged  # validated, kept and exported
    best, best_state, history = -1.0, None, []
    step = 0
    for epoch in range(config.epochs):
        model.train()
        t0, losses = time.perf_counter(), []
        for x, y, labelled in batches.epoch(rng):
            logits = model(x)
            loss = marginal_cross_entropy(logits, y, labelled)
            loss = loss + config.dice_weight * soft_dice_loss(logits, y, labelled)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if step < steps:
                schedule.step()
            step += 1
            if averaged is not None and decay is not None:
                update_average(averaged, model, decay, step)
            losses.append(loss.item())
        summary = score(kept, val_full, config)
        m = mean_dice(summary)
        history.append(
            {
                "epoch": epoch,
                "loss": float(np.mean(losses)) if losses else math.nan,
                "val_mean_dice": m,
                "val": summary,
            }
        )
        if averaged is not None:
            # The weights as trained, to show what the average gives.
            history[-1]["val_as_trained"] = score(model, val_full, config)
        per_class = " ".join(f"{k}={v['dice']:.3f}" for k, v in summary.items() if v["dice"])
        as_trained = history[-1].get("val_as_trained")
        also = "" if as_trained is None else f" (as trained {mean_dice(as_trained):.3f})"
        log(
            f"epoch {epoch + 1}/{config.epochs} loss {history[-1]['loss']:.4f} "
            f"val {per_class} mean {m:.3f}{also} ({time.perf_counter() - t0:.0f} s)"
        )
        if m > best:
            best = m
            best_state = {k: v.detach().clone() for k, v in kept.state_dict().items()}
    assert best_state is not None
    model.load_state_dict(best_state)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    metadata = model_metadata(config, len(train_set), len(val_set), score(model, val_full, config))
    fp32 = export_onnx(
        model, out / "model_fp32.onnx", input_size=config.input_size, metadata=metadata
    )
    (out / "training_history.json").write_text(json.dumps(history, indent=1))
    save_weights(model, config, out / WEIGHTS_FILE)
    shipped = out / "model.onnx"
    if config.quantize:
        calib = [_model_input(s.image, config) for s in train_set[:: max(1, len(train_set) // 64)]]
        quantize_int8(fp32, shipped, calib)
    else:
        shipped.write_bytes(fp32.read_bytes())
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    log(f"wrote {shipped} (best mean validation Dice {best:.3f})")
    return shipped


def _model_input(image: np.ndarray, config: TrainConfig) -> np.ndarray:
    x = np.empty(image.shape, np.float32)
    normalise(image, config.normalisation, x)
    return x[None, None]


def model_metadata(
    config: TrainConfig, n_train: int, n_val: int, val_summary: dict[str, Any]
) -> dict[str, Any]:
    """The metadata stored in the ONNX file and metadata.json."""
    return {
        "name": config.name,
        "version": config.version,
        "class_names": list(CLASS_NAMES),
        "input_size": list(config.input_size),
        "input_channels": "grey",
        "normalisation": config.normalisation,
        "training_data": {
            "datasets": list(config.datasets),
            "train_images": n_train,
            "val_images": n_val,
            "needles": "rendered onto real frames (usguide.data.needle_render)",
            "seed": config.seed,
            "split_seed": config.validation_seed,
        },
        "validation_metrics": {
            "note": "torch model at input size, validation split",
            **{
                k: {"dice": v["dice"], "ci95": v["ci95"], "n": v["n"]}
                for k, v in val_summary.items()
            },
        },
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
    }
