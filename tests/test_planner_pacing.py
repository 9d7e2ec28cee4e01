"""Pacing of the looks (issue 27): scouts that find the first archives of quick preparations
soon, and looks that wait while the link has spare time before the last archive is ready.
Unit tests of LookPlanner and Scheduler on a fake clock, one end-to-end test, and the
simulation of tests/pacing_sim.py on a few accounts."""

import os
import random
import sys

import smugmug_download as sd
from conftest import tree

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pacing_sim  # noqa: E402

MB = 1_000_000


class Clock:
    def __init__(self, now=0.0):
        self.now = now

    def __call__(self):
        return self.now


def test_scouts_look_at_several_albums_at_the_first_waits_and_few_in_all():
    """At the first waits a scout round looks at SCOUT_EARLY of the albums / the wait squared
    (more than the free look threads: SCOUT_LIMIT per thread), so that the first archive of a
    1-3 s preparation is found soon; the extra looks add up to a few, however long the wait."""
    planner = sd.LookPlanner(1.0, 30.0)
    for i in range(120):
        planner.add(i, 0.0)
    first = planner.plan(1.0, need=4, limit=4)
    assert len(first) == 4 * sd.SCOUT_LIMIT                         # past the 4 free look threads
    assert sd.scout_count(1.0, 120) >= 4 * sd.SCOUT_LIMIT
    assert sd.scout_count(1.0, 120) > 1 + int(1.0 * sd.SCOUT_SHARE * 120)   # the rule of long waits: 1
    assert sd.scout_count(8.0, 80) == int(8.0 * sd.SCOUT_SHARE * 80)         # at long waits: that rule

    def scouting(albums, until):
        """Scout looks sent, every look a miss, up to this wait."""
        planner = sd.LookPlanner(1.0, 30.0)
        for i in range(albums):
            planner.add(i, 0.0)
        sent, now = 0, 1.0
        while now <= until:
            for run in planner.plan(now, need=4, limit=4):
                planner.seen(run, False, now)
                sent += 1
            now += 0.01
        return sent

    early = scouting(80, 8.0)
    saved = sd.SCOUT_EARLY
    try:
        sd.SCOUT_EARLY = 0.0
        without = scouting(80, 8.0)
    finally:
        sd.SCOUT_EARLY = saved
    assert without < early <= without + 16                          # 0.2 looks per album at most


def planner_learnt(found=10, missed=10):
    """A planner that saw `found` archives ready between 8 and 12 s and `missed` not ready at
    12 s (asked at 0), plus fresh albums asked at 0 and never looked at."""
    planner = sd.LookPlanner(1.0, 300.0)
    for i in range(found):
        planner.add(("found", i), 0.0)
        planner.seen(("found", i), False, 8.0)
        planner.seen(("found", i), True, 8.0 + 4.0 * (i + 1) / found)
    for i in range(missed):
        planner.add(("missed", i), 0.0)
        planner.seen(("missed", i), False, 12.0)
    for i in range(5):
        planner.add(("fresh", i), 0.0)
    return planner


def test_the_last_archive_is_expected_as_the_share_ready_grows():
    """Half of the archives ready between 8 and 12 s, the rest not by 12 s: all should be ready
    by about 16 s (the share ready growing on as it did); never later than READY_END_REACH times
    the longest wait seen; nothing is expected before any archive was seen ready."""
    planner = planner_learnt()
    assert 15.0 < planner.ready_end(12.0) < 17.5
    few = planner_learnt(found=1, missed=60)                          # 1 in 61 by 12 s: 100 s away,
    assert few.ready_end(12.0) <= 12.0 * sd.READY_END_REACH + 0.5     # but capped
    late = planner_learnt()
    late.add("young", 10.0)                                           # asked at 10 s: later still
    assert late.ready_end(12.0) > planner.ready_end(12.0) + 9.0
    fresh = sd.LookPlanner(1.0, 30.0)
    fresh.add("a", 0.0)
    assert fresh.ready_end(5.0) is None


def test_looks_wait_for_near_certain_albums_while_the_link_has_spare_time():
    """While the link could idle LOOK_SPARE seconds and still take every archive before the last
    is ready, an album whose chance is only middling is not looked at (it will be surer later);
    with no spare time it is; the exploring look is unchanged."""
    planner = planner_learnt()
    planner.estimate()
    middling = [r for r, item in planner.albums.items()
                if sd.LOOK_ODDS_IDLE <= planner.chance(item, 12.5) < sd.LOOK_ODDS_BUSY]
    assert middling
    planner.explore_after = 100.0                                   # no exploring look for now
    assert planner.plan(12.5, need=4, limit=4, spare=sd.LOOK_SPARE) == []
    chosen = planner.plan(12.5, need=4, limit=4, spare=0.0)
    assert chosen and set(chosen) <= set(middling)
    for run in chosen:
        planner.albums[run].looking = False
    planner.explore_after = 0.0                                     # the exploring look: as before
    assert len(planner.plan(12.5, need=4, limit=4, spare=sd.LOOK_SPARE)) == 1


def scheduler_with(clock, workers=4):
    return sd.Scheduler(pacing_sim.Config(), workers, pacing_sim.Link(), pacing_sim.Gate(), sd.Meter(clock),
                        clock=clock)


