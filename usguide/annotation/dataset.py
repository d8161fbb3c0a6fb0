"""Annotated frames in memory, and their de-identified, atomic export as a dataset.

An :class:`AnnotationSet` holds frames with their label maps (class indices of
:mod:`usguide.labels`) and needle tips. Labels come from the model (:meth:`~AnnotationSet.
pre_annotate`), from the annotator's edits (:meth:`~AnnotationSet.set_labels`) or from a
neighbouring frame (:meth:`~AnnotationSet.propagate`); every such change can be undone.

:meth:`AnnotationSet.export` writes a folder::

    <out>/usguide-dataset.json   manifest: source label and key, frame index, timestamp, spacing,
                                 region, tip, annotator, time; the classes each frame labels
    <out>/images/<key>.png       the frame cropped to its imaging region (no burned-in text)
    <out>/masks/<key>.png        palette PNG whose indices are the class indices
    <out>/coco.json              COCO: masks as RLE, needle tips as key points
    <out>/dicom/<key>_image.dcm  (optional) a new single-frame US image of the crop, and
    <out>/dicom/<key>_seg.dcm    its DICOM SEG

It is de-identified (no header is copied; a DICOM source's label is a pseudonym, another
source's its file stem, pseudonymised when it holds an identifying value; every file is searched
for the source's identifying values before it is published) and atomic (written to a hidden
sibling folder, then swapped in by renames; until the swap the previous dataset is untouched). It
replaces only a previous export: a folder holding anything else is refused, never emptied.
:meth:`AnnotationSet.load` re-opens it for more annotation, and :class:`AnnotationDataset` reads
it for training (``usguide train`` takes the folder's path in its ``datasets`` list).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from os import PathLike
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from usguide._version import __version__
from usguide.annotation import deid
from usguide.annotation.history import History, diff
from usguide.annotation.propagate import FlowMethod, propagate_labels
from usguide.errors import UsguideError
from usguide.frame import Frame, Region
from usguide.labels import CLASS_COLOURS, CLASS_NAMES, N_CLASSES
from usguide.sources.images import decode_image_file

__all__ = [
    "FORMAT",
    "MANIFEST",
    "AnnotatedFrame",
    "AnnotationDataset",
    "AnnotationSet",
    "ForeignFilesError",
    "is_annotation_dataset",
]

MANIFEST = "usguide-dataset.json"
FORMAT = "usguide-annotations"
_VERSION = 1
BBox = tuple[int, int, int, int]
Point = tuple[float, float]
# Mean absolute difference (grey levels) up to which a source frame shows a re-opened one: the
# export is lossless, but another decoder version may round a level differently; another
# recording differs by far more.
_SAME_FRAME_DIFF = 2.0


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ForeignFilesError(UsguideError, FileExistsError):
    """The export's folder holds files or folders no export wrote; replacing it would lose them."""


@dataclass(eq=False)  # eq=False: == on arrays has no single truth value
class AnnotatedFrame:
    """One frame being annotated.

    Attributes
    ----------
    image : numpy.ndarray
        ``(H, W)`` uint8 grey or ``(H, W, 3)`` uint8 RGB, the whole frame as shown.
    labels : numpy.ndarray
        ``(H, W)`` uint8 class indices.
    source : str
        Safe label of the source (:func:`usguide.annotation.deid.safe_label`); never a path.
    frame_index : int
        Position in the source.
    region : tuple of int
        Imaging region ``(x0, y0, x1, y1)``, inclusive, in ``image`` pixels; exports keep only
        this rectangle.
    spacing_mm : tuple of float or None
        mm per pixel ``(row, col)``; None when unknown.
    timestamp_s : float or None
        Time of the frame in its source.
    tip_xy : tuple of float or None
        Needle tip ``(x, y)`` in ``image`` pixels; None when no tip is marked.
    annotator : str
        Who annotated it.
    annotated_at : str
        ISO 8601 UTC time of the last change.
    labelled : tuple of bool
        Length ``N_CLASSES``: which classes the labels state (an unlabelled class is unknown,
        not background, for training).
    region_in_source : tuple of int or None
        Where ``region`` lay in the original frame (kept through exports for traceability).
    """

    image: np.ndarray
    labels: np.ndarray
    source: str
    frame_index: int
    region: BBox
    spacing_mm: tuple[float, float] | None = None
    timestamp_s: float | None = None
    tip_xy: Point | None = None
    annotator: str = ""
    annotated_at: str = field(default_factory=_now)
    labelled: tuple[bool, ...] = (True,) * N_CLASSES
    region_in_source: BBox | None = None

    def __post_init__(self) -> None:
        h, w = self.image.shape[:2]
        if self.labels.shape != (h, w) or self.labels.dtype != np.uint8:
            raise ValueError(f"labels must be uint8 ({h}, {w}), got {self.labels.dtype} "
                             f"{self.labels.shape}")  # fmt: skip
        if not Region(self.region).inside(h, w):
            raise ValueError(f"region {self.region} lies outside the {w} x {h} frame")
        if len(self.labelled) != N_CLASSES:
            raise ValueError(f"labelled needs {N_CLASSES} entries")

    @property
    def key(self) -> str:
        """``<source>_<frame index:05d>``: the file stem in an export."""
        return f"{self.source}_{self.frame_index:05d}"

    def as_frame(self) -> Frame:
        """The frame as a :class:`~usguide.frame.Frame` (for the segmenter)."""
        region = Region(self.region, self.spacing_mm, True, "user")
        return Frame(
            self.image, self.frame_index, self.timestamp_s, self.spacing_mm, region, self.source
        )


