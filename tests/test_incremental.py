"""Incremental, resumable, cron-safe: reruns, changes, resume, the lock, bad state."""

import json
import os
import re
import time

import smugmug_download as sd
from conftest import SAMPLE_PATHS, sample_expected, spawn, tree, wait_for, write_config


def archive_bytes(fake, since=0):
    return sum(1 for _ in fake.calls("archive")[since:]), fake.download_bytes


def test_unchanged_rerun_costs_only_the_walk(sample, run):
    """A rerun with nothing changed makes no POST, no archive GET, downloads nothing."""
    assert run()[0] == 0
    calls_before = len(sample.log)
    bytes_before = sample.download_bytes
    code, _, err = run()
    assert code == 0, err
    new = sample.log[calls_before:]
    assert [e for e in new if e["kind"] != "walk"] == []
    assert sample.download_bytes == bytes_before
    assert "15 unchanged" in err
    assert tree(run.out) == sample_expected(sample)


def test_changes_touch_add_delete_rename(sample, run):
    """Touched and new albums get archives; a deleted album's files stay and it is listed as
    gone; a renamed album's folder is moved, not downloaded again."""
    assert run()[0] == 0
    keys = sample.keys
    first = tree(run.out)
    sample.touch(keys["bbq"])
    sample.touch(keys["travel3"])
    new_key = sample.add_album("Brand New", sample.nodes[sample.albums[keys["xmas"]].node_id].parent, days=99)
    sample.remove_node(sample.albums[keys["travel5"]].node_id)
    sample.rename(sample.albums[keys["travel7"]].node_id, "Trip 07 renamed")
    posts_before = len(sample.calls("post"))
    code, _, err = run()
    assert code == 0, err
    posted = {e["path"].split("/")[-1].split("!")[0] for e in sample.calls("post")[posts_before:]}
    assert posted == {keys["bbq"], keys["travel3"], new_key}
    got = tree(run.out)
    for name in ("bbq", "travel3"):
        for fname, data in sample.expected_parts(keys[name]).items():
            assert got[SAMPLE_PATHS[name] + "/" + fname] == data
    for fname, data in sample.expected_parts(new_key).items():
        assert got["Family/2019/Brand New/" + fname] == data
    gone = "Travel/Trip 05/%s.zip" % keys["travel5"]
    assert got[gone] == first[gone]
    assert "gone from SmugMug (local files kept)" in err and "Travel/Trip 05" in err
    moved = "Travel/Trip 07 renamed/%s.zip" % keys["travel7"]
    assert got[moved] == first["Travel/Trip 07/%s.zip" % keys["travel7"]]
    assert "Travel/Trip 07/%s.zip" % keys["travel7"] not in got
    assert "moved Travel/Trip 07 -> Travel/Trip 07 renamed" in err
    # and the next run is quiet again
    posts_before = len(sample.calls("post"))
    assert run()[0] == 0
    assert len(sample.calls("post")) == posts_before


def test_changed_album_moves_obsolete_parts_to_versions(fake, run):
    """When a changed album's new archive has fewer parts, the old parts leave the album's folder
    for versions/<run start>/ (byte for byte: nothing a run saved is deleted); a file of the
    user's own in the folder stays."""
    key = fake.add_album("Shrinks", sizes=(1000, 1000, 1000))
    assert run()[0] == 0
    assert len(os.listdir(run.out / "Shrinks")) == 3 + 1        # and its metadata.json
    with open(run.out / "Shrinks" / "keep-me.txt", "w") as f:
        f.write("user file")
    fake.albums[key].part_sizes = [1500]
    fake.touch(key)
    assert run()[0] == 0
    assert sorted(os.listdir(run.out / "Shrinks")) == sorted(["%s.zip" % key, "keep-me.txt", sd.MANIFEST_NAME])
    assert tree(run.out)["Shrinks/%s.zip" % key] == fake.expected_parts(key)["%s.zip" % key]
    versions = run.out / sd.STATE_DIR / sd.VERSIONS_DIR
    (stamp,) = os.listdir(versions)
    assert sorted(os.listdir(versions / stamp / "Shrinks")) == sorted(["%s-%d.zip" % (key, i) for i in (1, 2, 3)]
                                                                    + [sd.MANIFEST_NAME])


