"""The last copy of a photo is never pruned (issue #25): retention removes a version only when
every photo it holds is held elsewhere in the backup, and a photo SmugMug no longer has keeps its
last copy until keep_deleted_days (absent or null: forever) from the run that first found it gone.

End to end against the emulator, then the deciding functions on their own."""

import io
import json
import os
import shutil
import time
import zipfile

import pytest

import smugmug_download as sd
from conftest import tree
from test_not_a_mirror import changed, state_of, versions

PHOTOS = [{"file_name": "%s.jpg" % n, "size": 3000 + i} for i, n in enumerate("abcdefgh")]


def versions_top(out):
    return out / sd.STATE_DIR / sd.VERSIONS_DIR


def age_versions(out, days):
    """Every versions folder made days older (renamed to the stamp of a run that long ago)."""
    top = versions_top(out)
    for stamp in os.listdir(top):
        os.rename(top / stamp, top / sd.run_stamp(sd.stamp_time(stamp) - days * 86400))


def set_gone_since(out, days_ago):
    """The state says every gone photo was first found gone days_ago."""
    path = out / sd.STATE_DIR / sd.STATE_FILE
    data = json.loads(path.read_text())
    for photos in data["gone"].values():
        for photo in photos.values():
            photo["Since"] = sd.iso_now(time.time() - days_ago * 86400)
    path.write_text(json.dumps(data))


def delete_photos(fake, key, keep):
    fake.albums[key].images = [i for i in fake.albums[key].images if i.file_name in keep]
    changed(fake, key)


# End to end ##################################################################

def test_the_last_copy_of_a_photo_deleted_on_smugmug_is_never_pruned(fake, run):
    """Seven of eight photos deleted on SmugMug: the old zip, their only copy, goes to versions and
    stays there with keep_versions_days 0, and still when its versions folder is 200 days old.
    The summary names the photos found gone (five, then a count) and where they are kept; the
    state records each with the run that found it gone."""
    key = fake.add_album("Trip", images=PHOTOS)
    assert run()[0] == 0
    first = tree(run.out, manifests=True)
    zip_name = "Trip/%s.zip" % key
    delete_photos(fake, key, {"a.jpg"})
    code, _, err = run("--keep-versions-days", "0")
    assert code == 0, err
    kept = versions(run.out)
    assert kept[zip_name] == first[zip_name] and kept["Trip/metadata.json"] == first["Trip/metadata.json"]
    (stamp,) = os.listdir(versions_top(run.out))
    assert "7 photos found gone from SmugMug, kept in the backup:" in err
    assert "  b.jpg, c.jpg, d.jpg, e.jpg, f.jpg and 2 more: in %s/%s/%s/%s" % (
        sd.STATE_DIR, sd.VERSIONS_DIR, stamp, zip_name) in err.splitlines()
    gone = state_of(run.out)["gone"][key]
    assert sorted(p["FileName"] for p in gone.values()) == ["%s.jpg" % n for n in "bcdefgh"]
    assert all(p["Kind"] == "deleted" and p["Where"].endswith(zip_name) for p in gone.values())
    age_versions(run.out, 200)
    code, _, err = run()
    assert code == 0, err
    assert versions(run.out)[zip_name] == first[zip_name]
    assert "found gone" not in err                     # found once, by the run that first saw it
    assert "kept 1 version older than keep_versions_days: it holds the last copy of a photo" in err


def test_a_version_whose_photos_are_all_held_elsewhere_is_pruned(fake, run):
    """An album grows by a photo: its old zip goes to versions, and every photo it holds is in the
    new zip, so keep_versions_days 0 removes it (with its manifest). A photo SmugMug lists with
    other bytes (replaced) is held too: its old bytes are a version like any other."""
    key = fake.add_album("Grows", images=PHOTOS[:2])
    assert run()[0] == 0
    fake.add_image(key, file_name="new.jpg", size=12345)   # most of the album new: a fresh archive
    changed(fake, key)
    code, _, err = run("--keep-versions-days", "0")
    assert code == 0, err
    assert versions(run.out) == {} and os.listdir(versions_top(run.out)) == []
    assert "2 moved to versions" in err and "found gone" not in err
    assert "removed 1 versions folder older than keep_versions_days (0)" in err
    fake.touch(key)                                     # every photo replaced by other bytes
    code, _, err = run("--keep-versions-days", "0")
    assert code == 0, err
    assert versions(run.out) == {}
    assert "gone" not in state_of(run.out)


