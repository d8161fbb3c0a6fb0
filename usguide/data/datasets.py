"""The real labelled scans usguide trains and validates on, read lazily from a local mirror.

Two sets, each a folder ``<root>/<name>/`` holding ``images/`` and ``masks/`` with matching file
names (see ``datasets/*.md`` for their cards):

- :class:`UsgraSeg` (``usgra-seg``): peripheral-nerve-block scans, masks of nerve and vessel.
- :class:`DlTrackApo` (``dltrack-apo``): longitudinal muscle scans, masks of the aponeuroses
  (the fascia planes).

A :class:`Sample` carries, besides the grey image and the mask of usguide class indices, which
classes its mask labels at all: a class a data set does not label (nerves in the muscle scans) is
unknown there, never background, and losses and metrics must ignore it.

:func:`split` divides a set into training and validation by *group*, so near-duplicate frames of
one scan never straddle the two. The groups of the published sets are fixed tables
(:data:`USGRA_SEG_GROUPS`, :data:`DLTRACK_APO_GROUPS`) found once with
:func:`near_duplicate_groups` and checked by eye; the data carry no subject identifiers.

Only numpy, OpenCV and Pillow: no torch here.
"""

from __future__ import annotations

import operator
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import ClassVar, Literal, Protocol

import cv2
import numpy as np

import usguide
from usguide.errors import (
    CorruptSourceError,
    EmptySourceError,
    SourceNotFoundError,
    UnsupportedFormatError,
    UsguideError,
)
from usguide.labels import BACKGROUND, FASCIA, N_CLASSES, NEEDLE, NERVE, VESSEL
from usguide.sources.images import decode_image_file

__all__ = [
    "DATASETS",
    "DLTRACK_APO_GROUPS",
    "USGRA_SEG_GROUPS",
    "DlTrackApo",
    "InvalidMaskError",
    "Sample",
    "Subset",
    "UnmatchedFilesWarning",
    "UsgraSeg",
    "data_root",
    "load_split",
    "near_duplicate_groups",
    "open_dataset",
    "split",
]

ENV_VAR = "USGUIDE_DATA"
_IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


class InvalidMaskError(UsguideError, ValueError):
    """A mask that does not fit its image or holds values its data set does not define."""


class UnmatchedFilesWarning(UserWarning):
    """An image without a mask, or a mask without an image; the file is left out."""


