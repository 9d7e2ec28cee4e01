"""Plausible variants of SmugMug's answers (shared/smugmug-api.md, the UNCERTAIN points and the
recorded answers): the real script against the emulator over HTTP, byte for byte."""

import csv
import datetime
import json
import os
import re
import zipfile

import pytest

import smugmug_download as sd
from conftest import expected_tree, manifest, tree


def album_files(fake, key, rel):
    return expected_tree(fake, {key: rel})


# Paging ######################################################################

def test_images_pages_without_next_page_are_read_to_their_total(fake, run):
    """A !images page whose Pages says Total > Start+Count-1 but has no NextPage (as the recorded
    bzimmer album_images_HZMsPf_page_1.json): the next page is asked for, so a video the zip
    leaves out, listed on page 2, is still saved."""
    key = fake.add_album("V", images=[{"file_name": "a.jpg", "size": 1000},
                                      {"file_name": "b.jpg", "size": 1000},
                                      {"file_name": "clip.mov", "size": 5000, "is_video": True}])
    fake.zip_omit_videos = True
    fake.images_max_count = 2
    fake.omit_next_page = True
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    video = [im for im in fake.albums[key].images if im.is_video][0]
    assert tree(run.out) == dict(album_files(fake, key, "V"), **{"V/clip.mov": video.content().whole()})
    assert [e["query"].get("start") for e in fake.calls("images")] == [None, "3"]


def test_children_pages_without_next_page_are_read_to_their_total(fake, run):
    """The same shape on !children: every album of a folder listed over three pages is found."""
    keys = [fake.add_album("Album %d" % i) for i in range(5)]
    fake.max_count = 2
    fake.omit_next_page = True
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    assert tree(run.out) == expected_tree(fake, {k: "Album %d" % i for i, k in enumerate(keys)})


def test_a_guessed_page_that_is_missing_ends_the_list_but_the_walk_is_incomplete(fake, run):
    """Pages says more exist, without NextPage, and the page guessed from it answers 404 (a
    server that replays recorded first pages): the list ends there and nothing read is dropped
    (those albums are backed up), but a list shorter than its Total is not whole: the folder
    fails by name (exit 1), and no album is called gone."""
    keys = [fake.add_album("Album %d" % i) for i in range(5)]
    fake.max_count = 3
    fake.omit_next_page = True
    fake.later_pages_missing = True
    code, _, err = run()
    assert code == sd.EXIT_ALBUMS_FAILED, err
    assert tree(run.out) == expected_tree(fake, {k: "Album %d" % i for i, k in enumerate(keys[:3])})
    assert "failed: the root folder: could not list folder: SmugMug listed 3 of 5 children" in err
    assert "gone" not in err


def test_a_guessed_page_that_fails_fails_the_listing(fake, run, monkeypatch):
    """Defect 3: a 500 on a page guessed from Pages.Total (the normal path for real !images
    pages, which carry no NextPage) never ends the list in silence: after the retries that
    folder's walk fails by name, exit 1."""
    monkeypatch.setattr(sd, "BACKOFF_BASE", 0.01)
    [fake.add_album("Album %d" % i) for i in range(5)]
    fake.max_count = 3
    fake.omit_next_page = True
    fake.fail_pages = {("walk", 4): 500}
    code, _, err = run()
    assert code == sd.EXIT_ALBUMS_FAILED, err
    assert "failed: the root folder: could not list folder: HTTP 500" in err
    assert "gone" not in err


def test_download_listing_is_followed_over_its_pages(fake, run):
    """GET !download answered in pages (here at most 2 objects a page) for a 3-part archive: every
    part is found and downloaded, no part is taken for missing."""
    key = fake.add_album("Big", sizes=(3000, 3001, 3002))
    fake.download_max_count = 2
    fake.post_lists_downloads = False
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    assert tree(run.out) == album_files(fake, key, "Big")
    assert len(fake.calls("post")) == 1 and len(fake.calls("archive")) == 3


def test_paged_download_listing_with_old_archives_first(fake, run):
    """A changed album whose earlier archive fills page 1 of a 1-object-a-page listing: the look
    before requesting and every poll read all pages, so the new archive on page 2 is found
    (not given up as never listed)."""
    key = fake.add_album("A")
    fake.download_max_count = 1
    fake.post_lists_downloads = False
    assert run()[0] == sd.EXIT_OK
    fake.touch(key)
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    assert "saving it file by file" not in err
    assert len(fake.calls("post")) == 2
    assert tree(run.out) == album_files(fake, key, "A")


