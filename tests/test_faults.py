"""A real network, a busy server and bad input: retried, reported, or stopped cleanly."""

import os
import re
import signal
import threading
import time

import pytest

import smugmug_download as sd
from conftest import file_size_limit, sample_expected, spawn, tree, wait_for, write_config


def test_every_fault_at_once_still_gives_identical_tree(sample, run):
    """5xx (some HTML), non-JSON 200s, a 429, cut and short downloads, an archive Error once,
    Removed before and during download: all recovered, byte-identical tree, exit 0."""
    keys = sample.keys
    sample.fail_every = 7
    sample.garbage_every = 11
    sample.throttle_calls = {5}
    sample.retry_after = 1
    sample.cut_after, sample.cut_times = 1000, 1
    sample.short_times = 1
    sample.error_once = {keys["bbq"], keys["travel1"]}
    sample.removed_once = {keys["xmas"]: "before", keys["big"]: "during"}
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    got, expected = tree(run.out), sample_expected(sample)
    assert got.keys() == expected.keys(), err
    assert got == expected
    statuses = {e["status"] for e in sample.log}
    assert {429, 500, 502, 503}.issubset(statuses) or {429, 500, 502}.issubset(statuses)
    assert "Traceback" not in err


@pytest.mark.parametrize("status, said", [(429, "SmugMug asks to slow down (429): pausing all API calls"),
                                           (503, "SmugMug is busy (503): pausing all API calls")])
def test_retry_after_holds_every_thread(sample, run, status, said):
    """After a 429 with Retry-After, or a busy 503 with one (e.g. too many archives in
    preparation), no API request from any thread arrives before the window ends; then the run
    goes on to the same tree."""
    sample.api_latency = 0.005
    sample.throttle_status = status
    sample.throttle_calls = {8}
    sample.retry_after = 2
    code, _, err = run("--workers", "8")
    assert code == 0, err
    first = [e for e in sample.log if e["status"] == status][0]["t"]
    early = [e for e in sample.log if first + 0.25 < e["t"] < first + 2.0 and not e["path"].startswith("/download")]
    assert early == []
    assert said in err
    assert tree(run.out) == sample_expected(sample)


def test_retry_after_as_http_date(sample, run):
    """Retry-After given as an HTTP date is honoured too."""
    import email.utils
    sample.throttle_calls = {3}
    sample.retry_after = email.utils.formatdate(time.time() + 1, usegmt=True)
    code, _, err = run()
    assert code == 0, err
    assert tree(run.out) == sample_expected(sample)


def test_low_rate_limit_remaining_slows_down(fake, run):
    """When X-RateLimit-Remaining runs low, calls are spread out before any 429."""
    for i in range(2):
        fake.add_album("A%d" % i)
    fake.rate_remaining = 2
    started = time.monotonic()
    code, _, err = run()
    assert code == 0, err
    gaps = [b["t"] - a["t"] for a, b in zip(fake.log, fake.log[1:]) if not b["path"].startswith("/download")]
    assert time.monotonic() - started > 1.0
    assert max(gaps) > 0.3


def test_archive_error_always_saves_that_album_file_by_file(sample, run):
    """An archive that always ends in Error is requested 1 + 3 times, then the album is saved
    file by file: every file on its own, exit 0."""
    key = sample.keys["travel2"]
    sample.error_always = {key}
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    assert len([e for e in sample.calls("post") if key in e["path"]]) == 1 + sd.ARCHIVE_ERROR_RETRIES
    assert "Travel/Trip 02: SmugMug could not prepare the archive (Error), 4 tries; saving it file by file" in err
    expected = sample_expected(sample)
    del expected["Travel/Trip 02/%s.zip" % key]
    got = tree(run.out)
    loose = {k: v for k, v in got.items() if k.startswith("Travel/Trip 02/")}
    assert sorted(loose.values()) == sorted(sample.expected_files(key).values())
    assert {k: v for k, v in got.items() if not k.startswith("Travel/Trip 02/")} == expected


