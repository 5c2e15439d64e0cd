#!/usr/bin/env python3
"""Checks an exported ONNX model against our logits (tests/onnx.rs runs it).

    onnx_check.py MODEL INPUT.f32 N C H W EXPECTED.f32

INPUT.f32 holds N NCHW images (float32, little-endian), EXPECTED.f32 our logits for them
([N, classes]). The model must pass onnx.checker (full check, with shape inference); then
onnxruntime runs the whole batch and the first image alone (batch 1). Prints one JSON object:
the largest absolute difference from our logits for each run, the output shapes, the model's
opset and IR version, its input shape as declared, and its metadata.
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort


def main():
    path, inputs, n, c, h, w, expected = sys.argv[1:8]
    n, c, h, w = int(n), int(c), int(h), int(w)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    x = np.fromfile(inputs, dtype="<f4").reshape(n, c, h, w)
    want = np.fromfile(expected, dtype="<f4").reshape(n, -1)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    declared = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    batch = declared[0]
    runs = {}
    for name, rows in (("batch", n), ("single", 1)):
        if isinstance(batch, int) and batch != rows:
            continue
        (got,) = session.run(["logits"], {"input": x[:rows]})
        runs[name] = {
            "shape": list(got.shape),
            "max_abs_diff": float(np.abs(got - want[:rows]).max()),
        }
    print(json.dumps({
        "runs": runs,
        "opset": model.opset_import[0].version,
        "ir_version": model.ir_version,
        "input": [model.graph.input[0].name, declared],
        "output": model.graph.output[0].name,
        "ops": sorted({node.op_type for node in model.graph.node}),
        "metadata": {p.key: p.value for p in model.metadata_props},
    }))


if __name__ == "__main__":
    main()