def test_keep_deleted_days_removes_the_last_copy_only_after_its_days(fake, run):
    """keep_deleted_days 30: the last copy of a photo deleted on SmugMug stays 30 days from the run
    that first found it gone (not from the version's own age), then goes, with its record and its
    manifest; the summary says so. The photo still listed in the same zip is held by the new zip."""
    key = fake.add_album("Trip", images=PHOTOS[:2])
    assert run()[0] == 0
    delete_photos(fake, key, {"a.jpg"})
    fake.add_image(key, file_name="big.jpg", size=12345)   # most of the album new: a fresh archive,
    run.extra = {"keep_deleted_days": 30}                  # the old zip (a.jpg's last copy) to versions
    code, _, err = run("--keep-versions-days", "0")
    assert code == 0, err
    assert "1 photo found gone from SmugMug" in err
    zip_name = "Trip/%s.zip" % key
    age_versions(run.out, 200)                          # the version is old: its photo was found gone now
    code, _, err = run("--keep-versions-days", "0")
    assert code == 0, err and zip_name in versions(run.out)
    set_gone_since(run.out, 29)
    code, _, err = run("--keep-versions-days", "0")
    assert code == 0, err
    assert zip_name in versions(run.out)
    set_gone_since(run.out, 31)
    code, _, err = run("--keep-versions-days", "0")
    assert code == 0, err
    assert versions(run.out) == {} and os.listdir(versions_top(run.out)) == []
    assert "1 photo gone from SmugMug longer than keep_deleted_days: the last copy removed." in err
    assert "gone" not in state_of(run.out)
    assert tree(run.out)[zip_name] == fake.expected_parts(key)["%s.zip" % key]


def test_the_flag_keep_deleted_days_0_removes_a_last_copy_at_once(fake, run):
    """--keep-deleted-days 0 (with --keep-versions-days 0): the old behaviour, nothing kept."""
    key = fake.add_album("Trip", images=PHOTOS[:2])
    assert run()[0] == 0
    delete_photos(fake, key, {"a.jpg"})
    code, _, err = run("--keep-versions-days", "0", "--keep-deleted-days", "0")
    assert code == 0, err
    assert "1 photo found gone from SmugMug" in err and versions(run.out) == {}


def test_a_zip_no_manifest_describes_goes_only_when_its_entries_are_held(fake, run):
    """An old-format version (a zip with no manifest beside it): its entries are matched by name,
    CRC and size against the album's current zips. A copy of the current zip goes; a zip with one
    more photo stays (recorded as found gone, from this run), until keep_deleted_days."""
    key = fake.add_album("Old", images=PHOTOS[:2])
    assert run()[0] == 0
    current = (run.out / "Old" / ("%s.zip" % key)).read_bytes()
    stale = versions_top(run.out) / sd.run_stamp(time.time() - 200 * 86400) / "Old"
    os.makedirs(stale)
    (stale / "copy.zip").write_bytes(current)
    buffer = io.BytesIO(current)
    with zipfile.ZipFile(buffer, "a") as z:
        z.writestr("lost.jpg", b"the only copy of a photo")
    (stale / "more.zip").write_bytes(buffer.getvalue())
    code, _, err = run()
    assert code == 0, err
    assert not (stale / "copy.zip").exists() and (stale / "more.zip").exists()
    assert "1 photo found gone from SmugMug, kept in the backup:" in err and "lost.jpg: in " in err
    code, _, err = run("--keep-deleted-days", "0")
    assert code == 0, err
    assert not stale.exists()


# The deciding functions ######################################################

def test_retention_unheld_counts_current_files_later_versions_and_listed_photos():
    photos = [("K1 md5:aa", "a.jpg"), ("K2 md5:bb", "b.jpg"), ("K3 md5:cc", "c.jpg")]
    mine = ("2026-01-01T000000Z", "v/a")
    later = ("2026-02-01T000000Z", "v/b")
    # nothing holds them: all unheld
    assert sd.retention_unheld(photos, mine, set(), set(), {}) == photos
    # a current file holds K1's bytes; K2 is listed with other bytes; K3 is in a later version
    assert sd.retention_unheld(photos, mine, {"K1 md5:aa"}, {"K2"}, {"K3 md5:cc": later}) == []
    # the last version holding a photo keeps it (it is the newest: no later one)
    assert sd.retention_unheld(photos, later, set(), set(), {"K3 md5:cc": later}) == photos
    # other bytes of K1 held now, K1 not listed (gone from SmugMug): these bytes are unheld
    assert sd.retention_unheld(photos[:1], mine, {"K1 md5:zz"}, set(), {}) == photos[:1]


