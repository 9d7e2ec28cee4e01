"""Issue 19: what a person meets at a terminal and in the cron mail: the status line, one
summary for every end of a run, the log file, --verify on read-only media, where a relative
output_dir goes, config mistakes under --quiet, stable dry runs, and the small items."""

import fcntl
import functools
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

import smugmug_download as sd
from conftest import (SAMPLE_PATHS, SCRIPT, file_size_limit, read_pty, sample_expected, spawn, tree, wait_for,
                      write_config)


# Helpers ####################################################################

def set_columns(fd, columns):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))


def on_a_terminal(config, *args, columns=80):
    """The tool as a subprocess whose stderr is a pseudo-terminal of `columns` columns: (proc, master)."""
    master, slave = pty.openpty()
    set_columns(slave, columns)
    proc = spawn(config, *args, stderr=slave)
    os.close(slave)
    return proc, master


def read_for(master, seconds):
    """What the terminal shows for the next `seconds` (less if the child ends first)."""
    text, deadline = b"", time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], max(0.0, min(0.05, deadline - time.monotonic())))
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            text += chunk
    return text.decode(errors="replace")


def read_until_line(stream, start, timeout=20):
    """Lines of a subprocess's stream up to one that starts with `start` (all of them, as text)."""
    text, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline().decode()
        assert line, text
        text += line
        if line.startswith(start):
            return text
    raise AssertionError("no line starting %r in %r" % (start, text))


def status_lines(text):
    """Every drawing of the status line in what a terminal was sent ("\\r TEXT \\x1b[K")."""
    drawn = [piece.split("\x1b[K")[0] for piece in text.split("\r") if "\x1b[K" in piece]
    return [d for d in drawn if d]


def guarded_album(fake, name="Guarded"):
    """An album that fails by itself, at once and for good: its video is left out of the zips
    and SmugMug refuses the original (403)."""
    fake.zip_omit_videos = True
    key = fake.add_album(name, images=[{"file_name": "ok.jpg", "size": 2000},
                                       {"file_name": "clip.mov", "size": 3000, "is_video": True}])
    fake.refuse_originals = fake.refuse_originals | {fake.albums[key].images[1].key}
    return key


SUMMARY_RE = re.compile(r"^(Done|Stopped|Interrupted) after \d+ (s|min)[^:]*: (\d+) albums? backed up, "
                        r"(\d+) unchanged, (\d+) failed, (\d+) not attempted( \((.+)\))?\.$")
COUNTS_RE = re.compile(r"^(\d+ parts? \([\d.]+ [KMG]?B\) downloaded, )?\d+ files? checked against SmugMug's "
                       r"listing, \d+ fetched on (its|their) own( \([\d.]+ [KMG]?B\))?, \d+ moved to versions\.$")


def one_summary(err):
    """The summary in a run's stderr, checked for its shape: exactly one first line, then one
    "  failed: PATH: reason" line per failed album, then the counts line. Returns (how, backed
    up, unchanged, failed, not attempted, reason, {path: reason})."""
    lines = err.splitlines()
    firsts = [i for i, line in enumerate(lines) if SUMMARY_RE.match(line)]
    assert len(firsts) == 1, err
    first = SUMMARY_RE.match(lines[firsts[0]])
    failed, i = {}, firsts[0] + 1
    while i < len(lines) and lines[i].startswith("  failed: "):
        path, reason = lines[i][len("  failed: "):].split(": ", 1)
        assert path not in failed, "album %s named twice in the summary:\n%s" % (path, err)
        failed[path] = reason
        i += 1
    assert i < len(lines) and COUNTS_RE.match(lines[i]), err
    assert int(first.group(5)) == len(failed), err
    assert len(lines) == len(set(lines)), "a line said twice:\n%s" % err     # never one line per try
    assert "Traceback" not in err
    return (first.group(1), int(first.group(3)), int(first.group(4)), int(first.group(5)), int(first.group(6)),
            first.group(8), failed)


# 1. The status line #########################################################

