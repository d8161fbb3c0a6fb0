"""The segmentation stage: an ONNX model labels every pixel as background, nerve, vessel, fascia or
needle.

The ONNX file is the single source of truth for its preprocessing: class names, input size,
normalisation and version are read from its metadata_props (keys ``usguide.*``). The session is
created once; per frame the stage crops the imaging region, resizes it, normalises, infers and
brings the labels back to the frame's size, reusing its buffers.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from usguide.errors import UsguideError
from usguide.frame import Frame
from usguide.labels import CLASS_NAMES

METADATA_PREFIX = "usguide."
REQUIRED_METADATA = ("class_names", "input_size", "normalisation", "version")
# Grey-level standard deviation below which a region holds no image to label (black, saturated).
FLAT_STD = 2.0
# Isolated regions smaller than these shares of the imaging region are dropped from the labels.
# On the validation split most of the model's false vessel and fascia regions are under 0.05 % of
# the region, and no annotated vessel (0.3 %) or fascia band (0.5 %) is as small as the limit.
# Nerves are kept down to specks: a missed nerve is the costlier error, and the smallest
# annotated nerve in USGRA-Seg is 0.019 % of its region (two one-pixel annotation specks aside).
# A nerve region of a pixel or two, where the class margins cross at the needle's tip, made a
# tip-to-nerve distance and intraneural warnings out of nothing. Needles are the needle
# tracker's to judge.
MIN_REGION_FRACTION = {"nerve": 0.0001, "vessel": 0.001, "fascia": 0.003}
# The shipped model lives in the repository's models/ folder (a checkout or an editable install).
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "usguide-seg" / "model.onnx"


class ModelError(UsguideError):
    """A model file that is missing, corrupt, or whose shape or metadata do not fit usguide."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a segmentation model declares about itself (from its ONNX metadata)."""

    path: str
    class_names: tuple[str, ...]
    input_size: tuple[int, int]  # (rows, cols)
    normalisation: dict[str, Any]
    version: str
    metadata: dict[str, str]


# Grey levels below this are nothing imaged (black beside a convex fan, no echo): histogram
# matching leaves them as they are and ranks only the levels above.
HISTOGRAM_FLOOR = 4


def _grey_counts(grey: np.ndarray) -> np.ndarray:
    """Pixels per grey level (uint8 input), float64."""
    return cv2.calcHist([grey], [0], None, [256], [0, 256]).ravel().astype(np.float64)


def histogram_quantiles(grey: np.ndarray, n: int = 100) -> np.ndarray:
    """The grey levels at ranks ``(k + 0.5) / n`` among ``grey``'s pixels at or above
    :data:`HISTOGRAM_FLOOR` (uint8 input); the mean over a model's training images is the
    ``histogram_reference`` of its normalisation. Empty when no pixel is that bright."""
    counts = _grey_counts(grey)[HISTOGRAM_FLOOR:]
    total = counts.sum()
    if not total:
        return np.empty(0)
    ranks = (np.arange(n) + 0.5) / n
    cdf = np.cumsum(counts) / total
    return HISTOGRAM_FLOOR + np.searchsorted(cdf, ranks).astype(np.float64)


def histogram_reference(images: Iterable[np.ndarray], n: int = 100) -> list[float]:
    """The mean of :func:`histogram_quantiles` over ``images`` (uint8 grey, as the model sees
    them: imaging region at input size): a ``histogram_reference`` for a normalisation."""
    quantiles = [q for q in (histogram_quantiles(g, n) for g in images) if q.size]
    if not quantiles:
        raise ValueError("no image has pixels above the histogram floor")
    return [round(float(v), 2) for v in np.mean(quantiles, axis=0)]


def histogram_match_lut(grey: np.ndarray, reference: np.ndarray, strength: float) -> np.ndarray:
    """A uint8 lookup table taking ``grey``'s levels ``strength`` of the way to the levels of
    the same rank in ``reference`` (quantiles at evenly spaced ranks, as
    :func:`histogram_quantiles` gives them): the image's grey map brought towards the one the
    model was trained on. Levels below :data:`HISTOGRAM_FLOOR` stay."""
    counts = _grey_counts(grey)
    counts[:HISTOGRAM_FLOOR] = 0.0
    total = counts.sum()
    levels = np.arange(256, dtype=np.float64)
    if not total:
        return levels.astype(np.uint8)
    # Each level's mid-rank: a level holding many pixels goes to the middle of its share.
    ranks = (np.cumsum(counts) - counts / 2.0) / total
    n = len(reference)
    matched = np.interp(ranks, (np.arange(n) + 0.5) / n, reference)
    lut = levels + strength * (matched - levels)
    lut[:HISTOGRAM_FLOOR] = levels[:HISTOGRAM_FLOOR]
    return np.clip(lut + 0.5, 0, 255).astype(np.uint8)


