"""A backup, not a mirror (issue #17): nothing a run once saved is lost by a later run.

Each defect the review reproduced, end to end against the emulator, and the Store's rules
unit-tested on a temporary folder without HTTP."""

import datetime
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import fake_smugmug
import smugmug_download as sd
from conftest import ROOT, expected_tree, manifest, spawn, tree, wait_for, write_config


def versions(out):
    """{path inside the versions folder, without the run stamp: bytes} of every kept version."""
    found = {}
    top = out / sd.STATE_DIR / sd.VERSIONS_DIR
    for root, _dirs, names in os.walk(top):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, top).replace(os.sep, "/")
            with open(full, "rb") as f:
                found[rel.split("/", 1)[1]] = f.read()
    return found


def every_byte(out):
    """All the bytes under out (album files, manifests and versions), as a multiset of files
    (index.csv, derived from the manifests and rewritten by every run, left out)."""
    files = []
    for root, dirs, names in os.walk(out):
        for name in names:
            if name not in (sd.STATE_FILE, sd.JOURNAL_FILE, sd.LOCK_FILE, sd.INDEX_NAME):
                with open(os.path.join(root, name), "rb") as f:
                    files.append(f.read())
    return files


def state_of(out):
    with open(out / sd.STATE_DIR / sd.STATE_FILE, encoding="utf-8") as f:
        return json.load(f)


def changed(fake, key):
    """The album changed on SmugMug (its timestamps move on, by a second at least), its files as
    they are now."""
    album = fake.albums[key]
    later = max(fake_smugmug.now_plus_one(), album.last_updated + datetime.timedelta(seconds=1))
    album.last_updated = album.images_last_updated = later


def final(files):
    """The files at their final names (a NAME.part kept for the next run left out)."""
    return {k: v for k, v in files.items() if not k.endswith(".part")}


# Versions ###################################################################

def test_photos_deleted_on_smugmug_stay_in_versions(fake, run):
    """Defect 1: an album backed up with a, b and c; b and c deleted on SmugMug. The next run's
    zip holds a only, and the old zip (the only copy of b and c) is moved to versions, byte for
    byte, recorded in the state, and counted in the summary."""
    key = fake.add_album("Trip", images=[{"file_name": n, "size": 3000 + i} for i, n in
                                         enumerate(("a.jpg", "b.jpg", "c.jpg"))])
    assert run()[0] == 0
    first = tree(run.out, manifests=True)
    album = fake.albums[key]
    album.images = album.images[:1]
    changed(fake, key)
    code, _, err = run()
    assert code == 0, err
    zip_name = "Trip/%s.zip" % key
    assert tree(run.out)[zip_name] == fake.expected_parts(key)["%s.zip" % key]
    kept = versions(run.out)
    assert kept[zip_name] == first[zip_name] and kept["Trip/metadata.json"] == first["Trip/metadata.json"]
    assert "2 moved to versions" in err
    recorded = state_of(run.out)["versions"]
    assert sorted(v[0] for v in recorded) == [zip_name, "Trip/metadata.json"]
    assert all(v[1].startswith("%s/%s/" % (sd.STATE_DIR, sd.VERSIONS_DIR)) for v in recorded)


def test_a_change_in_the_same_second_as_the_last_is_seen_by_its_image_count(fake, run):
    """SmugMug's timestamps have whole seconds: a photo deleted in the second the album last
    changed leaves them as they were. The album's ImageCount moved, so the next run lists the
    album again instead of calling it unchanged: the manifest says the photo is gone from
    SmugMug (still held in the zip, which stays), the old manifest goes to versions."""
    key = fake.add_album("Quick", images=[{"file_name": n, "size": 3000 + i} for i, n in
                                          enumerate(("a.jpg", "b.jpg", "c.jpg"))])
    assert run()[0] == 0
    first = tree(run.out)
    fake.albums[key].images = fake.albums[key].images[:2]          # the timestamps stay
    code, _, err = run()
    assert code == 0, err
    zip_name = "Quick/%s.zip" % key
    assert tree(run.out)[zip_name] == first[zip_name]
    doc = manifest(run.out / "Quick")
    assert [f["FileName"] for f in doc["files"]] == ["a.jpg", "b.jpg"]
    assert [(f["FileName"], f["status"]) for f in doc["former"]] == [("c.jpg", "deleted on SmugMug")]
    assert "Quick/" + sd.MANIFEST_NAME in versions(run.out)
    calls = len(fake.log)
    assert run()[0] == 0 and all(e["kind"] == "walk" for e in fake.log[calls:])   # then unchanged again


