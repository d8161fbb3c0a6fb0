"""A path field with a button that fills it from a file or folder dialog, for every widget."""

from __future__ import annotations

from qtpy.QtWidgets import QFileDialog, QHBoxLayout, QLineEdit, QPushButton, QWidget


def path_row(parent: QWidget, edit: QLineEdit, *, folder: bool, caption: str) -> QHBoxLayout:
    """``edit`` followed by a "…" button; the chosen path replaces the text (cancel keeps it).

    Parameters
    ----------
    parent : QWidget
        The dialog's parent.
    edit : QLineEdit
        Where the path goes; typing a path stays possible.
    folder : bool
        Choose a folder (a dataset, a session, an image folder) rather than a file.
    caption : str
        The dialog's title.
    """

    def choose() -> None:
        start = edit.text().strip()
        if folder:
            path = QFileDialog.getExistingDirectory(parent, caption, start)
        else:
            path, _ = QFileDialog.getOpenFileName(parent, caption, start)
        if path:
            edit.setText(path)

    button = QPushButton("…")
    button.setToolTip(caption)
    button.setObjectName("browse")
    button.clicked.connect(choose)
    row = QHBoxLayout()
    row.addWidget(edit)
    row.addWidget(button)
    return row
