"""Deployment postures: the spec grammar, the in-graph outputs and noise, the query guard and the rate limit."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from keyedge.postures import Posture, PostureError, parse_posture
from keyedge.postures.graph import PostureModule, posture_outputs
from keyedge.postures.guard import GuardConfig, Guarded, GuardError, QueryGuard


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("", "scores"),
        ("scores", "scores"),
        ("label+noise:0.02+guard", "label+noise:0.02+guard"),
        ("guard:lock + LABEL", "label+guard:lock"),
        ("topk:3", "topk:3:2"),
        ("rate:60+topk:5:1", "topk:5:1+rate:60"),
        ("noise:8/255", "scores+noise:0.0313725"),
    ],
)
def test_posture_specs_read_and_print_canonically(text, canonical):
    posture = parse_posture(text)
    assert str(posture) == canonical
    assert parse_posture(str(posture)) == posture
    assert Posture.from_dict(posture.to_dict()) == posture


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lable", "unknown posture part 'lable'"),
        ("noise:0.9", r"noise sigma must be in \[0, 0.5\]"),
        ("noise:-1", "noise:SIGMA must be a number"),
        ("noise:1/0", "divides by zero"),
        ("topk", "topk:K must be a whole number"),
        ("topk:0", "topk:K needs K in 1..1000"),
        ("topk:3:9", "decimals must be 0..6"),
        ("guard:kill", "unknown guard action 'kill'"),
        ("rate:0", "rate must be 1..1000000"),
        ("label+scores", "names outputs twice"),
        ("label:3", "takes no argument"),
    ],
)
def test_bad_posture_specs_are_one_line_errors(text, message):
    with pytest.raises(PostureError, match=message) as err:
        parse_posture(text)
    assert "\n" not in str(err.value)


def test_a_record_that_disagrees_with_its_spec_is_refused():
    record = parse_posture("label").to_dict() | {"noise": 0.1}
    with pytest.raises(PostureError, match="disagrees"):
        Posture.from_dict(record)


def test_outputs_keep_the_scores_shape_and_reveal_only_what_the_posture_allows():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 2.0, 0.0]])
    assert torch.equal(posture_outputs(logits, parse_posture("scores")), logits)
    label = posture_outputs(logits, parse_posture("label"))
    assert torch.equal(label, torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    top2 = posture_outputs(logits, parse_posture("topk:2:1"))
    probs = logits.softmax(1)
    assert (top2 > 0).sum(1).tolist() == [2, 2]
    assert torch.allclose(top2[0, :2], torch.round(probs[0, :2] * 10) / 10)
    assert torch.equal(top2.argmax(1), logits.argmax(1))


def test_noise_is_drawn_afresh_for_every_query_and_the_deterministic_twin_has_none():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x = torch.rand(2, 3, 2, 2)
    noisy = PostureModule(module, parse_posture("noise:0.1"))
    assert not torch.equal(noisy(x), noisy(x))
    twin = PostureModule(module, parse_posture("noise:0.1"), noise=False)
    assert torch.equal(twin(x), module(x))
    # the noise has the posture's sigma: the output spread matches sigma * |weights|
    outs = torch.stack([noisy(x)[0] for _ in range(2000)])
    expected = 0.1 * module[1].weight.norm(dim=1)
    assert torch.allclose(outs.std(0), expected, rtol=0.1)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 32, 32), dtype=np.float32)


def _probes(image: np.ndarray, n: int, seed: int = 1) -> list[np.ndarray]:
    """What Square sends: the image with +-eps stripes, then one small square changed per query."""
    rng = np.random.default_rng(seed)
    eps = 16 / 255
    stripes = rng.choice([-eps, eps], size=(3, 1, image.shape[2])).astype(np.float32)
    base = np.clip(image + stripes, 0, 1)
    out = []
    for _ in range(n):
        query = base.copy()
        r, c = rng.integers(0, image.shape[1] - 4, size=2)
        query[:, r : r + 4, c : c + 4] = np.clip(image[:, r : r + 4, c : c + 4] - stripes[:, :, c : c + 4], 0, 1)
        out.append(query)
    return out


def test_guard_passes_distinct_images_and_stops_an_attack_sequence_within_a_few_queries():
    guard = QueryGuard(action="refuse", autosave=False)
    assert all(v.answered and not v.flagged for v in guard.check_batch(_images(200)))
    verdicts = guard.check_batch(_probes(_images(1, seed=7)[0], 10))
    first = next(i for i, v in enumerate(verdicts) if not v.answered)
    assert first <= 3 and verdicts[first].flagged and "attack query sequence" in verdicts[first].reason
    assert guard.counters["refused"] >= 7


def test_a_malformed_query_with_nan_pixels_is_fingerprinted_not_a_warning():
    """Attackers' tools can send NaN pixels (HopSkipJump divides by a zero step): the guard reads them as 0."""
    guard = QueryGuard(action="refuse", autosave=False)
    image = _images(1, seed=5)[0].copy()
    image[:, :4] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(guard.fingerprint(image), guard.fingerprint(np.nan_to_num(image)))
        assert guard.check(image).answered