def data_root(root: str | PathLike[str] | None = None) -> Path:
    """The local mirror directory that holds the data sets.

    Parameters
    ----------
    root : str or PathLike, optional
        The mirror directory. When None: ``$USGUIDE_DATA``, else ``../shared/data`` beside the
        repository (``<repo>/../shared/data``).

    Returns
    -------
    pathlib.Path
        The directory (it exists).

    Raises
    ------
    SourceNotFoundError
        When the chosen directory does not exist, saying how to point at a mirror.
    """
    how = (
        f"pass root=..., set {ENV_VAR}=/path/to/mirror, or place the mirror at ../shared/data "
        "beside the repository"
    )
    if root is not None:
        path = Path(root)
        if not path.is_dir():
            raise SourceNotFoundError(path, f"no data mirror folder here ({how})")
        return path
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env)
        if not path.is_dir():
            raise SourceNotFoundError(path, f"${ENV_VAR} names no folder ({how})")
        return path
    path = Path(usguide.__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        raise SourceNotFoundError(path, f"no data mirror found ({how})")
    return path


@dataclass(frozen=True, eq=False)  # eq=False: == on arrays has no single truth value
class Sample:
    """One labelled scan.

    Attributes
    ----------
    image : numpy.ndarray
        ``(H, W)`` uint8 grey B-mode image at its native size (RGB files are converted to grey).
    mask : numpy.ndarray
        ``(H, W)`` uint8 class indices of :mod:`usguide.labels`.
    labelled : tuple of bool
        Length ``N_CLASSES``: which classes this mask labels. A class not labelled is unknown in
        this sample (a 0 pixel may be that class): losses and metrics must ignore it, never
        count it as background.
    name : str
        ``"<dataset>/<file stem>"``, for example ``"usgra-seg/0001"``.
    dataset : str
        The data set, for example ``"usgra-seg"``.
    group : str
        The split group: the name of the first member of its near-duplicate group, or the sample's
        own name when it has none.
    """

    image: np.ndarray
    mask: np.ndarray
    labelled: tuple[bool, ...]
    name: str
    dataset: str
    group: str

    def __post_init__(self) -> None:
        if self.image.ndim != 2 or self.image.dtype != np.uint8:
            raise ValueError(f"{self.name}: image must be (H, W) uint8, got {self.image.shape}")
        if self.mask.shape != self.image.shape or self.mask.dtype != np.uint8:
            raise ValueError(
                f"{self.name}: mask must be uint8 of the image's shape {self.image.shape}, "
                f"got {self.mask.dtype} {self.mask.shape}"
            )
        if len(self.labelled) != N_CLASSES:
            raise ValueError(f"{self.name}: labelled needs {N_CLASSES} entries")


# Near-duplicate groups of the published sets, found with near_duplicate_groups() (the settings in
# _GROUPING below) and checked by eye; file stems, first member names the group. Every file not
# listed is a group of its own. See datasets/usgra-seg.md and datasets/dltrack-apo.md.
USGRA_SEG_GROUPS: tuple[tuple[str, ...], ...] = (
    # The 512x512 grey files are re-exports of frames also present as 534x512 RGB (same scan, a
    # few pixels shifted, mask redrawn), in the same order.
    ("0003", "0050"),
    ("0006", "0056"),
    ("0007", "0061"),
    ("0010", "0067"),
    ("0012", "0073"),
    ("0013", "0080"),
    ("0014", "0083"),
    ("0015", "0087"),
    ("0018", "0099"),
    ("0021", "0104"),
    ("0022", "0105"),
    ("0023", "0109"),
    ("0025", "0116"),
    ("0027", "0118"),
    ("0028", "0120"),
    ("0029", "0125"),
    ("0033", "0140"),
    ("0036", "0146"),
    ("0037", "0147"),
    ("0038", "0151"),
    ("0039", "0153"),
    # Same scan, probe barely moved; 0043 and 0077 are pixel-identical, their masks differ.
    ("0043", "0077", "0129"),
    ("0049", "0128"),
    ("0055", "0058"),
    ("0079", "0081"),
    ("0097", "0121"),
    ("0113", "0131"),
    ("0127", "0145"),
    ("0212", "0221"),
)

DLTRACK_APO_GROUPS: tuple[tuple[str, ...], ...] = (
    # All 512x512 crops: one protocol and muscle; neighbouring frames are as alike as frames of
    # one video with no clear break between them, so they are kept together.
    (
        "img_00066", "img_00067", "img_00072", "img_00073", "img_00081", "img_00097",
        "img_00115", "img_00118", "img_00129", "img_00143", "img_00153", "img_00157",
        "img_00163", "img_00168", "img_00190", "img_00210", "img_00223", "img_00233",
        "img_00247", "img_00248", "img_00249", "img_00254", "img_00256", "img_00260",
        "img_00264", "img_00271", "img_00277", "img_00285", "img_00287", "img_00291",
        "img_00296", "img_00297",
    ),
    # Runs of neighbouring frames of one scanner layout (videos), 660x556 and 800x652.
    (
        "img_00379", "img_00383", "img_00384", "img_00401",
        "img_00410", "img_00412", "img_00421", "img_00425",
    ),
    ("img_00427", "img_00432", "img_00439", "img_00440", "img_00443"),
    ("img_00454", "img_00455", "img_00459", "img_00462", "img_00470"),
    ("img_00557", "img_00560", "img_00562", "img_00566", "img_00573"),
    ("img_00075", "img_00083", "img_00085", "img_00100"),
    ("img_00130", "img_00136", "img_00141", "img_00147"),
    ("img_00220", "img_00221", "img_00229", "img_00230"),
    ("img_00499", "img_00505", "img_00506", "img_00514"),
    ("img_00516", "img_00520", "img_00529", "img_00532"),
    ("img_00042", "img_00045", "img_00054"),
    ("img_00319", "img_00322", "img_00336"),
    ("img_00361", "img_00365", "img_00370"),
    ("img_00480", "img_00482", "img_00483"),
    ("img_00108", "img_00117"),
    ("img_00179", "img_00194"),
    ("img_00299", "img_00314"),
    ("img_00347", "img_00349"),
)  # fmt: skip


@dataclass(frozen=True)
class _Grouping:
    """Settings of :func:`near_duplicate_groups` for one data set."""

    sequence_similarity: float | None
    max_gap: int = 20


_GROUPING = {
    # File numbers of usgra-seg are not acquisition order (neighbours show other regions).
    "usgra-seg": _Grouping(sequence_similarity=None),
    # dltrack-apo numbers run through videos: neighbours of one layout are frames of one video.
    "dltrack-apo": _Grouping(sequence_similarity=0.44, max_gap=20),
}


def _labelled(*classes: int) -> tuple[bool, ...]:
    """``N_CLASSES`` flags, True for ``classes``."""
    return tuple(c in classes for c in range(N_CLASSES))


class _Dataset(Protocol):
    groups: Sequence[str]


class _PairedFolder:
    """Images and masks matched by file stem under ``<root>/<dataset>/{images,masks}``."""

    dataset: ClassVar[str]
    labelled: ClassVar[tuple[bool, ...]]
    known_groups: ClassVar[tuple[tuple[str, ...], ...]]

    def __init__(self, root: str | PathLike[str] | None = None) -> None:
        self.root = data_root(root) / self.dataset
        image_dir, mask_dir = self.root / "images", self.root / "masks"
        for folder in (self.root, image_dir, mask_dir):
            if not folder.is_dir():
                raise SourceNotFoundError(
                    folder, f"no such folder (is this a {self.dataset} copy?)"
                )
        images = _files_by_stem(image_dir)
        masks = _files_by_stem(mask_dir)
        unmatched = sorted(images.keys() ^ masks.keys())
        if unmatched:
            warnings.warn(
                f"{self.root}: {len(unmatched)} file(s) without a partner left out: "
                f"{', '.join(unmatched[:10])}{' ...' if len(unmatched) > 10 else ''}",
                UnmatchedFilesWarning,
                stacklevel=2,
            )
        stems = sorted(images.keys() & masks.keys())
        if not stems:
            raise EmptySourceError(self.root, "no image with a matching mask")
        self.stems: tuple[str, ...] = tuple(stems)
        self.image_paths: tuple[Path, ...] = tuple(images[s] for s in stems)
        self.mask_paths: tuple[Path, ...] = tuple(masks[s] for s in stems)
        self.names: tuple[str, ...] = tuple(f"{self.dataset}/{s}" for s in stems)
        present = set(stems)
        # A group is named by its first member present here, so a partial mirror still works.
        label: dict[str, str] = {}
        for group in self.known_groups:
            here = [s for s in group if s in present]
            label.update((s, here[0]) for s in here)
        self.groups: tuple[str, ...] = tuple(f"{self.dataset}/{label.get(s, s)}" for s in stems)

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, i: int) -> Sample:
        i = operator.index(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.dataset}: index {i} out of range for {len(self)} samples")
        i %= len(self)
        image = _read_grey(self.image_paths[i])
        mask = self._read_mask(self.mask_paths[i])
        if mask.shape != image.shape:
            raise InvalidMaskError(
                self.mask_paths[i],
                f"mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                f"{image.shape[1]}x{image.shape[0]}",
            )
        return Sample(image, mask, self.labelled, self.names[i], self.dataset, self.groups[i])

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, {len(self)} samples)"

    def _read_mask(self, path: Path) -> np.ndarray:
        raise NotImplementedError

    def content_groups(self, samples: Sequence[Sample] | None = None) -> tuple[str, ...]:
        """Groups found afresh from the pixels with :func:`near_duplicate_groups`.

        For mirrors other than the published sets (whose groups are the fixed table behind
        :attr:`groups`). A few seconds for a set of 200.

        Parameters
        ----------
        samples : sequence of Sample, optional
            All samples of this set in order, when already read; else they are read here.

        Returns
        -------
        tuple of str
            One group name per sample, as :attr:`groups`.
        """
        samples = list(self) if samples is None else list(samples)
        if [s.name for s in samples] != list(self.names):
            raise ValueError("samples must be all of this data set's samples, in order")
        setting = _GROUPING[self.dataset]
        numbers = [_number(s) for s in self.stems] if setting.sequence_similarity else None
        labels = near_duplicate_groups(
            [s.image for s in samples],
            [s.mask for s in samples],
            numbers=numbers,
            sequence_similarity=setting.sequence_similarity,
            max_gap=setting.max_gap,
        )
        return tuple(self.names[k] for k in labels)