def test_busy_rate_counts_only_the_time_downloads_run():
    """Between small archives the link idles: their rate is that of the seconds downloads ran
    (what the link takes), not the bytes over all the time; unknown before BUSY_RATE_SECONDS."""
    clock = Clock()
    scheduler = scheduler_with(clock)
    assert scheduler.busy_rate() == 0.0
    for _ in range(5):                              # 3 MB in 0.05 s, then 2 s idle, five times
        run = pacing_sim.Run(0, 1.0, 3 * MB)
        task = pacing_sim.Task(run)
        scheduler.queue_download(task)
        assert scheduler.downloads() == [task]
        clock.now += 0.05
        scheduler.meter.add(3 * MB)
        scheduler.download_done(task)
        clock.now += 2.0
    assert abs(scheduler.busy_rate() - 60 * MB) < 1e-6 * MB         # not 15 MB / 10.25 s


def test_spare_time_only_when_preparation_sets_the_pace():
    """Spare seconds: until the last archive should be ready, minus what the link needs for
    every archive in preparation (at the size of those prepared) and what is queued. Small
    archives: spare; large ones on the same preparation: none (the link sets the pace)."""
    for size, spare in ((2 * MB, True), (40 * MB, False)):
        clock = Clock(12.0)
        scheduler = scheduler_with(clock)
        scheduler.looks = planner_learnt()
        scheduler.looks._clock = clock
        scheduler.prepared, scheduler.prepared_bytes = 10, 10 * size
        scheduler._busy_sum = [1.0, 60 * MB]                        # the link takes 60 MB/s
        got = scheduler.spare_seconds(0.0)
        end = scheduler.looks.ready_end(12.0)
        if spare:
            assert abs(got - (end - 12.0 - 15 * size / (60 * MB))) < 1e-6
        else:
            assert got == 0.0
    clock = Clock(12.0)
    scheduler = scheduler_with(clock)
    scheduler.looks = planner_learnt()
    scheduler.prepared, scheduler.prepared_bytes = 10, 10 * 2 * MB
    assert scheduler.spare_seconds(0.0) == 0.0                      # no rate known yet: no spare


def simulated(shape, seeds, **constants):
    """[(wall / bound, calls per album, first ready archive to first download)] of
    tests/pacing_sim.py on these accounts of the shape, with these constants of the tool."""
    saved = {name: getattr(sd, name) for name in constants}
    try:
        for name, value in constants.items():
            setattr(sd, name, value)
        return [pacing_sim.simulate(pacing_sim.account(random.Random(seed), shape))[:2] + (pacing_sim.simulate.gap,)
                for seed in seeds]
    finally:
        for name, value in saved.items():
            setattr(sd, name, value)


def test_simulated_prep_bound_accounts_spend_fewer_looks():
    """tests/pacing_sim.py on accounts where preparation sets the pace (80 albums of 1-4 MB,
    8-20 s): with the spare-time rule the looks that find nothing drop, the wall stays within
    1.15 of the bound."""
    with_rule = simulated("prepbound", (1, 2))
    without = simulated("prepbound", (1, 2), LOOK_SPARE=float("inf"))     # spare time never counts
    assert all(wall <= 1.15 for wall, _, _ in with_rule)
    assert sum(calls for _, calls, _ in with_rule) < sum(calls for _, calls, _ in without) - 0.3


def test_simulated_first_downloads_follow_the_first_ready_archive():
    """tests/pacing_sim.py on accounts of the benchmark account's shape (120 albums, 1-3 s): the
    first download starts sooner after the first archive is ready (on these six accounts, in
    under half the time the scouts of growing waits alone take), for at most a tenth more API
    calls. (One account at a time it varies: a scout round may just miss the first archive.)"""
    with_rule = simulated("account", range(6))
    without = simulated("account", range(6), SCOUT_EARLY=0.0)
    assert sum(gap for _, _, gap in with_rule) < 0.5 * sum(gap for _, _, gap in without)
    assert sum(calls for _, calls, _ in with_rule) < sum(calls for _, calls, _ in without) * 1.1


def test_looks_count_their_wait_from_the_requests_answer(fake, run, planner_adds):
    """The request pool may hold a request a while, and SmugMug makes the archive when the
    request arrives: the planner counts an album's wait from the answer, never from when the
    request was handed to the pool (which would make every scout look early)."""
    fake.api_latency = 0.05
    fake.prep_seconds = 0.3
    keys = [fake.add_album("Album %d" % i, sizes=(500,)) for i in range(10)]
    code, _, err = run("--workers", "2")
    asked = {key: when for key, (when, _) in planner_adds.items()}
    assert code == 0, err
    assert len(tree(run.out)) >= 10
    preparing = [k for k in keys if k in asked]
    assert preparing
    for key in preparing:
        assert asked[key] >= fake.archives[key][0].created


def test_the_simulations_percentiles_are_points_of_the_sorted_values():
    """pacing_sim weighs a setting on percentiles over many accounts, not on the noisy worst."""
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 9.0, 8.0, 7.0, 6.0]
    assert pacing_sim.percentiles(values, (0.0, 0.5, 0.8, 0.95, 1.0)) == [1.0, 6.0, 9.0, 10.0, 10.0]
    assert pacing_sim.percentiles([3.0], (0.8, 0.95)) == [3.0, 3.0]
