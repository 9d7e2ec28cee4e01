"""An album that changes costs what changed (issue 25), and a file is held by its identity,
never its name (issue 28, findings 1 and 12): end to end against the emulator."""

import io
import os
import signal
import zipfile
import zlib

import pytest

import smugmug_download as sd
from conftest import manifest, spawn, tree, wait_for
from test_not_a_mirror import changed, state_of, versions


def photos(n, size=3000):
    return [{"file_name": "IMG_%04d.jpg" % (i + 1), "size": size + i} for i in range(n)]


def posts(fake):
    return len(fake.calls(method="POST"))


def fetched(fake, since):
    """File names fetched on their own since log entry `since`."""
    return sorted(e["path"].rsplit("/", 1)[-1] for e in fake.log[since:] if e["kind"] == "file")


def unzip_then_loose(folder):
    """{name: bytes}: every zip part of the folder unzipped, then the files of their own over it."""
    files, loose = {}, {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".zip"):
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    files[info.filename] = z.read(info)
        elif name != sd.MANIFEST_NAME and not name.endswith(".part"):
            with open(path, "rb") as f:
                loose[name] = f.read()
    files.update(loose)
    return files


def current(fake, key):
    """{FileName: bytes} of the album as SmugMug has it now."""
    return {im.file_name: fake.original_bytes(im.key) for im in fake.albums[key].images}


def replaced_then_run(fake, run, image):
    """The image's bytes replaced on SmugMug, then a run (exit 0): where the log stood before it."""
    fake.replace_image(image.key)
    calls = len(fake.log)
    code, _, err = run()
    assert code == 0, err
    return calls


def verified(run):
    """--verify passes (exit 0, no damaged line)."""
    code, out, err = run("--verify")
    assert code == 0 and out == "", out + err
    return True


def test_a_new_photo_is_fetched_on_its_own_and_the_parts_stay(fake, run):
    """Fetch only what changed, and kept parts: two photos added to a two-part album are
    fetched on their own (no archive asked for); both parts stay where they are byte for byte,
    only the old manifest goes to versions; the manifest says where each file is."""
    key = fake.add_album("Grows", images=photos(6), part_limit=9100)
    assert run()[0] == 0
    first = tree(run.out)
    assert len([n for n in first if n.endswith(".zip")]) == 2
    before, calls, sent = posts(fake), len(fake.log), fake.download_bytes
    new = [fake.add_image(key, file_name="NEW_%d.jpg" % i, size=2000 + i) for i in range(2)]
    code, _, err = run()
    assert code == 0, err
    assert posts(fake) == before and fetched(fake, calls) == ["NEW_0.jpg", "NEW_1.jpg"]
    assert fake.download_bytes - sent == 4001
    after = tree(run.out)
    assert {n: v for n, v in after.items() if n.endswith(".zip")} == first
    assert list(versions(run.out)) == ["Grows/" + sd.MANIFEST_NAME]
    doc = manifest(run.out / "Grows")
    where = {f["FileName"]: f for f in doc["files"]}
    assert all("archive" in where["IMG_%04d.jpg" % (i + 1)] for i in range(6))
    assert [where[im.file_name].get("file") for im in new] == ["NEW_0.jpg", "NEW_1.jpg"]
    assert sorted(p["file"] for p in doc["parts"]) == sorted(n.split("/")[1] for n in first)
    record = state_of(run.out)["albums"][key]
    assert sorted(f["name"] for f in record["files"] if f["kind"] == "archive") == sorted(
        n.split("/")[1] for n in first)
    assert unzip_then_loose(run.out / "Grows") == current(fake, key)
    assert verified(run)
    calls = len(fake.log)
    assert run()[0] == 0 and all(e["kind"] == "walk" for e in fake.log[calls:])   # then unchanged


