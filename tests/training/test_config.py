"""The training config's checks: torch-free, so they run where torch is not installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from usguide.data.needle_render import NEEDLE_BRIGHTNESS
from usguide.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]


def load(tmp_path: Path, text: str) -> TrainConfig:
    toml = tmp_path / "train.toml"
    toml.write_text(text + "\n")
    return TrainConfig.from_toml(toml)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('quantize = "false"', 'quantize: expected true or false, got "false"'),
        ('needle_varied_look = "no"', "needle_varied_look: expected true or false"),
        ('datasets = "usgra-seg"', "datasets: expected a list of strings"),
        ("datasets = [1]", "datasets: expected a list of strings"),
        ('input_size = "256"', "input_size: expected a list of 2 integers"),
        ("input_size = 256", "input_size: expected a list of 2 integers"),
        ("input_size = [256, 256, 3]", "input_size: expected a list of 2 integers"),
        ("input_size = [256.0, 256]", "input_size: expected a list of 2 integers"),
        ("channels = [16, 32, 64]", "channels: expected a list of 4 integers"),
        ('epochs = "1"', 'epochs: expected an integer, got "1"'),
        ("epochs = 2.5", "epochs: expected an integer"),
        ("seed = true", "seed: expected an integer, got true"),
        ('seed = "0"', "seed: expected an integer"),
        ('split_seed = "0"', "split_seed: expected an integer .or leave it out."),
        ('lr = "0.003"', "lr: expected a finite number"),
        ("lr = nan", "lr: expected a finite number"),
        ("lr = inf", "lr: expected a finite number"),
        ("needle_probability = true", "needle_probability: expected a finite number"),
        ('needle_angle_range_deg = [5, "60"]', "needle_angle_range_deg: expected a list of 2"),
        ('normalisation = "zscore"', "normalisation: expected a table"),
        ("data_root = 3", "data_root: expected a string"),
        # out of range
        ("needle_probability = 5.0", "needle_probability: expected a value in .0, 1., got 5.0"),
        ("injectate_probability = -0.1", "injectate_probability: expected a value in .0, 1."),
        ("sector_probability = 1.5", "sector_probability: expected a value in .0, 1."),
        ("val_fraction = 1.5", "val_fraction: expected a value in .0, 1.,"),
        ("val_fraction = 1.0", "val_fraction: expected a value in .0, 1.,"),
        ("batch_size = 0", "batch_size: expected a value >= 1, got 0"),
        ("epochs = 0", "epochs: expected a value >= 1, got 0"),
        ("threads = 0", "threads: expected a value >= 1"),
        ("max_samples = 0", "max_samples: expected a value >= 1"),
        ("lr = 0", "lr: expected a value > 0"),
        ("weight_average_decay = 1", "weight_average_decay: expected a value in .0, 1.,"),
        ("weight_average_decay = 0", "weight_average_decay: expected a value in .0, 1.,"),
        ("weight_decay = -1e-4", "weight_decay: expected a value >= 0"),
        ("seed = -1", "seed: expected a value in .0, 4294967295."),
        ("input_size = [0, 256]", "input_size: expected each value >= 16, got .0, 256."),
        ("channels = [16, 0, 64, 128]", "channels: expected each value >= 1"),
        ("depth = [1, -1, 3, 3]", "depth: expected each value >= 0"),
        ("needle_min_length_mm = 0", "needle_min_length_mm: expected a value > 0"),
        ("needle_angle_range_deg = [60, 10]", "needle_angle_range_deg: expected .low, high."),
        ("needle_angle_range_deg = [10, 120]", "needle_angle_range_deg: expected each value in"),
        ("datasets = []", "datasets: expected at least one data set"),
        ('name = ""', "name: expected a non-empty string"),
        ('datasets = ["usgra-seg", ""]', "datasets: expected a non-empty string"),
        ('init_weights = "no/such/weights.pt"', "init_weights: no/such/weights.pt: no such file"),
    ],
)
def test_a_setting_of_the_wrong_type_or_out_of_range_is_refused_naming_the_key(
    tmp_path: Path, line: str, expected: str
) -> None:
    with pytest.raises(ValueError, match=f"^{tmp_path / 'train.toml'}: {expected}"):
        load(tmp_path, line)


def test_settings_are_checked_when_built_in_code_too() -> None:
    with pytest.raises(ValueError, match="^batch_size: expected a value >= 1, got 0$"):
        TrainConfig(batch_size=0)
    config = TrainConfig()
    config.quantize = "false"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="^quantize: expected true or false"):
        config.validate()  # what train() runs first


def test_settings_are_brought_to_their_types(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "input_size = [64, 32]\nlr = 1\nneedle_angle_range_deg = [5, 60]\n"
        'datasets = ["usgra-seg"]\nsplit_seed = 4\nquantize = false',
    )
    assert config.input_size == (64, 32) and isinstance(config.input_size, tuple)
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.needle_angle_range_deg == (5.0, 60.0)
    assert config.datasets == ("usgra-seg",)
    assert (config.split_seed, config.validation_seed, config.quantize) == (4, 4, False)
    assert TrainConfig() == TrainConfig(**{})  # the defaults pass their own checks


def test_a_message_is_one_line_naming_file_and_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        load(tmp_path, 'epochs = "1"')
    assert "\n" not in str(info.value)
    assert str(info.value) == f'{tmp_path / "train.toml"}: epochs: expected an integer, got "1"'


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"train\.toml: not valid TOML"):
        load(tmp_path, "epochs = ")


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('{ mode = "zscore", min_std = -1 }', "normalisation: min_std must be a positive number"),
        ('{ mode = "scale", mean = 0.5, std = "0.25" }', "normalisation: std must be a positive"),
        ('{ mode = "scale", std = 0.25 }', "normalisation: mean must be a finite number"),
        ('{ mode = "scale", mean = 0.5, std = true }', "normalisation.std: expected a number"),
        ('{ mode = "minmax" }', "normalisation: unknown mode 'minmax'"),
        ('{ mode = "zscore", histogram_match = 2 }', "histogram_match must be a number from 0"),
        ('{ mode = "zscore", histogram_match = true }', "normalisation.histogram_match: expected"),
        ("{}", "normalisation: unknown mode None"),
        (
            '{ mode = "zscore", minstd = 0.1 }',
            r"normalisation: unknown keys \['minstd'\] \(allowed: mode, mean, std, min_std, "
            r"histogram_match, histogram_reference\)",
        ),
    ],
)
def test_a_normalisation_the_runtime_would_refuse_is_refused(
    tmp_path: Path, table: str, expected: str
) -> None:
    with pytest.raises(ValueError, match=expected):
        load(tmp_path, f"normalisation = {table}")


@pytest.mark.parametrize(
    "table",
    [
        '{ mode = "zscore" }',
        '{ mode = "zscore", min_std = 0.05 }',
        '{ mode = "scale", mean = 0.5, std = 0.25 }',
        '{ mode = "zscore", histogram_match = 0.5 }',  # the run computes the reference
    ],
)
def test_a_normalisation_the_runtime_reads_is_kept(tmp_path: Path, table: str) -> None:
    assert load(tmp_path, f"normalisation = {table}").normalisation["mode"] in ("zscore", "scale")


def test_a_brightness_range_needs_the_varied_look(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needle_brightness_range: .*needle_varied_look = true"):
        load(tmp_path, "needle_brightness_range = [0.6, 0.8]")
    with pytest.raises(ValueError, match="needle_varied_look = true"):
        TrainConfig(needle_brightness_range=(0.6, 0.8))
    with_look = load(tmp_path, "needle_varied_look = true\nneedle_brightness_range = [0.6, 0.8]")
    assert with_look.needle_brightness_range == (0.6, 0.8)
    # The default range written out, or the look off by default, still load.
    low, high = NEEDLE_BRIGHTNESS
    assert load(tmp_path, f"needle_brightness_range = [{low}, {high}]").needle_varied_look is False
    with pytest.raises(ValueError, match="needle_brightness_range: expected .low, high."):
        load(tmp_path, "needle_varied_look = true\nneedle_brightness_range = [0.8, 0.6]")


def test_the_repository_training_configs_load() -> None:
    configs = sorted((REPO / "models").rglob("*.toml"))
    assert configs  # models/usguide-seg/train.toml at least
    for path in configs:
        config = TrainConfig.from_toml(path)
        assert config.epochs >= 1 and config.datasets


def test_the_config_module_loads_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any import of torch now fails
        "from usguide.training.config import TrainConfig; TrainConfig()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_cli_reports_a_bad_config_in_one_line_with_exit_code_2(tmp_path: Path) -> None:
    pytest.importorskip("torch")  # without it the command stops earlier: needs the train extra
    toml = tmp_path / "train.toml"
    for line in ('quantize = "false"', "epochs = 0", 'normalisation = { mode = "x" }'):
        toml.write_text(line + "\n")
        result = subprocess.run(
            [sys.executable, "-m", "usguide.cli", "train", "--config", str(toml)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert "Traceback" not in result.stderr
