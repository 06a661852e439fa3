"""training.train's command line: the `all` plan runs every stage in order with its own options, and
--minutes/--steps take one value or one per stage (the shipped run is reproducible with --steps)."""

import pytest

from training import train as T


@pytest.fixture()
def calls(monkeypatch):
    seen = []
    for name in list(T.STAGES):
        monkeypatch.setitem(T.STAGES, name, lambda minutes, _n=name, **kw: seen.append((_n, minutes, kw)))
    monkeypatch.setattr(T.torch, "set_num_threads", lambda n: None)
    return seen


def test_all_runs_the_plan_in_order_with_stage_options(calls, monkeypatch):
    T.main(["all", "--steps", "10", "20", "30", "40"])
    assert [c[0] for c in calls] == ["vae", "decoder", "unet", "controlnet"]
    assert [c[2]["steps"] for c in calls] == [10, 20, 30, 40]
    assert [c[1] for c in calls] == [m for _, m, _ in T.ALL_PLAN]
    # a stage's own options (a resumed stage, say) reach it, and only it
    calls.clear()
    monkeypatch.setattr(T, "ALL_PLAN", [("unet", 5, {}), ("unet", 6, {"resume": True, "lr": 5e-4})])
    T.main(["all"])
    assert calls == [("unet", 5, {"steps": None}), ("unet", 6, {"steps": None, "resume": True, "lr": 5e-4})]


def test_one_value_applies_to_every_stage_and_a_wrong_count_is_an_error(calls):
    T.main(["all", "--minutes", "1"])
    assert [c[1] for c in calls] == [1.0] * len(T.ALL_PLAN)
    with pytest.raises(SystemExit):
        T.main(["all", "--steps", "1", "2"])


def test_single_stage_takes_cli_options(calls):
    T.main(["unet", "--minutes", "3", "--resume", "--lr", "1e-4", "--batch", "8"])
    assert calls == [("unet", 3.0, {"steps": None, "resume": True, "lr": 1e-4, "batch": 8})]


def test_deadline_step_budget_and_fraction():
    dl = T.Deadline(minutes=1000, save_every_s=1e9, steps=4)
    fracs = []
    while not dl.over():
        fracs.append(dl.frac())
    assert fracs == [0.0, 0.25, 0.5, 0.75]
