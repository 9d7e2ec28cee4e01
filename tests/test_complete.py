"""Complete backups (issue #11): every listed file of every album accounted for, byte for
byte, with its captions in metadata.json; what the zips lack is fetched on its own."""

import hashlib
import json
import os
import re

import fake_smugmug
import smugmug_download as sd
from conftest import expected_tree, manifest, tree


def files_by_name(fake, key):
    """{FileName: original bytes} of an album's images."""
    originals = fake.expected_files(key)
    return {img.file_name: originals[img.key] for img in fake.albums[key].images}


def test_rich_account_manifests_and_bytes(fake, run):
    """Captions, keywords, a video, clashing names in one part and across parts: every part
    byte-identical, every listed file in metadata.json with its fields and where it is."""
    keys = fake_smugmug.rich_account(fake)
    code, _, err = run()
    assert code == 0, err
    got = tree(run.out)
    for key in keys.values():
        node = fake.nodes[fake.albums[key].node_id]
        folder = run.out / os.path.relpath(album_dir(fake, node), "")
        doc = manifest(folder)
        assert doc["album"]["AlbumKey"] == key and doc["album"]["NodeID"] == node.node_id
        listed = fake.albums[key].images
        assert [f["ImageKey"] for f in doc["files"]] == [i.key for i in listed]
        for entry, image in zip(doc["files"], listed):
            assert entry["FileName"] == image.file_name
            assert entry["ArchivedUri"] == fake.original_url(image)
            assert "LargestImage" in entry["Uris"] and ("LargestVideo" in entry["Uris"]) == image.is_video
            assert entry.get("Caption", "") == image.caption and entry.get("Title", "") == image.title
            data = located_bytes(folder, entry)
            assert hashlib.md5(data).hexdigest() == hashlib.md5(fake.expected_files(key)[image.key]).hexdigest()
    for path, data in expected_tree(fake, {k: album_dir(fake, fake.nodes[fake.albums[k].node_id])
                                           for k in keys.values()}).items():
        assert got[path] == data
    assert "files checked" in err


def album_dir(fake, node):
    """The local path of an album node whose names need no cleaning."""
    names = []
    while node.parent:
        names.append(node.name)
        node = fake.nodes[node.parent]
    return "/".join(reversed(names))


def located_bytes(folder, entry):
    """The bytes a manifest entry points at: a zip entry or a loose file."""
    import zipfile
    if "archive" in entry:
        with zipfile.ZipFile(os.path.join(folder, entry["archive"])) as z:
            return z.read(entry["entry"])
    with open(os.path.join(folder, entry["file"]), "rb") as f:
        return f.read()


def test_videos_left_out_of_the_zip_are_fetched_on_their_own(fake, run):
    """A zip without the album's video: the original is fetched from ArchivedUri, checked by
    MD5, saved under its FileName beside the zip; the manifest says where."""
    fake.zip_omit_videos = True
    key = fake.add_album("Holiday", images=[{"file_name": "a.jpg", "size": 3000},
                                            {"file_name": "clip.mov", "size": 9000, "is_video": True}])
    code, _, err = run()
    assert code == 0, err
    got = tree(run.out)
    video = [i for i in fake.albums[key].images if i.is_video][0]
    assert got["Holiday/clip.mov"] == fake.expected_files(key)[video.key]
    doc = manifest(run.out / "Holiday")
    assert doc["files"][1]["file"] == "clip.mov" and doc["files"][0]["archive"] == "%s.zip" % key
    assert re.search(r"1 fetched on its own \([\d.]+ K?B\)", err), err


