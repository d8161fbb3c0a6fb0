"""COCO JSON of an annotation set: one mask annotation per class per image, needle tips as key
points.

Masks are run-length encoded as COCO's *uncompressed* RLE (``{"counts": [...], "size": [h, w]}``,
column-major runs starting with background), which pycocotools reads and which is exact: the
label PNGs and the COCO file say the same thing. Category ids are usguide's class indices
(1 nerve, 2 vessel, 3 fascia, 4 needle); the needle tip is category 5, ``needle_tip``, with one
key point.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from usguide.labels import CLASS_NAMES

__all__ = ["TIP_CATEGORY", "CocoImage", "labels_from_coco", "rle_decode", "rle_encode", "to_coco"]

TIP_CATEGORY = len(CLASS_NAMES)

# (file name, labels, tip (x, y) or None, extra image fields)
CocoImage = tuple[str, np.ndarray, tuple[float, float] | None, dict[str, Any]]


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE of a boolean ``(H, W)`` mask."""
    flat = np.asarray(mask, bool).ravel(order="F")
    if not flat.size:
        return {"counts": [], "size": [int(mask.shape[0]), int(mask.shape[1])]}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], change, [flat.size]))).tolist()
    if flat[0]:  # COCO's first run counts background
        counts.insert(0, 0)
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """The boolean ``(H, W)`` mask of a COCO uncompressed RLE."""
    h, w = rle["size"]
    values = np.zeros(len(rle["counts"]), bool)
    values[1::2] = True
    flat = np.repeat(values, rle["counts"])
    if flat.size != h * w:
        raise ValueError(f"RLE covers {flat.size} pixels, not {h} x {w}")
    return flat.reshape((h, w), order="F")


def _bbox(mask: np.ndarray) -> list[float]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [
        float(cols[0]),
        float(rows[0]),
        float(cols[-1] - cols[0] + 1),
        float(rows[-1] - rows[0] + 1),
    ]


def to_coco(images: Iterable[CocoImage], *, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """A COCO dictionary of labelled images.

    Parameters
    ----------
    images : iterable of (file_name, labels, tip_xy, extra)
        ``labels`` ``(H, W)`` uint8 class indices of the image as exported; ``tip_xy`` the needle
        tip in its pixels or None; ``extra`` more fields of the image entry (spacing ...).
    info : dict, optional
        COCO ``info`` block.

    Returns
    -------
    dict
        ``info``, ``images``, ``annotations``, ``categories``.
    """
    categories = [
        {"id": c, "name": name, "supercategory": "needle" if name == "needle" else "anatomy"}
        for c, name in enumerate(CLASS_NAMES)
        if c > 0
    ]
    categories.append(
        {
            "id": TIP_CATEGORY,
            "name": "needle_tip",
            "supercategory": "needle",
            "keypoints": ["tip"],
            "skeleton": [],
        }
    )
    out_images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, (file_name, labels, tip, extra) in enumerate(images, start=1):
        h, w = labels.shape
        out_images.append(
            {"id": image_id, "file_name": file_name, "height": h, "width": w, **extra}
        )
        for c in range(1, len(CLASS_NAMES)):
            mask = labels == c
            area = int(mask.sum())
            if not area:
                continue
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": c,
                    "segmentation": rle_encode(mask),
                    "area": area,
                    "bbox": _bbox(mask),
                    "iscrowd": 0,
                }
            )
        if tip is not None:
            x, y = float(tip[0]), float(tip[1])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": TIP_CATEGORY,
                    "keypoints": [x, y, 2],
                    "num_keypoints": 1,
                    "bbox": [x, y, 0.0, 0.0],
                    "area": 0,
                    "iscrowd": 0,
                }
            )
    return {
        "info": info or {},
        "images": out_images,
        "annotations": annotations,
        "categories": categories,
    }


def labels_from_coco(coco: dict[str, Any], image_id: int) -> np.ndarray:
    """The ``(H, W)`` uint8 label map of one image of a COCO dictionary from :func:`to_coco`."""
    image = next(i for i in coco["images"] if i["id"] == image_id)
    labels = np.zeros((image["height"], image["width"]), np.uint8)
    for a in coco["annotations"]:
        if a["image_id"] == image_id and "segmentation" in a:
            labels[rle_decode(a["segmentation"])] = a["category_id"]
    return labels