def test_killed_download_resumes_with_range(fake, tmp_path):
    """A run killed mid-download leaves NAME.part; the next run resumes it with Range and
    transfers fewer bytes than the whole part."""
    size = 600_000
    key = fake.add_album("Large", sizes=(size,))
    fake.bandwidth = 300_000
    out = tmp_path / "backup"
    config = write_config(tmp_path / "config.json", fake.config(out))
    proc = spawn(config)
    partial = out / "Large" / ("%s.zip.part" % key)
    assert wait_for(lambda: partial.exists() and partial.stat().st_size >= 150_000)
    proc.kill()
    proc.wait()
    assert not (out / "Large" / ("%s.zip" % key)).exists()
    have = partial.stat().st_size
    fake.bandwidth = None
    sent_before = fake.download_bytes
    calls_before = len(fake.calls("archive"))
    proc = spawn(config)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    resumed = fake.calls("archive")[calls_before:]
    assert resumed[0]["status"] == 206 and resumed[0]["query"]["range"] == "bytes=%d-" % have
    assert fake.download_bytes - sent_before < size
    assert tree(out)["Large/%s.zip" % key] == fake.expected_parts(key)["%s.zip" % key]


def test_resume_of_a_different_archive_restarts(fake, run):
    """A NAME.part left from another archive is never resumed into: it is restarted from zero."""
    key = fake.add_album("Album", sizes=(5000,))
    os.makedirs(run.out / "Album")
    with open(run.out / "Album" / ("%s.zip.part" % key), "wb") as f:
        f.write(b"stale bytes from some other archive")
    code, _, err = run()
    assert code == 0, err
    assert [e["query"]["range"] for e in fake.calls("archive")] == [None]
    assert tree(run.out)["Album/%s.zip" % key] == fake.expected_parts(key)["%s.zip" % key]


def test_server_without_range_and_wrong_offset(fake, run):
    """Resume falls back to a full download on 200; a 206 at the wrong offset restarts the part."""
    key = fake.add_album("Cut", sizes=(200_000,))
    fake.cut_after, fake.cut_times = 50_000, 1
    fake.wrong_offset_once = True
    code, _, err = run()
    assert code == 0, err
    assert tree(run.out)["Cut/%s.zip" % key] == fake.expected_parts(key)["%s.zip" % key]
    fake.touch(key)
    fake.honor_range = False
    fake._download_attempts.clear()
    code, _, err = run()
    assert code == 0, err
    assert tree(run.out)["Cut/%s.zip" % key] == fake.expected_parts(key)["%s.zip" % key]


def test_sigkill_at_any_moment_then_rerun_is_complete(sample, tmp_path):
    """Killed with SIGKILL at several moments, then run again: complete, byte-identical tree, and
    no file at its final name is ever incomplete. Each kill waits for its moment (not a time, which
    a slow machine reaches before any download): mid-download of a part, just after an album is
    committed, and when a few more albums are done."""
    sample.bandwidth = 20_000          # a 3 KB part takes ~150 ms: each moment is met mid-run
    sample.prep_seconds = 0.05
    out = tmp_path / "backup"
    config = write_config(tmp_path / "config.json", sample.config(out))
    expected = sample_expected(sample)

    def saved():
        return sum(1 for p in tree(out) if not p.endswith(".part"))

    def downloading():
        return any(p.endswith(".zip.part") and data for p, data in tree(out).items())

    for moment in ("a part half downloaded", "one more album", "three more albums"):
        start = saved()
        event = {"a part half downloaded": downloading,
                 "one more album": lambda: saved() > start,
                 "three more albums": lambda: saved() >= start + 3}[moment]
        proc = spawn(config)
        try:
            assert wait_for(event, timeout=60), moment
        finally:
            proc.kill()
            proc.wait()
        for path, data in tree(out, manifests=True).items():
            if path.endswith("/metadata.json"):
                assert json.loads(data)["album"], path
            elif not path.endswith(".part"):
                assert data == expected[path], path
    sample.bandwidth = None
    proc = spawn(config)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert tree(out) == expected


