"""Reader: DICOM cines, videos and image folders as napari image layers with their mm scale.

Frames are read lazily (one dask task per frame): a long cine is never decoded into memory at
once, napari decodes the frame it shows. The layer's scale is the scan's calibration in mm per
pixel ``(row, col)``; an uncalibrated scan keeps scale 1 (pixels) and its name says so, since a
guessed mm value would be worse than none.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from usguide.errors import UsguideError

if TYPE_CHECKING:
    from usguide.sources.base import SeekableSource

LayerData = tuple[Any, dict[str, Any], str]
PathOrPaths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]

# Folders napari's own readers handle (zarr, n5): not image folders.
_NOT_IMAGE_FOLDERS = frozenset({".zarr", ".n5", ".ome.zarr"})


def _accepts(path: Path) -> bool:
    from usguide.sources import DICOM_SUFFIXES, VIDEO_SUFFIXES, is_dicom_file
    from usguide.sources.images import IMAGE_SUFFIXES

    if path.is_dir():
        if path.suffix.lower() in _NOT_IMAGE_FOLDERS:
            return False
        return any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir() if p.is_file())
    suffix = path.suffix.lower()
    return suffix in DICOM_SUFFIXES or suffix in VIDEO_SUFFIXES or is_dicom_file(path)


def napari_get_reader(path: PathOrPaths) -> Callable[[PathOrPaths], list[LayerData]] | None:
    """The reader for one DICOM file, video or image folder; None for anything else."""
    if not isinstance(path, str | os.PathLike):
        if len(path) != 1:
            return None
        path = path[0]
    return read_scan if _accepts(Path(path)) else None


def read_scan(path: PathOrPaths) -> list[LayerData]:
    """Open a scan and return one image layer: ``(T, H, W[, 3])`` for several frames, else
    ``(H, W[, 3])``, with the scale in mm per pixel when the scan is calibrated."""
    from usguide.annotation.deid import safe_label
    from usguide.sources import DICOM_SUFFIXES, is_dicom_file, open_source

    if not isinstance(path, str | os.PathLike):
        path = path[0]
    # A DICOM's file and folder names often carry the patient's name: the layer and its
    # metadata get the pseudonym, the path stays in this process's registry. Registered before
    # the file is read, so its warnings and errors, which napari shows, name the pseudonym.
    label = None
    if Path(path).suffix.lower() in DICOM_SUFFIXES or is_dicom_file(path):
        label = safe_label(str(path), dicom=True)
        _PRIVATE_SOURCES[label] = str(path)
    try:
        with redacting_warnings():
            source: SeekableSource = open_source(path)  # type: ignore[assignment]
            try:
                _refuse_mixed_images(source)
            except BaseException:
                source.close()
                raise
            if source.kind == "dicom" and label is None:  # found DICOM by its content
                label = safe_label(str(path), dicom=True)
            if label is not None:
                return [scan_layer(source, name=label, label=label)]
            return [scan_layer(source, name=Path(path).name or str(path))]
    except UsguideError as error:
        if label is None:
            raise
        # The original's chain (a decoder's error quoting the path) is not shown.
        raise redacted(error).with_traceback(None) from None


# Pseudonym -> the path it stands for; never shown, read only to reopen the scan. It lives
# as long as this process: a pseudonym kept elsewhere (a saved layer, a session summary) leads
# back to nothing in the next napari session.
_PRIVATE_SOURCES: dict[str, str] = {}
# What usguide.annotation.deid.safe_label gives a DICOM file.
_PSEUDONYM = re.compile(r"source-[0-9a-f]{10}")
_REOPEN = "this scan must be opened again (File > Open)"


class ScanNotOpenError(UsguideError, LookupError):
    """A DICOM scan's pseudonym that this session cannot lead back to a readable file."""


def resolve_source(spec: str) -> str:
    """The path behind a pseudonym given by :func:`read_scan`; any other spec unchanged.

    Raises
    ------
    ScanNotOpenError
        For a pseudonym of another napari session, or of a file no longer where it was
        opened; the message names the pseudonym, never the path.
    """
    text = spec.strip()
    path = _PRIVATE_SOURCES.get(text)
    if path is None:
        if _PSEUDONYM.fullmatch(text) and not os.path.exists(text):
            raise ScanNotOpenError(
                text,
                f"{_REOPEN}; its pseudonym leads back to its file only in the napari "
                "session that opened it",
            )
        return spec
    if not os.path.exists(path):
        raise ScanNotOpenError(text, f"{_REOPEN}; its file is no longer where it was opened from")
    return path


def pseudonym_in(name: str) -> str | None:
    """The pseudonym a layer's name is, or None; the reader may add " (uncalibrated, px)",
    napari " [1]" to a second layer of one name."""
    pattern = rf"({_PSEUDONYM.pattern})(?: \(uncalibrated, px\))?(?: \[\d+\])?"
    match = re.fullmatch(pattern, name.strip())
    return match.group(1) if match else None