def noted_requests(out):
    """The albums whose request the state (snapshot and journal) notes, read as a next run would."""
    return sd.BackupState(out, read_only=True).load(warn=False).requested


def test_an_archive_asked_for_after_such_a_change_by_a_stopped_run_is_reused(fake, run):
    """The same-second change again, but the run that asks for the new archive is stopped
    (Ctrl-C) while SmugMug prepares it: the next run takes that archive (no new request), never
    the old one the previous backup came from."""
    key = fake.add_album("Quick", images=[{"file_name": n, "size": 3000 + i} for i, n in
                                          enumerate(("a.jpg", "b.jpg", "c.jpg"))])
    assert run()[0] == 0
    fake.albums[key].images = fake.albums[key].images[:2]          # the timestamps stay
    for image in fake.albums[key].images:                          # and new bytes: an archive costs less
        image.seed = "new:" + image.key
    fake.prep_seconds = 1.0
    before = len(fake.calls(method="POST"))
    proc = spawn(run.config())
    assert wait_for(lambda: len(fake.calls(method="POST")) > before)
    assert wait_for(lambda: key in noted_requests(run.out))         # the run has noted its request
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == sd.EXIT_INTERRUPTED
    posts = len(fake.calls(method="POST"))
    code, _, err = run()
    assert code == 0, err
    assert len(fake.calls(method="POST")) == posts                 # the stopped run's archive
    assert tree(run.out)["Quick/%s.zip" % key] == fake.expected_parts(key)["%s.zip" % key]


def test_a_repair_says_only_what_truly_went_to_versions(fake, run):
    """A loose video deleted by hand is fetched again: the album's line and the summary count
    only the files really moved to versions (here its old manifest), never the file that was
    already gone from the disk."""
    fake.zip_omit_videos = True
    fake.add_album("Clips", images=[{"file_name": "a.jpg", "size": 3000},
                                    {"file_name": "v.mp4", "size": 6000, "is_video": True}])
    assert run()[0] == 0
    before = tree(run.out)
    os.remove(run.out / "Clips" / "v.mp4")
    code, _, err = run()
    assert code == 0, err
    assert tree(run.out) == before
    moved = versions(run.out)
    line = [l for l in err.splitlines() if l.startswith("backed up Clips ")]
    assert len(line) == 1, err
    count = int(line[0].split(" to versions)")[0].rsplit(", ", 1)[1]) if " to versions)" in line[0] else 0
    assert count == len(moved) and "%d moved to versions" % len(moved) in err, (moved, err)
    assert "Clips/v.mp4" not in moved


def test_a_repair_of_one_part_versions_none_of_the_parts_it_fetched_again_unchanged(fake, run):
    """Two zip parts of three damaged by hand (one deleted, one with other bytes): most of the
    album is fetched again (one archive), the parts come back, and the part whose new copy is
    byte for byte the same stays where it is instead of filling versions with a duplicate; the
    part that differs goes to versions."""
    fake.add_album("Parts", sizes=(3000, 4000, 5000))
    assert run()[0] == 0
    before = tree(run.out)
    names = sorted(n for n in before if n.startswith("Parts/"))
    assert len(names) == 3
    with open(run.out / names[2], "ab") as f:
        f.write(b"!")                                            # same name, other bytes: kept
    damaged = (run.out / names[2]).read_bytes()
    os.remove(run.out / names[1])
    code, _, err = run()
    assert code == 0, err
    assert tree(run.out) == before
    assert {n: v for n, v in versions(run.out).items() if n.endswith(".zip")} == {names[2]: damaged}