def test_a_replaced_photo_lands_beside_the_zip_and_the_manifest_says_so(fake, run):
    """The replaced photo: its new bytes are fetched on its own under its FileName beside the zip
    that still holds the old ones; the manifest's former section names the old entry
    ("replaced"); unzipping, then the files of their own over it, gives the album as SmugMug
    has it now; --verify checks the old entry too, and the section is carried forward."""
    key = fake.add_album("Wedding", images=photos(4))
    assert run()[0] == 0
    (zip_name,) = [n for n in os.listdir(run.out / "Wedding") if n.endswith(".zip")]
    old_zip = (run.out / "Wedding" / zip_name).read_bytes()
    target = fake.albums[key].images[1]
    old_bytes = fake.original_bytes(target.key)
    calls = replaced_then_run(fake, run, target)
    assert fetched(fake, calls) == [target.file_name] and (run.out / "Wedding" / zip_name).read_bytes() == old_zip
    assert (run.out / "Wedding" / target.file_name).read_bytes() == fake.original_bytes(target.key) != old_bytes
    doc = manifest(run.out / "Wedding")
    assert [f.get("file") for f in doc["files"] if f["ImageKey"] == target.key] == [target.file_name]
    assert [(f["ImageKey"], f["archive"], f["entry"], f["status"]) for f in doc["former"]] == [
        (target.key, zip_name, target.file_name, "replaced")]
    assert unzip_then_loose(run.out / "Wedding") == current(fake, key)
    assert verified(run)
    fake.add_image(key, file_name="later.jpg", size=1000)          # carried forward
    assert run()[0] == 0
    doc = manifest(run.out / "Wedding")
    assert [(f["ImageKey"], f["status"]) for f in doc["former"]] == [(target.key, "replaced")]
    fake.albums[key].images.remove(target)                         # then deleted on SmugMug
    changed(fake, key)
    assert run()[0] == 0
    doc = manifest(run.out / "Wedding")
    assert [(f["ImageKey"], f["status"]) for f in doc["former"]] == [(target.key, "deleted on SmugMug")]
    assert (run.out / "Wedding" / zip_name).read_bytes() == old_zip
    # --verify checks the former entry too: other bytes (a sound zip, its CRC made to match)
    (run.out / "Wedding" / zip_name).write_bytes(other_bytes_in_entry(old_zip, target.file_name))
    code, out, _ = run("--verify")
    assert code == sd.EXIT_ALBUMS_FAILED and "MD5 mismatch for file %s" % target.file_name in out


def other_bytes_in_entry(data, name):
    """The zip data with one byte of entry name's bytes changed and its CRC in the central
    directory made to match: a sound zip of the same size holding other bytes."""
    data = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        info = z.getinfo(name)
        start = info.header_offset + 30 + int.from_bytes(data[info.header_offset + 26:info.header_offset + 28],
                                                          "little") + \
            int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    data[start + 5] ^= 0xFF
    crc = zlib.crc32(bytes(data[start:start + info.compress_size]))
    at = data.find(b"PK\x01\x02" + data[info.header_offset + 4:info.header_offset + 6])
    while at >= 0:
        length = int.from_bytes(data[at + 28:at + 30], "little")
        if bytes(data[at + 46:at + 46 + length]) == name.encode():
            data[at + 16:at + 20] = crc.to_bytes(4, "little")
            return bytes(data)
        at = data.find(b"PK\x01\x02", at + 4)
    raise AssertionError("no central directory entry for %s" % name)


def test_a_caption_edit_writes_a_new_manifest_and_downloads_nothing(fake, run):
    """A metadata-only change: a new manifest (the old one to versions), no photo downloaded,
    no archive asked for."""
    key = fake.add_album("Captions", images=photos(3))
    assert run()[0] == 0
    first = tree(run.out)
    target = fake.albums[key].images[0]
    fake.edit_image(target.key, caption="A new caption", keywords=["new"])
    before, sent = posts(fake), fake.download_bytes
    code, _, err = run()
    assert code == 0, err
    assert posts(fake) == before and fake.download_bytes == sent
    assert tree(run.out) == first and list(versions(run.out)) == ["Captions/" + sd.MANIFEST_NAME]
    entry = [f for f in manifest(run.out / "Captions")["files"] if f["ImageKey"] == target.key][0]
    assert entry["Caption"] == "A new caption" and entry["KeywordArray"] == ["new"] and "archive" in entry