def redact(text: str) -> str:
    """``text`` (an error's message) with every path this session keeps private replaced by
    its pseudonym: errors of a source name its file, and a DICOM's path often carries the
    patient's name."""
    paths = [
        (form, label)
        for label, path in _PRIVATE_SOURCES.items()
        for form in {os.path.realpath(path), os.path.abspath(path), path}
    ]
    # Whole paths first, longest first (their folders go too), then the files' own names: a
    # name replaced first would leave its folders behind in a longer path.
    for form, label in sorted(paths, key=lambda p: len(p[0]), reverse=True):
        text = text.replace(form, label)
    for label, path in _PRIVATE_SOURCES.items():
        name = os.path.basename(path)
        if name and not name.isdigit():  # "1", "2" (DICOMDIR files) say nothing: numbers stay
            # A full stop that ends a sentence is not part of a longer name ("x.dcm.bak" is).
            text = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w-]|\.[\w-])", label, text)
    return text


def redacted(error: BaseException) -> BaseException:
    """``error`` with :func:`redact` applied: a :class:`UsguideError` itself, its source and
    reason redacted; another error whose message names a private path, a RuntimeError that
    names its type and says the rest redacted."""
    if isinstance(error, UsguideError):
        error.source, error.reason = redact(error.source), redact(error.reason)
        error.args = (redact(str(error.args[0])) if error.args else error.source,)
        return error
    text = str(error)
    said = redact(text)
    return error if said == text else RuntimeError(f"{type(error).__name__}: {said}")


def private_worker(fn: Callable[..., Any], *args: Any) -> Any:
    """A napari ``thread_worker`` running ``fn(*args)``, not yet started, whose errors and
    warnings napari's notifications show with :func:`redact` applied.

    A source's errors and warnings name its file. napari's workers relay theirs to the
    notifications unredacted in some versions, and in others (0.9) not at all, so a worker's
    warnings went unseen: they are relayed here, redacted, whatever the version. Errors are not
    raised again (``ignore_errors``): the widget that started the worker shows them too.
    """
    from napari.qt.threading import thread_worker
    from napari.utils.notifications import notification_manager

    worker = thread_worker(fn, start_thread=False, ignore_errors=True)(*args)
    for signal, relay in ((worker.errored, "_relay_error"), (worker.warned, "_relay_warning")):
        with contextlib.suppress(AttributeError, TypeError, RuntimeError):
            signal.disconnect(getattr(worker, relay))  # napari's own relay, unredacted

    def notify(error: BaseException) -> None:
        # No traceback: napari prints one with each frame's local values (the path among them).
        shown = redacted(error).with_traceback(None)
        notification_manager.receive_error(type(shown), shown, None)

    worker.errored.connect(notify)
    worker.warned.connect(
        lambda w: notification_manager.receive_warning(redact(str(w[0])), *w[1:4])
    )
    return worker


