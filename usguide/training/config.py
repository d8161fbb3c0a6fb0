"""The training run's settings (:class:`TrainConfig`), read from TOML and checked when built.

Torch-free, unlike the rest of :mod:`usguide.training`: a bad config then fails in one line
before torch loads, and its checks are tested where torch is not installed.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from usguide.data.needle_render import NEEDLE_BRIGHTNESS
from usguide.segment import normalisation_problem  # torch-free, a few ms past needle_render


@dataclass(frozen=True)
class Bounds:
    """The values a number setting (or each number of a list setting) may take."""

    low: float
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False

    def __contains__(self, x: float) -> bool:
        above = x > self.low if self.low_open else x >= self.low
        if self.high is None:
            return above
        return above and (x < self.high if self.high_open else x <= self.high)

    def __str__(self) -> str:
        low = _show(self.low)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{low}, {_show(self.high)}{right}"


AT_LEAST_ONE = Bounds(1)
POSITIVE = Bounds(0, low_open=True)
NON_NEGATIVE = Bounds(0)
SHARE = Bounds(0, 1)
SEED = Bounds(0, 2**32 - 1)  # numpy's global seed takes no more

# Bounds of each number setting; for a list, of each of its numbers. Types come from the fields.
BOUNDS: dict[str, Bounds] = {
    "seed": SEED,
    "split_seed": SEED,
    # The network halves the image four times: less than 16 px leaves nothing at its bottom.
    "input_size": Bounds(16),
    "epochs": AT_LEAST_ONE,
    "batch_size": AT_LEAST_ONE,
    "lr": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "dice_weight": NON_NEGATIVE,
    "needle_probability": SHARE,
    "needle_min_length_mm": POSITIVE,
    "needle_angle_range_deg": Bounds(0, 90),
    "needle_brightness_range": POSITIVE,
    "injectate_probability": SHARE,
    "sector_probability": SHARE,
    # All of it in validation would leave nothing to train on.
    "val_fraction": Bounds(0, 1, high_open=True),
    "channels": AT_LEAST_ONE,
    "depth": NON_NEGATIVE,
    "threads": AT_LEAST_ONE,
    "max_samples": AT_LEAST_ONE,
    # 0 would average nothing (the weights as trained); 1 would keep the starting weights.
    "weight_average_decay": Bounds(0, 1, low_open=True, high_open=True),
}
# (low, high) settings: drawn uniformly between the two.
ORDERED = ("needle_angle_range_deg", "needle_brightness_range")
NORMALISATION_KEYS = ("mode", "mean", "std", "min_std", "histogram_match", "histogram_reference")


@dataclass
class TrainConfig:
    """Everything a training run depends on; read from a TOML file by :meth:`from_toml`.

    Every setting is checked when the config is built (:meth:`validate`): a wrong type, a value
    out of range or a normalisation the runtime would refuse is a ValueError naming the key.
    """

    seed: int = 0
    # The validation split and its needle renders follow split_seed (the seed when unset), so a
    # run with another seed is chosen and compared on the same images.
    split_seed: int | None = None
    input_size: tuple[int, int] = (256, 256)
    epochs: int = 60
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 1e-4
    dice_weight: float = 1.0
    needle_probability: float = 0.5
    # Shortest rendered shaft and the angles of rendered needles to the probe surface (1.4.0
    # drew 5-60 degrees, see models/usguide-seg/train.toml; the card lists what was tried).
    needle_min_length_mm: float = 8.0
    needle_angle_range_deg: tuple[float, float] = (10.0, 60.0)
    # Vary the rendered needles' brightness, reverberation and shadow (on for 1.4.0), the
    # brightness over this range (a faint needle in bright muscle has little contrast).
    needle_varied_look: bool = False
    needle_brightness_range: tuple[float, float] = NEEDLE_BRIGHTNESS
    # Share of training images given an anechoic fluid pocket (injectate, hydrodissection),
    # mostly beside a nerve, labelled background: fluid next to a nerve is not nerve.
    injectate_probability: float = 0.0
    # Share of training images shown as a convex probe pressed on the same skin displays them
    # (usguide.data.augment.convex_view_pair: in a fan, black beside it), so that the fan's edges
    # and its curved skin line are learnt as no needle and no fascia. Needles are rendered after
    # the conversion: they stay straight. Tried for 1.5.0 and not shipped (see the model card).
    sector_probability: float = 0.0
    # Vary the scanner's look as sites differ: grey map (dynamic range) and edge enhancement
    # (usguide.data.augment.GreyMap, EdgeEnhance).
    scanner_looks: bool = False
    # Validate, keep and export an exponential moving average of the weights (decay per
    # optimiser step) instead of the weights as trained; unset: the weights as trained.
    weight_average_decay: float | None = None
    # Start from the weights a run saved (its weights.pt, as models/usguide-seg/ ships) instead of
    # random ones: fine-tuning, on other data or with other settings (usually a lower lr).
    init_weights: str | None = None
    val_fraction: float = 0.2
    datasets: tuple[str, ...] = ("usgra-seg", "dltrack-apo")
    channels: tuple[int, int, int, int] = (16, 32, 64, 128)
    depth: tuple[int, int, int, int] = (1, 2, 3, 3)
    # The model's input normalisation (usguide.segment.normalise), stored in its metadata.
    # ``histogram_match = s`` takes each image's grey levels s of the way to the training
    # images' (their mean quantiles, computed by the run and stored as histogram_reference).
    normalisation: dict[str, Any] = field(default_factory=lambda: {"mode": "zscore"})
    data_root: str | None = None
    out: str = "models/usguide-seg"
    name: str = "usguide-seg"
    version: str = "1.0.0"
    threads: int = 2
    max_samples: int | None = None  # small runs (tests, smoke checks)
    quantize: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every setting and bring it to its field's type (lists to tuples, whole numbers
        to floats); ValueError naming the first bad key. Run again after changing settings."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = _conform(f.name, getattr(self, f.name), hints[f.name])
            setattr(self, f.name, value)
            bounds = BOUNDS.get(f.name)
            numbers = value if isinstance(value, tuple) else (value,)
            if bounds is not None and value is not None and not all(v in bounds for v in numbers):
                each = "each value" if isinstance(value, tuple) else "a value"
                raise ValueError(f"{f.name}: expected {each} {bounds}, got {_show(value)}")
            if any(isinstance(v, str) and not v for v in numbers):
                raise ValueError(f"{f.name}: expected a non-empty string, got {_show(value)}")
        for key in ORDERED:
            low, high = getattr(self, key)
            if low > high:
                got = _show((low, high))
                raise ValueError(f"{key}: expected [low, high] with low <= high, got {got}")
        if not self.datasets:
            raise ValueError("datasets: expected at least one data set, got []")
        _check_normalisation(self.normalisation)
        if self.init_weights is not None and not Path(self.init_weights).is_file():
            raise ValueError(f"init_weights: {self.init_weights}: no such file")
        # Only the varied look draws a brightness: the range would be silently ignored.
        if not self.needle_varied_look and self.needle_brightness_range != NEEDLE_BRIGHTNESS:
            raise ValueError(
                "needle_brightness_range: used only with needle_varied_look = true "
                "(set it, or leave the range out)"
            )

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> TrainConfig:
        """The config in the TOML file at ``path``; ValueError naming the file and the key."""
        with open(path, "rb") as f:
            try:
                raw = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: not valid TOML: {e}") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown settings {unknown}")
        try:
            return cls(**raw)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @property
    def validation_seed(self) -> int:
        """Seed of the train/validation split and of the validation needle renders."""
        return self.seed if self.split_seed is None else self.split_seed


class _Mismatch(Exception):
    """A value not of the type a field expects (reported by :func:`_conform` with the key)."""


def _conform(key: str, value: Any, hint: Any) -> Any:
    """``value`` as the field's type ``hint``; ValueError naming ``key`` and the type."""
    try:
        return _as_type(value, hint)
    except _Mismatch:
        raise ValueError(f"{key}: expected {_describe(hint)}, got {_show(value)}") from None


