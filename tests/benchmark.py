#!/usr/bin/env python3
"""Speed, API economy and footprint of smugmug_download against the emulator.

    python tests/benchmark.py [--scenarios account,slow-prep,slow-link,big,walk] [--big-mib 1024]
    (account: a backup, its rerun, --verify, then the switch to the files layout and its --verify)
    python tests/benchmark.py --scenarios account-shape,prep-bound,prep-spread,outage,quota
    python tests/benchmark.py --scenarios huge [--huge-seeds 1,2,3]

Not collected by pytest. Starts tests/fake_smugmug.py with realistic knobs (its
archives are real zips of the albums' images), runs the real script as a
subprocess at its default settings (so its peak RSS and CPU time are its own,
from wait4), and prints a table with the targets of issues #6, #11 and #13.

Not run by default (they take minutes; times on 2 cores):
  account-shape  five accounts of the account scenario's shape (its own seed and four others):
               wall / bound, and the seconds from the first archive ready (as the emulator
               made it) to the first archive download; the worst of each; about 1.5 minutes.
  prep-bound   five accounts of 80 albums of 1-4 MB, preparation 8-20 s: the link idles most of
               the run; wall / bound and API calls per album, the worst of each; about 2.5 minutes.
  prep-spread  six accounts of 80 albums, preparation 8-20 s (five seeds) and a long
               tail of 5-60 s (one): wall / bound and API calls per album for each,
               then the worst account; about 4 minutes.
  outage       40 albums undisturbed, then with a 75 s outage mid-run, then with a
               20 s outage at the start: exit code, failed albums, extra time; about
               1 minute while the tool gives up, about 2.5 minutes once it waits.
  quota        120 albums against a quota of 60 API calls per 10 s: exit code, wall,
               API calls inside a closed window; about 1.5 minutes.
  growing      one album of 60 photos (about 12 MB) and three others, five nights that
               each add two photos and one that replaces a photo and edits a caption
               (five seeds): per night the bytes downloaded as a share of the album and
               the growth of versions, every photo held and --verify passing.
  growing-month  thirty nights of one growing album (two photos a night; every seventh
               night one deleted, one replaced, one caption edited), three seeds: the
               versions added against the album's size; about 5 minutes.
  huge         peak RSS of a first run and an unchanged rerun of 2,000 albums of 50 photos
               (100,000) and of 10,000 albums of 5, each against 500 albums of as many photos
               an album, tiny photos prepared at once, three seeds: about 20 minutes.
These report a failing tool (MISSED) rather than stop on it.
"""

import argparse
import datetime
import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import fake_smugmug  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(HERE), "smugmug_download.py")
MB = 1_000_000
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"


# The tool is started by a small launcher process, not forked from this one: a child's peak RSS
# (ru_maxrss) counts the memory of the process it was forked from, and this one holds the emulator.
LAUNCHER = """
import json, os, signal, sys, time
out, argv = sys.argv[1], sys.argv[2:]
limit = float(os.environ.get("BENCH_TIMEOUT") or 0)     # seconds; then the child is ended
started = time.monotonic()
pid = os.fork()
if pid == 0:
    os.execvp(argv[0], argv)
while True:
    done, status, usage = os.wait4(pid, os.WNOHANG if limit else 0)
    if done:
        break
    if time.monotonic() - started > limit:
        os.kill(pid, signal.SIGTERM if time.monotonic() - started < limit + 10 else signal.SIGKILL)
    time.sleep(0.1)
with open(out, "w") as f:
    json.dump([os.waitstatus_to_exitcode(status), time.monotonic() - started,
               usage.ru_maxrss / 1024.0, usage.ru_utime + usage.ru_stime], f)
"""


def run_measured(argv, **kw):
    """(exit code, wall seconds, peak RSS MB, CPU seconds) of a child process, its own."""
    fd, report = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        subprocess.run([sys.executable, "-c", LAUNCHER, report] + list(argv), stdout=subprocess.DEVNULL,
                       stderr=kw.pop("stderr", subprocess.DEVNULL), check=True, **kw)
        with open(report) as f:
            return tuple(json.load(f))
    finally:
        os.remove(report)


def tool(config_path, *args):
    return [sys.executable, SCRIPT, "--config", config_path, "--quiet"] + list(args)


def write_config(folder, fake, **extra):
    path = os.path.join(folder, "config.json")
    data = fake.config(os.path.join(folder, "backup"), **extra)
    for key in ("poll_seconds", "poll_max_seconds"):      # the product's own defaults
        data.pop(key, None)
    data.update(extra)
    with open(path, "w") as f:
        json.dump(data, f)
    os.chmod(path, 0o600)
    return path


def images_of(rng, total, count):
    """count image specs whose sizes add up to about total bytes."""
    sizes = [rng.uniform(0.5, 1.5) for _ in range(count)]
    scale = total / sum(sizes)
    return [{"file_name": "IMG_%04d.JPG" % i, "size": max(1, int(s * scale))} for i, s in enumerate(sizes)]


