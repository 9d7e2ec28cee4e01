"""The emulator itself, over real HTTP: zips, images, originals, videos and the archive knobs."""

import hashlib
import json
import os
import io
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
import urllib.parse
import zipfile
import zlib

import pytest
import requests
from requests_oauthlib import OAuth1

import fake_smugmug
from conftest import wait_for
from fake_smugmug import ACCESS_KEY, ACCESS_SECRET, Content, FakeImage, ZipContent

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

# Every key of an AlbumImage object in the recorded listing (smugcli/album_images.json).
RECORDED_IMAGE_KEYS = {
    "Altitude", "ArchivedMD5", "ArchivedSize", "ArchivedUri", "CanBuy", "CanEdit", "Caption", "Collectable",
    "Date", "FileName", "Format", "FormattedValues", "Hidden", "ImageKey", "IsArchive", "IsVideo",
    "KeywordArray", "Keywords", "LastUpdated", "Latitude", "Longitude", "Movable", "OriginalHeight",
    "OriginalSize", "OriginalWidth", "Processing", "Protected", "ThumbnailUrl", "Title", "UploadKey", "Uri",
    "UriDescription", "Uris", "Watermark", "Watermarked", "WebUri"}


@pytest.fixture
def fast(fake):
    fake.prep_seconds = 0.005
    return fake


def get(fake, url, **kw):
    if url.startswith("/"):
        url = fake.base + url
    auth = OAuth1(fake.app_key, fake.app_secret, ACCESS_KEY, ACCESS_SECRET)
    return requests.get(url, auth=auth, headers=dict({"Accept": "application/json"}, **kw.pop("headers", {})),
                        timeout=10, **kw)


def post(fake, path):
    auth = OAuth1(fake.app_key, fake.app_secret, ACCESS_KEY, ACCESS_SECRET)
    return requests.post(fake.base + path, auth=auth, headers={"Accept": "application/json"}, timeout=10)


def payload(response):
    body = response.json()["Response"]
    return body.get(body["Locator"])


def complete_downloads(fake, key, timeout=5.0):
    """POSTs an archive of the album and polls until all its parts are Complete."""
    assert post(fake, "/api/v2/album/%s!download" % key).status_code == 202
    deadline = time.monotonic() + timeout
    while True:
        downloads = payload(get(fake, "/api/v2/album/%s!download" % key))
        if all(d["Status"] == "Complete" for d in downloads):
            return downloads
        assert time.monotonic() < deadline, downloads
        time.sleep(0.005)


def open_zip(data):
    archive = zipfile.ZipFile(io.BytesIO(data))
    return archive, [info.filename for info in archive.infolist()]


def images_of(fake, key):
    return {image.key: image for image in fake.albums[key].images}


# -- archives are real zips ------------------------------------------------------------------

def test_posted_archive_downloads_as_real_zips_of_the_originals(fast):
    key = fast.add_album("Mixed", part_limit=5000, images=[
        {"file_name": "a.jpg", "size": 3000}, {"file_name": "b.jpg", "size": 1500},
        {"file_name": "empty.txt", "size": 0}, {"file_name": "ü nicode.jpg", "size": 70_000}])
    downloads = complete_downloads(fast, key)
    assert [d["FileName"] for d in downloads] == ["%s-1.zip" % key, "%s-2.zip" % key]
    by_name = {image.file_name: image for image in fast.albums[key].images}
    seen = []
    for d in downloads:
        response = get(fast, d["WebUri"])
        assert response.status_code == 200 and response.headers["Content-Type"] == "application/zip"
        assert int(response.headers["Content-Length"]) == d["Size"] == len(response.content)
        assert response.content == fast.expected_parts(key)[d["FileName"]]
        archive, names = open_zip(response.content)
        assert archive.testzip() is None                   # every entry's CRC is right
        for info in archive.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            data = archive.read(info)
            assert zlib.crc32(data) == info.CRC and data == fast.original_bytes(by_name[info.filename].key)
        seen += names
    assert seen == ["a.jpg", "b.jpg", "empty.txt", "ü nicode.jpg"]
    assert fast.calls("archive")[-1]["status"] == 200


def test_sizes_give_one_image_per_part_as_before(fake):
    key = fake.add_album("Legacy", sizes=(3000, 3005, 1234))
    parts = fake.album_parts(key)
    assert [name for name, _ in parts] == ["%s-1.zip" % key, "%s-2.zip" % key, "%s-3.zip" % key]
    assert [[image.size for _, image in zc.entries] for _, zc in parts] == [[3000], [3005], [1234]]
    other = fake.add_album("Other", sizes=(100,), names=["custom.zip"])
    assert list(fake.expected_parts(other)) == ["custom.zip"]
    names = [im.file_name for k in (key, other) for im in fake.albums[k].images]
    assert names == ["IMG_0001.jpg", "IMG_0002.jpg", "IMG_0003.jpg", "IMG_0004.jpg"]
    assert fake.album_json(fake.albums[key])["ImageCount"] == 3
    assert fake.album_json(fake.albums[fake.add_album("Ten", image_count=10)])["ImageCount"] == 10
    empty = fake.add_album("Empty", sizes=())
    assert fake.albums[empty].images == [] and fake.album_parts(empty) == []
    assert fake.album_json(fake.albums[empty])["ImageCount"] == 0
    fake.albums[key].part_sizes = [1500]               # the legacy way to change an album
    assert [(im.key, im.size) for im in fake.albums[key].images] == [(fake.albums[key].images[0].key, 1500)]
    assert len(fake.expected_parts(key)) == 1


