"""Sample data: the usguide demo scan (:class:`usguide.demo.DemoScan`) as a lazy cine."""

from __future__ import annotations

from napari_usguide._reader import LayerData, scan_layer


def demo_scan() -> list[LayerData]:
    """The demo nerve-block cine: one real frame (USGRA-Seg 0212, CC BY 4.0) with simulated
    probe motion, a needle advancing to the nerve and an injection. Its mm scale is assumed
    (0.08 mm per pixel; the source image carries no calibration), and the layer name says so."""
    from usguide.demo import DEMO_SPACING_MM, DemoScan

    data, kwargs, kind = scan_layer(DemoScan(), name="usguide demo scan")
    kwargs["name"] = f"usguide demo scan ({DEMO_SPACING_MM} mm/px assumed)"
    kwargs["metadata"]["usguide"]["source"] = "demo"
    return [(data, kwargs, kind)]