# HTTP ########################################################################

def test_api_redirects_are_followed_each_hop_signed(fake, run):
    """API calls answered 301/302/307/308 (the walk, an album, the POST, the listing, !images):
    each hop is signed for its own URL (no 401), a POST stays a POST, and the backup is whole."""
    folder = fake.add_folder("F")
    keys = [fake.add_album("A", folder), fake.add_album("B", sizes=(3000, 3001))]
    fake.api_redirects = {"walk": 301, "post": 307, "download-get": 302, "images": 308}
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    assert tree(run.out) == expected_tree(fake, {keys[0]: "F/A", keys[1]: "B"})
    assert not [e for e in fake.log if e["status"] == 401]
    assert {e["status"] for e in fake.log} >= {301, 307, 308}
    assert len([e for e in fake.calls("post") if e["status"] == 202]) == 2


def test_redirect_of_the_user_call_is_followed(fake, run):
    """The user named in another case, answered 301 to its canonical URI: followed, signed anew."""
    fake.nickname = "tester"
    key = fake.add_album("A")
    fake.api_redirects = {"user": 301}
    code, _, err = run(smugmug_user="Tester")
    assert code == sd.EXIT_OK, err
    assert tree(run.out) == album_files(fake, key, "A")
    assert [e["status"] for e in fake.calls()[:2]] == [301, 200]


def test_post_accepted_with_a_non_json_body(fake, run):
    """POST !download answered 202 with the body "Accepted": the request counts as made, the
    archive is found by looking, and it is never asked for twice."""
    key = fake.add_album("A")
    fake.post_answer = (202, b"Accepted")
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    assert len(fake.calls("post")) == 1
    assert tree(run.out) == album_files(fake, key, "A")


@pytest.mark.parametrize("status", [204, 404])
def test_no_archive_listed_as_an_empty_answer(fake, run, status):
    """GET !download with no archive answered 204 (no body) or 404: an empty listing, so a
    changed album whose old archive has expired is simply requested again."""
    key = fake.add_album("A")
    assert run()[0] == sd.EXIT_OK
    fake.touch(key)
    fake.archives[key] = []              # the old archive expired: nothing listed
    fake.empty_download_status = status
    before = len(fake.calls("download-get"))
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    assert [e["status"] for e in fake.calls("download-get")][before:before + 1] == [status]
    assert tree(run.out) == album_files(fake, key, "A")


# Archives ####################################################################

def test_parts_each_with_their_own_date_added(fake, run):
    """A 3-part archive whose part i is DateAdded i seconds after part 1 (built one after the
    other): one archive, downloaded whole at once (the timeout would end a wait for more)."""
    key = fake.add_album("Big", sizes=(3000, 3001, 3002))
    fake.part_date_step = 1
    code, _, err = run(archive_timeout_hours=10 / 3600.0)
    assert code == sd.EXIT_OK, err
    assert "saving it file by file" not in err
    assert len(fake.calls("post")) == 1 and len(fake.calls("archive")) == 3
    assert tree(run.out) == album_files(fake, key, "Big")


def test_zero_based_part_numbers(fake, run):
    """Download objects numbered Part 0..n-1: no part dropped, all three saved."""
    key = fake.add_album("Big", sizes=(3000, 3001, 3002))
    fake.zero_based_parts = True
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    assert tree(run.out) == album_files(fake, key, "Big")
    assert len(fake.calls("archive")) == 3 and not fake.calls("file")


def test_date_added_null_until_complete(fake, run):
    """Download objects with DateAdded null until each part is Complete (parts ready one after
    the other): the archive in preparation is waited for, not taken as Removed and asked again."""
    key = fake.add_album("Pair", sizes=(3000, 3001))
    fake.prep_seconds = 0.2
    fake.staggered_parts = True
    fake.undated_until_complete = True
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    assert len(fake.calls("post")) == 1
    assert tree(run.out) == album_files(fake, key, "Pair")


def test_expired_link_answering_a_login_page_gets_a_new_archive(fake, run):
    """The archive expires as it is downloaded: its link answers 200 with an HTML login page
    while the listing says Removed. A new archive is asked for and saved (no album failure)."""
    key = fake.add_album("A", sizes=(3000, 3001))
    fake.expired_html = {key}
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    assert len(fake.calls("post")) == 2
    assert tree(run.out) == album_files(fake, key, "A")


# Walk ########################################################################