def test_status_line_fits_80_columns_shows_rate_time_left_and_the_wait_and_follows_a_resize(fake, tmp_path):
    """At 80 columns every drawing of the status line fits 79 columns; it names the wait while
    archives are prepared ("waiting for N archives to be prepared"), shows albums done of found,
    bytes done of the total, the rate and the time left while downloading, and no internal word
    (window, ready) without --verbose. Resized to 40 columns mid-run (SIGWINCH), every later
    drawing fits 39 and still starts with the album counts."""
    for i in range(5):
        fake.add_album("Small %d" % i, sizes=(5000,))
    guarded_album(fake)                       # "| 1 failed" makes the full line wider than 80
    fake.add_album("Large", sizes=(1_500_000,))
    fake.bandwidth = 1_000_000
    fake.prep_seconds = 0.3
    config = write_config(tmp_path / "config.json", fake.config(tmp_path / "out"))
    proc, master = on_a_terminal(config, columns=80)
    before, deadline, mark = "", time.monotonic() + 20, None
    while mark is None or not re.search(r"/s \| (less than a minute|about \d+ min) left\x1b\[K", before[mark:]):
        assert time.monotonic() < deadline and proc.poll() is None, before
        before += read_for(master, 0.05)
        if mark is None and any(e["status"] == 403 for e in fake.calls("file")):
            mark = len(before)            # Guarded has failed: from here the whole line is 83 wide
    set_columns(master, 40)
    proc.send_signal(signal.SIGWINCH)
    before += read_for(master, 0.15)          # drawn before the resize, still on its way
    after = read_pty(proc, master)
    assert proc.returncode == sd.EXIT_ALBUMS_FAILED, before + after
    drawn = status_lines(before)
    assert max(len(d) for d in drawn) <= 79, [d for d in drawn if len(d) > 79]
    assert any(re.fullmatch(r"0 of 7 albums \| waiting for [1-7] archives? to be prepared", d)
               for d in drawn), drawn                               # no bytes before any size is known
    assert any(re.fullmatch(r"\d of 7 albums \| [\d.]+ [KM]?B of 1\.5 MB \| [\d.]+ [KM]B/s \| "
                            r"(less than a minute|about \d+ min) left", d) for d in status_lines(before[mark:])), drawn
    later = status_lines(after)
    assert later and max(len(d) for d in later) <= 39, [d for d in later if len(d) > 39]
    assert all(re.match(r"\d of 7 albums( \||$)", d) for d in later), later
    assert any("/s" in d for d in later), later                  # the rate outlives the bytes
    for word in ("window", "ready"):
        assert word not in before + after


def test_the_total_is_a_floor_until_enough_archive_sizes_are_known():
    """Reporter.line: while the walk goes on or fewer than ETA_ARCHIVES archives are listed, the
    bytes read "X of at least Y" (never a small exact total); then "of about Y" while some
    archives are not listed; exact once all are."""
    import types
    clock = [0.0]
    reporter = sd.Reporter(types.SimpleNamespace(verbose=False, dry_run=False), None, sd.Meter(lambda: clock[0]))
    states = {"preparing": 9, "done": 1}
    orchestrator = types.SimpleNamespace(
        summary=sd.Summary(albums_found=10, backed_up=1), futures={}, bytes_known=4_000_000,
        walk=types.SimpleNamespace(to_list=()),
        scheduler=types.SimpleNamespace(prepared=1, prepared_bytes=4_000_000, queue=[], running=[], window=None),
        count=lambda *wanted: sum(n for state, n in states.items() if state in wanted))
    assert reporter.line(orchestrator, None)[1] == (2, "0 B of at least 4.0 MB")
    orchestrator.scheduler.prepared, orchestrator.scheduler.prepared_bytes = 5, 20_000_000
    orchestrator.bytes_known = 20_000_000
    states = {"preparing": 5, "done": 5}
    assert reporter.line(orchestrator, None)[1] == (2, "0 B of about 40.0 MB")
    states = {"done": 10}
    assert reporter.line(orchestrator, None)[1] == (2, "0 B of 20.0 MB")


