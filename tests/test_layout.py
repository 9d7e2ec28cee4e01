"""A photo library, not a pile of zips: capture dates, XMP sidecars, the files layout, index.csv."""

import csv
import datetime
import os
import xml.etree.ElementTree as ET

import smugmug_download as sd

NS = {"x": "adobe:ns:meta/", "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
      "dc": "http://purl.org/dc/elements/1.1/", "exif": "http://ns.adobe.com/exif/1.0/",
      "photoshop": "http://ns.adobe.com/photoshop/1.0/"}
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"

CAPTION = 'Fish & chips <at> "Café" – Zürich'
TAKEN = "2019-01-12T21:06:08-08:00"


def epoch(text):
    return datetime.datetime.fromisoformat(text).timestamp()


def read_xmp(text):
    """{property: value} of an XMP sidecar, read back by a real XML parser."""
    root = ET.fromstring(text.encode("utf-8"))
    desc = root.find("rdf:RDF/rdf:Description", NS)
    out = {}
    for tag in ("title", "description"):
        li = desc.find("dc:%s/rdf:Alt/rdf:li" % tag, NS)
        if li is not None:
            assert li.get(XML_LANG) == "x-default"
            out[tag] = li.text
    bag = desc.findall("dc:subject/rdf:Bag/rdf:li", NS)
    if bag:
        out["subject"] = [li.text for li in bag]
    for prefix, name in (("exif", "DateTimeOriginal"), ("photoshop", "DateCreated"), ("exif", "GPSLatitude"),
                         ("exif", "GPSLongitude"), ("exif", "GPSAltitude"), ("exif", "GPSAltitudeRef")):
        node = desc.find("%s:%s" % (prefix, name), NS)
        if node is not None:
            out[name] = node.text
    return out


# -- pure helpers --

def test_capture_time_prefers_original_then_uploaded_then_date():
    """DateTimeOriginal, else DateTimeUploaded, else Date, each with its offset as given."""
    fields = {"DateTimeOriginal": TAKEN, "DateTimeUploaded": "2020-01-01T00:00:00+00:00",
              "Date": "2021-01-01T00:00:00+00:00"}
    assert sd.capture_time(fields) == (TAKEN, epoch(TAKEN))
    del fields["DateTimeOriginal"]
    assert sd.capture_time(fields)[1] == epoch("2020-01-01T00:00:00+00:00")
    fields["DateTimeUploaded"] = "not a time"
    assert sd.capture_time(fields)[1] == epoch("2021-01-01T00:00:00+00:00")
    assert sd.capture_time({}) == (None, None)


def test_xmp_sidecar_reads_back_with_escapes_and_accents():
    """Title, caption, keywords, capture time and place come back from a real XML parser
    exactly, with & < > " and non-ASCII text; GPS in XMP's DD,MM.mmmk form; altitude a
    rational with its reference (1: below sea level)."""
    fields = {"Title": "<Title> & more", "Caption": CAPTION + "\x01", "KeywordArray": ["a&b", "Ærø", "x<y"],
              "Keywords": "ignored", "DateTimeOriginal": TAKEN, "Latitude": "59.35258", "Longitude": "-18.5",
              "Altitude": -12.5}
    got = read_xmp(sd.xmp_sidecar(fields))
    assert got["title"] == "<Title> & more"
    assert got["description"] == CAPTION          # a control character XML cannot hold is left out
    assert got["subject"] == ["a&b", "Ærø", "x<y"]
    assert got["DateTimeOriginal"] == got["DateCreated"] == TAKEN
    assert got["GPSLatitude"] == "59,21.154800N" and got["GPSLongitude"] == "18,30.000000W"
    assert got["GPSAltitude"] == "12500/1000" and got["GPSAltitudeRef"] == "1"


def test_xmp_sidecar_without_place_or_words():
    """0, 0 is SmugMug's "no place": no GPS; Keywords as a ;-string when no KeywordArray."""
    got = read_xmp(sd.xmp_sidecar({"Latitude": "0.00000000000000", "Longitude": "0", "Keywords": "sea; sun"}))
    assert got == {"subject": ["sea", "sun"]}