def without_histogram_matching(normalisation: dict[str, Any]) -> dict[str, Any]:
    """``normalisation`` less its histogram matching: what the network is trained on (only the
    runtime matches), and the runtime's input without it, for comparison."""
    return {k: v for k, v in normalisation.items() if not k.startswith("histogram_")}


def normalise(grey: np.ndarray, normalisation: dict[str, Any], out: np.ndarray) -> np.ndarray:
    """Fill ``out`` (float32, grey's shape) with the model's input values.

    ``{"mode": "zscore"}``: per-image zero mean, unit variance, which makes the model indifferent
    to the scanner's overall gain. ``{"mode": "equalise"}``: the histogram equalised first
    (``grey`` uint8), then z-scored: each pixel becomes its grey level's rank in the image, the
    same under any grey map a scanner applies (gain, dynamic range, log compression).
    ``{"mode": "scale", "mean": m, "std": s}``: ``(x/255 - m)/s``.

    With ``"histogram_match": s`` and ``"histogram_reference": [...]`` (the training images'
    mean quantiles, :func:`histogram_quantiles`) the grey levels are first taken ``s`` of the
    way to those of the same rank in the reference (:func:`histogram_match_lut`): another
    scanner's grey map (dynamic range, log compression, an S-shaped curve) is partly undone.
    """
    mode = normalisation.get("mode")
    strength = float(normalisation.get("histogram_match", 0.0))
    if strength > 0.0:
        reference = np.asarray(normalisation["histogram_reference"], dtype=np.float64)
        grey = cv2.LUT(grey, histogram_match_lut(grey, reference, strength))
    if mode == "equalise":
        grey = cv2.equalizeHist(grey)
    np.multiply(grey, 1.0 / 255.0, out=out, dtype=np.float32, casting="unsafe")
    if mode in ("zscore", "equalise"):
        mean, std = cv2.meanStdDev(out)
        out -= float(mean[0, 0])
        out *= 1.0 / max(float(std[0, 0]), float(normalisation.get("min_std", 0.02)))
    elif mode == "scale":
        out -= float(normalisation["mean"])
        out *= 1.0 / float(normalisation["std"])
    else:
        raise ValueError(f"unknown normalisation mode {mode!r}")
    return out


def normalisation_problem(
    normalisation: dict[str, Any], *, reference_required: bool = True
) -> str | None:
    """Why ``normalisation`` (a model's metadata) cannot be used by :func:`normalise`, or None:
    checked when the model is opened, so a bad file fails there, naming it, not on a frame.
    ``reference_required=False``: a training config, whose histogram reference the run
    computes from its training images."""

    def positive_number(key: str) -> bool:
        value = normalisation.get(key)
        return isinstance(value, (int, float)) and math.isfinite(value) and value > 0

    problem = _histogram_match_problem(normalisation, reference_required)
    if problem:
        return problem
    mode = normalisation.get("mode")
    if mode in ("zscore", "equalise"):
        if "min_std" in normalisation and not positive_number("min_std"):
            return "min_std must be a positive number"
        return None
    if mode == "scale":
        mean = normalisation.get("mean")
        if not (isinstance(mean, (int, float)) and math.isfinite(mean)):
            return "mean must be a finite number"
        if not positive_number("std"):
            return "std must be a positive number"
        return None
    return f"unknown mode {mode!r} (zscore, equalise or scale)"


def _histogram_match_problem(normalisation: dict[str, Any], reference_required: bool) -> str | None:
    strength = normalisation.get("histogram_match", 0.0)
    number = isinstance(strength, (int, float)) and not isinstance(strength, bool)
    if not (number and 0.0 <= strength <= 1.0):
        return "histogram_match must be a number from 0 to 1"
    reference = normalisation.get("histogram_reference")
    if reference is None and (not strength or not reference_required):
        return None
    if not isinstance(reference, list) or len(reference) < 2:
        return "histogram_match needs histogram_reference, a list of grey levels"
    if not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 255 for v in reference
    ):
        return "histogram_reference must hold grey levels from 0 to 255"
    if any(b < a for a, b in itertools.pairwise(reference)):
        return "histogram_reference must not decrease (quantiles at rising ranks)"
    return None


ENGINES = ("auto", "openvino", "onnxruntime")


