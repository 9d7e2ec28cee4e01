"""Files SmugMug offers no original for (issue #20): a collected photo, a video without an
ArchivedUri, edited images, on-the-fly renditions without a Size, field types as SmugMug gives
them, and a 401 in SmugMug's own words. End to end: the real tool against the emulator,
comparing the bytes on disk."""

import hashlib
import json
import os

import pytest

import smugmug_download as sd
from conftest import manifest, tree

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SUMMARY = "%s saved as SmugMug's largest rendition: no original offered."


def images(fake, key):
    return fake.albums[key].images


def entries(folder):
    """{FileName: manifest entry} of an album folder."""
    return {e["FileName"]: e for e in manifest(folder)["files"]}


def md5(data):
    return hashlib.md5(data).hexdigest()


def mixed_album(fake, name="Mixed", photo="Theirs.jpg", more=()):
    """An album of a photo in the zip, a photo collected from another account (no Archived*,
    left out of the zip) and a video the zip lacks with no ArchivedUri (a 3000-byte transcode),
    then the images `more` (FakeImage fields)."""
    return fake.add_album(name, images=[
        {"file_name": "Own.jpg", "size": 2400},
        {"file_name": photo, "size": 5000, "origin": "Collected", "collected_from": "friend",
         "caption": "Collected from a friend"},
        {"file_name": "Clip.mp4", "size": 8000, "is_video": True, "archived": False, "in_zip": False,
         "video_size": 3000}] + list(more))


def test_collected_photo_and_video_without_original_are_renditions_not_failures(fake, run):
    """Rendition, not a failure: a collected photo and a video without an original are saved as
    SmugMug's largest rendition under their FileNames (cleaned), exit 0, the manifest says which
    is a rendition and keeps Origin, CollectedFrom, Serial, Format, OriginalSize/Width/Height, the
    summary counts them on one line; --verify passes, and catches a damaged rendition by name."""
    key = mixed_album(fake, photo="Theirs: view.jpg")
    own, theirs, clip = images(fake, key)
    code, out, err = run()
    assert code == sd.EXIT_OK, err
    assert "1 album backed up, 0 unchanged, 0 failed" in err and "missing" not in err
    assert SUMMARY % "2 files" in err
    photo = "Theirs_ view.jpg"                          # cleaned as loose files are
    zip_name = "%s.zip" % key
    assert tree(run.out) == {"Mixed/" + zip_name: fake.expected_parts(key)[zip_name],
                             "Mixed/" + photo: fake.rendition_bytes(theirs.key),
                             "Mixed/Clip.mp4": fake.transcode_bytes(clip.key)}
    got = entries(run.out / "Mixed")
    assert got["Own.jpg"]["archive"] == zip_name and "rendition" not in got["Own.jpg"]
    collected = got["Theirs: view.jpg"]
    rendition = fake.rendition_bytes(theirs.key)
    assert collected["file"] == photo and collected["rendition"] is True and "transcode" not in collected
    assert collected["size"] == len(rendition) == 3000 and not collected.get("md5")   # !largestimage: no MD5
    assert {k: collected[k] for k in ("Origin", "CollectedFrom", "Serial", "Format", "OriginalSize",
                                      "OriginalWidth", "OriginalHeight", "Caption")} == {
        "Origin": "Collected", "CollectedFrom": "friend", "Serial": 0, "Format": "JPG", "OriginalSize": 5000,
        "OriginalWidth": 4000, "OriginalHeight": 3000, "Caption": "Collected from a friend"}
    assert not [k for k in collected if k.startswith("Archived")]
    video = got["Clip.mp4"]
    transcode = fake.transcode_bytes(clip.key)
    assert video["file"] == "Clip.mp4" and video["rendition"] is True and video["transcode"] is True
    assert video["size"] == len(transcode) and video["md5"] == md5(transcode)
    assert (video["Format"], video["OriginalSize"], video["OriginalWidth"], video["OriginalHeight"]) == (
        "MP4", 8000, 1920, 1080)
    record = json.loads((run.out / sd.STATE_DIR / sd.STATE_FILE).read_text())["albums"][key]
    assert record["complete"] is True                   # nothing SmugMug kept back

    code, out, err = run("--verify")
    assert code == sd.EXIT_OK and out == "", err
    path = run.out / "Mixed" / photo
    path.write_bytes(rendition + b"x")                  # known by its size only
    code, out, _ = run("--verify")
    assert code == sd.EXIT_ALBUMS_FAILED
    assert "Mixed" in out and photo in out and "Clip.mp4" not in out
    path.write_bytes(rendition)
    damaged = bytearray(transcode)                      # same size, one byte off: its MD5 tells
    damaged[100] ^= 0xFF
    (run.out / "Mixed" / "Clip.mp4").write_bytes(bytes(damaged))
    code, out, _ = run("--verify")
    assert code == sd.EXIT_ALBUMS_FAILED
    assert "MD5 mismatch for file Clip.mp4" in out and photo not in out


