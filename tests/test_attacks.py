"""Attacks of the robustness benchmarks: budgets, determinism, multi-key EoT sums, and a white-box sanity check."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from keyedge.attacks import (
    APGDCE,
    APGDDLR,
    ATTACKS,
    FGSM,
    PGD,
    PGDL2,
    Attack,
    AttackError,
    AutoAttack,
    NPixel,
    Patch,
    budget_options,
    dlr,
    list_attacks,
    make_attack,
    parse_eps,
    patch_side,
    register_attack,
)
from keyedge.attacks.apgd import checkpoints
from keyedge.attacks.npixel import distinct_others
from keyedge.errors import DependencyError

EPS = 8 / 255
LINF = {  # Linf attacks with small settings for speed
    "fgsm": {"eps": EPS},
    "pgd": {"eps": EPS, "steps": 5},
    "ifgsm": {"eps": EPS, "steps": 5},
    "mifgsm": {"eps": EPS, "steps": 5},
    "apgd-ce": {"eps": EPS, "steps": 10},
    "apgd-dlr": {"eps": EPS, "steps": 10},
}
FAST = {
    **LINF,
    "pgdl2": {"eps": 0.5, "steps": 5},
    "npixel": {"pixels": 3, "popsize": 12, "steps": 4},
    "patch": {"fraction": 0.1, "steps": 5},
}
RANDOM = ["pgd", "pgdl2", "apgd-ce", "apgd-dlr", "npixel", "patch"]  # attacks with a random start


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Keep the CPU load of this file moderate (another job may be training)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_cnn(seed: int = 0, classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 64),
        nn.ReLU(),
        nn.Linear(64, classes),
    )


def _tensors(split: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    from keyedge.data.datasets import load_dataset

    dataset, _ = load_dataset("fashion-mnist", split, 32, limit=limit, seed=0)
    return torch.stack([dataset[i][0] for i in range(len(dataset))]), torch.as_tensor(dataset.labels)


@pytest.fixture(scope="module")
def trained():
    """A small BN CNN trained for a few seconds on 3000 Fashion-MNIST images (32x32, 3 channels)."""
    try:
        x_train, y_train = _tensors("train", 3000)
        x_test, y_test = _tensors("test", 200)
    except Exception as exc:
        pytest.skip(f"Fashion-MNIST not available: {exc}")
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(4):
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval(), x_test, y_test


@pytest.fixture(scope="module")
def batch(trained):
    model, x, y = trained
    return model, x[:24], y[:24]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def mean_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def changed_pixels(adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, H, W) mask of pixel positions where any channel differs."""
    return (adv != x).any(dim=1)


# -- every attack: loss up, budget kept, range kept -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FAST))
def test_attack_raises_loss_and_keeps_range(batch, name):
    model, x, y = batch
    adv = make_attack(name, model, **FAST[name])(x, y)
    assert adv.shape == x.shape and adv.dtype == x.dtype and adv.device == x.device and not adv.requires_grad
    assert adv.min() >= 0 and adv.max() <= 1
    assert mean_ce(model, adv, y) > mean_ce(model, x, y)


@pytest.mark.parametrize("name", sorted(LINF))
def test_linf_budget(batch, name):
    model, x, y = batch
    adv = make_attack(name, model, **LINF[name])(x, y)
    assert (adv - x).abs().max() <= EPS + 1e-6


def test_pgdl2_budget_per_example(batch):
    model, x, y = batch
    for eps in (0.25, 1.0):
        adv = PGDL2(model, eps=eps, steps=5, restarts=2)(x, y)
        norms = (adv - x).flatten(1).norm(dim=1)
        assert norms.max() <= eps + 1e-5
        assert norms.min() > 0.5 * eps  # it does use the budget


def test_npixel_budget_and_region(batch):
    model, x, y = batch
    for pixels in (1, 4):
        adv = NPixel(model, pixels=pixels, popsize=10, steps=3)(x, y)
        assert changed_pixels(adv, x).flatten(1).sum(1).max() <= pixels
    region = (16, 0, 16, 16)  # the lower-left quadrant
    adv = NPixel(model, pixels=5, popsize=10, steps=3, region=region)(x, y)
    changed = changed_pixels(adv, x)
    assert changed.flatten(1).sum(1).max() <= 5 and changed.any()
    assert not changed[:, :16].any() and not changed[:, :, 16:].any()
    with pytest.raises(AttackError, match="does not fit"):
        NPixel(model, region=(20, 20, 16, 16), popsize=8, steps=1)(x, y)


