"""Which int8 recipe keeps a keyed model's answers?  Calibration method, size, selection and mixed precision.

For one checkpoint (default: the quickstart's k1) the fp32 keyed model is exported once to ONNX and quantized
with each recipe below, by ONNX Runtime's static quantizer and by NNCF (OpenVINO).  Each int8 model answers the
checkpoint's real test images (the export's agreement images); printed per recipe: top-1 agreement with the
fp32 PyTorch model, the accuracy drop in points, and the seconds the quantization took.  The export's
``--precision int8`` uses the recipe this measured best per target (``exporters/onnx.py``,
``exporters/openvino.py``).

Recipes: the calibration method (ORT: min-max, percentile, entropy; NNCF: its default, with bias correction),
the calibration size (300 vs 1000 training images), mixed precision (the first convolution after the shuffle
and the classifier kept in float), and NNCF's accuracy-aware quantization (``quantize_with_accuracy_control``,
validated on held-out *training* images against the fp32 answers, never the test images it is judged on).

It also prints the model's own floor (:func:`fragility`): how often the fp32 model changes its answer under
input noise of one 8-bit step, or computed in bf16 -- a 2-epoch 32 px model flips more answers there than the
98% agreement rule allows, so no post-training recipe is likely to reach the rule on it.

Run: ``python -m keyedge.benchmarks.experiments.int8 --run DIR --key-file K [--agreement 500] [--only ort,nncf]``;
``--latency tf_efficientnet_lite0,resnet18 [--size 224]`` times the old and new recipes' int8/fp32 instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from keyedge.checkpoints import load_checkpoint, read_manifest
from keyedge.deploy.export import deployable
from keyedge.deploy.inputs import agreement_inputs, calibration_images
from keyedge.deploy.verification import reference_logits
from keyedge.exporters import ExportOptions, get_backend
from keyedge.exporters.onnx import quantization_exclusions
from keyedge.host import describe
from keyedge.keys.keyfile import load_key


def _batches(images: np.ndarray, size: int = 32) -> list[np.ndarray]:
    return [np.ascontiguousarray(images[i : i + size]) for i in range(0, len(images), size)]


def _ort_answers(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: b})[0] for b in _batches(x)])


def ort_recipes(fp32: Path, calib: dict[int, np.ndarray], tmp: Path, only: set[str]) -> dict[str, Path]:
    import onnx
    from onnxruntime import quantization as q

    model = onnx.load(str(fp32))
    shuffle_nodes, end_nodes = quantization_exclusions(onnx, model)  # the export's own choice of float ends
    shuffle, (first, last) = [n.name for n in shuffle_nodes], [n.name for n in end_nodes]
    named = tmp / "named.onnx"
    onnx.save(model, str(named))

    class Reader:
        def __init__(self, images: np.ndarray):
            self._it = iter(_batches(images, 10))  # equal batches: the histogram collectors stack them

        def get_next(self):
            batch = next(self._it, None)
            return None if batch is None else {"image": batch}

    recipes = {
        "percentile-300": (calib[300], q.CalibrationMethod.Percentile, shuffle, {}),
        "minmax-300": (calib[300], q.CalibrationMethod.MinMax, shuffle, {}),
        "entropy-300": (calib[300], q.CalibrationMethod.Entropy, shuffle, {}),
        "percentile-1000": (calib[1000], q.CalibrationMethod.Percentile, shuffle, {}),
        "percentile-300-ends-float": (calib[300], q.CalibrationMethod.Percentile, [*shuffle, first, last], {}),
        "minmax-300-ends-float": (calib[300], q.CalibrationMethod.MinMax, [*shuffle, first, last], {}),
        "minmax-300-convs-only": (calib[300], q.CalibrationMethod.MinMax, shuffle, {"ops": ["Conv", "Gemm", "MatMul"]}),
        "minmax-300-convs-only-ends-float": (
            calib[300],
            q.CalibrationMethod.MinMax,
            [*shuffle, first, last],
            {"ops": ["Conv", "Gemm", "MatMul"]},
        ),
    }
    for name, (images, method, exclude, extra) in recipes.items():
        if only and name not in only:
            continue
        path = tmp / f"ort-{name}.onnx"
        start = time.perf_counter()
        q.quantize_static(
            str(named),
            str(path),
            Reader(images),
            quant_format=q.QuantFormat.QDQ,
            per_channel=True,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            calibrate_method=method,
            nodes_to_exclude=exclude,
            op_types_to_quantize=extra.get("ops"),
        )
        yield name, path, time.perf_counter() - start


def nncf_recipes(
    fp32: Path, calib: dict[int, np.ndarray], held: tuple[np.ndarray, np.ndarray], tmp: Path, only: set[str]
):
    import nncf
    import onnx
    import openvino as ov

    core = ov.Core()
    onnx_model = onnx.load(str(fp32))
    shuffle = [n.name for n in quantization_exclusions(onnx, onnx_model, ends=False)[0]]
    model = core.read_model(str(fp32))
    names = {op.get_friendly_name() for op in model.get_ordered_ops()}
    ignored = [n for n in shuffle if n in names]
    convs = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    mats = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"]
    ends = [convs[0], mats[-1]] if convs and mats else []  # float_ends in OpenVINO's spelling (no shuffle conv here)
    held_x, held_top = held

    def validate(compiled: Any, items: Any) -> float:  # NNCF calls it on subsets too: the labels ride along
        hits = [int(compiled(image)[0].argmax()) == int(top) for image, top in items]
        return float(np.mean(hits))

    recipes = {
        "default-300": dict(images=calib[300], fast_bias_correction=False),
        "fast-bias-300": dict(images=calib[300], fast_bias_correction=True),
        "default-1000": dict(images=calib[1000], fast_bias_correction=False),
        "mixed-preset-300": dict(images=calib[300], fast_bias_correction=False, preset=nncf.QuantizationPreset.MIXED),
        "default-300-ends-float": dict(images=calib[300], fast_bias_correction=False, extra_ignored=ends),
        "mixed-preset-300-ends-float": dict(
            images=calib[300], fast_bias_correction=False, preset=nncf.QuantizationPreset.MIXED, extra_ignored=ends
        ),
        "accuracy-control-300": dict(images=calib[300], fast_bias_correction=False, control=True),
    }
    for name, r in recipes.items():
        if only and name not in only:
            continue
        images = r.pop("images")
        control = r.pop("control", False)
        extra_ignored = r.pop("extra_ignored", [])
        scope = nncf.IgnoredScope(names=[*ignored, *extra_ignored]) if ignored or extra_ignored else None
        dataset = nncf.Dataset(_batches(images, 10))
        start = time.perf_counter()
        if control:
            quantized = nncf.quantize_with_accuracy_control(
                model,
                calibration_dataset=dataset,
                validation_dataset=nncf.Dataset(list(zip(held_x[:, None], held_top)), lambda item: item[0]),
                validation_fn=validate,
                max_drop=0.005,
                advanced_accuracy_restorer_parameters=nncf.AdvancedAccuracyRestorerParameters(max_num_iterations=12),
                drop_type=nncf.DropType.ABSOLUTE,
                subset_size=len(images),
                ignored_scope=scope,
            )
        else:
            quantized = nncf.quantize(model, dataset, subset_size=len(images), ignored_scope=scope, **r)
        seconds = time.perf_counter() - start
        path = tmp / f"ov-{name}.xml"
        ov.save_model(quantized, str(path), compress_to_fp16=False)
        yield name, path, seconds


def _ov_answers(path: Path, x: np.ndarray) -> np.ndarray:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2})
    return np.concatenate([compiled(b)[0] for b in _batches(x)])


def recipe_latency(model_name: str, size: int, rounds: int) -> dict[str, Any]:
    """int8/fp32 of the recipes keyedge used before and uses now, in one interleaved run (random weights: latency
    does not depend on them; 60 random calibration images): what keeping the two end layers float costs."""
    import onnxruntime as ort
    import openvino as ov

    from keyedge.benchmarks.workbench import BENCH_KEY
    from keyedge.models.backbones import build_model
    from keyedge.timing import RUNTIME_COOLDOWN_S, interleave

    torch.manual_seed(0)
    model = build_model(model_name, 10, key=BENCH_KEY, weights="none", image_size=size).eval()
    module = deployable(model, BENCH_KEY, "gather").module.eval()
    images = np.random.default_rng(0).random((60, 3, size, size), dtype=np.float32)
    calib = {300: images, 1000: images}  # (only the 300 recipes are made)
    x = np.random.default_rng(1).random((1, 3, size, size), dtype=np.float32)
    wanted = {"percentile-300", "minmax-300-ends-float", "default-300", "mixed-preset-300-ends-float"}
    calls: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        get_backend("onnx").export(module, fp32, ExportOptions(batch=None, image_size=size))  # (calibrated in tens)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        for name, path in [("fp32", fp32), *((n, p) for n, p, _ in ort_recipes(fp32, calib, Path(tmp), wanted))]:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            calls[f"ort/{name}"] = lambda s=session: s.run(None, {"image": x})
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2, "PERFORMANCE_HINT": "LATENCY"}
        held = (calib[300][:4], np.zeros(4, dtype=np.int64))
        made = [(n, p) for n, p, _ in nncf_recipes(fp32, calib, held, Path(tmp), wanted)]
        for name, path in [("fp32", fp32), *made]:
            request = core.compile_model(str(path), "CPU", config).create_infer_request()
            calls[f"ov/{name}"] = lambda r=request: r.infer({0: x})
        timing = interleave(calls, rounds=rounds, warmup=3, min_seconds=0.5, cooldown=RUNTIME_COOLDOWN_S)
    out = {}
    for name in calls:
        runtime = name.split("/")[0]
        if not name.endswith("/fp32"):
            spread = timing.ratio(name, f"{runtime}/fp32")
            out[name] = spread.to_dict()
            print(f"{model_name} {size}px  {name:34s} int8/fp32 {spread}")
    return out


def fragility(module: Any, x: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """How often the fp32 model changes its own answer under perturbations far smaller than int8's: uniform input
    noise of half and one 8-bit step, and bf16 compute (PyTorch).  No quantizer is likely to agree more."""
    top, images = ref.argmax(1), torch.from_numpy(x)
    out = {}
    for steps in (0.5, 1.0):
        noise = (torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1) * steps / 255
        out[f"input noise +-{steps:g}/255"] = float(
            (module((images + noise).clamp(0, 1)).argmax(1).numpy() == top).mean()
        )
    bf16 = copy.deepcopy(module).to(torch.bfloat16)  # a copy: casting back would leave bf16-rounded weights
    out["bf16 compute"] = float((bf16(images.to(torch.bfloat16)).float().argmax(1).numpy() == top).mean())
    return out


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="a keyed checkpoint directory (e.g. quickstart's k1)")
    parser.add_argument("--key-file", type=Path)
    parser.add_argument("--agreement", type=int, default=500, help="test images judged on (the export's default)")
    parser.add_argument("--only", default="ort,nncf")
    parser.add_argument("--recipes", default="", help="comma-separated recipe names (default: all)")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--latency",
        default="",
        help="models to time the old and new recipes on, e.g. "
        "tf_efficientnet_lite0,resnet18 (at --size, random weights), instead of the agreement run",
    )
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)
    print(describe())
    if args.latency:
        rows = {m: recipe_latency(m, args.size, args.rounds) for m in args.latency.split(",")}
        if args.json:
            args.json.write_text(json.dumps({"host": describe(), "size": args.size, "latency": rows}, indent=1))
        return rows
    key = load_key(args.key_file)
    manifest = read_manifest(args.run)
    model, _ = load_checkpoint(args.run, key)
    module = deployable(model, key, "gather").module.eval()
    size = model.spec.image_size
    x, labels, source = agreement_inputs(manifest, size, args.agreement)
    ref = reference_logits(module, x)
    calib = {n: calibration_images(manifest, size, None, n, 0)[0] for n in (300, 1000)}
    held_x = calibration_images(manifest, size, None, 1300, 7)[0][-300:]  # not the judged test images
    held_top = reference_logits(module, held_x).argmax(1)
    print(f"judged on {len(x)} {source}; fp32 accuracy {(ref.argmax(1) == labels).mean():.1%}")
    recipes = {r for r in args.recipes.split(",") if r}
    top2 = np.sort(ref, 1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    print("fp32 top-1/top-2 logit margin quantiles (10/25/50%):", np.round(np.quantile(margin, [0.1, 0.25, 0.5]), 3))
    floor = fragility(module, x, ref)
    print("the model's own floor -- agreement with itself under:", ", ".join(f"{k} {v:.1%}" for k, v in floor.items()))
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        get_backend("onnx").export(module, fp32, ExportOptions(batch=None, image_size=size))
        suites = []
        if "ort" in args.only:
            suites.append(("ort", ort_recipes(fp32, calib, Path(tmp), recipes), _ort_answers))
        if "nncf" in args.only:
            suites.append(("nncf", nncf_recipes(fp32, calib, (held_x, held_top), Path(tmp), recipes), _ov_answers))
        for runtime, recipes, answer in suites:
            for name, path, seconds in recipes:
                got = answer(path, x)
                agree = float((got.argmax(1) == ref.argmax(1)).mean())
                drop = 100 * float((ref.argmax(1) == labels).mean() - (got.argmax(1) == labels).mean())
                error = float(np.median(np.abs(got - ref).max(1)))
                rows[f"{runtime}/{name}"] = {
                    "agreement": agree,
                    "drop_points": drop,
                    "seconds": seconds,
                    "error": error,
                }
                print(
                    f"{runtime:5s} {name:32s} agreement {agree:6.1%}  drop {drop:+5.1f} pt  "
                    f"median max|logit error| {error:.3f}  {seconds:6.1f} s"
                )
    if args.json:
        record = {"host": describe(), "images": len(x), "floor": floor, "rows": rows}
        args.json.write_text(json.dumps(record, indent=1))
    return rows


if __name__ == "__main__":
    main()