def test_renditions_without_size_are_checked_by_content_length(fake, run):
    """!largestimage without Size and !largestvideo without Size (made on the fly): each is saved,
    a first answer cut short of its Content-Length is fetched again, and the manifest records the
    size each came with; --verify passes."""
    key = fake.add_album("Unsized", images=[
        {"file_name": "Zipped.jpg", "size": 1700},
        {"file_name": "Shared.jpg", "size": 4000, "origin": "Collected", "collected_from": "friend",
         "largest_no_size": True},
        {"file_name": "Live.mp4", "size": 6000, "is_video": True, "archived": False, "in_zip": False,
         "video_size": 2500, "video_no_size": True}])
    _, shared, live = images(fake, key)
    fake.short_files_once = {shared.key, live.key}
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    assert SUMMARY % "2 files" in err
    got = tree(run.out)
    assert got["Unsized/Shared.jpg"] == fake.rendition_bytes(shared.key)
    assert got["Unsized/Live.mp4"] == fake.transcode_bytes(live.key)
    fetched = [e["path"] for e in fake.calls("file")]
    assert len(fetched) == 4 and len(set(fetched)) == 2           # each cut once, then whole
    files = entries(run.out / "Unsized")
    assert files["Shared.jpg"]["rendition"] is True and files["Shared.jpg"]["size"] == 2400
    assert files["Live.mp4"]["rendition"] is True and files["Live.mp4"]["size"] == 2500
    assert files["Live.mp4"]["md5"] == md5(fake.transcode_bytes(live.key))
    code, out, err = run("--verify")
    assert code == sd.EXIT_OK and out == "", err


@pytest.mark.parametrize("absent", [(), ("Serial",), ("Uris",)], ids=["both", "uris-only", "serial-only"])
def test_edited_image_rendition_uses_its_serial(fake, run, absent):
    """An edited image (Serial 1) without an original: its rendition is asked for at KEY-1, from
    the listing's Uris (asked for with _filteruri) as given where the listing has them (even with
    no Serial beside them), else built from the listed Serial."""
    fake.image_fields_absent = set(absent)
    key = fake.add_album("Edited", images=[
        {"file_name": "Edited.jpg", "size": 4100, "serial": 1, "archived": False, "in_zip": False,
         "caption": "Cropped"},
        {"file_name": "Plain.jpg", "size": 1900}])
    edited, plain = images(fake, key)
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    assert [e["path"] for e in fake.calls("largestimage")] == ["/api/v2/image/%s-1!largestimage" % edited.key]
    assert "LargestImage" in fake.calls("images")[0]["query"]["_filteruri"].split(",")
    assert tree(run.out)["Edited/Edited.jpg"] == fake.rendition_bytes(edited.key)
    entry = entries(run.out / "Edited")["Edited.jpg"]
    assert entry["rendition"] is True and entry["file"] == "Edited.jpg"
    assert ("Serial" in entry) == ("Serial" not in absent) and entry.get("Serial", 1) == 1


@pytest.mark.parametrize("name", ["Clip.MOV", "Walk.mp4"])
def test_video_archived_uri_ending_d_jpg_is_the_original(fake, run, name):
    """A video whose ArchivedUri ends -D.jpg: its original is saved under its FileName (.MOV or
    .mp4), never a name from the URL, byte for byte, and is not a rendition."""
    fake.video_archived_d_jpg = True
    fake.zip_omit_videos = True
    key = fake.add_album("Clips", images=[{"file_name": "a.jpg", "size": 2000},
                                          {"file_name": name, "size": 9000, "is_video": True}])
    video = images(fake, key)[1]
    assert fake.original_url(video).endswith("-D.jpg")
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    got = tree(run.out)
    assert sorted(got) == sorted(["Clips/%s.zip" % key, "Clips/" + name])
    assert got["Clips/" + name] == fake.original_bytes(video.key)
    entry = entries(run.out / "Clips")[name]
    assert entry["file"] == name and entry["ArchivedUri"].endswith("/D/%s-D.jpg" % name.rsplit(".", 1)[0])
    assert "rendition" not in entry and "transcode" not in entry
    assert fake.calls("video") == [] and "rendition" not in err