def build_account(fake, albums=120, seed=7, size=(2 * MB, 6 * MB), prep=(1.0, 3.0), prep_of=None, levels=(4, 3, 2)):
    """Albums in folder levels (4 tops, 3 folders in each, 2 in each of those: 24 leaf folders
    by default), 5-15 images each; {key: (preparation seconds, archive bytes)}.
    prep_of(rng): an album's preparation seconds, instead of uniform over prep."""
    rng = random.Random(seed)
    info = {}
    leaves = [None]
    for depth, count in enumerate(levels):
        leaves = [fake.add_folder("Folder %d-%d" % (depth, i), parent) for parent in leaves for i in range(count)]
    for i in range(albums):
        total = rng.randint(*size)
        key = fake.add_album("Album %03d" % i, leaves[i % len(leaves)],
                             images=images_of(rng, total, rng.randint(5, 15)))
        fake.albums[key].prep_seconds = prep_of(rng) if prep_of else rng.uniform(*prep)
        info[key] = (fake.albums[key].prep_seconds, total)
    return info


def api_calls_by_kind(fake):
    """POST / archive GET (a !download GET) / images listings / other per-album calls / walk."""
    counts = {"walk": 0, "archive GET": 0, "POST": 0, "images": 0, "other": 0}
    for e in fake.log:
        kind = e["kind"]
        if kind in ("archive", "file"):
            continue
        if kind == "post":
            counts["POST"] += 1
        elif kind == "download-get":
            counts["archive GET"] += 1
        elif kind == "images":
            counts["images"] += 1
        elif kind == "walk":
            counts["walk"] += 1
        else:
            counts["other"] += 1
    return counts


class Sampler:
    """Samples the emulator's prepared-but-not-downloaded bytes while a run goes."""

    def __init__(self, fake):
        self.fake, self.peak, self.stop = fake, 0, threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self):
        while not self.stop.wait(0.2):
            with self.fake.lock:
                self.peak = max(self.peak, self.fake.prepared_undownloaded_bytes())

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def bound_of(info, cap, walk):
    """The time no tool could beat: walk, then the first preparation, then the link's capacity
    (or the slowest album's own preparation and download)."""
    total = sum(size for _, size in info.values())
    return walk + max(min(p for p, _ in info.values()) + total / cap,
                      max(p + size / cap for p, size in info.values()))


def throttled_early(fake):
    """API requests that arrived while a Retry-After window was closed, later than the
    calls already under way when the 429 was sent (0.25 s)."""
    started = getattr(fake, "throttle_started", None)
    return len([t for t, _ in fake.throttled_log if started is None or t > started + 0.25])


def start_gap(fake):
    """Seconds from the first archive the emulator made ready to the first archive download it
    served (None: no archive downloaded)."""
    ready = fake.first_ready_at()
    with fake.lock:
        served = [e["t"] for e in fake.log if e["kind"] == "archive" and e["status"] == 200]
    return min(served) - ready if served and ready is not None else None


def measure_run(rows, name, fake, info, config, target, gap_target=None):
    code, walk, _, _ = run_measured(tool(config, "--dry-run"))
    assert code == 0, "dry run failed"
    fake.log.clear()
    fake.throttled_log.clear()
    with Sampler(fake) as sampler:
        code, wall, rss, cpu = run_measured(tool(config))
    assert code == 0, "%s: backup failed (exit %d)" % (name, code)
    bound = bound_of(info, fake.bandwidth, walk)
    calls = api_calls_by_kind(fake)
    n = len(info)
    per_album = (calls["archive GET"] + calls["POST"] + calls["images"] + calls["other"]) / n
    total = sum(size for _, size in info.values())
    rows.append((name, "albums / bytes", "%d / %.0f MB" % (n, total / MB), ""))
    rows.append((name, "wall time (walk)", "%.2f s (%.2f s)" % (wall, walk), ""))
    rows.append((name, "wall / lower bound", "%.2f (bound %.2f s)" % (wall / bound, bound),
                 "<= %.2f: %s" % (target, ok(wall / bound <= target))))
    rows.append((name, "API calls per album", ", ".join("%s %.2f" % (k, v / n) for k, v in calls.items()
                                                       if k != "walk"), "<= 5: %s" % ok(per_album <= 5)))
    gap = start_gap(fake)
    rows.append((name, "first download after the first ready archive", "%.2f s" % gap if gap is not None else "-",
                 "<= %.1f s: %s" % (gap_target, ok(gap is not None and gap <= gap_target)) if gap_target else ""))
    rows.append((name, "prepared, not downloaded (peak)", "%.0f MB" % (sampler.peak / MB), ""))
    rows.append((name, "requests inside Retry-After", "%d" % throttled_early(fake),
                 "0: %s" % ok(throttled_early(fake) == 0)))
    return wall, sampler.peak


