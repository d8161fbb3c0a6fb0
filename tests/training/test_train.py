"""A tiny training run end to end (skipped without torch): loss, export, metadata, runtime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from usguide.segment import Segmenter, histogram_reference, normalise, open_model  # noqa: E402
from usguide.training.loss import marginal_cross_entropy, soft_dice_loss  # noqa: E402
from usguide.training.model import SegNet  # noqa: E402
from usguide.training.train import (  # noqa: E402
    Batches,
    TrainConfig,
    load_samples,
    load_weights,
    save_weights,
    train,
    update_average,
)

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "usgra-seg"


def test_marginal_loss_never_teaches_unlabelled_class_as_background() -> None:
    logits = torch.zeros(1, 5, 2, 2)
    logits[0, 3] = 5.0  # confident "fascia" everywhere
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    labelled_fascia = torch.tensor([[True, True, True, True, True]])
    no_fascia_label = torch.tensor([[True, True, True, False, True]])
    wrong = marginal_cross_entropy(logits, target, labelled_fascia)
    free = marginal_cross_entropy(logits, target, no_fascia_label)
    assert free < 0.05 < wrong  # fascia where fascia is unlabelled costs (almost) nothing
    target[0, 0, 0] = 1
    missed = soft_dice_loss(logits, target, no_fascia_label)
    found = logits.clone()
    found[0, 1, 0, 0] = 10.0  # nerve where the nerve is
    assert float(soft_dice_loss(found, target, no_fascia_label)) < float(missed) - 0.1


@pytest.fixture
def mirror(tmp_path: Path) -> Path:
    """A data mirror holding the USGRA-Seg samples only."""
    root = tmp_path / "mirror"
    shutil.copytree(SAMPLES, root / "usgra-seg")
    return root


def tiny(tmp_path: Path, mirror: Path, **settings: Any) -> TrainConfig:
    """A run of a few seconds on the USGRA-Seg samples, exported unquantised to tmp/model."""
    defaults: dict[str, Any] = dict(input_size=(64, 64), epochs=1, batch_size=2, quantize=False)
    return TrainConfig(
        datasets=("usgra-seg",),
        data_root=str(mirror),
        out=str(tmp_path / "model"),
        **{**defaults, **settings},
    )


def test_tiny_training_run_exports_a_working_model(tmp_path: Path, mirror: Path) -> None:
    path = train(tiny(tmp_path, mirror, epochs=2, seed=1), log=lambda _: None)
    seg = Segmenter(path)
    assert seg.info.input_size == (64, 64)
    labels = seg(np.random.default_rng(0).integers(0, 255, (100, 120), np.uint8))
    assert labels.shape == (100, 120)
    assert (tmp_path / "model" / "metadata.json").exists()


def test_histogram_matching_stores_the_training_images_reference(
    tmp_path: Path, mirror: Path
) -> None:
    """The run computes the reference grey levels from its training images and exports them, so
    the runtime matches frames to what the model learnt on."""
    config = tiny(tmp_path, mirror, normalisation={"mode": "zscore", "histogram_match": 0.5})
    normalisation = Segmenter(train(config, log=lambda _: None)).info.normalisation
    reference = normalisation["histogram_reference"]
    assert normalisation["histogram_match"] == 0.5
    assert len(reference) == 100 and reference == sorted(reference)
    # Nerve-block scans are mostly dark: the median grey level lies in the lower half.
    assert 4 <= reference[0] < reference[50] < 128 < reference[-1] <= 255


def test_histogram_matching_leaves_the_training_input_as_it_was(
    tmp_path: Path, mirror: Path
) -> None:
    """Only the runtime matches histograms: the network trains on the same input with the
    setting as without it, so the setting can be added to a recipe without changing what the
    network learns on."""
    plain = tiny(tmp_path, mirror)
    matched = tiny(tmp_path, mirror, normalisation={"mode": "zscore", "histogram_match": 0.5})
    samples, _ = load_samples(plain, log=lambda _: None)
    matched.normalisation["histogram_reference"] = histogram_reference(s.image for s in samples)
    first = [
        next(Batches(samples, config).epoch(np.random.default_rng(3)))[0]
        for config in (plain, matched)
    ]
    assert torch.equal(first[0], first[1])
    x = np.empty(samples[0].image.shape, np.float32)
    y = np.empty_like(x)
    normalise(samples[0].image, plain.normalisation, x)
    normalise(samples[0].image, matched.normalisation, y)
    assert not np.allclose(x, y, atol=0.05)  # at run time the setting does change the input


def test_the_weight_average_follows_the_weights_and_forgets_the_start() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    averaged = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    for p in (*averaged.parameters(), *averaged.buffers()):
        p.data.zero_()
    for p in model.parameters():
        p.data.fill_(1.0)
    model[1].running_mean.fill_(1.0)
    model[1].num_batches_tracked.fill_(7)
    update_average(averaged, model, decay=0.99, step=1000)
    # Late in the run each step moves the average 1 % of the way to the weights.
    assert torch.allclose(averaged[0].weight, torch.full_like(averaged[0].weight, 0.01))
    assert torch.allclose(averaged[1].running_mean, torch.full((2,), 0.01))
    assert int(averaged[1].num_batches_tracked) == 7  # counts are copied, not averaged
    update_average(averaged, model, decay=0.99, step=0)
    # The first step keeps only a tenth of the (random) starting weights.
    assert torch.allclose(averaged[0].bias, torch.full_like(averaged[0].bias, 0.901), atol=1e-6)


def test_a_weight_averaged_run_keeps_the_average_and_records_both(
    tmp_path: Path, mirror: Path
) -> None:
    config = tiny(tmp_path, mirror, epochs=2, weight_average_decay=0.9)
    seg = Segmenter(train(config, log=lambda _: None))
    history = json.loads((tmp_path / "model" / "training_history.json").read_text())
    assert all("val_as_trained" in epoch for epoch in history)
    assert seg(np.zeros((80, 90), np.uint8)).shape == (80, 90)


def test_a_run_saves_the_weights_it_exports_and_a_later_run_starts_from_them(
    tmp_path: Path, mirror: Path
) -> None:
    first = tiny(tmp_path / "first", mirror, epochs=3)
    exported = train(first, log=lambda _: None)
    weights = Path(first.out) / "weights.pt"
    net = SegNet(5, first.channels, first.depth)
    load_weights(net, first, weights)
    net.eval()
    x = np.random.default_rng(0).normal(size=(1, 1, 64, 64)).astype(np.float32)
    with torch.no_grad():
        from_weights = net(torch.from_numpy(x)).numpy()
    _, runner = open_model(exported, engine="onnxruntime")
    assert np.allclose(from_weights, runner.run(x)[0], atol=1e-4)  # the weights are the model's

    said: list[str] = []
    resumed = tiny(tmp_path / "resumed", mirror, init_weights=str(weights))
    train(resumed, log=said.append)
    assert any("starting from the weights of usguide-seg" in line for line in said)
    fresh = tiny(tmp_path / "fresh", mirror)
    train(fresh, log=lambda _: None)
    losses = [
        json.loads((Path(c.out) / "training_history.json").read_text())[0]["loss"]
        for c in (resumed, fresh)
    ]
    # The same data and batches: a start from trained weights fits them better.
    assert losses[0] < losses[1]


def test_the_shipped_weights_are_the_shipped_model() -> None:
    """models/usguide-seg/weights.pt, which fine-tuning starts from, is model_fp32.onnx."""
    folder = Path(__file__).resolve().parents[2] / "models" / "usguide-seg"
    config = TrainConfig.from_toml(folder / "train.toml")
    net = SegNet(5, config.channels, config.depth)
    assert load_weights(net, config, folder / "weights.pt") == f"usguide-seg {config.version}"
    net.eval()
    x = np.random.default_rng(1).normal(size=(1, 1, *config.input_size)).astype(np.float32)
    with torch.no_grad():
        from_weights = net(torch.from_numpy(x)).numpy()
    _, runner = open_model(folder / "model_fp32.onnx", engine="onnxruntime")
    assert np.allclose(from_weights, runner.run(x)[0], atol=1e-3)


def test_weights_for_another_network_or_not_weights_are_refused(tmp_path: Path) -> None:
    config = TrainConfig(channels=(8, 16, 32, 64), depth=(1, 1, 1, 1))
    path = tmp_path / "weights.pt"
    save_weights(SegNet(5, config.channels, config.depth), config, path)
    other = TrainConfig(channels=(8, 16, 32, 48), depth=(1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"weights.pt: saved for channels = \[8, 16, 32, 64\]"):
        load_weights(SegNet(5, other.channels, other.depth), other, path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a weights file"):
        load_weights(SegNet(5, config.channels, config.depth), config, junk)
    torch.save({"state_dict": {}}, junk)
    with pytest.raises(ValueError, match="junk.pt: not a usguide weights file"):
        load_weights(SegNet(5, config.channels, config.depth), config, junk)


def test_a_training_split_smaller_than_a_batch_is_refused_before_training(
    tmp_path: Path, mirror: Path
) -> None:
    config = TrainConfig(
        input_size=(64, 64),
        epochs=1,
        batch_size=8,
        max_samples=3,
        datasets=("usgra-seg",),
        data_root=str(mirror),
        out=str(tmp_path / "model"),
    )
    with pytest.raises(ValueError, match="training split holds 3 samples, .*batch_size = 8"):
        train(config, log=lambda _: None)
    assert not (tmp_path / "model").exists()  # no model of starting weights


def test_train_checks_settings_changed_after_the_config_was_built(tmp_path: Path) -> None:
    config = TrainConfig(out=str(tmp_path / "model"))
    config.epochs = 0
    with pytest.raises(ValueError, match="^epochs: expected a value >= 1, got 0$"):
        train(config, log=lambda _: None)


def test_needle_settings_reach_the_renders(tmp_path: Path) -> None:
    from usguide.training.train import Prepared, with_needle

    toml = tmp_path / "train.toml"
    toml.write_text("needle_angle_range_deg = [3.0, 6.0]\nneedle_min_length_mm = 20.0\n")
    config = TrainConfig.from_toml(toml)
    assert config.needle_angle_range_deg == (3.0, 6.0)
    native = np.full((300, 300), 60, np.uint8)
    sample = Prepared(
        native[:64, :64], native[:64, :64] * 0, np.ones(5, bool), "flat", native, 0 * native
    )
    rng = np.random.default_rng(0)
    for _ in range(5):
        _, mask = with_needle(
            sample,
            rng,
            (150, 150),
            min_length_mm=config.needle_min_length_mm,
            angle_range_deg=config.needle_angle_range_deg,
        )
        rows, cols = np.nonzero(mask == 4)
        # Principal axis of the drawn shaft (half-size square: angles are kept).
        cov = np.cov(np.stack([cols, rows]).astype(float))
        _, v = np.linalg.eigh(cov)
        angle = np.degrees(np.arctan2(abs(v[1, 1]), abs(v[0, 1])))
        assert angle < 9.0  # 3-6 degrees drawn, a few px of shaft width allowed
        # 20 mm at 0.1 mm/px, halved; random_pose may shorten it by a few % when a pose misfits.
        assert cols.max() - cols.min() >= 0.8 * 0.5 * 20.0 / 0.1


def test_varied_look_changes_the_needle_not_its_mask(tmp_path: Path) -> None:
    from usguide.training.train import Prepared, with_needle

    toml = tmp_path / "train.toml"
    toml.write_text("needle_varied_look = true\nneedle_brightness_range = [0.6, 0.8]\n")
    config = TrainConfig.from_toml(toml)
    assert config.needle_varied_look and config.needle_brightness_range == (0.6, 0.8)
    native = np.random.default_rng(1).integers(20, 120, (300, 300)).astype(np.uint8)
    sample = Prepared(
        native[:64, :64], 0 * native[:64, :64], np.ones(5, bool), "s", native, 0 * native
    )
    plain = with_needle(sample, np.random.default_rng(4), (128, 128))
    varied = with_needle(sample, np.random.default_rng(4), (128, 128), varied_look=True)
    assert np.array_equal(plain[1], varied[1])  # same pose, same exact label
    assert not np.array_equal(plain[0], varied[0])  # another look of the same needle


def test_split_seed_fixes_the_validation_split_whatever_the_seed(tmp_path: Path) -> None:
    toml = tmp_path / "train.toml"
    toml.write_text("seed = 1\nsplit_seed = 0\n")
    config = TrainConfig.from_toml(toml)
    assert (config.seed, config.validation_seed) == (1, 0)
    assert TrainConfig(seed=3).validation_seed == 3


def test_injectate_probability_is_read_from_the_config(tmp_path: Path) -> None:
    toml = tmp_path / "train.toml"
    toml.write_text("injectate_probability = 0.3\n")
    assert TrainConfig.from_toml(toml).injectate_probability == 0.3


def test_sector_samples_are_fans_with_nothing_labelled_beside_them(tmp_path: Path) -> None:
    from usguide.data.augment import UltrasoundAugment
    from usguide.training.train import Batches, Prepared

    toml = tmp_path / "train.toml"
    toml.write_text("sector_probability = 1.0\nneedle_probability = 1.0\n")
    config = TrainConfig.from_toml(toml)
    config.input_size, config.batch_size = (64, 64), 4
    native = np.random.default_rng(2).integers(30, 200, (300, 320)).astype(np.uint8)
    nerve = np.ones_like(native)  # every pixel nerve: what is left of it shows the fan
    sample = Prepared(native[:64, :64], nerve[:64, :64], np.ones(5, bool), "s", native, nerve)
    batches = Batches([sample] * 4, config)
    batches.augment = UltrasoundAugment([])  # the fan alone, not moved by the usual chain
    _, y, _ = next(batches.epoch(np.random.default_rng(0)))
    y = y.numpy()
    assert set(np.unique(y)) <= {0, 1, 4}
    assert (y[:, 0, 0] == 0).all() and (y[:, 0, -1] == 0).all()  # beside the fan's top
    # The fan's centre line is imaged from below the near arc's dip to the bottom.
    assert (y[:, 20:, 32] > 0).all()
    assert (y == 4).any()  # needles are drawn into the fans


def test_scanner_looks_reach_the_augmentation(tmp_path: Path) -> None:
    from usguide.data.augment import EdgeEnhance, GreyMap
    from usguide.training.train import Batches

    toml = tmp_path / "train.toml"
    toml.write_text("scanner_looks = true\n")
    config = TrainConfig.from_toml(toml)
    kinds = {type(t) for t in Batches([], config).augment.transforms}
    assert {GreyMap, EdgeEnhance} <= kinds
    assert not {GreyMap, EdgeEnhance} & {
        type(t) for t in Batches([], TrainConfig()).augment.transforms
    }