def test_npixel_breaks_with_enough_pixels(batch):
    model, x, y = batch
    correct = accuracy(model, x, y)
    adv = NPixel(model, pixels=20, popsize=20, steps=10)(x, y)
    assert accuracy(model, adv, y) < correct


def test_patch_budget(batch):
    model, x, y = batch
    side = patch_side(0.1, 32, 32)
    assert side == round((0.1 * 32 * 32) ** 0.5) == 10
    adv = Patch(model, fraction=0.1, steps=3, location=(5, 7))(x, y)
    changed = changed_pixels(adv, x)
    outside = changed.clone()
    outside[:, 5 : 5 + side, 7 : 7 + side] = False
    assert not outside.any()
    assert changed.flatten(1).sum(1).max() <= side * side
    assert changed.flatten(1).sum(1).float().mean() > 0.9 * side * side  # the whole patch is optimized
    # random locations: every image's changes fit in one side x side square
    adv = Patch(model, fraction=0.1, steps=3, locations=3)(x, y)
    for mask in changed_pixels(adv, x):
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        assert rows.max() - rows.min() < side and cols.max() - cols.min() < side
    masks = Patch(model, fraction=0.25).masks(x, torch.Generator().manual_seed(0))
    assert masks.shape == (x.shape[0], 1, 32, 32) and (masks.flatten(1).sum(1) == 16 * 16).all()
    with pytest.raises(AttackError, match="does not fit"):
        Patch(model, fraction=0.1, location=(30, 0))(x, y)


# -- white-box sanity (docs/design.md §10) -----------------------------------------------------------------------------


def test_white_box_pgd_breaks_undefended_model(trained):
    model, x, y = trained
    clean = accuracy(model, x, y)
    assert clean >= 0.75
    eps = 16 / 255  # Fashion-MNIST needs more than 8/255 (docs/design.md §9)
    fgsm = accuracy(model, FGSM(model, eps=eps)(x, y), y)
    pgd = accuracy(model, PGD(model, eps=eps, steps=20)(x, y), y)
    pgd_small = accuracy(model, PGD(model, eps=eps / 2, steps=20)(x, y), y)
    assert pgd <= 0.1, f"PGD-20 at 16/255 left {pgd:.0%} accuracy (clean {clean:.0%})"
    assert pgd <= fgsm
    assert pgd <= pgd_small <= clean  # monotone in eps


def test_apgd_breaks_undefended_model(trained):
    model, x, y = trained
    x, y = x[:100], y[:100]
    for attack in (APGDCE(model, eps=16 / 255, steps=25), APGDDLR(model, eps=16 / 255, steps=25)):
        assert accuracy(model, attack(x, y), y) <= 0.1, attack.name