class UsgraSeg(_PairedFolder):
    """USGRA-Seg: 204 peripheral-nerve-block B-mode scans with nerve and vessel masks.

    Parameters
    ----------
    root : str or PathLike, optional
        The mirror directory (see :func:`data_root`); the set is read from ``<root>/usgra-seg``.

    Notes
    -----
    Masks are palette PNGs whose raw palette *indices* are the classes (0 background, 1 nerve,
    2 vessel); the palette colours are ignored. Images keep their native size (534x512 RGB,
    512x512 grey, 761x632 RGB) and are returned grey. Labelled: background, nerve, vessel, and
    needle (volunteer scans: no needle, so a needle is known absent); fascia is not labelled.
    """

    dataset = "usgra-seg"
    labelled = _labelled(BACKGROUND, NERVE, VESSEL, NEEDLE)
    known_groups = USGRA_SEG_GROUPS
    # Upstream index -> usguide class.
    _CLASSES = np.array([BACKGROUND, NERVE, VESSEL], dtype=np.uint8)

    def _read_mask(self, path: Path) -> np.ndarray:
        indices = _read_indices(path)
        if indices.max(initial=0) >= len(self._CLASSES):
            bad = [int(v) for v in np.unique(indices) if v >= len(self._CLASSES)]
            raise InvalidMaskError(
                path, f"mask values {bad} outside 0 background, 1 nerve, 2 vessel"
            )
        return self._CLASSES[indices]


