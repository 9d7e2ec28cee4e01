"""Never lose or replace a good backup, never wait in silence (issue #10): each defect the
review found, reproduced end to end against the emulator."""

import datetime
import json
import threading
import os
import time

import smugmug_download as sd
from conftest import expected_tree, file_size_limit, manifest, sample_expected, spawn, tree, wait_for, write_config


def album_files(fake, key, rel):
    return expected_tree(fake, {key: rel})


def test_stale_archive_is_never_saved_as_new(fake, run):
    """Defect 1: the album changed and SmugMug already lists a newer archive in preparation (a
    killed run's) that then ends in Error, beside the pre-change Complete one: the tool waits for
    an archive of the album as it is now, never the old one, and saves the new content."""
    key = fake.add_album("Trip", sizes=(4000,))
    assert run()[0] == 0
    old_bytes = tree(run.out)
    fake.touch(key)
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    album = fake.albums[key]
    album.last_updated = album.images_last_updated = now - datetime.timedelta(seconds=10)
    fake.archives[key][0].created_at = now - datetime.timedelta(seconds=20)   # the first run's, before
    killed = fake.new_archive(key)
    killed.created_at = now - datetime.timedelta(seconds=5)        # after the change, before this run
    killed.prep_seconds = 0.2
    fake.error_archives.add(killed.archive_id)
    code, _, err = run()
    assert code == 0, err
    assert tree(run.out) == album_files(fake, key, "Trip") != old_bytes
    assert "requesting a new one" in err
    assert "unchanged Trip" in run("--dry-run")[1].splitlines()


def test_an_html_page_never_replaces_a_zip(fake, run):
    """Defect 2: a 200 answer with a login page (its own Content-Length) instead of the zip is
    refused (not the listed Size, not a zip) and the real archive is fetched."""
    key = fake.add_album("Login", sizes=(5000, 6000))
    fake.html_once = {key}
    code, _, err = run()
    assert code == 0, err
    assert tree(run.out) == album_files(fake, key, "Login")


def test_a_kept_backup_is_never_overwritten(fake, run):
    """Defect 3: an album gone from SmugMug keeps its files; a new album with the same name at
    the same path gets " (NodeID)" and never writes over or deletes the kept files."""
    old = fake.add_album("Party", sizes=(3000,), names=["Party.zip"])
    assert run()[0] == 0
    kept = tree(run.out)
    fake.remove_node(fake.albums[old].node_id)
    new = fake.add_album("Party", sizes=(3500,), names=["Party.zip"], days=5)
    code, _, err = run()
    assert code == 0, err
    node = fake.albums[new].node_id
    got = tree(run.out)
    assert got["Party/Party.zip"] == kept["Party/Party.zip"]
    assert got["Party (%s)/Party.zip" % node] == fake.expected_parts(new)["Party.zip"]
    assert "gone from SmugMug" in err and "Party" in err
    assert run()[0] == 0 and tree(run.out) == got          # stable on the next run


def test_a_move_takes_only_the_albums_own_files(fake, run):
    """Defect 4: an album moves away from X while a new folder X holds an album being downloaded
    in the same run: only the moved album's files go, the other album stays where the state says."""
    moving = fake.add_album("X", sizes=(3000,))
    assert run()[0] == 0
    deep = fake.add_folder("Deep")
    d2 = fake.add_folder("D2", deep)
    d3 = fake.add_folder("D3", d2)
    d4 = fake.add_folder("D4", d3)
    for i in range(24):                              # pages of D4 to list before the album is found
        fake.add_node("Page", "page %d" % i, d4)
    fake.move(fake.albums[moving].node_id, d4)
    fake.rename(fake.albums[moving].node_id, "Y")
    folder_x = fake.add_folder("X", days=3)
    other = fake.add_album("C", folder_x, sizes=(3000,))     # backed up before Y is found
    fake.api_latency = 0.05
    fake.max_count = 4
    code, _, err = run()
    assert code == 0, err
    got = tree(run.out)
    assert got == {**album_files(fake, moving, "Deep/D2/D3/D4/Y"), **album_files(fake, other, "X/C")}
    state = json.loads((run.out / sd.STATE_DIR / sd.STATE_FILE).read_text())
    assert state["albums"][moving]["path"] == "Deep/D2/D3/D4/Y" and state["albums"][other]["path"] == "X/C"