def test_second_concurrent_run_exits_3(sample, tmp_path, capsys):
    """While a run holds output_dir, a second one exits 3 at once naming the pid; the first is unaffected."""
    sample.prep_seconds = 1.0
    out = tmp_path / "backup"
    config = write_config(tmp_path / "config.json", sample.config(out))
    proc = spawn(config)
    lock = out / sd.LOCK_FILE
    assert wait_for(lambda: lock.exists() and lock.read_text().strip() == str(proc.pid))
    started = time.monotonic()
    code = sd.main(["--config", config])
    err = capsys.readouterr().err
    assert code == sd.EXIT_LOCKED
    assert time.monotonic() - started < 2
    assert "pid %d" % proc.pid in err and err.count("\n") == 1
    assert proc.wait(timeout=60) == 0
    assert tree(out) == sample_expected(sample)


def test_corrupt_state_is_survived_and_kept(sample, run):
    """An unreadable state file: a warning, a full check, the file kept aside, exit 0."""
    assert run()[0] == 0
    state = run.out / sd.STATE_DIR / sd.STATE_FILE
    state.write_text("{ this is not json")
    code, _, err = run()
    assert code == 0, err
    assert "unreadable" in err
    kept = [n for n in os.listdir(run.out / sd.STATE_DIR) if n.startswith(sd.STATE_FILE + ".bad-")]
    assert len(kept) == 1
    assert tree(run.out) == sample_expected(sample)
    assert json.loads(state.read_text())["version"] == sd.STATE_VERSION


def test_future_state_version_warns(sample, run):
    """A state file from a newer version is not trusted nor deleted silently."""
    os.makedirs(run.out / sd.STATE_DIR)
    (run.out / sd.STATE_DIR / sd.STATE_FILE).write_text(json.dumps({"version": 99, "albums": {}}))
    code, _, err = run()
    assert code == 0, err
    assert "newer version" in err
    assert any(n.startswith(sd.STATE_FILE + ".bad-") for n in os.listdir(run.out / sd.STATE_DIR))


def test_state_records_albums(sample, run):
    """The state names each album's key, node, path, timestamps and parts with sizes."""
    assert run()[0] == 0
    state = json.loads((run.out / sd.STATE_DIR / sd.STATE_FILE).read_text())
    record = state["albums"][sample.keys["big"]]
    assert record["path"] == "Family/Big Trip"
    assert record["NodeID"] == sample.albums[sample.keys["big"]].node_id
    assert record["LastUpdated"] and record["ImagesLastUpdated"]
    assert sorted((p["name"], p["size"]) for p in record["files"] if p["kind"] == "archive") == sorted(
        (n, len(d)) for n, d in sample.expected_parts(sample.keys["big"]).items())
    assert sorted((p["FileName"], p["size"]) for p in record["parts"]) == sorted(
        (n, len(d)) for n, d in sample.expected_parts(sample.keys["big"]).items())
    assert record["complete"] is True and record["manifest"] > 0


def test_quiet_and_log_file(sample, run, tmp_path):
    """--quiet prints nothing on success, not even a warning (the sample's unknown node type);
    --log-file gets timestamped info lines and that warning anyway."""
    log_file = tmp_path / "backup.log"
    code, out, err = run("--quiet", "--log-file", str(log_file))
    assert code == 0
    assert out == "" and err == ""
    text = log_file.read_text()
    assert "INFO" in text and "backed up Family/Big Trip" in text
    assert "WARNING" in text and "unknown node type 'Widget'" in text
    assert text[:4].isdigit()
    key = sample.keys["bbq"]
    sample.post_forbidden = True                        # saved file by file...
    sample.refuse_originals = {sample.albums[key].images[0].key}   # ... and its one photo refused
    sample.touch(key)
    code, out, err = run("--quiet", "--log-file", str(log_file))
    assert code == 1
    lines = err.strip().splitlines()
    assert re.fullmatch(r"Done after \d+ s: 0 albums backed up, 14 unchanged, 1 failed, 0 not attempted\.",
                        lines[0]), err
    assert lines[1].startswith("  failed: Family/2019/Summer/BBQ: SmugMug no longer gives IMG_0002.jpg, which "
                               "the previous backup has: it is kept as it is") and len(lines) == 2, err
