"""napari-usguide: the napari plugin for usguide.

Contributions (declared in ``napari.yaml``): a reader for DICOM cines, videos and image folders
that sets the mm scale from the scan's calibration, the demo scan as sample data, and dock
widgets. The core library :mod:`usguide` never imports Qt or napari; this package depends on
it, not the other way round. Not a medical device.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
