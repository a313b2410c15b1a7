"""How many CPU threads a training step should use while other processes compete for the cores.

PyTorch splits each operation statically over its threads, so one thread on a core that another
process also wants makes every operation wait for it: with one of 2 cores kept busy, a classic
lenet5 epoch took 3.4x its quiet time on 2 threads and 1.4x on 1 thread; two trainings at once,
2 threads each, took over 15x (measured on a 2-core EPYC, issue 9). The governor keeps the full
count while that is fastest and falls back to fewer threads when measurements say so.

Probes time extra forward and backward passes whose gradients are thrown away, so they change
no weight: on a quiet machine, where the full count wins every probe, a run is bit-for-bit the
run it would be without the governor. Under load the count follows the measurements, and another
count rounds some sums differently (oneDNN and MKL split reductions per thread), so results
may differ in the last bits; `--threads N` fixes the count and, with it, those bits.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Callable

import torch


def _typical(times: deque[float]) -> float:
    """The mean of recent step times without the slowest one. The mean, since time adds up: beside a busy
    core most steps at two threads run at full speed and the rest wait a whole time slice for the core
    the other process holds, and their median hid that (a 2-core Intel Xeon as `avx2` kept two threads
    and took 2.8x its quiet time beside the busy core). Without the slowest, since one slow step (a
    collection, a sync for the log) is not competition: the plain mean once started a trial on a quiet
    machine and changed the run's bits."""
    ordered = sorted(times)
    return statistics.fmean(ordered[:-1] if len(ordered) > 1 else ordered)


def candidate_counts(most: int) -> list[int]:
    """The counts worth trying: the full count, then halving down to one."""
    counts, n = [], most
    while n > 1:
        counts.append(n)
        n //= 2
    return counts + [1]


class ThreadGovernor:
    """Watches training-step times and sets torch's thread count to the fastest of a few candidates.

    Steps of a run have one shape, so their times compare directly. `step_done` says when a probe
    is due: when the recent steps are `slowdown` times slower than the current count measured at
    the last probe (competition arrived); when they are slower than another count ran in the last
    probe, by the factor `margin` (that probe chose wrongly: a few timings under competition are
    noisy); or `recheck_s` seconds after a probe that left fewer than all threads (competition may
    have gone). `probe` times a state-free step at each count and keeps the fastest if it beats
    the current one by the factor `margin`.

    When the real steps ran slower than another count's probe steps and a new probe keeps the count
    all the same, the real steps decide: a trial runs the next window of real steps at the other
    count and keeps whichever count's real steps were faster by `margin`. Beside a busy core the
    probe's steps, run back to back, kept two threads at their quiet speed while the real steps, with
    Python between their operations, took twice one thread's time (2-core Intel Xeon as `avx2`,
    docs/results/xeon-avx512-bf16/). A trial follows only such a disagreement, which a quiet
    machine does not show, so quiet runs keep their bits.
    """

    def __init__(self, most: int, *, repeats: int = 5, margin: float = 0.85, slowdown: float = 1.4,
                 recheck_s: float = 5.0):
        self.counts = candidate_counts(most)
        self.repeats, self.margin, self.slowdown, self.recheck_s = repeats, margin, slowdown, recheck_s
        self.threads = most
        self.reference = 0.0  # seconds per real step at self.threads, just after the last probe
        self.alternative = 0.0  # seconds per probe step of the fastest count the last probe did not keep
        self.second_look = 0.0  # the real step time that asked for the probe under way by that comparison
        self.overhead = 1.0  # how much slower real steps are than probe steps at one count (optimizer, EMA, ...)
        self.recent: deque[float] = deque(maxlen=10)
        self.probed_at = time.perf_counter()
        self.probes = 0
        self.trial: tuple[int, float, float] | None = None  # (count to go back to, its real and probe step times)
        self.trials = 0
        torch.set_num_threads(most)

    def step_done(self, seconds: float) -> bool:
        """Record one training step's time (its forward pass through the optimizer's step, what a probe
        step times plus the update); True when a probe should follow."""
        self.recent.append(seconds)
        if len(self.recent) < self.recent.maxlen or len(self.counts) == 1:
            return False
        now = _typical(self.recent)
        if self.trial:
            self._end_trial(now)
            return False
        if self.alternative and self.margin * now > self.alternative * self.overhead:
            self.second_look = now
            return True
        if not self.reference:
            self.reference = now
            return False
        below_full = self.threads != self.counts[0]
        return now > self.slowdown * self.reference or (below_full and time.perf_counter() - self.probed_at > self.recheck_s)

    def probe(self, work: Callable[[], None]) -> int:
        """Time `work` (a step that changes no state) at each candidate count; keep the fastest."""
        medians = {}
        for n in [c for c in self.counts if c != self.threads] + [self.threads]:
            torch.set_num_threads(n)
            work()  # the first run at a new count pays its set-up
            times = []
            for _ in range(self.repeats):
                started = time.perf_counter()
                work()
                times.append(time.perf_counter() - started)
            medians[n] = statistics.median(times)
        best = min(medians, key=medians.__getitem__)
        kept = self.threads
        if medians[best] < self.margin * medians[self.threads]:
            self.threads = best
        others = [n for n in medians if n != kept]
        if self.second_look and self.threads == kept and others:
            # The same count again, though real steps ran slower than another count's probe steps: the
            # next real steps run at that count, and their time decides (`_end_trial`).
            self.trial = (kept, self.second_look, medians[kept])
            self.threads = min(others, key=medians.__getitem__)
            self.trials += 1
        self.alternative = min((t for n, t in medians.items() if n != self.threads), default=0.0)
        self.second_look = 0.0
        torch.set_num_threads(self.threads)
        self.recent.clear()
        self.reference = 0.0  # re-measured on the next real steps
        self.probed_at = time.perf_counter()
        self.probes += 1
        return self.threads

    def _end_trial(self, now: float) -> None:
        """A trial's window of real steps is done (`now`, their median): keep its count if they beat
        the count before it by `margin`; else go back to that count, where real steps are then simply
        slower than probe steps (an optimizer's step, say) by this much, which later comparisons allow
        for, so that the same disagreement does not start trial after trial."""
        back, before, probed = self.trial
        self.trial = None
        if now >= self.margin * before:
            self.threads = back
            torch.set_num_threads(back)
            self.overhead = max(self.overhead, before / probed)
        self.alternative = 0.0  # the real steps answered what the probe's other count asked
        self.recent.clear()
        self.reference = 0.0
        self.probed_at = time.perf_counter()
