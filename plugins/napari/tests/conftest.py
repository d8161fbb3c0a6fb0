"""Plugin test setup: napari's settings go to a temporary file, never the user's config.

napari reads ``NAPARI_CONFIG`` when its settings are first loaded, so it is set here, before
any test imports napari. The tests need a real X display (napari's canvas renders nothing with
``QT_QPA_PLATFORM=offscreen``): pytest-xvfb starts Xvfb, or run them under ``xvfb-run``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_CONFIG_DIR = tempfile.mkdtemp(prefix="napari-usguide-tests-")
os.environ["NAPARI_CONFIG"] = str(Path(_CONFIG_DIR) / "settings.yaml")

REPO_ROOT = Path(__file__).resolve().parents[3]
TEST_DATA = REPO_ROOT / "tests" / "data"


# Fixtures that open Qt windows. Without an X display Qt's xcb platform aborts the whole test
# process (SIGSEGV, every result lost), so such tests are skipped with the reason instead.
_WINDOW_FIXTURES = {"make_napari_viewer", "make_napari_viewer_proxy", "qtbot"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return
    why = (
        "no X display"
        + ("" if shutil.which("Xvfb") else " and no Xvfb for pytest-xvfb to start")
        + ": install Xvfb (see .ci/run) or run under xvfb-run"
    )
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents and _WINDOW_FIXTURES & set(
            getattr(item, "fixturenames", ())
        ):
            item.add_marker(pytest.mark.skip(reason=why))


def shared_data_dir() -> Path | None:
    """``$USGUIDE_DATA`` or ``../shared/data`` beside the repository, when it exists."""
    env = os.environ.get("USGUIDE_DATA")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


def add_mm_scan(viewer: Any, *, need_units: bool = True) -> Any:
    """A calibrated DICOM (0.262 mm per pixel) opened through the plugin's reader into
    ``viewer``; the test is skipped where napari has no layer units and ``need_units``."""
    from napari_usguide._reader import layers_have_units, read_scan

    if need_units and not layers_have_units():
        pytest.skip("napari < 0.6 has no layer units")
    data, kwargs, _ = read_scan(str(TEST_DATA / "dicom" / "OBXXXX1A_rle_2frame.dcm"))[0]
    return viewer.add_image(data, **kwargs)


@pytest.fixture
def unit_warnings() -> Iterator[list[str]]:
    """napari's "Inconsistent units" warnings while the test runs. napari checks the layers'
    units each time it draws (adding or removing a layer draws at once) and reports a mix as a
    notification, not a Python warning: the notifications are listened to."""
    from napari.utils.notifications import notification_manager

    found: list[str] = []

    def record(notification: Any) -> None:
        if "units" in str(notification.message).lower():
            found.append(str(notification.message))

    notification_manager.notification_ready.connect(record)
    yield found
    notification_manager.notification_ready.disconnect(record)
