"""Training and ONNX export of usguide's segmentation model. Needs the ``train`` extra (torch).

Nothing outside this package imports it; the runtime reads only the exported ONNX file.
"""