def test_sidecar_names_by_style():
    """ext: the full name + .xmp; noext: the stem, the photo first, a video sharing its stem
    falling back to the full form; none: no sidecars; never a file's own name."""
    files = [("IMG_1.MOV", True), ("IMG_1.JPG", False), ("IMG_2.jpg", False), ("IMG_3.xmp", False),
             ("IMG_3.jpg", False)]
    assert sd.sidecar_names(files, "ext")["IMG_1.MOV"] == "IMG_1.MOV.xmp"
    noext = sd.sidecar_names(files, "noext")
    assert noext["IMG_1.JPG"] == "IMG_1.xmp" and noext["IMG_1.MOV"] == "IMG_1.MOV.xmp"
    assert noext["IMG_2.jpg"] == "IMG_2.xmp" and noext["IMG_3.jpg"] == "IMG_3.jpg.xmp"
    assert sd.sidecar_names(files, "none") == {}


def test_index_rows_of_a_manifest():
    """A row per listed file with where its bytes are, and rows for a "former" section."""
    doc = {"files": [{"FileName": "a.jpg", "ImageKey": "K1", "archive": "x.zip", "entry": "a.jpg",
                      "ArchivedSize": 3, "ArchivedMD5": "ABC", "Caption": CAPTION, "KeywordArray": ["k"],
                      "Latitude": "1.5", "Longitude": "2.5", "DateTimeOriginal": TAKEN, "WebUri": "https://w/i-K1"},
                     {"FileName": "b.jpg", "ImageKey": "K2", "file": "b.jpg"}],
           "former": [{"FileName": "c.jpg", "ImageKey": "K3", "archive": "x.zip", "entry": "c.jpg"},
                      {"FileName": "d.jpg", "ImageKey": "K4", "file": "d.jpg", "status": "replaced"}]}
    rows = [dict(zip(sd.INDEX_COLUMNS, r)) for r in sd.index_rows(doc, "Al/bum")]
    assert [r["status"] for r in rows] == ["current", "current", "deleted on SmugMug", "replaced"]
    assert rows[0]["archive"] == "Al/bum/x.zip" and rows[0]["entry"] == "a.jpg" and rows[0]["MD5"] == "abc"
    assert rows[0]["caption"] == CAPTION and rows[0]["latitude"] == "1.50000000" and rows[0]["taken"] == TAKEN
    assert rows[1]["file"] == "Al/bum/b.jpg" and rows[1]["archive"] == ""


# -- end to end --

def test_a_top_level_album_named_like_the_index_gets_its_own_folder(fake, run):
    """index.csv at the top of output_dir is the tool's: a SmugMug album of that name (any case)
    takes " (NodeID)", as one named like the state folder does, and the index is still written."""
    fake.add_album("Index.CSV", sizes=(1500,))
    code, _, err = run()
    assert code == 0, err
    assert os.path.isfile(run.out / "index.csv")
    folders = [n for n in os.listdir(run.out) if n.startswith("Index.CSV")]
    assert len(folders) == 1 and folders[0] != "Index.CSV" and os.path.isdir(run.out / folders[0]), folders


def test_loose_files_are_dated_when_taken(fake, run):
    """A file the zip lacks, saved on its own, has its capture time as its mtime; its bytes are
    the original's."""
    key = fake.add_album("Mixed", images=[
        {"file_name": "In.jpg", "size": 2000},
        {"file_name": "Out.jpg", "size": 2500, "in_zip": False, "date_time_original": None,
         "date_time_uploaded": "2018-05-06T07:08:09+02:00"}])
    code, _, err = run()
    assert code == 0, err
    path = run.out / "Mixed" / "Out.jpg"
    assert path.read_bytes() == fake.original_bytes(fake.albums[key].images[1].key)
    assert path.stat().st_mtime == epoch("2018-05-06T07:08:09+02:00")


