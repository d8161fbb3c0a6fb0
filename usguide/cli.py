"""The ``usguide`` command line.

Every error on bad input is one line naming the file and the reason, with exit code 2 and no
traceback. Nothing printed here comes from patient-identifying header fields.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from usguide._version import __version__
from usguide.errors import UsguideError

app = typer.Typer(
    name="usguide",
    help="Ultrasound-guided needle targeting, frame by frame. Not a medical device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # reflow docstring paragraphs to the terminal's width
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _version(value: bool) -> None:
    if value:
        out.print(f"usguide {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """usguide: capture, segment, track the needle and guide, on ultrasound frames."""


@contextmanager
def user_errors(kept: Callable[[], str | None] | None = None) -> Iterator[None]:
    """Turn usguide's typed errors into one line and exit code 2; show warnings as one line.
    ``kept`` says, after the error, what the command had already written (None: nothing)."""

    def show(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
        err.print(f"[yellow]warning:[/] {message}", soft_wrap=True)

    previous = warnings.showwarning
    warnings.showwarning = show  # type: ignore[assignment]
    try:
        yield
    except (UsguideError, ValueError, OSError) as e:
        # UsguideError: bad input; ValueError: option values the sources reject (spacing,
        # region); OSError: the file system (an output path that is a folder, a full disk).
        message = str(e)
        if isinstance(e, OSError) and not isinstance(e, UsguideError):
            reason = e.strerror or str(e)
            message = f"{e.filename}: {reason}" if e.filename is not None else reason
        err.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)
        note = kept() if kept is not None else None
        if note:
            err.print(escape(note), soft_wrap=True)
        raise typer.Exit(2) from None
    finally:
        warnings.showwarning = previous


def parse_numbers(text: str | None, count: tuple[int, ...], name: str) -> list[float] | None:
    """Parse ``"0.1"`` or ``"0.1,0.2"`` style option values."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise typer.BadParameter(
            f"{name} takes numbers separated by commas, got {text!r}"
        ) from None
    if len(values) not in count:
        raise typer.BadParameter(f"{name} takes {' or '.join(map(str, count))} numbers")
    return values


SpacingOption = Annotated[
    str | None,
    typer.Option(
        "--spacing-mm",
        help="Millimetres per pixel, one number or ROW,COL; overrides the file's calibration.",
    ),
]
RegionOption = Annotated[
    str | None,
    typer.Option(
        "--region",
        help="Imaging rectangle X0,Y0,X1,Y1 in pixels (inclusive); overrides the file's.",
    ),
]
DetectOption = Annotated[
    bool,
    typer.Option(
        "--detect-region/--no-detect-region",
        help="Find the imaging area in the pixels when the file gives none.",
    ),
]


def source_options(spacing: str | None, region: str | None, detect: bool) -> dict[str, Any]:
    spacing_values = parse_numbers(spacing, (1, 2), "--spacing-mm")
    region_values = parse_numbers(region, (4,), "--region")
    return {
        "spacing_mm": spacing_values
        if spacing_values is None or len(spacing_values) == 2
        else spacing_values[0],
        "region": tuple(int(v) for v in region_values) if region_values else None,
        "detect_region": detect,
    }