def test_status_line_shows_the_pipeline_only_with_verbose(fake, tmp_path):
    """With --verbose (on a terminal wide enough) the status line adds the pipeline's internal
    words: preparing, ready, downloading, window."""
    for i in range(4):
        fake.add_album("Album %d" % i, sizes=(5000,))
    fake.prep_seconds = 0.3
    config = write_config(tmp_path / "config.json", fake.config(tmp_path / "out"))
    proc, master = on_a_terminal(config, "--verbose", columns=160)
    drawn = status_lines(read_pty(proc, master))
    assert proc.returncode == 0
    assert any(re.search(r"\| \d+ preparing, \d+ ready, \d+ downloading, window \d+$", d) for d in drawn), drawn
    assert max(len(d) for d in drawn) <= 159


# 2. One summary #############################################################

def test_a_finished_run_with_a_failed_album_ends_with_the_one_summary(fake, tmp_path):
    """A run that finishes with an album failing: "Done after T: ..." with the counts, the
    failed album once with its reason, then the counts of files; exit 1; no lock file left.
    With --quiet (cron) the first line and the failed album are all it prints."""
    for i in range(3):
        fake.add_album("Album %d" % i, sizes=(4000,))
    guarded_album(fake)
    out = tmp_path / "out"
    proc = spawn(write_config(tmp_path / "config.json", fake.config(out)))
    _, err = proc.communicate(timeout=30)
    err = err.decode()
    assert proc.returncode == sd.EXIT_ALBUMS_FAILED, err
    how, backed_up, unchanged, failed, not_attempted, why, reasons = one_summary(err)
    assert (how, backed_up, unchanged, failed, not_attempted, why) == ("Done", 3, 0, 1, 0, None)
    assert list(reasons) == ["Guarded"] and "1 file missing" in reasons["Guarded"]
    assert not (out / sd.LOCK_FILE).exists()
    fake.touch(list(fake.albums)[0])
    proc = spawn(write_config(tmp_path / "config.json", fake.config(out)), "--quiet")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == sd.EXIT_ALBUMS_FAILED        # --quiet (cron): the first line and the failures
    assert re.fullmatch(r"Done after \d+ s: 1 album backed up, 2 unchanged, 1 failed, 0 not attempted\.\n"
                        r"  failed: Guarded: 1 file missing: [^\n]*\n", err.decode()), err.decode()


def test_a_run_stopped_by_a_write_error_ends_with_the_one_summary(fake, tmp_path):
    """A write error (a file size limit standing in for a full disk) stops the run: "Stopped
    after T: ... (FILE: File too large)", the album that could not be written once, the counts;
    exit 1."""
    for i in range(3):
        fake.add_album("Album %d" % i, sizes=(4000,))
    fake.add_album("Huge", sizes=(400_000,))
    out = tmp_path / "out"
    proc = spawn(write_config(tmp_path / "config.json", fake.config(out)), preexec_fn=file_size_limit(100_000))
    _, err = proc.communicate(timeout=30)
    err = err.decode()
    assert proc.returncode == sd.EXIT_ALBUMS_FAILED, err
    how, backed_up, unchanged, failed, not_attempted, why, reasons = one_summary(err)
    assert how == "Stopped" and why.endswith("Huge/%s.zip.part: File too large" % list(fake.albums)[-1])
    assert list(reasons) == ["Huge"] and "File too large" in reasons["Huge"]
    assert backed_up + failed + not_attempted == 4
    assert not (out / sd.LOCK_FILE).exists()