def test_field_types_as_smugmug_gives_them(fake, run):
    """Latitude/Longitude as numbers, ComponentFileTypes as an object, sizes as digit strings and
    a rendition without Size: no album fails; the files are right; the manifest keeps the values as
    given; --verify passes."""
    fake.latlong_as_numbers = fake.component_file_types_object = fake.sizes_as_strings = True
    fake.zip_omit_videos = True
    key = fake.add_album("Types", images=[
        {"file_name": "Geo.jpg", "size": 2500, "latitude": 38.7223, "longitude": -9.1393},
        {"file_name": "Clip.mov", "size": 9000, "is_video": True},
        {"file_name": "Shared.jpg", "size": 4000, "origin": "Collected", "collected_from": "friend",
         "largest_no_size": True}])
    geo, clip, shared = images(fake, key)
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    got = tree(run.out)
    assert got["Types/%s.zip" % key] == fake.expected_parts(key)["%s.zip" % key]
    assert got["Types/Clip.mov"] == fake.original_bytes(clip.key)
    assert got["Types/Shared.jpg"] == fake.rendition_bytes(shared.key)
    files = entries(run.out / "Types")
    assert files["Geo.jpg"]["archive"] == "%s.zip" % key
    assert files["Geo.jpg"]["Latitude"] == 38.7223 and files["Geo.jpg"]["Longitude"] == -9.1393
    assert files["Geo.jpg"]["ComponentFileTypes"] == {"Image": ["jpg"]}
    assert files["Clip.mov"]["ComponentFileTypes"] == {"Video": ["mov"]}
    assert files["Geo.jpg"]["ArchivedSize"] == "2500" and files["Geo.jpg"]["OriginalSize"] == "2500"
    assert files["Clip.mov"]["file"] == "Clip.mov" and files["Clip.mov"]["ArchivedSize"] == "9000"
    assert files["Shared.jpg"]["OriginalSize"] == "4000" and files["Shared.jpg"]["size"] == 2400
    code, out, err = run("--verify")
    assert code == sd.EXIT_OK and out == "", err


def test_no_rendition_either_is_missing_and_fails_the_album(fake, run):
    """Only when no rendition can be had either (!largestimage answers 404) is the file missing,
    with the reason in the manifest; the album fails by name (exit 1), its other files (the zip,
    a rendition) are kept; once SmugMug offers the rendition, the next run saves it."""
    key = mixed_album(fake, name="Gone")
    own, theirs, clip = images(fake, key)
    fake.no_largest_image = {theirs.key}
    code, _, err = run()
    assert code == sd.EXIT_ALBUMS_FAILED
    assert "failed: Gone: 1 file missing: SmugMug offers no original and no rendition" in err
    assert SUMMARY % "1 file" in err
    zip_name = "%s.zip" % key
    assert tree(run.out) == {"Gone/" + zip_name: fake.expected_parts(key)[zip_name],
                             "Gone/Clip.mp4": fake.transcode_bytes(clip.key)}
    files = entries(run.out / "Gone")
    assert files["Theirs.jpg"]["missing"] == "SmugMug offers no original and no rendition (Not Found)"
    assert "file" not in files["Theirs.jpg"] and "rendition" not in files["Theirs.jpg"]
    assert files["Clip.mp4"]["rendition"] is True
    fake.no_largest_image = set()
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    assert tree(run.out)["Gone/Theirs.jpg"] == fake.rendition_bytes(theirs.key)
    assert entries(run.out / "Gone")["Theirs.jpg"]["rendition"] is True


def config_given_relative(run, monkeypatch):
    """The config written, and --config given as a path relative to the working directory."""
    run.config()
    monkeypatch.chdir(run.tmp)
    code = sd.main(["--config", "config.json"])
    return code, run.capsys.readouterr().err


def test_401_api_key_lacks_v2_access(fake, run, monkeypatch):
    """A 401 with the recorded "API key lacks v2 access" answer: exit 2, one line carrying
    SmugMug's own words, what to do (accept the API terms on the developer page) and the
    absolute path of the config file given with --config."""
    with open(os.path.join(DATA, "error_401_api_key_lacks_v2.json")) as f:
        answer = json.load(f)
    fake.auth_message = answer["Message"]
    code, err = config_given_relative(run, monkeypatch)
    assert code == sd.EXIT_USAGE
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: SmugMug rejected the credentials: " + answer["Message"])
    assert "To fix: accept the API terms" in lines[0] and "developer page" in lines[0]
    assert str(run.tmp / "config.json") in lines[0]