@contextlib.contextmanager
def account(keep, name, bandwidth, **build):
    """An emulated account over a capped link with 30 ms per API call, and a config for it:
    (fake, {key: (preparation, bytes)}, config path); stopped and cleaned up after."""
    fake = fake_smugmug.FakeSmugMug().start()
    fake.api_latency = 0.030
    fake.bandwidth = bandwidth
    info = build_account(fake, **build)
    folder = tempfile.mkdtemp(prefix="bench-%s-" % name)
    try:
        yield fake, info, write_config(folder, fake)
    finally:
        fake.stop()
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def scenario_account(rows, keep):
    with account(keep, "account", 60 * MB) as (fake, info, config):
        fake.throttle_calls = {200}
        fake.retry_after = 1
        measure_run(rows, "account", fake, info, config, 1.10, gap_target=0.5)
        fake.log.clear()
        code, wall2, _, _ = run_measured(tool(config))
        assert code == 0
        calls2 = api_calls_by_kind(fake)
        other = calls2["archive GET"] + calls2["POST"] + calls2["images"] + calls2["other"]
        rows.append(("rerun", "wall time", "%.2f s" % wall2, ""))
        rows.append(("rerun", "API calls (walk / other)", "%d / %d" % (calls2["walk"], other),
                     "no per-album calls: %s" % ok(other == 0)))
        code, wall3, _, _ = run_measured(tool(config, "--verify"))
        rows.append(("rerun", "--verify of the account", "%.2f s, exit %d" % (wall3, code),
                     "exit 0: %s" % ok(code == 0)))
        scenario_switch(rows, fake, info, config)


def scenario_switch(rows, fake, info, config):
    """The account's zips backup switched to the files layout: nothing downloaded, every zip
    unpacked from disk; then --verify of the files layout (every file by MD5, sidecars)."""
    sent = fake.download_bytes
    code, wall, rss, cpu = run_measured(tool(config, "--layout", "files"))
    got = fake.download_bytes - sent
    total = sum(size for _, size in info.values())
    rows.append(("switch", "zips -> files (exit %d)" % code, "%.2f s, %.0f MB/s unpacked, CPU %.2f s"
                 % (wall, total / MB / max(wall, 0.001), cpu), "exit 0: %s" % ok(code == 0)))
    rows.append(("switch", "peak RSS", "%.1f MB" % rss, "< 150 MB: %s" % ok(rss < 150)))
    rows.append(("switch", "bytes downloaded", "%d" % got, "0: %s" % ok(got == 0)))
    code, vwall, vrss, _ = run_measured(tool(config, "--verify"))
    rows.append(("switch", "--verify of the files layout", "%.2f s (%.0f MB/s), RSS %.1f MB, exit %d"
                 % (vwall, total / MB / max(vwall, 0.001), vrss, code), "exit 0: %s" % ok(code == 0)))


def scenario_slow_prep(rows, keep):
    """300 albums, preparation 10-40 s, 5-20 MB each, 60 MB/s, 30 ms latency."""
    with account(keep, "slowprep", 60 * MB, albums=300, seed=11, size=(5 * MB, 20 * MB),
                 prep=(10.0, 40.0)) as (fake, info, config):
        measure_run(rows, "slow-prep", fake, info, config, 1.20)


def scenario_slow_link(rows, keep):
    """The account scenario over a 5 MB/s link: prepared archives must not pile up."""
    with account(keep, "slowlink", 5 * MB) as (fake, info, config):
        wall, peak = measure_run(rows, "slow-link", fake, info, config, 10.0)
        total = sum(size for _, size in info.values())
        ratio = wall / (total / fake.bandwidth)
        rows.append(("slow-link", "wall / (bytes / cap)", "%.2f" % ratio, "<= 1.10: %s" % ok(ratio <= 1.10)))
        rows.append(("slow-link", "peak prepared vs 2 min of link", "%.0f MB / %.0f MB" % (
            peak / MB, 120 * fake.bandwidth / MB), "below: %s" % ok(peak <= 120 * fake.bandwidth)))


