"""Export benchmark: seconds per key to export N keys of one architecture, full export vs fleet template.

For each model, N keyed variants (each its own key and its own weights, as N
fine-tuned models would have) are exported to ONNX and OpenVINO twice in one
run: ``full`` (trace + convert per key, what a single export does) and
``template`` (trace once, then per key substitute the constants: keyedge.exporters.template;
the one-time template build is counted, spread over the N keys).  Outputs of both
artifacts of every key are compared on the same input (they must agree to float
precision); verification itself (identical for both) is not timed.  For the last key
the two artifacts' node counts are compared and their inference latency is timed
interleaved (batch 1, 2 threads, onnxruntime and OpenVINO): template/full must be ~1.

With ``--end-to-end`` it times what ``keyedge export --runs --keys`` does for N keys instead:
checkpoints on disk, each loaded, exported, inspected and verified (random and real images), per
target and for all targets together, full vs template interleaved key by key (alternating which
goes first; the template's one-time build is counted in the first key's time).  From the per-key cost (all targets,
template) it projects a fleet of ``--project-keys`` on ``--project-workers``
Ray workers (each builds its own template once).

Run: ``python -m keyedge.benchmarks.experiments.export``
``[--keys 10] [--models vit_tiny_patch16_224,tf_efficientnet_lite0]``
``[--end-to-end --targets onnx,openvino,coreml]``
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from keyedge.benchmarks.workbench import untrained_checkpoint
from keyedge.deploy.export import ExportRequest, ExportSettings, export_one
from keyedge.exporters import ExportOptions, get_backend
from keyedge.exporters.template import OnnxTemplate, openvino_from_onnx
from keyedge.keys.keyfile import Key
from keyedge.models.backbones import build_model
from keyedge.timing import interleave


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
        if i < count - 1:
            shutil.rmtree(full_dir)
            shutil.rmtree(tmpl_dir)
    nodes, latency = _compare_artifacts(full_dir, tmpl_dir, x)
    result = {
        "model": model_name,
        "keys": count,
        "image_size": size,
        "template_build_s": build_s,
        "max_abs_diff": worst,
        "per_key_s": {},
        "speedup": {},
        "onnx_nodes": nodes,
        "latency_template_over_full": latency,
    }
    for target in ("onnx", "openvino"):
        full = float(np.mean(times["full"][target]))
        # the template build serves both targets: charge it to ONNX, which it replaces
        tmpl = float(np.mean(times["template"][target])) + (build_s / count if target == "onnx" else 0.0)
        result["per_key_s"][target] = {"full": full, "template": tmpl}
        result["speedup"][target] = full / tmpl
    return result


def end_to_end(model_name: str, count: int, size: int, targets: list[str], work: Path, fuse: str = "gather") -> dict:
    """Seconds per key of ``export_many`` over ``count`` checkpoints, verification included: full vs template.

    ``template_steady``: the template's seconds per key after the first (which builds it) -- what each further
    key of a large fleet costs.
    """
    requests = []
    for i, model in enumerate(_variants(model_name, count, size)):
        checkpoint = untrained_checkpoint(work / f"ckpt-{i}", model)
        requests.append(ExportRequest(checkpoint, Key.from_secret(bytes([i + 1]) * 32, 4)))
    runs = [[t] for t in targets] + ([list(targets)] if len(targets) > 1 else [])  # each alone, then together
    result: dict = {"model": model_name, "keys": count, "image_size": size, "per_key_s": {}}
    for run in runs:
        label = "+".join(run)
        seconds = {"full": 0.0, "template": 0.0}
        steady = 0.0
        templates: dict = {}  # the fleet's template cache: built by the first key, its cost counted there
        for i, request in enumerate(requests):  # full and template interleaved, in alternating order
            for mode in ("full", "template") if i % 2 == 0 else ("template", "full"):
                out = work / f"out-{label}-{mode}"
                settings = ExportSettings(targets=run, out=out, template=mode == "template", fuse=fuse)
                start = time.perf_counter()
                export_one(request, settings, templates=templates if mode == "template" else None)
                seconds[mode] += time.perf_counter() - start
                if mode == "template" and i > 0:
                    steady += time.perf_counter() - start
        for mode in seconds:
            shutil.rmtree(work / f"out-{label}-{mode}")
        result["per_key_s"][label] = {mode: s / count for mode, s in seconds.items()}
        result["per_key_s"][label]["template_steady"] = steady / max(count - 1, 1)
    return result


def _compare_artifacts(full_dir: Path, tmpl_dir: Path, x: np.ndarray, rounds: int = 15, calls: int = 20):
    """ONNX node counts of both artifacts; per runtime, the template/full latency ratio over interleaved rounds
    (each round's median call), both artifacts opened through their backend (2 threads, CPU)."""
    import onnx

    nodes = {
        name: len(onnx.load(str(d / "m.onnx")).graph.node) for name, d in (("full", full_dir), ("template", tmpl_dir))
    }
    latency = {}
    for runtime, target, file in (("onnxruntime", "onnx", "m.onnx"), ("openvino", "openvino", "m.xml")):
        backend = get_backend(target)
        runners = {name: backend.load(d / file, threads=2) for name, d in (("full", full_dir), ("template", tmpl_dir))}
        try:
            timing = interleave(
                {name: functools.partial(runner.infer, x) for name, runner in runners.items()},
                rounds=rounds,
                calls=calls,
                warmup=5,
            )
        finally:
            for runner in runners.values():
                runner.close()
        ratios = timing.ratio("template", "full", per="medians")
        latency[runtime] = {"median": ratios.median, "p10": ratios.p10, "p90": ratios.p90, "rounds": rounds}
    return nodes, latency


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_tiny_patch16_224,tf_efficientnet_lite0")
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--end-to-end", action="store_true", help="time export_many with verification (see above)")
    parser.add_argument("--targets", default="onnx,openvino,coreml", help="--end-to-end: targets to time")
    parser.add_argument("--fuse", default="gather", help="--end-to-end: the shuffle's form (gather, conv, ...)")
    parser.add_argument("--project-keys", type=int, default=1000)
    parser.add_argument("--project-workers", type=int, default=16)
    args = parser.parse_args(argv)
    if args.end_to_end:
        return _main_end_to_end(args)
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
            n = res["onnx_nodes"]
            print(f"  {model_name:>24}    nodes: full {n['full']}, template {n['template']} (ONNX)")
            for runtime, r in res["latency_template_over_full"].items():
                print(
                    f"  {model_name:>24} latency template/full {runtime}: {r['median']:.3f} "
                    f"(p10-p90 {r['p10']:.3f}-{r['p90']:.3f}, {r['rounds']} interleaved rounds)"
                )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def _main_end_to_end(args) -> list[dict]:
    targets = [t for t in args.targets.split(",") if get_backend(t).available()[0]]
    print(
        f"end-to-end export: {args.keys} checkpoints per model, {args.image_size}x{args.image_size}, batch 1, fp32, "
        f"fuse {args.fuse}, "
        f"verified on 8 random + 8 real images, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"targets {', '.join(targets)}"
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models.split(","):
            work = Path(tmp) / model_name
            work.mkdir()
            res = end_to_end(model_name, args.keys, args.image_size, targets, work, args.fuse)
            results.append(res)
            for label, modes in res["per_key_s"].items():
                shown = ", ".join(f"{mode} {s:5.2f} s/key" for mode, s in modes.items())
                print(f"  {model_name:>24} {label:>15}: {shown}")
            per_key = res["per_key_s"]["+".join(targets)]["template"]
            hours = per_key * args.project_keys / args.project_workers / 3600
            res["projection"] = {"keys": args.project_keys, "workers": args.project_workers, "hours": hours}
            print(
                f"  {model_name:>24} projection: {args.project_keys} keys x {per_key:.2f} s/key (all targets, "
                f"template) / {args.project_workers} workers = {hours * 60:.1f} min "
                "(one such worker per Ray job; training not included)"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