@contextlib.contextmanager
def redacting_warnings() -> Iterator[None]:
    """The warnings raised inside, warned again on leaving with :func:`redact` applied:
    usguide's warnings about a source name its file, and napari shows warnings as
    notifications. The main thread's only (the warnings filters are process-wide)."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    finally:
        for w in caught:
            warnings.warn_explicit(
                redact(str(w.message)), w.category, w.filename, w.lineno, registry=_WARNED
            )


_WARNED: dict[Any, Any] = {}  # the redacted warnings said once, as the originals were


# PIL image modes that usguide.sources.images.read_image reads as grey, or as RGB; any other
# mode is decoded to find out.
_GREY_MODES = frozenset({"1", "L", "I", "I;16", "I;16B", "I;16L"})
_COLOUR_MODES = frozenset({"RGB", "RGBA", "P", "CMYK", "YCbCr"})


def _image_kind(path: Path) -> tuple[int, int, bool] | None:
    """``(rows, columns, colour)`` of an image file from its header; None where it cannot be
    read (the frame's own read reports that)."""
    from PIL import Image

    from usguide.sources.images import read_image

    try:
        with Image.open(path) as image:
            (columns, rows), mode = image.size, image.mode
    except (OSError, ValueError):
        return None
    if mode in _GREY_MODES or mode in _COLOUR_MODES:
        return rows, columns, mode in _COLOUR_MODES
    try:
        pixels = read_image(path, page=0)
    except (OSError, ValueError):
        return None
    return int(pixels.shape[0]), int(pixels.shape[1]), pixels.ndim == 3


def _refuse_mixed_images(source: SeekableSource) -> None:
    """An image folder whose images differ in size, or in grey and colour, cannot be one napari
    stack (it is declared with the first image's shape): refuse it with a clear message."""
    files = getattr(source, "files", None)
    if source.kind != "images" or not files or len(files) < 2:
        return
    first = _image_kind(files[0])
    for path in files[1:]:
        kind = _image_kind(path)
        if first is not None and kind is not None and kind != first:
            raise ValueError(
                f"{source.source}: the images differ ({files[0].name} is {_describe(first)}, "
                f"{path.name} is {_describe(kind)}); napari shows a folder as one stack of "
                "one size and colour: put such images in separate folders"
            )


def _describe(kind: tuple[int, int, bool]) -> str:
    return f"{kind[1]} x {kind[0]} {'RGB' if kind[2] else 'grey'}"


def _lazy_frames(source: SeekableSource) -> Any:
    """The source's frames as a lazy ``(T, H, W[, 3])`` dask array (one task per frame)."""
    import dask
    import dask.array as da

    first = source.read(0).pixels
    if source.frame_count == 1:
        return first
    lock = threading.Lock()  # napari may slice from another thread; a source reads one at a time

    def read(index: int) -> np.ndarray:
        with lock:
            return source.read(index).pixels

    frames = [
        da.from_delayed(dask.delayed(read, pure=True)(i), shape=first.shape, dtype=np.uint8)
        for i in range(source.frame_count)
    ]
    return da.stack(frames)


def scan_layer(source: SeekableSource, *, name: str, label: str | None = None) -> LayerData:
    """One napari image layer (data, keyword arguments, ``"image"``) for a recorded source.

    ``metadata["usguide"]`` carries the source, its spacing, frame time, regions and whether it
    is calibrated, so widgets can open the same scan. With ``label`` (a pseudonym), the source
    is that label; :func:`resolve_source` turns it back into the path.
    """
    data = _lazy_frames(source)
    spacing = source.spacing_mm
    rgb = data.ndim == (4 if source.frame_count > 1 else 3)
    yx = (float(spacing[0]), float(spacing[1])) if spacing else (1.0, 1.0)
    scale = ((1.0,) if source.frame_count > 1 else ()) + yx
    if not spacing:
        name = f"{name} (uncalibrated, px)"
    shown_source = source.source
    if label is not None:
        _PRIVATE_SOURCES[label] = str(source.source)
        shown_source = label
    metadata = {
        "usguide": {
            "source": shown_source,
            "kind": source.kind,
            "frames": source.frame_count,
            "frame_time_s": source.frame_time_s,
            "spacing_mm": list(yx) if spacing else None,
            "units": "mm" if spacing else "px",
            "regions": [r.to_dict() for r in source.regions],
        }
    }
    kwargs: dict[str, Any] = {
        "name": name,
        "scale": scale,
        "rgb": rgb,
        "contrast_limits": (0, 255),  # uint8: no pass over the lazy frames to find the range
        "metadata": metadata,
    }
    if spacing and layers_have_units():
        # napari >= 0.6: the scale bar and the status bar then read mm.
        kwargs["units"] = (("pixel",) if source.frame_count > 1 else ()) + ("mm", "mm")
    return (data, kwargs, "image")


def layers_have_units() -> bool:
    import inspect

    from napari.layers import Image

    return "units" in inspect.signature(Image.__init__).parameters


def placement_over(scan: Any, ndim: int) -> dict[str, Any]:
    """The scale (and, napari >= 0.6, the units) of ``scan``'s last ``ndim`` axes, for a layer
    drawn over it, so that its data are the scan's pixels; pixels without a scan. Axes the scan
    lacks (a stack's frames over a single image) are pixels too."""
    if scan is None:
        placement: dict[str, Any] = {"scale": (1.0,) * ndim}
        if layers_have_units():
            placement["units"] = ("pixel",) * ndim
        return placement
    placement = {"scale": _fit(tuple(float(s) for s in scan.scale), ndim, 1.0)}
    if layers_have_units():
        placement["units"] = _fit(tuple(str(u) for u in scan.units), ndim, "pixel")
    return placement


def conform(layers: Iterable[Any], placement: dict[str, Any]) -> None:
    """Give ``layers`` the scale and units of ``placement`` on their last axes (leading axes
    in pixels), their data unchanged.

    napari draws, and checks that all layers' units agree, each time a layer is added or
    removed (never when a scale or units change): a widget switching scans conforms the layers
    it keeps before it adds or removes any, or napari warns about inconsistent units.
    """
    for layer in layers:
        ndim = int(layer.ndim)
        for key, values in placement.items():
            fitted = _fit(tuple(values), ndim, 1.0 if key == "scale" else "pixel")
            current = tuple(getattr(layer, key))
            if key == "units":  # "mm" and millimeter are one unit
                same = _unit_names(current) == _unit_names(fitted)
            else:
                same = np.allclose(current, fitted, rtol=1e-12, atol=0.0)
            if not same:  # each set refreshes the layer: unchanged values are left alone
                setattr(layer, key, fitted)


def _unit_names(units: Iterable[Any]) -> tuple[str, ...]:
    import pint  # napari >= 0.6, the only napari with layer units, depends on it

    registry = pint.get_application_registry()
    return tuple(str(registry.Unit(str(u))) for u in units)


def _fit(values: tuple[Any, ...], ndim: int, fill: Any) -> tuple[Any, ...]:
    """``values`` for the last ``ndim`` axes, ``fill`` for the axes they do not reach."""
    return (fill,) * max(0, ndim - len(values)) + values[len(values) - min(ndim, len(values)) :]