def library_account(fake):
    """Albums whose photos carry what a library needs: captions with & < and accents, titles,
    keywords, places, capture times with offsets; a video; a case-only name clash; a file the
    zip lacks; an album in two parts. {album key: local path}."""
    images = [
        {"file_name": "IMG_0001.JPG", "size": 2100, "title": "Zürich <Altstadt>", "caption": CAPTION,
         "keywords": ["été", "a&b"], "date_time_original": TAKEN, "latitude": 47.3769, "longitude": 8.5417,
         "altitude": 408},
        {"file_name": "IMG_0001.MOV", "size": 2600, "is_video": True, "caption": "the clip",
         "date_time_original": None, "date_time_uploaded": "2019-01-13T10:00:00+01:00"},
        {"file_name": "img_0001.jpg", "size": 1900, "title": "case clash", "keywords": ["x"],
         "date_time_original": "2018-07-01T12:00:00+00:00"},
        {"file_name": "Lacking.jpg", "size": 1500, "in_zip": False, "caption": "on its own",
         "date_time_original": "2017-03-04T05:06:07-05:00"},
    ]
    trip = fake.add_folder("Trips")
    one = fake.add_album("Zürich & Co", trip, images=images)
    two = fake.add_album("Two Parts", images=[
        {"file_name": "P%d.jpg" % i, "size": 1200 + i, "caption": "part photo %d" % i,
         "date_time_original": "2016-0%d-01T08:00:00+00:00" % i} for i in range(1, 5)], part_limit=2500)
    return {one: "Trips/Zürich & Co", two: "Two Parts"}


def check_library(fake, out, paths, sidecar="ext"):
    """Every listed file a plain file in its album's folder with the original's bytes, dated
    when taken, with its sidecar read back; no zip in the album tree."""
    for key, rel in paths.items():
        doc = manifest_of(out / rel)
        names = [item["file"] for item in doc["files"]]
        assert len(set(n.casefold() for n in names)) == len(fake.albums[key].images) == len(names)
        for item, image in zip(doc["files"], fake.albums[key].images):
            path = out / rel / item["file"]
            assert path.read_bytes() == fake.original_bytes(image.key), item
            when = image.date_time_original or image.date_time_uploaded
            assert path.stat().st_mtime == epoch(when)
            side = out / rel / item["sidecar"]
            assert item["sidecar"] == (item["file"] + ".xmp" if sidecar == "ext" else item["sidecar"])
            got = read_xmp(side.read_text(encoding="utf-8"))
            assert got.get("description") == (image.caption or None)
            assert got.get("title") == (image.title or None)
            assert got.get("subject") == (list(image.keywords) or None)
            assert got["DateTimeOriginal"] == when
    for root, _dirs, names in os.walk(out):
        if sd.STATE_DIR not in root:
            assert not [n for n in names if n.endswith((".zip", ".part"))], (root, names)


def manifest_of(folder):
    import json
    with open(folder / sd.MANIFEST_NAME, encoding="utf-8") as f:
        return json.load(f)