def _as_type(value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is types.UnionType:  # X | None
        if value is None and type(None) in args:
            return None
        (inner,) = (a for a in args if a is not type(None))
        return _as_type(value, inner)
    if origin is tuple:
        # TOML gives lists; a tuple is what the code and the defaults hold.
        if not isinstance(value, list | tuple):
            raise _Mismatch
        items = (args[0],) * len(value) if args[-1] is Ellipsis else args
        if len(value) != len(items):
            raise _Mismatch
        return tuple(_as_type(v, t) for v, t in zip(value, items, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return dict(value)
    # bool is an int in Python: true = 1 would otherwise pass for a seed or a size.
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if (
        hint is float
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    ):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    raise _Mismatch


# A type's name, alone and in a list.
_NAMES = {
    bool: ("true or false", "booleans"),
    int: ("an integer", "integers"),
    float: ("a finite number", "finite numbers"),
    str: ("a string", "strings"),
}


def _describe(hint: Any) -> str:
    """What a field of type ``hint`` takes, in TOML's words."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is types.UnionType:
        (inner,) = (a for a in args if a is not type(None))
        return f"{_describe(inner)} (or leave it out)"
    if origin is tuple:
        if args[-1] is Ellipsis:
            return f"a list of {_NAMES[args[0]][1]}"
        return f"a list of {len(args)} {_NAMES[args[0]][1]}"
    if origin is dict:
        return "a table"
    return _NAMES[hint][0]


def _show(value: Any) -> str:
    """A value as TOML writes it, so the message matches the user's file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # TOML's double quotes
    return repr(value)


def _check_normalisation(normalisation: dict[str, Any]) -> None:
    """Refuse what the runtime would refuse in the exported model (or silently ignore)."""
    unknown = sorted(set(normalisation) - set(NORMALISATION_KEYS))
    if unknown:
        allowed = ", ".join(NORMALISATION_KEYS)
        raise ValueError(f"normalisation: unknown keys {unknown} (allowed: {allowed})")
    for key in ("mean", "std", "min_std", "histogram_match"):
        value = normalisation.get(key)
        if isinstance(value, bool):  # a bool passes for a number at run time
            raise ValueError(f"normalisation.{key}: expected a number, got {_show(value)}")
    problem = normalisation_problem(normalisation, reference_required=False)
    if problem is not None:
        raise ValueError(f"normalisation: {problem}")