def make_progress() -> Any:
    """A rich progress bar on stderr for long work; it disappears when done."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )


def _fmt_spacing(spacing: Any) -> str:
    if spacing is None:
        return "unknown (distances in px)"
    row, col = spacing
    return f"{row:.4f} x {col:.4f} mm/px (row x col)"


@app.command()
def info(
    path: Annotated[str, typer.Argument(help="DICOM, video, image file or folder, or device.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    check: Annotated[
        bool, typer.Option("--check", help="Decode every frame to prove the file is whole.")
    ] = False,
    spacing: SpacingOption = None,
    region: RegionOption = None,
    detect: DetectOption = True,
) -> None:
    """Print what a source holds: frames, size, rate, regions, mm spacing, encoding.

    No patient identifiers are read out.
    """
    from usguide.sources import open_source

    with user_errors(), open_source(path, **source_options(spacing, region, detect)) as source:
        summary = source.info()
        decoded = _decode_all(source, summary.frames) if check else None
    data = summary.to_dict()
    if decoded is not None:
        data["frames_decoded"] = decoded
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    rate = summary.frame_rate_hz
    rows: list[tuple[str, str]] = [
        ("source", summary.source),
        ("kind", summary.kind),
        ("frames", "unknown (live)" if summary.frames is None else str(summary.frames)),
        ("size", f"{summary.columns} x {summary.rows} px (width x height)"),
        (
            "rate",
            "unknown"
            if rate is None
            else f"{rate:.2f} frames/s ({1000 * summary.frame_time_s:.2f} ms per frame)",  # type: ignore[operator]
        ),
        ("spacing", _fmt_spacing(summary.spacing_mm)),
        ("encoding", summary.encoding),
        ("colour", summary.colour),
    ]
    for i, r in enumerate(summary.regions):
        state = "valid" if r.valid else "INVALID"
        note = f"; {r.note}" if r.note else ""
        rows.append(
            (
                f"region {i}",
                f"{list(r.bbox)} {state}, {r.origin}, {_fmt_spacing(r.spacing_mm)}{note}",
            )
        )
    for key, value in summary.details.items():
        if value is not None:
            rows.append((key.replace("_", " "), str(value)))
    if decoded is not None:
        rows.append(("decoded", f"{decoded} frames, all readable"))
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)


def _decode_all(source: Any, total: int | None) -> int:
    if total is None:
        raise typer.BadParameter("--check needs a recorded source, not a live device")
    n = 0
    with make_progress() as bar:
        task = bar.add_task("decoding", total=total)
        for _ in source:
            n += 1
            bar.advance(task)
    return n


ModelOption = Annotated[
    str | None,
    typer.Option("--model", help="ONNX segmentation model (default: the shipped one)."),
]
EngineOption = Annotated[
    str,
    typer.Option(
        "--engine",
        help="Inference engine: auto (OpenVINO where installed), openvino or onnxruntime.",
    ),
]


def output_stem(source: Any, index: int) -> str:
    """Label file stem of frame ``index``: ``<stem>`` for an image or single-frame file, else
    ``<stem>_<index>`` (a page's index for a multi-page TIFF among images)."""
    from pathlib import Path

    if source.kind == "images":
        file, page, pages = source.page_of(index)
        return Path(file).stem if pages == 1 else f"{Path(file).stem}_{page:05d}"
    stem = Path(source.source).stem
    return stem if source.frame_count == 1 else f"{stem}_{index:05d}"


def check_output_names(sources: list[Any], target: Any) -> None:
    """Refuse, before any work, two inputs that would write the same label file (the second
    would silently replace the first), and a label file that would replace an input."""
    from pathlib import Path

    def files(source: Any) -> list[Path]:
        return [Path(f) for f in getattr(source, "files", None) or [source.source]]

    inputs = {f.resolve() for source in sources for f in files(source)}
    seen: dict[str, Path] = {}
    for source in sources:
        if source.kind == "images":
            named = [
                (output_stem(source, i), source.page_of(i)[0]) for i in range(source.frame_count)
            ]
        elif source.frame_count == 1:
            named = [(output_stem(source, 0), Path(source.source))]
        else:
            continue  # frame names carry their index; clashes are caught as they are written
        for stem, f in named:
            name = stem + ".png"
            if name in seen:
                raise UsguideError(
                    target / name,
                    f"{seen[name]} and {f} would both be written here; "
                    "segment them into separate --out folders",
                )
            seen[name] = f
            for folder in (target, target / "overlays"):
                if (folder / name).resolve() in inputs:
                    raise UsguideError(folder / name, "is an input; its label map would replace it")


@app.command()
def segment(
    inputs: Annotated[
        list[str], typer.Argument(help="Image files, folders, DICOM files or videos.")
    ],
    out_dir: Annotated[str, typer.Option("--out", help="Folder for the label PNGs.")],
    model: ModelOption = None,
    engine: EngineOption = "auto",
    overlay: Annotated[
        bool, typer.Option("--overlay", help="Also write colour overlays to OUT/overlays/.")
    ] = False,
    smoothing: Annotated[
        float, typer.Option(help="Temporal smoothing of probabilities across frames, 0 to <1.")
    ] = 0.0,
    spacing: SpacingOption = None,
    region: RegionOption = None,
    detect: DetectOption = True,
) -> None:
    """Label every frame: one 8-bit label PNG per frame, at the frame's size.

    Class indices: 0 background, 1 nerve, 2 vessel, 3 fascia, 4 needle."""
    from pathlib import Path

    import cv2

    from usguide.overlay import blend_labels
    from usguide.segment import Segmenter
    from usguide.sources import open_source

    target = Path(out_dir)
    written = 0

    def kept() -> str | None:
        return f"the {written} label maps written before it are in {target}" if written else None

    with user_errors(kept):
        segmenter = Segmenter(model, engine=engine, smoothing=smoothing)
        options = source_options(spacing, region, detect)
        sources = [open_source(path, **options) for path in inputs]
        check_output_names(sources, target)
        total = sum(s.frame_count or 0 for s in sources)
        target.mkdir(parents=True, exist_ok=True)
        if overlay:
            (target / "overlays").mkdir(exist_ok=True)
        written_by: dict[str, str] = {}
        with make_progress() as bar:
            task = bar.add_task("segmenting", total=total)
            for source in sources:
                segmenter.reset()
                with source:
                    for frame in source:
                        labels = segmenter(frame)
                        name = output_stem(source, frame.index) + ".png"
                        if name in written_by:  # a multi-frame source's name met another's
                            raise UsguideError(
                                target / name,
                                f"{frame.source} and {written_by[name]} would both be written "
                                "here; segment them into separate --out folders",
                            )
                        written_by[name] = frame.source
                        write_png(target / name, labels)
                        if overlay:
                            blend = blend_labels(frame.pixels, labels)
                            write_png(
                                target / "overlays" / name, cv2.cvtColor(blend, cv2.COLOR_RGB2BGR)
                            )
                        written += 1
                        bar.advance(task)
    err.print(f"wrote {written} label maps to {target}")


def write_png(path: Any, array: Any) -> None:
    """Write a PNG atomically: a temporary file renamed into place, so no half-written file."""
    import os

    import cv2

    from usguide.errors import UsguideError as _Error

    ok, data = cv2.imencode(".png", array)
    if not ok:
        raise _Error(path, "cannot encode PNG")
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data.tobytes())
    os.replace(tmp, path)