def test_a_video_without_original_comes_from_largestvideo(fake, run):
    """No ArchivedUri for a video the zip lacks: its largest transcode is fetched and the
    manifest says it is a transcode."""
    fake.zip_omit_videos = True
    key = fake.add_album("Clips", images=[{"file_name": "a.jpg", "size": 2000},
                                          {"file_name": "clip.mov", "size": 9000, "is_video": True,
                                           "archived": False}])
    code, _, err = run()
    assert code == 0, err
    video = [i for i in fake.albums[key].images if i.is_video][0]
    assert tree(run.out)["Clips/clip.mov"] == fake.transcode_bytes(video.key)
    assert manifest(run.out / "Clips")["files"][1]["transcode"] is True


def test_renamed_clashes_match_without_fetching(fake, run):
    """Equal names renamed -1 (or " (1)") inside one part, and equal names across parts, all match
    the listing by name and size: nothing is fetched on its own."""
    for style in ("-1", " (1)"):
        fake.zip_clash = style
        key = fake.add_album("Clash %s" % style.strip(), part_limit=7000,
                             images=[{"file_name": "IMG.JPG", "size": 3000}, {"file_name": "IMG.JPG", "size": 3001},
                                     {"file_name": "IMG.JPG", "size": 3002}, {"file_name": "IMG.JPG", "size": 3003}])
        assert len(fake.albums[key].parts()) == 2
    code, _, err = run()
    assert code == 0, err
    assert fake.calls("file") == []
    for name in ("Clash -1", "Clash (1)"):
        doc = manifest(run.out / name)
        assert all("archive" in f for f in doc["files"])
        assert len({(f["archive"], f["entry"]) for f in doc["files"]}) == 4


def test_a_corrupt_part_is_fetched_again(fake, run):
    """A part served once with a flipped byte (same length) fails its CRC test and is downloaded
    again; the final zip is the right one."""
    key = fake.add_album("Flip", sizes=(20_000, 5000))
    fake.corrupt_once = {key}
    code, _, err = run()
    assert code == 0, err
    assert tree(run.out) == expected_tree(fake, {key: "Flip"})
    assert "CRC error" in err


def test_a_loose_file_with_wrong_bytes_is_fetched_again(fake, run):
    """A file the zip lacks, served once with wrong bytes, is fetched again after its MD5 check."""
    fake.zip_omit_videos = True
    key = fake.add_album("V", images=[{"file_name": "a.jpg", "size": 1000},
                                      {"file_name": "v.mp4", "size": 7000, "is_video": True}])
    video = fake.albums[key].images[1]
    fake.wrong_file_once = {video.key}
    code, _, err = run()
    assert code == 0, err
    assert tree(run.out)["V/v.mp4"] == fake.expected_files(key)[video.key]
    assert len(fake.calls("file")) == 2


def test_refused_and_unoffered_files_fail_the_album_by_name(fake, run):
    """A file SmugMug refuses (403) and one with no original offered are recorded as missing
    with the reason; the album fails by name (exit 1) with every other file kept; the next run
    looks again."""
    fake.zip_omit_videos = True
    key = fake.add_album("Guarded", images=[{"file_name": "ok.jpg", "size": 2000},
                                            {"file_name": "v1.mov", "size": 3000, "is_video": True},
                                            {"file_name": "v2.mov", "size": 3000, "is_video": True}])
    v1, v2 = fake.albums[key].images[1:]
    fake.refuse_originals = {v1.key}
    fake.file_url_signature = "cdn-signature-7f3a"      # the refusal echoes the signed URL
    fake.albums[key].images[2].archived = False
    fake.no_largest_video = {v2.key}
    code, out, err = run("--verbose")
    assert code == sd.EXIT_ALBUMS_FAILED
    assert "Guarded: 2 files missing" in err
    got = tree(run.out)
    assert got["Guarded/%s.zip" % key] == fake.expected_parts(key)["%s.zip" % key]
    doc = manifest(run.out / "Guarded")
    assert "refused" in doc["files"][1]["missing"] and doc["files"][2]["missing"]
    assert "/original/%s/v1.mov?..." % v1.key in doc["files"][1]["missing"]
    assert doc["files"][1]["ArchivedUri"] == fake.original_url(v1).split("?")[0]
    state = (run.out / sd.STATE_DIR / sd.STATE_FILE).read_text()
    texts = [out, err, (run.out / "Guarded" / sd.MANIFEST_NAME).read_text(), state]
    assert not [t for t in texts if "cdn-signature-7f3a" in t]
    fake.refuse_originals = set()
    calls = len(fake.log)
    code, _, err = run()
    assert code == sd.EXIT_ALBUMS_FAILED and "1 file missing" in err
    assert any(e["kind"] == "images" for e in fake.log[calls:])
    assert "missing" not in manifest(run.out / "Guarded")["files"][1]
    code, out, err = run("--verify")          # intact, and the summary says what SmugMug kept back
    assert code == 0 and out == ""
    assert "all intact; 1 album lacks files SmugMug did not give" in err