class DlTrackApo(_PairedFolder):
    """DL_Track aponeuroses: 113 longitudinal lower-limb muscle scans with fascia-plane masks.

    Parameters
    ----------
    root : str or PathLike, optional
        The mirror directory (see :func:`data_root`); the set is read from ``<root>/dltrack-apo``.

    Notes
    -----
    Masks are 0/255 bands along the superficial and deep aponeuroses; pixels above 127 become
    fascia (class 3), the rest 0. Labelled: fascia, and needle (none in these scans). Background
    is *not* labelled: a 0 pixel could be an unlabelled nerve or vessel, so it is only "not
    fascia". Images keep their native size (512x512 to 1234x688); some carry scanner UI.
    """

    dataset = "dltrack-apo"
    labelled = _labelled(FASCIA, NEEDLE)
    known_groups = DLTRACK_APO_GROUPS

    def _read_mask(self, path: Path) -> np.ndarray:
        grey = _read_grey(path)
        return np.where(grey > 127, np.uint8(FASCIA), np.uint8(BACKGROUND))


DATASETS: dict[str, type[_PairedFolder]] = {
    UsgraSeg.dataset: UsgraSeg,
    DlTrackApo.dataset: DlTrackApo,
}


def open_dataset(name: str, root: str | PathLike[str] | None = None) -> UsgraSeg | DlTrackApo:
    """The loader of data set ``name``: ``"usgra-seg"``, ``"dltrack-apo"``, or the path of a
    folder exported by :meth:`usguide.annotation.AnnotationSet.export` (read by
    :class:`usguide.annotation.AnnotationDataset`; ``root`` does not apply to it)."""
    if name not in DATASETS:
        from usguide.annotation.dataset import AnnotationDataset, is_annotation_dataset

        if is_annotation_dataset(name):
            return AnnotationDataset(name)  # type: ignore[return-value]
    try:
        cls = DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown data set {name!r}; known: {', '.join(DATASETS)}, or the path of an "
            "exported annotation folder"
        ) from None
    return cls(root)  # type: ignore[return-value]


