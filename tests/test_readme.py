"""The README's fresh-machine commands and CI stay in step, and the core stays free of Qt/torch."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO_ROOT


def _bash_blocks() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command() -> None:
    test_command = next(b.strip() for b in _bash_blocks() if "pytest" in b)
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()


def test_readme_main_command_is_the_demo_on_its_bundled_sample() -> None:
    main = next(b.strip() for b in _bash_blocks() if "usguide " in b and "pytest" not in b)
    assert main.endswith("usguide demo")
    from usguide.demo import DEMO_IMAGE, DEMO_MASK

    assert DEMO_IMAGE.exists() and DEMO_MASK.exists()
    assert (DEMO_IMAGE.parent / "LICENSE").exists()


def test_import_is_cheap_and_free_of_gui_and_torch() -> None:
    code = (
        "import sys, usguide, usguide.sources, usguide.cli;"
        "bad = [m for m in ('torch', 'napari', 'PyQt5', 'qtpy', 'PySide6', 'pydicom', 'cv2')"
        " if m in sys.modules]; print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