@app.command()
def evaluate(
    images: Annotated[str, typer.Option("--images", help="Folder of images.")],
    masks: Annotated[
        str, typer.Option("--masks", help="Folder of label PNGs with the same stems.")
    ],
    model: ModelOption = None,
    engine: EngineOption = "auto",
    json_out: Annotated[
        str, typer.Option("--json", help="Where to write the results as JSON.")
    ] = "evaluation.json",
    classes: Annotated[
        str | None,
        typer.Option(help="Classes the masks label, e.g. nerve,vessel (default: all)."),
    ] = None,
    binary_class: Annotated[
        str | None,
        typer.Option(help="Read 0/255 masks as this class (e.g. fascia)."),
    ] = None,
) -> None:
    """Per-class Dice of the model against ground-truth masks, with bootstrap 95% intervals."""
    from pathlib import Path

    from usguide.evaluate import DiceTable, format_table
    from usguide.labels import CLASS_NAMES
    from usguide.segment import Segmenter
    from usguide.sources.images import ImageSource, list_images, read_mask

    with user_errors():
        labelled = [True] * len(CLASS_NAMES)
        if classes:
            wanted = {c.strip() for c in classes.split(",")}
            bad = wanted - set(CLASS_NAMES[1:])
            if bad:
                raise typer.BadParameter(f"unknown classes {sorted(bad)}")
            labelled = [i == 0 or n in wanted for i, n in enumerate(CLASS_NAMES)]
        binary = None
        if binary_class is not None:
            if binary_class not in CLASS_NAMES[1:]:
                raise typer.BadParameter(f"unknown class {binary_class!r}")
            binary = CLASS_NAMES.index(binary_class)
            if not classes:  # a 0/255 mask of one class says nothing of the others
                labelled = [i in (0, binary) for i in range(len(CLASS_NAMES))]
        mask_files = {p.stem: p for p in list_images(masks)} if Path(masks).is_dir() else {}
        image_files = [p for p in list_images(images)] if Path(images).is_dir() else []
        if not image_files:
            from usguide.errors import EmptySourceError

            raise EmptySourceError(images, "no images to evaluate")
        pairs = [(p, mask_files[p.stem]) for p in image_files if p.stem in mask_files]
        if not pairs:
            from usguide.errors import EmptySourceError

            raise EmptySourceError(masks, "no mask has the stem of an image")
        segmenter = Segmenter(model, engine=engine)
        table = DiceTable()
        source = ImageSource([p for p, _ in pairs])
        if source.frame_count != len(pairs):
            raise UsguideError(images, "a multi-page TIFF has one mask per page, not per file")
        with make_progress() as bar, source:
            task = bar.add_task("evaluating", total=len(pairs))
            for frame, (_, mask_path) in zip(source, pairs, strict=True):
                truth = read_mask(mask_path, binary_class=binary)
                try:
                    table.add(segmenter(frame).copy(), truth, labelled)
                except ValueError as e:
                    raise UsguideError(mask_path, f"{e} (image {frame.source})") from None
                bar.advance(task)
        summary = table.summary()
        # The table first: a JSON path that cannot be written must not lose the results.
        out.print(format_table(summary))
        result = {
            "model": segmenter.info.path,
            "model_version": segmenter.info.version,
            "images": len(pairs),
            "classes": summary,
        }
        json_path = Path(json_out)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    err.print(f"{len(pairs)} images; results written to {json_out}")