def test_downloads_always_cut_fail_the_album_not_the_run(fake, run, monkeypatch):
    """A part that never arrives whole (while SmugMug answers everything else: the link works)
    fails its album after bounded retries; no final file."""
    monkeypatch.setattr(sd, "BACKOFF_BASE", 0.01)        # the backoff between tries, in milliseconds
    good = fake.add_album("Good", sizes=(2000,))
    bad = fake.add_album("Bad", sizes=(50_000,))
    fake.cut_after, fake.cut_times = 10_000, 10 ** 6
    fake.albums[good].part_sizes = [5000]
    fake.cut_after = 6000     # the good one (5000 bytes) is never cut
    code, _, err = run()
    assert code == sd.EXIT_ALBUMS_FAILED
    assert "Bad: download failed after %d tries" % sd.DOWNLOAD_ATTEMPTS in err
    files = tree(run.out)
    assert "Bad/%s.zip" % bad not in files
    assert files["Good/%s.zip" % good] == fake.expected_parts(good)["%s.zip" % good]


def test_archive_timeout_saves_the_album_file_by_file(fake, run):
    """An archive still not ready after archive_timeout_hours: the album is saved file by file."""
    key = fake.add_album("Slow")
    fake.prep_seconds = 60
    code, _, err = run(archive_timeout_hours=0.0002)
    assert code == sd.EXIT_OK, err
    assert "Slow: archive not ready after" in err and "saving it file by file" in err
    assert sorted(tree(run.out).values()) == sorted(fake.expected_files(key).values())


def test_revoked_token_stops_the_run(sample, run, tmp_path):
    """A 401 mid-run stops everything at once with exit 2 and the server's message, once;
    the summary says the run stopped, and the log file ends with it."""
    sample.revoke_after = 6
    log_file = tmp_path / "run.log"
    code, out, err = run("--quiet", "--log-file", str(log_file))
    assert code == sd.EXIT_USAGE
    lines = err.strip().splitlines()
    assert lines.count("Error: SmugMug rejected the credentials: oauth_problem=token_rejected. To fix: "
                       "run --authorize again (config file %s)" % run.config_path) == 1
    assert "Traceback" not in err
    logged = log_file.read_text().strip().splitlines()
    summary = [i for i, line in enumerate(logged) if "Stopped after" in line]
    assert summary and "(SmugMug rejected the credentials)." in logged[summary[0]]
    assert all(" INFO " in line or " NOTICE " in line for line in logged[summary[0]:])   # the log ends with it


def test_missing_folder_404_warns_and_goes_on(sample, run):
    """A folder answering 404 is skipped with a warning; the rest is backed up."""
    travel = [n for n in sample.nodes.values() if n.name == "Travel"][0]
    sample.not_found_nodes = {travel.node_id}
    code, _, err = run()
    assert code == 0, err
    assert "folder Travel is gone (404)" in err
    expected = {k: v for k, v in sample_expected(sample).items() if not k.startswith("Travel/")}
    assert tree(run.out) == expected


def test_write_error_stops_new_work(fake, tmp_path):
    """A write error (file size limit as a stand-in for a full disk): the run names the file,
    keeps what is complete, never leaves a partial file at a final name, exits 1."""
    fake.add_album("Small", sizes=(1000,))
    fake.add_album("Huge", sizes=(400_000,))
    out = tmp_path / "backup"
    config = write_config(tmp_path / "config.json", fake.config(out, workers=1))

    proc = spawn(config, preexec_fn=file_size_limit(100_000))
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == sd.EXIT_ALBUMS_FAILED, err
    assert "stopping new downloads" in err and "Huge" in err and "File too large" in err
    files = tree(out)
    assert not any(k.startswith("Huge/") and not k.endswith(".part") for k in files)
    assert "Traceback" not in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_quickly_keeps_parts_and_state(sample, tmp_path, sig):
    """Ctrl-C / SIGTERM: exit 130 within 5 s, .part files kept, state saved; a rerun completes."""
    sample.bandwidth = 20_000   # about 3 s for the whole account: the signal comes mid-download
    out = tmp_path / "backup"
    config = write_config(tmp_path / "config.json", sample.config(out))
    proc = spawn(config)
    assert wait_for(lambda: any(k.endswith(".zip.part") for k in tree(out)) if out.exists() else False)
    time.sleep(0.3)
    sent = time.monotonic()
    proc.send_signal(sig)
    code = proc.wait(timeout=10)
    assert time.monotonic() - sent < 5
    assert code == sd.EXIT_INTERRUPTED
    err = proc.stderr.read().decode()
    assert "Traceback" not in err and "Interrupted" in err
    assert os.path.exists(out / sd.STATE_DIR / sd.STATE_FILE)
    assert any(k.endswith(".zip.part") for k in tree(out))
    sample.bandwidth = None
    proc = spawn(config)
    assert proc.wait(timeout=60) == 0
    assert tree(out) == sample_expected(sample)