@pytest.mark.parametrize("case", ["lower", "upper"])
def test_node_types_in_another_case(fake, run, case):
    """Node Type "folder"/"album" (or "FOLDER"/"ALBUM"): folders are walked and albums saved."""
    folder = fake.add_folder("F")
    key = fake.add_album("A", folder)
    fake.node_type_case = case
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    assert tree(run.out) == album_files(fake, key, "F/A")


def test_image_count_as_a_string(fake, run):
    """ImageCount sent as a string: "0" is an empty album (no archive asked for), "2" a full one."""
    fake.add_album("Empty", sizes=())
    key = fake.add_album("Full", sizes=(3000, 3001))
    fake.image_count_as_string = True
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    assert [e["path"] for e in fake.calls("post")] == ["/api/v2/album/%s!download" % key]
    assert tree(run.out) == album_files(fake, key, "Full")


# A photo's fields: what a changed album, the files layout and the index read ##################

def unzipped(path):
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


@pytest.mark.parametrize("given", [None, ""])
def test_null_identity_fields_prove_no_photo_the_same(fake, run, given):
    """ArchivedMD5, ArchivedSize, LastUpdated and Serial sent as null (or ""): nothing proves a
    listed photo is the one the backup holds, so a photo replaced on SmugMug under the same
    ImageKey and FileName is fetched again, never taken as held by its old bytes."""
    def variant(obj, image):
        obj.update(dict.fromkeys(("ArchivedMD5", "ArchivedSize", "LastUpdated", "Serial"), given))
    fake.image_variant = variant
    key = fake.add_album("V", images=[{"file_name": "a.jpg", "size": 1000}, {"file_name": "b.jpg", "size": 1000}])
    assert run()[0] == sd.EXIT_OK
    photo = fake.replace_image(fake.albums[key].images[0].key)
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    zips = [n for n in os.listdir(run.out / "V") if n.endswith(".zip")]
    held = {}
    for name in zips:
        held.update(unzipped(run.out / "V" / name))
    assert held["a.jpg"] == fake.original_bytes(photo.key)


def test_files_layout_without_md5_takes_the_new_bytes_of_a_fresh_archive(fake, run):
    """The files layout, a listing without ArchivedMD5: a photo replaced on SmugMug (same size) is
    unpacked from the fresh archive over the old file; an entry is never taken as the file on
    disk by its size alone."""
    fake.image_fields_absent = {"ArchivedMD5"}
    key = fake.add_album("V", images=[{"file_name": "a.jpg", "size": 1000}, {"file_name": "b.jpg", "size": 1000}])
    assert run("--layout", "files")[0] == sd.EXIT_OK
    for image in fake.albums[key].images[:2]:      # most of the album: a fresh archive
        fake.replace_image(image.key)
    fake.add_image(key, file_name="c.jpg", size=1000)
    code, _, err = run("--layout", "files")
    assert code == sd.EXIT_OK, err
    assert len(fake.calls("post")) == 2
    for image in fake.albums[key].images:
        assert (run.out / "V" / image.file_name).read_bytes() == fake.original_bytes(image.key)


@pytest.mark.parametrize("form", ["list", "string, empty array"])
def test_keywords_as_a_list_or_beside_an_empty_keyword_array(fake, run, form):
    """Keywords sent as a list (and no KeywordArray), or as a string beside an empty KeywordArray:
    the sidecar's dc:subject and the index's keywords column have them."""
    def variant(obj, image):
        if form == "list":
            obj["Keywords"] = obj.pop("KeywordArray")
        else:
            obj["KeywordArray"] = []
    fake.image_variant = variant
    fake.add_album("V", images=[{"file_name": "a.jpg", "keywords": ["sea", "Zürich"]}])
    code, _, err = run("--layout", "files")
    assert code == sd.EXIT_OK, err
    assert "<rdf:li>sea</rdf:li>" in (run.out / "V" / "a.jpg.xmp").read_text(encoding="utf-8")
    with open(run.out / sd.INDEX_NAME, encoding="utf-8-sig", newline="") as f:
        assert [r["keywords"] for r in csv.DictReader(f)] == ["sea; Zürich"]