def test_clashing_names_are_renamed_within_a_part_only(fast):
    keys = fake_smugmug.rich_account(fast)
    downloads = complete_downloads(fast, keys["clash"])
    archive, names = open_zip(get(fast, downloads[0]["WebUri"]).content)
    assert names == ["IMG_0001.JPG", "IMG_0001-1.JPG"] and archive.testzip() is None
    first, second = fast.albums[keys["clash"]].images
    assert archive.read("IMG_0001-1.JPG") == fast.original_bytes(second.key) != archive.read("IMG_0001.JPG")
    fast.zip_clash = " (1)"
    assert [n for n, _ in fast.album_parts(keys["clash"])[0][1].entries] == ["IMG_0001.JPG", "IMG_0001 (1).JPG"]
    fast.zip_clash = "keep"
    assert [n for n, _ in fast.album_parts(keys["clash"])[0][1].entries] == ["IMG_0001.JPG", "IMG_0001.JPG"]
    fast.zip_clash = "-1"
    split = fast.album_parts(keys["split"])
    assert [[n for n, _ in zc.entries] for _, zc in split] == [["DSC_0001.JPG"], ["DSC_0001.JPG", "DSC_0002.JPG"]]
    assert fake_smugmug.clash_name("a.jpg", {"a.jpg", "a-1.jpg"}, "-1") == "a-2.jpg"
    assert fake_smugmug.clash_name("README", {"README"}, " (1)") == "README (1)"


def test_videos_left_out_with_the_knob_and_processing_images_never_in(fast):
    keys = fake_smugmug.rich_account(fast)
    key = keys["video"]
    assert [n for n, _ in fast.album_parts(key)[0][1].entries] == ["Before.jpg", "Clip.MOV", "After.jpg"]
    fast.zip_omit_videos = True
    fast.albums[key].images[2].processing = True
    downloads = complete_downloads(fast, key)
    archive, names = open_zip(get(fast, downloads[0]["WebUri"]).content)
    assert names == ["Before.jpg"] and archive.testzip() is None
    assert len(payload(get(fast, "/api/v2/album/%s!images" % key))) == 3     # all still listed


def test_touch_and_add_image(fake):
    key = fake.add_album("Changes", sizes=(2000, 2000))
    before = fake.expected_files(key)
    parts_before = fake.expected_parts(key)
    fake.touch(key)
    after = fake.expected_files(key)
    assert set(before) == set(after) and all(before[k] != after[k] for k in before)
    assert fake.expected_parts(key) != parts_before
    album = fake.albums[key]
    assert all(im.last_updated == album.last_updated > fake_smugmug.T0 for im in album.images)
    album.last_updated = album.images_last_updated = fake_smugmug.T0
    image = fake.add_image(key, file_name="new.png", size=10, caption="added")
    assert isinstance(image, FakeImage) and album.images[-1] is image and image.key.startswith("I")
    assert album.last_updated == album.images_last_updated > fake_smugmug.T0
    assert fake.album_json(album)["ImageCount"] == 3
    assert fake.expected_files(key)[image.key] == image.content().whole() and len(image.content().whole()) == 10


# -- !images, originals, videos ----------------------------------------------------------

def test_images_paging_follows_next_page_and_filters(fake):
    fake.images_max_count = 2
    key = fake.add_album("Five", sizes=(100, 200, 300, 400, 500))
    query = "?count=100&_filter=FileName,ImageKey&_filteruri=LargestImage"
    response = get(fake, "/api/v2/album/%s!images%s" % (key, query))
    body = response.json()["Response"]
    assert body["Locator"] == "AlbumImage" and body["LocatorType"] == "Objects"
    assert body["Pages"]["RequestedCount"] == 2 and body["Pages"]["Total"] == 5
    listed = []
    while True:
        for obj in body["AlbumImage"]:
            assert set(obj) == {"FileName", "ImageKey", "Uri", "Uris"} and set(obj["Uris"]) == {"LargestImage"}
            listed.append(obj["ImageKey"])
        if "NextPage" not in body["Pages"]:
            break
        body = get(fake, body["Pages"]["NextPage"]).json()["Response"]
    assert listed == [im.key for im in fake.albums[key].images]
    assert len(fake.calls("images")) == 3
    default = get(fake, "/api/v2/album/%s!images" % key).json()["Response"]
    assert default["Pages"]["Count"] == 2 and "PrevPage" not in default["Pages"]
    empty = get(fake, "/api/v2/album/%s!images" % fake.add_album("Empty", sizes=())).json()["Response"]
    assert "AlbumImage" not in empty and empty["Pages"]["Total"] == 0


def test_image_objects_carry_the_recorded_fields_and_the_metadata(fake):
    keys = fake_smugmug.rich_account(fake)
    objects = payload(get(fake, "/api/v2/album/%s!images" % keys["captions"]))
    assert RECORDED_IMAGE_KEYS <= set(objects[0])
    first = objects[0]
    assert first["Title"] == "Lisbon" and first["Caption"] == "A day in Lisbon"
    assert first["Keywords"] == "lisbon; portugal; 2021"
    assert first["KeywordArray"] == ["lisbon", "portugal", "2021"]
    assert first["Latitude"] == "38.72230000000000" and first["Longitude"] == "-9.13930000000000"
    assert first["Altitude"] == 12 and first["DateTimeOriginal"] == "2021-05-01T10:00:00+00:00"
    assert first["Uri"] == "/api/v2/album/%s/image/%s-0" % (keys["captions"], first["ImageKey"])
    assert first["Format"] == "JPG" and first["IsVideo"] is False and "LargestVideo" not in first["Uris"]
    assert first["ArchivedSize"] == first["OriginalSize"] == 2500
    fake.albums[keys["captions"]].images[1].archived = False
    second = payload(get(fake, "/api/v2/album/%s!images" % keys["captions"]))[1]
    assert not {"ArchivedUri", "ArchivedSize", "ArchivedMD5"} & set(second)