def test_no_secret_reaches_output_log_or_state(sample, run, tmp_path):
    """Neither the app secret nor the access token or its secret appear anywhere, even --verbose."""
    sample.fail_every = 9
    log_file = tmp_path / "run.log"
    code, out, err = run("--verbose", "--log-file", str(log_file))
    assert code == 0, err
    secrets = [sample.app_secret, "test-access-token-5d8e", "test-access-secret-2b6f"]
    texts = [out, err, log_file.read_text()]
    for root, _dirs, files in os.walk(run.out / sd.STATE_DIR):
        texts += [open(os.path.join(root, f), errors="replace").read() for f in files]
    for text in texts:
        for secret in secrets:
            assert secret not in text
        assert "oauth_signature" not in text and "Authorization" not in text
    assert "DEBUG" in log_file.read_text()


def test_world_readable_config_warns(sample, run):
    """On POSIX a config readable by others gets a warning."""
    path = run.config()
    os.chmod(path, 0o644)
    code = sd.main(["--config", path, "--dry-run"])
    err = run.capsys.readouterr().err
    assert code == 0
    assert "can be read by other users" in err


@pytest.mark.parametrize("content, expected", [
    (None, "not found"),
    ("{\n  \"app_key\": \"x\",\n  oops\n}", "not valid JSON at line 3 column 3"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_config_file_errors(tmp_path, capsys, content, expected):
    """Missing, invalid JSON (with line and column), not an object: one line, exit 2."""
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    code = sd.main(["--config", str(path)])
    err = capsys.readouterr().err
    assert code == sd.EXIT_USAGE
    assert err.count("\n") == 1 and expected in err and err.startswith("Error: ")


@pytest.mark.parametrize("change, expected", [
    ({"access_key": None}, "access_key is missing"),
    ({"app_key": 42}, "app_key must be a string"),
    ({"app_key": "PASTE-YOUR-API-KEY-HERE"}, "app_key still holds the placeholder"),
    ({"api_base": "http://api.smugmug.invalid"}, "only https is allowed"),
    ({"workers": "four"}, "workers must be a number"),
    ({"max_preparing": 5000}, "max_preparing must be at most 1000"),
    ({"output_dir": "/proc/definitely/not/here"}, "cannot create output_dir"),
])
def test_config_value_errors(fake, tmp_path, capsys, change, expected):
    """Each bad value is named in one line with exit 2; nothing is contacted."""
    data = fake.config(tmp_path / "out")
    for key, value in change.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    path = write_config(tmp_path / "config.json", data)
    code = sd.main(["--config", path])
    err = capsys.readouterr().err
    assert code == sd.EXIT_USAGE, err
    assert expected in err and err.count("\n") == 1
    assert fake.log == []


def test_unknown_config_key_is_an_error_naming_the_closest(sample, run, capsys):
    """An unknown key is a mistake, even with --quiet: exit 2, one line naming it and the key it
    most likely meant; nothing is contacted."""
    code, _, err = run("--quiet", worker=8)
    assert code == sd.EXIT_USAGE
    assert err == "Error: config file %s: unknown key 'worker' (did you mean 'workers'?)\n" % run.config_path
    code, _, err = run(outptu_dir="x")
    assert code == sd.EXIT_USAGE and "unknown key 'outptu_dir' (did you mean 'output_dir'?)" in err
    assert sample.log == []


def test_unreachable_api_at_the_start_waits_then_stops(tmp_path, capsys):
    """A server that refuses connections from the start: the run waits for it (unreachable_minutes),
    then stops with one stopped summary naming the reason, exit 1 (an outage is no config error)."""
    import socket
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    data = {"app_key": "k1234", "app_key_secret": "s1234", "access_key": "a1234",
            "access_key_secret": "b1234", "output_dir": str(tmp_path / "o"),
            "api_base": "http://127.0.0.1:%d" % port, "unreachable_minutes": 0.02}
    path = write_config(tmp_path / "config.json", data)
    started = time.monotonic()
    code = sd.main(["--config", path, "--quiet"])
    err = capsys.readouterr().err
    assert code == sd.EXIT_ALBUMS_FAILED, err
    assert 1.0 < time.monotonic() - started < 10
    assert re.fullmatch(r"Stopped after \d+ s, before reaching the account: nothing was backed up \(SmugMug "
                        r"unreachable since \d\d:\d\d:\d\d: connection refused by 127\.0\.0\.1:\d+\)\.\n", err), err
    assert sd.main(["--config", path]) == sd.EXIT_ALBUMS_FAILED      # without --quiet: the wait names the cause
    assert re.fullmatch(r"SmugMug unreachable since \d\d:\d\d, giving up at \d\d:\d\d \(connection refused by "
                        r"127\.0\.0\.1:\d+\)\nStopped after [1-9]\d* s, before reaching the account: nothing was backed "
                        r"up\.\n", capsys.readouterr().err)


def test_server_gone_mid_run_stops_early_and_says_so(sample, run, monkeypatch):
    """SmugMug goes away mid-run: once every call has failed for the window the run stops with
    "SmugMug unreachable since HH:MM:SS", says Stopped with albums done / failed / not attempted,
    and exits 1 with no traceback; a later run completes the backup."""
    sample.prep_seconds = 5.0
    vanish = threading.Timer(1.0, sample.vanish)
    vanish.start()
    started = time.monotonic()
    code, _, err = run(unreachable_minutes=0.02)
    vanish.join()
    assert code == sd.EXIT_ALBUMS_FAILED, err
    assert time.monotonic() - started < 30
    assert re.search(r"SmugMug unreachable since \d\d:\d\d:\d\d", err)
    assert re.search(r"Stopped after .*: \d+ albums? backed up, \d+ unchanged, \d+ failed, \d+ not attempted", err), err
    assert "Traceback" not in err and "urllib3" not in err and "HTTPConnectionPool" not in err
    sample.start()
    for archives in sample.archives.values():
        for archive in archives:
            archive.prep_seconds = 0.05
    code, _, err = run()
    assert code == 0, err
    assert tree(run.out) == sample_expected(sample)


def test_an_album_deleted_after_the_walk_is_skipped_with_a_warning(sample, run):
    """An album SmugMug still listed during the walk answers 404 when its archive is asked
    for (deleted meanwhile): a warning, the rest is backed up, exit 0; a backup made of it
    before is kept."""
    assert run()[0] == 0
    key = sample.keys["bbq"]
    before = tree(run.out)
    sample.touch(key)
    sample.deleted_albums = {key}
    code, _, err = run()
    assert code == 0, err
    assert "Family/2019/Summer/BBQ is gone from SmugMug since the walk" in err and "kept" in err
    assert tree(run.out) == before
    sample.deleted_albums = set()
    fresh = sample.add_album("Fresh", sizes=(900,))
    sample.deleted_albums = {fresh}
    code, _, err = run()
    assert code == 0 and "Fresh is gone from SmugMug since the walk" in err
    assert not (run.out / "Fresh").exists() or os.listdir(run.out / "Fresh") == []


def test_a_404_to_the_archive_request_of_a_living_album_fails_it(fake, run):
    """The archive request answers 404 but the album itself is there: not taken for deleted,
    the album fails by name (exit 1)."""
    fake.add_album("Here", sizes=(1000,))
    fake.post_answer = (404, b'{"Code": 404, "Message": "Not Found"}')
    code, _, err = run()
    assert code == sd.EXIT_ALBUMS_FAILED
    assert "Here: SmugMug answered 404 to the archive request" in err and "gone from SmugMug" not in err