def test_retention_may_go_only_when_nothing_is_unheld_or_gone_long_enough():
    now = 1_000_000_000
    unheld = [("K1 md5:aa", "a.jpg")]
    assert sd.retention_may_go([], {}, None, now)
    assert not sd.retention_may_go(unheld, {"K1 md5:aa": now - 10 ** 9}, None, now)     # forever
    assert not sd.retention_may_go(unheld, {"K1 md5:aa": now - 29 * 86400}, 30, now)
    assert sd.retention_may_go(unheld, {"K1 md5:aa": now - 30 * 86400}, 30, now)
    assert not sd.retention_may_go(unheld, {}, 30, now)                                 # never found gone
    assert sd.retention_may_go(unheld, {"K1 md5:aa": now}, 0, now)


def test_gone_photos_and_identities():
    assert sd.photo_identity("K", "ABC", 5) == "K md5:abc"
    assert sd.photo_identity("K", "", "5") == "K size:5"
    assert sd.photo_identity("K") == "K"
    doc = {"files": [{"ImageKey": "K1", "FileName": "a.jpg", "ArchivedMD5": "aa", "archive": "p.zip",
                      "entry": "a.jpg"},
                     {"ImageKey": "K2", "FileName": "b.jpg", "ArchivedSize": 7, "file": "b.jpg"},
                     {"ImageKey": "K3", "FileName": "c.jpg", "missing": "refused"},
                     {"ImageKey": "K4", "FileName": "../x", "file": "../x"}],
           "parts": [{"file": "p.zip", "size": 9}],
           "kept": [{"ImageKey": "K5", "FileName": "e.jpg", "archive": "p.zip", "entry": "e.jpg"}]}
    photos = list(sd.manifest_photos(doc))
    assert photos == [("K1 md5:aa", "a.jpg", "p.zip"), ("K2 size:7", "b.jpg", "b.jpg"),
                      ("K5", "e.jpg", "p.zip")]
    listing = [sd.ListedFile("K1", "a.jpg", archived_md5="other")]
    assert sd.gone_photos(photos, listing) == photos[1:]     # K1 is listed (replaced): not gone


def test_a_damaged_gone_record_is_set_aside_with_a_warning(tmp_path, monkeypatch):
    """A gone record that does not validate is set aside (kept in the snapshot) with a warning."""
    warned = []
    monkeypatch.setattr(sd.log, "warning", lambda text, *args: warned.append(text % args))
    state = sd.BackupState(str(tmp_path))
    os.makedirs(tmp_path / sd.STATE_DIR)
    good = {"FileName": "a.jpg", "Since": "2026-01-01T00:00:00+00:00", "Kind": "deleted", "Where": "x"}
    (tmp_path / sd.STATE_DIR / sd.STATE_FILE).write_text(json.dumps({
        "version": sd.STATE_VERSION, "albums": {},
        "gone": {"A": {"K1 md5:aa": good, "K2": {"FileName": "b.jpg", "Since": "yesterday"}}, "B": [],
                 "C": {"K3": None}}}))
    with open(tmp_path / sd.STATE_DIR / sd.JOURNAL_FILE, "w") as f:
        f.write(json.dumps({"gone": [["A", ["not", "a", "key"], None]]}) + "\n")
        f.write(json.dumps({"gone": [["A", "K4", {"FileName": 5}]]}) + "\n")
    state.load()
    assert state.gone == {"A": {"K1 md5:aa": sd.GonePhoto("a.jpg", good["Since"], "deleted", "x")}}
    assert set(state.gone_set_aside["A"]) == {"K2", "K4"}        # the line of the wrong shape: set aside
    assert any("damaged (bad Since)" in w for w in warned), warned
    state.save()
    again = sd.BackupState(str(tmp_path)).load()
    assert again.gone == state.gone and again.gone_set_aside["A"]["K2"] == {"FileName": "b.jpg",
                                                                           "Since": "yesterday"}