def scenario_big(rows, keep, mib):
    fake = fake_smugmug.FakeSmugMug().start()
    fake.require_download_oauth = False          # so that curl can fetch the same URL
    size = mib * 1024 * 1024
    count = max(1, mib // 16)
    key = fake.add_album("Big", images=[{"file_name": "IMG_%04d.JPG" % i, "size": size // count}
                                        for i in range(count)])
    fake.albums[key].prep_seconds = 0.2
    folder = tempfile.mkdtemp(prefix="bench-big-")
    config = write_config(folder, fake)
    code, wall, rss, cpu = run_measured(tool(config))
    assert code == 0, "big backup failed"
    path = os.path.join(folder, "backup", "Big", "%s.zip" % key)
    got = os.path.getsize(path)
    url = [o for o in fake.download_objects(key) if o["Status"] == "Complete"][-1]["WebUri"]
    curl = shutil.which("curl")
    gib = got / 2 ** 30
    rows.append(("big", "archive (%d images), check included" % count,
                 "%d MiB, %.1f s, %.0f MB/s" % (got / 2 ** 20, wall, got / MB / wall), ""))
    rows.append(("big", "tool peak RSS", "%.1f MB" % rss, "<= 80 MB: %s" % ok(rss <= 80)))
    rows.append(("big", "tool CPU per GiB", "%.2f s" % (cpu / gib), ""))
    if curl:
        code, cwall, crss, ccpu = run_measured([curl, "-s", "-o", os.path.join(folder, "curl.out"), url])
        assert code == 0
        rows.append(("big", "curl CPU per GiB", "%.2f s (%.1f s wall)" % (ccpu / gib, cwall), ""))
        ratio = cpu / max(ccpu, 1e-3)
        rows.append(("big", "tool / curl CPU", "%.2f" % ratio, "<= 2.5: %s" % ok(ratio <= 2.5)))
        os.remove(os.path.join(folder, "curl.out"))
    else:
        rows.append(("big", "curl", "not installed", ""))
    # --verify of the same archive against reading it (cat), both from the page cache
    code, vwall, vrss, vcpu = run_measured(tool(config, "--verify"))
    assert code == 0, "verify failed"
    cat_wall = run_measured(["sh", "-c", "cat '%s' > /dev/null" % path])[1]
    rows.append(("big", "--verify", "%.2f s (%.0f MB/s), RSS %.1f MB" % (vwall, got / MB / vwall, vrss), ""))
    rows.append(("big", "cat FILE > /dev/null", "%.2f s (%.0f MB/s)" % (cat_wall, got / MB / max(cat_wall, 1e-3)), ""))
    fake.stop()
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)


def scenario_walk(rows, keep):
    """--dry-run over 10,000 albums in 1,110 folders, 30 ms per API call."""
    fake = fake_smugmug.FakeSmugMug().start()
    fake.api_latency = 0.030
    tops = [fake.add_folder("T%d" % i) for i in range(10)]
    mids = [fake.add_folder("M%d" % j, t) for t in tops for j in range(10)]
    leaves = [fake.add_folder("L%d" % k, m) for m in mids for k in range(10)]
    for leaf in leaves:
        for a in range(10):
            fake.add_album("A%d" % a, leaf, sizes=(1000,))
    folder = tempfile.mkdtemp(prefix="bench-walk-")
    config = write_config(folder, fake)
    code, wall, rss, _ = run_measured(tool(config, "--dry-run"))
    assert code == 0
    calls = len(fake.log)
    rows.append(("walk", "10,000 albums / 1,110 folders", "%.2f s, %d API calls" % (wall, calls),
                 "< 10 s: %s" % ok(wall < 10)))
    rows.append(("walk", "peak RSS", "%.1f MB" % rss, "< 150 MB: %s" % ok(rss < 150)))
    fake.stop()
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)


# (label, albums, photos an album): each big account and the small one it is held against
HUGE = (("2,000 albums of 50 photos", 2000, 50, "500 albums of 50 photos", 500),
        ("10,000 albums of 5 photos", 10000, 5, "500 albums of 5 photos", 500))


