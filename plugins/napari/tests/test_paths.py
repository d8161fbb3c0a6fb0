"""The path fields' "…" buttons fill the field from a dialog; cancelling keeps what was typed."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("pytestqt")

from napari_usguide._paths import path_row
from qtpy.QtWidgets import QFileDialog, QLineEdit, QWidget


def _button(row: Any) -> Any:
    return next(
        row.itemAt(i).widget()
        for i in range(row.count())
        if row.itemAt(i).widget().objectName() == "browse"
    )


@pytest.mark.parametrize("folder", [False, True])
def test_browse_fills_the_field_and_cancel_keeps_it(
    qtbot: Any, monkeypatch: Any, folder: bool
) -> None:
    parent = QWidget()
    qtbot.addWidget(parent)
    edit = QLineEdit("typed/path")
    row = path_row(parent, edit, folder=folder, caption="Choose")
    answers = ["/data/scan.dcm", ""]
    asked: list[str] = []

    def file_dialog(_parent: Any, caption: str, start: str) -> tuple[str, str]:
        asked.append(start)
        return answers.pop(0), ""

    def folder_dialog(_parent: Any, caption: str, start: str) -> str:
        asked.append(start)
        return answers.pop(0)

    monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(file_dialog))
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", staticmethod(folder_dialog))
    _button(row).click()
    assert edit.text() == "/data/scan.dcm"
    _button(row).click()  # cancelled
    assert edit.text() == "/data/scan.dcm"
    assert asked == ["typed/path", "/data/scan.dcm"]  # the dialog opens where the field points