def test_state_write_errors_are_one_line_exit_1(sample, run):
    """Defect 5: the journal cannot be written (here: a folder in its way): no traceback, the
    file is named, exit 1."""
    os.makedirs(run.out / sd.STATE_DIR / sd.JOURNAL_FILE)
    code, _, err = run()
    assert code == sd.EXIT_ALBUMS_FAILED, err
    assert "Traceback" not in err and sd.JOURNAL_FILE in err
    assert "Stopped" in err


def test_a_damaged_state_record_is_set_aside(sample, run):
    """Defect 6: one album record with path null: a warning, that album is checked again, the
    rest stays unchanged, exit 0."""
    assert run()[0] == 0
    path = run.out / sd.STATE_DIR / sd.STATE_FILE
    state = json.loads(path.read_text())
    key = sample.keys["bbq"]
    state["albums"][key]["path"] = None
    path.write_text(json.dumps(state))
    calls = len(sample.log)
    code, _, err = run()
    assert code == 0, err
    assert "Traceback" not in err and "state record of album %s is damaged" % key in err
    assert tree(run.out) == sample_expected(sample)
    again = [e for e in sample.log[calls:] if e["kind"] != "walk"]     # checked on disk, from its manifest
    assert [e["kind"] for e in again] == ["images"] and key in again[0]["path"]
    assert json.loads(path.read_text())["albums"][key]["path"] == "Family/2019/Summer/BBQ"


def test_an_emptied_album_keeps_its_backup(fake, run):
    """Defect 7: an album whose images were all deleted (ImageCount 0) keeps its zips; the
    summary says so; exit 0."""
    key = fake.add_album("Emptied", sizes=(3000, 3000))
    assert run()[0] == 0
    before = tree(run.out)
    fake.albums[key].images = []
    fake.albums[key].image_count = 0
    fake.touch(key)
    code, _, err = run()
    assert code == 0, err
    assert tree(run.out) == before
    assert "empty on SmugMug" in err


def test_prepared_archives_do_not_pile_up(fake, run, monkeypatch):
    """Defect 8: with a slow link, archives prepared but not yet downloading stay bounded: no new
    request while what waits exceeds READY_HORIZON seconds of the link (here a tenth of a second,
    so about one archive), and at most --max-preparing (3) albums in preparation."""
    monkeypatch.setattr(sd, "READY_HORIZON", 0.1)
    for i in range(12):
        fake.add_album("A%02d" % i, sizes=(60_000,))
    fake.bandwidth = 400_000
    seen = []
    done = threading.Event()

    def sample_ready():
        while not done.is_set():
            with fake.lock:
                archives = [a for lst in fake.archives.values() for a in lst]
                ready = [a for a in archives if fake.archive_status(a) == "Complete"
                         and not any(fake.served.get((a.archive_id, i + 1)) for i in range(len(a.parts)))]
            seen.append(len(ready))
            time.sleep(0.01)

    watcher = threading.Thread(target=sample_ready)
    watcher.start()
    try:
        code, _, err = run("--max-preparing", "3", "--workers", "1")
    finally:
        done.set()
        watcher.join()
    assert code == 0, err
    # 3 in preparation that may all complete, 2 waiting before the rate is known, 1 being started
    assert 2 <= max(seen) <= 3 + 2 + 1 and len(fake.calls("post")) == 12


def test_an_album_node_without_album_link_fails_by_name(fake, run):
    """Defect 9: an album node with no Album link cannot be backed up: named, exit 1."""
    fake.add_album("Fine")
    fake.add_node("Album", "Broken", fake.root_id)
    code, _, err = run()
    assert code == sd.EXIT_ALBUMS_FAILED
    assert "Broken: album without an Album link" in err


