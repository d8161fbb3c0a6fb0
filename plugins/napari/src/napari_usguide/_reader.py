"""Reader: DICOM cines, videos and image folders as napari image layers with their mm scale.

Frames are read lazily (one dask task per frame): a long cine is never decoded into memory at
once, napari decodes the frame it shows. The layer's scale is the scan's calibration in mm per
pixel ``(row, col)``; an uncalibrated scan keeps scale 1 (pixels) and its name says so, since a
guessed mm value would be worse than none.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

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
    from usguide.sources import open_source

    if not isinstance(path, str | os.PathLike):
        path = path[0]
    source: SeekableSource = open_source(path)  # type: ignore[assignment]
    return [scan_layer(source, name=Path(path).name or str(path))]


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


def scan_layer(source: SeekableSource, *, name: str) -> LayerData:
    """One napari image layer (data, keyword arguments, ``"image"``) for a recorded source.

    ``metadata["usguide"]`` carries the source, its spacing, frame time, regions and whether it
    is calibrated, so widgets can open the same scan.
    """
    data = _lazy_frames(source)
    spacing = source.spacing_mm
    rgb = data.ndim == (4 if source.frame_count > 1 else 3)
    yx = (float(spacing[0]), float(spacing[1])) if spacing else (1.0, 1.0)
    scale = ((1.0,) if source.frame_count > 1 else ()) + yx
    if not spacing:
        name = f"{name} (uncalibrated, px)"
    metadata = {
        "usguide": {
            "source": source.source,
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