def test_archived_uri_serves_the_original_with_its_md5(fake):
    keys = fake_smugmug.rich_account(fake)
    for obj in payload(get(fake, "/api/v2/album/%s!images" % keys["video"])):
        response = get(fake, obj["ArchivedUri"])
        assert response.status_code == 200 and int(response.headers["Content-Length"]) == obj["ArchivedSize"]
        assert hashlib.md5(response.content).hexdigest() == obj["ArchivedMD5"]
        assert response.content == fake.expected_files(keys["video"])[obj["ImageKey"]]
    ranged = get(fake, obj["ArchivedUri"], headers={"Range": "bytes=100-"})
    assert ranged.status_code == 206
    assert ranged.content == fake.original_bytes(keys["video"], obj["ImageKey"])[100:]
    assert get(fake, obj["ArchivedUri"], headers={"Range": "bytes=99999-"}).status_code == 416
    assert {e["kind"] for e in fake.calls() if e["path"].startswith("/original/")} == {"file"}
    fake.refuse_originals = {obj["ImageKey"]}
    refused = get(fake, obj["ArchivedUri"])
    assert refused.status_code == 403 and refused.json()["Message"]
    unsigned = requests.get(obj["ArchivedUri"], timeout=10)
    assert unsigned.status_code == 401


def test_largest_video_serves_a_transcode(fake):
    keys = fake_smugmug.rich_account(fake)
    video = [o for o in payload(get(fake, "/api/v2/album/%s!images" % keys["video"])) if o["IsVideo"]][0]
    uri = video["Uris"]["LargestVideo"]["Uri"]
    assert uri == "/api/v2/image/%s-0!largestvideo" % video["ImageKey"]
    response = get(fake, uri)
    body = response.json()["Response"]
    assert body["Locator"] == "LargestVideo" and body["LocatorType"] == "Object"
    largest = body["LargestVideo"]
    assert largest["Url"].endswith("/1920/Clip-1920.mp4") and largest["Ext"] == "mp4" and largest["Size"] == 4000
    data = get(fake, largest["Url"]).content
    assert data == fake.transcode_bytes(video["ImageKey"]) != fake.original_bytes(video["ImageKey"])[:4000]
    assert hashlib.md5(data).hexdigest() == largest["MD5"]
    photo = fake.albums[keys["video"]].images[0].key
    assert get(fake, "/api/v2/image/%s-0!largestvideo" % photo).status_code == 404
    assert [e["status"] for e in fake.calls("video")] == [200, 404]


def test_wrong_file_once_flips_one_byte_of_the_first_fetch(fake):
    key = fake.add_album("Album", sizes=(5000,))
    image = fake.albums[key].images[0]
    fake.wrong_file_once = {image.key}
    obj = payload(get(fake, "/api/v2/album/%s!images" % key))[0]
    first, second = get(fake, obj["ArchivedUri"]).content, get(fake, obj["ArchivedUri"]).content
    assert len(first) == len(second) == 5000
    assert hashlib.md5(first).hexdigest() != obj["ArchivedMD5"] == hashlib.md5(second).hexdigest()
    assert sum(a != b for a, b in zip(first, second)) == 1


# -- archive knobs ----------------------------------------------------------------------------

def test_corrupt_once_breaks_one_crc_of_the_first_download(fast):
    key = fast.add_album("Corrupt", part_limit=10_000, images=[{"size": 3000}, {"size": 4000}])
    fast.corrupt_once = {key}
    downloads = complete_downloads(fast, key)
    first = get(fast, downloads[0]["WebUri"]).content
    archive, names = open_zip(first)                       # it opens...
    assert len(first) == downloads[0]["Size"] and archive.testzip() == names[0]   # ...but CRC fails
    with pytest.raises(zipfile.BadZipFile):
        archive.read(names[0])
    again = get(fast, downloads[0]["WebUri"]).content
    assert again == fast.expected_parts(key)["%s.zip" % key] and open_zip(again)[0].testzip() is None


def test_html_once_answers_a_login_page_first(fast):
    key = fast.add_album("Html", sizes=(3000, 3000))
    fast.html_once = {key}
    downloads = complete_downloads(fast, key)
    for d in downloads:
        page = get(fast, d["WebUri"])
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        assert int(page.headers["Content-Length"]) == len(page.content) != d["Size"]
        assert b"<html" in page.content
        real = get(fast, d["WebUri"])
        assert real.headers["Content-Type"] == "application/zip" and len(real.content) == d["Size"]
    second = complete_downloads(fast, key)[-1]                 # a later archive: no login page
    assert get(fast, second["WebUri"]).headers["Content-Type"] == "application/zip"


def test_web_uri_only_when_complete_and_omit_size(fake):
    fake.prep_seconds = 30
    fake.web_uri_only_when_complete = fake.omit_size = True
    key = fake.add_album("Slow", sizes=(1000,))
    listed = payload(post(fake, "/api/v2/album/%s!download" % key))
    assert listed[0]["Status"] in ("Init", "Processing") and "WebUri" not in listed[0] and "Size" not in listed[0]
    fake.archives[key][0].created -= 31
    done = payload(get(fake, "/api/v2/album/%s!download" % key))[0]
    assert done["Status"] == "Complete" and "WebUri" in done and "Size" not in done