def _broken(model: nn.Module, adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(adv).argmax(1) != y


@pytest.mark.parametrize(
    "cls, kwargs",
    [(PGD, {"steps": 5}), (PGDL2, {"steps": 5}), (APGDCE, {"steps": 10}), (Patch, {"fraction": 0.05, "steps": 5})],
)
def test_restarts_keep_every_break(trained, cls, kwargs):
    """An example broken by the first run stays broken; later runs can only add breaks."""
    model, x, y = trained
    x, y = x[:60], y[:60]
    budget = {"eps": 4 / 255} if cls in (PGD, APGDCE) else {"eps": 0.3} if cls is PGDL2 else {}
    more = "locations" if cls is Patch else "restarts"
    once = _broken(model, cls(model, seed=2, **budget, **kwargs)(x, y), y)
    thrice = _broken(model, cls(model, seed=2, **budget, **{more: 3}, **kwargs)(x, y), y)
    assert 0 < once.sum() < len(y)  # a budget where some but not all break
    assert (thrice >= once).all()
    if cls is Patch:  # where the patch goes matters a lot: more places, more breaks
        assert thrice.sum() > once.sum()


# -- determinism ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RANDOM)
def test_same_seed_same_output_other_seed_differs(batch, name):
    model, x, y = batch
    x, y = x[:8], y[:8]
    a = make_attack(name, model, seed=3, **FAST[name])(x, y)
    b = make_attack(name, model, seed=3, **FAST[name])(x, y)
    c = make_attack(name, model, seed=4, **FAST[name])(x, y)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_attacks_leave_global_rng_alone(batch):
    model, x, y = batch
    state = torch.get_rng_state()
    for name in RANDOM:
        make_attack(name, model, **FAST[name])(x[:4], y[:4])
    assert torch.equal(torch.get_rng_state(), state)


def test_run_batches_like_one_call(batch):
    model, x, y = batch
    attack = PGD(model, eps=EPS, steps=3, seed=1)
    done = []
    out = attack.run(x, y, batch_size=10, progress=done.append)
    assert done == [10, 20, 24] and out.shape == x.shape
    assert (out - x).abs().max() <= EPS + 1e-6
    assert torch.equal(attack.run(x, y, batch_size=100), attack(x, y))


# -- multi-key EoT: the loss is the sum over models ------------------------------------------------------------------


def _ce_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(leaf), y, reduction="sum"), leaf)
    return grad


def test_multi_model_gradient_is_the_sum():
    a, b = small_cnn(1).eval(), small_cnn(2).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (6,), generator=gen)
    summed = _ce_grad(a, x, y) + _ce_grad(b, x, y)
    attack = FGSM([a, b], eps=EPS)
    assert torch.allclose(attack.input_grad(x, y), summed, atol=1e-6)
    expected = (x + EPS * summed.sign()).clamp(0, 1)
    assert torch.allclose(attack(x, y), expected, atol=1e-6)
    one_step = PGD([a, b], eps=EPS, alpha=EPS, steps=1, random_start=False)(x, y)
    assert torch.allclose(one_step, expected, atol=1e-6)
    assert not torch.equal(FGSM(a, eps=EPS)(x, y), expected)  # the second model matters
    loss, logits, _grad = attack.loss_and_grad(x, y)
    with torch.no_grad():
        assert torch.allclose(logits, a(x) + b(x), atol=1e-5)
        assert torch.allclose(
            loss, F.cross_entropy(a(x), y, reduction="none") + F.cross_entropy(b(x), y, reduction="none"), atol=1e-5
        )


def test_multi_model_attacks_run(batch):
    model, x, y = batch
    other = small_cnn(5).eval()
    for name in ("pgd", "apgd-dlr", "npixel", "patch", "mifgsm"):
        adv = make_attack(name, [model, other], **FAST[name])(x[:6], y[:6])
        assert adv.shape == (6, 3, 32, 32)


# -- model state ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FAST))
def test_model_state_restored_and_no_param_grads(name):
    model = small_cnn(3)
    model.train()
    model[1].eval()  # a frozen BN inside a training model: modes are restored per module
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (4,), generator=gen)
    make_attack(name, model, **FAST[name])(x, y)
    assert model.training and not model[1].training and model[5].training
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # BN stats untouched


# -- pieces -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [
        ("4/255", 4 / 255),
        ("8 / 255", 8 / 255),
        ("0.03", 0.03),
        ("8", 8.0),
        (".5", 0.5),
        ("1e-2", 0.01),
        (0.25, 0.25),
        (2, 2.0),
        ("0", 0.0),
    ],
)
def test_parse_eps(text, value):
    assert parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["abc", "", "4/", "/255", "-1", "4/0", "nan", "inf", "1/2/3", True])
def test_parse_eps_rejects(text):
    with pytest.raises(ValueError, match="eps"):
        parse_eps(text)


def test_parse_eps_message():
    with pytest.raises(ValueError, match=r"eps must be a number or a fraction like 4/255, got 'abc'"):
        parse_eps("abc")


