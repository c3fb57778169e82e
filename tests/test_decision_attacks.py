"""Decision-based query attacks beside HopSkipJump: RayS (keyedge.attacks.rays) against label-only devices."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from keyedge.attacks import AttackError, RayS, get_attack, list_attacks, make_attack
from keyedge.postures import parse_posture
from keyedge.postures.oracle import Attacker, Device

EPS = 64 / 255  # large: white-box PGD breaks the tiny model below on every image already at 48/255


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: many tiny forward passes, where a second thread only contends (as test_attacks.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    """A small CNN trained for a moment on 600 Fashion-MNIST images (32x32), and 12 test images."""
    from keyedge.data.datasets import load_dataset

    try:
        train, _ = load_dataset("fashion-mnist", "train", 32, limit=600, seed=0)
        test, _ = load_dataset("fashion-mnist", "test", 32, limit=12, seed=0)
    except Exception as exc:
        pytest.skip(f"Fashion-MNIST not available: {exc}")
    x = torch.stack([train[i][0] for i in range(len(train))])
    y = torch.as_tensor(train.labels)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(), nn.Linear(512, 10))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(3):
        for i in range(0, len(x), 50):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 50]), y[i : i + 50]).backward()
            opt.step()
    images = torch.stack([test[i][0] for i in range(len(test))])
    return model.eval(), images, torch.as_tensor(test.labels)


def label_device(model: nn.Module) -> tuple[Device, Attacker]:
    device = Device(model, parse_posture("label"))
    return device, Attacker(device)


def test_rays_is_registered_as_a_linf_query_attack():
    assert "rays" in list_attacks(kind="query") and get_attack("RayS") is RayS
    assert RayS.budget == ("eps", "queries") and RayS.norm == "Linf"
    attack = make_attack("rays", nn.Flatten(), eps=8 / 255, queries=10, norm="Linf")
    assert attack.label() == "rays 10q" and attack.describe()["paper"].startswith("Chen & Gu 2020")
    with pytest.raises(AttackError, match="Linf attack") as err:
        make_attack("rays", nn.Flatten(), norm="L2")
    assert "\n" not in str(err.value)
    with pytest.raises(AttackError, match="init"):
        RayS(nn.Flatten(), init="zeros")


def test_rays_breaks_a_label_only_device_within_budget_and_counts_every_query(tiny):
    model, images, labels = tiny
    budget = 300
    device, attacker = label_device(model)
    spent = []
    attack = make_attack("rays", attacker, eps=EPS, queries=budget)
    adv, to_break = attack.run_queries(images, labels, batch_size=1, progress=lambda n: spent.append(device.queries))
    per_image = torch.tensor(spent, dtype=torch.float).diff(prepend=torch.zeros(1))
    broken, attacked = torch.isfinite(to_break), to_break != 1  # 1: the clean query, the model was wrong already
    assert int((broken & attacked).sum()) >= 0.75 * int(attacked.sum()) > 0, to_break
    # every query reached the device and is counted: a broken image stopped at the query that broke it,
    # the others spent exactly the budget (the clean query included)
    assert torch.equal(per_image[broken], to_break[broken]) and bool((per_image[~broken] == budget).all())
    assert float(per_image.max()) <= budget
    with torch.no_grad():
        assert torch.equal(model(adv).argmax(1) != labels, broken)
    assert float((adv - images).abs().amax()) <= EPS + 1e-6 and torch.equal(adv[~broken], images[~broken])


def test_batched_runs_match_one_image_at_a_time_and_a_smaller_budget_is_a_prefix(tiny):
    model, images, labels = tiny
    long_adv, long_q = make_attack("rays", model, eps=EPS, queries=200).run_queries(images, labels, batch_size=12)
    single_adv, single_q = make_attack("rays", model, eps=EPS, queries=200).run_queries(images, labels, batch_size=1)
    assert torch.equal(long_q, single_q) and torch.equal(long_adv, single_adv)
    short_adv, short_q = make_attack("rays", model, eps=EPS, queries=40).run_queries(images, labels)
    assert torch.equal(short_q <= 40, long_q <= 40) and torch.equal(short_q[short_q <= 40], long_q[long_q <= 40])
    assert torch.equal(short_adv[short_q <= 40], long_adv[long_q <= 40])
    again_adv, again_q = make_attack("rays", model, eps=EPS, queries=200).run_queries(images, labels)
    assert torch.equal(again_q, long_q) and torch.equal(again_adv, long_adv)  # deterministic
    random_q = [make_attack("rays", model, eps=EPS, queries=60, init="random", seed=s).run_queries(images, labels)[1]
                for s in (0, 0, 1)]  # fmt: skip
    assert torch.equal(random_q[0], random_q[1]) and not torch.equal(random_q[0], random_q[2])


class RowScaled(nn.Module):
    """The same decisions, other scores: each query's logits scaled by a random positive factor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.gen = model, torch.Generator().manual_seed(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * torch.rand((x.shape[0], 1), generator=self.gen).add_(0.01)