def test_an_emptied_album_that_gets_a_photo_again_keeps_the_old_zip_in_versions(fake, run):
    """Defect 1: an album emptied on SmugMug keeps its files; when it later gets one new photo,
    the new backup replaces them, and the old zip goes to versions, not away."""
    key = fake.add_album("Emptied", sizes=(3000, 3000))
    assert run()[0] == 0
    first = tree(run.out)
    fake.albums[key].images = []
    changed(fake, key)
    assert run()[0] == 0 and tree(run.out) == first
    fake.add_image(key, file_name="new.jpg", size=1234)
    changed(fake, key)
    code, _, err = run()
    assert code == 0, err
    kept = versions(run.out)
    assert {k: v for k, v in kept.items() if k.endswith(".zip")} == first
    assert "moved to versions" in err


def test_versions_are_kept_keep_versions_days_and_removed_after(fake, run):
    """Versions older than keep_versions_days are removed at the end of a complete run (a stopped
    run removes nothing), and the log says how many; 0 removes them all at the end of the run."""
    key = fake.add_album("A", sizes=(2000,))
    assert run()[0] == 0
    old_stamp = sd.run_stamp(time.time() - 100 * 86400)
    stale = run.out / sd.STATE_DIR / sd.VERSIONS_DIR / old_stamp / "A"
    os.makedirs(stale)
    (stale / "old.zip").write_bytes(b"from long ago")
    recent = run.out / sd.STATE_DIR / sd.VERSIONS_DIR / sd.run_stamp(time.time() - 10 * 86400) / "A"
    os.makedirs(recent)
    (recent / "recent.zip").write_bytes(b"from last week")
    fake.touch(key)
    code, _, err = run()
    assert code == 0, err
    assert not stale.exists() and (recent / "recent.zip").exists()
    assert len(os.listdir(run.out / sd.STATE_DIR / sd.VERSIONS_DIR)) == 2     # last week's and this run's
    assert "removed 1 versions folder older than keep_versions_days (90)" in err
    fake.touch(key)
    changed(fake, key)
    code, _, err = run("--keep-versions-days", "0")
    assert code == 0, err
    assert os.listdir(run.out / sd.STATE_DIR / sd.VERSIONS_DIR) == []
    assert "2 moved to versions" in err                 # moved, then removed at the end of the run
    assert "removed 3 versions folders older than keep_versions_days (0)" in err     # earlier runs' too


# Replace only when complete #################################################

def test_a_worse_archive_never_replaces_the_only_copy(fake, run):
    """Defect 2: an album changes (a caption); its new zip lacks clip.mov and SmugMug refuses the
    original (403). The old zip, the only copy of clip.mov, stays where it is, byte for byte,
    with its manifest; the album fails by name, exit 1; nothing went to versions."""
    key = fake.add_album("Holiday", images=[{"file_name": "beach.jpg", "size": 3000},
                                            {"file_name": "clip.mov", "size": 5000, "is_video": True}])
    assert run()[0] == 0
    first = tree(run.out, manifests=True)
    clip = fake.albums[key].images[1]
    fake.touch(key)              # every file has new bytes: a fresh archive costs less than the files
    fake.zip_omit_videos = True
    fake.refuse_originals = {clip.key}
    code, _, err = run()
    assert code == sd.EXIT_ALBUMS_FAILED, err
    assert "failed: Holiday: SmugMug no longer gives clip.mov, which the previous backup has" in err
    assert final(tree(run.out, manifests=True)) == first
    assert versions(run.out) == {}
    record = state_of(run.out)["albums"][key]
    assert record["LastUpdated"] != fake_smugmug.iso(fake.albums[key].last_updated)   # tried again next run


