"""`keyedge bench robustness --posture`: postures side by side, the worst case per image, the Postures table.

Tiny untrained models (test_efficientnet, 32 px) on real Fashion-MNIST images, real attacks (Square, HopSkipJump),
the real query guard: what is checked is the bookkeeping -- one common subset, every budget read off one run,
bad postures refused before any attack -- not how robust an untrained model is.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from keyedge.benchmarks.postures import strategies
from keyedge.benchmarks.robustness import RobustnessConfig, run_robustness
from keyedge.benchmarks.robustness.worst import Trace, at_budgets, fastest
from keyedge.benchmarks.robustness_report import RobustnessReport
from keyedge.cli import app
from keyedge.data.datasets import FASHION_MNIST_DEBIAN
from keyedge.keys.keyfile import Key
from keyedge.postures import parse_posture

pytestmark = pytest.mark.skipif(
    not FASHION_MNIST_DEBIAN.is_dir(), reason="needs Debian's dataset-fashion-mnist (make test installs it)"
)
runner = CliRunner()
DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A plain and two keyed untrained checkpoints (32 px, 10 classes) and their keys, in one directory."""
    from keyedge.benchmarks.workbench import untrained_checkpoint
    from keyedge.models.backbones import build_model

    root = tmp_path_factory.mktemp("tiny")
    keys = [Key.from_secret(bytes([i + 1]) * 32, 4) for i in range(2)]
    for i, key in enumerate(keys):
        key.save(root / f"k{i + 1}.bin")
    for name, key in (("plain", None), ("k1", keys[0]), ("k2", keys[1])):
        torch.manual_seed(len(name))
        untrained_checkpoint(root / name, build_model("test_efficientnet", 10, key=key, weights="none", image_size=32))
    return root, keys


@pytest.fixture(scope="module")
def report(tiny):
    pytest.importorskip("pyautoattack")
    pytest.importorskip("art")
    root, keys = tiny
    config = RobustnessConfig(
        limit=8,
        steps=1,
        sweep_eps=[],
        gradient_limit=2,
        fgsm_check=False,
        query=["square:20"],
        query_budgets=[5, 20],
        query_limit=4,
        query_targets=["k1"],
        postures=["scores", "label+guard"],
        stream_frames=2,
    )
    return run_robustness([root / "plain", root / "k1", root / "k2"], keys, config)


def test_bad_postures_are_one_line_exit_2_before_any_attack(tiny, tmp_path, monkeypatch):
    from keyedge.benchmarks.robustness import evaluation

    def no_attacks(*_args, **_kwargs):  # the run's shared state: built only once every setting was checked
        raise AssertionError("the run started before the postures were checked")

    monkeypatch.setattr(evaluation.Evaluation, "__init__", no_attacks)
    root, _ = tiny
    args = ["bench", "robustness", str(root / "plain"), str(root / "k1"), "--keys", str(root), "--limit", "4"]
    for bad, message in (
        (["--posture", "label+shout"], "unknown posture part"),
        (["--posture", "scores+noise:0.9"], "noise sigma must be in"),
        (["--posture", "scores", "--posture", "topk:20"], "posture topk:20:2 answers the top 20 classes"),
        (["--posture", "label", "--query-target", "nobody"], "no evaluated model named nobody"),
    ):
        result = runner.invoke(app, [*args, "--out", str(tmp_path / "r"), *bad])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert not (tmp_path / "r").exists()


def test_worst_case_per_image_is_over_one_subset_and_below_every_single_attack():
    inf = math.inf
    transfer = Trace.from_standing("t", "adaptive", "pgd from s", "torch", torch.tensor([1, 0, 1, 1, 1, 0]))
    square = Trace("t", "query", "square 100q", "torch", [1.0, 50.0, inf, 5.0], budget=100)
    assert fastest([transfer, square], 4) == [1.0, 0.0, inf, 5.0]
    rows = at_budgets([transfer, square], [1, 10, 100], 4)
    assert [r["robust_accuracy"] for r in rows] == [0.5, 0.25, 0.25]
    for r in rows:  # never above a single attack on the same images
        assert r["robust_accuracy"] <= min(t.robust(r["budget"], 4) for t in (transfer, square))
    assert rows[1]["attack"] == "query: square 100q" and rows[1]["attack_robust_accuracy"] == 0.5


def test_headline_is_the_worst_case_per_image_on_the_query_images(report):
    worst = {w["target"]: w for w in report.worst_case}
    k1 = worst["k1"]
    assert k1["images"] == 4  # the query attacks' images: the common subset, not the 8 transfer images
    assert [b["budget"] for b in k1["budgets"]] == [0, 5, 20]
    assert len(k1["to_break"]) == 4 and "white-box: pgd from k1" not in k1["over"]
    assert {"non-adaptive: pgd from plain", "adaptive: pgd from k2", "noise: noise Linf"} <= set(k1["over"])
    queried = {o.queries["budget"]: o for o in report.outcomes if o.scenario == "query" and o.target == "k1"}
    for b in k1["budgets"]:
        assert b["robust_accuracy"] <= b["attack_robust_accuracy"]
        if b["budget"] in queried:  # the single query attack, on the same images
            assert queried[b["budget"]].images == k1["images"]
            assert b["robust_accuracy"] <= queried[b["budget"]].robust_accuracy
    assert worst["plain"]["images"] == 8 and "white-box: pgd from plain" in worst["plain"]["over"]