def test_zips_mostly_of_replaced_photos_are_compacted(fake, run):
    """Compaction: once more than half of the kept parts' bytes hold no current file, the next
    backup takes a fresh archive and the old part and the files of their own go to versions."""
    key = fake.add_album("Compact", images=photos(4))
    assert run()[0] == 0
    (zip_name,) = [n for n in os.listdir(run.out / "Compact") if n.endswith(".zip")]
    old_zip = (run.out / "Compact" / zip_name).read_bytes()
    images = fake.albums[key].images
    fake.replace_image(images[0].key)
    assert run()[0] == 0
    assert manifest(run.out / "Compact")["former"] and (run.out / "Compact" / images[0].file_name).exists()
    before = posts(fake)
    fake.replace_image(images[1].key)          # now 3 of 4 entries replaced: more than half
    fake.replace_image(images[2].key)
    code, _, err = run()
    assert code == 0, err
    assert posts(fake) == before + 1
    assert tree(run.out) == {"Compact/" + n: v for n, v in fake.expected_parts(key).items()}
    assert "former" not in manifest(run.out / "Compact")
    kept = versions(run.out)
    assert kept["Compact/" + zip_name] == old_zip and "Compact/" + images[0].file_name in kept
    assert verified(run)


def test_a_part_deleted_or_damaged_on_disk_costs_only_its_files(fake, run):
    """Small damage costs small downloads: one part of three deleted, then another damaged (its
    size changed): each time only the photos that part held are fetched, on their own; the
    damaged copy goes to versions; the other parts stay."""
    key = fake.add_album("Three", images=photos(6), part_limit=6100)
    assert run()[0] == 0
    first = tree(run.out)
    names = sorted(n.split("/")[1] for n in first)
    assert len(names) == 3
    os.remove(run.out / "Three" / names[0])
    before, calls = posts(fake), len(fake.log)
    code, _, err = run()
    assert code == 0, err
    assert posts(fake) == before and fetched(fake, calls) == ["IMG_0001.jpg", "IMG_0002.jpg"]
    with open(run.out / "Three" / names[1], "ab") as f:
        f.write(b"!")
    damaged = (run.out / "Three" / names[1]).read_bytes()
    calls = len(fake.log)
    code, _, err = run()
    assert code == 0, err
    assert posts(fake) == before and fetched(fake, calls) == ["IMG_0003.jpg", "IMG_0004.jpg"]
    assert versions(run.out)["Three/" + names[1]] == damaged
    assert (run.out / "Three" / names[2]).read_bytes() == first["Three/" + names[2]]
    assert sorted(os.listdir(run.out / "Three")) == sorted(["IMG_%04d.jpg" % i for i in range(1, 5)]
                                                           + [names[2], sd.MANIFEST_NAME])
    assert unzip_then_loose(run.out / "Three") == current(fake, key)
    assert verified(run)


def test_a_kill_in_the_middle_of_a_delta_update_loses_nothing_and_resumes(fake, run):
    """Killed (SIGKILL) while the new photos of a changed album are downloading: the zip and
    manifest of the previous backup are untouched, no file is at its final name unfinished;
    the next run resumes and completes the album."""
    key = fake.add_album("Killed", images=photos(3, size=300_000))
    assert run()[0] == 0
    first = tree(run.out, manifests=True)
    big = fake.add_image(key, file_name="BIG.jpg", size=400_000)
    fake.bandwidth = 200_000
    proc = spawn(run.config())
    partial = run.out / "Killed" / "BIG.jpg.part"
    assert wait_for(lambda: partial.exists() and partial.stat().st_size >= 50_000, timeout=30)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (run.out / "Killed" / "BIG.jpg").exists()
    assert {n: v for n, v in tree(run.out, manifests=True).items() if not n.endswith(".part")} == first
    fake.bandwidth = 10 ** 9          # (not None: the killed run's stream may still be sending)
    sent = fake.download_bytes
    calls = len(fake.log)
    code, _, err = run()
    assert code == 0, err
    ranges = [e["query"].get("range") for e in fake.log[calls:] if e["kind"] == "file"]
    assert len(ranges) == 1 and ranges[0] and ranges[0].startswith("bytes=")
    assert fake.download_bytes - sent < big.size
    assert (run.out / "Killed" / "BIG.jpg").read_bytes() == fake.original_bytes(big.key)
    assert unzip_then_loose(run.out / "Killed") == current(fake, key)
    assert verified(run)