def test_a_file_that_could_not_be_fetched_leaves_the_previous_backup_in_place(fake, run, monkeypatch):
    """Replace only when complete: a file the zip lacks fails every try (not a refusal: the next
    run may get it). The new files do not take their final names, the old ones stay, the album
    fails by name; a later run completes it."""
    monkeypatch.setattr(sd, "BACKOFF_BASE", 0.001)
    key = fake.add_album("V", images=[{"file_name": "a.jpg", "size": 2000},
                                      {"file_name": "v.mp4", "size": 6000, "is_video": True}])
    assert run()[0] == 0
    first = tree(run.out, manifests=True)
    fake.zip_omit_videos = True
    fake.touch(key)
    video = fake.albums[key].images[1]
    fake.wrong_file_once = set()
    real = fake.find_image

    def broken(image_key):                         # the original is served with a wrong MD5, always
        album, image = real(image_key)
        if image is video:
            image = fake_smugmug.dataclasses.replace(image, seed="other bytes")
        return album, image
    fake.find_image = broken
    code, _, err = run()
    assert code == sd.EXIT_ALBUMS_FAILED, err
    assert "failed: V: 1 file could not be fetched (the next run tries again)" in err
    assert final(tree(run.out, manifests=True)) == first
    fake.find_image = real
    assert run()[0] == 0
    assert tree(run.out)["V/v.mp4"] == fake.original_bytes(video.key)


# Never trust a short list ###################################################

def test_a_failing_page_of_the_album_listing_fails_the_album_and_keeps_its_files(fake, run, monkeypatch):
    """Defect 3: !images pages carry no NextPage; a 500 on page 2 (guessed from Pages.Total)
    fails the album by name after the retries: no manifest with 2 of 3 files, nothing deleted or
    versioned, and the state does not say complete (the next run looks again)."""
    monkeypatch.setattr(sd, "BACKOFF_BASE", 0.001)
    key = fake.add_album("Three", images=[{"file_name": "%d.jpg" % i, "size": 2000 + i} for i in range(3)])
    fake.images_max_count = 2
    fake.omit_next_page = True
    assert run()[0] == 0
    first = tree(run.out, manifests=True)
    fake.albums[key].images[2].caption = "edited"
    changed(fake, key)
    fake.fail_pages = {("images", 3): 500}
    code, _, err = run()
    assert code == sd.EXIT_ALBUMS_FAILED, err
    assert "failed: Three: HTTP 500" in err
    assert final(tree(run.out, manifests=True)) == first and versions(run.out) == {}
    fake.fail_pages = {}
    calls = len(fake.calls("images"))
    assert run()[0] == 0                               # looked at again, completed
    assert len(fake.calls("images")) > calls
    assert [f.get("Caption") for f in manifest(run.out / "Three")["files"]] == ["", "", "edited"]


def test_a_listing_shorter_than_its_total_never_replaces_anything(fake, run):
    """Defect 3: the guessed page 2 answers 404 (a listing cut short): a list shorter than its
    Pages.Total is incomplete: the previous backup stays as it is and the album fails by name;
    a new album's files are kept but it is not recorded complete."""
    key = fake.add_album("Three", images=[{"file_name": "%d.jpg" % i, "size": 2000 + i} for i in range(3)])
    fake.images_max_count = 2
    fake.omit_next_page = True
    assert run()[0] == 0
    first = tree(run.out, manifests=True)
    changed(fake, key)
    fake.fail_pages = {("images", 3): 404}
    new = fake.add_album("New", sizes=(1500, 1600, 1700))
    code, _, err = run()
    assert code == sd.EXIT_ALBUMS_FAILED, err
    assert "failed: Three: SmugMug listed 2 of 3 files; the previous backup is kept as it is" in err
    assert {k: v for k, v in final(tree(run.out, manifests=True)).items() if k.startswith("Three/")} == first
    assert "failed: New: 1 file missing: SmugMug listed 2 of 3 files" in err
    assert state_of(run.out)["albums"][new]["complete"] is False


# Errors: one map, a last resort #############################################

@pytest.mark.parametrize("knob", ["cut_api_calls", "bad_gzip_calls"])
def test_a_cut_off_or_garbled_api_answer_is_retried(sample, run, knob):
    """Defect 4: an API answer cut off mid-body (ChunkedEncodingError) or garbled
    (ContentDecodingError), the very first call included, is retried: exit 0, no traceback."""
    setattr(sample, knob, {1, 5, 9})
    code, _, err = run()
    assert code == 0, err
    assert "Traceback" not in err