def test_tracebacks_in_logs_are_redacted(tmp_path):
    """Defect 10: a traceback logged with --verbose carries no signed URL query nor secret."""
    class Args:
        quiet, verbose, log_file = False, True, str(tmp_path / "log.txt")
    status = sd.StatusLine(None, False)
    redact = sd.setup_logging(Args, status, secrets=["s3cr3t-value"])
    try:
        raise ValueError("GET https://photos.invalid/x.zip?Signature=abc123&Key=s3cr3t-value failed")
    except ValueError:
        sd.log.debug("unexpected error", exc_info=True)
    for handler in sd.log.handlers:
        handler.flush()
    text = (tmp_path / "log.txt").read_text()
    assert "Traceback" in text and "ValueError" in text
    assert "abc123" not in text and "s3cr3t-value" not in text
    assert redact.secrets == ["s3cr3t-value"]
    for handler in list(sd.log.handlers):
        sd.log.removeHandler(handler)
        handler.close()


def test_never_two_downloads_on_one_part_file(fake, run, monkeypatch):
    """Defect 11: when an archive is given up (a part refused: its link is looked up again, then
    a new archive is asked for) while another of its parts is still streaming, the next
    download of that part starts only after the earlier one has stopped writing: never two
    writers on one NAME.part. (The earlier download blocks on a slow link for seconds before it
    sees that it was cancelled.)"""
    key = fake.add_album("Pair", sizes=(2000, 270_000))     # 256 KiB at once, the rest 1.3 s later
    fake.bandwidth = 200_000
    fake.gone_parts = {(key, 1)}
    spans, real = [], sd.fetch_to_file

    def traced(client, store, url, temp, *args, **kw):
        start = time.monotonic()
        try:
            return real(client, store, url, temp, *args, **kw)
        finally:
            spans.append((temp, url, start, time.monotonic()))

    monkeypatch.setattr(sd, "fetch_to_file", traced)
    code, _, err = run("--workers", "2")
    assert code == 0, err
    assert tree(run.out) == album_files(fake, key, "Pair")
    second = sorted((s for s in spans if s[0].endswith("-2.zip.part")), key=lambda s: s[2])
    assert len(second) >= 2
    for earlier, later in zip(second, second[1:]):
        assert later[2] >= earlier[3], (earlier, later)


def test_an_error_archive_without_url_is_seen_at_once(fake, run):
    """Defect 12: Download objects carry a URL only when Complete; an archive in Error is seen as
    Error at once (not as one in preparation), and after the retries the album is saved file by file."""
    key = fake.add_album("Broken archive", sizes=(3000, 3000))
    fake.web_uri_only_when_complete = True
    fake.error_always = {key}
    started = time.monotonic()
    code, _, err = run()
    assert code == 0, err
    assert time.monotonic() - started < 10
    assert len(fake.calls("post")) == 1 + sd.ARCHIVE_ERROR_RETRIES
    assert "saving it file by file" in err and "1 album saved file by file" in err
    files = tree(run.out)
    assert sorted(files.values()) == sorted(fake.expected_files(key).values())


def test_a_part_still_in_progress_keeps_the_archive_preparing(fake, run):
    """Defect 12: a multi-part archive whose later part is still Processing (no URL yet) is not
    taken for complete: every part is downloaded."""
    key = fake.add_album("Staggered", sizes=(3000, 3100, 3200))
    fake.web_uri_only_when_complete = True
    fake.staggered_parts = True
    fake.prep_seconds = 0.1
    code, _, err = run()
    assert code == 0, err
    assert tree(run.out) == album_files(fake, key, "Staggered")


def test_an_archive_never_listed_is_asked_for_a_bounded_number_of_times(fake, run, monkeypatch):
    """Defect 13: SmugMug accepts the request but never lists an archive: asked again a bounded
    number of times, then the album is saved file by file."""
    monkeypatch.setattr(sd, "REQUEST_AGAIN_DELAY", 0.05)   # no archive at all: no second to tell apart
    key = fake.add_album("Lost", sizes=(3000,))
    fake.never_list = {key}
    code, _, err = run()
    assert code == 0, err
    assert len(fake.calls("post")) == 1 + sd.LOST_REQUEST_RETRIES
    assert sorted(tree(run.out).values()) == sorted(fake.expected_files(key).values())


