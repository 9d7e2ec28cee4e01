#!/usr/bin/env python3
"""Speed, API economy and footprint of smugmug_download against the emulator.

    python tests/benchmark.py [--scenarios account,rerun,big,walk] [--big-mib 1024]

Not collected by pytest. Starts tests/fake_smugmug.py with realistic knobs,
runs the real script as a subprocess (so its peak RSS and CPU time are its
own, from wait4), and prints a table with the targets of issue #6.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import fake_smugmug  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(HERE), "smugmug_download.py")
MB = 1_000_000
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"


def run_measured(argv, **kw):
    """(exit code, wall seconds, peak RSS MB, CPU seconds) of a child process."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=kw.pop("stderr", subprocess.DEVNULL), **kw)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, wall, usage.ru_maxrss / 1024.0, usage.ru_utime + usage.ru_stime


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


def build_account(fake, albums=120, seed=7):
    """~120 albums in 3 folder levels, archives of 2-6 MB, preparation 1-3 s each."""
    rng = random.Random(seed)
    info = {}
    tops = [fake.add_folder("Top %d" % i) for i in range(4)]
    mids = [fake.add_folder("Mid %d" % j, top) for top in tops for j in range(3)]
    leaves = [fake.add_folder("Leaf %d" % k, mid) for mid in mids for k in range(2)]
    for i in range(albums):
        size = rng.randint(2 * MB, 6 * MB)
        key = fake.add_album("Album %03d" % i, leaves[i % len(leaves)], sizes=(size,))
        fake.albums[key].prep_seconds = rng.uniform(1.0, 3.0)
        info[key] = (fake.albums[key].prep_seconds, size)
    return info


def api_calls_by_kind(fake):
    """walk / archive GET / POST / poll counts: a !download GET before the album's POST is the
    archive check, every later one a poll."""
    counts = {"walk": 0, "archive GET": 0, "POST": 0, "poll": 0}
    posted = set()
    for e in fake.log:
        if e["path"].startswith("/download/"):
            continue
        if e["kind"] == "post":
            counts["POST"] += 1
            posted.add(e["path"])
        elif e["kind"] == "download-get":
            counts["poll" if e["path"] in posted else "archive GET"] += 1
        else:
            counts["walk"] += 1
    return counts


def scenario_account(rows, keep):
    fake = fake_smugmug.FakeSmugMug().start()
    fake.api_latency = 0.030
    fake.bandwidth = 60 * MB
    info = build_account(fake)
    folder = tempfile.mkdtemp(prefix="bench-account-")
    config = write_config(folder, fake)
    # walk time: a dry run of the same account (API latency included)
    code, walk, _, _ = run_measured(tool(config, "--dry-run"))
    assert code == 0
    fake.log.clear()
    code, wall, rss, cpu = run_measured(tool(config))
    assert code == 0, "backup failed"
    total = sum(size for _, size in info.values())
    cap = fake.bandwidth
    bound = walk + max(min(p for p, _ in info.values()) + total / cap,
                       max(p + size / cap for p, size in info.values()))
    calls = api_calls_by_kind(fake)
    n = len(info)
    per_album = {k: v / n for k, v in calls.items()}
    besides = (calls["archive GET"] + calls["POST"] + calls["poll"]) / n
    rows.append(("account", "albums / bytes", "%d / %.0f MB" % (n, total / MB), ""))
    rows.append(("account", "walk time (dry run)", "%.2f s" % walk, ""))
    rows.append(("account", "wall time", "%.2f s" % wall, ""))
    rows.append(("account", "lower bound", "%.2f s" % bound, ""))
    rows.append(("account", "wall / bound", "%.2f" % (wall / bound), "<= 1.25: %s" % ok(wall / bound <= 1.25)))
    rows.append(("account", "API calls per album",
                 ", ".join("%s %.2f" % kv for kv in per_album.items()), ""))
    rows.append(("account", "per-album calls besides download", "%.2f" % besides, "<= 5: %s" % ok(besides <= 5)))
    # rerun: unchanged
    fake.log.clear()
    code, wall2, _, _ = run_measured(tool(config))
    assert code == 0
    calls2 = api_calls_by_kind(fake)
    rows.append(("rerun", "wall time", "%.2f s" % wall2, ""))
    rows.append(("rerun", "API calls (walk / other)", "%d / %d" % (
        calls2["walk"], calls2["archive GET"] + calls2["POST"] + calls2["poll"]),
        "no per-album calls: %s" % ok(calls2["archive GET"] + calls2["POST"] + calls2["poll"] == 0)))
    # the same account from scratch with a larger preparation window
    shutil.rmtree(os.path.join(folder, "backup"), ignore_errors=True)
    fake.archives.clear()
    fake.log.clear()
    code, wall3, _, _ = run_measured(tool(config, "--max-preparing", "64"))
    assert code == 0
    rows.append(("account", "wall / bound, --max-preparing 64", "%.2f (%.2f s)" % (wall3 / bound, wall3),
                 "<= 1.25: %s" % ok(wall3 / bound <= 1.25)))
    fake.stop()
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)