def test_flag_answers_and_lock_answers_the_flagged_query_then_refuses_everything_until_unlocked():
    image = _images(1)[0]
    flag = QueryGuard(action="flag", autosave=False)
    verdicts = flag.check_batch([image, image, image])
    assert all(v.answered for v in verdicts) and verdicts[1].flagged
    lock = QueryGuard(action="lock", autosave=False)
    assert lock.check(image).answered and lock.check(image).flagged  # the flagged query is the last answered
    assert (
        lock.locked and not lock.check(image).answered and not lock.check(_images(1, seed=3)[0]).answered
    )  # a fresh image too
    lock.unlock()
    assert lock.check(_images(1, seed=4)[0]).answered


def test_rate_limit_per_minute_with_a_clock():
    now = [1000.0]
    guard = QueryGuard(action=None, rate=3, autosave=False, clock=lambda: now[0])
    images = _images(5)
    assert [v.answered for v in guard.check_batch(images[:4])] == [True, True, True, False]
    assert "rate limit" in guard.check(images[4]).reason
    now[0] += 61
    assert guard.check(images[4]).answered


def test_guard_state_survives_a_restart_and_a_foreign_or_corrupt_state_is_refused(tmp_path):
    state = tmp_path / "guard.npz"
    image = _images(1)[0]
    guard = QueryGuard(action="lock", state=state, owner="device-1")
    guard.check(image)
    assert guard.check(image).flagged and guard.locked and state.stat().st_mode & 0o777 == 0o600
    again = QueryGuard(action="lock", state=state, owner="device-1")
    assert again.locked and again.counters == guard.counters
    fresh = QueryGuard(action="refuse", state=tmp_path / "other.npz", owner="device-1")
    fresh.check(image)
    restarted = QueryGuard(action="refuse", state=tmp_path / "other.npz", owner="device-1")
    assert not restarted.check(image).answered, "the history survives the restart"
    with pytest.raises(GuardError, match="another device"):
        QueryGuard(state=state, owner="device-2")
    with pytest.raises(GuardError, match="other guard settings"):
        QueryGuard(GuardConfig(window=20), state=state, owner="device-1")
    state.write_bytes(b"not a guard state")
    with pytest.raises(GuardError, match="corrupt") as err:
        QueryGuard(state=state, owner="device-1")
    assert "\n" not in str(err.value)


def test_history_is_bounded_and_old_queries_are_forgotten():
    guard = QueryGuard(GuardConfig(history=5), action="refuse", autosave=False)
    image = _images(1)[0]
    guard.check(image)
    guard.check_batch(_images(5, seed=2))
    assert guard.counters["history"] == 5
    assert guard.check(image).answered, "the first query left the history"


def test_guarded_runner_answers_only_what_the_guard_allows():
    class Runner:
        calls = 0

        def predict(self, x):
            Runner.calls += len(x)
            return np.ones((len(x), 4), dtype=np.float32)

    guarded = Guarded(Runner(), QueryGuard(action="refuse", autosave=False), classes=4)
    image = _images(1)[0]
    out, verdicts = guarded.answer(np.stack([image, image, image]))
    assert [v.answered for v in verdicts] == [True, False, False]
    assert Runner.calls == 1 and np.isnan(out[1:]).all() and (out[0] == 1).all()