def test_staggered_parts_served_bytes_and_prepared_undownloaded(fake):
    fake.prep_seconds = 10
    fake.staggered_parts = True
    key = fake.add_album("Staggered", sizes=(3000, 3000, 3000))
    archive = fake.new_archive(key)
    assert fake.prepared_undownloaded_bytes() == 0
    archive.created -= 15                                   # part 1 ready at 10 s, part 2 at 20 s
    statuses = [d["Status"] for d in payload(get(fake, "/api/v2/album/%s!download" % key))]
    assert statuses == ["Complete", "Processing", "Processing"]
    sizes = [content.size for _, content in archive.parts]
    assert fake.prepared_undownloaded_bytes() == sizes[0]
    downloads = payload(get(fake, "/api/v2/album/%s!download" % key))
    assert get(fake, downloads[1]["WebUri"]).status_code == 404         # not ready yet
    get(fake, downloads[0]["WebUri"], headers={"Range": "bytes=1000-"})
    assert fake.served[(archive.archive_id, 1)] == sizes[0] - 1000
    assert fake.prepared_undownloaded_bytes() == 1000
    archive.created -= 20
    assert fake.prepared_undownloaded_bytes() == 1000 + sizes[1] + sizes[2]
    get(fake, downloads[0]["WebUri"])
    assert fake.prepared_undownloaded_bytes() == sizes[1] + sizes[2]          # floored at 0 for part 1


def test_error_always_with_image_archives(fast):
    key = fast.add_album("Broken", sizes=(1000, 2000))
    fast.error_always = {key}
    post(fast, "/api/v2/album/%s!download" % key)
    time.sleep(0.01)
    assert [d["Status"] for d in payload(get(fast, "/api/v2/album/%s!download" % key))] == ["Error", "Error"]


# -- laziness ---------------------------------------------------------------------------------

class _Reader(io.RawIOBase):
    """A seekable file over a ZipContent, for zipfile."""

    def __init__(self, content):
        self.content, self.pos = content, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        self.pos = (offset, self.pos + offset, self.content.size + offset)[whence]
        return self.pos

    def tell(self):
        return self.pos

    def readinto(self, buffer):
        data = self.content.read(self.pos, self.pos + len(buffer))
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


def test_big_zips_are_never_materialised(fake):
    tracemalloc.start()
    try:
        started = time.monotonic()
        key = fake.add_album("Huge", images=[{"file_name": "a.jpg", "size": 1000},
                                             {"file_name": "movie.mov", "size": 2 * 2 ** 30, "is_video": True},
                                             {"file_name": "z.jpg", "size": 200 * 2 ** 20}])
        (name, content), = fake.album_parts(key)
        middle = content.read(2 ** 30, 2 ** 30 + 4096)
        movie = fake.albums[key].images[1]
        assert middle == movie.content().read(2 ** 30 - content.data_offsets[1],
                                              2 ** 30 - content.data_offsets[1] + 4096)
        archive = zipfile.ZipFile(io.BufferedReader(_Reader(content)))      # reads the directory only
        assert [i.file_size for i in archive.infolist()] == [1000, 2 * 2 ** 30, 200 * 2 ** 20]
        assert archive.read("a.jpg") == fake.albums[key].images[0].content().whole()
        assert time.monotonic() - started < 2
        assert tracemalloc.get_traced_memory()[1] < 20 * 2 ** 20
    finally:
        tracemalloc.stop()


def test_zip64_past_4_gib_and_fast_crcs(fake):
    for size in (0, 1, 65520, 65521, 65522, 3 * 65521 + 7, 1_000_003):
        content = Content("crc-%d" % size, size)
        assert content.crc32() == zlib.crc32(content.whole())
    images = [FakeImage("K1", "a.jpg", 100), FakeImage("K2", "big.mov", 5 * 2 ** 30 + 7),
              FakeImage("K3", "c.jpg", 200)]
    content = ZipContent([(im.file_name, im) for im in images])
    archive = zipfile.ZipFile(io.BufferedReader(_Reader(content)))
    assert [i.file_size for i in archive.infolist()] == [100, 5 * 2 ** 30 + 7, 200]
    assert archive.read("c.jpg") == images[2].content().whole()
    with archive.open("big.mov") as f:
        assert f.read(5000) == images[1].content().read(0, 5000)


def test_sample_and_rich_accounts_side_by_side(fake):
    sample = fake_smugmug.sample_account(fake)
    rich = fake_smugmug.rich_account(fake)
    assert len(fake.expected_parts(sample["big"])) == 3 and fake.expected_parts(sample["empty"]) == {}
    assert len(fake.expected_parts(rich["split"])) == 2
    assert all(im.caption for im in fake.albums[rich["captions"]].images)
    names = [fake.nodes[n].name for n in fake.nodes[fake.root_id].children]
    assert len(names) == len(set(names)) and "Rich Media" in names


# -- two hosts and outages ------------------------------------------------------------------

def port_of(url):
    return urllib.parse.urlsplit(url).port