def test_registry_and_unknown_name():
    assert {"fgsm", "pgd", "pgdl2", "ifgsm", "mifgsm", "apgd-ce", "apgd-dlr", "autoattack", "npixel", "patch"} <= set(
        ATTACKS
    )
    assert all(issubclass(cls, Attack) for cls in (cls for _, cls in ATTACKS.items()))
    model = small_cnn()
    assert isinstance(make_attack("PGD", model), PGD) and isinstance(make_attack("apgd_ce", model), APGDCE)
    with pytest.raises(ValueError, match=r"unknown attack 'cw'; use apgd-ce, .*pgd, .* or rays$"):
        make_attack("cw", model)


def test_describe_is_json_ready():
    import json

    model = small_cnn()
    for name, cls in ATTACKS.items():
        if cls is AutoAttack and importlib.util.find_spec("pyautoattack") is None:
            continue
        info = make_attack(name, model, **FAST.get(name, {})).describe()
        assert info["name"] == name and info["seed"] == 0 and info["models"] == 1
        json.dumps(info)
    info = PGD(model, eps=parse_eps("4/255"), steps=20, restarts=2).describe()
    assert info["eps_255"] == 4.0 and info["alpha"] == pytest.approx(2.5 * 4 / 255 / 20) and info["restarts"] == 2


KINDS_AND_BUDGETS = {
    "fgsm": ("single-step", ("eps",)),
    "pgd": ("iterative", ("eps", "steps")),
    "pgdl2": ("iterative", ("eps", "steps")),
    "ifgsm": ("iterative", ("eps", "steps")),
    "mifgsm": ("iterative", ("eps", "steps")),
    "apgd-ce": ("iterative", ("eps", "steps")),
    "apgd-dlr": ("iterative", ("eps", "steps")),
    "autoattack": ("iterative", ("eps",)),
    "npixel": ("localized", ("pixels",)),
    "patch": ("localized", ("fraction",)),
    "noise": ("random", ("eps",)),
    "square": ("query", ("eps", "queries")),
    "hsj": ("query", ("eps", "queries")),
    "rays": ("query", ("eps", "queries")),
}


def test_kinds_and_budgets_of_every_attack():
    assert {name: (cls.kind, cls.budget) for name, cls in ATTACKS.items()} == KINDS_AND_BUDGETS
    for cls in (cls for _, cls in ATTACKS.items()):
        assert all(cls.accepts(b) for b in cls.budget) and cls.accepts("seed")
    assert list_attacks(kind="localized") == ["npixel", "patch"]
    assert list_attacks(kind="query") == ["square", "hsj", "rays"] and list_attacks(kind="random") == ["noise"]
    assert set(list_attacks(kind=("single-step", "iterative"))) == set(ATTACKS) - {
        "npixel",
        "patch",
        "noise",
        "square",
        "hsj",
        "rays",
    }
    assert list_attacks() == list(ATTACKS)
    with pytest.raises(AttackError, match="unknown attack kind blackbox"):
        list_attacks(kind="blackbox")
    # what a harness passes: steps only to attacks with a step schedule, eps only to eps-ball attacks
    assert budget_options("fgsm", eps=0.1, steps=20) == {"eps": 0.1}
    assert budget_options("pgd", eps=0.1, steps=20) == {"eps": 0.1, "steps": 20}
    assert budget_options("autoattack", eps=0.1, steps=20) == {"eps": 0.1}
    assert budget_options("npixel", eps=0.1, steps=20) == {}


def test_register_refuses_an_attack_that_misdescribes_itself():
    class NoKind(Attack):
        name, budget = "no-kind", ("eps",)

    class WrongBudget(FGSM):
        name, budget = "wrong-budget", ("eps", "steps")  # FGSM takes no steps

    with pytest.raises(ValueError, match="kind ''"):
        register_attack(NoKind)
    with pytest.raises(ValueError, match="takes no steps"):
        register_attack(WrongBudget)
    assert "no-kind" not in ATTACKS and "wrong-budget" not in ATTACKS


def test_make_attack_refuses_an_unknown_keyword():
    model = small_cnn()
    with pytest.raises(AttackError) as info:
        make_attack("pgd", model, eps=EPS, stepz=5)
    message = str(info.value)
    assert "\n" not in message and "'stepz'" in message
    assert "alpha, eps, random_start, restarts, seed, steps" in message
    with pytest.raises(AttackError, match="attack fgsm takes no 'steps'"):
        make_attack("fgsm", model, steps=10)  # FGSM reports steps=1 but takes none
    assert make_attack("npixel", model, pixels=2, eval_batch=64).eval_batch == 64  # not a hyperparameter, still taken