# ---- the harness: query attacks that know the posture ------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_small():
    """A small CNN trained for a few seconds on Fashion-MNIST (32x32): something a query attack can break."""
    from keyedge.data.datasets import load_dataset

    data, _ = load_dataset("fashion-mnist", "train", 32, limit=1500, seed=0)
    test, _ = load_dataset("fashion-mnist", "test", 32, limit=16, seed=0)
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.as_tensor(data.labels)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 10),
    )
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(3):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
            opt.step()
    images = torch.stack([test[i][0] for i in range(len(test))])
    return model.eval(), images, torch.as_tensor(test.labels)


def test_strategies_fit_what_the_posture_answers():
    from keyedge.benchmarks.postures import strategies

    labels = lambda spec: [s.label for s in strategies(parse_posture(spec))]  # noqa: E731
    assert labels("scores") == ["square"]
    assert labels("label") == ["hsj", "rays"]
    assert labels("topk:3+noise:0.05") == ["square", "square EoT x4"]
    assert labels("label+guard") == ["hsj", "rays", "hsj blinded 0.05", "rays blinded 0.05"]


def test_guard_refuses_plain_square_and_every_query_is_counted(trained_small):
    from keyedge.benchmarks.postures import Strategy, run_strategy, worst_per_image

    model, images, labels = trained_small
    pytest.importorskip("pyautoattack")
    open_device = run_strategy(model, images, labels, "scores", Strategy("square"), eps=16 / 255, budget=60)
    guarded = run_strategy(model, images, labels, "scores+guard", Strategy("square"), eps=16 / 255, budget=60)
    assert open_device.refused == 0 and open_device.first_flag is None
    assert guarded.refused > guarded.device_queries / 2, "the guard refuses most of a plain Square's queries"
    assert guarded.first_flag is not None and guarded.first_flag <= 4 * len(images)
    assert guarded.robust_accuracy() >= open_device.robust_accuracy()
    # every image's queries until broken are device queries within the budget; per image worst case
    assert all(q == 0 or q > 1 for q in open_device.to_break)
    worst, n = worst_per_image([open_device, guarded], 60)
    assert n == len(images) and worst <= min(open_device.robust_accuracy(), guarded.robust_accuracy())
    assert guarded.to_dict()["robust_se"] >= 0


def test_eot_spends_repeats_device_queries_per_attacker_query(trained_small):
    from keyedge.benchmarks.postures import Strategy, run_strategy

    model, images, labels = trained_small
    pytest.importorskip("pyautoattack")
    outcome = run_strategy(
        model, images[:6], labels[:6], "scores+noise:0.05", Strategy("square", repeats=4), eps=16 / 255, budget=40
    )
    assert outcome.device_queries % 4 == 0 and outcome.device_queries <= 4 * 6 * 10 + 4 * 6
    assert all(q % 4 == 0 for q in outcome.to_break if math.isfinite(q))


def test_postures_experiment_runs_end_to_end_and_reports_false_positives(small_keyed_checkpoint, tmp_path):
    """The experiment on an (untrained) checkpoint: every posture's attacks, worst case, guard false positives."""
    from keyedge.benchmarks.experiments import postures

    pytest.importorskip("pyautoattack")
    pytest.importorskip("skimage")
    checkpoint, key = small_keyed_checkpoint
    out = tmp_path / "postures.json"
    args = [str(checkpoint), "-k", str(key), "--images", "6", "--budgets", "10,20", "--postures", "scores,scores+guard"]
    results = postures.main([*args, "--stream-frames", "3", "--json", str(out)])
    assert [p["posture"] for p in results["postures"]] == ["scores", "scores+guard"]
    guarded = results["postures"][1]
    assert [o["strategy"] for o in guarded["outcomes"]] == ["square", "square blinded 0.05"]
    assert set(guarded["worst"]) == {"10", "20"} and guarded["worst"]["20"] <= guarded["worst"]["10"]
    assert [d["strategy"] for d in guarded["detection"]] == ["square", "square blinded 0.05"]
    assert results["postures"][0]["detection"] == []  # no guard, nothing to detect
    fp = results["guard_false_positives"]
    assert fp["iid"]["queries"] == 6 and fp["camera"]["queries"] == 3 * 4
    only = postures.main([*args[:3], "--postures", "", "--fp-images", "9", "--stream-frames", "1"])
    assert only["postures"] == [] and only["guard_false_positives"]["iid"]["queries"] == 9
    assert json.loads(out.read_text())["images"] == 6


