"""SGD, AdamW, the warm-up schedule and gradient clipping: known answers, torch, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import requires_torch, torch
from hypothesis import given
from hypothesis import strategies as st

from minimask import nn


def _params(seed: int, shapes=((3, 2), (4,), (1,))):
    rng = np.random.default_rng(seed)
    return [nn.Parameter(rng.standard_normal(s)) for s in shapes]


def _grads(seed: int, params, steps: int):
    """Fixed random gradients for every step (the update rules are what is under test)."""
    rng = np.random.default_rng(seed + 1000)
    return [[rng.standard_normal(p.shape) for p in params] for _ in range(steps)]


def _run(opt, params, grads, skip=None):
    """Apply ``grads`` step by step; parameter ``skip`` gets no gradient (grad None)."""
    for step_grads in grads:
        for i, (p, g) in enumerate(zip(params, step_grads)):
            p.grad = None if i == skip else g.copy()
        opt.step()


def _torch_run(opt, params, grads, skip=None):
    for step_grads in grads:
        for i, (p, g) in enumerate(zip(params, step_grads)):
            p.grad = None if i == skip else torch.tensor(g)
        opt.step()


# ---------------------------------------------------------------------------- known answers
def test_sgd_by_hand():
    p = nn.Parameter(np.array([1.0]))
    opt = nn.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.5)
    p.grad = np.array([2.0])
    opt.step()  # d = 2 + 0.5 * 1 = 2.5; buf = 2.5; p = 1 - 0.25 = 0.75
    np.testing.assert_allclose(p.data, [0.75])
    p.grad = np.array([2.0])
    opt.step()  # d = 2 + 0.375 = 2.375; buf = 0.9 * 2.5 + 2.375 = 4.625; p = 0.75 - 0.4625
    np.testing.assert_allclose(p.data, [0.2875])


def test_adamw_first_step_moves_each_weight_by_lr():
    """At t = 1, m / sqrt(v) = g / |g|: every weight moves by lr against its gradient's sign
    (after the decoupled decay p * (1 - lr * wd))."""
    p = nn.Parameter(np.array([1.0, -2.0, 3.0]))
    opt = nn.AdamW([p], lr=0.1, weight_decay=0.1, eps=0.0)
    p.grad = np.array([0.5, -7.0, 1e-3])
    opt.step()
    np.testing.assert_allclose(
        p.data, np.array([1.0, -2.0, 3.0]) * 0.99 - 0.1 * np.array([1, -1, 1])
    )


def test_updates_are_in_place_and_leave_no_graph():
    p = nn.Parameter(np.ones(3))
    data = p.data
    for opt in (nn.SGD([p], lr=0.1, momentum=0.9), nn.AdamW([p])):
        p.grad = np.ones(3)
        opt.step()
    assert p.data is data and p.is_leaf and p.requires_grad


def test_optimizer_errors():
    p = nn.Parameter(np.ones(2))
    with pytest.raises(ValueError, match="empty"):
        nn.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="twice"):
        nn.SGD([{"params": [p]}, {"params": [p]}], lr=0.1)
    with pytest.raises(ValueError, match="unknown settings"):
        nn.SGD([{"params": [p], "decay": 0.1}], lr=0.1)
    with pytest.raises(ValueError, match="nesterov"):
        nn.SGD([p], lr=0.1, nesterov=True)


def test_param_groups_zero_grad_and_set_lr():
    a, b = _params(0)[:2]
    opt = nn.SGD([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], lr=0.1, weight_decay=1.0)
    assert [g["weight_decay"] for g in opt.param_groups] == [1.0, 0.0]
    opt.set_lr(0.5)
    assert opt.lr == 0.5 and all(g["lr"] == 0.5 for g in opt.param_groups)
    a.grad, b.grad = np.ones(a.shape), np.ones(b.shape)
    opt.zero_grad()
    assert a.grad is None and b.grad is None


# ---------------------------------------------------------------------------- against torch
@requires_torch
@given(
    st.integers(0, 1000),
    st.sampled_from([0.0, 0.9]),
    st.sampled_from([0.0, 1e-2]),
    st.booleans(),
    st.sampled_from([None, 1]),
)
def test_sgd_trajectory_matches_torch(seed, momentum, weight_decay, nesterov, skip):
    nesterov = nesterov and momentum > 0
    params = _params(seed)
    grads = _grads(seed, params, steps=5)
    theirs = [torch.tensor(p.data.copy(), requires_grad=True) for p in params]
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.3, "weight_decay": 0.0}]
    tgroups = [{"params": theirs[:2]}, {"params": theirs[2:], "lr": 0.3, "weight_decay": 0.0}]
    settings = dict(lr=0.05, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    _run(nn.SGD(groups, **settings), params, grads, skip)
    _torch_run(torch.optim.SGD(tgroups, **settings), theirs, grads, skip)
    for p, t in zip(params, theirs):
        np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=1e-6, atol=1e-12)


@requires_torch
@given(st.integers(0, 1000), st.sampled_from([0.0, 0.05]), st.sampled_from([None, 0]))
def test_adamw_trajectory_matches_torch(seed, weight_decay, skip):
    params = _params(seed)
    grads = _grads(seed, params, steps=6)
    theirs = [torch.tensor(p.data.copy(), requires_grad=True) for p in params]
    settings = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    _run(nn.AdamW(params, **settings), params, grads, skip)
    _torch_run(torch.optim.AdamW(theirs, **settings), theirs, grads, skip)
    for p, t in zip(params, theirs):
        np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=1e-6, atol=1e-12)


# ---------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize(
    "make",
    [
        lambda ps: nn.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
        lambda ps: nn.AdamW(ps, lr=0.01),
    ],
    ids=["sgd", "adamw"],
)
@pytest.mark.parametrize("through_file", [False, True])
def test_resuming_from_a_state_dict_is_exact(make, through_file, tmp_path):
    params = _params(3)
    grads = _grads(3, params, steps=6)
    opt = make(params)
    _run(opt, params, grads[:3])
    opt.set_lr(0.02)

    # a second run, restored from the first after 3 steps
    copies = [nn.Parameter(p.data.copy()) for p in params]
    resumed = make(copies)
    if through_file:
        opt.save(str(tmp_path / "optimizer.npz"))
        resumed.load(str(tmp_path / "optimizer.npz"))
    else:
        resumed.load_state_dict(opt.state_dict())
    assert resumed.lr == 0.02

    _run(opt, params, grads[3:])
    _run(resumed, copies, grads[3:])
    for p, q in zip(params, copies):
        np.testing.assert_array_equal(p.data, q.data)


def test_state_dict_is_a_snapshot_and_load_checks_the_layout():
    params = _params(4)
    opt = nn.SGD(params, lr=0.1, momentum=0.9)
    _run(opt, params, _grads(4, params, 1))
    sd = opt.state_dict()
    frozen = sd["state"][0]["momentum_buffer"].copy()
    _run(opt, params, _grads(5, params, 1))
    np.testing.assert_array_equal(sd["state"][0]["momentum_buffer"], frozen)
    with pytest.raises(ValueError, match="parameters"):
        nn.SGD(params[:2], lr=0.1, momentum=0.9).load_state_dict(sd)
    with pytest.raises(ValueError, match="groups"):
        nn.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=0.1).load_state_dict(sd)


# ---------------------------------------------------------------------------- schedule
def test_schedule_known_values():
    s = nn.WarmupMultiStepSchedule(
        base_lr=0.02, milestones=(60, 80), gamma=0.1, warmup_iters=10, warmup_factor=0.001
    )
    assert s(0) == pytest.approx(0.02 * 0.001)
    assert s(5) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert s(10) == s(59) == pytest.approx(0.02)
    assert s(60) == s(79) == pytest.approx(0.002)
    assert s(80) == pytest.approx(0.0002)
    assert nn.WarmupMultiStepSchedule(base_lr=1.0)(12345) == 1.0


@requires_torch
@given(
    st.integers(0, 20),
    st.floats(1e-3, 1.0),
    st.lists(st.integers(1, 60), max_size=3, unique=True),
    st.sampled_from([0.1, 0.5]),
)
def test_schedule_matches_torch_linear_then_multistep(
    warmup_iters, warmup_factor, milestones, gamma
):
    ours = nn.WarmupMultiStepSchedule(0.1, tuple(milestones), gamma, warmup_iters, warmup_factor)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    schedulers = [torch.optim.lr_scheduler.MultiStepLR(opt, sorted(milestones), gamma)]
    if warmup_iters:
        schedulers.insert(
            0, torch.optim.lr_scheduler.LinearLR(opt, warmup_factor, 1.0, warmup_iters)
        )
    chained = torch.optim.lr_scheduler.ChainedScheduler(schedulers)
    for i in range(70):
        assert ours(i) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6), f"iteration {i}"
        opt.step()
        chained.step()


# ---------------------------------------------------------------------------- clipping
def test_clip_grad_norm_known_answer():
    a, b, c = nn.Parameter(np.zeros(1)), nn.Parameter(np.zeros(1)), nn.Parameter(np.zeros(1))
    a.grad, b.grad = np.array([3.0]), np.array([4.0])  # c has no gradient: skipped
    assert nn.clip_grad_norm([a, b, c], max_norm=10.0) == 5.0
    np.testing.assert_array_equal(a.grad, [3.0])  # under the limit: untouched
    assert nn.clip_grad_norm([a, b, c], max_norm=1.0) == 5.0
    np.testing.assert_allclose(np.concatenate([a.grad, b.grad]), [0.6, 0.8], rtol=1e-6)
    assert c.grad is None
    assert nn.clip_grad_norm([c], 1.0) == 0.0
    a.grad, before = np.array([np.inf]), b.grad.copy()
    assert nn.clip_grad_norm([a, b], 1.0) == np.inf  # reported, and the gradients left alone
    np.testing.assert_array_equal(b.grad, before)


@requires_torch
@given(st.integers(0, 1000), st.sampled_from([0.1, 1.0, 100.0]))
def test_clip_grad_norm_matches_torch(seed, max_norm):
    params = _params(seed)
    grads = _grads(seed, params, 1)[0]
    theirs = [torch.zeros(p.shape, dtype=torch.float64, requires_grad=True) for p in params]
    for p, t, g in zip(params, theirs, grads):
        p.grad, t.grad = g.copy(), torch.tensor(g)
    norm = nn.clip_grad_norm(params, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert norm == pytest.approx(float(expected), rel=1e-9)
    for p, t in zip(params, theirs):
        np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=1e-6, atol=1e-15)
