"""Export benchmark: seconds per key to export N keys of one architecture, full export vs fleet template.

For each model, N keyed variants (each its own key and its own weights, as N
fine-tuned models would have) are exported to ONNX and OpenVINO twice in one
run: ``full`` (trace + convert per key, what a single export does) and
``template`` (trace once, then per key substitute the constants: keyedge.exporters.template;
the one-time template build is counted, spread over the N keys).  Outputs of both
artifacts of every key are compared on the same input (they must agree to float
precision); verification itself (identical for both) is not timed.

Run: ``python -m keyedge.benchmarks.export [--keys 10] [--models vit_tiny_patch16_224,tf_efficientnet_lite0]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from keyedge.exporters import ExportOptions, get_backend
from keyedge.exporters.template import OnnxTemplate, openvino_from_onnx
from keyedge.keys.keyfile import Key
from keyedge.models.backbones import build_model


def _variants(model_name: str, count: int, size: int) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    base = build_model(model_name, 10, weights="none", image_size=size).backbone.state_dict()
    out = []
    for i in range(count):
        key = Key.from_secret(bytes([i + 1]) * 32, 4)
        model = build_model(model_name, 10, key=key, weights="none", image_size=size)
        generator = torch.Generator().manual_seed(i)
        model.backbone.load_state_dict(
            {
                k: v + 0.01 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                for k, v in base.items()
            }
        )
        out.append(model.eval())
    return out


def bench_model(model_name: str, count: int, size: int, work: Path) -> dict:
    models = _variants(model_name, count, size)
    options = ExportOptions(batch=1, image_size=size)
    onnx_b, ov_b = get_backend("onnx"), get_backend("openvino")
    x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    times = {"full": {"onnx": [], "openvino": []}, "template": {"onnx": [], "openvino": []}}
    worst = {"onnx": 0.0, "openvino": 0.0}
    start = time.perf_counter()
    template = OnnxTemplate.build(models[0], options)
    build_s = time.perf_counter() - start
    for i, model in enumerate(models):
        full_dir, tmpl_dir = work / f"full-{i}", work / f"tmpl-{i}"
        full_dir.mkdir()
        tmpl_dir.mkdir()
        t = time.perf_counter()
        onnx_b.export(model, full_dir / "m.onnx", options)
        times["full"]["onnx"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ov_b.export(model, full_dir / "m.xml", options)
        times["full"]["openvino"].append(time.perf_counter() - t)
        t = time.perf_counter()
        template.instantiate(model, tmpl_dir / "m.onnx", options)
        times["template"]["onnx"].append(time.perf_counter() - t)
        t = time.perf_counter()
        openvino_from_onnx(tmpl_dir / "m.onnx", tmpl_dir / "m.xml", options)
        times["template"]["openvino"].append(time.perf_counter() - t)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        for name, backend, suffix in (("onnx", onnx_b, "m.onnx"), ("openvino", ov_b, "m.xml")):
            a, b = backend.run(full_dir / suffix, x), backend.run(tmpl_dir / suffix, x)
            worst[name] = max(worst[name], float(np.abs(a - b).max()), float(np.abs(b - ref).max()))
        shutil.rmtree(full_dir)
        shutil.rmtree(tmpl_dir)
    result = {
        "model": model_name,
        "keys": count,
        "image_size": size,
        "template_build_s": build_s,
        "max_abs_diff": worst,
        "per_key_s": {},
        "speedup": {},
    }
    for target in ("onnx", "openvino"):
        full = float(np.mean(times["full"][target]))
        # the template build serves both targets: charge it to ONNX, which it replaces
        tmpl = float(np.mean(times["template"][target])) + (build_s / count if target == "onnx" else 0.0)
        result["per_key_s"][target] = {"full": full, "template": tmpl}
        result["speedup"][target] = full / tmpl
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_tiny_patch16_224,tf_efficientnet_lite0")
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    print(
        f"export benchmark: {args.keys} keys per model, {args.image_size}x{args.image_size}, batch 1, fp32, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models.split(","):
            res = bench_model(model_name, args.keys, args.image_size, Path(tmp))
            results.append(res)
            for target in ("onnx", "openvino"):
                s = res["per_key_s"][target]
                print(
                    f"  {model_name:>24} {target:>8}: full {s['full']:6.2f} s/key, template {s['template']:6.2f} "
                    f"s/key -> {res['speedup'][target]:5.1f}x  (outputs agree to {res['max_abs_diff'][target]:.1e})"
                )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