def test_postures_experiment_attacks_the_deployed_artifact_and_refuses_a_foreign_one(small_keyed_checkpoint, tmp_path):
    """--artifact: the attacks query the checkpoint's ONNX export through ONNX Runtime (what the device runs);
    an export of another model is refused before any attack runs."""
    from typer.testing import CliRunner

    from keyedge.benchmarks.experiments import postures
    from keyedge.cli import app

    pytest.importorskip("pyautoattack")
    pytest.importorskip("skimage")
    pytest.importorskip("onnxruntime")
    checkpoint, key = small_keyed_checkpoint
    done = CliRunner().invoke(app, ["export", "-c", str(checkpoint), "-k", str(key), "-o", str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    (artifact,) = (tmp_path / "out").iterdir()
    args = [str(checkpoint), "-k", str(key), "--images", "6", "--budgets", "20", "--stream-frames", "2"]
    results = postures.main([*args, "--postures", "label", "--artifact", str(artifact)])
    assert results["artifact"] == str(artifact)
    label = results["postures"][0]
    assert [o["strategy"] for o in label["outcomes"]] == ["hsj", "rays"]
    in_torch = postures.main([*args, "--postures", "label"])["postures"][0]
    assert label["clean_accuracy"] == in_torch["clean_accuracy"]  # the export answers as the checkpoint does
    assert [len(o["to_break"]) for o in label["outcomes"]] == [6, 6]

    model = postures.load_checkpoint(str(checkpoint), postures.load_key(str(key)))[0].eval()

    class Other(torch.nn.Module):  # another model: every answer one class over
        def forward(self, x):
            return model(x).roll(1, dims=1)

    with pytest.raises(SystemExit) as missing:  # one line and exit 2, no traceback
        postures.main([*args, "--postures", "label", "--artifact", str(tmp_path / "none")])
    assert missing.value.code == 2
    with pytest.raises(SystemExit, match="not its export"):
        postures.deployed(Other(), str(artifact), torch.rand(8, 3, 32, 32), 1)


def test_under_a_lock_each_image_meets_a_device_of_its_own_even_in_one_batch(trained_small, monkeypatch):
    """A lock protects only the device that saw the attack: the batched run, each query routed to its image's
    guard, gives every image the outcome it gets attacked alone on a fresh device (RayS: exactly; Square draws
    its squares for the whole batch, so there every attacked image is flagged by its own guard)."""
    from keyedge.benchmarks.postures import Strategy, run_watched

    pytest.importorskip("pyautoattack")
    model, images, labels = trained_small
    images, labels = images[:8], labels[:8]
    monkeypatch.setattr("keyedge.postures.guard.secrets.token_bytes", bytes)  # one fingerprint secret for all
    rays = run_watched(model, images, labels, "label+guard:lock", Strategy("rays"), eps=16 / 255, budget=80)
    alone = [run_watched(model, images[i : i + 1], labels[i : i + 1], "label+guard:lock", Strategy("rays"),
                         eps=16 / 255, budget=80) for i in range(len(images))]  # fmt: skip
    assert rays.to_break == [o.to_break[0] for o in alone]
    assert rays.extra["first_flag"] == [o.extra["first_flag"][0] for o in alone]
    assert rays.refused == sum(o.refused for o in alone) > 0  # every device locked after its own flag only
    square = run_watched(model, images, labels, "scores+guard:lock", Strategy("square"), eps=16 / 255, budget=80)
    attacked = [i for i, q in enumerate(square.to_break) if q != 0]
    assert attacked and all(square.extra["first_flag"][i] is not None for i in attacked)