@pytest.mark.parametrize("value, ok", [(None, True), (0, True), (30, True), (1.5, True), (-1, False),
                                        ("30", False), (True, False), (float("inf"), False)])
def test_keep_deleted_days_config(tmp_path, value, ok):
    data = {"app_key": "k", "app_key_secret": "s", "access_key": "a", "access_key_secret": "b",
            "output_dir": str(tmp_path), "keep_deleted_days": value}
    if ok:
        assert sd.validate_config(data, str(tmp_path / "c.json")).keep_deleted_days == value
    else:
        with pytest.raises(sd.UsageError, match="keep_deleted_days must be"):
            sd.validate_config(data, str(tmp_path / "c.json"))


def test_keep_deleted_days_flag(capsys):
    with pytest.raises(SystemExit) as info:
        sd.main(["--keep-deleted-days", "-1"])
    assert info.value.code == sd.EXIT_USAGE
    assert "--keep-deleted-days must be 0 or more" in capsys.readouterr().err


def versions_beside(tmp_path, damaged=(), missing=False):
    """A Store over album A (its current p.zip holds photo a.jpg, its record marks damaged) and two
    old versions of p.zip with the manifest: the first holds one more photo (lost.jpg), so its size
    is not the manifest's; the second is the same as the current part."""
    state = sd.BackupState(str(tmp_path))
    store = sd.Store(str(tmp_path), "2030-01-01T000000Z", state)
    os.makedirs(tmp_path / "A")
    with zipfile.ZipFile(tmp_path / "A" / "p.zip", "w") as z:
        z.writestr("a.jpg", b"photo a")
    doc = {"album": {"AlbumKey": "K"}, "parts": [{"file": "p.zip", "size": os.path.getsize(tmp_path / "A" / "p.zip")}],
           "files": [{"ImageKey": "I1", "FileName": "a.jpg", "ArchivedMD5": "aa", "archive": "p.zip", "entry": "a.jpg"}]}
    (tmp_path / "A" / "metadata.json").write_text(json.dumps(doc))
    state.albums["K"] = sd.AlbumRecord("K", "n", "A", files=[sd.SavedFile("p.zip", 1)], manifest=1,
                                       damaged=list(damaged))
    for stamp, extra in (("2026-01-01T000000Z", True), ("2026-01-02T000000Z", False)):
        old = tmp_path / sd.STATE_DIR / sd.VERSIONS_DIR / stamp / "A"
        os.makedirs(old)
        shutil.copy(tmp_path / "A" / "p.zip", old / "p.zip")
        (old / "metadata.json").write_text(json.dumps(doc))
        if extra:
            with zipfile.ZipFile(old / "p.zip", "a") as z:
                z.writestr("lost.jpg", b"the only copy")
    if missing:
        os.remove(tmp_path / "A" / "p.zip")
    return store, tmp_path / sd.STATE_DIR / sd.VERSIONS_DIR


def test_a_part_of_another_size_than_its_manifest_says_is_read_for_what_it_holds(tmp_path):
    """A version whose manifest names a part of one size, while the file there has another (a part a
    repair replaced): the manifest does not describe it, so its zip is read; it holds a photo no
    current file holds, and stays. The same zip at the manifest's size goes (its photo is held)."""
    store, top = versions_beside(tmp_path)
    summary = sd.Summary()
    assert store.prune_versions(90, None, now=time.time(), summary=summary) == 1
    assert os.listdir(top) == ["2026-01-01T000000Z"]
    assert sorted(os.listdir(top / "2026-01-01T000000Z" / "A")) == ["metadata.json", "p.zip"]
    assert [p[1] for p in summary.gone_photos] == ["lost.jpg"]


@pytest.mark.parametrize("damaged, missing", [(["p.zip"], False), ([], True)])
def test_a_current_part_found_damaged_or_missing_holds_nothing(tmp_path, damaged, missing):
    """--verify found the album's current part damaged, or it is gone from the disk: it holds
    nothing for retention, so the old version that is the same as it stays."""
    store, top = versions_beside(tmp_path, damaged=damaged, missing=missing)
    assert store.prune_versions(90, None, now=time.time()) == 0
    assert sorted(os.listdir(top)) == ["2026-01-01T000000Z", "2026-01-02T000000Z"]
