"""Issue 28, findings 7, 8 and 10 and "What a person hits first": an emptied album counted,
a rename that only changes case, names the output cannot encode, `_` keys as comments, a run
that never reached SmugMug, the status line in an outage, the summary's counts, the dry run's
versions, a mistyped authorization code."""

import json
import os
import re
import socket
import subprocess
import tempfile
import urllib.request

import pytest

import smugmug_download as sd
from conftest import ROOT, read_pty, spawn, tree, write_config
from test_cli import read_until
from test_person import on_a_terminal, status_lines


def closed_port():
    """A port on 127.0.0.1 that nothing listens on (a refused connection)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def authorize_started(path):
    """--authorize as a subprocess that has printed its URL: (proc, the code the URL's page shows)."""
    proc = spawn(path, "--authorize", stdin=subprocess.PIPE)
    url = re.search(r"http://\S+authorize\S+", read_until(proc.stdout, r"authorize\S+")).group(0)
    return proc, re.search(r"<b id='code'>(\d{6})</b>", urllib.request.urlopen(url).read().decode()).group(1)


def authorize_refusing(fake, tmp_path, then):
    """--authorize answered first with a code SmugMug refuses, then `then`, then the right code:
    (its exit code, its stderr, the config's path)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"app_key": fake.app_key, "app_key_secret": fake.app_secret,
                                "output_dir": str(tmp_path / "out"), "api_base": fake.base}))
    proc, code = authorize_started(path)
    wrong = "%06d" % ((int(code) + 1) % 1000000)
    _, err = proc.communicate(("%s\n%s\n%s\n" % (wrong, then, code)).encode(), timeout=30)
    return proc.returncode, err.decode(), path


def first_line(err):
    """The summary's first line in a run's stderr."""
    return [line for line in err.splitlines() if re.match(r"(Done|Stopped|Interrupted) after ", line)][-1]


# Finding 7: an emptied album ################################################

def test_an_emptied_album_counts_as_backed_up_not_as_not_attempted(fake, run):
    """An album whose photos were all deleted on SmugMug keeps its files and is counted (as
    backed up: its backup says what SmugMug has), never "not attempted"; the dry run before
    says its files are kept (none to versions); the next run finds it unchanged."""
    key = fake.add_album("Emptied", sizes=(3000, 3000))
    fake.add_album("Other", sizes=(2000,))
    assert run()[0] == 0
    before = tree(run.out)
    fake.albums[key].images = []
    fake.albums[key].part_sizes = []
    fake.albums[key].image_count = 0
    fake.touch(key)
    code, out, _ = run("--dry-run")
    assert "changed   Emptied (empty on SmugMug now: its 2 files are kept)" in out.splitlines(), out
    code, _, err = run()
    assert code == 0, err
    assert tree(run.out) == before
    assert first_line(err).endswith(": 1 album backed up, 1 unchanged, 0 failed, 0 not attempted."), err
    assert "1 album empty on SmugMug now (local files kept): Emptied" in err
    code, _, err = run()
    assert first_line(err).endswith(": 0 albums backed up, 2 unchanged, 0 failed, 0 not attempted."), err


# Finding 8: a rename that only changes case #################################

def test_a_case_only_rename_on_a_case_insensitive_view_downloads_nothing(fake, run):
    """A rename that only changes case (`beach day` -> `Beach Day`) on a disk where both
    spellings are one folder (as on macOS and Windows: here a second name for the same folder,
    a symbolic link, since Linux disks tell case apart): every file "exists" at its new path,
    as the same file. Nothing is in the way, nothing is marked damaged, nothing is downloaded
    again; the bytes stay; the state names the new path."""
    key = fake.add_album("beach day", sizes=(3000, 4000))
    assert run()[0] == 0
    before = tree(run.out)
    fake.rename(fake.albums[key].node_id, "Beach Day")
    os.symlink("beach day", run.out / "Beach Day")          # the case-insensitive view of the folder
    posts, sent = len(fake.calls("post")), fake.download_bytes
    code, _, err = run()
    assert code == 0, err
    assert "in the way" not in err and "moved beach day -> Beach Day" in err, err
    assert len(fake.calls("post")) == posts and fake.download_bytes == sent, err
    assert first_line(err).endswith(": 0 albums backed up, 1 unchanged, 0 failed, 0 not attempted."), err
    assert tree(run.out / "beach day") == {k.split("/", 1)[1]: v for k, v in before.items()}
    record = json.loads((run.out / sd.STATE_DIR / sd.STATE_FILE).read_text())["albums"][key]
    assert record["path"] == "Beach Day" and not record.get("damaged"), record
    code, out, _ = run("--verify")
    assert code == 0 and out == ""


def test_the_move_step_leaves_a_file_already_at_its_new_path(tmp_path):
    """Store.move_album: a destination that is the source itself under another spelling is no
    file in the way (the record marks nothing damaged, the file is not moved aside); a real
    other file in the way still is."""
    state = sd.BackupState(str(tmp_path))
    state.load()
    store = sd.Store(str(tmp_path), sd.run_stamp(), state)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "a.zip").write_bytes(b"a" * 10)
    (tmp_path / "old" / "b.zip").write_bytes(b"b" * 10)
    (tmp_path / "NEW").mkdir()
    os.symlink(os.path.join("..", "old", "a.zip"), tmp_path / "NEW" / "a.zip")     # the same file
    (tmp_path / "NEW" / "b.zip").write_bytes(b"other")                                # another file
    record = sd.AlbumRecord("K", "N", "old", "", "", [sd.SavedFile("a.zip", 10, "archive"),
                                                      sd.SavedFile("b.zip", 10, "archive")], None)
    moved = store.move_album(record, "NEW")
    state.close()
    assert moved.damaged == ["b.zip"]
    assert (tmp_path / "old" / "a.zip").read_bytes() == b"a" * 10
    assert (tmp_path / "NEW" / "b.zip").read_bytes() == b"other"


def case_insensitive(folder):
    probe = os.path.join(folder, "CaseProbe")
    open(probe, "w").close()
    try:
        return os.path.exists(os.path.join(folder, "caseprobe"))
    finally:
        os.remove(probe)


def test_a_case_only_rename_renames_the_folder_and_downloads_nothing(fake, run):
    """The same rename on this machine's disk: the folder takes the new spelling (on a
    case-insensitive disk through a temporary name), its bytes unchanged, nothing downloaded,
    and the next run finds the album unchanged."""
    key = fake.add_album("beach day", sizes=(3000, 4000))
    assert run()[0] == 0
    before = tree(run.out)
    fake.rename(fake.albums[key].node_id, "Beach Day")
    posts, sent = len(fake.calls("post")), fake.download_bytes
    code, _, err = run()
    assert code == 0, err
    assert len(fake.calls("post")) == posts and fake.download_bytes == sent, err
    assert sorted(os.listdir(run.out)) == sorted([sd.STATE_DIR, "Beach Day", "index.csv"])
    assert tree(run.out) == {k.replace("beach day/", "Beach Day/"): v for k, v in before.items()}
    code, _, err = run()
    assert first_line(err).endswith(": 0 albums backed up, 1 unchanged, 0 failed, 0 not attempted."), err


@pytest.mark.skipif(not case_insensitive(tempfile.gettempdir()), reason="this disk tells case apart")
def test_on_a_case_insensitive_disk_the_folder_takes_the_new_spelling(fake, run):
    """On a case-insensitive disk (macOS, Windows) the folder is listed with its new spelling."""
    key = fake.add_album("beach day", sizes=(3000,))
    assert run()[0] == 0
    fake.rename(fake.albums[key].node_id, "Beach Day")
    sent = fake.download_bytes
    assert run()[0] == 0 and fake.download_bytes == sent
    assert "Beach Day" in os.listdir(run.out) and "beach day" not in os.listdir(run.out)


# Finding 10: names the output cannot encode #################################

def test_names_the_output_cannot_encode_are_escaped_never_fatal(fake, tmp_path):
    """A non-ASCII album name with an output that cannot encode it (PYTHONIOENCODING=ascii,
    LC_ALL=C): the dry run and the backup print it escaped (Caf\\xe9) and succeed; in a forced
    C locale (UTF-8 mode off, so Python would name files in ASCII) the backup still writes the
    folder, named in UTF-8 as in any other locale."""
    key = fake.add_album("Café", sizes=(3000,))
    for n, env in enumerate(({"PYTHONIOENCODING": "ascii", "LC_ALL": "C"},
                             {"PYTHONUTF8": "0", "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0"})):
        out = tmp_path / ("out%d" % n)
        config = write_config(tmp_path / "config.json", fake.config(out))
        for args in (["--dry-run"], []) if n == 0 else ([],):
            proc = spawn(config, *args, env=env)
            stdout, stderr = proc.communicate(timeout=60)
            stdout, stderr = stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace")
            assert proc.returncode == 0, stderr
            assert "internal error" not in stderr and "Traceback" not in stderr and "Logging error" not in stderr
            if args:
                assert re.search(r"^(new|unchanged) +Caf(\\xe9|é)$", stdout, re.MULTILINE), stdout
        assert tree(out) == {"Café/%s.zip" % key: fake.expected_parts(key)["%s.zip" % key]}


# What a person hits first ###################################################

def test_keys_beginning_with_an_underscore_are_comments(fake, tmp_path, capsys):
    """"_comment" (and any key beginning with _) is accepted, never an unknown key, and kept
    when --authorize rewrites the config; a mistyped real key is still an error; the example
    config carries one, and passes once its placeholders are filled in."""
    path = tmp_path / "config.json"
    data = dict(fake.config(tmp_path / "out"), _comment="my backup, see README", _workers_was=8)
    write_config(path, data)
    assert sd.main(["--config", str(path)]) == 0, capsys.readouterr().err
    assert sd.main(["--config", str(path), "--dry-run"]) == 0
    write_config(path, dict(data, worker=8))
    assert sd.main(["--config", str(path)]) == sd.EXIT_USAGE
    assert "unknown key 'worker'" in capsys.readouterr().err
    with open(os.path.join(ROOT, "config.example.json"), encoding="utf-8") as f:
        example = json.load(f)
    assert any(k.startswith("_") for k in example)
    sd.validate_config(dict(example, app_key="k1", app_key_secret="s1", access_key="a1", access_key_secret="b1"),
                       str(path))
    original = {"_comment": "kept", "app_key": fake.app_key, "app_key_secret": fake.app_secret,
                "output_dir": str(tmp_path / "out"), "api_base": fake.base}
    path.write_text(json.dumps(original))
    proc, code = authorize_started(path)
    _, err = proc.communicate((code + "\n").encode(), timeout=30)
    assert proc.returncode == 0, err
    saved = json.loads(path.read_text())
    assert saved["_comment"] == "kept" and saved["access_key"] in fake.tokens


def test_a_mistyped_authorization_code_is_asked_for_again(fake, tmp_path):
    """A wrong code (refused by SmugMug) and a malformed one are each asked for again with the
    reason; the right code then completes the same flow (the same URL): exit 0, token saved."""
    returncode, err, path = authorize_refusing(fake, tmp_path, "12 34")
    assert returncode == 0, err
    assert "did not accept the code" in err and "six digits" in err and "Error" not in err, err
    assert json.loads(path.read_text())["access_key"] in fake.tokens


def unreachable_config(tmp_path, **extra):
    return write_config(tmp_path / "config.json", {
        "app_key": "key", "app_key_secret": "secret", "access_key": "token", "access_key_secret": "token-secret",
        "output_dir": str(tmp_path / "out"), "api_base": "http://127.0.0.1:%d" % closed_port(),
        "unreachable_minutes": 0.01, **extra})


def test_a_run_that_never_reached_smugmug_says_its_cause_once(tmp_path):
    """SmugMug never answers (a closed port): the cause (connection refused) is named once,
    in at most two lines (the wait, when it starts, with the time the run gives up; then one
    line saying nothing was backed up); no counters of a run that never started; exit 1. With
    --quiet (cron) the one line that is printed names the cause. A dry run says the same."""
    config = unreachable_config(tmp_path)
    for args in ((), ("--dry-run",), ("--quiet",)):
        proc = spawn(config, *args)
        out, err = proc.communicate(timeout=60)
        out, err = out.decode(), err.decode()
        assert proc.returncode == sd.EXIT_ALBUMS_FAILED, err
        lines = err.splitlines()
        assert sum("connection refused" in line for line in lines) == 1, err
        assert len(lines) == (1 if args == ("--quiet",) else 2) and out == "", err
        assert re.fullmatch(r"Stopped after \d+ s, before reaching the account: nothing was backed up( \(SmugMug "
                            r"unreachable since [\d:]+: connection refused by 127\.0\.0\.1:\d+\))?\.", lines[-1]), err
        if args != ("--quiet",):
            assert re.fullmatch(r"SmugMug unreachable since \d\d:\d\d, giving up at \d\d:\d\d \(connection "
                                r"refused by 127\.0\.0\.1:\d+\)", lines[0]), err
        for counter in ("checked against", "not attempted", "Waited", "total:", "giving up:"):
            assert counter not in err + out


def test_the_status_line_in_an_outage_shows_the_wait_and_when_it_gives_up(tmp_path):
    """On a terminal while SmugMug does not answer, the live line shows the wait and the time
    the run gives up (never just "0 of 0 albums"), within the width; the cause too where the
    terminal is wide enough (120 columns), dropped first at 80."""
    for columns, cause in ((80, ""), (120, r" \| connection refused by 127\.0\.0\.1:\d+")):
        proc, master = on_a_terminal(unreachable_config(tmp_path), columns=columns)
        shown = read_pty(proc, master)
        assert proc.returncode == sd.EXIT_ALBUMS_FAILED, shown
        drawn = status_lines(shown)
        assert drawn and all(re.fullmatch(r"SmugMug unreachable since \d\d:\d\d, giving up at \d\d:\d\d" + cause, d)
                             for d in drawn), drawn
        assert max(len(d) for d in drawn) < columns and "0 of 0 albums" not in shown


def test_the_summary_counts_parts_and_files_on_their_own_apart(fake, run):
    """Parts and files fetched on their own are counted apart, each with its own bytes: a video
    the zip lacks is "1 fetched on its own (its size)", never a part, and the parts' bytes leave
    it out; a run that fetches only that video again says no part was downloaded. The album's
    line says "1 file on its own"."""
    fake.zip_omit_videos = True
    key = fake.add_album("Holiday", images=[{"file_name": "a.jpg", "size": 5000},
                                            {"file_name": "clip.mov", "size": 9000, "is_video": True}])
    code, _, err = run()
    assert code == 0, err
    part = len(fake.expected_parts(key)["%s.zip" % key])
    video = len(tree(run.out)["Holiday/clip.mov"])
    assert "(new, 1 part, 1 file on its own, %s)" % sd.human_bytes(part + video) in err, err
    assert ("1 part (%s) downloaded, 2 files checked against SmugMug's listing, 1 fetched on its own (%s), "
            "0 moved to versions." % (sd.human_bytes(part), sd.human_bytes(video))) in err.splitlines(), err
    os.remove(run.out / "Holiday" / "clip.mov")
    code, _, err = run()
    assert code == 0, err
    assert ("2 files checked against SmugMug's listing, 1 fetched on its own (%s), 0 moved to versions."
            % sd.human_bytes(video)) in err.splitlines(), err
    assert "downloaded" not in err


def test_the_dry_run_says_at_most_what_the_run_then_moves_to_versions(sample, run):
    """A changed album whose photos are the same (a caption changed) moves only its manifest to
    versions, and the dry run, which lists its files, says so; one whose photos all changed takes
    an archive and moves them all: the dry run says "up to N old files to versions", and the run
    then moves exactly N."""
    import fake_smugmug
    assert run()[0] == 0
    big = sample.keys["big"]
    for change, moved in (("caption", 1), ("touch", 4)):
        if change == "caption":
            sample.albums[big].last_updated = fake_smugmug.now_plus_one()
        else:
            sample.touch(big)
        code, out, _ = run("--dry-run")         # its files listed: what it fetches, or an archive
        line = [l for l in out.splitlines() if l.startswith("changed   Family/Big Trip (")]
        assert line == ["changed   Family/Big Trip (files listed: 0 files to fetch on its own, no archive; "
                        "1 old file to versions)"] if change == "caption" else \
            line[0].startswith("changed   Family/Big Trip (files listed: a fresh archive") and \
            line[0].endswith("; up to 4 old files to versions)"), out
        code, _, err = run()
        assert code == 0 and "(changed, 3 parts, 0 files on their own, " in err, err
        assert ", %d to versions)" % moved in err and "%d moved to versions." % moved in err, err


def test_a_long_outage_names_its_cause_once_not_once_a_minute(tmp_path, capsys, monkeypatch):
    """The wait is logged when it starts and then at every WAIT_LOG_INTERVAL (here 0.2 s): the
    repeats say the run is still waiting and when it gives up, without the cause again."""
    monkeypatch.setattr(sd, "WAIT_LOG_INTERVAL", 0.2)
    config = unreachable_config(tmp_path, unreachable_minutes=0.03)
    assert sd.main(["--config", config]) == sd.EXIT_ALBUMS_FAILED
    lines = capsys.readouterr().err.splitlines()
    still = [line for line in lines if re.fullmatch(r"SmugMug still unreachable since \d\d:\d\d, giving up at "
                                                    r"\d\d:\d\d", line)]
    assert len(still) >= 3 and sum("connection refused" in line for line in lines) == 1, lines
