"""Learning-rate schedules (bpfast.schedules) and their use in Network.fit.

Oracles: PyTorch's closed forms written out, torch.optim.lr_scheduler itself when
installed, and replays that set ``optimizer.lr`` by hand before each train_step.
"""
import math
import warnings

import numpy as np
import pytest
from training_data import Recorder, batches, digits, mlp, twins, unchanged

import bpfast as bp
from bpfast.schedules import CosineAnnealing, ExponentialDecay, LinearWarmup, StepDecay

CE = bp.CrossEntropy()
T = np.arange(0, 41)


def closed_forms():
    """(schedule, the closed form of its rate for t and initial rate lr0)."""
    return [
        (StepDecay(5, 0.5), lambda t, lr0: lr0 * 0.5 ** (t // 5)),
        (StepDecay(1), lambda t, lr0: lr0 * 0.1 ** t),
        (ExponentialDecay(0.9), lambda t, lr0: lr0 * 0.9 ** t),
        (CosineAnnealing(10, min_lr=0.001),
         lambda t, lr0: 0.001 + (lr0 - 0.001) * (1 + math.cos(math.pi * min(t, 10) / 10)) / 2),
        (CosineAnnealing(7),
         lambda t, lr0: lr0 * (1 + math.cos(math.pi * min(t, 7) / 7)) / 2),
        (LinearWarmup(4, 0.25), lambda t, lr0: lr0 * (0.25 + 0.75 * min(t, 4) / 4)),
        (LinearWarmup(3), lambda t, lr0: lr0 * (1 / 3 + (2 / 3) * min(t, 3) / 3)),
        (LinearWarmup(4, 0.25, then=StepDecay(3, 0.5)),
         lambda t, lr0: lr0 * (0.25 + 0.75 * t / 4) if t < 4 else lr0 * 0.5 ** ((t - 4) // 3)),
    ]


@pytest.mark.parametrize("index", range(len(closed_forms())))
def test_schedule_values_are_the_closed_forms(index):
    schedule, formula = closed_forms()[index]
    expected = np.array([formula(int(t), 0.2) for t in T])
    vector = schedule(T, 0.2)
    assert vector.shape == T.shape
    np.testing.assert_allclose(vector, expected, rtol=1e-14, atol=1e-300)
    scalars = np.array([float(schedule(int(t), 0.2)) for t in T])
    np.testing.assert_allclose(scalars, vector, rtol=1e-15, atol=0)
    assert float(schedule(0, 0.2)) == pytest.approx(
        0.2 * (getattr(schedule, "start_factor", 1.0)), rel=1e-15)


def torch_rates(torch, make_scheduler, lr0, n):
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=lr0)
    scheduler = make_scheduler(opt)
    rates = []
    for _ in range(n):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return np.array(rates)


@pytest.mark.parametrize("name", ["StepLR", "ExponentialLR", "CosineAnnealingLR", "LinearLR",
                                  "warmup_then_step"])
def test_schedules_match_torch(name):
    torch = pytest.importorskip("torch")
    lr_scheduler = torch.optim.lr_scheduler
    cases = {
        "StepLR": (lambda o: lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
                   StepDecay(3, 0.5), 25),
        "ExponentialLR": (lambda o: lr_scheduler.ExponentialLR(o, gamma=0.9),
                          ExponentialDecay(0.9), 30),
        # PyTorch's recursive cosine is periodic past T_max; bpfast stays at min_lr, so
        # they are compared over one period
        "CosineAnnealingLR": (lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=10,
                                                                        eta_min=0.001),
                              CosineAnnealing(10, min_lr=0.001), 11),
        "LinearLR": (lambda o: lr_scheduler.LinearLR(o, start_factor=0.25, end_factor=1.0,
                                                     total_iters=4),
                     LinearWarmup(4, 0.25), 12),
        "warmup_then_step": (
            lambda o: lr_scheduler.SequentialLR(
                o, [lr_scheduler.LinearLR(o, start_factor=0.25, total_iters=4),
                    lr_scheduler.StepLR(o, step_size=3, gamma=0.5)], milestones=[4]),
            LinearWarmup(4, 0.25, then=StepDecay(3, 0.5)), 16),
    }
    make, schedule, n = cases[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notes are not under test
        expected = torch_rates(torch, make, 0.2, n)
    np.testing.assert_allclose(schedule(np.arange(n), 0.2), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kwargs,error", [
    (dict(cls=StepDecay, step_size=0), ValueError),
    (dict(cls=StepDecay, step_size=2, gamma=0.0), ValueError),
    (dict(cls=StepDecay, step_size=2, gamma=1.5), ValueError),
    (dict(cls=ExponentialDecay, gamma=-0.5), ValueError),
    (dict(cls=CosineAnnealing, t_max=0), ValueError),
    (dict(cls=CosineAnnealing, t_max=5, min_lr=-1.0), ValueError),
    (dict(cls=LinearWarmup, warmup=0), ValueError),
    (dict(cls=LinearWarmup, warmup=3, start_factor=0.0), ValueError),
    (dict(cls=LinearWarmup, warmup=3, then=StepDecay(2, per="step")), TypeError),
    (dict(cls=StepDecay, step_size=2, per="batch"), ValueError),
])
def test_bad_schedule_arguments(kwargs, error):
    kwargs = dict(kwargs)
    cls = kwargs.pop("cls")
    with pytest.raises(error):
        cls(**kwargs)


# =========================================================================== in fit
def data(n=500):
    X, y = digits()
    return X[:n], y[:n]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("schedule", [StepDecay(2, 0.5), CosineAnnealing(5, min_lr=0.01),
                                      LinearWarmup(3, 0.2)], ids=repr)
def test_per_epoch_schedule(schedule, dtype):
    X, y = data()
    a, b = twins((64, 12, 10), seed=1, dtype=dtype)
    opt_a, opt_b = bp.SGD(lr=0.1, momentum=0.9), bp.SGD(lr=0.1, momentum=0.9)
    recorder = Recorder()
    history = a.fit(X, y, loss=CE, optimizer=opt_a, epochs=6, batch_size=100, shuffle=False,
                    schedule=schedule, callbacks=[recorder])
    rates = [float(schedule(e, 0.1)) for e in range(6)]
    assert history.history["lr"] == rates
    # the optimizer's rate; callbacks number epochs from 1, the schedule from 0
    assert [recorder.lr_at_begin[e + 1] for e in range(6)] == rates
    assert opt_a.initial_lr == 0.1 and opt_a.lr == rates[-1]
    for epoch in range(6):
        opt_b.lr = rates[epoch]
        for rows in batches(500, 100):
            b.train_step(X[rows], y[rows], CE, opt_b)
    np.testing.assert_array_equal(a.parameters, b.parameters)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("schedule", [
    CosineAnnealing(12, min_lr=0.001, per="step"),
    LinearWarmup(5, 0.1, then=ExponentialDecay(0.8, per="step"), per="step"),
    StepDecay(4, 0.5, per="step"),
], ids=repr)
def test_per_step_schedule_equals_setting_lr_before_each_step(schedule, dtype):
    X, y = data()
    a, b = twins((64, 12, 10), seed=2, dtype=dtype)
    opt_a, opt_b = bp.Adam(lr=0.02), bp.Adam(lr=0.02)
    recorder = Recorder()
    history = a.fit(X, y, loss=CE, optimizer=opt_a, epochs=3, batch_size=100, shuffle=False,
                    schedule=schedule, callbacks=[recorder])
    rates = schedule(np.arange(16), 0.02)
    for step in range(15):
        opt_b.lr = float(rates[step])
        rows = batches(500, 100)[step % 5]
        b.train_step(X[rows], y[rows], CE, opt_b)
    np.testing.assert_array_equal(a.parameters, b.parameters)
    # the history has each epoch's first rate; after fit the optimizer holds the next one
    assert history.history["lr"] == [float(rates[0]), float(rates[5]), float(rates[10])]
    assert opt_a.step_count == 15 and opt_a.lr == float(rates[15])
    # the rate really changed within an epoch
    assert len(set(rates[:5].tolist())) > 1


def test_callable_schedule_gets_global_epochs():
    X, y = data()
    a, b = twins((64, 12, 10), seed=3)
    opt_a, opt_b = bp.SGD(lr=0.1), bp.SGD(lr=0.1)
    calls = []

    def rate(epoch):
        calls.append(epoch)
        return 0.1 / (1 + epoch)

    first = a.fit(X, y, loss=CE, optimizer=opt_a, epochs=3, batch_size=250, shuffle=False,
                  schedule=rate)
    second = a.fit(X, y, loss=CE, optimizer=opt_a, epochs=2, batch_size=250, shuffle=False,
                   schedule=rate)
    assert calls == [0, 1, 2, 3, 4]
    assert first.history["lr"] + second.history["lr"] == [0.1 / (1 + e) for e in range(5)]
    assert second.epoch == [4, 5]  # the epochs' numbers, from 1
    for epoch in range(5):
        opt_b.lr = 0.1 / (1 + epoch)
        for rows in batches(500, 250):
            b.train_step(X[rows], y[rows], CE, opt_b)
    np.testing.assert_array_equal(a.parameters, b.parameters)


@pytest.mark.parametrize("schedule", [ExponentialDecay(0.7),
                                      CosineAnnealing(9, per="step")], ids=repr)
@pytest.mark.parametrize("shuffle", [False, True])
def test_schedule_continues_across_fit_calls(schedule, shuffle):
    X, y = data(300)
    a, b = twins((64, 12, 10), seed=4)
    opt_a, opt_b = bp.Adam(lr=0.01), bp.Adam(lr=0.01)
    one = a.fit(X, y, loss=CE, optimizer=opt_a, epochs=3, batch_size=100, shuffle=shuffle,
                schedule=schedule)
    two = a.fit(X, y, loss=CE, optimizer=opt_a, epochs=2, batch_size=100, shuffle=shuffle,
                schedule=schedule)
    whole = b.fit(X, y, loss=CE, optimizer=opt_b, epochs=5, batch_size=100, shuffle=shuffle,
                  schedule=schedule)
    np.testing.assert_array_equal(a.parameters, b.parameters)
    assert one.history["lr"] + two.history["lr"] == whole.history["lr"]
    assert two.epoch == [4, 5] and opt_a.initial_lr == 0.01
    t = 3 if schedule.per == "epoch" else 9
    assert two.history["lr"][0] == float(schedule(t, 0.01))


def test_callable_schedule_returning_a_bad_rate_raises():
    X, y = data(100)
    net = mlp((64, 8, 10))
    with pytest.raises(ValueError, match="learning rate"):
        net.fit(X, y, loss=CE, optimizer=bp.SGD(lr=0.1), epochs=3,
                schedule=lambda epoch: 0.1 if epoch < 1 else -1.0)
    assert net.epochs_trained == 1 and np.isfinite(net.parameters).all()


def test_bad_schedule_type_raises_before_anything_changes():
    X, y = data(100)
    net = mlp((64, 8, 10))
    opt = bp.SGD(lr=0.1)
    with unchanged(net, opt):
        with pytest.raises(TypeError, match="schedule"):
            net.fit(X, y, loss=CE, optimizer=opt, schedule="cosine")
