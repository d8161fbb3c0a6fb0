"""The widget's engine without Qt: frames in order, seeking, real-time skipping, targets; and
the same engine in a child process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari_usguide")

from napari_usguide._engine import GuidanceEngine, GuidanceProcess, PipelineProcessError

from usguide.demo import DemoScan, DemoScript
from usguide.errors import SourceNotFoundError
from usguide.pipeline import Pipeline


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline()


def _engine(pipeline: Pipeline, frames: int = 12, **kwargs: bool) -> GuidanceEngine:
    pipeline.reset()
    script = DemoScript(needle_from=2, arrive=8, inject_from=10, frames=frames)
    return GuidanceEngine(DemoScan(script=script), pipeline, **kwargs)


@pytest.mark.parametrize("segment_ahead", [False, True])
def test_every_frame_in_order_with_copies_the_gui_can_keep(
    pipeline: Pipeline, segment_ahead: bool
) -> None:
    engine = _engine(pipeline, segment_ahead=segment_ahead)
    try:
        results = list(engine.play(realtime=False))
        assert [r.index for r in results] == list(range(12))
        assert [r.seq for r in results] == list(range(1, 13))
        assert engine.at_end and engine.newest() is results[-1]
        # Each result owns its buffers: the pipeline reuses its overlay for the next frame.
        assert len({id(r.overlay) for r in results}) == 12
        assert not np.array_equal(results[0].overlay, results[-1].overlay)
        assert results[-1].needle is not None and results[-1].needle.visible
        assert engine.step() is None
        assert engine.seek(5).index == 5 and engine.next_index == 6
        assert engine.step().index == 6
    finally:
        engine.close()


def test_real_time_leaves_out_what_it_cannot_keep_up_with(pipeline: Pipeline) -> None:
    engine = _engine(pipeline, frames=40)
    try:
        start = time.perf_counter()
        results = list(engine.play(realtime=True))
        wall = time.perf_counter() - start
        assert wall >= 0.9 * 39 * engine.frame_time_s  # never faster than the scan
        assert len(results) + engine.source_skipped == 40
        assert [r.index for r in results] == sorted(r.index for r in results)
    finally:
        engine.close()


def test_targets_and_stop(pipeline: Pipeline) -> None:
    engine = _engine(pipeline)
    try:
        target = engine.add_target((300.0, 200.0))
        assert engine.move_target(target, (310.0, 205.0)) == target
        assert {t.id: t.xy for t in engine.targets()}[target] == (310.0, 205.0)
        assert engine.move_target(9999, (1.0, 2.0)) != 9999  # gone: added again
        engine.delete_target(target)
        engine.delete_target(target)  # twice: no error
        assert target not in {t.id for t in engine.targets()}
        seen = list(engine.play(realtime=False, should_stop=lambda: engine.next_index >= 3))
        assert [r.index for r in seen] == [0, 1, 2]
        engine.restart()
        assert engine.next_index == 0
    finally:
        engine.close()


# -- the same engine in a child process (what the widget uses) -----------------------------------


@pytest.fixture(scope="module")
def remote() -> Iterator[GuidanceProcess]:
    engine = GuidanceProcess.open("demo")
    yield engine
    engine.close()


def test_child_process_gives_what_this_process_gives(remote: GuidanceProcess) -> None:
    local = GuidanceEngine.open("demo")
    try:
        assert (remote.frame_count, remote.shape) == (local.frame_count, local.shape)
        assert remote.spacing_mm == local.spacing_mm and remote.frame_time_s == local.frame_time_s
        remote.restart()
        stop_at = 4
        here = list(local.play(realtime=False, should_stop=lambda: local.next_index >= stop_at))
        there = list(remote.play(realtime=False, should_stop=lambda: remote.next_index >= stop_at))
        assert [r.index for r in there] == [r.index for r in here] == list(range(stop_at))
        assert remote.next_index == stop_at and remote.newest() is there[-1]
        for a, b in zip(here, there, strict=True):
            assert np.array_equal(a.pixels, b.pixels)
            assert (a.labels == b.labels).mean() > 0.999  # same model, same frames
            assert a.overlay is not None and b.overlay is not None
            assert a.overlay.shape == b.overlay.shape
        assert np.array_equal(remote.read_pixels(3), local.read_pixels(3))
        assert remote.seek(100).index == 100 and remote.next_index == 101
        assert remote.step().index == 101
    finally:
        local.close()


def test_the_engine_in_this_process_answers_every_call_of_the_child_s() -> None:
    # The widget drives either (benchmarks/napari_display.py runs it on this process's engine):
    # a property only the child's engine had ended napari with an AttributeError.
    missing = {n for n in dir(GuidanceProcess) if not n.startswith("_")} - set(dir(GuidanceEngine))
    assert not missing
    local = GuidanceEngine.open("demo")
    assert not local.closed
    local.close()
    assert local.closed


def test_child_process_targets(remote: GuidanceProcess) -> None:
    target = remote.add_target((300.0, 200.0))
    assert remote.move_target(target, (310.0, 205.0)) == target
    assert {t.id: t.xy for t in remote.targets()}[target] == (310.0, 205.0)
    remote.delete_target(target)
    assert target not in {t.id for t in remote.targets()}


def test_child_process_errors_are_raised_here(tmp_path: Path) -> None:
    missing = tmp_path / "missing.dcm"
    with pytest.raises(SourceNotFoundError, match=r"missing\.dcm"):
        GuidanceProcess.open(missing)
    engine = GuidanceProcess.open("demo")
    try:
        with pytest.raises(AttributeError, match="no remote call"):
            engine._call("close_everything")
        engine._process.kill()  # a crashed child: a clear error, not a hang
        with pytest.raises(PipelineProcessError, match="pipeline process ended"):
            engine.process(0)
        # Not a RuntimeError (superqt's generator worker ends silently on one); the child is
        # reaped, not left a zombie, and the engine says it is closed.
        assert not issubclass(PipelineProcessError, RuntimeError)
        assert engine.closed and engine._process.returncode is not None
    finally:
        engine.close()
    with pytest.raises(PipelineProcessError, match="closed"):
        engine.targets()


def test_child_process_ends_with_close_or_when_its_parent_goes() -> None:
    engine = GuidanceProcess.open("demo")
    engine.close()
    assert engine._process.returncode == 0
    orphan = GuidanceProcess.open("demo")
    orphan._conn.close()  # as when this process dies: the child reads end of file
    assert orphan._process.wait(30) == 0


def test_a_scan_without_frame_time_gets_guidance(tmp_path: Path) -> None:
    """An image folder has no frame time: the guidance stage takes the config's default."""
    import shutil

    from conftest import TEST_DATA

    for name in ("0002.png", "0023.png"):
        shutil.copy(TEST_DATA / "usgra-seg" / "images" / name, tmp_path / name)
    engine = GuidanceEngine.open(tmp_path)
    try:
        assert engine.frame_time_s is None
        published = engine.process(0)
        assert "guidance" not in published.errors, published.errors
        assert published.guidance is not None
    finally:
        engine.close()