def raw_get(port, path="/api/v2!authuser"):
    """A bare GET on a new connection: the first bytes of the answer (or the OSError raised)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" % path.encode())
            return sock.recv(64)
    except OSError as exc:
        return exc


def test_downloads_are_served_from_a_second_port(fast):
    """Every download link (archive WebUri, /redirect/, ArchivedUri, !largestvideo Url) is on
    photos_base, another port than the API's; the OAuth check stays; relative_web_uri still
    gives a path on the API host."""
    keys = fake_smugmug.rich_account(fast)
    assert fast.photos_base != fast.base and port_of(fast.photos_base) != port_of(fast.base)
    downloads = complete_downloads(fast, keys["video"])
    assert downloads[0]["WebUri"].startswith(fast.photos_base + "/download/")
    assert get(fast, downloads[0]["WebUri"]).content == fast.expected_parts(keys["video"])[downloads[0]["FileName"]]
    assert requests.get(downloads[0]["WebUri"], timeout=5).status_code == 401       # unsigned
    objects = payload(get(fast, "/api/v2/album/%s!images" % keys["video"]))
    assert all(o["ArchivedUri"].startswith(fast.photos_base + "/original/") for o in objects)
    video = [o for o in objects if o["IsVideo"]][0]
    url = payload(get(fast, video["Uris"]["LargestVideo"]["Uri"]))["Url"]
    assert url.startswith(fast.photos_base + "/video/") and get(fast, url).status_code == 200
    fast.redirect_downloads = True
    link = payload(get(fast, "/api/v2/album/%s!download" % keys["video"]))[0]["WebUri"]
    assert link.startswith(fast.photos_base + "/redirect/")
    fast.relative_web_uri = True
    assert payload(get(fast, "/api/v2/album/%s!download" % keys["video"]))[0]["WebUri"].startswith("/redirect/")
    fast.photos_host = False
    assert fast.original_url(fast.albums[keys["video"]].images[0]).startswith(fast.base + "/original/")


def test_outage_refuses_then_listens_again_on_the_same_ports(fast):
    """outage(s): both ports refuse connections at once, open connections (a download in flight)
    are cut; after s seconds both answer again on the same port numbers; outage_log has it."""
    key = fast.add_album("Slow", sizes=(400_000,))
    url = complete_downloads(fast, key)[0]["WebUri"]
    api, photos = fast.port, fast.photos_port
    fast.bandwidth = 1_000_000                              # 0.4 s for the part
    response = get(fast, url, stream=True)
    started = time.monotonic()
    fast.outage(0.3)
    assert time.monotonic() - started < 0.2                 # it returns at once
    with pytest.raises(requests.exceptions.RequestException):
        response.content                                    # the download in flight is cut
    assert isinstance(raw_get(api), ConnectionRefusedError)
    assert isinstance(raw_get(photos), ConnectionRefusedError)
    with pytest.raises(requests.exceptions.ConnectionError):
        get(fast, "/api/v2!authuser")
    assert fast.in_outage()
    time.sleep(0.4)
    assert not fast.in_outage() and (fast.port, fast.photos_port) == (api, photos)
    assert get(fast, "/api/v2!authuser").status_code == 200
    fast.bandwidth = None
    assert get(fast, url).content == fast.expected_parts(key)["%s.zip" % key]
    (start, end), = fast.outage_log
    assert 0.28 <= end - start < 0.45


def test_outage_reset_mode_resets_every_connection(fast):
    """mode "reset": the ports keep listening, but each connection is reset (ECONNRESET)."""
    fast.outage(0.25, mode="reset")
    for port in (fast.port, fast.photos_port):
        answer = raw_get(port)
        assert isinstance(answer, ConnectionResetError) or answer == b"", answer
    with pytest.raises(requests.exceptions.ConnectionError):
        get(fast, "/api/v2!authuser")
    time.sleep(0.3)
    assert get(fast, "/api/v2!authuser").status_code == 200
    assert raw_get(fast.photos_port, "/nothing").startswith(b"HTTP/1.1 404")


def test_outage_triggers_on_an_api_call_or_download_bytes(fast):
    """outage_at {"api_call": N}: the N-th API call's connection is cut, unanswered, and the
    outage starts; {"download_bytes": B}: the download that reaches B bytes is cut there."""
    key = fast.add_album("Two", sizes=(5000,))
    fast.outage_at, fast.outage_seconds = {"api_call": 2}, 0.15
    assert get(fast, "/api/v2!authuser").status_code == 200
    with pytest.raises(requests.exceptions.ConnectionError):
        get(fast, "/api/v2!authuser")
    assert fast.outage_at is None and len(fast.outage_log) == 1
    time.sleep(0.2)
    url = complete_downloads(fast, key)[0]["WebUri"]
    fast.outage_at, fast.outage_mode = {"download_bytes": 1000}, "reset"
    with pytest.raises(requests.exceptions.RequestException):
        get(fast, url).content
    assert fast.download_bytes == 1000 and len(fast.outage_log) == 2 and fast.resetting()
    time.sleep(0.2)
    assert len(get(fast, url).content) == fast.albums[key].images[0].size + 22 + 30 + 46 + 2 * len("IMG_0001.jpg")


# -- the quota --------------------------------------------------------------------------------

def test_quota_counts_api_calls_in_fixed_windows(fast):
    """quota (3 calls, 0.4 s): every API answer says limit, remaining and reset; the 4th call of
    the window gets 429 with Retry-After up to its end and is logged; downloads are not counted;
    the next window serves again."""
    key = fast.add_album("Quota", sizes=(2000,))
    fast.quota = (3, 0.4)
    first = get(fast, "/api/v2!authuser")
    started = time.monotonic()
    assert first.headers["X-RateLimit-Limit"] == "3" and first.headers["X-RateLimit-Remaining"] == "2"
    assert 0 <= int(first.headers["X-RateLimit-Reset"]) - time.time() <= 1.5
    url = payload(get(fast, "/api/v2/album/%s!images" % key))[0]["ArchivedUri"]
    assert "X-RateLimit-Remaining" not in get(fast, url).headers              # a download: not counted
    third = get(fast, "/api/v2/album/%s" % key)
    assert third.status_code == 200 and third.headers["X-RateLimit-Remaining"] == "0"
    refused = get(fast, "/api/v2/album/%s" % key)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert refused.headers["X-RateLimit-Remaining"] == "0" and refused.json()["Code"] == 429
    assert [p for _, p in fast.quota_refused] == ["/api/v2/album/%s" % key]
    (start, end), = fast.quota_windows
    assert abs(end - start - 0.4) < 1e-9 and start <= started
    assert fast.quota_violations() == []
    time.sleep(max(0, end - time.monotonic()) + 0.01)
    again = get(fast, "/api/v2/album/%s" % key)
    assert again.status_code == 200 and again.headers["X-RateLimit-Remaining"] == "2"
    get(fast, "/api/v2!authuser"), get(fast, "/api/v2!authuser")
    assert get(fast, "/api/v2!authuser").status_code == 429
    time.sleep(0.26)
    assert get(fast, "/api/v2!authuser").status_code == 429               # inside the closed window
    assert len(fast.quota_windows) == 2 and len(fast.quota_violations()) == 1


# -- faults on lists and answers --------------------------------------------------------------

def test_fail_pages_fail_one_page_of_a_list(fake):
    """fail_pages: the !images page from START (and a !children page) answer the status with a
    JSON error, every time or (fail_pages_times) the first n times per list."""
    fake.images_max_count = 2
    key = fake.add_album("Pages", sizes=(100, 200, 300))
    fake.add_folder("F1"), fake.add_folder("F2")
    fake.fail_pages = {("images", 3): 500, ("walk", 1): 404}
    assert get(fake, "/api/v2/album/%s!images" % key).status_code == 200
    for _ in range(2):
        failed = get(fake, "/api/v2/album/%s!images?count=2&start=3" % key)
        assert failed.status_code == 500 and failed.json()["Code"] == 500
    children = get(fake, "/api/v2/node/%s!children" % fake.root_id)
    assert children.status_code == 404 and children.json()["Message"] == "Not Found"
    fake.fail_pages_times = 3
    assert get(fake, "/api/v2/album/%s!images?count=2&start=3" % key).status_code == 500
    assert get(fake, "/api/v2/album/%s!images?count=2&start=3" % key).status_code == 200   # failed 3 times
    assert [e["status"] for e in fake.calls("images")] == [200, 500, 500, 500, 200]


def test_cut_and_bad_gzip_answers(fake):
    """cut_api_calls: a 200 whose body stops half way (ChunkedEncodingError); bad_gzip_calls:
    Content-Encoding gzip on bytes that are not gzip (ContentDecodingError)."""
    fake.cut_api_calls, fake.bad_gzip_calls = {1}, {2}
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        get(fake, "/api/v2!authuser")
    with pytest.raises(requests.exceptions.ContentDecodingError):
        get(fake, "/api/v2!authuser")
    assert payload(get(fake, "/api/v2!authuser"))["NickName"] == fake.nickname


def test_post_forbidden_leaves_reading_alone(fast):
    """post_forbidden: POST !download is 403 (no Add permission); GET !download, !images and
    the originals still answer."""
    key = fast.add_album("Read only", sizes=(1500,))
    fast.post_forbidden = True
    refused = post(fast, "/api/v2/album/%s!download" % key)
    assert refused.status_code == 403
    assert refused.json() == {"Code": 403, "Message": "Permission denied: this token lacks the Add permission"}
    assert get(fast, "/api/v2/album/%s!download" % key).status_code == 200
    url = payload(get(fast, "/api/v2/album/%s!images" % key))[0]["ArchivedUri"]
    assert get(fast, url).content == fast.original_bytes(fast.albums[key].images[0].key)


def test_refusal_echoes_a_bare_path(fake):
    """echo_bare_path: the 403 of a refused original echoes "/original/KEY/NAME?query", no host."""
    key = fake.add_album("Refused", sizes=(100,))
    image = fake.albums[key].images[0]
    fake.refuse_originals, fake.file_url_signature = {image.key}, "sig-1"
    url = fake.original_url(image)
    assert get(fake, url).json()["Message"].endswith(url)
    fake.echo_bare_path = True
    message = get(fake, url).json()["Message"]
    assert message.endswith(" /original/%s/IMG_0001.jpg?Expires=1900000000&Signature=sig-1" % image.key)
    assert "127.0.0.1" not in message


def test_auth_message_refuses_every_api_call(fake):
    """auth_message: every API call is 401 with that message (here the recorded one of a key
    without v2 access)."""
    with open(os.path.join(DATA, "error_401_api_key_lacks_v2.json")) as f:
        recorded = json.load(f)
    fake.auth_message = recorded["Message"]
    for path in ("/api/v2!authuser", "/api/v2/node/%s!children" % fake.root_id):
        answer = get(fake, path)
        assert answer.status_code == 401 and answer.json() == recorded


def test_archive_links_expire(fast):
    """link_lifetime: WebUris carry Expires and Signature; an expired link answers 403 HTML (or
    a 200 login page); a fresh listing hands out fresh links to the same archive; a valid link
    serves as before, Range included; a forged signature is refused."""
    key = fast.add_album("Expiring", sizes=(3000, 3000))
    fast.link_lifetime = 60
    downloads = complete_downloads(fast, key)
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(downloads[0]["WebUri"]).query)
    assert 50 < int(query["Expires"][0]) - time.time() <= 60 and len(query["Signature"][0]) == 40
    ranged = get(fast, downloads[0]["WebUri"], headers={"Range": "bytes=10-"})
    assert ranged.status_code == 206 and ranged.content == fast.expected_parts(key)[downloads[0]["FileName"]][10:]
    fast.expire_links()                                    # the machine slept
    expired = get(fast, downloads[0]["WebUri"])
    assert expired.status_code == 403 and expired.headers["Content-Type"].startswith("text/html")
    fast.expired_link_login_page = True
    page = get(fast, downloads[1]["WebUri"])
    assert page.status_code == 200 and b"Log In" in page.content
    fresh = payload(get(fast, "/api/v2/album/%s!download" % key))
    same = ("Part", "FileName", "DateAdded", "Size", "Status")
    assert [{k: d[k] for k in same} for d in fresh] == [{k: d[k] for k in same} for d in downloads]
    assert fresh[0]["WebUri"] != downloads[0]["WebUri"]
    assert get(fast, fresh[1]["WebUri"]).content == fast.expected_parts(key)[fresh[1]["FileName"]]
    forged = fresh[0]["WebUri"].replace("Signature=", "Signature=0")
    assert get(fast, forged).status_code == 200 and b"Log In" in get(fast, forged).content


# -- files without originals, and other answer shapes ----------------------------------------

def recorded(name):
    with open(os.path.join(DATA, name)) as f:
        return json.load(f)


def test_collected_images_have_no_archived_fields_and_stay_out_of_zips(fast):
    """A collected image: Origin, CollectedFrom, CollectedWebUri, Protected, OriginalSize, no
    Archived* at all; left out of the album's zip while zip_omit_collected (the default)."""
    keys = fake_smugmug.rendition_account(fast)
    own, theirs = payload(get(fast, "/api/v2/album/%s!images" % keys["collected"]))
    assert theirs["Origin"] == "Collected" and theirs["CollectedFrom"] == "friend"
    assert theirs["CollectedWebUri"].startswith("https://friend.") and theirs["Protected"] is True
    assert theirs["OriginalSize"] == 5000 and not [k for k in theirs if k.startswith("Archived")]
    assert "Origin" not in own and own["Protected"] is False and own["ArchivedSize"] == 2400
    downloads = complete_downloads(fast, keys["collected"])
    assert open_zip(get(fast, downloads[0]["WebUri"]).content)[1] == ["Own.jpg"]
    fast.zip_omit_collected = False
    assert [n for n, _ in fast.album_parts(keys["collected"])[0][1].entries] == ["Own.jpg", "Theirs.jpg"]
    assert [n for n, _ in fast.album_parts(keys["video"])[0][1].entries] == ["Still.jpg"]   # in_zip False