@pytest.mark.parametrize("with_manifest", [True, False])
def test_a_new_file_never_takes_over_an_old_file_of_the_same_name(fake, run, with_manifest):
    """Finding 28.1: a collected photo (no size, no MD5) Shared.jpg is saved; a new collected
    Shared.jpg, listed before it, is fetched (it is another photo), and the old one is held by
    its own bytes: by the manifest's record of its identity, or without a manifest, fetched
    again (nothing proves the file on disk is it; the old file goes to versions)."""
    key = fake.add_album("Collected", images=[
        {"file_name": "Own.jpg", "size": 2000},
        {"file_name": "Shared.jpg", "size": 4000, "origin": "Collected", "collected_from": "friend",
         "largest_no_size": True}])
    assert run()[0] == 0
    old = fake.albums[key].images[1]
    if not with_manifest:
        os.remove(run.out / "Collected" / sd.MANIFEST_NAME)
    new = fake.make_image(fake.albums[key], file_name="Shared.jpg", size=5000, origin="Collected",
                          collected_from="other", largest_no_size=True)
    fake.albums[key].images.insert(0, new)
    changed(fake, key)
    calls = len(fake.log)
    code, _, err = run()
    assert code == 0, err
    where = {f["ImageKey"]: f["file"] for f in manifest(run.out / "Collected")["files"] if "file" in f}
    got = tree(run.out)
    assert got["Collected/" + where[old.key]] == fake.rendition_bytes(old.key)
    assert got["Collected/" + where[new.key]] == fake.rendition_bytes(new.key)
    if with_manifest:
        assert where[old.key] == "Shared.jpg" and fetched(fake, calls) == ["Shared-X3.jpg"]
    else:
        assert versions(run.out)["Collected/Shared.jpg"] == fake.rendition_bytes(old.key)
    assert verified(run)


def test_without_a_manifest_the_zip_on_disk_still_says_what_the_backup_holds(fake, run):
    """Finding 28.12: the manifest deleted, the album changes, its new zip lacks clip.mov and
    SmugMug refuses its original: the old zip (its only copy, as the zip on disk shows) stays
    where it is, nothing goes to versions, and the album fails by name."""
    key = fake.add_album("NoManifest", images=[{"file_name": "beach.jpg", "size": 3000},
                                               {"file_name": "clip.mov", "size": 5000, "is_video": True}])
    assert run()[0] == 0
    os.remove(run.out / "NoManifest" / sd.MANIFEST_NAME)
    first = tree(run.out)
    clip = fake.albums[key].images[1]
    fake.touch(key)
    fake.zip_omit_videos = True
    fake.refuse_originals = {clip.key}
    code, _, err = run()
    assert code == sd.EXIT_ALBUMS_FAILED, err
    assert "failed: NoManifest: SmugMug no longer gives clip.mov, which the previous backup has" in err
    assert {n: v for n, v in tree(run.out).items() if not n.endswith(".part")} == first
    assert versions(run.out) == {}


def test_the_dry_run_says_what_a_changed_album_would_fetch(fake, run):
    """The dry run lists a changed album's files (and says so): how many files it would fetch
    on its own, or that it would take a fresh archive; it downloads and writes nothing."""
    grows = fake.add_album("Grows", images=photos(6), part_limit=6100)
    redone = fake.add_album("Redone", images=photos(2))
    assert run()[0] == 0
    fake.add_image(grows, file_name="new.jpg", size=1000)
    fake.touch(redone)
    first, parts = tree(run.out, manifests=True), sorted(n for n in os.listdir(run.out / "Grows") if ".zip" in n)
    before, sent = posts(fake), fake.download_bytes
    code, out, err = run("--dry-run")
    assert code == 0, err
    lines = dict(line.split(None, 1)[1].split(" (", 1) for line in out.splitlines() if line.startswith("changed"))
    assert lines["Grows"] == "files listed: 1 file to fetch on its own, no archive; 1 old file to versions)"
    assert lines["Redone"].startswith("files listed: a fresh archive")
    assert posts(fake) == before and fake.download_bytes == sent
    assert tree(run.out, manifests=True) == first
    os.remove(run.out / "Grows" / parts[0])           # a part deleted: its photos, and it is not to versions
    code, out, err = run("--dry-run")
    lines = dict(line.split(None, 1)[1].split(" (", 1) for line in out.splitlines() if line.startswith("changed"))
    assert lines["Grows"] == "files listed: 3 files to fetch on its own, no archive; 1 old file to versions)"