class AnnotationSet:
    """Frames under annotation, with an undo history, exported as a dataset.

    Parameters
    ----------
    annotator : str
        Name written with each frame changed in this session (an annotator, not a patient).
    labelled : sequence of int, optional
        Classes the annotation states; default all. Frames record it for training.
    history : History, optional
        The undo stack (a default one otherwise).

    Notes
    -----
    Undo covers label changes made through this class (:meth:`set_labels`,
    :meth:`pre_annotate`, :meth:`propagate`), one step per call.
    """

    def __init__(
        self,
        annotator: str = "",
        *,
        labelled: Sequence[int] | None = None,
        history: History | None = None,
    ) -> None:
        self.annotator = annotator
        classes = range(N_CLASSES) if labelled is None else labelled
        self.labelled = tuple(c in classes for c in range(N_CLASSES))
        self.history = history if history is not None else History()
        self.frames: dict[str, AnnotatedFrame] = {}
        # In memory only: identifying header values of the sources, to check exports against.
        self._identifiers: dict[str, str] = {}
        self._labels_by_source: dict[str, str] = {}
        # Source key (:func:`_source_key`, written to the manifest) -> label: a recording added
        # again, in this session or after a load, gets its label again.
        self._labels_by_key: dict[str, str] = {}
        # Labels re-opened from a manifest that kept no source key (older versions): which
        # recording they are is found by name and pixels (_keyless_label) ...
        self._keyless: set[str] = set()
        # ... the frames of theirs still as re-opened (the pixels to compare with) ...
        self._reopened: set[str] = set()
        # ... the labels given to a source that way: a re-opened frame of theirs is replaced
        # only by its own image ...
        self._adopted: set[str] = set()
        # ... and of those, the ones no frame has confirmed yet (written without a key).
        self._unverified: set[str] = set()

    # -- contents ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self) -> Iterator[AnnotatedFrame]:
        return iter(self.frames.values())

    def __getitem__(self, key: str) -> AnnotatedFrame:
        return self.frames[key]

    def __contains__(self, key: object) -> bool:
        return key in self.frames

    def keys(self) -> list[str]:
        return list(self.frames)

    def add_identifiers(self, identifiers: Mapping[str, str]) -> None:
        """Identifying values (from :func:`~usguide.annotation.deid.dicom_identifiers`) that
        exports must never contain."""
        self._identifiers.update(identifiers)

    def source_label(self, source: str) -> str:
        """The safe label of a source (a path ...), reading a DICOM file's identifiers once.

        A DICOM file's label is a pseudonym whatever its name; a recording already held (also
        one re-opened with :meth:`load`) keeps its label.
        """
        return self._source_label(source, None, 0)

    def _source_label(self, source: str, image: np.ndarray | None, frame_index: int) -> str:
        """:meth:`source_label`, given frame ``frame_index`` of the source (``image``, when
        known) to recognise a recording re-opened from a manifest without source keys."""
        if source in self._labels_by_source:
            return self._labels_by_source[source]
        from usguide.sources import is_dicom_file

        # As open_source decides: a file is read as DICOM when it carries the DICM marker.
        dicom = bool(source) and is_dicom_file(source)
        if dicom:
            self.add_identifiers(deid.dicom_identifiers(source))
        key = _source_key(source)
        label = self._labels_by_key.get(key)
        if label is None:
            label = deid.safe_label(source, self._identifiers, dicom=dicom)
            # Versions that kept no source key labelled a DICOM file by its stem, as any other.
            names = [label, deid.safe_label(source, self._identifiers)] if dicom else [label]
            known = self._keyless_label(names, image, frame_index)
            if known is not None:
                label = known
            else:
                taken = set(self._labels_by_key.values()) | {f.source for f in self}
                base, n = label, 2
                while label in taken:  # two files of one name in different folders
                    label, n = f"{base}-{n}", n + 1
            self._labels_by_key[key] = label
        self._labels_by_source[source] = label
        self._labels_by_source.setdefault(label, label)  # add_image(source=<a label>) is that one
        return label

    def _keyless_label(
        self, names: Sequence[str], image: np.ndarray | None, frame_index: int
    ) -> str | None:
        """The label, re-opened from a manifest without source keys, of the recording that a
        source labelled ``names`` (by this and by older versions) is; None when unknown.

        Candidates are those labels equal to a name, or to one with a suffix (``-2``: a second
        file of that name). Frame ``frame_index`` of the source (``image``) decides, by its
        pixels, for or against a candidate holding that frame (a blank frame, alike in any
        recording, only against). Without such a frame, the one candidate equal to a name is
        taken on trust. Either way :meth:`_put` compares every
        re-opened frame it would replace.
        """
        candidates = [
            label
            for label in sorted(self._keyless)
            if any(re.fullmatch(rf"{re.escape(n)}(-\d+)?", label) for n in names)
        ]
        matching = []
        if image is not None:
            for label in list(candidates):
                key = f"{label}_{int(frame_index):05d}"
                if key not in self._reopened:
                    continue
                if not _shows(image, self.frames[key]):
                    candidates.remove(label)
                elif _distinctive(self.frames[key]):  # a blank frame is alike in any recording
                    matching.append(label)
        if len(matching) == 1:
            label, unverified = matching[0], False
        elif not matching and len(candidates) == 1 and candidates[0] in names:
            label, unverified = candidates[0], True
        else:  # none, or several alike (blank frames): a label of its own, as any new source
            return None
        self._keyless.discard(label)
        self._adopted.add(label)
        if unverified:
            self._unverified.add(label)
        return label

    def add_frame(
        self, frame: Frame, labels: np.ndarray | None = None, *, tip_xy: Point | None = None
    ) -> str:
        """Add (or replace) a frame from a source; returns its key.

        The imaging region and calibration come from the frame (the whole frame when its
        region is invalid). A DICOM source's identifying values are read for the export check.
        See :meth:`add_image` for a frame already held.
        """
        region = (
            frame.region.bbox if frame.region.valid else Region.whole(*frame.pixels.shape[:2]).bbox
        )
        return self._put(
            frame.pixels,
            label=self._source_label(frame.source, frame.pixels, frame.index),
            frame_index=frame.index,
            region=region,
            spacing_mm=frame.region_spacing_mm,
            timestamp_s=frame.timestamp_s,
            labels=labels,
            tip_xy=tip_xy,
        )

    def add_image(
        self,
        image: np.ndarray,
        *,
        source: str,
        frame_index: int,
        region: BBox | None = None,
        spacing_mm: tuple[float, float] | None = None,
        timestamp_s: float | None = None,
        labels: np.ndarray | None = None,
        tip_xy: Point | None = None,
    ) -> str:
        """Add (or replace) a frame given as an array; ``source`` is made a safe label
        (:meth:`source_label`); returns its key.

        A frame already held under the key is replaced and its undo steps are forgotten. Given
        no ``labels``, the new frame keeps the old one's labels and tip when they fit it (same
        size and region, or a re-opened frame's crop at the region it was cut from); otherwise
        it starts as background.
        """
        return self._put(
            image,
            label=self._source_label(source, image, frame_index),
            frame_index=frame_index,
            region=region,
            spacing_mm=spacing_mm,
            timestamp_s=timestamp_s,
            labels=labels,
            tip_xy=tip_xy,
        )

    def _put(
        self,
        image: np.ndarray,
        *,
        label: str,
        frame_index: int,
        region: BBox | None,
        spacing_mm: tuple[float, float] | None,
        timestamp_s: float | None,
        labels: np.ndarray | None,
        tip_xy: Point | None,
    ) -> str:
        """Add or replace the frame of a source already labelled (see :meth:`add_image`)."""
        h, w = image.shape[:2]
        key = f"{label}_{int(frame_index):05d}"
        old = self.frames.get(key)
        if old is not None and key in self._reopened and label in self._adopted:
            # The label was matched by name (and perhaps one frame): another image under the key
            # is another recording of that file name, and must not replace the dataset's frame.
            if not _shows(image, old):
                raise ValueError(
                    f"{key}: the re-opened dataset holds another image under this key (saved by "
                    "a usguide that kept no source keys, from a file of the same name); nothing "
                    "was replaced. Add this recording under another file name."
                )
            if _distinctive(old):
                self._unverified.discard(label)
        frame = AnnotatedFrame(
            image=np.array(image, np.uint8, copy=True),
            labels=np.zeros((h, w), np.uint8)
            if labels is None
            else _valid_labels(key, labels, (h, w)).copy(),
            source=label,
            frame_index=int(frame_index),
            region=tuple(int(v) for v in region) if region is not None else (0, 0, w - 1, h - 1),  # type: ignore[arg-type]
            spacing_mm=tuple(float(v) for v in spacing_mm) if spacing_mm else None,  # type: ignore[arg-type]
            timestamp_s=timestamp_s,
            tip_xy=(float(tip_xy[0]), float(tip_xy[1])) if tip_xy is not None else None,
            annotator=self.annotator,
            labelled=self.labelled,
        )
        if old is not None:
            if labels is None:
                _carry_over(old, frame)
            # Steps recorded on the old frame would write its rectangles into the new one.
            self.history.forget([key, _tip_key(key)])
        self.frames[key] = frame
        self._reopened.discard(key)
        return key

    # -- editing ----------------------------------------------------------------------------
    def _touch(self, key: str) -> None:
        f = self.frames[key]
        f.annotated_at = _now()
        if self.annotator:
            f.annotator = self.annotator

    def _commit(
        self,
        action: str,
        new: Mapping[str, np.ndarray],
        tips: Mapping[str, Point | None] | None = None,
    ) -> list[str]:
        """Write new label maps in place, and tips, as one undo step; the keys that changed."""
        # Every map checked before anything changes: a bad one leaves no half-made step.
        new = {k: _valid_labels(k, v, self.frames[k].labels.shape) for k, v in new.items()}
        changes = []
        for key, tip in (tips or {}).items():
            tip = (float(tip[0]), float(tip[1])) if tip is not None else None
            change = diff(_tip_key(key), _tip_array(self.frames[key].tip_xy), _tip_array(tip))
            if change is not None:
                self.frames[key].tip_xy = tip
                self._touch(key)
                changes.append(change)
        for key, labels in new.items():
            current = self.frames[key].labels
            change = diff(key, current, labels)
            if change is not None:
                current[...] = labels
                self._touch(key)
                changes.append(change)
        self.history.record(action, changes)
        keys = (c.key[1] if isinstance(c.key, tuple) else c.key for c in changes)
        return list(dict.fromkeys(keys))  # type: ignore[arg-type]

    def _arrays(self) -> dict[Any, np.ndarray]:
        """What undo and redo write into: the label maps, and each tip as a small array."""
        arrays: dict[Any, np.ndarray] = {k: f.labels for k, f in self.frames.items()}
        arrays.update({_tip_key(k): _tip_array(f.tip_xy) for k, f in self.frames.items()})
        return arrays

    def _tips_from(self, arrays: Mapping[Any, np.ndarray]) -> None:
        for key, f in self.frames.items():
            tip = _tip_from_array(arrays[_tip_key(key)])
            if tip != f.tip_xy:
                f.tip_xy = tip
                self._touch(key)

    def set_labels(self, key: str, labels: np.ndarray, *, action: str = "edit") -> bool:
        """Replace a frame's labels (copied in); True when anything changed."""
        return bool(self._commit(action, {key: labels}))

    def set_tip(self, key: str, tip_xy: Point | None, *, action: str = "tip") -> bool:
        """Mark (or clear, with None) the needle tip of a frame, in its pixels, as an undoable
        step; True when it changed."""
        return bool(self._commit(action, {}, {key: tip_xy}))

    def annotate(
        self, key: str, labels: np.ndarray, tip_xy: Point | None, *, action: str = "edit"
    ) -> bool:
        """Set a frame's labels and tip together, as one undoable step; True when anything
        changed."""
        return bool(self._commit(action, {key: labels}, {key: tip_xy}))

    def pre_annotate(
        self, keys: Sequence[str], segment: Callable[[Frame], np.ndarray]
    ) -> list[str]:
        """Label frames with a model (one undo step); the keys that changed.

        Parameters
        ----------
        keys : sequence of str
            Frames to label.
        segment : callable
            Frame -> ``(H, W)`` uint8 labels, for example a :class:`usguide.segment.Segmenter`
            (which labels the imaging region only).
        """
        new = {}
        for key in keys:
            labels = np.asarray(segment(self.frames[key].as_frame()))
            new[key] = _inside_region(labels, self.frames[key].region)
        return self._commit("pre-annotate", new)

    def following(self, key: str, count: int) -> list[str]:
        """Keys of the next ``count`` frames of the same source held here, in frame order."""
        f = self.frames[key]
        later = sorted(
            (
                g
                for g in self.frames.values()
                if g.source == f.source and g.frame_index > f.frame_index
            ),
            key=lambda g: g.frame_index,
        )
        return [g.key for g in later[:count]]

    def propagate(
        self, key: str, targets: Sequence[str] | int, *, method: FlowMethod = "dis"
    ) -> list[str]:
        """Carry a frame's labels to following frames by optical flow (one undo step).

        Parameters
        ----------
        key : str
            The labelled frame.
        targets : sequence of str or int
            The frames to label, in order (each is warped from the one before), or a count of
            following frames of the same source (:meth:`following`).
        method : {"dis", "farneback"}
            Optical flow algorithm.

        Returns
        -------
        list of str
            Keys whose labels changed.
        """
        keys = self.following(key, targets) if isinstance(targets, int) else list(targets)
        if not keys:
            return []
        frames = [self.frames[k] for k in (key, *keys)]
        warped = propagate_labels(frames[0].labels, [f.image for f in frames], method=method)
        new = {
            f.key: _inside_region(lab, f.region) for f, lab in zip(frames[1:], warped, strict=True)
        }
        return self._commit(f"propagate to {len(keys)} frame(s)", new)

    def undo(self) -> str | None:
        """Undo the last change of labels or tips; its description, or None."""
        arrays = self._arrays()
        label = self.history.undo(arrays)
        self._tips_from(arrays)
        return label

    def redo(self) -> str | None:
        """Redo the last undone change; its description, or None."""
        arrays = self._arrays()
        label = self.history.redo(arrays)
        self._tips_from(arrays)
        return label

    # -- export / load ----------------------------------------------------------------------
    def export(
        self,
        path: str | PathLike[str],
        *,
        coco: bool = True,
        dicom_seg: bool = False,
        keys: Sequence[str] | None = None,
    ) -> Path:
        """Write the dataset to ``path`` atomically (see the module notes).

        Parameters
        ----------
        path : path
            The dataset folder (a link to one is followed). An existing usguide dataset there
            is replaced only once the new one is complete; a folder holding anything an export
            did not write is refused.
        coco : bool
            Write ``coco.json``.
        dicom_seg : bool
            Write a de-identified US image and DICOM SEG per frame (needs highdicom).
        keys : sequence of str, optional
            Frames to export; default all.

        Returns
        -------
        pathlib.Path
            The dataset folder.

        Raises
        ------
        DeidentificationError
            When a written file would hold a source's identifying value (nothing is published).
        ForeignFilesError
            When ``path`` holds files or folders that no export wrote (the user's own, or a
            folder that is not a dataset): nothing is replaced. A ``FileExistsError``.
        """
        # The real folder: renaming a link aside would replace it by a folder of its own.
        out = Path(os.path.realpath(path))
        _recover(out)
        self._refuse_foreign(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            written = self._write(tmp, coco=coco, dicom_seg=dicom_seg, keys=keys)
            deid.check_files(written, self._identifiers)
            _fsync_dir(tmp)
            self._refuse_foreign(out)  # again: files may have been added while writing
            _swap_in(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Path(path)

    def _refuse_foreign(self, out: Path) -> None:
        """Raise ForeignFilesError when ``out`` holds entries no export wrote."""
        foreign = _foreign_entries(out)
        if not foreign:
            return
        # A name that holds a patient's identifier is not repeated in the message.
        shown = [
            "<name withheld>" if deid.check_text(name, self._identifiers) else name
            for name in foreign[:3]
        ]
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise ForeignFilesError(
            out,
            f"holds {', '.join(shown)}{more}, which no usguide export wrote; move them "
            "elsewhere or export to another folder (nothing was replaced)",
        )

    def _write(
        self, root: Path, *, coco: bool, dicom_seg: bool, keys: Sequence[str] | None
    ) -> list[Path]:
        from usguide.annotation.coco import to_coco

        chosen = [self.frames[k] for k in (keys if keys is not None else self.frames)]
        (root / "images").mkdir(parents=True)
        (root / "masks").mkdir()
        if dicom_seg:
            (root / "dicom").mkdir()
        written: list[Path] = []
        entries: list[dict[str, Any]] = []
        coco_images = []
        studies: dict[str, str] = {}
        # A label taken by name alone is not known to be the recording: it stays without a key.
        key_of_label = {
            label: key
            for key, label in self._labels_by_key.items()
            if label not in self._unverified
        }
        for f in chosen:
            image, labels, tip = _cropped(f)
            image_rel, mask_rel = f"images/{f.key}.png", f"masks/{f.key}.png"
            written.append(_write_bytes(root / image_rel, _png(image)))
            written.append(_write_bytes(root / mask_rel, _palette_png(labels)))
            dicom = None
            if dicom_seg:
                from pydicom.uid import generate_uid

                from usguide.annotation.dicom_seg import write_dicom_seg

                study = studies.setdefault(f.source, generate_uid())
                image_dcm, seg_dcm = f"dicom/{f.key}_image.dcm", f"dicom/{f.key}_seg.dcm"
                if write_dicom_seg(
                    image, labels, root / image_dcm, root / seg_dcm,
                    spacing_mm=f.spacing_mm, study_uid=study,
                ):  # fmt: skip
                    written += [root / image_dcm, root / seg_dcm]
                    dicom = {"image": image_dcm, "seg": seg_dcm}
            entry = {
                "key": f.key,
                "image": image_rel,
                "mask": mask_rel,
                "source": f.source,
                "source_key": key_of_label.get(f.source),
                "frame_index": f.frame_index,
                "timestamp_s": f.timestamp_s,
                "spacing_mm": list(f.spacing_mm) if f.spacing_mm else None,
                "units": "mm" if f.spacing_mm else "px",
                "region_in_source": list(_region_in_source(f)),
                "tip_xy": list(tip) if tip is not None else None,
                "annotator": f.annotator,
                "annotated_at": f.annotated_at,
                "labelled": [CLASS_NAMES[c] for c in range(N_CLASSES) if f.labelled[c]],
                "dicom": dicom,
            }
            entries.append(entry)
            extra = {
                "source": f.source,
                "frame_index": f.frame_index,
                "spacing_mm": entry["spacing_mm"],
            }
            coco_images.append((image_rel, labels, tip, extra))
        manifest = {
            "format": FORMAT,
            "version": _VERSION,
            "software": f"usguide {__version__}",
            "created": _now(),
            "class_names": list(CLASS_NAMES),
            "deidentified": True,
            "cropped_to_imaging_region": True,
            "coordinates": "pixels of the exported images; x right, y down, origin top-left",
            "frames": entries,
        }
        if coco:
            info = {"description": "usguide annotations", "version": str(_VERSION),
                    "date_created": manifest["created"]}  # fmt: skip
            written.append(_write_json(root / "coco.json", to_coco(coco_images, info=info)))
        # The manifest last: a folder holding it is complete.
        written.append(_write_json(root / MANIFEST, manifest))
        return written

    @classmethod
    def load(cls, path: str | PathLike[str], annotator: str = "") -> AnnotationSet:
        """Re-open an exported dataset for more annotation.

        Frames come back cropped (their region is the whole image), with their labels, tips,
        sources and annotators. A source added again gets its label back (the manifest keeps a
        key per source), so its frames join the recording instead of starting another. A
        manifest of an older version keeps no such key: a source is then matched to a label by
        its name, and by its pixels where the dataset holds one of its frames; a frame of
        another recording of the same name never replaces one re-opened.
        """
        root = _readable(Path(path))
        manifest = _read_manifest(root)
        out = cls(annotator)
        for e in manifest["frames"]:
            image = _read_image(root / e["image"])
            labels = _read_labels(root / e["mask"])
            h, w = labels.shape
            frame = AnnotatedFrame(
                image=image,
                labels=labels,
                source=str(e["source"]),
                frame_index=int(e["frame_index"]),
                region=(0, 0, w - 1, h - 1),
                spacing_mm=tuple(e["spacing_mm"]) if e.get("spacing_mm") else None,  # type: ignore[arg-type]
                timestamp_s=e.get("timestamp_s"),
                tip_xy=tuple(e["tip_xy"]) if e.get("tip_xy") else None,  # type: ignore[arg-type]
                annotator=str(e.get("annotator", "")),
                annotated_at=str(e.get("annotated_at", "")),
                labelled=_labelled_flags(e),
                region_in_source=tuple(e["region_in_source"])
                if e.get("region_in_source")
                else None,  # type: ignore[arg-type]
            )
            out.frames[frame.key] = frame
            out._labels_by_source[frame.source] = frame.source
            if e.get("source_key"):
                out._labels_by_key.setdefault(str(e["source_key"]), frame.source)
            else:
                out._keyless.add(frame.source)
                out._reopened.add(frame.key)
        out._keyless -= set(out._labels_by_key.values())
        return out


class AnnotationDataset:
    """An exported annotation folder read as training samples (as ``usguide train`` reads the
    published sets).

    Parameters
    ----------
    path : path
        The folder (holding ``usguide-dataset.json``).

    Notes
    -----
    ``groups`` are the frames' sources: frames of one recording are near-duplicates, so a split
    keeps each recording on one side. Images are returned grey, at their exported size (already
    cropped to the imaging region).
    """

    def __init__(self, path: str | PathLike[str]) -> None:
        from usguide.errors import EmptySourceError

        self.root = _readable(Path(path))
        manifest = _read_manifest(self.root)
        entries = manifest["frames"]
        if not entries:
            raise EmptySourceError(self.root, "the dataset holds no frame")
        self.dataset = Path(path).name
        self.stems: tuple[str, ...] = tuple(e["key"] for e in entries)
        self.image_paths = tuple(self.root / e["image"] for e in entries)
        self.mask_paths = tuple(self.root / e["mask"] for e in entries)
        self.names = tuple(f"{self.dataset}/{s}" for s in self.stems)
        self.groups = tuple(f"{self.dataset}/{e['source']}" for e in entries)
        self.labelled_per_sample = tuple(_labelled_flags(e) for e in entries)

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, i: int) -> Any:
        from usguide.data.datasets import InvalidMaskError, Sample, _read_grey

        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.dataset}: index {i} out of range for {len(self)} samples")
        i %= len(self)
        image = _read_grey(self.image_paths[i])
        mask = _read_labels(self.mask_paths[i])
        if mask.shape != image.shape:
            raise InvalidMaskError(self.mask_paths[i], "mask and image differ in size")
        return Sample(
            image, mask, self.labelled_per_sample[i], self.names[i], self.dataset, self.groups[i]
        )

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"AnnotationDataset({str(self.root)!r}, {len(self)} samples)"


