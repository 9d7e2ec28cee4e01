"""Through a real night (issue #18): a passing outage, a rate quota or a sleep costs only its
length, and the run says what it waits for. Short outages here; the long ones (75 s mid-run,
20 s at the start) and the timings are in tests/benchmark.py (scenario outage)."""

import re
import threading
import time

import pytest

import smugmug_download as sd
from conftest import expected_tree, tree


@pytest.fixture
def quick_probes(monkeypatch):
    """Probes of the link every 0.2 s at most (the product: 1 s doubling to 10 s)."""
    monkeypatch.setattr(sd, "LINK_PROBE_FIRST", 0.1)
    monkeypatch.setattr(sd, "LINK_PROBE_MAX", 0.2)


def albums_of(fake, count=8, size=60_000):
    return {fake.add_album("Album %d" % i, sizes=(size, size // 2)): "Album %d" % i for i in range(count)}


@pytest.mark.parametrize("mode", ["refuse", "reset"])
def test_an_outage_mid_run_costs_no_album(fake, run, tmp_path, quick_probes, monkeypatch, mode):
    """The link goes away in the middle of the downloads (connections refused, or reset, on both
    ports; downloads in flight cut) for longer than five tries with backoff take: every album is
    complete, none failed, exit 0, and the log names the wait and its end; the summary says how
    long the run waited. (Resuming with Range: tests/test_incremental.py; timings: the benchmark.)"""
    monkeypatch.setattr(sd, "BACKOFF_BASE", 0.001)     # tries counted would be spent at once
    paths = albums_of(fake)
    fake.bandwidth = 600_000
    fake.outage_at = {"download_bytes": 250_000}
    fake.outage_seconds, fake.outage_mode = 2.5, mode
    log = tmp_path / "log.txt"
    code, _, err = run("--log-file", str(log))
    assert code == 0, err
    assert fake.outage_log, "the outage was played"
    assert tree(run.out) == expected_tree(fake, paths)
    assert "failed:" not in err and ", 0 failed, 0 not attempted." in err
    text = log.read_text()
    assert re.search(r"SmugMug unreachable since \d\d:\d\d, giving up at \d\d:\d\d \(connection (refused|reset|closed)[^)]*\)", text)
    assert "SmugMug answers again after" in text
    assert re.search(r"Waited \d+ s in all: SmugMug unreachable \d+ s\.", err), err


def test_an_outage_at_the_start_is_waited_for(fake, run, quick_probes):
    """A run started while SmugMug cannot be reached waits for it (it does not exit) and then
    backs up everything, exit 0."""
    paths = albums_of(fake, count=3, size=5000)
    fake.outage(1.5)
    started = time.monotonic()
    code, _, err = run()
    assert code == 0, err
    assert time.monotonic() - started >= 1.4
    assert tree(run.out) == expected_tree(fake, paths)
    assert "SmugMug unreachable since" in err


@pytest.mark.parametrize("quiet", [False, True])
def test_an_outage_past_unreachable_minutes_stops_the_run_keeping_everything(fake, run, quick_probes, quiet):
    """After unreachable_minutes without SmugMug the run stops like a write error: exit 1, one
    stopped summary, .part files kept, and the next run completes the backup, resuming them. The
    cause is named twice: when the wait begins (with the time the run gives up) and in the
    summary, never a third time in an error line between them; with --quiet the summary is the
    one line."""
    paths = albums_of(fake, count=4)
    fake.bandwidth = 300_000
    fake.outage_at = {"download_bytes": 100_000}
    fake.outage_seconds = 4.0
    code, _, err = run(*(["--quiet"] if quiet else []), unreachable_minutes=0.02)
    assert code == sd.EXIT_ALBUMS_FAILED, err
    stopped = re.search(r"^Stopped after \d+ s: \d+ albums? backed up, 0 unchanged, 0 failed, \d+ not attempted "
                        r"\(SmugMug unreachable since \d\d:\d\d:\d\d: ([^)]+)\)\.$", err, re.MULTILINE)
    assert stopped, err
    assert sum(stopped.group(1) in line for line in err.splitlines()) == (1 if quiet else 2), err
    assert len(err.splitlines()) == 1 or not quiet, err
    assert any(name.endswith(".part") for name in tree(run.out))
    while fake.in_outage():
        time.sleep(0.05)
    fake.bandwidth = None
    code, _, err = run()
    assert code == 0, err
    assert {k: v for k, v in tree(run.out).items() if not k.endswith(".part")} == expected_tree(fake, paths)


def test_a_server_failing_the_first_calls_stops_the_run_it_is_no_config_error(fake, run, monkeypatch):
    """SmugMug answers, but with errors (5xx) to every call, from the first: after the tries the
    run stops with exit 1 and the one stopped summary naming why, not exit 2; nothing is lost."""
    monkeypatch.setattr(sd, "BACKOFF_BASE", 0.001)
    albums_of(fake, count=2, size=3000)
    fake.fail_every = 1
    code, _, err = run()
    assert code == sd.EXIT_ALBUMS_FAILED, err
    assert re.search(r"^Stopped after \d+ s, before reaching the account: nothing was backed up "
                     r"\(could not reach the account: .+\)\.$", err, re.MULTILINE), err
    assert err.count("could not reach the account") == 1 and "not attempted" not in err, err
    assert "Traceback" not in err


def test_a_quota_that_runs_out_is_waited_for_with_no_call_inside_the_closed_window(fake, run, tmp_path):
    """SmugMug allows 10 calls per 3 s window and says so honestly in X-RateLimit-*: the run
    spreads its last calls, waits for the window to reset, sends no call inside a closed
    window, names the wait, and ends with every album complete."""
    paths = albums_of(fake, count=4, size=3000)
    fake.quota = (10, 3.0)
    log = tmp_path / "log.txt"
    code, _, err = run("--log-file", str(log))
    assert code == 0, err
    assert tree(run.out) == expected_tree(fake, paths)
    assert fake.quota_violations() == []
    assert len([e for e in fake.log if e["kind"] not in ("archive", "file")]) > 10   # it took a new window


def test_a_rate_limit_pause_is_named(fake, run, tmp_path):
    """A 429 with Retry-After closes the gate for every call: the log (and the status line) say
    "SmugMug rate limit: resuming at HH:MM:SS", and the summary how long the run waited for it."""
    paths = albums_of(fake, count=3, size=3000)
    fake.throttle_calls, fake.retry_after = {4}, 2
    log = tmp_path / "log.txt"
    code, _, err = run("--log-file", str(log))
    assert code == 0, err
    assert tree(run.out) == expected_tree(fake, paths)
    assert re.search(r"SmugMug rate limit: resuming at \d\d:\d\d:\d\d", log.read_text())
    assert re.search(r"Waited \d+ s in all: SmugMug's rate limit \d+ s\.", err), err


def test_expired_archive_links_are_looked_up_again_after_a_sleep(fake, run):
    """The machine sleeps mid-run: the archive links handed out before expire (403). The same
    archive is looked up again for fresh links, the downloads go on where they were, no new
    archive is asked for, no album fails."""
    paths = albums_of(fake, count=4)
    fake.link_lifetime = 3600
    fake.bandwidth = 400_000
    slept = threading.Event()

    def sleep_once():
        while not fake.calls("archive"):
            time.sleep(0.01)
        fake.expire_links()
        fake.cut_connections()         # waking up: the downloads in flight lost their connections
        slept.set()
    threading.Thread(target=sleep_once, daemon=True).start()
    code, _, err = run()
    assert code == 0, err
    assert slept.is_set()
    assert tree(run.out) == expected_tree(fake, paths)
    assert len(fake.calls("post")) == len(paths)                  # the same archives
    assert any(e["status"] == 403 for e in fake.calls("archive"))  # the expired links were refused


def test_an_expired_link_answering_a_login_page_is_looked_up_again(fake, run):
    """A link that expired may answer 200 with an HTML login page: the same archive is looked up
    again for a fresh link, without asking SmugMug for a new archive."""
    paths = albums_of(fake, count=2, size=4000)
    fake.link_lifetime = 3600
    fake.expired_link_login_page = True
    real = fake.download_objects
    once = []

    def stale_first(key):       # the first listing hands out links that have already expired
        objects = real(key)
        if not once:
            once.append(True)
            fake.expire_links()
        return objects
    fake.download_objects = stale_first
    code, _, err = run()
    assert code == 0, err
    assert tree(run.out) == expected_tree(fake, paths)
    assert len(fake.calls("post")) == len(paths)


# Pure pieces ################################################################

def test_a_failure_counts_a_try_only_while_the_link_works():
    """Link: a failure followed by a probe that answers counts (the trouble was that request's);
    one in an outage whose probe failed too does not; wait_up() returns once an answer comes and
    raises Unreachable after give_up seconds."""
    answers = []
    link = sd.Link(lambda: answers.pop(0), threading.Event(), give_up=5)
    answers.append(True)
    assert link.wait_after("connection reset") is True                  # the link works: a try
    answers.extend([False, True])
    started = time.monotonic()
    assert link.wait_after("connection refused") is False               # a probe failed: an outage
    assert 0.9 <= time.monotonic() - started < 2.0                      # the second probe 1 s later
    assert link.up and link.down_seconds >= 0.9
    answers.extend([False] * 10)
    link.give_up = 0.5
    with pytest.raises(sd.Unreachable) as info:
        link.wait_after("connection refused by 127.0.0.1:9")
    assert str(info.value).endswith(": connection refused by 127.0.0.1:9")
    with pytest.raises(sd.Unreachable):
        link.wait_up()                                                  # every later call too


@pytest.mark.parametrize("reset", ["epoch", "seconds"])
def test_a_quota_at_zero_closes_the_gate_until_its_reset(reset):
    """RateGate: X-RateLimit-Remaining 0 closes the gate until X-RateLimit-Reset, read as epoch
    seconds (as SmugMug sends it) or, for a value no epoch has, as seconds from now."""
    gate = sd.RateGate(threading.Event())
    when = 1.5 + (time.time() if reset == "epoch" else 0.0)
    gate.observe({"X-RateLimit-Remaining": "0", "X-RateLimit-Limit": "100", "X-RateLimit-Reset": str(when)})
    assert gate.resumes() is not None and 0.5 <= gate.resumes() - time.time() <= 1.6
    started = time.monotonic()
    gate.wait()
    assert 1.0 <= time.monotonic() - started < 2.5


def test_scarce_calls_go_to_what_moves_bytes_first():
    """RateGate: while calls are spread (a quota running low), the calls waiting go in order of
    priority: checks, then looks, then the walk, then new requests."""
    for _ in range(3):
        gate = sd.RateGate(threading.Event())
        gate.observe({"X-RateLimit-Remaining": "4", "X-RateLimit-Limit": "100",
                      "X-RateLimit-Reset": str(time.time() + 1.0)})              # a call every 0.2 s
        gate.wait()                                                     # the first goes, the next wait
        order, threads = [], []
        for name in ("request", "walk", "look", "check"):               # the least urgent asks first
            thread = threading.Thread(target=lambda n=name: (gate.wait(sd.PRIORITY[n]), order.append(n)))
            thread.start()
            threads.append(thread)
            deadline = time.monotonic() + 5               # each waits in the gate before the next asks
            while len(gate._queue) < len(threads) and time.monotonic() < deadline:
                time.sleep(0.001)
        for thread in threads:
            thread.join(5)
        assert order == ["check", "look", "walk", "request"]