def test_a_photo_moved_to_another_album_is_not_named_gone(fake, run):
    """A photo moved on SmugMug from one album to another keeps its ImageKey: the run that sees
    the move does not name it gone from SmugMug (the index has it current in its new album); once
    deleted from there too, it is."""
    one = fake.add_album("A", images=[{"file_name": "p%d.jpg" % i, "size": 1000 + i} for i in range(3)])
    two = fake.add_album("B", images=[{"file_name": "q.jpg", "size": 500}])
    assert run()[0] == sd.EXIT_OK
    photo = fake.albums[one].images.pop(0)
    fake.albums[two].images.append(photo)
    for key in (one, two):
        album = fake.albums[key]
        album.last_updated = album.images_last_updated = fake._later(album)
    code, out, err = run()
    assert code == sd.EXIT_OK, err
    assert "found gone" not in out + err
    with open(run.out / sd.INDEX_NAME, encoding="utf-8-sig", newline="") as f:
        rows = [(r["status"], r["album"]) for r in csv.DictReader(f) if r["ImageKey"] == photo.key]
    assert ("current", "B") in rows
    fake.albums[two].images.pop()
    fake.albums[two].last_updated = fake.albums[two].images_last_updated = fake._later(fake.albums[two])
    code, out, err = run()
    assert code == sd.EXIT_OK, err
    assert "1 photo found gone from SmugMug" in out + err and "p0.jpg" in out + err


def test_files_layout_from_a_zip_holding_one_name_twice(fake, run):
    """A zip that holds two entries of one name (photos of one FileName, zipped as they are
    named, no -1 suffix): in the files layout each becomes its own file by its MD5, none lost."""
    fake.zip_clash = "keep"
    key = fake.add_album("V", images=[{"file_name": "a.jpg", "size": 1000 + i} for i in range(3)])
    code, _, err = run("--layout", "files")
    assert code == sd.EXIT_OK, err
    doc = manifest(run.out / "V")
    assert [(item["ImageKey"], (run.out / "V" / item["file"]).read_bytes()) for item in doc["files"]] == [
        (image.key, fake.original_bytes(image.key)) for image in fake.albums[key].images]


XMP_DATE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


@pytest.mark.parametrize("given, utc", [("2019-01-12 21:06:08+01:00", "2019-01-12T20:06:08"),
                                        ("2019-01-12T20:06:08Z", "2019-01-12T20:06:08"),
                                        ("2019-01-12T21:06:08.5+0100", "2019-01-12T20:06:08.5"),
                                        ("2019-01-12T20:06:08", "2019-01-12T20:06:08")])
def test_capture_times_in_other_forms(fake, run, given, utc):
    """DateTimeOriginal with a space, Z, fractional seconds, an offset without a colon, or no
    offset (read as UTC): the file is dated that moment, and the sidecar and the index give it in
    XMP's date form."""
    fake.add_album("V", images=[{"file_name": "a.jpg", "date_time_original": given}])
    code, _, err = run("--layout", "files")
    assert code == sd.EXIT_OK, err
    moment = datetime.datetime.fromisoformat(utc).replace(tzinfo=datetime.timezone.utc).timestamp()
    assert (run.out / "V" / "a.jpg").stat().st_mtime == moment
    written = re.search("<exif:DateTimeOriginal>(.*)</exif:DateTimeOriginal>",
                        (run.out / "V" / "a.jpg.xmp").read_text(encoding="utf-8")).group(1)
    with open(run.out / sd.INDEX_NAME, encoding="utf-8-sig", newline="") as f:
        taken = [r["taken"] for r in csv.DictReader(f)]
    assert XMP_DATE.match(written) and taken == [written]
    assert datetime.datetime.fromisoformat(written).timestamp() == moment


def test_a_photo_deleted_while_the_listing_is_read_skips_none(fake, run):
    """A photo deleted on SmugMug between two pages of an album's listing shifts the next page,
    so a photo is skipped while the Totals say nothing is missing: pages that give different
    Totals are a list that changed, read again; no current file goes to versions or is called
    gone."""
    key = fake.add_album("V", images=[{"file_name": "p%d.jpg" % i, "size": 1000 + i} for i in range(5)])
    assert run("--layout", "files")[0] == sd.EXIT_OK
    fake.images_max_count = 2
    album = fake.albums[key]
    doomed = album.images[0]

    def variant(obj, image):
        if image is album.images[1] and doomed in album.images:    # the end of page 1 is being served
            album.images.remove(doomed)
    fake.image_variant = variant
    album.last_updated = album.images_last_updated = fake._later(album)
    code, out, err = run("--layout", "files")
    assert code == sd.EXIT_OK, err
    assert sorted(os.listdir(run.out / "V")) == sorted(
        ["metadata.json"] + [n for im in album.images for n in (im.file_name, im.file_name + ".xmp")])
    assert "p2.jpg" not in out + err
    assert [item["ImageKey"] for item in manifest(run.out / "V")["files"]] == [im.key for im in album.images]