def read_index(out):
    with open(out / "index.csv", encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def test_files_layout_new_backup(fake, run):
    """A new backup in the files layout: zips arrive in the tool's own folder and are unpacked,
    every file plain, dated, with its sidecar; the rerun downloads nothing."""
    paths = library_account(fake)
    code, _, err = run("--layout", "files")
    assert code == 0, err
    check_library(fake, run.out, paths)
    assert not os.path.exists(run.out / sd.STATE_DIR / sd.TRANSPORT_DIR) or not os.listdir(
        run.out / sd.STATE_DIR / sd.TRANSPORT_DIR)
    sent, calls = fake.download_bytes, len(fake.log)
    code, _, err = run("--layout", "files")
    assert code == 0, err
    assert fake.download_bytes == sent and [e for e in fake.log[calls:] if e["kind"] != "walk"] == []


def test_switch_zips_to_files_downloads_nothing(fake, run):
    """A zips backup switched to files unpacks the checked zips on disk (not one download), the
    zips go to versions; later a new photo costs only its own bytes, and a caption edited on
    SmugMug rewrites the sidecar (the old one to versions) without downloading the photo."""
    paths = library_account(fake)
    assert run()[0] == 0
    zips = sum(1 for rel in paths.values() for n in os.listdir(run.out / rel) if n.endswith(".zip"))
    assert zips == 3
    code, out, _ = run("--layout", "files", "--dry-run")
    assert code == 0 and "unpack    Two Parts" in out and "2 unpack" in out
    sent, calls = fake.download_bytes, len(fake.log)
    code, _, err = run("--layout", "files")
    assert code == 0, err
    assert fake.download_bytes == sent
    assert {e["kind"] for e in fake.log[calls:]} <= {"walk", "images", "album"}    # listed, not one download
    check_library(fake, run.out, paths)
    versions = run.out / sd.STATE_DIR / sd.VERSIONS_DIR
    kept = [n for _r, _d, names in os.walk(versions) for n in names if n.endswith(".zip")]
    assert len(kept) == 3
    # an unchanged rerun downloads nothing
    calls = len(fake.log)
    assert run("--layout", "files")[0] == 0
    assert [e for e in fake.log[calls:] if e["kind"] != "walk"] == []
    # a photo added later costs its own bytes only
    (key, rel), = [(k, r) for k, r in paths.items() if r == "Two Parts"]
    added = fake.add_image(key, file_name="New.jpg", size=1777, caption="new", date_time_original=TAKEN)
    sent = fake.download_bytes
    code, _, err = run("--layout", "files")
    assert code == 0, err
    assert fake.download_bytes - sent == 1777
    check_library(fake, run.out, paths)
    # a caption edited on SmugMug: the sidecar rewritten, nothing downloaded
    image = fake.albums[key].images[0]
    old_side = (run.out / rel / "P1.jpg.xmp").read_text(encoding="utf-8")
    image.caption = "edited: <b> & ü"
    fake.albums[key].last_updated += datetime.timedelta(seconds=1)     # what SmugMug does on an edit
    sent = fake.download_bytes
    code, _, err = run("--layout", "files")
    assert code == 0, err
    assert fake.download_bytes == sent
    check_library(fake, run.out, paths)
    assert added.key in {i["ImageKey"] for i in manifest_of(run.out / rel)["files"]}
    assert any(open(os.path.join(r, n), encoding="utf-8").read() == old_side
               for r, _d, names in os.walk(versions) for n in names if n == "P1.jpg.xmp")


def check_index(fake, out, paths):
    """index.csv: one current row per listed file, its bytes where the row says (a plain file, or
    an entry of a zip part), the metadata as SmugMug lists it, accents intact."""
    import zipfile
    rows = [r for r in read_index(out) if r["status"] == "current"]
    listed = {(rel, im.key): im for key, rel in paths.items() for im in fake.albums[key].images}
    assert sorted((r["album"], r["ImageKey"]) for r in rows) == sorted(listed)
    for r in rows:
        image = listed[(r["album"], r["ImageKey"])]
        if r["file"]:
            data = (out / r["file"]).read_bytes()
        else:
            with zipfile.ZipFile(out / r["archive"]) as z:
                data = z.read(r["entry"])
        assert data == fake.original_bytes(image.key)
        assert (r["FileName"], r["caption"], r["title"]) == (image.file_name, image.caption, image.title)
        assert r["keywords"] == "; ".join(image.keywords) and r["size"] == str(image.size)
        assert r["taken"] == (image.date_time_original or image.date_time_uploaded)
        assert r["web address"].endswith("/i-%s" % image.key)
        if image.latitude:
            assert float(r["latitude"]) == image.latitude and float(r["longitude"]) == image.longitude
    return rows


def test_index_in_both_layouts_and_deleted_photos(fake, run):
    """index.csv has a row for every listed file in the zips layout and in the files layout,
    and a photo deleted on SmugMug is still listed, with where its last copy is."""
    paths = library_account(fake)
    assert run()[0] == 0
    with open(run.out / "index.csv", "rb") as f:
        assert f.read(3) == b"\xef\xbb\xbf"          # the BOM spreadsheets look for
    rows = check_index(fake, run.out, paths)
    assert {r["album"] for r in rows} == {"Trips/Zürich & Co", "Two Parts"}
    assert any(r["caption"] == CAPTION and r["archive"] for r in rows)
    key = [k for k, r in paths.items() if r == "Two Parts"][0]
    album = fake.albums[key]
    removed = album.images.pop(1)
    album.last_updated += datetime.timedelta(seconds=1)
    album.images_last_updated = album.last_updated
    assert run()[0] == 0
    check_index(fake, run.out, paths)
    (row,) = [r for r in read_index(run.out) if r["status"] != "current"]
    assert (row["status"], row["ImageKey"]) == ("deleted on SmugMug", removed.key)
    with zipfile_open(run.out / row["archive"]) as z:
        assert z.read(row["entry"]) == removed.content().whole()
    assert run("--layout", "files")[0] == 0
    rows = check_index(fake, run.out, paths)
    assert all(r["file"] and not r["archive"] for r in rows)
    assert [r["ImageKey"] for r in read_index(run.out) if r["status"] == "deleted on SmugMug"] == [removed.key]
    # SmugMug replaces the bytes of every photo of the album: each old copy is listed as replaced
    before = {im.key: im.content().whole() for im in album.images}
    fake.touch(key)
    assert run("--layout", "files")[0] == 0
    check_index(fake, run.out, paths)
    replaced = [r for r in read_index(run.out) if r["status"] == "replaced"]
    assert sorted(r["ImageKey"] for r in replaced) == sorted(before)
    for r in replaced:
        assert r["file"].startswith(".smugmug_download/versions/")
        assert (run.out / r["file"]).read_bytes() == before[r["ImageKey"]]


def zipfile_open(path):
    import zipfile
    return zipfile.ZipFile(path)


def test_verify_files_layout(fake, run):
    """--verify reads every plain file of a files-layout backup by MD5 and finds each sidecar;
    a damaged file and a missing sidecar are named, and the next run puts both right."""
    paths = library_account(fake)
    assert run("--layout", "files")[0] == 0
    code, out, err = run("--verify")
    assert code == 0, out + err
    rel = paths[[k for k, r in paths.items() if r == "Two Parts"][0]]
    target = run.out / rel / "P2.jpg"
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))          # the same size: only the MD5 tells
    os.remove(run.out / rel / "P3.jpg.xmp")
    code, out, err = run("--verify")
    assert code == 1
    assert "MD5 mismatch for file P2.jpg" in out and "sidecar P3.jpg.xmp missing" in out
    assert run("--layout", "files")[0] == 0
    assert run("--verify")[0] == 0
    check_library(fake, run.out, paths)


