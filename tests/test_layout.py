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