def test_largest_image_serves_a_rendition_and_honours_the_serial(fake):
    """Uris.LargestImage (and LargestVideo) carry KEY-SERIAL; !largestimage is shaped like the
    recorded answer; its Url (photos host) serves a rendition, not the original; a wrong serial
    and no_largest_image answer 404; largest_no_size drops Size."""
    keys = fake_smugmug.rendition_account(fake)
    edited, plain = payload(get(fake, "/api/v2/album/%s!images?_filteruri=LargestImage" % keys["edited"]))
    assert edited["Serial"] == 1 and set(edited["Uris"]) == {"LargestImage"}
    uri = edited["Uris"]["LargestImage"]["Uri"]
    assert uri == "/api/v2/image/%s-1!largestimage" % edited["ImageKey"]
    answer = get(fake, uri).json()["Response"]
    assert answer["Locator"] == "LargestImage" and answer["LocatorType"] == "Object"
    largest = answer["LargestImage"]
    shape = recorded("image_serial1_largestimage_sizedetails_expanded.json")["Expansions"]
    model = [v["LargestImage"] for v in shape.values() if "LargestImage" in v][0]
    assert set(largest) == set(model) and "MD5" not in largest
    assert largest["Usable"] is True and largest["Watermarked"] is False and largest["Ext"] == "jpg"
    assert largest["Url"] == fake.photos_base + "/rendition/%s/Edited-X3.jpg" % edited["ImageKey"]
    assert set(largest["Uris"]) == {"ImageSizeOriginal"}
    data = get(fake, largest["Url"]).content
    assert len(data) == largest["Size"] == 4100 * 6 // 10 and data == fake.rendition_bytes(edited["ImageKey"])
    assert data != fake.original_bytes(edited["ImageKey"])[:len(data)]
    assert get(fake, "/api/v2/image/%s-0!largestimage" % edited["ImageKey"]).status_code == 404
    assert plain["Uris"]["LargestImage"]["Uri"].endswith("%s-0!largestimage" % plain["ImageKey"])
    fake.no_largest_image = {plain["ImageKey"]}
    assert get(fake, plain["Uris"]["LargestImage"]["Uri"]).status_code == 404
    shared = payload(get(fake, "/api/v2/album/%s!images" % keys["unsized"]))[0]
    unsized = payload(get(fake, shared["Uris"]["LargestImage"]["Uri"]))
    assert "Size" not in unsized and len(get(fake, unsized["Url"]).content) == 2400
    assert [e["kind"] for e in fake.calls() if "!largest" in e["path"]] == ["largestimage"] * 4