def test_a_file_without_md5_is_held_by_its_lastupdated_not_its_name(fake, run):
    """Identity without an MD5: a collected photo (its rendition has no size and no MD5)
    replaced on SmugMug keeps its ImageKey and FileName, and gets a new LastUpdated: it is
    fetched again, the old copy goes to versions; the unchanged one beside it is not fetched."""
    key = fake.add_album("Renditions", images=[
        {"file_name": "Own.jpg", "size": 2000},
        {"file_name": "A.jpg", "size": 4000, "origin": "Collected", "collected_from": "f", "largest_no_size": True},
        {"file_name": "B.jpg", "size": 3000, "origin": "Collected", "collected_from": "f", "largest_no_size": True}])
    assert run()[0] == 0
    a = fake.albums[key].images[1]
    before = fake.rendition_bytes(a.key)
    calls = replaced_then_run(fake, run, a)
    assert fetched(fake, calls) == ["A-X3.jpg"]
    assert (run.out / "Renditions" / "A.jpg").read_bytes() == fake.rendition_bytes(a.key) != before
    assert versions(run.out)["Renditions/A.jpg"] == before
    assert verified(run)


def test_the_rule_for_a_changed_album():
    """delta_or_archive: compaction past half of the kept parts' bytes, an archive past half of
    the album's bytes to fetch, else the files on their own (the boundaries are not past)."""
    assert sd.delta_or_archive(needed=100, listed=1000, dead=0, kept=900) == ""
    assert sd.delta_or_archive(needed=500, listed=1000, dead=450, kept=900) == ""
    assert sd.delta_or_archive(needed=501, listed=1000, dead=0, kept=900).startswith("501 B of its")
    assert sd.delta_or_archive(needed=0, listed=1000, dead=451, kept=900).startswith("compaction")
    assert sd.delta_or_archive(needed=10, listed=10, dead=0, kept=0) != ""      # nothing kept: an archive
    assert sd.known_sizes([10, None, 30]) == [10, 20, 30] and sd.known_sizes([None]) == [1]


def test_same_file_is_identity_never_the_name():
    """same_file: ImageKey and FileName, then the MD5 where SmugMug gives one, else the size
    where given and LastUpdated and Serial; nothing to prove it by is not the same file."""
    def listed(key="K", name="a.jpg", size=None, md5="", **fields):
        return sd.ListedFile(key, name, archived_size=size, archived_md5=md5, fields=tuple(fields.items()))
    item = {"ImageKey": "K", "FileName": "a.jpg", "ArchivedSize": 5, "ArchivedMD5": "ab", "LastUpdated": "t1",
            "Serial": 0}
    assert sd.same_file(listed(size=5, md5="ab"), item)
    assert not sd.same_file(listed(size=5, md5="cd"), item)
    assert not sd.same_file(listed(key="J", size=5, md5="ab"), item)
    assert not sd.same_file(listed(name="b.jpg", size=5, md5="ab"), item)
    assert sd.same_file(listed(LastUpdated="t1", Serial=0), item)
    assert not sd.same_file(listed(LastUpdated="t2", Serial=0), item)
    assert not sd.same_file(listed(LastUpdated="t1", Serial=1), item)
    assert not sd.same_file(listed(size=6, LastUpdated="t1"), item)
    assert not sd.same_file(listed(), item)


def test_a_file_verify_found_damaged_is_fetched_again_when_the_album_changes(fake, run):
    """A file of its own with other bytes of the same size: --verify finds it; the album then
    changes (a photo added): the damaged file is not trusted by its size, it is fetched again
    (the damaged copy to versions) with the new photo, and nothing else."""
    fake.zip_omit_videos = True
    key = fake.add_album("Clips", images=[{"file_name": "v.mp4", "size": 6000, "is_video": True}] + photos(4))
    assert run()[0] == 0
    path = run.out / "Clips" / "v.mp4"
    damaged = bytes(b ^ 0xFF if i == 100 else b for i, b in enumerate(path.read_bytes()))
    path.write_bytes(damaged)
    assert run("--verify")[0] == sd.EXIT_ALBUMS_FAILED
    fake.add_image(key, file_name="b.jpg", size=1000)
    calls = len(fake.log)
    code, _, err = run()
    assert code == 0, err
    assert fetched(fake, calls) == ["b.jpg", "v.mp4"]
    assert posts(fake) == 1 and path.read_bytes() == fake.original_bytes(fake.albums[key].images[0].key)
    assert versions(run.out)["Clips/v.mp4"] == damaged
    assert verified(run)