@pytest.mark.parametrize("message", ["oauth_problem=token_expired", "oauth_problem=token_rejected",
                                     "Invalid or expired token"])
def test_401_rejected_token_says_authorize_again(fake, run, monkeypatch, message):
    """A 401 for a rejected or expired token: exit 2, one line with SmugMug's words, to run
    --authorize again, and the absolute path of the config file given with --config."""
    fake.auth_message = message
    code, err = config_given_relative(run, monkeypatch)
    assert code == sd.EXIT_USAGE
    assert err.strip() == ("Error: SmugMug rejected the credentials: %s. To fix: run --authorize again "
                           "(config file %s)" % (message, run.tmp / "config.json"))


def test_a_rerun_keeps_renditions_without_fetching_them_again(fake, run):
    """After renditions were saved: a rerun makes no per-album call (the album is unchanged);
    when the album changes, the renditions on disk (with a Size, and made on the fly without one)
    are kept, not fetched again, and the manifest still records the size each came with."""
    key = mixed_album(fake, more=[
        {"file_name": "Shared.jpg", "size": 4000, "origin": "Collected", "collected_from": "friend",
         "largest_no_size": True},
        {"file_name": "Live.mp4", "size": 6000, "is_video": True, "archived": False, "in_zip": False,
         "video_size": 2500, "video_no_size": True}])
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    assert SUMMARY % "4 files" in err
    first = tree(run.out)
    sizes = {name: e.get("size") for name, e in entries(run.out / "Mixed").items()}
    assert sizes["Shared.jpg"] == 2400 and sizes["Live.mp4"] == 2500
    calls = len(fake.log)
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    assert "0 albums backed up, 1 unchanged" in err
    assert [e for e in fake.log[calls:] if e["kind"] != "walk"] == []
    files = len(fake.calls("file"))
    fake.add_image(key, file_name="New.jpg", size=1500)          # the album changes
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    assert "backed up Mixed (changed" in err
    assert [e["path"].rsplit("/", 1)[-1] for e in fake.calls("file")[files:]] == ["New.jpg"]   # nothing else
    after = tree(run.out)
    for name in ("Theirs.jpg", "Clip.mp4", "Shared.jpg", "Live.mp4"):
        assert after["Mixed/" + name] == first["Mixed/" + name]
    got = entries(run.out / "Mixed")
    assert {name: got[name].get("size") for name in sizes} == sizes
    assert all(got[name]["rendition"] is True for name in ("Theirs.jpg", "Clip.mp4", "Shared.jpg", "Live.mp4"))
    code, out, err = run("--verify")
    assert code == sd.EXIT_OK and out == "", err


def test_a_damaged_rendition_without_size_is_fetched_again_when_the_album_changes(fake, run):
    """A rendition made on the fly (no Size, no MD5) saved before is judged by the size it came
    with: when the album changes and that copy no longer has it, it is fetched again; the intact
    one beside it is not."""
    key = fake.add_album("OnTheFly", images=[
        {"file_name": "Own.jpg", "size": 2000},
        {"file_name": "Shared.jpg", "size": 4000, "origin": "Collected", "collected_from": "friend",
         "largest_no_size": True},
        {"file_name": "Other.jpg", "size": 3000, "origin": "Collected", "collected_from": "friend",
         "largest_no_size": True}])
    _, shared, other = images(fake, key)
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    (run.out / "OnTheFly" / "Shared.jpg").write_bytes(b"cut short")
    calls = len(fake.log)
    fake.add_image(key, file_name="New.jpg", size=1500)
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    fetched = sorted(e["path"] for e in fake.log[calls:] if e["kind"] == "file")   # New.jpg on its own
    assert [p for p in fetched if not p.endswith("/New.jpg")] == ["/rendition/%s/Shared-X3.jpg" % shared.key]
    got = tree(run.out)
    assert got["OnTheFly/Shared.jpg"] == fake.rendition_bytes(shared.key)
    assert got["OnTheFly/Other.jpg"] == fake.rendition_bytes(other.key)
    files = entries(run.out / "OnTheFly")
    assert (files["Shared.jpg"]["size"], files["Other.jpg"]["size"]) == (2400, 1800)
    code, out, err = run("--verify")
    assert code == sd.EXIT_OK and out == "", err