def test_a_lost_sidecar_is_written_again(fake, run):
    """A sidecar gone from the disk is written again by the next run, nothing downloaded."""
    key = fake.add_album("Solo", images=[{"file_name": "A.jpg", "caption": "ça & là"}])
    assert run("--layout", "files")[0] == 0
    os.remove(run.out / "Solo" / "A.jpg.xmp")
    sent = fake.download_bytes
    assert run("--layout", "files")[0] == 0
    assert read_xmp((run.out / "Solo" / "A.jpg.xmp").read_text(encoding="utf-8"))["description"] == "ça & là"
    assert fake.download_bytes == sent and key


def test_noext_sidecars_and_bad_config(fake, run):
    """xmp_sidecars "noext": IMG_0001.xmp for the photo, the video sharing its stem falls back to
    IMG_0001.MOV.xmp; a layout the tool does not know is one line and exit 2."""
    paths = library_account(fake)
    code, _, err = run("--layout", "files", xmp_sidecars="noext")
    assert code == 0, err
    check_library(fake, run.out, paths, sidecar="noext")
    folder = run.out / "Trips/Zürich & Co"
    assert read_xmp((folder / "IMG_0001.xmp").read_text(encoding="utf-8"))["description"] == CAPTION
    assert read_xmp((folder / "IMG_0001.MOV.xmp").read_text(encoding="utf-8"))["description"] == "the clip"
    code, _, err = run(layout="folders")
    assert code == 2 and err.count("\n") == 1 and "layout must be one of zips, files" in err


