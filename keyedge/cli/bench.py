"""``keyedge bench``: latency of exported artifacts on a device profile, the regression gate, robustness.

``keyedge bench latency DIR... [--profile devices/X.toml] [--out REPORT]`` times every artifact of the export
directories given, interleaved, and reports keyed/plain, gather/fold and runtime ratios;
``keyedge bench regress --baseline B.json --current C.json`` exits 1 on a regression;
``keyedge bench robustness CKPT... --out REPORT`` attacks the models. Both reports are ``--out DIR``:
``DIR/latency.{json,md}``, ``DIR/robustness.{json,md}`` and plots.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import typer

from keyedge.cli._console import console, err_console, progress_bar
from keyedge.cli._flags import device_option, key_file_option, overwrite_option, renamed, retired, seed_option

bench_app = typer.Typer(
    help="Measure models: latency on a device profile, the latency gate, robustness under attack, CoreML plans.",
    no_args_is_help=True,
)


def _sealkeys(paths: list[Path] | None) -> list:
    """The sealing keys given with --seal (each refused now if invalid or readable by others)."""
    from keyedge.keys.seal import load_sealkey

    return [load_sealkey(path) for path in paths or []]


def _check_report_dir(out: Path | None, overwrite: bool) -> None:
    """A report directory that exists (without --overwrite) or cannot be written fails now, not after the work."""
    from keyedge.fileio import check_output_directory

    if out is not None:
        check_output_directory(out, overwrite=overwrite)


REPORT_OUT_HELP = (
    "Both bench commands write their report as --out DIR: DIR/<name>.json (the data), DIR/<name>.md and, "
    "for robustness, PNG plots; --overwrite replaces DIR as a whole."
)


@bench_app.command("latency", epilog=REPORT_OUT_HELP)
def latency(
    paths: list[Path] = typer.Argument(
        ...,
        help="Export directories (OUT/<model>-<fingerprint>/), artifact files, or "
        "checkpoint directories (torch runtime).",
    ),
    profile_path: Path | None = typer.Option(
        None, "--profile", help="Device profile TOML (default: devices/cpu-x86.toml, or a built-in CPU profile)."
    ),
    old_device: str | None = retired(
        "--device",
        "-d",
        message="bench latency takes no --device (-d): device profiles are --profile",
        hint="pass --profile devices/<device>.toml (its [[runtime]] entries choose the devices)",
    ),
    threads: int | None = typer.Option(None, "--threads", min=1, help="Threads per runtime (default: the profile's)."),
    min_seconds: float | None = typer.Option(
        None, "--min-seconds", min=0.0, help="Minimum timed seconds per artifact."
    ),
    min_iterations: int | None = typer.Option(
        None, "--min-iterations", min=1, help="Minimum timed inferences per artifact."
    ),
    warmup: int | None = typer.Option(None, "--warmup", min=0, help="Untimed inferences after the first one."),
    rounds: int | None = typer.Option(None, "--rounds", min=1, help="Interleaved rounds aimed for."),
    batch: list[int] | None = typer.Option(
        None,
        "--batch",
        "-b",
        min=1,
        help="Batch sizes for dynamic-batch artifacts (repeatable; default: the profile's).",
    ),
    key_files: list[Path] | None = key_file_option(
        "Key of a keyed checkpoint for the torch runtime (repeatable; matched by fingerprint, never recorded)."
    ),
    seal: list[Path] | None = typer.Option(
        None, "--seal", help="Sealing key file of sealed artifacts (repeatable; matched by fingerprint)."
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Report directory: OUT/latency.json (keyedge-latency/1) and OUT/latency.md; without it, the table only.",
    ),
    json_out: Path | None = renamed("--json", new="--out DIR (DIR/latency.json)"),
    markdown_out: Path | None = renamed("--markdown", new="--out DIR (DIR/latency.md)"),
    overwrite: bool = overwrite_option("Replace an existing --out directory."),
    host_precision: bool = typer.Option(
        False,
        "--host-precision",
        help="Also time each OpenVINO artifact at the runtime's own default precision on this host (bf16 on "
        "AMX / AVX-512 BF16 CPUs), beside the pinned one parity needs: the host/pinned ratio.",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
) -> None:
    """Time artifacts (load, first and steady inference, throughput, memory), interleaved, with keyed/plain ratios."""

    from keyedge.benchmarks.latency import BenchSettings, run_latency
    from keyedge.benchmarks.profiles import builtin_profile, load_profile, with_host_precision
    from keyedge.fileio import check_writable
    from keyedge.keys.keyfile import load_key

    _check_report_dir(out, overwrite)
    for old in (json_out, markdown_out):
        if old is not None:  # an unwritable report path fails now, not after the measurement
            check_writable(old, overwrite=overwrite, flag="--overwrite")
    profile = load_profile(profile_path) if profile_path is not None else builtin_profile()
    if host_precision:
        profile = with_host_precision(profile)
    keys = [load_key(path) for path in key_files or []]
    sealkeys = _sealkeys(seal)
    settings = BenchSettings(
        threads=threads,
        min_seconds=min_seconds,
        min_iterations=min_iterations,
        warmup=warmup,
        rounds=rounds,
        batch_sizes=list(batch) if batch else None,
    )
    if progress:
        with progress_bar(counts=False) as bar:
            report = run_latency(paths, profile, settings, progress=bar, keys=keys, sealkeys=sealkeys)
    else:
        report = run_latency(paths, profile, settings, keys=keys, sealkeys=sealkeys)
    report.print_rich(console)
    _write_latency(report, out, json_out, markdown_out, overwrite)


def _write_latency(report, out: Path | None, json_out: Path | None, markdown_out: Path | None, overwrite: bool):
    """OUT/latency.json and OUT/latency.md (all or nothing); the old --json / --markdown files as before."""
    from keyedge.fileio import staged_directory, write_bytes_atomic

    if out is not None:
        with staged_directory(out, overwrite=overwrite, mode=0o755) as tmp:
            (tmp / "latency.json").write_text(report.to_json())
            (tmp / "latency.md").write_text(report.to_markdown())
        err_console.print(f"wrote {out}/latency.json and latency.md", markup=False)
    for old, text in ((json_out, report.to_json()), (markdown_out, report.to_markdown())):
        if old is not None:
            write_bytes_atomic(old, text.encode(), overwrite=overwrite, flag="--overwrite")
            err_console.print(f"wrote {old}", markup=False)


@bench_app.command("regress")
def regress(
    baseline: Path | None = typer.Option(
        None,
        "--baseline",
        help="Baseline keyedge-latency/1 JSON report (without "
        "one only the current report's keyed/plain and gather/fold ratios are gated).",
    ),
    current: Path = typer.Option(..., "--current", help="Current keyedge-latency/1 JSON report."),
    profile_path: Path | None = typer.Option(
        None, "--profile", help="Profile whose [thresholds] apply (default: those recorded in the current report)."
    ),
    old_device: str | None = retired(
        "--device",
        "-d",
        message="bench regress takes no --device (-d): the thresholds' device profile is --profile",
        hint="pass --profile devices/<device>.toml",
    ),
    only: list[str] | None = typer.Option(
        None,
        "--only",
        help="Gate only these checks (repeatable): p50, ratio, "
        "accuracy. Use --only ratio across machines: absolute times differ.",
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Write the gate's result as JSON here."),
    overwrite: bool = overwrite_option("Replace an existing --json file."),
) -> None:
    """Fail (exit 1) when p50 latency, a keyed/plain ratio or accuracy regressed past the profile's thresholds."""
    import json

    from keyedge.benchmarks.profiles import load_profile
    from keyedge.benchmarks.regress import GATED, compare
    from keyedge.benchmarks.report import LatencyReport
    from keyedge.errors import KeyedgeError
    from keyedge.fileio import check_writable, write_bytes_atomic

    if json_out is not None:
        check_writable(json_out, overwrite=overwrite, flag="--overwrite")
    unknown = sorted(set(only or ()) - set(GATED))
    if unknown:
        raise KeyedgeError(f"unknown check {', '.join(unknown)} for --only", f"use {', '.join(GATED)}")
    thresholds = load_profile(profile_path).thresholds if profile_path is not None else None
    result = compare(
        LatencyReport.load(baseline) if baseline is not None else None,
        LatencyReport.load(current),
        thresholds,
        checks=tuple(only or GATED),
    )
    result.print_rich(console)
    if json_out is not None:
        write_bytes_atomic(
            json_out, (json.dumps(result.to_dict(), indent=2) + "\n").encode(), overwrite=overwrite, flag="--overwrite"
        )
    if not result.passed:
        raise typer.Exit(1)