def test_label_and_kind_in_describe():
    model = small_cnn()
    assert NPixel(model, pixels=4).label() == "4-pixel"
    assert Patch(model, fraction=0.25).label() == "patch 25% of the area"
    assert PGD(model).label() == "pgd" and FGSM(model).label() == "fgsm"
    info = NPixel(model, pixels=16).describe()
    assert info["kind"] == "localized" and info["label"] == "16-pixel"
    assert PGD(model).describe()["kind"] == "iterative" and "kind" not in repr(PGD(model))


def test_report_label_falls_back_for_reports_without_one():
    from keyedge.benchmarks.robustness import attack_label

    old = Patch(small_cnn(), fraction=0.05).describe()
    assert attack_label(old) == "patch 5% of the area"
    del old["label"]
    assert attack_label(old) == "patch 5% of the area"
    assert attack_label({"name": "npixel", "pixels": 3}) == "3-pixel" and attack_label({"name": "cw"}) == "cw"


def test_bad_arguments():
    model = small_cnn()
    with pytest.raises(AttackError, match="steps"):
        PGD(model, steps=0)
    with pytest.raises(AttackError, match="eps"):
        FGSM(model, eps=-0.1)
    with pytest.raises(AttackError, match="popsize"):
        NPixel(model, popsize=3)
    with pytest.raises(AttackError, match="at least one model"):
        PGD([])
    with pytest.raises(AttackError, match=r"\[0, 1\]"):
        FGSM(model)(torch.full((2, 3, 32, 32), 2.0), torch.zeros(2, dtype=torch.long))
    with pytest.raises(AttackError, match="labels"):
        FGSM(model)(torch.rand(2, 3, 32, 32), torch.zeros(3, dtype=torch.long))


def test_dlr_loss():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [1.0, 4.0, 2.0, 0.0]])
    labels = torch.tensor([0, 0])
    loss = dlr(logits, labels)
    assert loss[0] == pytest.approx(-(3 - 1) / (3 - 0)) and loss[1] == pytest.approx(-(1 - 4) / (4 - 1))
    assert (loss > 0).tolist() == [False, True]  # positive exactly when misclassified
    assert torch.allclose(dlr(7 * logits + 5, labels), loss)  # shift and scale invariant


def test_apgd_checkpoints():
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert checkpoints(1) == [1]


def test_de_parents_are_distinct():
    r1, r2, r3 = distinct_others((50, 7), 7, torch.Generator().manual_seed(0), torch.device("cpu"))
    own = torch.arange(7).expand(50, 7)
    for a, b in ((r1, r2), (r1, r3), (r2, r3), (r1, own), (r2, own), (r3, own)):
        assert (a != b).all()
    assert r1.min() >= 0 and max(r1.max(), r2.max(), r3.max()) <= 6


# -- AutoAttack (optional package) ------------------------------------------------------------------------------------


def test_autoattack_missing_package_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # makes `import pyautoattack` fail
    with pytest.raises(DependencyError, match="AutoAttack needs the optional package pyautoattack"):
        AutoAttack(small_cnn())