def test_a_run_stopped_by_an_unreachable_smugmug_ends_with_the_one_summary(fake, tmp_path):
    """SmugMug goes away mid-download (unreachable_minutes 0.01): "Stopped after T: ...
    (SmugMug unreachable since HH:MM:SS: ...)", the album that had failed before once, never
    a line per download try, the counts; exit 1."""
    guarded_album(fake)
    for i in range(8):
        fake.add_album("Album %d" % i, sizes=(60_000,))
    fake.bandwidth = 100_000
    out = tmp_path / "out"
    proc = spawn(write_config(tmp_path / "config.json", fake.config(out, workers=16, unreachable_minutes=0.01)))
    said = read_until_line(proc.stderr, "failed: Guarded: ")
    assert wait_for(lambda: sum(k.endswith(".part") for k in tree(out)) >= 2)
    fake.vanish()
    err = said + proc.communicate(timeout=30)[1].decode()
    assert proc.returncode == sd.EXIT_ALBUMS_FAILED, err
    how, backed_up, unchanged, failed, not_attempted, why, reasons = one_summary(err)
    assert how == "Stopped" and re.match(r"SmugMug unreachable since \d\d:\d\d:\d\d: ", why), why
    assert list(reasons) == ["Guarded"] and not_attempted >= 2
    assert backed_up + failed + not_attempted == 9
    assert "tries" not in err
    assert not (out / sd.LOCK_FILE).exists()


def interrupted_after(fake, tmp_path, line):
    """Eight more albums downloading slowly; Ctrl-C once stderr has said line and two downloads
    are under way: (all of stderr, output_dir), after checking the exit code is 130."""
    for i in range(8):
        fake.add_album("Album %d" % i, sizes=(60_000,))
    fake.bandwidth = 100_000
    out = tmp_path / "out"
    proc = spawn(write_config(tmp_path / "config.json", fake.config(out, workers=16)))
    said = read_until_line(proc.stderr, line)
    assert wait_for(lambda: sum(k.endswith(".part") for k in tree(out)) >= 2)
    proc.send_signal(signal.SIGINT)
    err = said + proc.communicate(timeout=30)[1].decode()
    assert proc.returncode == sd.EXIT_INTERRUPTED, err
    return err, out


def test_an_interrupted_run_ends_with_the_one_summary(fake, tmp_path):
    """Ctrl-C (SIGINT) mid-download: "Interrupted after T: ... (Ctrl-C or SIGTERM)", the album
    that had failed before once, the counts; exit 130; the lock file is removed."""
    guarded_album(fake)
    err, out = interrupted_after(fake, tmp_path, "failed: Guarded: ")
    how, backed_up, unchanged, failed, not_attempted, why, reasons = one_summary(err)
    assert (how, why) == ("Interrupted", "Ctrl-C or SIGTERM")
    assert list(reasons) == ["Guarded"] and not_attempted >= 2
    assert backed_up + failed + not_attempted == 9
    assert not (out / sd.LOCK_FILE).exists()


def test_the_summary_counts_add_up_with_an_album_without_a_link(fake, tmp_path):
    """Backed up + unchanged + failed + not attempted is every album node, when one of them
    (without an Album link) fails at the walk and the run is then interrupted."""
    fake.add_node("Album", "Linkless", fake.root_id)
    err, _ = interrupted_after(fake, tmp_path, "failed: Linkless: ")
    _, backed_up, unchanged, failed, not_attempted, _, reasons = one_summary(err)
    assert reasons == {"Linkless": "album without an Album link"}
    assert backed_up + unchanged + failed + not_attempted == 9, err


# 3. The log file ############################################################

def test_log_file_has_a_line_per_album_with_a_status_line_on_the_terminal(sample, tmp_path):
    """With a status line on a terminal and --log-file, the log file holds one line per album
    finished ("backed up PATH (...)") or failed ("failed: PATH: ..."), though the terminal shows
    none of them."""
    guarded_album(sample)
    log_file = tmp_path / "run.log"
    config = write_config(tmp_path / "config.json", sample.config(tmp_path / "out"))
    proc, master = on_a_terminal(config, "--log-file", str(log_file))
    shown = read_pty(proc, master)
    assert proc.returncode == sd.EXIT_ALBUMS_FAILED, shown
    assert status_lines(shown) and "backed up Travel" not in shown
    logged = log_file.read_text().splitlines()
    backed_up = [re.sub(r" \(.*", "", line.split(" INFO [MainThread] backed up ", 1)[1])
                 for line in logged if " INFO [MainThread] backed up " in line]
    paths = sorted(path for path in SAMPLE_PATHS.values())
    assert sorted(backed_up) == paths, logged
    failed = [line for line in logged if " INFO [MainThread] failed: " in line]
    assert len(failed) == 1 and "failed: Guarded: 1 file missing: refused by SmugMug" in failed[0]


