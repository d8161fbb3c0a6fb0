"""One line naming the machine and the libraries a benchmark's figures depend on.

Figures from another processor (other SIMD kernels, another speed) or other library versions are
not comparable; every benchmark prints this line so a table says where it was measured.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path


def cpu_name() -> str:
    """The processor's model name where Linux gives it, else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """``<cpu>, <n> cores, Python x; numpy x, OpenCV x, openvino x, onnxruntime x``."""
    versions = []
    for name, dist in (
        ("numpy", "numpy"),
        ("OpenCV", "opencv-python-headless"),
        ("openvino", "openvino"),
        ("onnxruntime", "onnxruntime"),
    ):
        try:
            versions.append(f"{name} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} absent")
    return (
        f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        + ", ".join(versions)
    )