def split(
    names_or_groups: Sequence[str] | _Dataset, *, val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Divide samples into training and validation, keeping every group on one side.

    Parameters
    ----------
    names_or_groups : sequence of str, or a data set
        One group name per sample (sample names give a plain split), or a loader whose
        ``groups`` attribute is used.
    val_fraction : float, optional
        Share of the *samples* to put in validation, in [0, 1]. Default 0.2.
    seed : int, optional
        Seed of the split. Default 0.

    Returns
    -------
    train, val : list of int
        Sorted sample indices; disjoint, together all of them.

    Notes
    -----
    Groups are sorted by name and ordered by ``numpy.random.default_rng(seed)``; walking that
    order, a group goes to validation while it fits within ``round(val_fraction * n)`` samples.
    No string hashing: the same on every machine and Python version. A group larger than the
    validation target always stays in training.
    """
    data = names_or_groups
    groups = list(data.groups) if hasattr(data, "groups") else list(data)  # type: ignore[union-attr]
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be within [0, 1], got {val_fraction}")
    n = len(groups)
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(str(g), []).append(i)
    unique = sorted(members)
    rng = np.random.default_rng(seed)
    # argsort of uniform draws: the most basic stream of the generator.
    order = np.argsort(rng.random(len(unique)), kind="stable")
    target = round(val_fraction * n)
    val: list[int] = []
    for k in order:
        if len(val) >= target:
            break
        idx = members[unique[k]]
        if len(val) + len(idx) <= target:
            val.extend(idx)
    val_set = set(val)
    return [i for i in range(n) if i not in val_set], sorted(val)


class Subset(Sequence[Sample]):
    """A view of some samples of a data set (for example its validation part).

    Parameters
    ----------
    dataset : data set
        The loader.
    indices : sequence of int
        Which of its samples, in order.
    """

    def __init__(self, dataset: UsgraSeg | DlTrackApo, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices: tuple[int, ...] = tuple(int(i) for i in indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Sample:  # type: ignore[override]
        return self.dataset[self.indices[operator.index(i)]]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.dataset.names[i] for i in self.indices)

    def __repr__(self) -> str:
        return f"Subset({self.dataset!r}, {len(self)} samples)"


def load_split(
    dataset: str | UsgraSeg | DlTrackApo,
    part: Literal["train", "val"],
    seed: int = 0,
    *,
    val_fraction: float = 0.2,
    root: str | PathLike[str] | None = None,
) -> Subset:
    """The training or validation part of a data set, as :func:`split` divides it.

    Parameters
    ----------
    dataset : str or data set
        ``"usgra-seg"``, ``"dltrack-apo"`` or a loader.
    part : {"train", "val"}
        Which part.
    seed, val_fraction
        As for :func:`split`.
    root : str or PathLike, optional
        The mirror, when ``dataset`` is a name.

    Returns
    -------
    Subset
        A lazy view; ``.indices`` are the sample indices in the whole set.
    """
    if part not in ("train", "val"):
        raise ValueError(f"part must be 'train' or 'val', got {part!r}")
    ds = open_dataset(dataset, root) if isinstance(dataset, str) else dataset
    train, val = split(ds, val_fraction=val_fraction, seed=seed)
    return Subset(ds, train if part == "train" else val)


# --- near-duplicate grouping -------------------------------------------------------------------

# Thumbnail side and the shift searched (each way), in thumbnail pixels: 4 of 40 is 10 % of the
# imaging area, more than a probe drifts between near-identical frames.
_THUMB = 40
_SHIFT = 4


def near_duplicate_groups(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    *,
    similar: float = 0.93,
    similar_with_mask: float = 0.80,
    mask_dice: float = 0.6,
    numbers: Sequence[int] | None = None,
    sequence_similarity: float | None = None,
    max_gap: int = 20,
) -> list[int]:
    """Group frames of one scan: near-identical pictures, and runs of one video.

    Parameters
    ----------
    images : sequence of numpy.ndarray
        ``(H, W)`` uint8 grey images (sizes may differ).
    masks : sequence of numpy.ndarray
        ``(H, W)`` uint8 class masks of the same sizes; only "labelled or not" is used.
    similar : float, optional
        Picture similarity that alone makes two frames one group. Default 0.93.
    similar_with_mask, mask_dice : float, optional
        Picture similarity and mask Dice (at the best shift) that together make one group:
        the same view with the same structures in the same places. Defaults 0.80 and 0.6.
    numbers : sequence of int, optional
        Frame numbers (acquisition order), to join runs of a video; None for no sequence rule.
    sequence_similarity : float, optional
        Two frames of the same size that follow each other in ``numbers`` (at most ``max_gap``
        apart) are one group when their similarity reaches this. None for no sequence rule.
    max_gap : int, optional
        Largest number gap within a run. Default 20.

    Returns
    -------
    list of int
        For each frame, the index of the first frame of its group.

    Notes
    -----
    Each image is cropped to its imaging area (:func:`usguide.imaging_region.find_imaging_region`,
    so scanner UI and borders do not count), shrunk to 40x40 and compared with every other one
    by normalised cross-correlation of its central 32x32 over shifts of up to 4 pixels (10 %);
    a pair's similarity is the better of its two directions. Groups are the connected
    components of the pairs the rules join.
    """
    n = len(images)
    if len(masks) != n or (numbers is not None and len(numbers) != n):
        raise ValueError("images, masks and numbers must have the same length")
    thumbs, labels = _thumbnails(images, masks)
    best, shift = _similarity(thumbs)
    # Symmetric: each pair's better direction.
    sim = np.maximum(best, best.T)
    join = sim >= similar
    for i, j in zip(*np.nonzero(np.triu((sim >= similar_with_mask) & ~join, 1)), strict=True):
        t, w = (i, j) if best[i, j] >= best[j, i] else (j, i)
        if _dice_at(labels, int(t), int(w), int(shift[t, w])) >= mask_dice:
            join[i, j] = True

    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        a, b = find(i), find(j)
        parent[max(a, b)] = min(a, b)

    for i, j in zip(*np.nonzero(np.triu(join, 1)), strict=True):
        union(int(i), int(j))
    if numbers is not None and sequence_similarity is not None:
        last: dict[tuple[int, ...], int] = {}
        for i in sorted(range(n), key=lambda k: (numbers[k], k)):
            layout = images[i].shape
            j = last.get(layout)
            near = j is not None and numbers[i] - numbers[j] <= max_gap
            if near and sim[i, j] >= sequence_similarity:
                union(i, j)
            last[layout] = i
    return [find(i) for i in range(n)]


def _thumbnails(
    images: Sequence[np.ndarray], masks: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Imaging areas shrunk to ``(n, 40, 40)`` float32 grey, and their labelled share."""
    from usguide.imaging_region import find_imaging_region

    n = len(images)
    thumbs = np.empty((n, _THUMB, _THUMB), np.float32)
    labels = np.empty((n, _THUMB, _THUMB), np.float32)
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        box = find_imaging_region(image)
        x0, y0, x1, y1 = box if box is not None else (0, 0, image.shape[1] - 1, image.shape[0] - 1)
        crop = (slice(y0, y1 + 1), slice(x0, x1 + 1))
        thumbs[i] = cv2.resize(image[crop], (_THUMB, _THUMB), interpolation=cv2.INTER_AREA)
        on = (mask[crop] > 0).astype(np.float32)
        labels[i] = cv2.resize(on, (_THUMB, _THUMB), interpolation=cv2.INTER_AREA)
    return thumbs, labels


def _similarity(thumbs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised cross-correlation of every template (centre of ``thumbs[i]``) with every
    thumbnail ``j`` at its best shift.

    Returns ``best`` ``(n, n)`` float64 (1 on the diagonal) and ``shift`` ``(n, n)`` int, the
    index ``dy * (2 * _SHIFT + 1) + dx`` of the best window of ``j`` for template ``i``.
    """
    n = len(thumbs)
    size = _THUMB - 2 * _SHIFT
    side = 2 * _SHIFT + 1
    templates = _unit_rows(thumbs[:, _SHIFT : _SHIFT + size, _SHIFT : _SHIFT + size].reshape(n, -1))
    best = np.full((n, n), -np.inf, np.float32)
    shift = np.zeros((n, n), np.int64)
    # One matrix product per shift: all pairs at once (float32 is ample for a threshold test).
    for dy in range(side):
        for dx in range(side):
            windows = _unit_rows(thumbs[:, dy : dy + size, dx : dx + size].reshape(n, -1))
            ncc = templates @ windows.T
            better = ncc > best
            best[better] = ncc[better]
            shift[better] = dy * side + dx
    np.fill_diagonal(best, 1.0)
    return best.astype(np.float64), shift


def _dice_at(labels: np.ndarray, i: int, j: int, shift: int) -> float:
    """Dice of template ``i``'s labelled share and thumbnail ``j``'s window at ``shift``."""
    size = _THUMB - 2 * _SHIFT
    dy, dx = divmod(shift, 2 * _SHIFT + 1)
    a = labels[i, _SHIFT : _SHIFT + size, _SHIFT : _SHIFT + size]
    b = labels[j, dy : dy + size, dx : dx + size]
    total = float(a.sum() + b.sum())
    return 2.0 * float((a * b).sum()) / total if total > 0 else 0.0


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows centred and scaled to unit length (flat rows stay zero)."""
    x = x - x.mean(axis=1, keepdims=True, dtype=np.float64).astype(x.dtype)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


# --- file reading --------------------------------------------------------------------------------


def _files_by_stem(folder: Path) -> dict[str, Path]:
    return {
        p.stem: p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith(".")
    }


def _number(stem: str) -> int:
    digits = re.findall(r"\d+", stem)
    return int(digits[-1]) if digits else 0


def _read_grey(path: Path) -> np.ndarray:
    """``(H, W)`` uint8 grey pixels of an image file; colour is converted with OpenCV."""
    pixels = decode_image_file(path)
    if pixels.dtype != np.uint8:
        raise UnsupportedFormatError(path, f"{pixels.dtype} pixels; expected 8-bit")
    if pixels.ndim == 2:
        return pixels
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        return cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)
    if pixels.ndim == 3 and pixels.shape[2] == 4:
        return cv2.cvtColor(pixels, cv2.COLOR_BGRA2GRAY)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        return pixels[:, :, 0]
    raise UnsupportedFormatError(path, f"pixel layout {pixels.shape} is neither grey nor colour")


def _read_indices(path: Path) -> np.ndarray:
    """Raw class indices of a palette (or grey) mask: palette colours are ignored."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in ("P", "L"):
                raise InvalidMaskError(
                    path, f"mask is mode {mode}; expected palette (P) or grey (L) class indices"
                )
            # np.array of a "P" image gives its palette indices, not colours.
            return np.array(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise CorruptSourceError(path, f"cannot be decoded as an image ({e})") from e