def test_rays_sees_labels_only(tiny):
    model, images, labels = tiny
    _, plain = make_attack("rays", model, eps=EPS, queries=60).run_queries(images, labels)
    _, scaled = make_attack("rays", RowScaled(model), eps=EPS, queries=60).run_queries(images, labels)
    assert torch.equal(plain, scaled)


class Refusing(nn.Module):
    """A device whose guard refuses every query after the first ``answered`` ones: NaN rows."""

    def __init__(self, model: nn.Module, answered: int = 0):
        super().__init__()
        self.model, self.answered, self.queries = model, answered, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        index = torch.arange(self.queries, self.queries + x.shape[0])
        self.queries += x.shape[0]
        return out.masked_fill((index >= self.answered).view(-1, 1), float("nan"))


def test_refused_queries_are_spent_and_never_read_as_adversarial(tiny):
    model, images, labels = tiny
    device = Refusing(model)
    attack = make_attack("rays", device, eps=EPS, queries=50)
    attack.judge = model  # the evaluator's clean check and final look, not the attacker's queries
    _, to_break = attack.run_queries(images, labels)
    clean_wrong = model(images).argmax(1) != labels
    assert bool(torch.isinf(to_break[~clean_wrong]).all()) and bool((to_break[clean_wrong] == 1).all())
    assert device.queries == 49 * int((~clean_wrong).sum())  # every refused query counted, the budget spent


def test_label_guard_strategies_include_blinded_rays_and_a_guard_costs_it_queries(tiny):
    from keyedge.benchmarks.postures import Strategy, run_strategy, strategies

    labels_of = lambda spec: [s.label for s in strategies(parse_posture(spec))]  # noqa: E731
    assert labels_of("label") == ["hsj", "rays"]
    assert labels_of("label+guard") == ["hsj", "rays", "hsj blinded 0.05", "rays blinded 0.05"]
    assert labels_of("label+noise:0.05") == ["hsj", "rays", "hsj EoT x4", "rays EoT x4"]
    assert labels_of("scores+guard") == ["square", "square blinded 0.05"]

    model, images, labels = tiny
    images, labels = images[:6], labels[:6]
    budget = 60
    open_device = run_strategy(model, images, labels, "label", Strategy("rays"), eps=EPS, budget=budget)
    guarded = run_strategy(model, images, labels, "label+guard", Strategy("rays"), eps=EPS, budget=budget)
    assert open_device.refused == 0 and guarded.refused > 0
    for outcome in (open_device, guarded):
        assert outcome.device_queries <= budget * len(images)
        assert all(q == 0 or 1 < q <= budget or math.isinf(q) for q in outcome.to_break)


class Liar(nn.Module):
    """A device whose every answer is a wrong label: each query looks adversarial to the attacker."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.queries = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.queries += x.shape[0]
        logits = self.model(x)
        return nn.functional.one_hot((logits.argmax(1) + 1) % logits.shape[1], logits.shape[1]).float()


@pytest.mark.parametrize("name", ["hsj", "rays", "square"])
def test_a_hit_the_judge_does_not_confirm_does_not_end_the_attack(tiny, name):
    """The attacker's belief (a lucky noise draw, a blinded answer) is not success: only the judge's look is,
    and an unconfirmed hit leaves the attack going -- a search that stopped there would be a soft attack."""
    model, images, labels = tiny
    images, labels = images[:4], labels[:4]
    budget = 40
    liar = Liar(model)
    attack = make_attack(name, liar, eps=EPS / 4, queries=budget)
    attack.judge = model
    adv, to_break = attack.run_queries(images, labels, batch_size=4)
    attacked = model(images).argmax(1) == labels
    broken = torch.isfinite(to_break) & attacked
    with torch.no_grad():
        assert torch.equal(model(adv).argmax(1) != labels, broken | ~attacked)  # every success is the judge's
    # the images the judge never confirmed spent their whole budget (the clean look is the judge's, not a query)
    assert liar.queries >= (budget - 1) * int((attacked & ~broken).sum()) > 0


def test_hsj_stops_at_its_first_success(tiny):
    """HopSkipJump's run ends for an image once it is broken within eps: its later queries would change nothing."""
    model, images, labels = tiny
    device, attacker = label_device(model)
    spent = []
    attack = make_attack("hsj", attacker, eps=EPS, queries=400)
    _, to_break = attack.run_queries(images, labels, batch_size=1, progress=lambda n: spent.append(device.queries))
    per_image = torch.tensor(spent, dtype=torch.float).diff(prepend=torch.zeros(1))
    broken = torch.isfinite(to_break)
    assert int(broken.sum()) > 0
    assert torch.equal(per_image[broken], to_break[broken])  # the clean look and the start search included
    assert bool((per_image[~broken] <= 400).all())  # 400, or 101 where no noise start was found to walk from