class OnnxRuntimeEngine:
    """Runs the model with onnxruntime's CPU provider."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # onnxruntime's own warnings would bury our one-line errors
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.input_shapes = [list(i.shape) for i in self.session.get_inputs()]

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits ``(1, C, rows, cols)`` for the input ``x`` ``(1, 1, rows, cols)``."""
        return self.session.run(None, {self._input: x})[0]


class OpenVinoEngine:
    """Runs the model with OpenVINO on the CPU, in float32 (no silent bfloat16 on CPUs that
    have it), one stream tuned for latency. About twice onnxruntime's speed on the same file."""

    name = "openvino"

    def __init__(self, path: Path, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        with _native_stderr_silenced():
            model = core.read_model(str(path))
        info = model.get_rt_info()
        # ONNX metadata_props arrive in the model's runtime info under "framework".
        framework = dict(info["framework"]) if "framework" in info else {}
        self.metadata = {str(k): str(v.astype(str)) for k, v in framework.items()}
        self.input_shapes = [
            [d.get_length() if d.is_static else None for d in i.get_partial_shape()]
            for i in model.inputs
        ]
        config = {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "INFERENCE_PRECISION_HINT": "f32",
        }
        self._compiled = core.compile_model(model, "CPU", config)
        self._request = self._compiled.create_infer_request()

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits ``(1, C, rows, cols)``; the array is the engine's own output buffer, which the
        next call overwrites."""
        self._request.infer({0: x})
        return self._request.get_output_tensor(0).data


InferenceEngine = OnnxRuntimeEngine | OpenVinoEngine


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Silence C++ libraries writing straight to file descriptor 2 (OpenVINO's ONNX parser logs
    through absl on a bad file): the Python exception carries the message, and a user's error is
    one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def available_engines() -> tuple[str, ...]:
    """The inference engines installed here, fastest first."""
    import importlib.util

    found = [e for e in ENGINES[1:] if importlib.util.find_spec(e) is not None]
    return tuple(found)


def open_model(
    path: str | os.PathLike[str], *, threads: int = 2, engine: str = "auto"
) -> tuple[ModelInfo, InferenceEngine]:
    """Load an ONNX segmentation model and check its metadata and input shape.

    Parameters
    ----------
    engine : "auto", "openvino" or "onnxruntime"
        "auto" takes OpenVINO where it is installed, else onnxruntime. Both read the same
        ONNX file; their labels agree on about 99 % of pixels (int8 rounding differs).

    Returns
    -------
    info : ModelInfo
    engine : OnnxRuntimeEngine or OpenVinoEngine

    Raises
    ------
    ModelError
        Missing file, not a loadable ONNX model, metadata missing or inconsistent, or an
        engine that is not installed.
    """
    if engine not in ENGINES:
        raise ModelError(path, f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    installed = available_engines()
    if engine == "auto":
        engine = installed[0] if installed else "onnxruntime"
    elif engine not in installed:
        raise ModelError(path, f"engine {engine} is not installed (pip install {engine})")
    p = Path(path)
    if not p.is_file():
        raise ModelError(path, "no such model file")
    cls = OpenVinoEngine if engine == "openvino" else OnnxRuntimeEngine
    try:
        runner: InferenceEngine = cls(p, threads)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(path, f"not a loadable ONNX model ({first_line[:200]})") from e
    raw = runner.metadata
    meta = {k[len(METADATA_PREFIX) :]: v for k, v in raw.items() if k.startswith(METADATA_PREFIX)}
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise ModelError(path, f"metadata lacks {', '.join(METADATA_PREFIX + k for k in missing)}")
    try:
        class_names = tuple(json.loads(meta["class_names"]))
        rows, cols = (int(v) for v in json.loads(meta["input_size"]))
        normalisation = dict(json.loads(meta["normalisation"]))
    except (ValueError, TypeError) as e:
        raise ModelError(path, f"metadata is not valid JSON of the expected form ({e})") from e
    if class_names != CLASS_NAMES:
        raise ModelError(path, f"class names {list(class_names)} differ from {list(CLASS_NAMES)}")
    problem = normalisation_problem(normalisation)
    if problem:
        raise ModelError(path, f"normalisation {normalisation}: {problem}")
    if len(runner.input_shapes) != 1:
        raise ModelError(path, f"expected one input, found {len(runner.input_shapes)}")
    dims = runner.input_shapes[0]
    if len(dims) != 4 or dims[1] != 1 or (dims[2], dims[3]) != (rows, cols):
        raise ModelError(
            path, f"input shape {dims} does not match (N, 1, {rows}, {cols}) from its metadata"
        )
    info = ModelInfo(str(p), class_names, (rows, cols), normalisation, meta["version"], meta)
    return info, runner


class Segmenter:
    """Label every pixel of a frame with an ONNX segmentation model.

    Parameters
    ----------
    model : path, optional
        The ONNX file; defaults to the model shipped with usguide.
    threads : int
        Inference threads.
    engine : "auto", "openvino" or "onnxruntime"
        Inference engine (:func:`open_model`); ``engine`` on the instance says which runs.
    smoothing : float
        Temporal smoothing of class probabilities across consecutive frames, 0 (none) to <1.
        An exponential average is causal: it adds no frame of latency.
    min_region_fraction : mapping of class name to share, optional
        Connected regions of a class smaller than this share of the imaging region are dropped
        from the labels (not from :attr:`probabilities`). Defaults to ``MIN_REGION_FRACTION``;
        ``{}`` keeps every region.

    Notes
    -----
    Call :meth:`reset` when the sequence changes (another cine, a seek), so the smoothing does
    not blend unrelated frames.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        threads: int = 2,
        engine: str = "auto",
        smoothing: float = 0.0,
        min_region_fraction: Mapping[str, float] | None = None,
    ) -> None:
        path = Path(model) if model is not None else DEFAULT_MODEL
        self.info, self._engine = open_model(path, threads=threads, engine=engine)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = smoothing
        rows, cols = self.info.input_size
        n = len(self.info.class_names)
        fractions = MIN_REGION_FRACTION if min_region_fraction is None else min_region_fraction
        for name, share in fractions.items():
            if name not in self.info.class_names[1:]:
                raise ValueError(f"min_region_fraction: unknown class {name!r}")
            if not 0.0 <= share < 1.0:
                raise ValueError(f"min_region_fraction[{name!r}] must be in [0, 1), got {share}")
        # Model pixels map evenly onto the imaging region, so a share of the region is a share
        # of the model's grid.
        self._min_region_px = [
            fractions.get(name, 0.0) * rows * cols for name in self.info.class_names
        ]
        # Buffers reused across frames: the hot path allocates nothing of model size per frame.
        self._small = np.empty((rows, cols), np.uint8)
        self._small_rgb = np.empty((rows, cols, 3), np.uint8)
        self._x = np.empty((1, 1, rows, cols), np.float32)
        self._probs = np.empty((n, rows, cols), np.float32)
        self._current = np.empty((n, rows, cols), np.float32)
        self._logits = np.zeros((n, rows, cols), np.float32)
        self._probs_stale = True
        self._have_previous = False
        self._argmax = np.empty((rows, cols), np.uint8)
        self._best = np.empty((rows, cols), np.float32)
        self._higher = np.empty((rows, cols), bool)
        self._is_class = np.empty((rows, cols), np.uint8)
        self._others = np.empty((rows, cols), np.float32)
        self._margin = np.empty((rows, cols), np.float32)
        self._margin_up = np.empty((0, 0), np.float32)
        self._above = np.empty((0, 0), bool)
        self._labels: np.ndarray | None = None

    @property
    def engine(self) -> str:
        """The inference engine that runs the model: "openvino" or "onnxruntime"."""
        return self._engine.name

    @property
    def probabilities(self) -> np.ndarray:
        """``(C, rows, cols)`` float32 class probabilities of the last frame, at model input size
        over the imaging region (temporally smoothed when smoothing > 0)."""
        if self._probs_stale:
            # Computed on demand: labels alone need only the argmax of the logits.
            self._softmax_into(self._probs, self._logits)
            self._probs_stale = False
        return self._probs

    def reset(self) -> None:
        """Forget the previous frame (for smoothing)."""
        self._have_previous = False

    def __call__(self, frame: Frame | np.ndarray) -> np.ndarray:
        """Label map ``(H, W)`` uint8 at the frame's size; outside the imaging region is 0.

        The returned array is reused by the next call: copy it to keep it.
        """
        if isinstance(frame, Frame):
            pixels, bbox = frame.pixels, frame.region.bbox
        else:
            pixels = frame
            bbox = (0, 0, pixels.shape[1] - 1, pixels.shape[0] - 1)
        x0, y0, x1, y1 = bbox
        crop = pixels[y0 : y1 + 1, x0 : x1 + 1]
        rows, cols = self.info.input_size
        if crop.ndim == 2:
            cv2.resize(crop, (cols, rows), dst=self._small, interpolation=cv2.INTER_AREA)
        else:
            # Shrink first, then grey: no region-sized temporary per frame.
            cv2.resize(crop, (cols, rows), dst=self._small_rgb, interpolation=cv2.INTER_AREA)
            cv2.cvtColor(self._small_rgb, cv2.COLOR_RGB2GRAY, dst=self._small)
        h, w = pixels.shape[:2]
        if self._labels is None or self._labels.shape != (h, w):
            self._labels = np.zeros((h, w), np.uint8)
        else:
            self._labels.fill(0)
        _, std = cv2.meanStdDev(self._small)
        if float(std[0, 0]) < FLAT_STD:
            # Black, saturated or frozen-uniform frame: nothing to label, and the model's answer
            # on a blank input would be a guess.
            self._probs.fill(0.0)
            self._probs[0] = 1.0
            self._probs_stale = False
            self._have_previous = False
            return self._labels
        normalise(self._small, self.info.normalisation, self._x[0, 0])
        self._logits = self._engine.run(self._x)[0]
        if self.smoothing > 0:
            self._smooth(self._logits)
            scores = self._probs
        else:
            self._probs_stale = True
            scores = self._logits
        self._upsample_labels(scores, self._labels[y0 : y1 + 1, x0 : x1 + 1])
        return self._labels

    def _upsample_labels(self, scores: np.ndarray, out: np.ndarray) -> None:
        """Labels at the region's size into ``out`` (zeroed): each class where its margin over the
        best other class, interpolated bilinearly from model size, is positive.

        Resizing the label map itself (nearest neighbour) would give blocky edges a model pixel
        (2-3 frame pixels) wide, which thin needles and fascia bands cannot afford. Margins of
        different classes cannot both be positive, so the classes never overlap.

        Regions below the class's minimum size are dropped at model size, where the decision is
        made: their margin is set negative, and since every neighbour of a region has a
        non-positive margin, no interpolated pixel of it survives.
        """
        self._argmax_into(scores)
        if self._margin_up.shape != out.shape:
            self._margin_up = np.empty(out.shape, np.float32)
            self._above = np.empty(out.shape, bool)
        size = (out.shape[1], out.shape[0])
        for c in range(1, scores.shape[0]):
            if not (self._argmax == c).any():
                continue  # every margin of c is <= 0, so its interpolation is too
            others = [k for k in range(scores.shape[0]) if k != c]
            np.maximum(scores[others[0]], scores[others[1]], out=self._others)
            for k in others[2:]:
                np.maximum(self._others, scores[k], out=self._others)
            np.subtract(scores[c], self._others, out=self._margin)
            if self._min_region_px[c] > 0:
                self._drop_small_regions(c, self._min_region_px[c])
            cv2.resize(self._margin, size, dst=self._margin_up, interpolation=cv2.INTER_LINEAR)
            np.greater(self._margin_up, 0.0, out=self._above)
            out[self._above] = c

    def _argmax_into(self, scores: np.ndarray) -> None:
        """The best class per model pixel into ``_argmax``, the first on a tie (as np.argmax).

        np.argmax over the class axis strides across the class planes: a pass per class is
        about 8 times faster at 256 x 256."""
        np.copyto(self._best, scores[0])
        self._argmax.fill(0)
        for c in range(1, scores.shape[0]):
            np.greater(scores[c], self._best, out=self._higher)
            np.copyto(self._best, scores[c], where=self._higher)
            self._argmax[self._higher] = c

    def _drop_small_regions(self, c: int, min_px: float) -> None:
        np.equal(self._argmax, c, out=self._is_class)  # 0 or 1
        n, regions = cv2.connectedComponents(self._is_class, connectivity=8)
        # Areas from the labels of the class's own pixels: a tenth of the time of counting all
        # pixels' labels, a fifth of the full component statistics.
        small = np.bincount(regions[self._is_class.view(bool)], minlength=n) < min_px
        small[0] = False  # the background
        if small.any():
            self._margin[np.take(small, regions)] = -1.0

    @staticmethod
    def _softmax_into(out: np.ndarray, logits: np.ndarray) -> None:
        np.subtract(logits, logits.max(axis=0, keepdims=True), out=out)
        np.exp(out, out=out)
        out /= out.sum(axis=0, keepdims=True)

    def _smooth(self, logits: np.ndarray) -> None:
        """Exponential average of probabilities: causal, so no frame of latency is added."""
        if not self._have_previous:
            self._softmax_into(self._probs, logits)
        else:
            self._softmax_into(self._current, logits)
            self._probs *= self.smoothing
            self._current *= 1.0 - self.smoothing
            self._probs += self._current
        self._probs_stale = False
        self._have_previous = True
