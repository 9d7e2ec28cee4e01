"""The seams between issue 25 (an album that changes costs what changed; retention) and issue 26
(the files layout, capture dates, XMP sidecars, index.csv): each defect a review reproduced,
end to end against the emulator."""

import csv
import os
import zipfile

import pytest

import smugmug_download as sd
from conftest import tree
from test_not_a_mirror import changed


def photos(n, size=3000):
    return [{"file_name": "IMG_%04d.jpg" % (i + 1), "size": size + i} for i in range(n)]


def index_of(out):
    with open(out / sd.INDEX_NAME, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def bytes_at(out, row):
    """The bytes index.csv says a row's copy has: its file, or its entry of its zip part."""
    if row["file"]:
        return (out / row["file"]).read_bytes()
    with zipfile.ZipFile(out / row["archive"]) as z:
        return z.read(row["entry"])


def check_rows(fake, out, held):
    """Every row of index.csv names a copy that is there with the row's bytes (its MD5), and
    every photo in held (ImageKey: bytes, not current) has a row whose copy has those bytes."""
    import hashlib
    rows = index_of(out)
    for row in rows:
        assert hashlib.md5(bytes_at(out, row)).hexdigest() == row["MD5"], row
    found = {(r["ImageKey"], hashlib.md5(bytes_at(out, r)).hexdigest()) for r in rows if r["status"] != "current"}
    for key, data in held.items():
        assert (key, hashlib.md5(data).hexdigest()) in found, (key, rows)
    return rows


def test_index_names_the_last_copy_of_a_deleted_photo_after_its_zip_moved_to_versions(fake, run):
    """A photo deleted on SmugMug, still held by a kept zip (the manifest's former), then that zip
    moved to versions (a switch to the files layout), then every other version pruned: index.csv
    still lists the photo, where its last copy is (the zip in versions), never at a path in the
    album that no longer holds it."""
    key = fake.add_album("Al", images=photos(4))
    assert run()[0] == 0
    album = fake.albums[key]
    gone_bytes = fake.original_bytes(album.images[0].key)
    gone = album.images.pop(0)
    changed(fake, key)
    old = album.images[0]
    old_bytes = fake.original_bytes(old.key)
    fake.replace_image(old.key)
    assert run()[0] == 0                                   # kept zip: former deleted + replaced
    check_rows(fake, run.out, {gone.key: gone_bytes, old.key: old_bytes})
    assert run("--layout", "files")[0] == 0                # the zip goes to versions
    check_rows(fake, run.out, {gone.key: gone_bytes, old.key: old_bytes})
    code, _, err = run("--layout", "files", "--keep-versions-days", "0")
    assert code == 0, err
    rows = check_rows(fake, run.out, {gone.key: gone_bytes})
    assert [r["status"] for r in rows if r["ImageKey"] == gone.key] == ["deleted on SmugMug"]


def test_index_follows_parts_a_fresh_archive_replaced(fake, run):
    """A deleted photo in a kept part, then a fresh archive (most of the album replaced): the old
    parts go to versions and new parts of the same names take their place; index.csv names the
    copies in versions, and after pruning, only the copies still there."""
    key = fake.add_album("Al", images=photos(4), part_limit=6100)
    assert run()[0] == 0
    album = fake.albums[key]
    gone_bytes = fake.original_bytes(album.images[0].key)
    gone = album.images.pop(0)
    changed(fake, key)
    assert run()[0] == 0
    olds = {im.key: fake.original_bytes(im.key) for im in album.images[:2]}
    for im in album.images[:2]:
        fake.replace_image(im.key)
    code, out, err = run()
    assert code == 0 and "2 parts (" in out + err, out + err      # a fresh archive, same part names
    check_rows(fake, run.out, dict(olds, **{gone.key: gone_bytes}))
    code, _, err = run("--keep-versions-days", "0")
    assert code == 0, err
    check_rows(fake, run.out, {gone.key: gone_bytes})


def dry_line(run, name, *args, **extra):
    code, out, err = run("--dry-run", *args, **extra)
    assert code == 0, err
    (line,) = [ln for ln in out.splitlines() if ln.split()[1:2] == [name]]
    return line


def test_the_dry_run_counts_the_sidecars_a_run_would_move_to_versions(fake, run):
    """A changed album with XMP sidecars (files layout; zips layout with xmp_sidecars): the dry
    run's "N old files to versions" is what the run then moves: the replaced photo, the sidecar
    whose caption changed, the manifest; never every sidecar of the album."""
    for layout, name in (("zips", "Zip"), ("files", "Lib")):
        key = fake.add_album(name, images=[dict(p, in_zip=layout == "files" or i > 1) for i, p in enumerate(photos(5))])
        assert run(layout=layout, xmp_sidecars="ext")[0] == 0
        album = fake.albums[key]
        fake.replace_image(album.images[0].key)
        fake.edit_image(album.images[1].key, caption="now with a caption")
        line = dry_line(run, name, layout=layout, xmp_sidecars="ext")
        assert "no archive; 3 old files to versions)" in line, line
        code, out, err = run(layout=layout, xmp_sidecars="ext")
        assert code == 0 and ", 3 to versions)" in out + err, out + err


def test_a_files_layout_album_that_grows_in_the_zips_layout_stays_files(fake, run):
    """Turning files off: an album of plain files that gains a photo is planned like any changed
    album (what the README says): the new photo alone is fetched, no archive asked for, its
    files stay where they are; a fresh archive (most of it changed) makes it zips again."""
    key = fake.add_album("Lib", images=photos(6))
    assert run("--layout", "files")[0] == 0
    files = {n: (run.out / "Lib" / n).read_bytes() for n in os.listdir(run.out / "Lib") if n.endswith(".jpg")}
    new = fake.add_image(key, file_name="NEW.jpg", size=1000)
    posts, sent = len(fake.calls(method="POST")), fake.download_bytes
    assert run()[0] == 0
    assert len(fake.calls(method="POST")) == posts and fake.download_bytes - sent == new.size
    assert all((run.out / "Lib" / n).read_bytes() == data for n, data in files.items())
    assert (run.out / "Lib" / "NEW.jpg").read_bytes() == fake.original_bytes(new.key)
    assert not [n for n in os.listdir(run.out / "Lib") if n.endswith((".zip", ".xmp"))]
    fake.touch(key)
    changed(fake, key)                                   # (a second later than the photo added)
    assert run()[0] == 0
    assert sorted(os.listdir(run.out / "Lib")) == sorted(fake.expected_parts(key)) + [sd.MANIFEST_NAME]


def test_a_caption_with_half_an_emoji_is_backed_up_in_both_layouts(fake, run):
    """SmugMug's JSON may carry a lone UTF-16 surrogate (a caption cut in the middle of an emoji:
    "\\ud83d"). The album is backed up all the same, in both layouts: its manifest keeps the
    text as SmugMug gave it (read back equal), the sidecar is XML a parser reads, index.csv is
    UTF-8; a rerun rewrites nothing and --verify passes."""
    from test_layout import read_xmp
    cut = "sunset \ud83d"
    for layout, name in (("zips", "Zips"), ("files", "Files")):
        key = fake.add_album(name, images=[{"file_name": "A.jpg", "caption": cut, "keywords": ["x\udc00"]},
                                           {"file_name": "B.jpg", "in_zip": False, "title": cut}])
        code, out, err = run(layout=layout, xmp_sidecars="ext")
        assert code == 0, out + err
        doc = sd.read_manifest(str(run.out / name / sd.MANIFEST_NAME))
        assert [f.get("Caption") for f in doc["files"]][0] == cut
        xmp = read_xmp((run.out / name / "B.jpg.xmp").read_text(encoding="utf-8"))
        assert xmp["title"] == "sunset "
        rows = {r["FileName"]: r for r in index_of(run.out) if r["album"] == name}
        assert rows["A.jpg"]["caption"].startswith("sunset ") and rows["B.jpg"]["title"].startswith("sunset ")
        before = tree(run.out, manifests=True)
        assert run(layout=layout, xmp_sidecars="ext")[0] == 0
        assert tree(run.out, manifests=True) == before and key
        code, out, err = run("--verify")
        assert code == 0, out + err


def test_index_keeps_a_deleted_photo_of_an_album_renamed_since(fake, run):
    """A photo deleted on SmugMug (its last copy in versions, under the album's path then), then
    the album renamed: index.csv still lists the photo, under the album's new path, where its
    copy is."""
    key = fake.add_album("Before", images=photos(3))
    assert run(layout="files")[0] == 0
    album = fake.albums[key]
    gone_bytes = fake.original_bytes(album.images[0].key)
    gone = album.images.pop(0)
    changed(fake, key)
    assert run(layout="files")[0] == 0
    check_rows(fake, run.out, {gone.key: gone_bytes})
    fake.rename(album.node_id, "After")
    changed(fake, key)
    assert run(layout="files")[0] == 0
    rows = check_rows(fake, run.out, {gone.key: gone_bytes})
    assert {r["album"] for r in rows} == {"After"}


def test_the_dry_run_of_a_switch_says_what_a_changed_album_would_fetch(fake, run):
    """--dry-run --layout files on a zips backup whose album gained a photo: the album's line says
    its zips would be unpacked and how many files it would fetch (the one photo), as the run
    then does; nothing is downloaded by the dry run."""
    key = fake.add_album("Al", images=photos(6))
    assert run()[0] == 0
    new = fake.add_image(key, file_name="NEW.jpg", size=1000)
    sent = fake.download_bytes
    line = dry_line(run, "Al", "--layout", "files")
    assert fake.download_bytes == sent
    assert "its 1 zip part unpacked, 1 file to fetch on its own, no archive" in line, line
    code, out, err = run("--layout", "files")
    assert code == 0 and "6 unpacked, 1 fetched on its own" in out + err, out + err
    assert fake.download_bytes - sent == new.size


def test_a_sidecar_an_application_edited_stays_until_smugmugs_metadata_changes(fake, run):
    """darktable and digiKam write their edits into IMG.jpg.xmp. The album changing on SmugMug
    (another photo added) leaves that sidecar as it is (its photo's metadata did not change);
    a caption edited on SmugMug for that photo writes it again, the edited one to versions."""
    from test_layout import read_xmp
    from test_not_a_mirror import versions
    key = fake.add_album("Al", images=[dict(p, caption="first") for p in photos(3)])
    assert run(layout="files")[0] == 0
    side = run.out / "Al" / "IMG_0001.jpg.xmp"
    edited = side.read_text(encoding="utf-8").replace(
        "</rdf:Description>", "<dc:rights>mine</dc:rights></rdf:Description>")
    side.write_text(edited, encoding="utf-8")
    fake.add_image(key, file_name="NEW.jpg", size=1000, caption="new")
    assert run(layout="files")[0] == 0
    assert side.read_text(encoding="utf-8") == edited
    assert not [n for n in versions(run.out) if n.endswith(".xmp")]
    code, out, err = run("--verify")
    assert code == 0, out + err
    fake.edit_image(fake.albums[key].images[0].key, caption="second")
    line = dry_line(run, "Al", layout="files")
    assert "2 old files to versions" in line, line
    assert run(layout="files")[0] == 0
    assert read_xmp(side.read_text(encoding="utf-8"))["description"] == "second"
    assert [v for n, v in versions(run.out).items() if n.endswith(".xmp")] == [edited.encode("utf-8")]


def test_a_kill_in_the_middle_of_a_switch_to_files_loses_nothing_and_downloads_nothing(fake, run):
    """Killed (SIGKILL) while a switch to the files layout unpacks an album's zip: no file is at
    its final name unfinished, the zip is still whole (in the album or in versions); the next
    run finishes the switch without a download, and --verify passes."""
    import signal
    from conftest import spawn, wait_for
    from test_not_a_mirror import versions
    key = fake.add_album("Big", images=photos(8, size=2_000_000))
    assert run()[0] == 0
    folder = run.out / "Big"
    (zip_name,) = [n for n in os.listdir(folder) if n.endswith(".zip")]
    whole = (folder / zip_name).read_bytes()
    proc = spawn(run.config(layout="files"))
    assert wait_for(lambda: any(".jpg" in n for n in os.listdir(folder)), timeout=30, step=0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    listed = {im.file_name: fake.original_bytes(im.key) for im in fake.albums[key].images}
    for name in os.listdir(folder):
        if name.endswith(".jpg"):
            assert (folder / name).read_bytes() == listed[name], name
    assert whole in [(folder / zip_name).read_bytes() if (folder / zip_name).exists() else None,
                     versions(run.out).get("Big/" + zip_name)]
    sent = fake.download_bytes
    code, out, err = run(layout="files")
    assert code == 0, out + err
    assert fake.download_bytes == sent
    assert {n: (folder / n).read_bytes() for n in os.listdir(folder) if n.endswith(".jpg")} == listed
    assert versions(run.out)["Big/" + zip_name] == whole
    code, out, err = run("--verify")
    assert code == 0, out + err


def test_index_says_deleted_for_the_photos_of_an_album_emptied_on_smugmug(fake, run):
    """Every photo of an album deleted on SmugMug (the album stays, empty): its files are kept,
    and index.csv says they are deleted on SmugMug, where they are; not "current"."""
    key = fake.add_album("Emptied", images=photos(2))
    fake.add_album("Kept", images=photos(1))
    assert run()[0] == 0
    fake.albums[key].images.clear()
    changed(fake, key)
    assert run()[0] == 0
    rows = check_rows(fake, run.out, {})
    assert sorted((r["album"], r["status"]) for r in rows) == [
        ("Emptied", "deleted on SmugMug"), ("Emptied", "deleted on SmugMug"), ("Kept", "current")]


def test_index_rows_of_a_former_photo_carry_its_date_place_and_address(fake, run):
    """A photo deleted on SmugMug that a kept zip still holds (the manifest's former): its row in
    index.csv has what a current row has: its capture time (here only DateTimeUploaded), place,
    keywords and web address."""
    key = fake.add_album("Al", images=[dict(p, date_time_original=None, date_time_uploaded="2018-05-06T07:08:09+02:00",
                                            latitude=47.5, longitude=8.25, keywords=["a", "b"]) for p in photos(3)])
    assert run()[0] == 0
    before = {r["ImageKey"]: r for r in index_of(run.out)}
    album = fake.albums[key]
    gone = album.images.pop(0)
    changed(fake, key)
    assert run()[0] == 0
    (row,) = [r for r in index_of(run.out) if r["status"] != "current"]
    assert row["archive"] and row["ImageKey"] == gone.key
    assert {k: v for k, v in row.items() if k != "status"} == {
        k: v for k, v in before[gone.key].items() if k != "status"}


@pytest.mark.parametrize("seed", [2, 5])
def test_a_year_of_changes_across_both_layouts_keeps_every_photo_findable(fake, run, seed):
    """An album that grows, loses photos, has photos replaced and captions edited, is switched
    between the layouts both ways, taken again whole (all replaced) and pruned with
    --keep-versions-days 0, in a random order: after every run, each current row of index.csv
    has SmugMug's bytes now, every row's copy is where it says with its MD5, every photo ever
    deleted is still listed with its copy, and --verify passes."""
    import datetime
    import hashlib
    import random
    rnd = random.Random(seed)
    key = fake.add_album("Al", images=photos(10), part_limit=12500)
    album, deleted, layout = fake.albums[key], {}, "zips"
    assert run(layout=layout)[0] == 0
    steps = ["grow", "delete", "replace", "edit", "switch", "grow", "delete", "replace", "switch", "touch",
             "prune"] + [rnd.choice(["grow", "delete", "replace", "edit", "switch", "touch", "prune"]) for _ in range(8)]
    for step in steps:
        if step == "grow":
            fake.add_image(key, file_name="N%d.jpg" % rnd.randrange(10 ** 6), size=2000 + rnd.randrange(1000))
        elif step == "delete" and len(album.images) > 2:
            im = rnd.choice(album.images)
            deleted[im.key] = fake.original_bytes(im.key)
            album.images.remove(im)
            changed(fake, key)
        elif step == "replace":
            fake.replace_image(rnd.choice(album.images).key)
        elif step == "edit":
            fake.edit_image(rnd.choice(album.images).key, caption="edited %d" % rnd.randrange(100))
        elif step == "touch":
            was = album.last_updated
            fake.touch(key)
            album.last_updated = album.images_last_updated = max(album.last_updated, was + datetime.timedelta(seconds=1))
        elif step == "switch":
            layout = "files" if layout == "zips" else "zips"
        code, out, err = run(*(("--keep-versions-days", "0") if step == "prune" else ()), layout=layout)
        assert code == 0, (step, out + err)
        rows = check_rows(fake, run.out, deleted)
        now = {r["ImageKey"]: r["MD5"] for r in rows if r["status"] == "current"}
        assert now == {im.key: hashlib.md5(fake.original_bytes(im.key)).hexdigest() for im in album.images}, step
        code, out, err = run("--verify")
        assert code == 0, (step, out + err)


def test_a_damaged_zip_found_by_a_switch_to_files_costs_only_its_files(fake, run):
    """Small damage costs small downloads in a switch too: one of two zip parts on disk has a CRC
    error when the switch to files unpacks it; the other part is unpacked, the photos the damaged
    one held are fetched on their own (no archive asked for), the damaged copy goes to versions."""
    from test_not_a_mirror import versions
    key = fake.add_album("Al", images=photos(6), part_limit=9100)
    assert run()[0] == 0
    parts = sorted(n for n in os.listdir(run.out / "Al") if n.endswith(".zip"))
    with zipfile.ZipFile(run.out / "Al" / parts[0]) as z:
        held = [i.filename for i in z.infolist()]
    path = run.out / "Al" / parts[0]
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF
    path.write_bytes(bytes(data))
    posts, sent = len(fake.calls(method="POST")), fake.download_bytes
    code, out, err = run(layout="files")
    assert code == 0, out + err
    assert len(fake.calls(method="POST")) == posts
    images = {im.file_name: im for im in fake.albums[key].images}
    assert fake.download_bytes - sent == sum(images[n].size for n in held)
    for name, im in images.items():
        assert (run.out / "Al" / name).read_bytes() == fake.original_bytes(im.key)
    assert versions(run.out)["Al/" + parts[0]] == bytes(data)
    code, out, err = run("--verify")
    assert code == 0, out + err