# 4. --verify on read-only media #############################################

READ_ONLY_MOUNT = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && shift && exec "$@"'


@functools.lru_cache(maxsize=None)
def read_only_prefix():
    """A command prefix under which READ_ONLY_MOUNT makes a folder truly read-only (a read-only
    bind mount in a private mount namespace: even root gets EROFS), or None if this machine
    allows none."""
    import tempfile
    folder = tempfile.mkdtemp()
    try:
        for prefix in (["unshare", "--map-root-user", "--mount"], ["unshare", "--mount"]):
            try:
                probe = subprocess.run(prefix + ["sh", "-c", READ_ONLY_MOUNT, "sh", folder, "sh", "-c",
                                                 '! touch "$0/probe" 2>/dev/null', folder],
                                       capture_output=True, timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if probe.returncode == 0 and not os.path.exists(os.path.join(folder, "probe")):
                return tuple(prefix)
        return None
    finally:
        subprocess.run(["rm", "-rf", folder])


def verify_read_only(out, config, *args):
    """--verify as a subprocess that sees `out` mounted read-only: (exit code, stdout, stderr)."""
    prefix = read_only_prefix()
    if prefix is None:
        pytest.skip("no read-only mount possible here (unshare --mount refused), and root ignores permission bits")
    proc = subprocess.run(list(prefix) + ["sh", "-c", READ_ONLY_MOUNT, "sh", str(out), sys.executable, SCRIPT,
                                          "--config", str(config), "--verify"] + list(args),
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout, proc.stderr


def test_verify_on_read_only_media_writes_nothing_and_still_verifies(sample, run):
    """On a backup mounted read-only (a USB disk, a snapshot; here a read-only bind mount, which
    even root cannot write through), --verify says so in one line, takes no lock and marks
    nothing, and still verifies: exit 0 when intact, 1 (naming the album) when damaged. A lock
    tried there would be exit 2, a mark or a state save tried an Error line and exit 1."""
    assert run()[0] == 0
    state = (run.out / sd.STATE_DIR / sd.STATE_FILE).read_bytes()
    code, out, err = verify_read_only(run.out, run.config_path)
    assert code == 0, err
    lines = err.splitlines()
    assert len(lines) == 2 and lines[1].startswith("Verified 15 albums") and "all intact" in lines[1], err
    assert lines[0] == ("Warning: %s cannot be written (read-only): verifying without a lock, and damaged "
                        "albums are not marked for the next run" % run.out)
    os.remove(run.out / "Travel" / "Trip 05" / sd.MANIFEST_NAME)
    code, out, err = verify_read_only(run.out, run.config_path)
    assert code == sd.EXIT_ALBUMS_FAILED, err
    assert out == "damaged   Travel/Trip 05: metadata.json: manifest missing\n"
    assert len(err.splitlines()) == 2 and "read-only" in err and "1 damaged" in err, err
    assert "Error" not in err
    assert (run.out / sd.STATE_DIR / sd.STATE_FILE).read_bytes() == state
    assert not (run.out / sd.LOCK_FILE).exists()


def test_verify_on_a_terminal_shows_its_progress_and_ends_with_its_verdict(sample, run):
    """--verify run by hand at an 80-column terminal: a status line of its progress that fits,
    then the verdict: exit 0 and "all intact"; with a damaged file, exit 1 naming it."""
    assert run()[0] == 0
    for damage in (False, True):
        if damage:
            os.remove(run.out / "Travel" / "Trip 05" / sd.MANIFEST_NAME)
        proc, master = on_a_terminal(run.config_path, "--verify", columns=80)
        shown = read_pty(proc, master)
        drawn = status_lines(shown)
        assert drawn and all(re.match(r"verifying: [\d.]+ [KMG]?B of [\d.]+ [KMG]?B checked( \||$)", d)
                             for d in drawn), shown
        assert max(len(d) for d in drawn) <= 79 and "Traceback" not in shown and "internal error" not in shown
        assert proc.returncode == (sd.EXIT_ALBUMS_FAILED if damage else 0), shown
        assert ("1 damaged" if damage else "all intact") in shown, shown


def test_verify_marks_damaged_albums_when_it_can_write(sample, run):
    """On writable media --verify marks a damaged album in the state (exit 1), so the next run
    fetches it again though SmugMug says it is unchanged; the lock file is gone afterwards."""
    assert run()[0] == 0
    key = sample.keys["travel5"]
    os.remove(run.out / "Travel" / "Trip 05" / sd.MANIFEST_NAME)
    code, out, err = run("--verify")
    assert code == sd.EXIT_ALBUMS_FAILED, err
    assert "read-only" not in err and "Travel/Trip 05" in out
    saved = json.loads((run.out / sd.STATE_DIR / sd.STATE_FILE).read_text())
    assert saved["albums"][key]["damaged"] == [sd.MANIFEST_NAME]
    assert not (run.out / sd.LOCK_FILE).exists()
    code, _, err = run()
    assert code == 0, err
    assert (run.out / "Travel" / "Trip 05" / sd.MANIFEST_NAME).exists()
    assert run("--verify")[0] == 0


# 5. Where a relative output_dir goes ########################################

def test_relative_output_dir_is_next_to_the_config_file(sample, tmp_path, capsys, monkeypatch):
    """A relative output_dir in a config file is relative to the config's folder: run from
    another working directory the backup goes next to the config file, and a second run from
    yet another directory finds it unchanged (no new archive asked for or downloaded)."""
    (tmp_path / "conf").mkdir()
    config = write_config(tmp_path / "conf" / "config.json", sample.config("backup"))
    for cwd in ("elsewhere", "third"):
        (tmp_path / cwd).mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert sd.main(["--config", config]) == 0, capsys.readouterr().err
    assert "into %s\n" % (tmp_path / "conf" / "backup") in capsys.readouterr().err
    assert tree(tmp_path / "conf" / "backup") == sample_expected(sample)
    assert os.listdir(tmp_path / "elsewhere") == []
    calls = len(sample.log)
    monkeypatch.chdir(tmp_path / "third")
    assert sd.main(["--config", os.path.join("..", "conf", "config.json")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^Done after \d+ s: 0 albums backed up, 15 unchanged, 0 failed, 0 not attempted\.$",
                     err, re.MULTILINE), err
    assert [e for e in sample.log[calls:] if e["kind"] not in ("walk",)] == [], sample.log[calls:]
    assert os.listdir(tmp_path / "third") == []


def test_output_dir_flag_is_relative_to_the_working_directory(sample, tmp_path, capsys, monkeypatch):
    """--output-dir on the command line stays relative to the working directory, not to the
    config file's folder."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "here").mkdir()
    config = write_config(tmp_path / "conf" / "config.json", sample.config("backup"))
    monkeypatch.chdir(tmp_path / "here")
    assert sd.main(["--config", config, "--output-dir", "mine"]) == 0, capsys.readouterr().err
    assert tree(tmp_path / "here" / "mine") == sample_expected(sample)
    assert os.listdir(tmp_path / "conf") == ["config.json"]


def test_a_missing_config_is_named_by_its_absolute_path(tmp_path, capsys, monkeypatch):
    """A config file that is not there: one Error line naming the absolute path looked at, exit 2."""
    monkeypatch.chdir(tmp_path)
    for given in (None, os.path.join("sub", "..", "nothere.json")):        # None: the default, ./config.json
        code = sd.main(["--config", given] if given else [])
        err = capsys.readouterr().err
        assert code == sd.EXIT_USAGE
        assert err.startswith("Error: config file %s not found " % os.path.abspath(given or "config.json")), err
        assert err.count("\n") == 1


# 6. Config mistakes, even with --quiet ######################################

def test_config_mistakes_are_errors_even_with_quiet(sample, run):
    """With --quiet: an unknown key is exit 2 naming it and the closest known key; `output_dirr`
    for `output_dir` is exit 2 pointing at the typo (not just "output_dir is missing"); in one
    Error line each, before any traffic."""
    code, out, err = run("--quiet", worker=8)
    assert (code, out) == (sd.EXIT_USAGE, "")
    assert err == "Error: config file %s: unknown key 'worker' (did you mean 'workers'?)\n" % run.config_path
    data = sample.config(run.out)
    data["output_dirr"] = data.pop("output_dir")
    path = write_config(run.tmp / "typo.json", data)
    code = sd.main(["--config", path, "--quiet"])
    out, err = run.capsys.readouterr()
    assert (code, out) == (sd.EXIT_USAGE, "")
    assert err.startswith("Error: config file %s: " % path) and err.count("\n") == 1, err
    assert "'output_dirr'" in err and "did you mean 'output_dir'?" in err, err
    assert sample.log == []


def test_a_world_readable_config_warns_even_with_quiet(sample, run):
    """A config other users can read: a warning naming it and the fix (chmod 600), printed even
    with --quiet, where a good run prints nothing else; the run itself goes on (exit 0)."""
    path = run.config()
    os.chmod(path, 0o644)
    code = sd.main(["--config", path, "--quiet"])
    out, err = run.capsys.readouterr()
    assert (code, out) == (0, "")
    assert err == ("Warning: %s can be read by other users; it holds your SmugMug secrets (chmod 600 %s)\n"
                   % (path, path)), err
    assert tree(run.out) == sample_expected(sample)
    os.chmod(path, 0o600)
    assert sd.main(["--config", path, "--quiet"]) == 0
    assert run.capsys.readouterr() == ("", "")


# 7. Stable dry runs #########################################################

def test_dry_runs_print_albums_in_path_order_the_same_every_time(fake, tmp_path, capsys):
    """--dry-run prints the albums it finds in path order (folder by folder, names compared as
    they are), then the albums gone from SmugMug in path order, the same in every run however
    the listings' answers interleave (one worker, or eight with slow listings)."""
    top = fake.add_folder("Trips")
    inner = fake.add_folder("Trip 1", top)
    for name, parent in (("zeta", None), ("Alpha", None), ("beta", top), ("Trip 1 b", top), ("x", inner),
                         ("a", inner), ("Zed", top), ("Trip 10", top), ("middle", None)):
        fake.add_album(name, parent, sizes=(100,))
    doomed = [fake.add_album("omega", None, sizes=(100,)), fake.add_album("Trip 0", top, sizes=(100,))]
    out = tmp_path / "out"
    config = write_config(tmp_path / "config.json", fake.config(out, workers=8))
    assert sd.main(["--config", config, "--quiet"]) == 0
    for key in doomed:
        fake.remove_node(fake.albums[key].node_id)
    expected = ["unchanged Alpha", "unchanged Trips/Trip 1/a", "unchanged Trips/Trip 1/x", "unchanged Trips/Trip 1 b",
                "unchanged Trips/Trip 10", "unchanged Trips/Zed", "unchanged Trips/beta", "unchanged middle",
                "unchanged zeta", "gone      Trips/Trip 0", "gone      omega"]
    seen = []
    for workers, latency in ((1, 0.0), (8, 0.01), (1, 0.0), (8, 0.01)):
        fake.api_latency = latency
        assert sd.main(["--config", config, "--dry-run", "--workers", str(workers)]) == 0
        seen.append(capsys.readouterr().out.splitlines()[:-1])
    assert seen[0] == expected, seen[0]
    assert all(lines == seen[0] for lines in seen), seen


# 8. The small items #########################################################

def test_dry_run_header_says_dry_run(sample, run):
    """A dry run's first line says it is a dry run and names the account and the backup folder
    (not "Checking account ... into")."""
    code, _, err = run("--dry-run")
    assert code == 0, err
    first = err.splitlines()[0]
    assert first == "Dry run of account tester against the backup in %s (nothing is downloaded or written)" % run.out
    assert "Checking" not in err


def test_the_lock_file_goes_when_a_run_ends_and_a_stale_one_stops_nothing(sample, run):
    """No lock file is left after a run (nor after a dry run, which takes none); a lock file left
    by a run that died (its pid dead, its lock released by the OS) does not stop the next run,
    which removes it at its end."""
    assert run("--dry-run")[0] == 0 and not (run.out / sd.LOCK_FILE).exists()
    assert run()[0] == 0
    assert not (run.out / sd.LOCK_FILE).exists()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run.out / sd.LOCK_FILE).write_text("%d\n" % dead.pid)
    sample.touch(sample.keys["bbq"])
    code, _, err = run()
    assert code == 0, err
    assert "backed up Family/2019/Summer/BBQ" in err
    assert not (run.out / sd.LOCK_FILE).exists()


def test_a_bad_json_config_is_named_whole_with_line_and_column(tmp_path, capsys):
    """A config that is not valid JSON: one Error line with the absolute path, the line and
    column, and the parser's whole message (never cut off mid-word)."""
    path = tmp_path / "config.json"
    path.write_text('{\n  "app_key": "x",\n  "workers": 4,\n  oops\n}\n')
    code = sd.main(["--config", str(path), "--quiet"])
    err = capsys.readouterr().err
    assert code == sd.EXIT_USAGE
    assert err == ("Error: config file %s is not valid JSON at line 4 column 3 (Expecting property name "
                   "enclosed in double quotes)\n" % path), err
    path.write_text('{"app_key": "x" "output_dir": "y"}')
    assert sd.main(["--config", str(path)]) == sd.EXIT_USAGE
    assert capsys.readouterr().err.endswith("at line 1 column 17 (Expecting ',' delimiter)\n")


def test_help_examples_use_the_virtualenv_python_and_fit_80_columns():
    """--help's examples run the tool with .venv/bin/python (as cron needs), never a bare
    python, and the whole help fits an 80-column terminal."""
    proc = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True,
                          env=dict(os.environ, COLUMNS="80"), timeout=30)
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, [line for line in lines if len(line) > 80]
    examples = proc.stdout[proc.stdout.index("examples"):proc.stdout.index("exit codes")]
    runs = re.findall(r"(\S*python\S*)\s+(?:\\\s+)?smugmug_download\.py", examples)
    assert len(runs) >= 5 and set(runs) == {".venv/bin/python"}, runs
    assert set(re.findall(r"\S*python\S*", proc.stdout)) == {".venv/bin/python"}


def test_verbose_lines_start_with_the_thread_name(sample, run, tmp_path):
    """With --verbose a warning reads "[MainThread] Warning: ..." and an error "[MainThread]
    Error: ...": the thread's name first, then the level, then the message."""
    code, _, err = run("--verbose")
    assert code == 0, err
    assert "[MainThread] Warning: skipping Mystery: unknown node type 'Widget'" in err.splitlines(), err
    assert "Warning: [" not in err
    path = write_config(tmp_path / "bad.json", dict(sample.config(run.out), worker=8))
    assert sd.main(["--config", path, "--verbose"]) == sd.EXIT_USAGE
    assert run.capsys.readouterr().err.startswith("[MainThread] Error: config file %s: unknown key 'worker'" % path)


def test_a_401_names_the_config_file_given(sample, tmp_path, capsys, monkeypatch):
    """SmugMug answering 401 to a run with --config bad4.json: the advice names that file by its
    absolute path, not "config.json"."""
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "bad4.json", sample.config("out", access_key_secret="wrong-secret-value"))
    assert sd.main(["--config", "bad4.json"]) == sd.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("Error: SmugMug rejected the credentials: ")
    assert err.endswith("(config file %s)\n" % (tmp_path / "bad4.json")), err