# bench robustness's options, declared here so that the command reads as its list of settings
CHECKPOINTS = typer.Argument(..., help="Checkpoint directories (or directories holding several).")
R_KEY_FILE = key_file_option(
    "Key file (repeatable); matched to checkpoints by fingerprint. Every key is also a key-diversity column."
)
R_KEYS = typer.Option(None, "--keys", help="Directory of key files.")
R_DATA = typer.Option("fashion-mnist", "--data", "-d", help="Test data (as for train).")
R_LIMIT = typer.Option(500, "--limit", min=1, help="Test images (class-stratified, seeded).")
R_SEED = seed_option("Seed of the test subset and the attacks.")
ATTACK = typer.Option(
    "pgd",
    "--attack",
    help="Attack crafting the adversarial sets: pgd, apgd-ce, apgd-dlr, mifgsm, ifgsm, fgsm, pgdl2, autoattack.",
)
EPS = typer.Option(
    "16/255", "--eps", help="Budget, e.g. 8/255 (Fashion-MNIST needs 16/255 for white-box PGD to reach ~0)."
)
STEPS = typer.Option(20, "--steps", min=1, help="Attack steps.")
SWEEP_EPS = typer.Option(
    "0,2/255,4/255,8/255,16/255", "--sweep-eps", help="Budgets of the eps sweep (comma-separated; '' for none)."
)
SWEEP_LIMIT = typer.Option(200, "--sweep-limit", min=1, help="Images in the eps sweep.")
GRADIENT_LIMIT = typer.Option(128, "--gradient-limit", min=1, help="Images for gradient similarity.")
EOT_MAX = typer.Option(0, "--eot-max", min=0, help="Surrogates summed in multi-key EoT (0: all, >= 2 used).")
ARTIFACTS = typer.Option(
    None,
    "--artifacts",
    "-a",
    help="Export directories of evaluated checkpoints: classify the adversarial images with them too.",
)
R_SEAL = typer.Option(
    None, "--seal", help="Sealing key file of sealed --artifacts (repeatable; matched by fingerprint)."
)
LOCALIZED = typer.Option(
    "",
    "--localized",
    help="Localized attacks, white-box on every model, e.g. 'npixel:1,npixel:4,npixel:16,patch:0.05,patch:0.25'.",
)
LOCALIZED_LIMIT = typer.Option(100, "--localized-limit", min=1, help="Images for the localized attacks.")
NPIXEL_POPSIZE = typer.Option(
    50, "--npixel-popsize", min=4, help="N-pixel: differential-evolution population (Su et al.: 400)."
)
NPIXEL_STEPS = typer.Option(20, "--npixel-steps", min=0, help="N-pixel: generations (Su et al.: 100).")
QUERY = typer.Option(
    "",
    "--query",
    help="Query attacks (outputs only, no key, no gradients) on the models and the --artifacts, e.g. "
    "'square:5000,hsj:1000' (QUERIES per image).",
)
QUERY_BUDGETS = typer.Option(
    "100,1000,5000", "--query-budgets", help="Query budgets robust accuracy is read off at (comma-separated)."
)
QUERY_LIMIT = typer.Option(100, "--query-limit", min=1, help="Images for the query attacks.")
QUERY_TARGET = typer.Option(
    None,
    "--query-target",
    help="Model (directory name) to run the query attacks and postures on (repeatable; default: all).",
)
POSTURE = typer.Option(
    None,
    "--posture",
    help="Deployment posture to measure on the query targets (repeatable), e.g. scores, topk:3, label, "
    "scores+noise:0.05, label+guard, label+noise:0.02+guard:lock+rate:60: the attacks that know it, on the "
    "--query-limit images, read off at every --query-budgets budget, with transfer and noise through its device.",
)
POSTURE_LATENCY = typer.Option(
    "onnx",
    "--posture-latency",
    help="Runtime the postures' latency against scores is timed on (each posture exported to it, guard "
    "included, interleaved); 'none' to leave the column out.",
)
STREAM_FRAMES = typer.Option(
    250, "--stream-frames", min=1, help="Camera-like frames per scene for the guard's false positives."
)
R_BATCH_SIZE = typer.Option(100, "--batch-size", min=1, help="Images per attack batch.")
R_OUT = typer.Option(
    Path("reports/robustness"),
    "--out",
    "-o",
    help="Report directory: OUT/robustness.json (keyedge-robustness/1), OUT/robustness.md and PNG plots.",
)