TRACK_COLUMNS = (
    "frame", "visible", "tip_x", "tip_y", "tip_x_mm", "tip_y_mm", "angle_deg", "confidence",
)  # fmt: skip


@app.command()
def track(
    input_path: Annotated[
        str,
        typer.Argument(
            metavar="INPUT", help="A DICOM cine, a video, or an image folder (sorted by name)."
        ),
    ],
    out_csv: Annotated[str, typer.Option("--out", help="CSV of the tip, one row per frame.")],
    model: ModelOption = None,
    engine: EngineOption = "auto",
    hold: Annotated[
        float,
        typer.Option(help="Seconds the tip may go unseen before it is reported not visible."),
    ] = 0.1,
    spacing: SpacingOption = None,
    region: RegionOption = None,
    detect: DetectOption = True,
) -> None:
    """Find and track the needle tip: one CSV row per frame.

    Columns: frame, visible, tip_x, tip_y (frame pixels), tip_x_mm, tip_y_mm (mm from the
    imaging region's top-left corner; empty when uncalibrated), angle_deg (shaft to probe
    surface) and confidence."""
    import csv
    import os
    from dataclasses import replace
    from pathlib import Path

    from usguide.needle import NeedleConfig, NeedleStage
    from usguide.segment import Segmenter
    from usguide.sources import open_source

    target = Path(out_csv)
    partial = target.with_name(target.name + ".partial")
    visible = rows = 0

    def kept() -> str | None:
        return f"the rows of the {rows} frames tracked before it are in {partial}" if rows else None

    with user_errors(kept):
        if hold < 0:
            raise UsguideError("--hold", f"must be 0 or more seconds, got {hold}")
        if target.is_dir():
            raise UsguideError(target, "is a folder; --out takes the CSV file to write")
        segmenter = Segmenter(model, engine=engine)
        stage = NeedleStage(replace(NeedleConfig(), hold_s=hold))
        source = open_source(input_path, **source_options(spacing, region, detect))
        if target.parent != Path():
            target.parent.mkdir(parents=True, exist_ok=True)
        # Rows go to OUT.partial as they come (nothing is lost if the run stops); the finished
        # file takes its name only once every frame is in.
        with open(partial, "w", newline="") as f, make_progress() as bar, source:
            writer = csv.writer(f)
            writer.writerow(TRACK_COLUMNS)
            task = bar.add_task("tracking", total=source.frame_count)
            for frame in source:
                state = stage(frame, segmenter(frame))
                tip, mm = state.tip_xy, state.tip_mm
                writer.writerow(
                    [
                        frame.index,
                        int(state.visible),
                        f"{tip[0]:.2f}" if tip else "",
                        f"{tip[1]:.2f}" if tip else "",
                        f"{mm[0]:.3f}" if mm else "",
                        f"{mm[1]:.3f}" if mm else "",
                        f"{state.angle_deg:.2f}" if state.angle_deg is not None else "",
                        f"{state.confidence:.3f}",
                    ]
                )
                f.flush()
                rows += 1
                visible += state.visible
                bar.advance(task)
        os.replace(partial, target)
    calibrated = "" if source.spacing_mm else " (uncalibrated: mm columns empty)"
    err.print(f"tip visible in {visible} of {rows} frames; wrote {target}{calibrated}")