def is_annotation_dataset(path: str | PathLike[str]) -> bool:
    """True when ``path`` is a folder exported by :meth:`AnnotationSet.export`."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


# -- helpers ----------------------------------------------------------------------------------

_EXPORT_FOLDERS = ("images", "masks", "dicom")
# Written by file browsers into any folder they show; they hold nothing of the user's.
_OS_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


def _source_key(source: str) -> str:
    """A stable digest of a source (of its real path when it is a file), kept in the manifest
    so a re-opened dataset knows the recording again; a hash, never the path itself."""
    identity = os.path.realpath(source) if source and os.path.exists(source) else source
    return hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _shows(image: np.ndarray, reopened: AnnotatedFrame) -> bool:
    """Whether ``image``, a whole frame of a source, holds ``reopened``'s image where that was
    cut from (:func:`_region_in_source`)."""
    x0, y0, x1, y1 = _region_in_source(reopened)
    crop = (
        image[y0 : y1 + 1, x0 : x1 + 1]
        if Region((x0, y0, x1, y1)).inside(*image.shape[:2])
        else None
    )
    held = reopened.image[Region(reopened.region).slices]
    if crop is None or crop.shape != held.shape:
        return False
    diff = np.abs(crop.astype(np.int32) - held.astype(np.int32))
    return float(diff.mean()) <= _SAME_FRAME_DIFF


def _distinctive(reopened: AnnotatedFrame) -> bool:
    """Whether ``reopened``'s image holds enough of a picture for a match to tell recordings
    apart: a black or uniform frame (the probe in the air) is alike in any recording."""
    held = reopened.image[Region(reopened.region).slices].astype(np.float32)
    return held.size > 0 and float(np.abs(held - np.median(held)).mean()) > 4 * _SAME_FRAME_DIFF


def _valid_labels(key: str, labels: Any, shape: tuple[int, ...]) -> np.ndarray:
    """``labels`` as uint8 class indices for a frame of ``shape``; a ValueError naming the frame
    otherwise (a cast to uint8 would silently turn 260 into class 4)."""
    labels = np.asarray(labels)
    if labels.shape != shape:
        raise ValueError(f"{key}: labels {labels.shape}, frame {shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{key}: labels must be integer class indices, not {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= N_CLASSES):
        raise ValueError(f"{key}: labels hold values outside the classes 0..{N_CLASSES - 1}")
    return labels.astype(np.uint8, copy=False)


def _carry_over(old: AnnotatedFrame, new: AnnotatedFrame) -> bool:
    """Give ``new``, which replaces ``old``, the old labels, tip and their provenance when they
    fit it: same size and region, or a re-opened crop (:meth:`AnnotationSet.load`) put back at
    the region it was cut from. True when they did."""
    if old.labels.shape == new.labels.shape and old.region == new.region:
        new.labels[...] = old.labels
        new.tip_xy = old.tip_xy
    elif old.region_in_source is not None and _region_in_source(old) == new.region:
        new.labels[Region(new.region).slices] = old.labels[Region(old.region).slices]
        if old.tip_xy is not None:
            dx, dy = new.region[0] - old.region[0], new.region[1] - old.region[1]
            new.tip_xy = (old.tip_xy[0] + dx, old.tip_xy[1] + dy)
    else:
        return False
    new.annotator, new.annotated_at, new.labelled = old.annotator, old.annotated_at, old.labelled
    return True


def _foreign_entries(out: Path) -> list[str]:
    """What in ``out`` no export wrote, as sorted relative paths: everything in a folder that is
    not a dataset; in a dataset, what its manifest does not list."""
    if not out.exists():
        return []
    if not out.is_dir():
        return [out.name]
    if not is_annotation_dataset(out):
        return sorted(p.name for p in out.iterdir() if p.name not in _OS_FILES)
    owned = {MANIFEST, "coco.json"}
    for e in _read_manifest(out)["frames"]:
        if isinstance(e, dict):
            owned.update(str(e.get(k)) for k in ("image", "mask"))
            owned.update(str(v) for v in (e.get("dicom") or {}).values())
    foreign = []
    for entry in sorted(out.iterdir()):
        if entry.name in _OS_FILES:
            continue
        if entry.name in _EXPORT_FOLDERS and entry.is_dir() and not entry.is_symlink():
            for p in sorted(entry.iterdir()):
                rel = f"{entry.name}/{p.name}"
                if p.name not in _OS_FILES and (rel not in owned or not _plain_file(p)):
                    foreign.append(rel)
        elif entry.name not in owned or not _plain_file(entry):
            foreign.append(entry.name)
    return foreign


def _plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _inside_region(labels: np.ndarray, region: BBox) -> np.ndarray:
    """A copy of ``labels`` with everything outside ``region`` set to background."""
    out = np.zeros_like(labels)
    rows, cols = Region(region).slices
    out[rows, cols] = labels[rows, cols]
    return out


def _cropped(f: AnnotatedFrame) -> tuple[np.ndarray, np.ndarray, Point | None]:
    """Image, labels and tip cut to the imaging region (tip None when it lies outside)."""
    rows, cols = Region(f.region).slices
    image = np.ascontiguousarray(f.image[rows, cols])
    labels = np.ascontiguousarray(f.labels[rows, cols])
    tip = None
    if f.tip_xy is not None:
        x, y = f.tip_xy[0] - f.region[0], f.tip_xy[1] - f.region[1]
        h, w = labels.shape
        if math.isfinite(x) and math.isfinite(y) and -0.5 <= x < w - 0.5 and -0.5 <= y < h - 0.5:
            tip = (float(x), float(y))
    return image, labels, tip


def _region_in_source(f: AnnotatedFrame) -> BBox:
    if f.region_in_source is None:
        return f.region
    # A re-opened frame: its region is a crop of the original crop.
    x0, y0 = f.region_in_source[0], f.region_in_source[1]
    return (x0 + f.region[0], y0 + f.region[1], x0 + f.region[2], y0 + f.region[3])


def _labelled_flags(entry: Mapping[str, Any]) -> tuple[bool, ...]:
    names = entry.get("labelled")
    if names is None:
        return (True,) * N_CLASSES
    return tuple(name in names for name in CLASS_NAMES)


def _png(image: np.ndarray) -> bytes:
    pixels = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    ok, data = cv2.imencode(".png", pixels)
    if not ok:
        raise OSError("PNG encoding failed")
    return data.tobytes()


def _palette_png(labels: np.ndarray) -> bytes:
    """Labels as a palette PNG: the indices are the classes, the colours usguide's."""
    from PIL import Image

    if labels.max(initial=0) >= N_CLASSES:
        raise ValueError(f"labels hold values >= {N_CLASSES}")
    im = Image.fromarray(labels, mode="P")
    palette = [v for colour in CLASS_COLOURS for v in colour]
    im.putpalette(palette + [0] * (768 - len(palette)))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _write_bytes(path: Path, data: bytes) -> Path:
    """Write and flush to disk, so the later rename publishes whole files."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return path


def _write_json(path: Path, obj: Any) -> Path:
    return _write_bytes(path, (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode())


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _backup(out: Path) -> Path:
    return out.parent / f".{out.name}.previous"


def _swap_in(tmp: Path, out: Path) -> None:
    """Publish ``tmp`` as ``out``: the old one steps aside, the new one takes its name, the old
    one goes. A crash between the two renames leaves the old one complete beside it
    (:func:`_recover` and :func:`_readable` find it)."""
    backup = _backup(out)
    if out.exists():
        os.replace(out, backup)
    os.replace(tmp, out)
    _fsync_dir(out.parent)
    shutil.rmtree(backup, ignore_errors=True)


def _recover(out: Path) -> None:
    """Finish what a crash interrupted: bring back the previous dataset if it stands aside."""
    backup = _backup(out)
    if backup.exists():
        if out.exists():
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(backup, out)


def _readable(root: Path) -> Path:
    """The dataset folder to read: ``root``, or its previous version left by a crash mid-swap."""
    if not (root / MANIFEST).exists() and (_backup(root) / MANIFEST).exists():
        return _backup(root)
    return root


def _read_manifest(root: Path) -> dict[str, Any]:
    from usguide.errors import CorruptSourceError, SourceNotFoundError

    path = root / MANIFEST
    if not path.exists():
        raise SourceNotFoundError(root, f"no {MANIFEST}: not a usguide annotation dataset")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CorruptSourceError(path, f"unreadable manifest ({e})") from e
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("frames"), list):
        raise CorruptSourceError(path, f"not a {FORMAT} manifest")
    return manifest


def _read_image(path: Path) -> np.ndarray:
    pixels = decode_image_file(path)
    if pixels.ndim == 3:
        return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    return pixels


def _read_labels(path: Path) -> np.ndarray:
    from usguide.data.datasets import InvalidMaskError, _read_indices

    labels = _read_indices(path)
    if labels.max(initial=0) >= N_CLASSES:
        raise InvalidMaskError(path, f"class indices >= {N_CLASSES}")
    return labels


def _tip_key(key: str) -> tuple[str, str]:
    """The undo history's key for a frame's tip (label maps use the frame's key)."""
    return ("tip", key)


def _tip_array(tip: Point | None) -> np.ndarray:
    """A tip as a ``(1, 3)`` array: x, y, and 1 when marked (all 0 when not), so the undo
    history's rectangle diff applies to tips too."""
    if tip is None:
        return np.zeros((1, 3))
    return np.array([[tip[0], tip[1], 1.0]])


def _tip_from_array(a: np.ndarray) -> Point | None:
    return (float(a[0, 0]), float(a[0, 1])) if a[0, 2] else None