@bench_app.command("robustness", epilog=REPORT_OUT_HELP)
def robustness(
    checkpoints: list[Path] = CHECKPOINTS,
    key_file: list[Path] | None = R_KEY_FILE,
    keys: Path | None = R_KEYS,
    data: str = R_DATA,
    limit: int = R_LIMIT,
    seed: int = R_SEED,
    attack: str = ATTACK,
    eps: str = EPS,
    steps: int = STEPS,
    sweep_eps: str = SWEEP_EPS,
    sweep_limit: int = SWEEP_LIMIT,
    gradient_limit: int = GRADIENT_LIMIT,
    eot_max: int = EOT_MAX,
    artifacts: list[Path] | None = ARTIFACTS,
    seal: list[Path] | None = R_SEAL,
    localized: str = LOCALIZED,
    localized_limit: int = LOCALIZED_LIMIT,
    npixel_popsize: int = NPIXEL_POPSIZE,
    npixel_steps: int = NPIXEL_STEPS,
    query: str = QUERY,
    query_budgets: str = QUERY_BUDGETS,
    query_limit: int = QUERY_LIMIT,
    query_target: list[str] | None = QUERY_TARGET,
    posture: list[str] | None = POSTURE,
    posture_latency: str = POSTURE_LATENCY,
    stream_frames: int = STREAM_FRAMES,
    batch_size: int = R_BATCH_SIZE,
    device: str = device_option(),
    out: Path = R_OUT,
    overwrite: bool = overwrite_option("Replace an existing report directory."),
) -> None:
    """Attack keyed models: white-box sanity, transfer (non-adaptive, adaptive, multi-key EoT), the noise control,
    query attacks, deployment postures; the worst case per image without the key as headline; matrices, sweeps,
    deployed artifacts."""
    config = _robustness_config(SimpleNamespace(**locals()))  # every bad setting fails now, before any attack
    from keyedge.checkpoints import find_checkpoints
    from keyedge.deploy.runtime import check_sealkeys
    from keyedge.keys.keyfile import load_keys

    _check_report_dir(out, overwrite)
    paths = [c for p in checkpoints for c in find_checkpoints(p)]
    key_list = list(load_keys(list(key_file or []) + ([keys] if keys else [])).values())
    sealkeys = _sealkeys(seal)
    check_sealkeys(config.artifacts, sealkeys)  # a sealed set without its key: now, not after every attack
    report = _run_robustness(paths, key_list, config, sealkeys, _posture_latency(posture_latency, config))
    report.print_rich(console)
    report.write(out, overwrite=overwrite)
    err_console.print(f"wrote {out}/robustness.json, robustness.md and plots", markup=False)
    if not report.sanity["passed"]:
        err_console.print(
            "warning: the white-box sanity check failed; the robust accuracies above are not "
            "trustworthy (see the trust checks)",
            markup=False,
        )


