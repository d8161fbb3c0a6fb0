"""Export to one ONNX file carrying its own preprocessing metadata, and static int8 quantisation."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from usguide.segment import METADATA_PREFIX


def export_onnx(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    input_size: tuple[int, int],
    metadata: Mapping[str, Any],
) -> Path:
    """Write ``model`` as ONNX (opset 17, batch 1, input ``image`` (1, 1, H, W) float32, output
    ``logits`` (1, C, H, W)) with ``metadata`` in its metadata_props as ``usguide.<key>``.

    Values that are not strings are stored as JSON.
    """
    import onnx

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    dummy = torch.zeros(1, 1, *input_size)
    tmp = out.with_suffix(".tmp.onnx")
    torch.onnx.export(
        model,
        dummy,
        str(tmp),
        input_names=["image"],
        output_names=["logits"],
        opset_version=17,
        dynamo=False,
    )
    proto = onnx.load(str(tmp))
    tmp.unlink()
    set_metadata(proto, metadata)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    return out


def set_metadata(proto: Any, metadata: Mapping[str, Any]) -> None:
    """Replace the ``usguide.*`` metadata_props of an ONNX ModelProto."""
    keep = [p for p in proto.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key = METADATA_PREFIX + key
        entry.value = value if isinstance(value, str) else json.dumps(value)


def quantize_int8(
    fp32_path: str | os.PathLike[str],
    int8_path: str | os.PathLike[str],
    calibration: Iterable[np.ndarray],
) -> Path:
    """Static int8 quantisation in QDQ form, per-channel weights, calibrated on real inputs.

    ``calibration`` yields preprocessed model inputs ``(1, 1, H, W)`` float32. The usguide
    metadata is carried over.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, inputs: Iterable[np.ndarray]) -> None:
            self._it = iter(inputs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {"image": x}

    out = Path(int8_path)
    prepared = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(out),
        Reader(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    prepared.unlink()
    source = onnx.load(str(fp32_path))
    proto = onnx.load(str(out))
    meta = {
        p.key[len(METADATA_PREFIX) :]: p.value
        for p in source.metadata_props
        if p.key.startswith(METADATA_PREFIX)
    }
    set_metadata(proto, meta)
    onnx.save(proto, str(out))
    return out