def huge_runs(albums, photos, seed, keep):
    """((exit, wall, peak RSS MB, CPU s) of a first run, the same of an unchanged rerun) of a
    huge_account: tiny photos prepared at once, no added latency, the tool at its defaults."""
    fake = fake_smugmug.FakeSmugMug().start()
    folder = tempfile.mkdtemp(prefix="bench-huge-")
    try:
        fake_smugmug.huge_account(fake, albums, photos, folders=max(10, albums // 20), seed=seed)
        config = write_config(folder, fake)
        return run_measured(tool(config)), run_measured(tool(config))
    finally:
        fake.stop()
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def scenario_huge(rows, keep, seeds):
    """Peak RSS of a first run and an unchanged rerun of a 2,000-album, 100,000-photo account
    and of a 10,000-album one (5 photos each), each against a 500-album account with as many
    photos an album: the worst over the seeds (each seed another account), and the worst
    difference of one seed's pair. Memory must not grow with the account: <= 100 MB, and
    within 15 MB of the small account's."""
    for label, albums, photos, small_label, small in HUGE:
        worst = {}
        for seed in seeds:
            got = {}
            for name, count in ((label, albums), (small_label, small)):
                first, again = huge_runs(count, photos, seed, keep)
                assert first[0] == 0 and again[0] == 0, "%s: exit %d, %d" % (name, first[0], again[0])
                got[name] = (first, again)
                print("# huge, seed %d, %s: first %.1f s %.1f MB, rerun %.1f s %.1f MB" % (
                    seed, name, first[1], first[2], again[1], again[2]), file=sys.stderr, flush=True)
            for i, run in enumerate(("first run", "rerun")):
                big, little = got[label][i], got[small_label][i]
                for key, value in (((label, run), big), ((small_label, run), little)):
                    if key not in worst or value[2] > worst[key][2]:
                        worst[key] = value
                gap = big[2] - little[2]
                if (run, "gap") not in worst or gap > worst[(run, "gap")]:
                    worst[(run, "gap")] = gap
        for run in ("first run", "rerun"):
            big, little = worst[(label, run)], worst[(small_label, run)]
            rows.append(("huge", "%s: %s, peak RSS" % (label, run), "%.1f MB (%.1f s)" % (big[2], big[1]),
                         "<= 100 MB: %s" % ok(big[2] <= 100)))
            rows.append(("huge", "  %s: %s" % (small_label, run), "%.1f MB (%.1f s)" % (little[2], little[1]), ""))
            gap = worst[(run, "gap")]
            rows.append(("huge", "  the difference (worst of %d seeds)" % len(seeds), "%.1f MB" % gap,
                         "<= 15 MB: %s" % ok(gap <= 15)))


def ok(flag):
    return "met" if flag else "MISSED"


# Scenarios that report rather than assert: the tool may fail them ###########################

def backup_run(fake, config, folder, timeout=900, dry_run_first=True):
    """One backup run, never asserting: {code, wall, walk (dry-run seconds, or 0), calls (by kind,
    over the real run), per_album (walk excluded), failed, not_attempted, last (its last line
    of stderr)}."""
    walk = 0.0
    env = dict(os.environ, BENCH_TIMEOUT=str(timeout))
    if dry_run_first:
        _, walk, _, _ = run_measured(tool(config, "--dry-run"), env=env)
    with fake.lock:
        fake.log.clear()
    err_path = os.path.join(folder, "stderr-%d.txt" % len(os.listdir(folder)))
    with open(err_path, "w") as err:
        code, wall, _, _ = run_measured(tool(config), stderr=err, env=env)
    with open(err_path) as f:
        lines = f.read().splitlines()
    summary = [m for m in (re.match(r"(Done|Stopped|Interrupted) after .*, (\d+) failed, (\d+) not attempted",
                                     line) for line in lines) if m]
    calls = api_calls_by_kind(fake)
    n = max(1, len([a for a in fake.albums.values() if a.images]))
    return {"code": code, "wall": wall, "walk": walk, "calls": calls,
            "per_album": sum(v for k, v in calls.items() if k != "walk") / n,
            "per_album_walk": sum(calls.values()) / n,
            "failed": int(summary[-1].group(2)) if summary else 0,
            "not_attempted": int(summary[-1].group(3)) if summary else 0,
            "last": lines[-1][:90] if lines else ""}


def long_tail(rng):
    """Preparation 5-60 s: nine albums in ten fast (5-12 s), one in ten slow (30-60 s)."""
    return rng.uniform(30.0, 60.0) if rng.random() < 0.1 else rng.uniform(5.0, 12.0)


def scenario_prep_spread(rows, keep):
    """Five accounts of 80 albums (seeds 21-25) with preparation uniform over 8-20 s, and one
    (seed 26) with a long tail (5-60 s); 60 MB/s, 30 ms per API call, 5-20 MB per album, in 8
    folders of 4 (two levels). One row per account, then the worst account for each measure.
    API calls per album: everything (walk, requests, looks, listings) over the 80 albums."""
    shape = {"albums": 80, "size": (5 * MB, 20 * MB), "levels": (4, 2)}
    accounts = [(seed, "prep 8-20 s", dict(shape, prep=(8.0, 20.0))) for seed in range(21, 26)]
    accounts.append((26, "prep 5-60 s, long tail", dict(shape, prep_of=long_tail)))
    several_accounts(rows, keep, "prep-spread", accounts, 1.15, calls_target=4.0)


def several_accounts(rows, keep, name, accounts, wall_target, calls_target=None, gap_target=None):
    """One fresh run on each account (seed, label, build arguments), then the worst for each
    measure: wall / bound, API calls per album (walk, requests, looks, listings: everything over
    the albums), and the seconds from the first ready archive to the first download."""
    results = []
    for seed, label, build in accounts:
        with account(keep, "%s%d" % (name, seed), 60 * MB, seed=seed, **build) as (fake, info, config):
            got = backup_run(fake, config, os.path.dirname(config))
            gap = start_gap(fake)
            ratio = got["wall"] / bound_of(info, fake.bandwidth, got["walk"])
            total = sum(size for _, size in info.values())
            results.append((seed, ratio, got["per_album_walk"], gap if gap is not None else float("inf"), got["code"]))
            looks = got["calls"]["archive GET"] / len(info)
            rows.append((name, "seed %d: %s, %.0f MB" % (seed, label, total / MB),
                         "wall/bound %.2f (%.1f s); %.2f calls/album (looks %.2f); first download %s after "
                         "the first ready archive; exit %d" % (
                             ratio, got["wall"], got["per_album_walk"], looks,
                             "%.2f s" % gap if gap is not None else "never", got["code"]),
                         "" if got["code"] == 0 else "exit 0: MISSED"))
    worst = [max(results, key=lambda r: r[i]) for i in (1, 2, 3)]
    failed = [r[0] for r in results if r[4] != 0]
    targets = ["<= %.2f: %s" % (wall_target, ok(worst[0][1] <= wall_target))]
    if calls_target:
        targets.append("<= %.1f: %s" % (calls_target, ok(worst[1][2] <= calls_target)))
    if gap_target:
        targets.append("<= %.1f s: %s" % (gap_target, ok(worst[2][3] <= gap_target)))
    rows.append((name, "WORST of %d accounts" % len(results),
                 "wall/bound %.2f (seed %d); %.2f calls/album (seed %d); first download %.2f s after the first "
                 "ready (seed %d)%s" % (worst[0][1], worst[0][0], worst[1][2], worst[1][0], worst[2][3], worst[2][0],
                                        "; failed runs: seeds %s" % failed if failed else ""),
                 "; ".join(targets) + ("; exit 0: MISSED" if failed else "")))


def scenario_account_shape(rows, keep):
    """Five accounts of the account scenario's shape (120 albums, 2-6 MB, preparation 1-3 s,
    60 MB/s): its own seed and four others; about 1.5 minutes."""
    accounts = [(seed, "prep 1-3 s", {}) for seed in (7, 41, 42, 43, 44)]
    several_accounts(rows, keep, "acct-shape", accounts, 1.10, gap_target=0.5)


def scenario_prep_bound(rows, keep):
    """Five accounts where preparation sets the pace: 80 albums of 1-4 MB (about 200 MB, 3 s of
    the link), preparation 8-20 s, 60 MB/s, in 8 folders; about 2.5 minutes."""
    accounts = [(seed, "prep 8-20 s", {"albums": 80, "size": (1 * MB, 4 * MB), "prep": (8.0, 20.0),
                                       "levels": (4, 2)}) for seed in range(51, 56)]
    several_accounts(rows, keep, "prep-bound", accounts, 1.15, calls_target=4.3)


def scenario_outage(rows, keep):
    """40 albums of the account scenario's shape: undisturbed, then with a 75 s outage (both
    ports refusing) once a third of the bytes are sent, then with a 20 s outage at the start.
    Extra time = wall - undisturbed wall - outage length."""
    build = dict(albums=40, seed=7)
    with account(keep, "outage0", 60 * MB, **build) as (fake, info, config):
        base = backup_run(fake, config, os.path.dirname(config), dry_run_first=False)
    total = sum(size for _, size in info.values())
    rows.append(("outage", "undisturbed: %d albums, %.0f MB" % (len(info), total / MB),
                 "wall %.1f s, exit %d, %d failed" % (base["wall"], base["code"], base["failed"]),
                 "exit 0: %s" % ok(base["code"] == 0)))
    for label, seconds, at_start in (("75 s outage (refuse) after 1/3 of the bytes", 75.0, False),
                                     ("20 s outage (refuse) at the start", 20.0, True)):
        with account(keep, "outage%d" % seconds, 60 * MB, **build) as (fake, info, config):
            if at_start:
                fake.outage(seconds)
            else:
                fake.outage_at, fake.outage_seconds, fake.outage_mode = {"download_bytes": total // 3}, seconds, "refuse"
            got = backup_run(fake, config, os.path.dirname(config), timeout=600, dry_run_first=False)
            played = list(fake.outage_log)
        extra = got["wall"] - base["wall"] - seconds
        rows.append(("outage", label,
                     "exit %d, %d failed, %d not attempted, wall %.1f s, extra %.1f s%s" % (
                         got["code"], got["failed"], got["not_attempted"], got["wall"], extra,
                         "" if played else " (the outage never started)"),
                     "<= 15 s and exit 0: %s" % ok(extra <= 15 and got["code"] == 0 and bool(played))))
        if got["code"] != 0:
            rows.append(("outage", "  its last line", got["last"], ""))


QUOTA = (60, 10)       # API calls per window, window seconds: the run needs about 8 windows' calls


def scenario_quota(rows, keep):
    """120 albums against a quota of QUOTA (60 API calls per 10 s window): it runs out mid-run.
    Counts the API calls that arrived inside a closed window (later than 0.25 s after its
    first 429)."""
    with account(keep, "quota", 60 * MB) as (fake, info, config):
        fake.quota = QUOTA
        got = backup_run(fake, config, os.path.dirname(config), timeout=900, dry_run_first=False)
        inside = fake.quota_violations(0.25)
        rows.append(("quota", "%d albums, quota %d calls / %d s" % ((len(info),) + QUOTA),
                     "exit %d, wall %.1f s, %d windows ran out, %d calls refused (429), %.2f calls/album" % (
                         got["code"], got["wall"], len(fake.quota_windows), len(fake.quota_refused),
                         got["per_album"]),
                     "exit 0: %s" % ok(got["code"] == 0)))
        rows.append(("quota", "API calls inside a closed window", "%d" % len(inside), "0: %s" % ok(not inside)))


def scenario_recheck(rows, keep):
    """2,000 albums of one small photo in 100 folders: a first backup, a rerun the same day, and
    a rerun as the next night (every album's last listing moved a day back in the state): the
    per-album calls of each rerun (the rolling recheck lists about 1/30 of the albums a night)."""
    fake = fake_smugmug.FakeSmugMug().start()
    fake.prep_seconds = 0.01
    folders = [fake.add_folder("Year %d" % i) for i in range(100)]
    for i in range(2000):
        fake.add_album("Album %04d" % i, folders[i % 100], sizes=(500,))
    folder = tempfile.mkdtemp(prefix="bench-recheck-")
    config = write_config(folder, fake)
    code, wall, _, _ = run_measured(tool(config, "--workers", "16", "--max-preparing", "500"))
    rows.append(("recheck", "first backup of 2,000 albums", "%.1f s, exit %d" % (wall, code), ""))
    for label, days in (("rerun the same day", 0), ("rerun the next night", 1)):
        if days:
            path = os.path.join(folder, "backup", ".smugmug_download", "state.json")
            with open(path) as f:
                state = json.load(f)
            for record in state["albums"].values():
                moment = datetime.datetime.fromisoformat(record["Listed"]) - datetime.timedelta(days=days)
                record["Listed"] = moment.isoformat()
            with open(path, "w") as f:
                json.dump(state, f)
        fake.log.clear()
        code, wall, _, _ = run_measured(tool(config))
        calls = api_calls_by_kind(fake)
        per_album = calls["archive GET"] + calls["POST"] + calls["images"] + calls["other"]
        rows.append(("recheck", label, "%.1f s, exit %d; %d walk calls, %d per-album calls (%d listings, %d POST)"
                     % (wall, code, calls["walk"], per_album, calls["images"], calls["POST"]),
                     "about 2000/30 = 67 on the night, 0 the same day"))
    fake.stop()
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)


def folder_bytes(top):
    total = 0
    for root, _dirs, names in os.walk(top):
        total += sum(os.path.getsize(os.path.join(root, n)) for n in names)
    return total


def album_holds(folder, fake, key):
    """The images SmugMug lists for the album that its folder does not hold (as a file of its
    own or inside a zip part), by their bytes' MD5: [] when it holds them all."""
    import hashlib
    import zipfile
    held = set()
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.endswith(".zip"):
            with zipfile.ZipFile(path) as z:
                held.update(hashlib.md5(z.read(i)).hexdigest() for i in z.infolist())
        elif not name.endswith(".part"):
            with open(path, "rb") as f:
                held.add(hashlib.md5(f.read()).hexdigest())
    return [im.file_name for im in fake.albums[key].images if im.content().md5() not in held]


@contextlib.contextmanager
def yearly_album(seed, others=0):
    """(rng, fake, key, config, out): an emulator with one album of 60 photos of 150-250 KB
    ("Family 2026") and `others` albums of 5 photos, and a config for a backup of it."""
    rng = random.Random(seed)
    fake = fake_smugmug.FakeSmugMug().start()
    fake.prep_seconds = 0.2
    folder = tempfile.mkdtemp(prefix="bench-growing-")
    try:
        key = fake.add_album("Family 2026", images=[{"file_name": "IMG_%04d.JPG" % i,
                                                    "size": rng.randint(150_000, 250_000)} for i in range(60)])
        for i in range(others):
            fake.add_album("Other %d" % i, images=images_of(rng, rng.randint(500_000, 1_500_000), 5))
        yield rng, fake, key, write_config(folder, fake), os.path.join(folder, "backup")
    finally:
        fake.stop()
        shutil.rmtree(folder, ignore_errors=True)


def growing_account(seed):
    """The growing scenario of one seed: [(night, downloaded share of the album, versions growth
    in bytes, album bytes, listed photos missing from its folder, --verify exit code)]."""
    with yearly_album(seed, others=3) as (rng, fake, key, config, out):
        versions = os.path.join(out, ".smugmug_download", "versions")
        nights, number = [], len(fake.albums[key].images)
        for night in range(7):
            if 1 <= night <= 5:                 # two new photos; the others keep their bytes
                for _ in range(2):
                    fake.add_image(key, file_name="IMG_%04d.JPG" % number, size=rng.randint(150_000, 250_000))
                    number += 1
            elif night == 6:                    # one photo replaced, one caption edited
                images = fake.albums[key].images
                fake.replace_image(images[rng.randrange(len(images))].key)
                fake.edit_image(images[rng.randrange(len(images))].key, caption="edited on night 6")
            sent, kept = fake.download_bytes, folder_bytes(versions)
            code, _, _, _ = run_measured(tool(config))
            size = sum(im.size for im in fake.albums[key].images)
            missing = album_holds(os.path.join(out, "Family 2026"), fake, key)
            verify, _, _, _ = run_measured(tool(config, "--verify"))
            nights.append((night, code, (fake.download_bytes - sent) / size, folder_bytes(versions) - kept, size,
                           missing, verify))
        return nights


def growing_month(seed, nights=30):
    """Thirty nights of a yearly album as people keep it: two photos added every night, and every
    seventh night one photo deleted, one replaced and one caption edited. (downloaded bytes,
    versions growth, album bytes at the end, the largest share of the album one night
    downloaded, nights with a photo missing or --verify failing)."""
    with yearly_album(seed) as (rng, fake, key, config, out):
        versions = os.path.join(out, ".smugmug_download", "versions")
        number, worst_share, bad = 60, 0.0, 0
        assert run_measured(tool(config))[0] == 0
        start_sent, start_kept = fake.download_bytes, folder_bytes(versions)
        for night in range(1, nights + 1):
            for _ in range(2):
                fake.add_image(key, file_name="IMG_%04d.JPG" % number, size=rng.randint(150_000, 250_000))
                number += 1
            images = fake.albums[key].images
            if night % 7 == 0:
                with fake.lock:
                    images.pop(rng.randrange(len(images)))
                fake.replace_image(images[rng.randrange(len(images))].key)
                fake.edit_image(images[rng.randrange(len(images))].key, caption="edited on night %d" % night)
            sent = fake.download_bytes
            code, _, _, _ = run_measured(tool(config))
            size = sum(im.size for im in fake.albums[key].images)
            worst_share = max(worst_share, (fake.download_bytes - sent) / size)
            missing = album_holds(os.path.join(out, "Family 2026"), fake, key)
            verify, _, _, _ = run_measured(tool(config, "--verify"))
            bad += bool(code or missing or verify)
        return (fake.download_bytes - start_sent, folder_bytes(versions) - start_kept, size, worst_share, bad)


def scenario_growing_month(rows, keep, seeds=(1, 2, 3)):
    """growing-month: thirty nights of a growing album (growing_month), the worst over the seeds:
    the versions it adds against its own size (issue: at most about its size over any 30 nights)."""
    for seed in seeds:
        sent, grown, size, share, bad = growing_month(seed)
        print("# growing-month seed %d: downloaded %.1f MB, versions +%.2f MB, album %.1f MB, worst night %.1f %%, "
              "bad nights %d" % (seed, sent / MB, grown / MB, size / MB, 100 * share, bad), file=sys.stderr, flush=True)
        rows.append(("growing-month", "seed %d: 30 nights" % seed,
                     "downloaded %.1f MB in all (worst night %.1f %% of the album); versions +%.2f MB for an album "
                     "of %.1f MB; %d nights with a photo missing or --verify failing" % (
                         sent / MB, 100 * share, grown / MB, size / MB, bad),
                     "versions <= the album: %s" % ok(grown <= size and bad == 0)))


def scenario_growing(rows, keep, seeds=(1, 2, 3, 4, 5)):
    """One album of 60 photos (about 12 MB) and three others; five nights that each add two
    photos, one that replaces one photo and edits one caption: per night, the bytes downloaded
    as a share of the album (night 0: the whole account's first backup) and how much versions
    grew; after each, every listed photo in the album's folder and --verify passing. The worst
    over the seeds."""
    worst = {}
    for seed in seeds:
        for night, code, share, grown, size, missing, verify in growing_account(seed):
            label = ("night 0: first backup (of the whole account)" if night == 0 else "night %d: two photos added" % night
                     if night <= 5 else "night 6: one photo replaced, one caption")
            print("# growing seed %d %s: exit %d, downloaded %.1f %% of the album (%d B), versions +%d B, "
                  "missing %d, verify %d" % (seed, label, code, 100 * share, size, grown, len(missing), verify),
                  file=sys.stderr, flush=True)
            w = worst.setdefault(night, [label, 0, 0.0, 0, size, 0, 0])
            w[1], w[2], w[3] = max(w[1], code), max(w[2], share), max(w[3], grown)
            w[5], w[6] = max(w[5], len(missing)), max(w[6], verify)
    five = sum(worst[n][3] for n in range(1, 6))
    for night, (label, code, share, grown, size, missing, verify) in sorted(worst.items()):
        target = "" if night == 0 else "share <= 25 %%: %s" % ok(share <= 0.25) if night <= 5 else ""
        rows.append(("growing", label, "exit %d, %.1f %% of the album, versions +%s, %d photos missing, verify %d"
                     % (code, 100 * share, "%.2f MB" % (grown / MB), missing, verify),
                     target + ("; all held, verify passes: %s" % ok(missing == 0 and verify == 0 and code == 0))))
    album = worst[5][4]
    rows.append(("growing", "versions over nights 1-5 (worst of %d seeds)" % len(seeds),
                 "%.2f MB for an album of %.1f MB" % (five / MB, album / MB), "<= the album: %s" % ok(five <= album)))


SCENARIOS = {"account": scenario_account, "slow-prep": scenario_slow_prep, "slow-link": scenario_slow_link,
             "walk": scenario_walk, "prep-spread": scenario_prep_spread, "outage": scenario_outage,
             "account-shape": scenario_account_shape, "prep-bound": scenario_prep_bound,
             "quota": scenario_quota, "recheck": scenario_recheck, "growing": scenario_growing,
             "growing-month": scenario_growing_month}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="account,slow-prep,slow-link,big,walk",
                        help="comma-separated: account (with rerun and verify), slow-prep, slow-link, big, walk; "
                             "not by default: account-shape, prep-bound, prep-spread, outage, quota, recheck, growing, "
                             "huge")
    parser.add_argument("--big-mib", type=int, default=1024, help="size of the big archive")
    parser.add_argument("--huge-seeds", default="1,2,3", help="the accounts of the huge scenario, by seed")
    parser.add_argument("--keep", action="store_true", help="keep the temporary backups")
    args = parser.parse_args(argv)
    rows = []
    for name in args.scenarios.split(","):
        started = time.monotonic()
        if name == "big":
            scenario_big(rows, args.keep, args.big_mib)
        elif name == "huge":
            scenario_huge(rows, args.keep, [int(x) for x in args.huge_seeds.split(",")])
        elif name in SCENARIOS:
            SCENARIOS[name](rows, args.keep)
        else:
            parser.error("unknown scenario %s" % name)
        print("# %s done in %.0f s" % (name, time.monotonic() - started), file=sys.stderr, flush=True)
    print("machine: %d cores, Python %s, %s" % (os.cpu_count(), sys.version.split()[0], time.strftime("%Y-%m-%d")))
    width = max(len(r[1]) for r in rows)
    for scenario, what, value, target in rows:
        print("%-9s %-*s  %-58s %s" % (scenario, width, what, value, target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