@pytest.mark.skipif(importlib.util.find_spec("pyautoattack") is None, reason="pyautoattack not installed")
def test_autoattack_runs(batch):
    model, x, y = batch
    x, y = x[:8], y[:8]
    attack = AutoAttack(model, eps=64 / 255, seed=0)
    assert attack.describe()["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    state = torch.get_rng_state()
    adv = attack(x, y)
    assert torch.equal(torch.get_rng_state(), state)
    assert (adv - x).abs().max() <= 64 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert accuracy(model, adv, y) == 0.0


# ---------------------------------------------------------------- the noise control and the query attacks


def test_noise_is_a_seeded_corner_of_the_budget_and_sees_no_model(batch):
    from keyedge.attacks import Noise

    model, x, y = batch
    x = x.clamp(0.1, 0.9)  # away from the clamp, the perturbation is exactly what was drawn
    adv = Noise(model, eps=EPS).run(x, y)
    assert torch.allclose((adv - x).abs(), torch.full_like(x, EPS), atol=1e-6)  # every value moved by +-eps
    assert torch.equal(adv, Noise(nn.Identity(), eps=EPS).run(x, y))  # the model plays no part
    assert not torch.equal(adv, Noise(model, eps=EPS, seed=1).run(x, y))
    l2 = Noise(model, eps=0.5, norm="L2").run(x, y)
    assert torch.allclose((l2 - x).flatten(1).norm(dim=1), torch.full((x.shape[0],), 0.5), atol=1e-4)
    with pytest.raises(AttackError, match="Linf or L2"):
        Noise(model, norm="L1")


@pytest.mark.parametrize("name", ["square", "hsj"])
def test_query_attacks_count_queries_and_a_smaller_budget_is_a_prefix(trained, name):
    """Queries-to-success are exact: an image is broken within B queries of a long run iff a run with budget B
    breaks it; every broken image is misclassified within eps, every other one left as it was."""
    model, x, y = trained
    x, y = x[:16], y[:16]
    long_adv, long_q = make_attack(name, model, eps=16 / 255, queries=150).run_queries(x, y, batch_size=8)
    short_adv, short_q = make_attack(name, model, eps=16 / 255, queries=40).run_queries(x, y, batch_size=8)
    assert torch.equal(short_q <= 40, long_q <= 40)
    assert torch.equal(short_q[short_q <= 40], long_q[long_q <= 40])
    assert torch.equal(short_adv[short_q <= 40], long_adv[long_q <= 40])  # the very image that broke it
    broken = long_q <= 150
    with torch.no_grad():
        wrong = model(long_adv).argmax(1) != y
    assert torch.equal(wrong, broken) and 0 < int(broken.sum()) < 16, long_q
    assert float((long_adv - x).abs().amax()) <= 16 / 255 + 1e-6
    assert torch.equal(long_adv[~broken], x[~broken])
    clean_wrong = accuracy_mask(model, x, y).logical_not()
    assert torch.equal(long_q[clean_wrong], torch.ones(int(clean_wrong.sum())))  # one query: the clean one
    again_adv, again_q = make_attack(name, model, eps=16 / 255, queries=150).run_queries(x, y, batch_size=8)
    assert torch.equal(again_q, long_q) and torch.equal(again_adv, long_adv)  # seeded


def accuracy_mask(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


class RowScaled(nn.Module):
    """The same decisions, other scores: each query's logits scaled by a random positive factor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.gen = model, torch.Generator().manual_seed(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * torch.rand((x.shape[0], 1), generator=self.gen).add_(0.01)


def test_hopskipjump_sees_labels_only_and_square_the_scores(trained):
    model, x, y = trained
    x, y = x[:8], y[:8]
    _, plain_q = make_attack("hsj", model, eps=16 / 255, queries=100).run_queries(x, y)
    _, scaled_q = make_attack("hsj", RowScaled(model), eps=16 / 255, queries=100).run_queries(x, y)
    assert torch.equal(plain_q, scaled_q)  # decision-based: nothing but the top-1 label reaches it
    assert int((plain_q > 1).logical_and(plain_q.isfinite()).sum()) >= 1  # and it did break an image by queries


def test_query_attacks_on_a_forward_only_runner(trained):
    """Through :class:`Queried` (numpy in, logits out, no autograd) the attack matches the torch model's run."""
    from keyedge.attacks import Queried

    model, x, y = trained
    x, y = x[:12], y[:12]

    class Runner:
        def predict(self, images):
            with torch.no_grad():
                return model(torch.from_numpy(images)).numpy()

    for name in ("square", "hsj"):
        adv, q = make_attack(name, model, eps=16 / 255, queries=60).run_queries(x, y)
        adv_r, q_r = make_attack(name, Queried(Runner()), eps=16 / 255, queries=60).run_queries(x, y)
        assert torch.equal(q, q_r) and torch.allclose(adv, adv_r)
    with pytest.raises(AttackError, match="queries one model"):
        make_attack("square", [model, model])
    with pytest.raises(AttackError, match="queries must be an integer > 0"):
        make_attack("hsj", model, queries=0)