def test_files_back_to_zips_leaves_albums_until_they_change(fake, run):
    """Turning files off: unchanged albums stay as files (nothing downloaded); a changed one is
    backed up from a new archive, its plain files and sidecars going to versions."""
    paths = library_account(fake)
    assert run("--layout", "files")[0] == 0
    sent = fake.download_bytes
    assert run()[0] == 0
    assert fake.download_bytes == sent
    check_library(fake, run.out, paths)
    key = [k for k, r in paths.items() if r == "Two Parts"][0]
    fake.touch(key)
    assert run()[0] == 0
    names = sorted(os.listdir(run.out / "Two Parts"))
    assert names == sorted(fake.expected_parts(key)) + [sd.MANIFEST_NAME]
    check_index(fake, run.out, paths)


def test_index_memory_does_not_grow_with_the_account(tmp_path):
    """index.csv is written row by row from one manifest at a time: writing it for ten times
    the albums takes about the same peak memory."""
    import json
    import tracemalloc

    def peak(albums):
        out = tmp_path / ("out%d" % albums)
        state = sd.BackupState(str(out))
        for i in range(albums):
            rel = "Folder/Album %04d" % i
            os.makedirs(out / rel)
            files = [{"FileName": "IMG_%04d.jpg" % j, "ImageKey": "K%d_%d" % (i, j), "file": "IMG_%04d.jpg" % j,
                      "ArchivedSize": 1000 + j, "ArchivedMD5": "%032x" % j, "Caption": CAPTION * 3,
                      "DateTimeOriginal": TAKEN} for j in range(40)]
            with open(out / rel / sd.MANIFEST_NAME, "w", encoding="utf-8") as f:
                json.dump({"files": files}, f)
            state.albums["A%d" % i] = sd.AlbumRecord("A%d" % i, "N%d" % i, rel, files=[sd.SavedFile("x", 1, "file")])
        store = sd.Store(str(out), sd.run_stamp(), state)
        tracemalloc.start()
        try:
            rows = store.write_index(sd.index_lines(str(out), state))
            return tracemalloc.get_traced_memory()[1], rows
        finally:
            tracemalloc.stop()

    small, rows_small = peak(10)
    large, rows_large = peak(100)
    assert (rows_small, rows_large) == (10 * 40, 100 * 40)
    assert large < small * 1.5, (small, large)


def test_unpack_checks_each_entry_against_the_listing(tmp_path):
    """Store.unpack writes each wanted entry to NAME.part; of two entries of one name it takes
    the one with the listed MD5; an entry that is not the file listed is BadArchive."""
    import hashlib
    import zipfile
    import warnings
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")             # zipfile warns of the duplicate name we want
        z.writestr("Album/x.jpg", b"wrong bytes")
        z.writestr("Album/x.jpg", b"right bytes")
        z.writestr("Album/y.jpg", b"y bytes")
    good = hashlib.md5(b"right bytes").hexdigest()
    got = sd.Store.unpack(str(path), "a.zip", {"Album/x.jpg": ("x.jpg", good), "Album/y.jpg": ("y.jpg", "")},
                          str(tmp_path))
    assert got == {"x.jpg": 11, "y.jpg": 7}
    assert (tmp_path / "x.jpg.part").read_bytes() == b"right bytes"
    try:
        sd.Store.unpack(str(path), "a.zip", {"Album/y.jpg": ("y.jpg", good)}, str(tmp_path))
    except sd.BadArchive as exc:
        assert "a.zip: 1 entry missing or not the file listed" in str(exc)
    else:
        raise AssertionError("an entry that is not the file listed was taken")