def test_a_photo_added_to_an_album_listed_without_archived_fields_is_fetched_alone(fake, run):
    """An album listed with no Archived* fields (as the recorded protected album): a photo added
    costs its own rendition, not a fresh archive; the rendition's known size is not weighed
    against the listing's unknown ones (counted at 1 each, it looked like most of the album)."""
    fake.image_fields_absent = {"ArchivedUri", "ArchivedSize", "ArchivedMD5"}
    key = fake.add_album("V", images=[{"file_name": "a%d.jpg" % i, "size": 1000 + i} for i in range(4)])
    assert run()[0] == sd.EXIT_OK
    fake.add_image(key, file_name="n.jpg", size=500)
    calls = len(fake.log)
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    assert [e["kind"] for e in fake.log[calls:] if e["kind"] not in ("walk", "images", "album")] == [
        "largestimage", "file"]
    assert (run.out / "V" / "n.jpg").read_bytes() == fake.rendition_bytes(fake.albums[key].images[-1].key)


# Pure helpers ################################################################

def test_following_page_where_next_page_is_missing():
    """The recorded !images page (Total 34, Start 1, Count 30, no NextPage) leads to start=31 with
    its count kept; a last page, or one without Pages, leads nowhere; NextPage wins when given."""
    with open(os.path.join(os.path.dirname(__file__), "data", "album_images_HZMsPf_page_1.json")) as f:
        body = json.load(f)
    link = "/api/v2/album/HZMsPf!images?count=100&_filter=FileName"
    assert sd.following_page(body, link) == "/api/v2/album/HZMsPf!images?count=100&_filter=FileName&start=31"
    last = {"Response": {"Pages": {"Total": 34, "Start": 31, "Count": 4}}}
    assert sd.following_page(last, link + "&start=31") is None
    assert sd.following_page({"Response": {"Pages": {"Total": 3}}}, link) is None
    given = {"Response": {"Pages": {"Total": 34, "Start": 1, "Count": 30, "NextPage": "/x?start=31"}}}
    assert sd.following_page(given, link) == "/x?start=31"


def _part(n, added, status="Complete", name=None):
    return sd.ArchivePart(n, name or "A-%s.zip" % n, status, "https://p/%s/%s" % (added, n), added)


T1, T2, T3, T9 = ("2030-01-01T00:00:0%d+00:00" % s for s in (1, 2, 3, 9))


def test_archive_sets_by_numbering():
    """Parts with their own DateAdded make one archive; parts numbered from 0 are shifted to 1..n;
    two archives of one second, listed one after the other, stay two; undated parts (still being
    built) join the archive whose part 1 is dated."""
    sets = sd.archive_sets([_part(3, T3), _part(1, T1), _part(2, T2), _part(1, T9)])
    assert [[(p.part, p.date_added) for p in s] for s in sets] == [[(1, T1), (2, T2), (3, T3)], [(1, T9)]]
    assert [[p.part for p in s] for s in sd.archive_sets([_part(0, T1), _part(1, T1)])] == [[1, 2]]
    same_second = [_part(1, T1, name="old-1"), _part(2, T1, name="old-2"), _part(1, T1, name="new-1"),
                   _part(2, T1, name="new-2")]
    assert [[p.file_name for p in s] for s in sd.archive_sets(same_second)] == [["old-1", "old-2"],
                                                                               ["new-1", "new-2"]]
    building = sd.archive_sets([_part(2, "", "Processing"), _part(1, T1)])
    assert [[p.part for p in s] for s in building] == [[1, 2]]


def test_read_archive_waits_for_the_archive_it_chose():
    """Parts dated one after another are one complete archive; a part dated only once Complete
    is waited for (not taken as Removed); the ticket remembers the archive by its part 1."""
    album = sd.Album("n", "A", "/api/v2/album/A", ("A",))
    posted = sd.ArchiveTicket(posted=True)
    state, parts, ticket = sd.read_archive([_part(1, T1), _part(2, T2), _part(3, T3)], album, posted)
    assert state == "complete" and [p.part for p in parts] == [1, 2, 3] and ticket.added == T1
    state, _, ticket = sd.read_archive([_part(1, "", "Processing")], album, posted)
    assert state == "preparing" and ticket.added is None
    state, _, ticket = sd.read_archive([_part(1, T2)], album, ticket)
    assert state == "complete" and ticket.added == T2
    state, parts, _ = sd.read_archive([_part(0, T1), _part(1, T1)], album, posted)
    assert state == "complete" and len(parts) == 2