def test_largest_video_shapes_and_on_the_fly_transcodes(fake):
    """!largestvideo is shaped like the reconstructed answer; video_no_size drops Size, while its
    Url still serves the transcode with a Content-Length; no_largest_video still answers 404."""
    keys = fake_smugmug.rendition_account(fake)
    model = recorded("largestvideo_reconstructed.json")["Response"]["LargestVideo"]
    clip = payload(get(fake, "/api/v2/album/%s!images" % keys["video"]))[1]
    assert clip["IsVideo"] and "ArchivedUri" not in clip
    largest = payload(get(fake, clip["Uris"]["LargestVideo"]["Uri"]))
    assert set(largest) == set(model) and largest["Size"] == 3000
    live = payload(get(fake, "/api/v2/album/%s!images" % keys["unsized"]))[1]
    on_the_fly = payload(get(fake, live["Uris"]["LargestVideo"]["Uri"]))
    assert set(on_the_fly) == set(model) - {"Size"}
    response = get(fake, on_the_fly["Url"])
    assert int(response.headers["Content-Length"]) == 2500 and response.content == fake.transcode_bytes(live["ImageKey"])
    fake.no_largest_video = {live["ImageKey"]}
    assert get(fake, live["Uris"]["LargestVideo"]["Uri"]).status_code == 404