def _robustness_config(o: SimpleNamespace):
    """``bench robustness``'s options as a ``RobustnessConfig``: the attack, budgets and specs checked first."""
    from keyedge.benchmarks.robustness import RobustnessConfig
    from keyedge.postures import parse_posture
    from keyedge.training.loop import resolve_device

    _check_scenario_attack(o.attack)
    budgets = _split(o.sweep_eps)
    _check_budgets(o.attack, [o.eps, *budgets])
    local, queries = _split(o.localized), _split(o.query)
    _check_specs(local, queries)
    postures = [str(parse_posture(spec)) for spec in o.posture or []]  # one line naming a bad part, exit 2
    return RobustnessConfig(
        data=o.data,
        limit=o.limit,
        seed=o.seed,
        attack=o.attack,
        eps=o.eps,
        steps=o.steps,
        sweep_eps=budgets,
        sweep_limit=o.sweep_limit,
        gradient_limit=o.gradient_limit,
        eot_max=o.eot_max,
        batch_size=o.batch_size,
        device=str(resolve_device(o.device)),
        artifacts=[str(a) for a in o.artifacts or []],
        localized=local,
        localized_limit=o.localized_limit,
        npixel_popsize=o.npixel_popsize,
        npixel_steps=o.npixel_steps,
        query=queries,
        query_budgets=_query_budgets(o.query_budgets),
        query_limit=o.query_limit,
        query_targets=list(o.query_target or []),
        postures=list(dict.fromkeys(postures)),
        stream_frames=o.stream_frames,
    )