def scenario_big(rows, keep, mib):
    fake = fake_smugmug.FakeSmugMug().start()
    fake.require_download_oauth = False          # so that curl can fetch the same URL
    size = mib * 1024 * 1024
    key = fake.add_album("Big", sizes=(size,))
    fake.albums[key].prep_seconds = 0.2
    folder = tempfile.mkdtemp(prefix="bench-big-")
    config = write_config(folder, fake)
    code, wall, rss, cpu = run_measured(tool(config))
    assert code == 0, "big backup failed"
    got = os.path.getsize(os.path.join(folder, "backup", "Big", "%s.zip" % key))
    assert got == size
    url = fake.download_objects(key)[-1]["WebUri"]
    curl = shutil.which("curl")
    gib = size / 2 ** 30
    rows.append(("big", "archive", "%d MiB, %.1f s, %.0f MB/s" % (mib, wall, size / MB / wall), ""))
    rows.append(("big", "tool peak RSS", "%.1f MB" % rss, "<= 80 MB: %s" % ok(rss <= 80)))
    rows.append(("big", "tool CPU per GiB", "%.2f s" % (cpu / gib), ""))
    if curl:
        code, cwall, crss, ccpu = run_measured([curl, "-s", "-o", os.path.join(folder, "curl.out"), url])
        assert code == 0
        rows.append(("big", "curl CPU per GiB", "%.2f s (%.1f s wall)" % (ccpu / gib, cwall), ""))
        ratio = cpu / max(ccpu, 1e-3)
        rows.append(("big", "tool / curl CPU", "%.2f" % ratio, "<= 2.5: %s" % ok(ratio <= 2.5)))
    else:
        rows.append(("big", "curl", "not installed", ""))
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


def ok(flag):
    return "met" if flag else "MISSED"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="account,big,walk",
                        help="comma-separated: account (includes rerun), big, walk")
    parser.add_argument("--big-mib", type=int, default=1024, help="size of the big archive")
    parser.add_argument("--keep", action="store_true", help="keep the temporary backups")
    args = parser.parse_args(argv)
    rows = []
    chosen = args.scenarios.split(",")
    if "account" in chosen or "rerun" in chosen:
        scenario_account(rows, args.keep)
    if "big" in chosen:
        scenario_big(rows, args.keep, args.big_mib)
    if "walk" in chosen:
        scenario_walk(rows, args.keep)
    print("machine: %d cores, Python %s" % (os.cpu_count(), sys.version.split()[0]))
    width = max(len(r[1]) for r in rows)
    for scenario, what, value, target in rows:
        print("%-8s %-*s  %-40s %s" % (scenario, width, what, value, target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