def test_video_archived_uri_may_end_in_d_jpg(fake):
    """video_archived_d_jpg: a video's ArchivedUri ends /D/NAME-D.jpg yet serves the video's
    original; ArchivedSize equals OriginalSize."""
    keys = fake_smugmug.rich_account(fake)
    fake.video_archived_d_jpg = True
    clip = payload(get(fake, "/api/v2/album/%s!images" % keys["video"]))[1]
    assert clip["FileName"] == "Clip.MOV" and clip["ArchivedUri"].endswith("/D/Clip-D.jpg")
    assert clip["ArchivedSize"] == clip["OriginalSize"] == 9000
    assert get(fake, clip["ArchivedUri"]).content == fake.original_bytes(clip["ImageKey"])


def test_field_type_variants(fake):
    """latlong_as_numbers, component_file_types_object and sizes_as_strings change the types of
    those fields only (the object form as recorded)."""
    keys = fake_smugmug.rich_account(fake)
    before = payload(get(fake, "/api/v2/album/%s!images" % keys["captions"]))[0]
    assert before["ComponentFileTypes"] == [] and isinstance(before["Latitude"], str)
    fake.latlong_as_numbers = fake.component_file_types_object = fake.sizes_as_strings = True
    after = payload(get(fake, "/api/v2/album/%s!images" % keys["captions"]))[0]
    assert after["Latitude"] == 38.7223 and after["Longitude"] == -9.1393
    model = recorded("image_owner_view_imagedownload_componentfiletypes_object.json")["Response"]["Image"]
    assert after["ComponentFileTypes"] == model["ComponentFileTypes"] == {"Image": ["jpg"]}
    assert after["ArchivedSize"] == after["OriginalSize"] == "2500"
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"Latitude", "Longitude", "ComponentFileTypes", "ArchivedSize", "OriginalSize"}


def test_image_fields_absent_leaves_fields_out_of_listings(fake):
    """image_fields_absent: those AlbumImage fields are left out of !images (Serial, as the
    recorded listing; Uris); the renditions still answer at their KEY-SERIAL URIs."""
    keys = fake_smugmug.rendition_account(fake)
    fake.image_fields_absent = {"Serial", "Uris"}
    edited = payload(get(fake, "/api/v2/album/%s!images?_filteruri=LargestImage" % keys["edited"]))[0]
    assert "Serial" not in edited and "Uris" not in edited and edited["FileName"] == "Edited.jpg"
    assert get(fake, "/api/v2/image/%s-1!largestimage" % edited["ImageKey"]).status_code == 200


def test_short_files_once_cuts_the_first_fetch_of_each_file(fake):
    """short_files_once: the first fetch of each file of that image (original, transcode,
    rendition) announces its whole length, sends half and closes; the next fetch is whole."""
    keys = fake_smugmug.rendition_account(fake)
    clip = fake.albums[keys["video"]].images[1]
    fake.short_files_once = {clip.key}
    url = fake.transcode_url(clip)
    with pytest.raises(requests.exceptions.RequestException):
        get(fake, url).content
    assert get(fake, url).content == fake.transcode_bytes(clip.key)
    rendition = fake.rendition_url(clip)
    with pytest.raises(requests.exceptions.RequestException):
        get(fake, rendition).content
    assert get(fake, rendition).content == fake.rendition_bytes(clip.key)
    still = fake.albums[keys["video"]].images[0]
    assert get(fake, fake.original_url(still)).content == fake.original_bytes(still.key)   # others whole


# -- the demo ---------------------------------------------------------------------------------

def test_demo_serves_generated_albums_and_writes_the_config(tmp_path):
    """python tests/fake_smugmug.py --albums 4 --bandwidth 50 --videos-outside-zips --write-config
    PATH: the config is written (mode 600) and its api_base serves the sample, rich and
    generated albums; zips leave the videos out."""
    path = tmp_path / "demo.json"
    proc = subprocess.Popen([sys.executable, fake_smugmug.__file__, "--albums", "4", "--bandwidth", "50",
                             "--videos-outside-zips", "--prep-seconds", "0.01", "--write-config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert b"Generated" in proc.stdout.readline()          # the first line comes once it serves
        config = json.loads(path.read_text())
        assert os.stat(path).st_mode & 0o777 == 0o600
        auth = OAuth1(config["app_key"], config["app_key_secret"], config["access_key"], config["access_key_secret"])

        def call(uri):
            """The payload of uri, every page of it (the demo pages !children 4 at a time)."""
            body = requests.get(config["api_base"] + uri, auth=auth, headers={"Accept": "application/json"},
                                timeout=5).json()["Response"]
            found = body.get(body["Locator"])
            if "NextPage" in body.get("Pages", {}):
                found += call(body["Pages"]["NextPage"])
            return found

        root = call("/api/v2/user/tester")["Uris"]["Node"]["Uri"]
        names = {n["Name"]: n for n in call(root + "!children")}
        assert {"Family", "Travel", "Rich Media", "Generated"} <= set(names)
        folders = call(names["Generated"]["Uris"]["ChildNodes"]["Uri"])
        albums = [a for f in folders for a in call(f["Uris"]["ChildNodes"]["Uri"])]
        assert sorted(a["Name"] for a in albums) == ["Album 001", "Album 002", "Album 003", "Album 004"]
        third = [a for a in albums if a["Name"] == "Album 003"][0]["Uris"]["Album"]["Uri"]
        images = call(third + "!images")
        assert images[-1]["IsVideo"] and not any(i["IsVideo"] for i in images[:-1])
        requests.post(config["api_base"] + third + "!download", auth=auth, headers={"Accept": "application/json"},
                      timeout=5)
        assert wait_for(lambda: all(d["Status"] == "Complete" for d in call(third + "!download")), timeout=5)
        link = call(third + "!download")[0]["WebUri"]
        assert open_zip(requests.get(link, auth=auth, timeout=5).content)[1] == [i["FileName"] for i in images[:-1]]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=5)