def test_files_and_folders_are_fsynced_before_and_after_the_rename(fake, run, monkeypatch):
    """Defect 14: every file is flushed to disk before it takes its final name, and its folder
    after, so a power loss cannot leave a final name on incomplete bytes."""
    key = fake.add_album("Durable", sizes=(3000, 2000))
    synced, events = [], []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink("/proc/self/fd/%d" % fd))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst), list(synced)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    code, _, err = run()
    assert code == 0, err
    folder = str(run.out / "Durable")
    for name in fake.expected_parts(key):
        final = os.path.join(folder, name)
        renames = [e for e in events if e[2] == final]
        assert renames and final + ".part" in renames[0][3]
    last_rename = max(i for i, e in enumerate(events) if e[2].startswith(folder))
    assert folder in synced[len(events[last_rename][3]):]


def test_abandoned_part_files_are_cleaned_up(fake, run):
    """Defect 15: a NAME.part (and its state entry) that no album will resume is removed at the
    end of a complete run."""
    key = fake.add_album("Album", sizes=(3000,))
    assert run()[0] == 0
    stray = run.out / "Album" / "old-archive.zip.part"
    stray.write_bytes(b"half of something")
    path = run.out / sd.STATE_DIR / sd.STATE_FILE
    state = json.loads(path.read_text())
    state["partials"]["Album/old-archive.zip"] = {"album": key, "identity": "x"}
    path.write_text(json.dumps(state))
    fake.touch(key)
    assert run()[0] == 0
    assert not stray.exists()
    assert json.loads(path.read_text())["partials"] == {}


def test_a_write_error_stops_the_walk_too(fake, tmp_path):
    """Defect 15: after a write error (file size limit as a stand-in for a full disk) no more
    folders are listed; the run says Stopped, names the file, exit 1. The folders' listings are
    held until the error is logged (no race between 31 listings and one download): after it,
    only those already asked for are answered, none is asked for anew."""
    fake.add_album("Huge", sizes=(400_000,))
    for i in range(30):
        sub = fake.add_folder("F%02d" % i, days=2)
        fake.add_album("A", sub, sizes=(100,))
    fake.walk_gate = threading.Event()
    out = tmp_path / "backup"
    config = write_config(tmp_path / "config.json", fake.config(out, workers=1))
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as stderr:
        proc = spawn(config, preexec_fn=file_size_limit(100_000), stderr=stderr)
        try:
            assert wait_for(lambda: "File too large" in log.read_text(errors="replace"), timeout=60)
            time.sleep(0.2)             # the orchestrator cancels what is queued just after it logs
        finally:
            fake.walk_gate.set()
        proc.communicate(timeout=60)
    err = log.read_text()
    assert proc.returncode == sd.EXIT_ALBUMS_FAILED, err
    assert "Traceback" not in err and "File too large" in err and "Stopped" in err and "not attempted" in err
    listed = [e for e in fake.calls("walk") if e["path"].endswith("!children")]
    assert len(listed) <= 1 + 4          # the root, and what the walk's four threads had asked for


def test_a_stopped_run_calls_no_album_gone(sample, run, monkeypatch):
    """A run stopped before its walk ended (SmugMug unreachable) says nothing is gone: it did not
    see the whole account."""
    assert run()[0] == 0
    sample.api_latency = 0.2
    threading.Timer(0.5, sample.vanish).start()
    code, _, err = run(unreachable_minutes=0.01)
    assert code == sd.EXIT_ALBUMS_FAILED, err
    assert "unreachable since" in err and "gone from SmugMug" not in err


def test_state_fields_of_the_wrong_type_are_survived(sample, run):
    """Defect 6: a state whose 'requested' or 'partials' has the wrong type is set aside with a
    warning, never a traceback; every album is checked again."""
    assert run()[0] == 0
    path = run.out / sd.STATE_DIR / sd.STATE_FILE
    state = json.loads(path.read_text())
    state["requested"] = 5
    path.write_text(json.dumps(state))
    code, _, err = run()
    assert code == 0, err
    assert "Traceback" not in err and "unreadable" in err
    assert tree(run.out) == sample_expected(sample)


def test_an_unselected_album_without_link_is_no_failure(fake, run):
    """Defect 9: an album node without an Album link that --exclude leaves out fails nothing."""
    fake.add_album("Fine")
    fake.add_node("Album", "Broken", fake.root_id)
    code, _, err = run("--exclude", "Broken")
    assert code == 0, err


