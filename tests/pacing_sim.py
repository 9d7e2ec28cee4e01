#!/usr/bin/env python3
"""A quick simulation of the tool's Scheduler (window, backlog bound, LookPlanner) on virtual time.

    python tests/pacing_sim.py [--accounts 40] [--shape spread|tail|account|slowprep]

Not collected by pytest. Drives the real Scheduler and LookPlanner of smugmug_download.py with a
virtual clock against a simple model of SmugMug (each album's archive is ready a fixed time after
its request; downloads share the link's capacity among at most `workers` connections; each API
call takes `latency`), and reports, over many random accounts, the worst wall / lower bound and
the worst API calls per album (requests, looks, listings; walk not simulated: add its share).
It is a tuning aid: the figures that count come from tests/benchmark.py against the emulator.
"""

import argparse
import collections
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import smugmug_download as sd  # noqa: E402

MB = 1_000_000


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Link:
    up = True


class Gate:
    pressure = 0

    @staticmethod
    def resumes():
        return None


class Run:
    def __init__(self, key, prep, size):
        self.key, self.prep, self.size = key, prep, size
        self.generation, self.state = 0, "waiting"
        self.running = collections.Counter()
        self.asked = None


class Task:
    def __init__(self, run):
        self.run, self.generation, self.size, self.done, self.part = run, 0, run.size, 0, True


class Config:
    def __init__(self, max_preparing=256, poll_seconds=1.0, poll_max_seconds=30.0):
        self.max_preparing, self.poll_seconds, self.poll_max_seconds = max_preparing, poll_seconds, poll_max_seconds


def account(rng, shape, n=80):
    """[(prep seconds, bytes)] of a random account of the shape."""
    albums = []
    for _ in range(n):
        size = rng.uniform(5 * MB, 20 * MB)
        if shape == "spread":
            prep = rng.uniform(8, 20)
        elif shape == "tail":
            prep = rng.uniform(5, 15) if rng.random() < 0.85 else rng.uniform(15, 60)
        elif shape == "account":
            prep, size = rng.uniform(1, 3), rng.uniform(2 * MB, 6 * MB)
        else:
            prep = rng.uniform(10, 40)
        albums.append((prep, size))
    return albums


def simulate(albums, cap=60 * MB, workers=4, latency=0.03, step=0.01, walk=0.3):
    clock = Clock()
    meter = sd.Meter(clock)
    scheduler = sd.Scheduler(Config(), workers, Link(), Gate(), meter, clock=clock)
    runs = [Run(i, p, s) for i, (p, s) in enumerate(albums)]
    calls = collections.Counter()
    events = []                        # (time, kind, run)
    clock.now = walk
    for run in runs:
        scheduler.want_archive(run)
    done = 0
    busy = collections.Counter()          # second -> steps with the link in use
    while done < len(runs) and clock.now < 3600:
        for run in scheduler.requests():
            calls["post"] += 1
            run.state = "requesting"
            run.asked = clock.now
            events.append((clock.now + latency, "requested", run))
        for run in scheduler.looks_now():
            calls["look"] += 1
            events.append((clock.now + latency, "looked", run))
        for task in scheduler.downloads():
            task.run.running[0] += 1
        # the link: share the capacity among the running downloads
        active = list(scheduler.running)
        busy[int(clock.now)] += bool(active)
        if active:
            share = cap * step / len(active)
            for task in active:
                take = min(share, task.size - task.done)
                task.done += take
                meter.add(take)
                if task.done >= task.size:
                    scheduler.download_done(task)
                    task.run.running[0] -= 1
                    calls["images"] += 1
                    events.append((clock.now + latency, "checked", task.run))
        clock.now += step
        meter.sample()
        for event in [e for e in events if e[0] <= clock.now]:
            events.remove(event)
            _, kind, run = event
            if kind == "requested":
                run.state = "preparing"
                scheduler.preparing(run, run.asked)
            elif kind == "looked":
                ready = clock.now - latency - run.asked >= run.prep
                scheduler.looked(run, ready)
                if ready:
                    run.state = "downloading"
                    scheduler.prepared_archive(run, run.size)
                    scheduler.queue_download(Task(run))
            elif kind == "checked":
                run.state = "done"
                done += 1
    total = sum(s for _, s in albums)
    bound = walk + max(min(p for p, _ in albums) + total / cap, max(p + s / cap for p, s in albums))
    simulate.busy = busy
    return clock.now / bound, sum(calls.values()) / len(albums), calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=40)
    parser.add_argument("--shape", default="spread")
    parser.add_argument("--albums", type=int, default=80)
    parser.add_argument("--cap", type=float, default=60.0, help="MB/s")
    args = parser.parse_args(argv)
    results = []
    for seed in range(args.accounts):
        albums = account(random.Random(seed), args.shape, args.albums)
        ratio, per_album, calls = simulate(albums, cap=args.cap * MB)
        results.append((ratio, per_album, seed, dict(calls)))
    worst_ratio = max(results)
    worst_calls = max(results, key=lambda r: r[1])
    mean = lambda i: sum(r[i] for r in results) / len(results)
    print("%s, %d accounts: wall/bound mean %.3f worst %.3f (seed %d); calls/album mean %.2f worst %.2f (seed %d %s)"
          % (args.shape, len(results), mean(0), worst_ratio[0], worst_ratio[2], mean(1), worst_calls[1],
             worst_calls[2], worst_calls[3]))


if __name__ == "__main__":
    main()