def _split(text: str) -> list[str]:
    """A comma-separated option's items, blanks dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _check_scenario_attack(attack: str) -> None:
    """--attack names an attack that crafts transfer sets (single-step or iterative; localized ones: --localized)."""
    from keyedge.attacks import list_attacks
    from keyedge.errors import KeyedgeError

    scenario_attacks = list_attacks(kind=("single-step", "iterative"))
    if attack in list_attacks(kind="query"):
        raise KeyedgeError(
            f"{attack} is a query attack, not one that crafts transfer sets", f"run it with --query {attack}"
        )
    if attack not in scenario_attacks:
        raise KeyedgeError(f"unknown attack {attack!r} for the scenarios", f"use one of {', '.join(scenario_attacks)}")


def _check_budgets(attack: str, budgets: list[str]) -> None:
    """--eps and --sweep-eps parse, and an Linf budget fits in the [0, 1] pixel range."""
    from keyedge.attacks import get_attack, parse_eps
    from keyedge.errors import KeyedgeError

    linf = get_attack(attack).norm == "Linf"
    for text in budgets:
        value = parse_eps(text)  # a bad budget fails now, not after an hour of attacks
        if linf and value > 1:
            raise KeyedgeError(
                f"--eps {text} is more than the whole [0, 1] pixel range for an Linf attack",
                f"write it as a fraction of the range, e.g. {text}/255",
            )


def _check_specs(localized: list[str], queries: list[str]) -> None:
    """--localized and --query specs parse (one line naming the bad one otherwise)."""
    from keyedge.benchmarks.robustness import parse_localized, parse_query

    for spec in localized:
        parse_localized(spec)
    for spec in queries:
        parse_query(spec)


def _query_budgets(text: str) -> list[int]:
    """--query-budgets as positive integers."""
    from keyedge.errors import KeyedgeError

    budgets = []
    for item in _split(text):
        if not item.isdigit() or int(item) < 1:
            raise KeyedgeError(
                f"bad query budget {item!r} in --query-budgets", "write positive integers, e.g. 100,1000"
            )
        budgets.append(int(item))
    return budgets


def _posture_latency(target: str, config):
    """The postures table's latency column: each posture timed against scores on ``target`` ('none': no column)."""
    if target == "none" or not config.postures:
        return None
    from keyedge.benchmarks.posture_latency import latency_overheads
    from keyedge.errors import KeyedgeError
    from keyedge.exporters import get_backend

    backend = get_backend(target)  # an unknown runtime: one line, before any attack
    if not backend.available()[0] or not backend.can_run()[0]:
        raise KeyedgeError(f"--posture-latency {target}: its runtime does not run here", "use onnx, or none")
    return latency_overheads(config.postures, target=target, log=lambda line: err_console.print(line, markup=False))


def _run_robustness(paths: list[Path], keys: list, config, sealkeys: list, latency=None):
    """Run the scenarios with a progress bar per stage and log lines on stderr."""
    from keyedge.benchmarks.robustness import run_robustness

    with progress_bar() as bar:

        def progress(label: str, total: int):
            task = bar.add_task(label, total=total)
            return lambda done: bar.update(task, completed=done)

        return run_robustness(
            paths,
            keys,
            config,
            progress=progress,
            log=lambda line: err_console.print(line, markup=False),
            sealkeys=sealkeys,
            latency=latency,
        )


@bench_app.command("compute-plan")
def compute_plan(
    path: Path = typer.Argument(..., help="A .mlpackage written by `keyedge export --target coreml`."),
    compute_units: str = typer.Option("ALL", "--compute-units", help="CPU_ONLY, CPU_AND_GPU, CPU_AND_NE or ALL."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Which device CoreML plans each op on (macOS 14.4+): does the key's shuffle leave the Neural Engine?"""
    import json
    from collections import Counter

    from rich.table import Table

    from keyedge.exporters import get_backend

    rows = get_backend("coreml").compute_plan(path, compute_units)
    if as_json:
        print(json.dumps({"path": str(path), "compute_units": compute_units, "operations": rows}, indent=2))
        return
    table = Table(title=f"CoreML compute plan of {path} ({compute_units})")
    for h in ("#", "op", "output", "preferred", "supported", "cost"):
        table.add_column(h)
    for i, r in enumerate(rows):
        if r["op"] != "const":
            table.add_row(
                str(i),
                r["op"],
                r["output"],
                str(r["preferred"]),
                ",".join(r["supported"]),
                "-" if r["cost"] is None else f"{r['cost']:.4f}",
            )
    console.print(table)
    by_device = Counter(r["preferred"] for r in rows if r["op"] != "const")
    console.print("ops per preferred device: " + ", ".join(f"{d}: {n}" for d, n in by_device.items()), markup=False)
    shuffle_ops = [r for r in rows if r["op"] in ("gather", "gather_along_axis", "space_to_depth", "depth_to_space")]
    for r in shuffle_ops:
        console.print(f"key shuffle op {r['op']} ({r['output']}) runs on {r['preferred']}", markup=False)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