def test_a_file_in_the_way_of_a_move_is_fetched_again(fake, run):
    """Defect 4: when a moved album's file cannot go to the new folder (something is in the
    way), it is left where it was, named, and the album is fetched again at its new place."""
    key = fake.add_album("X", sizes=(3000,))
    assert run()[0] == 0
    fake.rename(fake.albums[key].node_id, "Y")
    os.makedirs(run.out / "Y")
    (run.out / "Y" / ("%s.zip" % key)).write_bytes(b"x" * len(fake.expected_parts(key)["%s.zip" % key]))
    fetched = len(fake.calls("archive"))
    code, _, err = run()
    assert code == 0, err
    assert "is in the way" in err
    assert len(fake.calls("archive")) == fetched + 1
    assert tree(run.out)["Y/%s.zip" % key] == fake.expected_parts(key)["%s.zip" % key]
    assert (run.out / "X" / ("%s.zip" % key)).exists()
    assert run()[0] == 0 and len(fake.calls("archive")) == fetched + 1


def test_a_part_named_like_the_manifest_keeps_both(fake, run):
    """SmugMug names an archive part metadata.json: the part is saved under another name,
    the manifest beside it, and --verify finds both intact."""
    key = fake.add_album("Odd", sizes=(3000,), names=["metadata.json"])
    code, _, err = run()
    assert code == 0, err
    got = tree(run.out)
    assert got == {"Odd/metadata (part 1).json": fake.expected_parts(key)["metadata.json"]}
    doc = manifest(run.out / "Odd")
    assert doc["files"][0]["archive"] == "metadata (part 1).json"
    assert run("--verify")[0] == 0


def test_a_lost_state_costs_a_check_not_a_new_download(sample, run):
    """The state is lost (deleted, or unreadable and set aside): each album whose folder holds
    its own metadata.json is checked on disk against SmugMug's listing, nothing is downloaded
    again, the state is rebuilt, and the run after that asks nothing per album."""
    assert run()[0] == 0
    before = tree(run.out, manifests=True)
    (run.out / sd.STATE_DIR / sd.STATE_FILE).write_text("{ not json")
    calls = len(sample.log)
    code, _, err = run()
    assert code == 0, err
    kinds = {e["kind"] for e in sample.log[calls:]}
    assert kinds == {"walk", "images"}, kinds          # no archive asked for or downloaded
    assert tree(run.out) == sample_expected(sample)
    assert tree(run.out, manifests=True).keys() == before.keys()
    calls = len(sample.log)
    assert run()[0] == 0
    assert {e["kind"] for e in sample.log[calls:]} == {"walk"}


def test_a_lost_state_never_puts_a_new_album_over_a_kept_one(fake, run):
    """Album X is gone from SmugMug (its files kept); a new album X comes; the state is lost.
    The kept folder's metadata.json names its owner: the new album goes to "X (NodeID)" and the
    kept files stay as they were. A manifest with odd types is no record (and no crash)."""
    gone = fake.add_album("X", sizes=(3000,))
    assert run()[0] == 0
    kept = tree(run.out, manifests=True)
    fake.remove_node(fake.albums[gone].node_id)
    new = fake.add_album("X", sizes=(2500,))
    other = fake.add_album("Y", sizes=(1000,))
    assert run()[0] == 0
    y_manifest = run.out / "Y" / sd.MANIFEST_NAME
    doc = json.loads(y_manifest.read_text())
    doc["parts"] = 1
    y_manifest.write_text(json.dumps(doc))
    (run.out / sd.STATE_DIR / sd.STATE_FILE).unlink()
    code, _, err = run()
    assert code == 0, err
    got = tree(run.out, manifests=True)
    assert {k: v for k, v in got.items() if k.startswith("X/")} == kept
    node = fake.albums[new].node_id
    assert got["X (%s)/%s.zip" % (node, new)] == fake.expected_parts(new)["%s.zip" % new]
    assert tree(run.out)["Y/%s.zip" % other] == fake.expected_parts(other)["%s.zip" % other]
