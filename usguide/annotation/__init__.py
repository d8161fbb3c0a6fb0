"""Annotation of ultrasound frames and de-identified dataset export.

- :mod:`usguide.annotation.dataset`: :class:`AnnotationSet` (frames, label maps, needle tips,
  pre-annotation with the model, propagation, undo) and its atomic, de-identified export, which
  re-opens for more annotation and loads in ``usguide train`` (:class:`AnnotationDataset`);
- :mod:`usguide.annotation.propagate`: labels carried to the following frames by optical flow;
- :mod:`usguide.annotation.history`: the bounded undo stack;
- :mod:`usguide.annotation.deid`: identifying header values, safe source labels, the final check;
- :mod:`usguide.annotation.coco` and :mod:`usguide.annotation.dicom_seg`: the interchange files.

Only numpy, OpenCV, Pillow and pydicom (highdicom for DICOM SEG, imported when used).
"""

from __future__ import annotations

from usguide.annotation.dataset import (
    MANIFEST,
    AnnotatedFrame,
    AnnotationDataset,
    AnnotationSet,
    ForeignFilesError,
    is_annotation_dataset,
)
from usguide.annotation.deid import DeidentificationError
from usguide.annotation.history import History
from usguide.annotation.propagate import propagate_labels, warp_labels

__all__ = [
    "MANIFEST",
    "AnnotatedFrame",
    "AnnotationDataset",
    "AnnotationSet",
    "DeidentificationError",
    "ForeignFilesError",
    "History",
    "is_annotation_dataset",
    "propagate_labels",
    "warp_labels",
]