def test_a_log_file_on_a_full_disk_is_one_line(sample, run):
    """Defect 5: --log-file /dev/full: one line on stderr says the log cannot be written, the
    log is dropped for the run, the backup goes on to exit 0: no "Logging error" tracebacks."""
    code, _, err = run("--quiet", "--log-file", "/dev/full")
    assert code == 0, err
    assert err.count("\n") == 1 and err.startswith("Warning: cannot write to the log file /dev/full")
    assert "Logging error" not in err and "Traceback" not in err


def test_a_signed_link_echoed_as_a_bare_path_is_redacted(fake, run, tmp_path):
    """Defect 6: a refusal whose body echoes the signed link as a bare path (no host) puts its
    signature nowhere: not on stderr, not in the log, not in metadata.json nor the state."""
    fake.file_url_signature = "SiGnAtUrE-7c1f0e"
    fake.echo_bare_path = True
    fake.zip_omit_videos = True
    key = fake.add_album("Refused", images=[{"file_name": "a.jpg", "size": 1000},
                                            {"file_name": "v.mp4", "size": 3000, "is_video": True}])
    fake.refuse_originals = {fake.albums[key].images[1].key}
    log = tmp_path / "log.txt"
    code, out, err = run("--verbose", "--log-file", str(log))
    assert code == sd.EXIT_ALBUMS_FAILED
    assert "refused by SmugMug" in err
    for text in (out, err, log.read_text(), (run.out / "Refused" / sd.MANIFEST_NAME).read_text(),
                 (run.out / sd.STATE_DIR / sd.STATE_FILE).read_text()):
        assert fake.file_url_signature not in text and "Expires=1900000000" not in text


def test_redaction_knows_signed_queries_in_any_form():
    """Defect 6: a query whose key looks like a signature, an expiry or a token is removed with or
    without the host; other queries on bare paths stay readable."""
    assert sd.redact_urls("GET https://photos.invalid/a.zip?x=1 failed") == "GET https://photos.invalid/a.zip?... failed"
    assert sd.redact_urls("no: /original/K/N.jpg?Expires=1900000000&Signature=abc") == "no: /original/K/N.jpg?..."
    assert sd.redact_urls("see /api/v2/node/x!children?count=10&start=11") == \
        "see /api/v2/node/x!children?count=10&start=11"
    assert sd.redact_urls("Signature=abc&Key-Pair-Id=APKA") == "Signature=...&Key-Pair-Id=..."
    assert "zzz" not in sd.redact_urls("x?oauth_signature=zzz&oauth_nonce=1")


def test_one_bad_path_fails_only_its_album(fake, run):
    """Defect 10: a file where an album's folder must go fails that album by name (saying a file
    is in the way, named); every other album is backed up; exit 1, no traceback."""
    fine = fake.add_album("Fine", sizes=(2000,))
    fake.add_album("Blocked", sizes=(2000,))
    os.makedirs(run.out)
    (run.out / "Blocked").write_bytes(b"a file in the way")
    code, _, err = run()
    assert code == sd.EXIT_ALBUMS_FAILED, err
    assert "failed: Blocked: a file is in the way: %s is where a folder must go" % (run.out / "Blocked") in err
    assert "Traceback" not in err and "Stopped" not in err
    assert tree(run.out)["Fine/%s.zip" % fine] == fake.expected_parts(fine)["%s.zip" % fine]


# Moves ######################################################################

def test_a_move_fsyncs_both_folders_before_the_state_says_so(fake, run, monkeypatch):
    """Defect 7: a renamed album's files are moved after the move is journalled, and both
    folders are fsynced before the record of the album at its new path is written."""
    key = fake.add_album("X", sizes=(3000,))
    assert run()[0] == 0
    fake.rename(fake.albums[key].node_id, "Y")
    events = []
    real_fsync, real_rename, real_record = os.fsync, os.rename, sd.BackupState.record

    def fsync(fd):
        events.append(("fsync", os.readlink("/proc/self/fd/%d" % fd)))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(src), str(dst)))
        return real_rename(src, dst)

    def record(state, entry):
        events.append(("journal", json.dumps(entry)[:200]))
        return real_record(state, entry)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(sd.BackupState, "record", record)
    code, _, err = run()
    assert code == 0, err
    renames = [i for i, e in enumerate(events) if e[0] == "rename" and "/X/" in e[1] and "/Y/" in e[2]]
    intent = [i for i, e in enumerate(events) if e[0] == "journal" and '"intent"' in e[1] and '"move"' in e[1]]
    done = [i for i, e in enumerate(events) if e[0] == "journal" and '"done"' in e[1] and '"Y"' in e[1]]
    assert renames and intent and done and intent[0] < renames[0] < done[0]
    synced = {e[1] for e in events[renames[-1]:done[0]] if e[0] == "fsync"}
    assert str(run.out / "X") in synced and str(run.out / "Y") in synced