def test_postures_table_in_markdown_and_json_with_n_se_budgets_and_curves(report, tmp_path):
    rows = {p["posture"]: p for p in report.postures}
    assert list(rows) == ["scores", "label+guard"] and all(p["target"] == "k1" for p in rows.values())
    for p in rows.values():
        assert p["images"] == 4 and p["clean_images"] == 8 and p["latency_overhead"] is None
        assert [w["budget"] for w in p["worst"]] == [5, 20] and all(w["robust_se"] >= 0 for w in p["worst"])
        assert p["worst"][1]["robust_accuracy"] <= p["worst"][0]["robust_accuracy"]
        for w in p["worst"]:  # per image over the attacks that know it and the transfer/noise sets through the device
            assert w["robust_accuracy"] <= min(c["robust_accuracy"] for c in p["controls"])
            for s in p["strategies"]:
                assert len(s["to_break"]) == p["images"]
                standing = sum(q is None or q > w["budget"] for q in s["to_break"]) / p["images"]
                assert w["robust_accuracy"] <= standing
    known = [s.label for s in strategies(parse_posture("label+guard"))]  # every attack that knows the posture
    assert [s["strategy"] for s in rows["label+guard"]["strategies"]] == known and "hsj blinded 0.05" in known
    for s in rows["label+guard"]["strategies"]:  # one image at a time: every flagged query is attributed
        assert sum(s["extra"]["flagged"]) == s["flagged"]
    guard = rows["label+guard"]["guard"]
    assert guard["strategy"].startswith("hsj") and guard["attacked"] <= 4 and rows["scores"]["guard"] is None
    fp = report.guard_false_positives
    assert fp["iid"]["queries"] == 8 and fp["camera"]["queries"] == 2 * 4

    out = report.write(tmp_path / "rep")
    markdown = (out / "robustness.md").read_text()
    assert markdown.index("## Headline: the worst case per image") < markdown.index("## Postures")
    assert markdown.index("## Postures") < markdown.index("## Trust checks")
    table = markdown[markdown.index("## Postures") :].split("\n\n")[2]
    assert "worst @5 queries" in table and "worst @20 queries" in table and "| n |" in table
    assert "| label+guard | k1 |" in table and "not measured" in table and "±" in table
    data = json.loads((out / "robustness.json").read_text())
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(data, json.loads((DOCS / "robustness-report.schema.json").read_text()))
    assert [p["posture"] for p in data["postures"]] == ["scores", "label+guard"]
    assert data["postures"][0]["worst"][0]["robust_se"] == rows["scores"]["worst"][0]["robust_se"]
    assert data["config"]["postures"] == ["scores", "label+guard"]
    assert (out / "postures.png").stat().st_size > 0 and (out / "queries.png").stat().st_size > 0
    again = RobustnessReport.load(out / "robustness.json")  # reads back, and renders the same table
    assert again.postures == data["postures"] and "## Postures" in again.to_markdown()


def test_a_measured_latency_overhead_fills_the_column(report):
    rows = [dict(p, latency_overhead=1.031 if p["posture"] != "scores" else 1.0) for p in report.postures]
    rows[1] = dict(rows[1], strategies=[dict(rows[1]["strategies"][0], minutes_to_break=2.5)])  # rate:N
    markdown = RobustnessReport(**{**report.__dict__, "postures": rows}).to_markdown()
    assert "| 1.031x |" in markdown and "| 1.000x |" in markdown
    assert "median minutes until an image broke: label+guard on k1: hsj 2.5" in markdown


@pytest.mark.parametrize(
    ("field", "value"),
    [("to_break", [1, -2]), ("latency_overhead", "fast"), ("worst", [{"budget": 10}]), ("images", None)],
)
def test_a_hand_edited_postures_row_is_one_line(report, field, value):
    from keyedge.errors import KeyedgeError

    data = json.loads(json.dumps(report.to_dict()))
    data["postures"][0][field] = value
    with pytest.raises(KeyedgeError) as error:
        RobustnessReport.from_dict(data, "robustness.json")
    assert "\n" not in str(error.value) and f"postures[0].{field}" in str(error.value)


def test_the_guard_watch_attributes_every_flagged_query_to_its_image():
    """Square attacks every image at once: each flagged query is attributed to the image it stays within eps of."""
    from keyedge.benchmarks.postures import Strategy, detection, run_watched

    pytest.importorskip("pyautoattack")
    from keyedge.data.datasets import load_dataset

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 4, stride=4), torch.nn.Flatten(), torch.nn.Linear(256, 10)).eval()
    test, _ = load_dataset("fashion-mnist", "test", 32, limit=5, seed=0)
    images = torch.stack([test[i][0] for i in range(len(test))])
    with torch.no_grad():
        labels = model(images).argmax(1)  # the model gets every image right: every image is attacked
    for strategy in (Strategy("square"), Strategy("square", blind=0.05)):
        outcome = run_watched(model, images, labels, "scores+guard", strategy, eps=16 / 255, budget=16)
        assert sum(outcome.extra["flagged"]) == outcome.flagged
        assert outcome.flagged > 0 or strategy.blind, "the guard catches plain Square within a few queries"
        found = detection(outcome)
        assert found["attacked"] == 5 and found["detected"] == sum(f > 0 for f in outcome.extra["flagged"])
        flags = zip(outcome.extra["first_flag"], outcome.extra["flagged"])
        assert all((first is None) == (flagged == 0) for first, flagged in flags)
    plain = run_watched(model, images, labels, "scores", Strategy("square"), eps=16 / 255, budget=8)
    assert detection(plain) is None and plain.refused == 0
