"""Learning-rate schedules (t2ilab.schedules): warmup-stable-decay's rate at every step against
its definition, diffusers' schedules passed through unchanged, and the method configs' schedule
built from the composed config."""

from __future__ import annotations

import hydra
import pytest
import torch
from _support import compose_cfg
from diffusers.optimization import get_scheduler as diffusers_scheduler

from t2ilab.errors import UserError
from t2ilab.schedules import get_scheduler


def _rates(schedule, optimizer, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


def _optimizer(lr: float = 1e-3):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_warmup_stable_decay_rates():
    opt = _optimizer()
    schedule = get_scheduler(
        "warmup_stable_decay", opt, num_warmup_steps=10, num_training_steps=100, num_decay_steps=30
    )
    expected = [1e-3 * s / 10 for s in range(10)]  # warm-up
    expected += [1e-3] * (70 - 10)  # stable to step 70
    expected += [1e-3 * (100 - s) / 30 for s in range(70, 100)]  # decay to zero at 100
    assert _rates(schedule, opt, 100) == pytest.approx(expected)


def test_a_run_shorter_than_its_decay_decays_over_every_step():
    opt = _optimizer()
    schedule = get_scheduler(
        "warmup_stable_decay", opt, num_warmup_steps=0, num_training_steps=4, num_decay_steps=3000
    )
    assert _rates(schedule, opt, 4) == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine"])
def test_diffusers_schedules_pass_through(name):
    ours, theirs = _optimizer(), _optimizer()
    kwargs = dict(num_warmup_steps=5, num_training_steps=40)
    assert _rates(get_scheduler(name, ours, **kwargs), ours, 40) == pytest.approx(
        _rates(diffusers_scheduler(name, theirs, **kwargs), theirs, 40)
    )


def test_warmup_stable_decay_without_decay_steps_names_the_key():
    with pytest.raises(UserError, match="needs num_decay_steps >= 1"):
        get_scheduler("warmup_stable_decay", _optimizer(), num_training_steps=10)


@pytest.mark.parametrize("method", ["dit", "pixart", "dreambooth"])
def test_the_method_configs_build_warmup_stable_decay(method, tmp_path):
    cfg = compose_cfg(
        [
            f"method={method}",
            "method.module.lr_scheduler.name=warmup_stable_decay",
            "+method.module.lr_scheduler.num_decay_steps=2",
            "trainer.max_steps=6",
            "method.lr=1e-3",
        ],
        tmp_path,
    )
    opt = _optimizer()
    schedule = hydra.utils.instantiate(cfg.method.module.lr_scheduler)(optimizer=opt)
    warmup = int(cfg.method.module.lr_scheduler.get("num_warmup_steps") or 0)
    assert warmup == 0
    assert _rates(schedule, opt, 6) == pytest.approx([1e-3] * 4 + [1e-3, 5e-4])