def load_guidance_config(
    path: str | None, mode: str | None
) -> tuple[Any, list[tuple[float, float]]]:
    """GuidanceConfig and user targets from a TOML file (``[guidance]`` settings and
    ``[[targets]]`` with ``x``, ``y`` in frame pixels) and the --mode option."""
    import dataclasses
    import tomllib

    from usguide.guidance import GuidanceConfig

    settings: dict[str, Any] = {}
    targets: list[tuple[float, float]] = []
    if path is not None:
        try:
            with open(path, "rb") as f:
                document = tomllib.load(f)
        except FileNotFoundError:
            raise UsguideError(path, "no such file") from None
        except tomllib.TOMLDecodeError as e:
            raise UsguideError(path, f"not valid TOML: {e}") from None
        unknown_sections = set(document) - {"guidance", "targets"}
        if unknown_sections:
            raise UsguideError(path, f"unknown sections {sorted(unknown_sections)}")
        settings = dict(document.get("guidance", {}))
        known = {f.name for f in dataclasses.fields(GuidanceConfig)} - {"spread"}
        unknown = set(settings) - known
        if unknown:
            raise UsguideError(path, f"unknown [guidance] keys {sorted(unknown)}")
        for i, t in enumerate(document.get("targets", [])):
            try:
                targets.append((float(t["x"]), float(t["y"])))
            except (KeyError, TypeError, ValueError):
                raise UsguideError(path, f"target {i + 1} needs numbers x and y") from None
    if mode is not None:
        settings["mode"] = mode
    try:
        return GuidanceConfig(**settings), targets
    except (TypeError, ValueError) as e:
        raise UsguideError(path or "--mode", str(e)) from None


def run_pipeline(
    source: Any,
    pipeline: Any,
    *,
    video: str | None,
    log: str | None,
    window: bool | None,
    live: bool,
    max_frames: int | None,
) -> Any:
    """Run ``pipeline`` on ``source`` with the chosen sinks; print a summary; return it."""
    from usguide.pipeline import run_live, run_playback
    from usguide.sinks import JsonLinesLog, VideoSink, WindowSink
    from usguide.sinks.window import display_available

    sinks: list[Any] = []
    try:
        if video is not None:
            sinks.append(VideoSink(video, fps=source.frame_rate_hz or 20.0))
        if log is not None:
            sinks.append(JsonLinesLog(log))
        if window or (window is None and display_available()):
            sinks.append(WindowSink())
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    with make_progress() as bar, source:
        task = bar.add_task("live" if live else "playback", total=source.frame_count)

        def advance(_: Any) -> None:
            bar.advance(task)

        if live:
            summary = run_live(
                pipeline,
                source,
                sinks,
                pace_s=source.frame_time_s if source.frame_count is not None else None,
                max_frames=max_frames,
                on_frame=advance,
            )
        else:
            summary = run_playback(pipeline, source, sinks, max_frames=max_frames, on_frame=advance)
    print_summary(summary, live=live)
    return summary