def test_an_album_smugmug_will_not_archive_is_saved_file_by_file(fake, run):
    """An archive that always ends in Error: after the retries every file is fetched on its own,
    the album counts as backed up, and the summary says so."""
    key = fake.add_album("NoZip", images=[{"file_name": "a.jpg", "size": 2000}, {"file_name": "b.jpg", "size": 2500}])
    fake.error_always = {key}
    code, _, err = run()
    assert code == 0, err
    assert tree(run.out) == {"NoZip/a.jpg": fake.expected_files(key)[fake.albums[key].images[0].key],
                             "NoZip/b.jpg": fake.expected_files(key)[fake.albums[key].images[1].key]}
    assert "1 album saved file by file" in err
    calls = len(fake.log)
    assert run()[0] == 0
    assert [e for e in fake.log[calls:] if e["kind"] != "walk"] == []


def test_files_still_processing_are_taken_next_run(fake, run):
    """A file SmugMug is still processing is recorded as such, not fetched, and the next run
    (the album counts as changed) fetches it once it is ready."""
    fake.zip_omit_videos = True
    key = fake.add_album("Fresh", images=[{"file_name": "a.jpg", "size": 2000},
                                          {"file_name": "new.mp4", "size": 4000, "is_video": True,
                                           "processing": True}])
    code, _, err = run()
    assert code == 0, err
    assert manifest(run.out / "Fresh")["files"][1]["missing"] == "still processing on SmugMug"
    fake.albums[key].images[1].processing = False
    code, _, err = run()
    assert code == 0, err
    assert tree(run.out)["Fresh/new.mp4"] == fake.expected_files(key)[fake.albums[key].images[1].key]
    assert manifest(run.out / "Fresh")["files"][1]["file"] == "new.mp4"


def test_a_backup_from_an_earlier_version_gets_its_manifest_without_downloading_again(sample, run):
    """A version 1 backup (parts only, no manifest): the next run lists and checks what is on
    disk, writes metadata.json, and downloads no archive again."""
    assert run()[0] == 0
    path = run.out / sd.STATE_DIR / sd.STATE_FILE
    state = json.loads(path.read_text())
    old = {"version": 1, "albums": {}, "partials": {}}
    for key, record in state["albums"].items():
        old["albums"][key] = {k: record[k] for k in ("AlbumKey", "NodeID", "path", "LastUpdated", "ImagesLastUpdated")}
        old["albums"][key]["parts"] = [{"FileName": f["name"], "size": f["size"]} for f in record["files"]]
        manifest_path = run.out / record["path"] / sd.MANIFEST_NAME
        if manifest_path.exists():
            manifest_path.unlink()
    path.write_text(json.dumps(old))
    calls = len(sample.log)
    code, _, err = run()
    assert code == 0, err
    new = sample.log[calls:]
    assert [e for e in new if e["kind"] in ("post", "download-get", "archive", "file")] == []
    assert len([e for e in new if e["kind"] == "images"]) == 14
    assert (run.out / "Family" / "Big Trip" / sd.MANIFEST_NAME).exists()
    assert json.loads(path.read_text())["version"] == sd.STATE_VERSION
