"""The thread governor: picks the faster count, backs off under competition, changes no weights."""

from __future__ import annotations

import time

import pytest
import torch

from lenet5.data.transforms import to_model_input
from lenet5.models import create_model
from lenet5.train.step import TrainStep
from lenet5.train.threads import ThreadGovernor, candidate_counts


@pytest.fixture(autouse=True)
def keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_candidate_counts():
    assert candidate_counts(1) == [1]
    assert candidate_counts(2) == [2, 1]
    assert candidate_counts(8) == [8, 4, 2, 1]
    assert candidate_counts(6) == [6, 3, 1]


def sleeper(seconds_by_threads: dict[int, float]):
    """Work whose time depends on the thread count, as a step's does under competition."""
    return lambda: time.sleep(seconds_by_threads[torch.get_num_threads()])


def test_probe_keeps_the_full_count_when_it_is_fastest():
    governor = ThreadGovernor(2, repeats=3)
    assert governor.probe(sleeper({2: 0.002, 1: 0.040})) == 2 and torch.get_num_threads() == 2


def test_probe_backs_off_when_fewer_threads_are_clearly_faster():
    governor = ThreadGovernor(2, repeats=3)
    assert governor.probe(sleeper({2: 0.040, 1: 0.002})) == 1 and torch.get_num_threads() == 1


def test_probe_ignores_a_small_difference():
    """Switching costs bit-reproducibility, so a gain inside the margin is not taken."""
    governor = ThreadGovernor(2, repeats=3, margin=0.5)
    assert governor.probe(sleeper({2: 0.006, 1: 0.004})) == 2


def test_a_slowdown_asks_for_a_probe_and_a_steady_pace_does_not():
    governor = ThreadGovernor(2, slowdown=1.4)
    asked = [governor.step_done(0.010) for _ in range(30)]
    assert not any(asked)  # the reference is measured; steady steps never ask
    asked = [governor.step_done(0.030) for _ in range(10)]
    assert asked[-1]  # three times slower for a whole window: probe


def test_one_slow_step_is_not_competition_but_a_slow_share_of_them_is():
    """Steps are compared by their mean without the slowest: a single hiccup (a collection, a sync for
    the log) asks for nothing, but a share of steps waiting on a busy core does (their median hid it)."""
    governor = ThreadGovernor(2, slowdown=1.4)
    assert not any(governor.step_done(0.010) for _ in range(30))  # the reference
    assert not any(governor.step_done(s) for s in [0.010] * 9 + [0.100])  # one slow step in ten
    asked = [governor.step_done(s) for s in [0.010] * 6 + [0.030] * 4]  # four in ten a time slice late
    assert asked[-1]


def test_steps_slower_than_what_another_count_did_in_the_probe_ask_again():
    """A probe under competition can keep the wrong count (its few timings are noisy); the real steps
    then run slower than the other count did, and that asks for another probe."""
    governor = ThreadGovernor(2, repeats=1, margin=0.85)
    governor.probe(sleeper({2: 0.010, 1: 0.012}))  # 1 thread within the margin: 2 kept
    assert governor.threads == 2
    asked = [governor.step_done(0.011) for _ in range(30)]
    assert not any(asked)  # as fast as the probe said: no reason to look again
    governor.probe(sleeper({2: 0.010, 1: 0.012}))
    asked = [governor.step_done(0.020) for _ in range(10)]
    assert asked[-1]  # but steps at 20 ms, where 1 thread took 12: look again


def test_when_the_probe_and_the_real_steps_disagree_the_real_steps_decide():
    """Beside a busy core the probe's back-to-back steps ran two threads at full speed while the real
    steps took twice one thread's time: a probe that keeps the count the real steps contradict starts
    a trial of real steps at the other count, kept when they are faster."""
    governor = ThreadGovernor(2, repeats=1, margin=0.85)
    governor.probe(sleeper({2: 0.005, 1: 0.007}))  # the probe's view: 2 threads, 1 within the margin
    assert governor.threads == 2
    asked = [governor.step_done(0.013) for _ in range(10)]  # real steps at 2 threads: 13 ms
    assert asked[-1]
    assert governor.probe(sleeper({2: 0.005, 1: 0.007})) == 1 and torch.get_num_threads() == 1  # the trial
    asked = [governor.step_done(0.0075) for _ in range(10)]  # real steps at 1 thread: 7.5 ms
    assert not any(asked) and governor.threads == 1 and governor.trials == 1  # kept


def test_a_trial_that_loses_goes_back_and_is_not_repeated():
    """Real steps that cost more than probe steps for a reason of their own (an optimizer's step, say)
    are as slow at the other count: the trial goes back, and the governor allows for the difference
    from then on instead of trying again and again."""
    governor = ThreadGovernor(2, repeats=1, margin=0.85)
    governor.probe(sleeper({2: 0.010, 1: 0.012}))
    assert [governor.step_done(0.020) for _ in range(10)][-1]  # real steps at 20 ms, 1 thread probed 12
    assert governor.probe(sleeper({2: 0.010, 1: 0.012})) == 1  # the trial
    asked = [governor.step_done(0.024) for _ in range(10)]  # 1 thread's real steps: slower still
    assert not any(asked) and governor.threads == 2 and torch.get_num_threads() == 2  # back
    asked = [governor.step_done(0.020) for _ in range(40)]
    assert not any(asked) and governor.trials == 1  # no second trial for the same difference


def test_below_the_full_count_it_rechecks_after_a_while():
    governor = ThreadGovernor(2, repeats=1, recheck_s=0.0)
    governor.probe(sleeper({2: 0.040, 1: 0.002}))
    assert governor.threads == 1
    asked = [governor.step_done(0.002) for _ in range(30)]
    assert any(asked)  # the competition may have gone: look again


def test_shadow_step_changes_no_state(mnist):
    """The probes' work: weights and gradients are as before it ran."""
    torch.manual_seed(0)
    model = create_model("lenet5")
    x, y = to_model_input(mnist.train.images[:32]), mnist.train.labels[:32]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    TrainStep(model, torch.optim.SGD(model.parameters()), None, model).shadow(x, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