CRASH_AFTER_FIRST_MOVE = """
import os, sys
sys.path.insert(0, %r)
import smugmug_download as sd
real = os.rename
def rename(src, dst):
    real(src, dst)
    if "/X/" in str(src):
        os._exit(9)          # the power goes: the move half done
os.rename = rename
sys.exit(sd.main(sys.argv[1:]))
"""


def test_a_move_cut_short_by_a_crash_is_finished_by_the_next_start(fake, tmp_path):
    """Defect 7: the process dies after the first file of a move: the next run finishes the
    move from the journal, so the files are all at the new path and the state points there,
    nothing left unowned in the old folder, and nothing is downloaded again."""
    key = fake.add_album("X", sizes=(3000, 3100))
    out = tmp_path / "backup"
    config = write_config(tmp_path / "config.json", fake.config(out))
    assert sd.main(["--config", config, "--quiet"]) == 0
    fake.rename(fake.albums[key].node_id, "Y")
    proc = subprocess.run([sys.executable, "-c", CRASH_AFTER_FIRST_MOVE % ROOT, "--config", config, "--quiet"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    assert os.path.exists(out / "X") and os.path.exists(out / "Y")     # half moved
    downloads = len(fake.calls("archive"))
    assert sd.main(["--config", config, "--quiet"]) == 0
    assert not (out / "X").exists()
    assert tree(out) == expected_tree(fake, {key: "Y"})
    assert state_of(out)["albums"][key]["path"] == "Y"
    assert len(fake.calls("archive")) == downloads


# The rolling recheck ########################################################

def test_a_caption_edit_reaches_the_backup_by_the_rolling_recheck(fake, run):
    """Defect 9: an edit that does not move the album's timestamps (a caption) is seen when the
    album's rolling recheck comes due (its files last listed more than recheck_days ago): one
    listing, the new manifest, the old one in versions, no archive asked for, no zip read
    again. A rerun the same day asks nothing per album; recheck_days 0 never rechecks."""
    key = fake.add_album("Quiet", images=[{"file_name": "a.jpg", "size": 2000, "caption": "old"}])
    assert run()[0] == 0
    fake.albums[key].images[0].caption = "new words"
    path = run.out / sd.STATE_DIR / sd.STATE_FILE
    for days, due in ((0, False), (31, True)):
        state = json.loads(path.read_text())
        state["albums"][key]["Listed"] = sd.iso_now(time.time() - days * 86400)
        path.write_text(json.dumps(state))
        before = len(fake.log)
        code, _, err = run(recheck_days=0) if not due else run()
        assert code == 0, err
        per_album = [e["kind"] for e in fake.log[before:] if e["kind"] != "walk"]
        assert per_album == (["images"] if due else [])
    assert manifest(run.out / "Quiet")["files"][0]["Caption"] == "new words"
    assert json.loads(versions(run.out)["Quiet/metadata.json"])["files"][0]["Caption"] == "old"
    assert not fake.calls("post", "POST")[1:] and len(fake.calls("archive")) == 1
    before = len(fake.log)
    assert run()[0] == 0                                 # listed today: costs nothing
    assert [e for e in fake.log[before:] if e["kind"] != "walk"] == []


def test_the_rolling_recheck_spreads_albums_over_the_period():
    """About 1/recheck_days of a large account comes due each night, every album once per
    period, and an album listed within the period is not due before its own day comes."""
    now = time.time()
    records = [sd.AlbumRecord("K%05d" % i, "n", "a", listed=sd.iso_now(now - 1)) for i in range(6000)]
    due_tomorrow = sum(sd.recheck_due(r, 30, now + 86400) for r in records)
    assert 6000 / 30 * 0.8 < due_tomorrow < 6000 / 30 * 1.2
    assert all(sd.recheck_due(r, 30, now + 30 * 86400 + 1) for r in records)
    assert not any(sd.recheck_due(r, 30, now) for r in records)
    assert not any(sd.recheck_due(r, 0, now + 1000 * 86400) for r in records)


# The whole night ############################################################

def test_every_byte_of_the_first_backup_is_still_there(fake, run, monkeypatch):
    """Done when: in a run where SmugMug deletes photos, serves a worse archive and breaks a
    listing, every byte of the first backup is still under output_dir afterwards."""
    monkeypatch.setattr(sd, "BACKOFF_BASE", 0.001)
    deleted = fake.add_album("Deleted", images=[{"file_name": "%d.jpg" % i, "size": 2000 + i} for i in range(3)])
    worse = fake.add_album("Worse", images=[{"file_name": "a.jpg", "size": 2100},
                                            {"file_name": "clip.mov", "size": 4000, "is_video": True}])
    broken = fake.add_album("Broken", images=[{"file_name": "%d.jpg" % i, "size": 2200 + i} for i in range(3)])
    fake.images_max_count = 2
    fake.omit_next_page = True
    assert run()[0] == 0
    first = sorted(every_byte(run.out))
    fake.albums[deleted].images = fake.albums[deleted].images[:1]
    fake.zip_omit_videos = True
    fake.refuse_originals = {fake.albums[worse].images[1].key}
    fake.fail_pages = {("images", 3): 500}
    for key in (deleted, worse, broken):
        fake.albums[key].images[0].caption = "changed"
        changed(fake, key)
    code, _, err = run()
    assert code == sd.EXIT_ALBUMS_FAILED, err
    after = every_byte(run.out)
    for data in first:
        assert data in after or any(data in blob for blob in after)


# The Store, without HTTP ####################################################

def store_at(tmp_path):
    state = sd.BackupState(str(tmp_path))
    return sd.Store(str(tmp_path), "2026-12-01T031500Z", state), state


def test_store_versions_what_a_change_replaces_and_never_overwrites(tmp_path):
    """A change places NAME.part files at their names and moves what they replace into
    versions/<run start>/; a place onto an existing file versions that file first; the record
    is journalled with the change."""
    store, state = store_at(tmp_path)
    os.makedirs(tmp_path / "A")
    (tmp_path / "A" / "a.zip").write_bytes(b"old a")
    (tmp_path / "A" / "b.zip").write_bytes(b"old b")
    (tmp_path / "A" / "a.zip.part").write_bytes(b"new a")
    (tmp_path / "A" / "b.zip.part").write_bytes(b"new b")
    record = sd.AlbumRecord("K", "n", "A", files=[sd.SavedFile("a.zip", 5), sd.SavedFile("b.zip", 5)])
    store.apply("K", [("version", "A/a.zip"), ("place", "A/a.zip.part", "A/a.zip"),
                      ("place", "A/b.zip.part", "A/b.zip")], record)
    assert (tmp_path / "A" / "a.zip").read_bytes() == b"new a" and (tmp_path / "A" / "b.zip").read_bytes() == b"new b"
    kept = tmp_path / sd.STATE_DIR / sd.VERSIONS_DIR / "2026-12-01T031500Z" / "A"
    assert (kept / "a.zip").read_bytes() == b"old a" and (kept / "b.zip").read_bytes() == b"old b"
    assert store.versioned == 2 and state.albums["K"].path == "A" and not state.intents
    assert sorted(v[0] for v in state.versions) == ["A/a.zip", "A/b.zip"]


def test_a_run_started_in_the_same_second_as_the_last_names_its_versions_by_the_next(tmp_path):
    """Two runs that start in one second never share a versions folder, and every name keeps the
    run-start form (2026-12-01T031500Z): the later run takes the next free second."""
    store, _ = store_at(tmp_path)
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "a.zip").write_bytes(b"first")
    store.apply("K", [("version", "A/a.zip")])
    again, _ = store_at(tmp_path)
    assert again.stamp == "2026-12-01T031501Z"
    (tmp_path / "A" / "a.zip").write_bytes(b"second")
    again.apply("K", [("version", "A/a.zip")])
    versions = tmp_path / sd.STATE_DIR / sd.VERSIONS_DIR
    assert sorted(os.listdir(versions)) == ["2026-12-01T031500Z", "2026-12-01T031501Z"]
    assert (versions / "2026-12-01T031500Z" / "A" / "a.zip").read_bytes() == b"first"
    assert (versions / "2026-12-01T031501Z" / "A" / "a.zip").read_bytes() == b"second"
    (versions / "2026-11-30T031500Z-2").mkdir()            # named by an earlier version of the tool
    (versions / "my notes").mkdir()                         # not a run's: left alone
    assert again.prune_versions(0) == 3 and os.listdir(versions) == ["my notes"]


def test_store_refuses_a_path_another_album_owns(tmp_path):
    """No album writes at a path another album owns: the change is refused before any step."""
    store, state = store_at(tmp_path)
    other = sd.AlbumRecord("OTHER", "n", "Shared", files=[sd.SavedFile("x.zip", 3)])
    store.save_record(other)
    os.makedirs(tmp_path / "Shared")
    (tmp_path / "Shared" / "x.zip").write_bytes(b"his")
    (tmp_path / "Shared" / "x.zip.part").write_bytes(b"mine")
    with pytest.raises(sd.PathTaken):
        store.apply("MINE", [("place", "Shared/x.zip.part", "Shared/x.zip")])
    assert (tmp_path / "Shared" / "x.zip").read_bytes() == b"his"


def test_store_finishes_a_journalled_change_after_a_crash(tmp_path):
    """A change journalled and half done (the process died) is finished by recover() on the next
    start: each step taken once, none twice, and the record applied."""
    store, state = store_at(tmp_path)
    os.makedirs(tmp_path / "Old")
    (tmp_path / "Old" / "someone else's.txt").write_bytes(b"not the album's: the folder stays")
    for name in ("p1.zip", "p2.zip", sd.MANIFEST_NAME):
        (tmp_path / "Old" / name).write_bytes(name.encode())
    moved = sd.AlbumRecord("K", "n", "New", files=[sd.SavedFile("p1.zip", 6), sd.SavedFile("p2.zip", 6)],
                           manifest=13)
    steps = [("move", "Old/" + n, "New/" + n) for n in ("p1.zip", "p2.zip", sd.MANIFEST_NAME)]
    state.record({"intent": {"id": "i1", "key": "K", "steps": steps, "album": moved.to_json()}})
    os.makedirs(tmp_path / "New")
    os.rename(tmp_path / "Old" / "p1.zip", tmp_path / "New" / "p1.zip")       # the crash came here
    state.close()
    state2 = sd.BackupState(str(tmp_path)).load()
    assert list(state2.intents) == ["i1"]
    sd.Store(str(tmp_path), "2026-12-02T031500Z", state2).recover()
    assert sorted(os.listdir(tmp_path / "New")) == sorted(["p1.zip", "p2.zip", sd.MANIFEST_NAME])
    assert os.listdir(tmp_path / "Old") == ["someone else's.txt"]
    assert state2.albums["K"].path == "New" and not state2.intents


def test_store_errors_name_the_path_and_say_whether_the_run_must_stop(tmp_path):
    """An OSError becomes a LocalWriteError naming its path: fatal for a full or read-only disk
    and for the state; not for one album's folder."""
    store, _state = store_at(tmp_path)
    (tmp_path / "Blocked").write_bytes(b"x")
    with pytest.raises(sd.LocalWriteError) as info:
        store.make_folders("Blocked/Album")
    assert str(tmp_path / "Blocked" / "Album") in str(info.value) and not info.value.fatal
    import errno
    assert store.error("A/b.zip", OSError(errno.ENOSPC, "No space left on device")).fatal
    assert store.error(sd.STATE_DIR + "/journal.jsonl", OSError(errno.EACCES, "Permission denied")).fatal