def print_summary(summary: Any, *, live: bool) -> None:
    table = Table(title="per-stage latency (ms)", title_justify="left")
    for column in ("stage", "median", "p95", "p99", "max", "failures"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for name, t in summary.timings.items():
        table.add_row(
            name,
            f"{t['median_ms']:.2f}",
            f"{t['p95_ms']:.2f}",
            f"{t['p99_ms']:.2f}",
            f"{t['max_ms']:.2f}",
            str(t["failures"]),
        )
    err.print(table)
    dropped = f", {summary.frames_dropped} dropped" if live else ""
    err.print(
        f"{summary.frames_processed} frames in {summary.wall_s:.1f} s "
        f"({summary.fps:.1f} fps){dropped}; {summary.ended}"
    )
    for stage, n in summary.stage_failures.items():
        err.print(f"[yellow]warning:[/] stage {stage} failed on {n} frames (see the log's errors)")


WindowFlag = Annotated[
    bool | None,
    typer.Option(
        "--window/--no-window", help="Show an OpenCV window (default: when a display exists)."
    ),
]


@app.command()
def run(
    input_path: Annotated[
        str,
        typer.Argument(
            metavar="INPUT",
            help="A DICOM cine, a video, an image folder, or a capture device number.",
        ),
    ],
    model: ModelOption = None,
    engine: EngineOption = "auto",
    video: Annotated[
        str | None, typer.Option("--out", help="Overlay video to write (.mp4).")
    ] = None,
    log: Annotated[
        str | None, typer.Option("--log", help="JSON-lines results log, one object per frame.")
    ] = None,
    live: Annotated[
        bool,
        typer.Option(
            "--live", help="Newest frame wins (a recorded file plays in real time); drops counted."
        ),
    ] = False,
    window: WindowFlag = None,
    config: Annotated[
        str | None,
        typer.Option("--config", help="TOML: [guidance] settings and [[targets]] x, y."),
    ] = None,
    target: Annotated[
        list[str] | None,
        typer.Option("--target", help="A user target X,Y in frame pixels (repeatable)."),
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option(help="Automatic targets: perineural, mesotherapy or manual (none)."),
    ] = None,
    max_frames: Annotated[
        int | None, typer.Option("--max-frames", help="Stop after this many frames.")
    ] = None,
    spacing: SpacingOption = None,
    region: RegionOption = None,
    detect: DetectOption = True,
) -> None:
    """Run the whole pipeline (segment, needle, guidance, overlay) on a scan or a device.

    Playback processes every frame; --live always takes the newest frame and counts the ones it
    skipped. Distances are in mm when the source is calibrated, else in px (and the overlay and
    the log say so). When the source fails midway (a corrupt frame, a device unplugged), the
    outputs keep the frames before it and the exit code is 1. Not a medical device."""
    from usguide.pipeline import Pipeline
    from usguide.sources import open_source

    with user_errors():
        settings, targets = load_guidance_config(config, mode)
        for t in target or []:
            xy = parse_numbers(t, (2,), "--target")
            assert xy is not None
            targets.append((xy[0], xy[1]))
        source = open_source(input_path, **source_options(spacing, region, detect))
        pipeline = Pipeline(
            model, engine=engine, threads=2 if live else 1, guidance=settings, targets=targets
        )
        if not source.spacing_mm:
            err.print("[yellow]calibration unknown:[/] distances are in px")
        summary = run_pipeline(
            source, pipeline, video=video, log=log, window=window, live=live, max_frames=max_frames
        )
    for path in (video, log):
        if path is not None:
            err.print(f"wrote {path}")
    if summary.source_failed:
        raise typer.Exit(1)  # the outputs hold the frames before the failure, and no more


@app.command()
def demo(
    out_dir: Annotated[
        str, typer.Option("--out", help="Folder for the overlay video and the results log.")
    ] = "usguide-demo",
    model: ModelOption = None,
    engine: EngineOption = "auto",
    window: WindowFlag = False,
) -> None:
    """Run the whole pipeline on the bundled demo scan; write overlay.mp4 and results.jsonl.

    The scan is a nerve-block cine built from one real frame (USGRA-Seg, CC BY 4.0) with
    simulated probe motion, a needle advancing to the nerve and an injection. The --out folder
    also gets ABOUT.txt (the source's attribution and the assumed spacing)."""
    from pathlib import Path

    from usguide.demo import DEMO_ABOUT, DEMO_SPACING_MM, DemoScan
    from usguide.pipeline import Pipeline

    folder = Path(out_dir)
    with user_errors():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ABOUT.txt").write_text(DEMO_ABOUT)
        source = DemoScan()
        err.print(
            f"demo scan: {source.frame_count} frames at {source.frame_rate_hz:g} fps, "
            f"{DEMO_SPACING_MM} mm/px assumed (the source image carries no calibration); "
            "from USGRA-Seg image 0212, CC BY 4.0"
        )
        summary = run_pipeline(
            source,
            Pipeline(model, engine=engine),
            video=str(folder / "overlay.mp4"),
            log=str(folder / "results.jsonl"),
            window=window,
            live=False,
            max_frames=None,
        )
    out.print(f"demo written to {folder.resolve()}: overlay.mp4, results.jsonl, ABOUT.txt")
    if summary.frames_processed != source.frame_count:
        raise typer.Exit(1)


@app.command()
def train(
    config: Annotated[str, typer.Option("--config", help="TOML training configuration.")],
    data: Annotated[
        str | None, typer.Option("--data", help="Data mirror (default $USGUIDE_DATA).")
    ] = None,
    out_dir: Annotated[
        str | None, typer.Option("--out", help="Model folder (overrides the config).")
    ] = None,
) -> None:
    """Train the segmentation model (needs the train extra: torch)."""
    try:
        from usguide.training.train import TrainConfig
        from usguide.training.train import train as run_training
    except ImportError as e:
        err.print(f"[red]error:[/] training needs torch: pip install 'usguide[train]' ({e})")
        raise typer.Exit(2) from None
    with user_errors():
        settings = TrainConfig.from_toml(config)
        if data is not None:
            settings.data_root = data
        if out_dir is not None:
            settings.out = out_dir
        run_training(settings, log=lambda line: err.print(line, soft_wrap=True))


if __name__ == "__main__":  # pragma: no cover
    app()
