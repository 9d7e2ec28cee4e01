#!/usr/bin/env python3
"""A SmugMug API v2 emulator for tests, benchmarks and trying the tool out.

Serves real HTTP on 127.0.0.1 from threads, on two ports: the API (fake.base) and
the download host (fake.photos_base, as photos.smugmug.com), and plays the subset of the API
described in shared/smugmug-api.md: the envelope, !authuser, users, nodes,
paged !children (with a clamped count and _expand=Album), albums, the
!download archive lifecycle (Init -> Processing -> Complete on time knobs),
multi-part archives served with Content-Length and Range, album images, and
the OAuth 1.0a PIN flow. Every API call's OAuth signature is verified with
oauthlib; a bad one gets 401. Faults are knobs on FakeSmugMug, each
deterministic.

Albums hold images (FakeImage: key, file name, size, content seed, video or
not, title, caption, keywords, coordinates...). Archives are real zip files
(stored, no compression) of the album's images, built lazily (ZipContent: no
archive is ever held in memory; CRC-32s are computed once and cached): images
go into parts in listing order, a new part when the next image would take the
part over the album's part_limit bytes; equal names within one part are
renamed by the zip_clash knob ("-1": IMG.jpg, IMG-1.jpg...); videos are left
out with zip_omit_videos; images still Processing never are in archives.

    GET  /api/v2/album/KEY!images          AlbumImage objects, paged (start, count,
                                           images_max_count), _filter, _filteruri
    GET  ArchivedUri = PHOTOS/original/IMAGEKEY/NAME      the original bytes
    GET  /api/v2/image/IMAGEKEY-SERIAL!largestvideo       videos only; its Url =
         PHOTOS/video/IMAGEKEY/1920/NAME-1920.mp4 serves a transcode (other bytes)
    GET  /api/v2/image/IMAGEKEY-SERIAL!largestimage       its Url =
         PHOTOS/rendition/IMAGEKEY/NAME-X3.jpg serves a rendition (other bytes, 60% of the size)

Images may be collected from another account (Origin "Collected": no Archived* fields,
left out of zips), edited (Serial 1: KEY-1 in their URIs), or left out of zips one by one
(in_zip); rendition_account() builds albums of each.

Request log kinds: walk, album, post, download-get, images, video, largestimage (API
calls); archive (zip parts), file (originals, transcodes and renditions). Status 0: an API call whose
connection an outage cut, unanswered.

The link can be taken away: fake.outage(seconds, mode) (or the outage_at trigger)
refuses connections (or resets them) for a while, then serves again on the same ports.

    python tests/fake_smugmug.py --write-config demo-config.json
        # serve the sample and rich accounts, write a config, print the command to run
    python tests/fake_smugmug.py --help      # --albums N, --bandwidth, --videos-outside-zips
"""

import argparse
import bisect
import dataclasses
import datetime
import email.utils
import errno
import functools
import hashlib
import hmac
import html
import http.server
import itertools
import json
import math
import os
import random
import shlex
import socket
import socketserver
import struct
import sys
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from oauthlib.common import Request as OAuthRequest
from oauthlib.oauth1.rfc5849 import signature as oauth_signature

APP_KEY, APP_SECRET = "test-app-key-7f3a", "test-app-secret-91c2"
ACCESS_KEY, ACCESS_SECRET = "test-access-token-5d8e", "test-access-secret-2b6f"
PATTERN_PERIOD = 65521       # a prime: content shifted by any offset differs
T0 = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)


LOGIN_PAGE = ("<html><head><title>SmugMug - Log In</title></head><body>"
              "<form action='/login'>Please log in</form></body></html>")


def iso(moment):
    return moment.replace(microsecond=0).isoformat()


def now_plus_one():
    """Whole seconds, one second ahead: a change is always newer than anything seen before."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return now + datetime.timedelta(seconds=1)


@functools.lru_cache(maxsize=512)      # 128 KiB each: at most 64 MiB held
def pattern_block(seed):
    block = random.Random(seed).randbytes(PATTERN_PERIOD)
    return block + block


# CRC-32 of long periodic content without reading it: zlib's crc32_combine, in Python.

def _gf2_times(matrix, vector):
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


def _gf2_square(matrix):
    return [_gf2_times(matrix, row) for row in matrix]


def crc32_combine(crc1, crc2, len2):
    """The CRC-32 of A+B from crc1 = crc32(A), crc2 = crc32(B) and len2 = len(B)."""
    if len2 <= 0:
        return crc1
    odd = [0xEDB88320] + [1 << n for n in range(31)]     # the operator for one zero bit
    even = _gf2_square(odd)                              # two zero bits
    odd = _gf2_square(even)                              # four zero bits
    while True:
        even = _gf2_square(odd)
        if len2 & 1:
            crc1 = _gf2_times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = _gf2_square(even)
        if len2 & 1:
            crc1 = _gf2_times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


class Content:
    """Deterministic bytes: byte i is block[i % PERIOD] for a block seeded by `seed`.
    Nothing of size `size` is ever held in memory; crc32() and md5() are computed once per
    (seed, size) and cached (the CRC in O(log size) time, the MD5 streamed)."""

    _digests: Dict[tuple, object] = {}
    _lock = threading.Lock()

    def __init__(self, seed, size):
        self.seed, self.size = seed, size

    def block(self):
        return pattern_block(self.seed)

    def read(self, start, end):
        block, out = self.block(), []
        pos, end = max(0, start), min(end, self.size)
        while pos < end:
            offset = pos % PATTERN_PERIOD
            n = min(end - pos, PATTERN_PERIOD)
            out.append(block[offset:offset + n])
            pos += n
        return b"".join(out)

    def whole(self):
        return self.read(0, self.size)

    def _cached(self, what, compute):
        key = (what, self.seed, self.size)
        with Content._lock:
            if key in Content._digests:
                return Content._digests[key]
        value = compute()
        with Content._lock:
            Content._digests[key] = value
        return value

    def crc32(self):
        def compute():
            if self.size <= 256 << 20:          # zlib is quicker than the pure-Python doubling below
                crc = 0
                for pos in range(0, self.size, 1 << 20):
                    crc = zlib.crc32(self.read(pos, min(self.size, pos + (1 << 20))), crc)
                return crc
            period = self.block()[:PATTERN_PERIOD]
            repeats, rest = divmod(self.size, PATTERN_PERIOD)
            crc, length = 0, 0                  # CRC of `repeats` periods, by doubling
            for bit in bin(repeats)[2:] if repeats else "":
                crc, length = crc32_combine(crc, crc, length), 2 * length
                if bit == "1":
                    crc, length = crc32_combine(crc, zlib.crc32(period), PATTERN_PERIOD), length + PATTERN_PERIOD
            return crc32_combine(crc, zlib.crc32(period[:rest]), rest)
        return self._cached("crc32", compute)

    def md5(self):
        def compute():
            digest = hashlib.md5()
            for pos in range(0, self.size, 1 << 20):
                digest.update(self.read(pos, pos + (1 << 20)))
            return digest.hexdigest()
        return self._cached("md5", compute)


@dataclass
class FakeImage:
    """One file of an album (a photo or a video), as !images lists it."""
    key: str                                  # ImageKey
    file_name: str
    size: int = 3000                          # bytes of the original
    seed: str = ""                            # its content: Content(seed, size)
    is_video: bool = False
    title: str = ""
    caption: str = ""
    keywords: Sequence[str] = ()
    date_time_original: Optional[str] = iso(T0)   # None: left out of the listing (no EXIF time)
    date_time_uploaded: Optional[str] = iso(T0)   # None: left out
    date: str = iso(T0)                       # Date (when SmugMug took the upload in)
    latitude: float = 0
    longitude: float = 0
    altitude: int = 0
    hidden: bool = False
    processing: bool = False                  # True: listed, never in an archive
    archived: bool = True                     # False: no ArchivedUri/ArchivedSize/ArchivedMD5
    last_updated: datetime.datetime = T0
    video_size: Optional[int] = None          # the !largestvideo transcode; None: size // 2 + 100
    origin: str = ""                          # "Collected": collected from another account (listed
                                              # with Origin, CollectedFrom, CollectedWebUri,
                                              # Protected, and no Archived* fields)
    collected_from: str = ""                  # the account it was collected from
    protected: bool = False                   # Protected (always True for a collected image)
    serial: int = 0                           # Serial: 1 for an edited image (KEY-1 in its URIs)
    in_zip: bool = True                       # False: archives leave it out
    rendition_size: Optional[int] = None      # the !largestimage rendition; None: 60% of size
    largest_no_size: bool = False             # !largestimage gives no Size
    video_no_size: bool = False               # !largestvideo gives no Size (made on the fly)

    def __post_init__(self):
        self.seed = self.seed or "image:%s" % self.key
        self.keywords = list(self.keywords)
        if isinstance(self.last_updated, str):
            self.last_updated = datetime.datetime.fromisoformat(self.last_updated)

    @property
    def transcode_size(self):
        return self.video_size if self.video_size is not None else self.size // 2 + 100

    def content(self):
        """The original file."""
        return Content(self.seed, self.size)

    def transcode(self):
        """The video transcode served by !largestvideo (different bytes from the original)."""
        return Content("transcode:" + self.seed, self.transcode_size)

    @property
    def collected(self):
        return self.origin == "Collected"

    @property
    def stem(self):
        return self.file_name.rsplit(".", 1)[0] if "." in self.file_name else self.file_name

    def rendition(self):
        """The rendition served by !largestimage (different bytes from the original)."""
        size = self.rendition_size if self.rendition_size is not None else self.size * 6 // 10
        return Content("rendition:" + self.seed, size)


ZIP64_LIMIT = 0xFFFFFFFF


def _dos_time(text):
    try:
        moment = datetime.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        moment = T0
    moment = max(moment.replace(tzinfo=None), datetime.datetime(1980, 1, 1))
    return ((moment.year - 1980) << 9 | moment.month << 5 | moment.day,
            moment.hour << 11 | moment.minute << 5 | moment.second // 2)


class ZipContent:
    """A stored (uncompressed) zip of images, built lazily: the layout comes from the sizes
    alone, headers are made on demand (the CRC-32 of each image is computed once, cached),
    and image data is read from each image's Content. Same interface as Content (size, read,
    whole), plus `entries`: [(name in the zip, FakeImage)] and `data_offsets` (where each
    entry's data starts). Entries over 4 GiB or past 4 GiB get ZIP64 records."""

    def __init__(self, entries):
        self.entries = [(name, dataclasses.replace(image)) for name, image in entries]   # a snapshot
        self._contents = [image.content() for _, image in self.entries]
        self._names = [name.encode("utf-8") for name, _ in self.entries]
        self._segments = []             # (start, length, kind, entry index)
        self.header_offsets, self.data_offsets = [], []
        pos = 0
        for i, content in enumerate(self._contents):
            self.header_offsets.append(pos)
            length = 30 + len(self._names[i]) + (20 if content.size >= ZIP64_LIMIT else 0)
            self._segments.append((pos, length, "local", i))
            pos += length
            self.data_offsets.append(pos)
            self._segments.append((pos, content.size, "data", i))
            pos += content.size
        self._directory_offset = pos
        self._directory_size = sum(46 + len(self._names[i]) + self._extra_size(i)
                                   for i in range(len(self.entries)))
        self._zip64 = (pos >= ZIP64_LIMIT or self._directory_size >= ZIP64_LIMIT
                       or len(self.entries) >= 0xFFFF)
        tail = self._directory_size + 22 + (56 + 20 if self._zip64 else 0)
        self._segments.append((pos, tail, "tail", None))
        self.size = pos + tail
        self._starts = [s[0] for s in self._segments]
        self._headers = {}

    def _zip64_fields(self, i):
        size, offset = self._contents[i].size, self.header_offsets[i]
        return [v for v in (size, size) if v >= ZIP64_LIMIT] + ([offset] if offset >= ZIP64_LIMIT else [])

    def _extra_size(self, i):
        fields = self._zip64_fields(i)
        return 4 + 8 * len(fields) if fields else 0

    def _fixed(self, i):
        """(version needed, flags, DOS time, DOS date, CRC-32) of entry i."""
        name, image = self.entries[i]
        date, time_ = _dos_time(image.date_time_original)
        flags = 0 if self._names[i].decode("utf-8").isascii() else 0x800
        version = 45 if self._zip64_fields(i) else 20
        return version, flags, time_, date, self._contents[i].crc32()

    def _local_header(self, i):
        if ("local", i) not in self._headers:
            version, flags, time_, date, crc = self._fixed(i)
            size = self._contents[i].size
            extra = struct.pack("<HHQQ", 1, 16, size, size) if size >= ZIP64_LIMIT else b""
            small = min(size, ZIP64_LIMIT)
            self._headers[("local", i)] = struct.pack(
                "<IHHHHHIIIHH", 0x04034B50, version, flags, 0, time_, date, crc, small, small,
                len(self._names[i]), len(extra)) + self._names[i] + extra
        return self._headers[("local", i)]

    def _tail(self):
        if "tail" not in self._headers:
            out = []
            for i in range(len(self.entries)):
                version, flags, time_, date, crc = self._fixed(i)
                fields = self._zip64_fields(i)
                extra = struct.pack("<HH", 1, 8 * len(fields)) + struct.pack("<%dQ" % len(fields), *fields) \
                    if fields else b""
                size = min(self._contents[i].size, ZIP64_LIMIT)
                out.append(struct.pack(
                    "<IHHHHHHIIIHHHHHII", 0x02014B50, version, version, flags, 0, time_, date, crc,
                    size, size, len(self._names[i]), len(extra), 0, 0, 0, 0,
                    min(self.header_offsets[i], ZIP64_LIMIT)) + self._names[i] + extra)
            count, where, length = len(self.entries), self._directory_offset, self._directory_size
            if self._zip64:
                out.append(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count,
                                       length, where))
                out.append(struct.pack("<IIQI", 0x07064B50, 0, where + length, 1))
            out.append(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                                   min(length, ZIP64_LIMIT), min(where, ZIP64_LIMIT), 0))
            self._headers["tail"] = b"".join(out)
        return self._headers["tail"]

    def read(self, start, end):
        start, end = max(0, start), min(end, self.size)
        out = []
        index = max(0, bisect.bisect_right(self._starts, start) - 1)
        while start < end and index < len(self._segments):
            seg_start, length, kind, i = self._segments[index]
            a, b = start - seg_start, min(end, seg_start + length) - seg_start
            if b > a:
                if kind == "data":
                    out.append(self._contents[i].read(a, b))
                else:
                    out.append((self._local_header(i) if kind == "local" else self._tail())[a:b])
                start = seg_start + b
            index += 1
        return b"".join(out)

    def whole(self):
        return self.read(0, self.size)


def clash_name(name, taken, style):
    """The name an entry gets in a zip where `taken` names are already used: SmugMug's "-1"
    style (IMG.jpg, IMG-1.jpg, IMG-2.jpg), " (1)" (IMG (1).jpg), or "keep" (left as is)."""
    if style == "keep" or name not in taken:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    pattern = "%s-%d" if style == "-1" else "%s (%d)"
    n = 1
    while True:
        candidate = (pattern % (stem, n)) + (("." + ext) if dot else "")
        if candidate not in taken:
            return candidate
        n += 1


@dataclass
class Node:
    node_id: str
    type: str                      # Folder, Album, Page or anything else
    name: str
    parent: Optional[str]
    children: List[str] = field(default_factory=list)
    album_key: Optional[str] = None
    date_added: datetime.datetime = T0


@dataclass
class FakeAlbum:
    """An album: its images and how its archive splits into parts.

    part_sizes (legacy): one image per size, one image per part (part_limit = max(sizes));
    assigning it later replaces the images the same way (keeping keys and names by position).
    """
    key: str
    node_id: str
    part_sizes: Optional[List[int]] = None
    part_names: Optional[List[str]] = None
    version: int = 1
    last_updated: datetime.datetime = T0
    images_last_updated: datetime.datetime = T0
    image_count: Optional[int] = None          # ImageCount as reported; None: len(images)
    allow_downloads: bool = True
    prep_seconds: Optional[float] = None
    images: List[FakeImage] = field(default_factory=list)
    part_limit: Optional[int] = None           # bytes of image data per part; None: one part
    new_image_id: Optional[object] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.part_sizes is not None and not self.images:
            self._images_from_sizes(self.part_sizes)
        self.__dict__["_ready"] = True

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        if name == "part_sizes" and value is not None and self.__dict__.get("_ready"):
            self._images_from_sizes(value)

    def _images_from_sizes(self, sizes):
        old, images = list(self.images), []
        for i, size in enumerate(sizes):
            if i < len(old):
                key, name = old[i].key, old[i].file_name
            elif self.new_image_id:
                key, name = self.new_image_id()
            else:
                key, name = "%sI%d" % (self.key, i + 1), "IMG_%04d.jpg" % (i + 1)
            images.append(FakeImage(key, name, size, seed=self.image_seed(key)))
        self.images = images
        self.part_limit = max(sizes) if sizes else None

    def image_seed(self, image_key):
        return "%s:%s:%d" % (self.key, image_key, self.version)

    def archived_images(self, omit_videos=False, omit_collected=True):
        return [im for im in self.images if not im.processing and im.in_zip
                and not (omit_videos and im.is_video) and not (omit_collected and im.collected)]

    def part_name(self, i, count):
        if self.part_names and i < len(self.part_names):
            return self.part_names[i]
        return "%s.zip" % self.key if count == 1 else "%s-%d.zip" % (self.key, i + 1)

    def parts(self, zip_clash="-1", omit_videos=False, omit_collected=True):
        """[(file name, ZipContent)] of the album's archive as it would be built now."""
        groups, current, used = [], [], 0
        for image in self.archived_images(omit_videos, omit_collected):
            if current and self.part_limit is not None and used + image.size > self.part_limit:
                groups.append(current)
                current, used = [], 0
            current.append(image)
            used += image.size
        if current:
            groups.append(current)
        out = []
        for i, group in enumerate(groups):
            taken, entries = set(), []
            for image in group:
                name = clash_name(image.file_name, taken, zip_clash)
                taken.add(name)
                entries.append((name, image))
            out.append((self.part_name(i, len(groups)), ZipContent(entries)))
        return out


@dataclass
class Archive:
    archive_id: str
    album: str
    version: int
    created: float                 # monotonic
    created_at: datetime.datetime
    prep_seconds: float
    parts: list
    forced_status: Optional[str] = None
    number: int = 1                 # 1 for the album's first archive, 2 for the next...


class FakeSmugMug:
    """The emulated account, the knobs, the request log, and the HTTP server."""

    def __init__(self, nickname="tester", app=(APP_KEY, APP_SECRET), token=(ACCESS_KEY, ACCESS_SECRET)):
        self.nickname = nickname
        self.app_key, self.app_secret = app
        self.tokens = {token[0]: token[1]}          # access tokens -> secrets
        self.request_tokens = {}                    # request token -> (secret, verifier)
        self.nodes: Dict[str, Node] = {}
        self.albums: Dict[str, FakeAlbum] = {}
        self.archives: Dict[str, List[Archive]] = {}
        self.archive_by_id: Dict[str, Archive] = {}
        self.canned = {}                            # (path, start) -> body served as is
        self.lock = threading.RLock()
        self.log = []                               # dicts: t, method, path, query, status, kind
        self.nonces = set()
        self.ids = itertools.count(1)
        self.api_count = 0
        self.download_bytes = 0
        self.root_id = self.add_node("Folder", "", None, node_id="root0").node_id
        # knobs ------------------------------------------------------------
        self.api_latency = 0.0          # seconds added to every API call
        self.prep_seconds = 0.05        # archive preparation time
        self.max_count = 100            # the server clamps !children count to this
        self.default_count = 10
        self.bandwidth = None           # bytes/s over all downloads, None = unlimited
        self.post_status = 202          # 202 or 200
        self.post_lists_downloads = True
        self.unknown_status = None      # e.g. "Queued": reported while preparing
        self.honor_range = True
        self.wrong_offset_once = False
        self.fail_every = 0             # every k-th API call gets a 5xx (HTML body on odd ones)
        self.garbage_every = 0          # every k-th API call gets a 200 with a non-JSON body (a POST is
                                        # still carried out: an archive requested is made)
        self.throttle_calls = set()     # API call numbers answered 429 (opens a window)
        self.throttle_status = 429      # or 503: "busy", with the same Retry-After window
        self.retry_after = 1            # seconds, or a string (HTTP date)
        self.throttle_until = 0.0
        self.throttled_log = []         # (t, path) of calls that met a closed window
        self.rate_remaining = None      # X-RateLimit-Remaining to report
        self.cut_after = None           # a download is cut after this many bytes ...
        self.cut_times = 0              # ... the first n times per part
        self.short_times = 0            # the first n downloads per part end early (short body)
        self.error_once = set()         # album keys: first archive ends in Error
        self.error_always = set()
        self.removed_once = {}          # album key -> "before" (Removed on poll) or "during" (404 on download)
        self.revoke_after = None        # API call number after which the token is refused
        self.not_found_nodes = set()    # node ids whose !children answer 404
        self.deleted_albums = set()     # album keys still listed by their folder, every album URI 404
        self.require_download_oauth = True
        self.post_empty_body = False    # POST answered with no body at all
        self.relative_web_uri = False   # WebUri given as a path on the API host
        self.redirect_downloads = False # WebUri answers 302 to the real file
        self.omit_part_numbers = False  # Download objects without "Part"
        self.lowercase_status = False   # "complete" instead of "Complete"
        self.no_content_length = False  # archive bodies end with the connection, no Content-Length
        # zips, images and files
        self.zip_clash = "-1"           # same names in one part: "-1" (IMG-1.jpg), " (1)" or "keep"
        self.zip_omit_videos = False    # archives leave videos out
        self.images_max_count = 100     # the server clamps !images count to this
        self.images_default_count = 100
        self.wrong_file_once = set()    # image keys: the first fetch of its file has one byte flipped
        self.refuse_originals = set()   # image keys: its ArchivedUri answers 403, echoing the URL asked for
        self.file_url_signature = None  # str: ArchivedUris carry it in their query, as signed CDN links do
        self.web_uri_only_when_complete = False   # Download objects carry WebUri only when Complete
        self.omit_size = False          # Download objects without "Size"
        self.staggered_parts = False    # part i of an archive is Complete after prep_seconds * i
        self.html_once = set()          # album keys: first download of each part of the first archive is HTML
        self.corrupt_once = set()       # album keys: first download of part 1 of the first archive has
                                        # one byte flipped in its first entry's data
        self.served = {}                # (archive id, part number) -> archive bytes sent
        self.connections = set()        # client sockets served (vanish() cuts them)
        self.error_archives = set()     # archive ids that end in Error when their preparation ends
        self.never_list = set()         # album keys: a POST is accepted, but no archive is ever listed
        self.gone_parts = set()         # (album key, part number): that part of the album's first
                                        # archive answers 404 (expired) while the others stream
        self.no_largest_video = set()   # image keys: !largestvideo answers 404
        self.no_largest_image = set()   # image keys: !largestimage answers 404
        self.zip_omit_collected = True  # archives leave collected images out (whether SmugMug's do
                                        # is not known)
        self.video_archived_d_jpg = False   # a video's ArchivedUri ends /D/NAME-D.jpg (NAME: the stem of
                                        # its FileName), serving the video's original all the same
        # field-type variants of !images (each off by default) -------------
        self.latlong_as_numbers = False # Latitude/Longitude as numbers, not strings
        self.component_file_types_object = False   # ComponentFileTypes {"Image": ["jpg"]} (videos
                                        # {"Video": ["mov"]}) instead of []
        self.sizes_as_strings = False   # ArchivedSize and OriginalSize as digit strings
        self.image_fields_absent = set()    # AlbumImage fields left out of every !images object, e.g.
                                        # {"Serial"} (as the recorded listing) or {"Uris"}
        self.image_variant = None       # a function (obj, FakeImage) editing each !images object in
                                        # place: any other variant a server may send (null fields,
                                        # MD5 in capitals, other date forms, Keywords as a list...)
        self.short_files_once = set()   # image keys: the first fetch of each of its files (original,
                                        # transcode, rendition) sends the whole Content-Length, half
                                        # the body, then closes the connection
        # an honest quota ------------------------------------------------
        self.quota = None               # (calls, window seconds): fixed windows from the first API
                                        # call; every API answer carries X-RateLimit-Limit,
                                        # -Remaining (left in this window after this call) and
                                        # -Reset (epoch s, when it ends); a call past the window's
                                        # calls gets 429 + Retry-After (whole s to its end, rounded
                                        # up), is not counted, and is logged in quota_refused.
                                        # Downloads are not API calls: never counted.
        self.quota_refused = []         # (monotonic time, path) of the calls refused by the quota
        self.quota_windows = []         # (start, end) monotonic times of each window that ran out
        self._quota_state = None        # (quota, first call time, {window index: calls used})
        # faults on lists and answers ------------------------------------
        self.fail_pages = {}            # {("images" | "walk", START): STATUS}: that page of every
                                        # !images (or !children) list answers STATUS, JSON error body
        self.fail_pages_times = 0       # ... only the first n times per list and page (0: always)
        self._page_failures = {}
        self.cut_api_calls = set()      # API call numbers: a 200 with the whole body's Content-Length,
                                        # half the body sent, then the connection closed
        self.bad_gzip_calls = set()     # API call numbers: a 200 with Content-Encoding gzip and a body
                                        # that is not gzip
        self.auth_message = None        # str: every API call answers 401 {"Code": 401, "Message": it}
                                        # (e.g. an API key without v2 access)
        self.post_forbidden = False     # every POST !download answers 403 (a token without Add
                                        # permission); GETs (Read) keep working
        self.echo_bare_path = False     # refuse_originals' 403 echoes the link as a bare path with
                                        # its query ("/original/KEY/NAME?Expires=..."), no host
        self.link_lifetime = None       # seconds: archive WebUris carry ?Expires=<epoch>&Signature=
                                        # <hex>; a GET after Expires (or with a wrong signature)
                                        # answers 403 with an HTML body. None: links never expire
        self.expired_link_login_page = False   # ... 200 with an HTML login page instead of the 403
        self.link_clock_skew = 0.0      # seconds added to the clock links expire by (expire_links())
        # answer variants (each off by default) ----------------------------
        self.omit_next_page = False     # Pages never carries NextPage, though Total says more
        self.walk_gate = None           # a threading.Event: !children of every folder but the root waits
                                        # for it (30 s at most), so a test can act while the walk is held
        self.images_no_pages = False    # !images answers carry no Pages block at all (each page alone:
                                        # with images_max_count below the album's size, a short listing
                                        # only the album's ImageCount can show)
        self.later_pages_missing = False  # a list asked from start > 1 answers 404 (a server replaying
                                          # recorded first pages only)
                                        # (as the recorded bzimmer !images page: Total 34, Count 30)
        self.api_redirects = {}         # request kind -> 301/302/303/307/308: such API calls are
                                        # redirected to the same URL under /moved (served alike);
                                        # "user": /api/v2/user/NICK in another case, to its own case
        self.post_answer = None         # (status, body bytes): POST !download answers this (the
                                        # archive is still made), e.g. (202, b"Accepted")
        self.empty_download_status = None   # 204 or 404: GET !download with no archive listed answers it
        self.download_max_count = 0     # GET !download is paged, at most this many objects a page (0: one page)
        self.part_date_step = 0         # seconds: part i of an archive is DateAdded i * step after part 1
        self.undated_until_complete = False  # Download objects have DateAdded null until Complete
        self.zero_based_parts = False   # Download objects number parts 0..n-1
        self.node_type_case = None      # "lower" or "upper": node Type sent as "album" / "FOLDER"
        self.image_count_as_string = False   # Album ImageCount sent as a string ("3")
        self.expired_html = set()       # album keys: the first archive expires at its first download:
                                        # listed Removed, its links answer 200 with an HTML login page
        self._download_attempts = {}
        self._faults_done = set()       # one-time faults already played
        self.image_ids = itertools.count(1)
        self.file_numbers = itertools.count(1)
        self._bucket_lock = threading.Lock()
        self._bucket_time = time.monotonic()
        self._bucket_tokens = 0.0
        # the two hosts and outages --------------------------------------
        self.photos_host = True         # downloads on a second port (photos_base), as SmugMug serves
                                        # them from photos.smugmug.com; False: on the API port
        self.outage_at = None           # {"api_call": N}: an outage starts when the N-th API call
                                        # arrives (that call's connection is cut, unanswered), or
                                        # {"download_bytes": B}: once B bytes of downloads are sent
                                        # in all (the download under way is cut there); fires once
        self.outage_seconds = 1.0       # ... the length of that outage
        self.outage_mode = "refuse"     # ... and its mode (see outage())
        self.outage_log = []            # (start, end) monotonic times of the outages played (while
                                        # one lasts, end is when it is due to end)
        self._refuse_until = self._reset_until = 0.0
        self._outage_timers = []
        self._serve_lock = threading.Lock()
        self._stopped = False
        self.server = self.photos_server = None
        self.port = self.photos_port = None

    # -- building the account ---------------------------------------------

    def new_id(self, prefix):
        return "%s%d" % (prefix, next(self.ids))

    def add_node(self, type_, name, parent, node_id=None, days=0):
        node = Node(node_id or self.new_id("n"), type_, name, parent,
                    date_added=T0 + datetime.timedelta(days=days))
        with self.lock:
            self.nodes[node.node_id] = node
            if parent:
                self.nodes[parent].children.append(node.node_id)
        return node

    def add_folder(self, name, parent=None, **kw):
        return self.add_node("Folder", name, parent or self.root_id, **kw).node_id

    def new_image_id(self):
        """(ImageKey, file name) for a new image: I1, I2... and IMG_0001.jpg... unique in the fake."""
        return "I%d" % next(self.image_ids), "IMG_%04d.jpg" % next(self.file_numbers)

    def add_album(self, name, parent=None, sizes=(3000,), names=None, image_count=None, key=None,
                  images=None, part_limit=None, **kw):
        """A new album; returns its key. Without `images`, one image per entry of `sizes` (that many
        bytes each, named IMG_0001.jpg...) and one image per part. `images`: a list of dicts of
        FakeImage fields (key, file name and seed made up when absent), split into parts of at
        most `part_limit` bytes of image data (None: one part). `names`: the part file names."""
        node = self.add_node("Album", name, parent or self.root_id, **kw)
        key = key or self.new_id("A")
        node.album_key = key
        album = FakeAlbum(key, node.node_id, part_names=names, image_count=image_count,
                          new_image_id=self.new_image_id)
        if images is None:
            album.part_sizes = list(sizes)
        else:
            album.images = [self.make_image(album, **fields) for fields in images]
            album.part_limit = part_limit
        self.albums[key] = album
        return key

    def make_image(self, album, **fields):
        key, name = self.new_image_id()
        fields.setdefault("key", key)
        fields.setdefault("file_name", name)
        fields.setdefault("seed", album.image_seed(fields["key"]))
        return FakeImage(**fields)

    def add_image(self, album_key, **fields):
        """Adds an image (FakeImage fields) at the end of the album; the album's LastUpdated and
        ImagesLastUpdated become now (+1 s). Returns the FakeImage."""
        with self.lock:
            album = self.albums[album_key]
            image = self.make_image(album, **fields)
            album.images.append(image)
            album.last_updated = album.images_last_updated = now_plus_one()
        return image

    def replace_image(self, image_key, seed=None):
        """A photo's bytes replaced on SmugMug (same ImageKey and FileName, new content, a new
        LastUpdated); its album's timestamps move on. Returns the FakeImage."""
        with self.lock:
            album, image = self.find_image(image_key)
            image.seed = seed or "replaced:%s:%s" % (image.seed, next(self.ids))
            image.last_updated = album.last_updated = album.images_last_updated = self._later(album)
        return image

    def edit_image(self, image_key, **fields):
        """A photo's caption, title or keywords edited on SmugMug (its bytes stay); its
        LastUpdated and its album's timestamps move on."""
        with self.lock:
            album, image = self.find_image(image_key)
            for name, value in fields.items():
                setattr(image, name, value)
            image.last_updated = album.last_updated = album.images_last_updated = self._later(album)
        return image

    @staticmethod
    def _later(album):
        """A time past the album's last change (whole seconds): a change is always seen."""
        return max(now_plus_one(), album.last_updated + datetime.timedelta(seconds=1))

    def touch(self, key):
        """The album changed: new timestamps, new content (every image gets new bytes and a new
        LastUpdated)."""
        with self.lock:
            album = self.albums[key]
            album.version += 1
            album.last_updated = album.images_last_updated = now_plus_one()
            for image in album.images:
                image.seed = album.image_seed(image.key)
                image.last_updated = album.last_updated

    def remove_node(self, node_id):
        with self.lock:
            node = self.nodes.pop(node_id)
            if node.parent:
                self.nodes[node.parent].children.remove(node_id)

    def rename(self, node_id, name):
        self.nodes[node_id].name = name

    def move(self, node_id, new_parent):
        with self.lock:
            node = self.nodes[node_id]
            self.nodes[node.parent].children.remove(node_id)
            node.parent = new_parent
            self.nodes[new_parent].children.append(node_id)

    def album_parts(self, key):
        """[(part file name, ZipContent)] of an archive of the album requested now."""
        return self.albums[key].parts(self.zip_clash, self.zip_omit_videos, self.zip_omit_collected)

    def expected_parts(self, key):
        """{file name: bytes} of the album's current archive."""
        return {name: content.whole() for name, content in self.album_parts(key)}

    def expected_files(self, key):
        """{ImageKey: original bytes} of every image of the album (as its ArchivedUri serves)."""
        return {image.key: image.content().whole() for image in self.albums[key].images}

    def find_image(self, image_key):
        """(FakeAlbum, FakeImage) of an image key, or (None, None)."""
        with self.lock:
            for album in self.albums.values():
                for image in album.images:
                    if image.key == image_key:
                        return album, image
        return None, None

    def original_bytes(self, *keys):
        """original_bytes([album_key,] image_key): the bytes its ArchivedUri serves now."""
        return self.find_image(keys[-1])[1].content().whole()

    def transcode_bytes(self, image_key):
        """The bytes the !largestvideo Url of a video serves."""
        return self.find_image(image_key)[1].transcode().whole()

    def rendition_bytes(self, image_key):
        """The bytes the !largestimage Url of an image serves."""
        return self.find_image(image_key)[1].rendition().whole()

    def first_ready_at(self):
        """The monotonic time the first archive of the run became ready (Complete), or None."""
        with self.lock:
            archives = list(self.archive_by_id.values())
        return min((a.created + a.prep_seconds for a in archives if not a.forced_status), default=None)

    def prepared_undownloaded_bytes(self):
        """Over every archive, the bytes of its parts currently Complete not yet sent (a part's
        size minus the bytes served for it, at least 0): prepared but not yet downloaded."""
        total = 0
        with self.lock:
            archives = list(self.archive_by_id.values())
        for archive in archives:
            for i, (_name, content) in enumerate(archive.parts):
                if self.archive_status(archive, i) == "Complete":
                    total += max(0, content.size - self.served.get((archive.archive_id, i + 1), 0))
        return total

    # -- serving ----------------------------------------------------------

    @property
    def base(self):
        """The API host: http://127.0.0.1:PORT."""
        return "http://127.0.0.1:%d" % self.port

    @property
    def photos_base(self):
        """The download host (photos.smugmug.com's part): every archive, original, transcode and
        rendition link the emulator hands out is on it; the API host when photos_host is off."""
        return "http://127.0.0.1:%d" % (self.photos_port if self.photos_host else self.port)

    def _listen(self, port, name):
        """A _Server on 127.0.0.1:port (0: any), serving from a daemon thread. A given port is
        bound with SO_REUSEADDR, retried for up to 2 s while the system still holds it."""
        deadline = time.monotonic() + 2.0
        while True:
            try:
                server = _Server(("127.0.0.1", port), _Handler)
                break
            except OSError as exc:
                if not port or exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        server.fake = self
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=name,
                         daemon=True).start()
        return server

    def start(self):
        """Serves the API and the download host, each on a new port."""
        self._stopped = False
        self._refuse_until = self._reset_until = 0.0
        self.server = self._listen(0, "fake-smugmug")
        self.photos_server = self._listen(0, "fake-smugmug-photos")
        self.port, self.photos_port = self.server.server_address[1], self.photos_server.server_address[1]
        return self

    def _close_servers(self):
        """Both ports stop listening (connections already open are left alone)."""
        with self._serve_lock:
            servers = [s for s in (self.server, self.photos_server) if s is not None and not s.closed]
            for server in servers:
                server.closed = True
        stoppers = [threading.Thread(target=server.shutdown, daemon=True) for server in servers]
        for thread in stoppers:        # each waits up to a poll interval: both at once
            thread.start()
        for thread in stoppers:
            thread.join()
        for server in servers:
            server.server_close()

    def cut_connections(self):
        """Cuts every open connection at once (downloads in flight included): the client sees
        the answer end early, or a reset (SO_LINGER 0) if it writes again."""
        with self.lock:
            connections, self.connections = list(self.connections), set()
        for sock in connections:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self):
        """Both ports stop listening for good (an outage under way never gives them back)."""
        self._stopped = True
        for timer in self._outage_timers:
            timer.cancel()
        self._close_servers()

    def vanish(self):
        """The server goes away: both ports stop listening and every open connection is cut.
        start() serves again, on new ports."""
        self.stop()
        self.cut_connections()

    # -- outages ------------------------------------------------------------

    def outage(self, seconds, mode="refuse"):
        """Takes the link away for `seconds`, from now; returns at once (a timer ends it).
        mode "refuse": both ports stop listening and every open connection is cut; a connect is
        refused until, after `seconds`, both listen again ON THE SAME PORTS. mode "reset": both
        keep listening, but every connection accepted is reset at once (ECONNRESET), and every
        open one is cut. Each outage is logged in outage_log as (start, end), monotonic times."""
        if mode not in ("refuse", "reset"):
            raise ValueError("outage mode %r: refuse or reset" % mode)
        start = time.monotonic()
        with self.lock:
            self.outage_log.append((start, start + seconds))
            index = len(self.outage_log) - 1
            if mode == "refuse":
                self._refuse_until = max(self._refuse_until, start + seconds)
            else:
                self._reset_until = max(self._reset_until, start + seconds)
        if mode == "refuse":
            self._close_servers()
        self.cut_connections()
        timer = threading.Timer(seconds, self._outage_over, args=(index, mode))
        timer.daemon = True
        self._outage_timers.append(timer)
        timer.start()

    def _outage_over(self, index, mode):
        with self.lock:
            if self._stopped or time.monotonic() < (self._refuse_until if mode == "refuse"
                                                    else self._reset_until) - 0.001:
                return              # stopped meanwhile, or a later outage still runs
        if mode == "refuse":
            with self._serve_lock:
                if self._stopped or self.port is None:
                    return
                self.server = self._listen(self.port, "fake-smugmug")
                self.photos_server = self._listen(self.photos_port, "fake-smugmug-photos")
        with self.lock:
            self.outage_log[index] = (self.outage_log[index][0], time.monotonic())

    def resetting(self):
        """True while an outage of mode "reset" lasts."""
        return time.monotonic() < self._reset_until

    def in_outage(self):
        """True while any outage lasts."""
        now = time.monotonic()
        return now < self._reset_until or now < self._refuse_until

    def _trigger_outage(self, what, value):
        """Starts the outage outage_at names once `what` ("api_call", "download_bytes") reaches
        its value; the trigger is then spent (outage_at becomes None). True if it started."""
        with self.lock:
            at = self.outage_at
            if not at or what not in at or value < at[what]:
                return False
            self.outage_at = None
        self.outage(self.outage_seconds, self.outage_mode)
        return True

    # -- the quota ----------------------------------------------------------

    def take_quota(self, arrived, path):
        """Counts an API call that arrived at `arrived` against quota: (the X-RateLimit headers
        of its answer, None) or, where its window's calls are used up, (headers, Retry-After
        seconds) and the call is logged in quota_refused."""
        calls, window = self.quota
        with self.lock:
            if self._quota_state is None or self._quota_state[0] != self.quota:
                self._quota_state = (self.quota, arrived, {})
            _, first, used = self._quota_state
            index = int((arrived - first) // window)
            start = first + index * window
            end = start + window
            refused = used.get(index, 0) >= calls
            if refused:
                self.quota_refused.append((arrived, path))
            else:
                used[index] = used.get(index, 0) + 1
                if used[index] == calls:
                    self.quota_windows.append((start, end))
            remaining = calls - used.get(index, 0)
        left = end - time.monotonic()
        headers = {"X-RateLimit-Limit": str(calls), "X-RateLimit-Remaining": str(remaining),
                   "X-RateLimit-Reset": str(math.ceil(time.time() + left))}
        return headers, (max(1, math.ceil(left)) if refused else None)

    def quota_violations(self, grace=0.25):
        """API calls (time, path) that arrived inside a closed window: later than `grace`
        seconds after the first 429 of their window (calls already under way then are forgiven)."""
        with self.lock:
            if self._quota_state is None:
                return []
            (_, window), first, _ = self._quota_state
            refused = sorted(self.quota_refused)
        first_refusal, out = {}, []
        for t, path in refused:
            index = int((t - first) // window)
            first_refusal.setdefault(index, t)
            if t > first_refusal[index] + grace:
                out.append((t, path))
        return out

    def download_bytes_before_outage(self):
        """Bytes of downloads that may still be sent before outage_at's download trigger, or None."""
        at = self.outage_at
        if not at or "download_bytes" not in at:
            return None
        return max(0, at["download_bytes"] - self.download_bytes)

    def config(self, output_dir, **extra):
        data = {"app_key": self.app_key, "app_key_secret": self.app_secret,
                "access_key": ACCESS_KEY, "access_key_secret": self.tokens.get(ACCESS_KEY, ACCESS_SECRET),
                "output_dir": str(output_dir), "api_base": self.base,
                "poll_seconds": 0.02, "poll_max_seconds": 0.1}
        data.update(extra)
        return data

    def once(self, fault):
        """True the first time a one-time fault is asked for, False ever after."""
        with self.lock:
            if fault in self._faults_done:
                return False
            self._faults_done.add(fault)
            return True

    def calls(self, kind=None, method=None):
        with self.lock:
            return [e for e in self.log if (kind is None or e["kind"] == kind)
                    and (method is None or e["method"] == method)]

    # -- the bandwidth cap --------------------------------------------------

    def take_bandwidth(self, n):
        if not self.bandwidth:
            return
        while True:
            with self._bucket_lock:
                now = time.monotonic()
                self._bucket_tokens = min(self.bandwidth * 0.05,
                                          self._bucket_tokens + (now - self._bucket_time) * self.bandwidth)
                self._bucket_time = now
                if self._bucket_tokens >= n or self._bucket_tokens >= self.bandwidth * 0.05:
                    self._bucket_tokens -= n
                    return
                wait = (min(n, self.bandwidth * 0.05) - self._bucket_tokens) / self.bandwidth
            time.sleep(wait)

    # -- archives -----------------------------------------------------------

    def archive_status(self, archive, part_index=0):
        """The Status of one part (0-based) of an archive."""
        if archive.forced_status:
            return archive.forced_status
        album = self.albums[archive.album]
        elapsed = time.monotonic() - archive.created
        prep = archive.prep_seconds * (part_index + 1 if self.staggered_parts else 1)
        if elapsed >= prep:
            if (album.key in self.error_always or (album.key in self.error_once and archive.number == 1)
                    or archive.archive_id in self.error_archives):
                return "Error"
            if self.removed_once.get(album.key) == "before" and archive.number == 1:
                return "Removed"          # expired before anyone downloaded it
            return "Complete"
        if self.unknown_status:
            return self.unknown_status
        return "Init" if elapsed < prep / 3 else "Processing"

    def new_archive(self, key):
        album = self.albums[key]
        with self.lock:
            count = len(self.archives.get(key, [])) + 1
            archive = Archive("%s#%d" % (key, count), key, album.version, time.monotonic(),
                              datetime.datetime.now(datetime.timezone.utc),
                              album.prep_seconds if album.prep_seconds is not None else self.prep_seconds,
                              self.album_parts(key), number=count)
            self.archives.setdefault(key, []).append(archive)
            self.archive_by_id[archive.archive_id] = archive
        return archive

    def download_objects(self, key):
        out = []
        for archive in self.archives.get(key, []):
            for i, (name, content) in enumerate(archive.parts):
                status = self.archive_status(archive, i)
                added = archive.created_at + datetime.timedelta(seconds=i * self.part_date_step)
                obj = {
                    "Part": i if self.zero_based_parts else i + 1, "FileName": name, "Status": status,
                    "DateAdded": iso(added), "DateModified": iso(added),
                    "Size": content.size,
                    "WebUri": "%s/%s/%s/%d/%s%s" % ("" if self.relative_web_uri else self.photos_base,
                                                    "redirect" if self.redirect_downloads else "download",
                                                    urllib.parse.quote(archive.archive_id, safe=""),
                                                    i + 1, urllib.parse.quote(name, safe=""),
                                                    self.link_query(archive, i + 1)),
                    "Uri": "/api/v2/album/%s!download" % key}
                if self.omit_part_numbers:
                    del obj["Part"]
                if self.omit_size:
                    del obj["Size"]
                if self.web_uri_only_when_complete and status != "Complete":
                    del obj["WebUri"]
                if self.lowercase_status:
                    obj["Status"] = status.lower()
                if self.undated_until_complete and status != "Complete":
                    obj["DateAdded"] = None
                out.append(obj)
        return out

    def link_clock(self):
        """The time (epoch seconds) by which archive links expire."""
        return time.time() + self.link_clock_skew

    def expire_links(self):
        """Every archive link handed out so far expires (as if the machine had slept for
        link_lifetime + 1 s); links handed out from now on are fresh."""
        self.link_clock_skew += (self.link_lifetime or 0) + 1

    def link_signature(self, archive, part, expires):
        message = ("%s|%d|%d" % (archive.archive_id, part, expires)).encode()
        return hmac.new(b"fake-cdn-secret", message, hashlib.sha256).hexdigest()[:40]

    def link_query(self, archive, part):
        """?Expires=...&Signature=... of an archive link handed out now (with link_lifetime)."""
        if self.link_lifetime is None:
            return ""
        expires = int(self.link_clock() + self.link_lifetime)
        return "?Expires=%d&Signature=%s" % (expires, self.link_signature(archive, part, expires))

    def link_valid(self, archive, part, query):
        """False for an archive link that has expired or whose signature is wrong. Links without
        Expires (handed out while link_lifetime was None) never expire."""
        if "Expires" not in query and "Signature" not in query:
            return True
        try:
            expires = int(query.get("Expires", ""))
        except ValueError:
            return False
        return (hmac.compare_digest(query.get("Signature", ""), self.link_signature(archive, part, expires))
                and self.link_clock() < expires)

    # -- JSON objects -----------------------------------------------------

    def node_json(self, node):
        uris = {"ParentNode": _uri("/api/v2/node/%s!parent" % node.node_id, "Node", "Object"),
                "ParentNodes": _uri("/api/v2/node/%s!parents" % node.node_id, "Node", "Objects"),
                "User": _uri("/api/v2/user/%s" % self.nickname, "User", "Object"),
                "HighlightImage": _uri("/api/v2/highlight/node/%s" % node.node_id, "Image", "Object"),
                "NodeComments": _uri("/api/v2/node/%s!comments" % node.node_id, "Comment", "Objects"),
                "NodeCoverImage": _uri("/api/v2/node/%s!cover" % node.node_id, "Image", "Object")}
        if node.type == "Folder":
            uris["ChildNodes"] = _uri("/api/v2/node/%s!children" % node.node_id, "Node", "Objects")
            uris["FolderByID"] = _uri("/api/v2/folder/id/%s" % node.node_id, "Folder", "Object")
        if node.album_key:
            uris["Album"] = _uri("/api/v2/album/%s" % node.album_key, "Album", "Object")
        url_name = "".join(c if c.isalnum() else "-" for c in node.name)[:30] or node.node_id
        return {"Description": "", "Name": node.name, "Keywords": [], "PasswordHint": "",
                "SecurityType": "None", "ShowCoverImage": False, "SortDirection": "Ascending",
                "SortMethod": "SortIndex", "UrlName": url_name,
                "Type": getattr(node.type, self.node_type_case)() if self.node_type_case else node.type,
                "DateAdded": iso(node.date_added), "DateModified": iso(node.date_added),
                "EffectiveSecurityType": "None",
                "FormattedValues": {"Name": {"html": node.name}, "Description": {"html": "", "text": ""}},
                "HasChildren": bool(node.children), "IsRoot": node.parent is None,
                "NodeID": node.node_id, "SortIndex": 1, "UrlPath": "/" + url_name,
                "Uri": "/api/v2/node/%s" % node.node_id,
                "WebUri": "https://%s.smugmug.invalid/%s" % (self.nickname, url_name),
                "UriDescription": "Node with the given id.", "Uris": uris, "ResponseLevel": "Full"}

    def album_json(self, album):
        node = self.nodes.get(album.node_id)
        name = node.name if node else album.key
        uris = {"AlbumImages": _uri("/api/v2/album/%s!images" % album.key, "AlbumImage", "Objects"),
                "Node": _uri("/api/v2/node/%s" % album.node_id, "Node", "Object"),
                "AlbumDownload": _uri("/api/v2/album/%s!download" % album.key, "Download", "Objects"),
                "User": _uri("/api/v2/user/%s" % self.nickname, "User", "Object")}
        return {"AlbumKey": album.key, "AllowDownloads": album.allow_downloads, "CanShare": True,
                "Description": "", "External": True, "HasDownloadPassword": False,
                "ImageCount": (str if self.image_count_as_string else int)(
                    album.image_count if album.image_count is not None else len(album.images)),
                "ImagesLastUpdated": iso(album.images_last_updated),
                "Keywords": "", "LastUpdated": iso(album.last_updated), "Name": name,
                "NiceName": album.key, "UrlName": album.key, "NodeID": album.node_id, "PasswordHint": "",
                "Protected": False, "ResponseLevel": "Full", "SecurityType": "None",
                "SortDirection": "Ascending", "SortMethod": "Position", "Title": name,
                "UrlPath": "/" + album.key, "Uri": "/api/v2/album/%s" % album.key,
                "WebUri": "https://%s.smugmug.invalid/%s" % (self.nickname, album.key),
                "UriDescription": "Album by key", "Uris": uris}

    def original_url(self, image):
        if image.is_video and self.video_archived_d_jpg:
            name = "D/%s-D.jpg" % image.stem
        else:
            name = image.file_name
        url = "%s/original/%s/%s" % (self.photos_base, image.key, urllib.parse.quote(name, safe="/"))
        if self.file_url_signature:
            url += "?Expires=1900000000&Signature=" + urllib.parse.quote(self.file_url_signature)
        return url

    def transcode_url(self, image):
        return "%s/video/%s/1920/%s" % (self.photos_base, image.key,
                                        urllib.parse.quote(image.stem + "-1920.mp4", safe=""))

    def rendition_url(self, image):
        return "%s/rendition/%s/%s" % (self.photos_base, image.key,
                                       urllib.parse.quote(image.stem + "-X3.jpg", safe=""))

    def image_json(self, album, image):
        """An AlbumImage object, shaped like the recorded !images listing."""
        ext = image.file_name.rsplit(".", 1)[-1].upper() if "." in image.file_name else ""
        image_uri = "/api/v2/image/%s-%d" % (image.key, image.serial)
        uris = {"Album": _uri("/api/v2/album/%s" % album.key, "Album", "Object"),
                "Image": _uri(image_uri, "Image", "Object"),
                "ImageAlbum": _uri("/api/v2/album/%s" % album.key, "Album", "Object"),
                "ImageMetadata": _uri("/api/v2/image/%s!metadata" % image.key, "ImageMetadata", "Object"),
                "ImageSizes": _uri(image_uri + "!sizes", "ImageSizes", "Object"),
                "LargestImage": _uri(image_uri + "!largestimage", "LargestImage", "Object")}
        if image.is_video:
            uris["LargestVideo"] = _uri(image_uri + "!largestvideo", "LargestVideo", "Object")
        obj = {"Altitude": image.altitude, "CanBuy": False, "CanEdit": True, "Caption": image.caption,
               "Collectable": True, "Date": image.date,
               "ComponentFileTypes": {"Video" if image.is_video else "Image": [ext.lower()]}
               if self.component_file_types_object else [],
               "DateTimeOriginal": image.date_time_original, "DateTimeUploaded": image.date_time_uploaded,
               "FileName": image.file_name, "Format": ext,
               "FormattedValues": {"Caption": {"html": html.escape(image.caption), "text": image.caption},
                                   "FileName": {"html": image.file_name, "text": image.file_name}},
               "Hidden": image.hidden, "ImageKey": image.key, "IsArchive": False, "IsVideo": image.is_video,
               "KeywordArray": list(image.keywords), "Keywords": "; ".join(image.keywords),
               "LastUpdated": iso(image.last_updated),
               "Latitude": image.latitude if self.latlong_as_numbers else "%.14f" % image.latitude,
               "Longitude": image.longitude if self.latlong_as_numbers else "%.14f" % image.longitude,
               "Movable": True, "OriginalHeight": 1080 if image.is_video else 3000,
               "OriginalSize": image.size, "OriginalWidth": 1920 if image.is_video else 4000,
               "Processing": image.processing, "Protected": image.protected or image.collected,
               "Serial": image.serial,
               "ThumbnailUrl": "https://photos.smugmug.invalid/%s/Th/%s-Th.jpg" % (image.key, image.key),
               "Title": image.title, "UploadKey": str(1000 + sum(map(ord, image.key))),
               "Uri": "/api/v2/album/%s/image/%s-%d" % (album.key, image.key, image.serial),
               "UriDescription": "Image from album", "Uris": uris, "Watermark": "No", "Watermarked": False,
               "WebUri": "https://%s.smugmug.invalid/%s/i-%s" % (self.nickname, album.key, image.key)}
        if image.collected:
            obj.update({"Origin": "Collected", "CollectedFrom": image.collected_from,
                        "CollectedWebUri": "https://%s.smugmug.invalid/i-%s" % (image.collected_from or "other",
                                                                                 image.key)})
        elif image.archived:
            obj.update({"ArchivedUri": self.original_url(image), "ArchivedSize": image.size,
                        "ArchivedMD5": image.content().md5()})
        if self.sizes_as_strings:
            for name in ("ArchivedSize", "OriginalSize"):
                if name in obj:
                    obj[name] = str(obj[name])
        for name in ("DateTimeOriginal", "DateTimeUploaded"):
            if obj[name] is None:
                del obj[name]
        for name in self.image_fields_absent:
            obj.pop(name, None)
        if self.image_variant is not None:
            self.image_variant(obj, image)
        return obj

    def largest_image_json(self, image):
        """A LargestImage object, shaped like the recorded one (image_serial1_largestimage_...)."""
        uri = "/api/v2/image/%s-%d" % (image.key, image.serial)
        obj = {"Url": self.rendition_url(image), "Size": image.rendition().size, "Height": 2304, "Width": 3072,
               "Usable": True, "Ext": "jpg", "Watermarked": False, "Uri": uri + "!largestimage",
               "Uris": {"ImageSizeOriginal": _uri(uri + "!sizeoriginal", "ImageSizeOriginal", "Object")}}
        if image.largest_no_size:
            del obj["Size"]
        return obj

    def largest_video_json(self, image):
        """A LargestVideo object, shaped like largestvideo_reconstructed.json."""
        transcode, duration = image.transcode(), 12.5
        uri = "/api/v2/image/%s-%d" % (image.key, image.serial)
        obj = {"Url": self.transcode_url(image), "Size": transcode.size, "MD5": transcode.md5(),
               "Ext": "mp4", "Width": 1920, "Height": 1080, "Duration": duration,
               "Bitrate": transcode.size * 8 / duration, "Usable": True, "Watermarked": False,
               "Uri": uri + "!largestvideo", "UriDescription": "Largest size available for video",
               "Uris": {"ImageSizeCustom": _uri(uri + "!sizecustom?height=1080&width=1920", "ImageSizeCustom",
                                                "Object"),
                        "VideoSize1920": _uri("/api/v2/video/%s-%d!size1920" % (image.key, image.serial),
                                              "VideoSize1920", "Object")}}
        if image.video_no_size:
            del obj["Size"]
        return obj

    def user_json(self):
        return {"Name": "Test User", "NickName": self.nickname, "QuickShare": False, "ImageCount": 0,
                "AccountStatus": "Active", "Domain": "", "DomainOnly": "", "FirstName": "Test",
                "LastName": "User", "FriendsView": False, "IsTrial": False, "Plan": "Power",
                "SortBy": "LastUpdated", "TotalAccountSize": 0,
                "RefTag": "TESTREF", "ResponseLevel": "Full", "ViewPassHint": "",
                "Uri": "/api/v2/user/%s" % self.nickname, "UriDescription": "User By Nickname",
                "WebUri": "https://%s.smugmug.invalid" % self.nickname,
                "Uris": {"Node": _uri("/api/v2/node/%s" % self.root_id, "Node", "Object"),
                         "UserAlbums": _uri("/api/v2/user/%s!albums" % self.nickname, "Album", "Objects")}}


def _uri(uri, locator, locator_type):
    return {"Uri": uri, "Locator": locator, "LocatorType": locator_type,
            "UriDescription": "", "EndpointType": locator}


def envelope(method, request_uri, uri, locator, locator_type, payload, pages=None, expansions=None, code=200):
    response = {"Uri": uri, "Locator": locator, "LocatorType": locator_type,
                "UriDescription": "", "EndpointType": locator,
                "Timing": {"Total": {"time": 0.01, "cycles": 1, "objects": 0}}}
    if payload is not None:
        response[locator] = payload
    if pages is not None:
        response["Pages"] = pages
    body = {"Request": {"Version": "v2", "Method": method, "Uri": request_uri},
            "Options": {"Methods": ["OPTIONS", "GET"]},
            "Response": response, "Code": code, "Message": "Ok" if code == 200 else "Accepted"}
    if expansions is not None:
        body["Expansions"] = expansions
    return body


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True         # SO_REUSEADDR: an outage gives the same port back
    request_queue_size = 128
    closed = False                     # set once this listener is shut

    def process_request(self, request, client_address):
        if self.fake.resetting():      # an outage of mode "reset": RST at once (SO_LINGER 0)
            try:
                request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            finally:
                request.close()
            return
        with self.fake.lock:
            self.fake.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.fake.lock:
            self.fake.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        """Clients hanging up (cut downloads, killed runs) are normal here."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True     # else each answer may wait ~40 ms for a delayed ACK

    api_headers: Dict[str, str] = {}

    def log_message(self, *args):
        pass

    # -- plumbing -----------------------------------------------------------

    @property
    def fake(self) -> FakeSmugMug:
        return self.server.fake

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send(self, status, body, content_type="application/json", headers=None):
        data = body if isinstance(body, bytes) else (
            json.dumps(body).encode() if not isinstance(body, str) else body.encode())
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in dict(self.api_headers, **(headers or {})).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error_json(self, status, message):
        self.send(status, {"Code": status, "Message": message})

    def record(self, method, path, query, status, kind):
        """Log a request; returns its entry (a streamed body adds "t_end" when it ends)."""
        entry = {"t": time.monotonic(), "method": method, "path": path, "query": query, "status": status,
                 "kind": kind}
        with self.fake.lock:
            self.fake.log.append(entry)
        return entry

    def verify_oauth(self, method, body, token_secrets, need_token=True):
        """(ok, oauth params) after checking the signature with oauthlib."""
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("OAuth "):
            return False, {}
        try:
            params = dict(oauth_signature.collect_parameters(headers={"Authorization": auth},
                                                             exclude_oauth_signature=False))
        except Exception:
            return False, {}
        if params.get("oauth_consumer_key") != self.fake.app_key:
            return False, params
        if params.get("oauth_signature_method") != "HMAC-SHA1":
            return False, params
        token = params.get("oauth_token")
        if need_token and token not in token_secrets:
            return False, params
        try:
            if abs(int(params.get("oauth_timestamp", "0")) - time.time()) > 600:
                return False, params
        except ValueError:
            return False, params
        nonce = (params.get("oauth_timestamp"), params.get("oauth_nonce"), token)
        with self.fake.lock:
            if nonce in self.fake.nonces:
                return False, params       # a replayed request
            self.fake.nonces.add(nonce)
        uri = "http://%s%s" % (self.headers.get("Host"), self.path)
        form = body if self.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded") else ""
        request = OAuthRequest(uri, http_method=method, body=form or None, headers={"Authorization": auth})
        request.params = oauth_signature.collect_parameters(
            uri_query=urllib.parse.urlsplit(uri).query, body=form or None, headers={"Authorization": auth})
        request.signature = params.get("oauth_signature")
        secret = token_secrets.get(token, "") if token else ""
        return oauth_signature.verify_hmac_sha1(request, self.fake.app_secret, secret), params

    # -- routing ------------------------------------------------------------

    def dispatch(self, method):
        self.api_headers = {}          # sent with every answer of this request (the quota's)
        split = urllib.parse.urlsplit(self.path)
        path, query = urllib.parse.unquote(split.path), dict(urllib.parse.parse_qsl(split.query))
        body = self.read_body()
        try:
            if path.startswith("/services/oauth/1.0a/"):
                return self.oauth_flow(method, path, query, body)
            if path.startswith("/download/"):
                return self.download(method, path)
            if path.startswith(("/original/", "/video/", "/rendition/")):
                return self.file_download(method, path)
            if path.startswith("/redirect/"):
                ok, _ = self.verify_oauth(method, b"", self.fake.tokens)
                if not ok:
                    return self.send_error_json(401, "oauth_problem=signature_invalid")
                location = urllib.parse.quote("/download/" + path[len("/redirect/"):], safe="/")
                if split.query:                    # a signed link keeps its Expires and Signature
                    location += "?" + split.query
                return self.send(302, b"", content_type="text/plain", headers={"Location": location})
            if path.startswith("/moved/api/v2"):       # where api_redirects send API calls
                return self.api(method, path[len("/moved"):], query, body, moved=True)
            if path.startswith("/api/v2"):
                return self.api(method, path, query, body)
            self.send_error_json(404, "Not Found")
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True

    def api(self, method, path, query, body, moved=False):
        fake = self.fake
        arrived = time.monotonic()
        with fake.lock:
            fake.api_count += 1
            number = fake.api_count
        kind = self.kind_of(method, path)
        if fake._trigger_outage("api_call", number):      # this call's connection is cut, unanswered
            self.record(method, path, query, 0, kind)
            self.close_connection = True
            return
        if fake.api_latency:
            time.sleep(fake.api_latency)
        now = time.monotonic()
        headers = {}
        if fake.rate_remaining is not None:
            headers = {"X-RateLimit-Remaining": str(fake.rate_remaining),      # a whole second, 1-2 s on
                       "X-RateLimit-Reset": str(math.ceil(time.time()) + 1)}
        if fake.quota:
            self.api_headers, wait = fake.take_quota(arrived, path)
            if wait is not None:
                self.record(method, path, query, 429, kind)
                return self.send(429, {"Code": 429, "Message": "Too Many Requests"},
                                 headers={"Retry-After": str(wait)})
        if now < fake.throttle_until:
            fake.throttled_log.append((now, path))
            self.record(method, path, query, fake.throttle_status, kind)
            return self.send(fake.throttle_status, {"Code": fake.throttle_status, "Message": "Too Many Requests"},
                             headers={"Retry-After": str(fake.retry_after)})
        if number in fake.throttle_calls:
            if isinstance(fake.retry_after, (int, float)):
                wait = fake.retry_after
            else:
                wait = email.utils.parsedate_to_datetime(fake.retry_after).timestamp() - time.time()
            fake.throttle_until = now + wait
            fake.throttle_started = now
            self.record(method, path, query, fake.throttle_status, kind)
            return self.send(fake.throttle_status, {"Code": fake.throttle_status, "Message": "Too Many Requests"},
                             headers={"Retry-After": str(fake.retry_after)})
        if fake.auth_message is not None:
            self.record(method, path, query, 401, kind)
            return self.send_error_json(401, fake.auth_message)
        ok, _params = self.verify_oauth(method, body, fake.tokens)
        revoked = fake.revoke_after is not None and number > fake.revoke_after
        if not ok or revoked:
            self.record(method, path, query, 401, kind)
            return self.send_error_json(401, "oauth_problem=signature_invalid" if not ok else
                                        "oauth_problem=token_rejected")
        canonical = "/api/v2/user/%s" % fake.nickname
        if fake.api_redirects.get("user") and path.lower() == canonical.lower() and path != canonical:
            status = fake.api_redirects["user"]
            self.record(method, path, query, status, kind)
            return self.send(status, {"Code": status, "Message": "Moved"}, headers={"Location": canonical})
        if fake.api_redirects.get(kind) and not moved:
            status = fake.api_redirects[kind]
            self.record(method, path, query, status, kind)
            return self.send(status, {"Code": status, "Message": "Moved"}, headers={"Location": "/moved" + self.path})
        if fake.fail_every and number % fake.fail_every == 0:
            status = (500, 502, 503, 504)[(number // fake.fail_every) % 4]
            self.record(method, path, query, status, kind)
            if number % 2:
                return self.send(status, "<html><body><h1>%d Server Error</h1></body></html>" % status,
                                 content_type="text/html")
            return self.send_error_json(status, "Server Error")
        if fake.garbage_every and number % fake.garbage_every == 0:
            if method == "POST":            # the request was carried out; only its answer is garbled
                self.route(method, path, query)
            self.record(method, path, query, 200, kind)
            return self.send(200, "<html>SmugMug API browser</html>", content_type="text/html")
        start = int(query.get("start", "1") or 1)
        failed = self.failed_page(method, path, start)
        if failed is not None:
            self.record(method, path, query, failed[0], kind)
            return self.send(*failed)
        canned = fake.canned.get((path, start)) or fake.canned.get((path, None))
        if canned is not None and method == "GET":
            status, answer = 200, canned
        else:
            status, answer = self.route(method, path, query)
        if number in fake.cut_api_calls or number in fake.bad_gzip_calls:
            self.record(method, path, query, 200, kind)
            return self.send_broken(answer, headers, cut=number in fake.cut_api_calls)
        self.record(method, path, query, status, kind)
        self.send(status, answer, headers=headers)

    def failed_page(self, method, path, start):
        """(status, JSON error body) where fail_pages fails this page of a list, else None."""
        fake = self.fake
        kind = "images" if path.endswith("!images") else "walk" if path.endswith("!children") else None
        status = fake.fail_pages.get((kind, start)) if kind and method == "GET" else None
        if not status:
            return None
        with fake.lock:
            done = fake._page_failures.get((path, start), 0)
            if fake.fail_pages_times and done >= fake.fail_pages_times:
                return None
            fake._page_failures[(path, start)] = done + 1
        try:
            message = http.HTTPStatus(status).phrase
        except ValueError:
            message = "Error"
        return status, {"Response": {"Uri": "%s?start=%d" % (path, start)}, "Code": status, "Message": message}

    def send_broken(self, answer, headers, cut):
        """A 200 whose body does not arrive whole: cut (Content-Length of the whole JSON body,
        half of it sent, then the connection closed) or sent as Content-Encoding gzip while it
        is not gzip."""
        data = answer if isinstance(answer, bytes) else (
            answer.encode() if isinstance(answer, str) else json.dumps(answer).encode())
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if not cut:
            self.send_header("Content-Encoding", "gzip")
        for k, v in dict(self.api_headers, **headers).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data[:len(data) // 2] if cut else data)
        self.wfile.flush()
        if cut:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @staticmethod
    def kind_of(method, path):
        if path.endswith("!download"):
            return "post" if method == "POST" else "download-get"
        if path.endswith("!children"):
            return "walk"
        if path.endswith("!images"):
            return "images"
        if path.endswith("!largestvideo"):
            return "video"
        if path.endswith("!largestimage"):
            return "largestimage"
        if path.startswith("/api/v2/album/"):
            return "album"
        return "walk"

    def route(self, method, path, query):
        fake = self.fake
        request_uri = self.path
        if fake.later_pages_missing and str(query.get("start") or "1") != "1":
            return 404, {"Code": 404, "Message": "Not Found"}
        if path == "/api/v2!authuser" or path == "/api/v2/user/%s" % fake.nickname:
            return 200, envelope(method, request_uri, "/api/v2/user/%s" % fake.nickname, "User", "Object",
                                 fake.user_json())
        if path.startswith("/api/v2/user/"):
            return 404, {"Code": 404, "Message": "Not Found"}
        if path.startswith("/api/v2/node/"):
            rest = path[len("/api/v2/node/"):]
            node_id, _, action = rest.partition("!")
            node = fake.nodes.get(node_id)
            if node is None or node_id in fake.not_found_nodes:
                return 404, {"Response": {"Uri": path}, "Code": 404, "Message": "Not Found"}
            if action == "children":
                return 200, self.children(method, request_uri, path, node, query)
            if action == "":
                return 200, envelope(method, request_uri, path, "Node", "Object", fake.node_json(node))
            return 404, {"Code": 404, "Message": "Not Found"}
        if path.startswith("/api/v2/album/"):
            key, _, action = path[len("/api/v2/album/"):].partition("!")
            album = fake.albums.get(key)
            if album is None or key in fake.deleted_albums:
                return 404, {"Code": 404, "Message": "Not Found"}
            if action == "":
                return 200, envelope(method, request_uri, path, "Album", "Object", fake.album_json(album))
            if action == "download":
                return self.album_download(method, request_uri, path, album)
            if action == "images" and method == "GET":
                return 200, self.album_images(method, request_uri, path, album, query)
            return 404, {"Code": 404, "Message": "Not Found"}
        if path.startswith("/api/v2/image/"):
            image_id, _, action = path[len("/api/v2/image/"):].partition("!")
            key, _, serial = image_id.rpartition("-")
            _album, image = fake.find_image(key) if serial.isdigit() else (None, None)
            not_found = 404, {"Response": {"Uri": path}, "Code": 404, "Message": "Not Found"}
            if image is None or image.serial != int(serial):
                return not_found
            if action == "largestvideo":
                if not image.is_video or image.key in fake.no_largest_video:
                    return not_found
                return 200, envelope(method, request_uri, path, "LargestVideo", "Object",
                                     fake.largest_video_json(image))
            if action == "largestimage":
                if image.key in fake.no_largest_image:
                    return not_found
                return 200, envelope(method, request_uri, path, "LargestImage", "Object",
                                     fake.largest_image_json(image))
            return not_found
        return 404, {"Code": 404, "Message": "Not Found"}

    @staticmethod
    def paging(query, default, maximum):
        """(start, count) of a paged list: count clamped to 1..maximum."""
        try:
            count = int(query.get("count") or default)
            start = max(1, int(query.get("start") or 1))
        except ValueError:
            count, start = default, 1
        return start, max(1, min(count, maximum))

    def pages(self, path, total, start, count, shown, extra=""):
        """Response.Pages; NextPage absent on the last page (and on every page with
        omit_next_page), PrevPage on the first."""
        link = lambda s: "%s?count=%d&start=%d%s" % (path, count, s, extra)
        pages = {"Total": total, "Start": start, "Count": shown, "RequestedCount": count,
                 "FirstPage": link(1), "LastPage": link(max(1, ((total - 1) // count) * count + 1))}
        if start + count <= total and not self.fake.omit_next_page:
            pages["NextPage"] = link(start + count)
        if start > 1:
            pages["PrevPage"] = link(max(1, start - count))
        return pages

    def album_images(self, method, request_uri, path, album, query):
        """!images: AlbumImage objects, paged; _filter and _filteruri honoured."""
        fake = self.fake
        start, count = self.paging(query, fake.images_default_count, fake.images_max_count)
        with fake.lock:
            images = list(album.images)
        page = images[start - 1:start - 1 + count]
        keep = [f for f in (query.get("_filter") or "").split(",") if f]
        keep_uris = [f for f in (query.get("_filteruri") or "").split(",") if f]
        objects = []
        for image in page:
            obj = fake.image_json(album, image)
            if keep:
                obj = {k: v for k, v in obj.items() if k in keep or k in ("Uri", "Uris")}
            if keep_uris and "Uris" in obj:
                obj["Uris"] = {k: v for k, v in obj["Uris"].items() if k in keep_uris}
            objects.append(obj)
        extra = "".join("&%s=%s" % (name, urllib.parse.quote(query[name], safe=","))
                        for name in ("_filter", "_filteruri") if query.get(name))
        return envelope(method, request_uri, path, "AlbumImage", "Objects", objects or None,
                        pages=None if fake.images_no_pages else self.pages(path, len(images), start, count,
                                                                           len(page), extra))

    def children(self, method, request_uri, path, node, query):
        fake = self.fake
        if fake.walk_gate is not None and node.node_id != fake.root_id:
            fake.walk_gate.wait(30)
        start, count = self.paging(query, fake.default_count, fake.max_count)
        with fake.lock:
            ids = list(node.children)
        page = [fake.nodes[i] for i in ids[start - 1:start - 1 + count] if i in fake.nodes]
        extra = "&_expand=Album" if query.get("_expand") == "Album" else ""
        pages = self.pages(path, len(ids), start, count, len(page), extra)
        expansions = None
        if "Album" in (query.get("_expand") or "").split(","):
            expansions = {}
            for child in page:
                if child.album_key in fake.albums:
                    uri = "/api/v2/album/%s" % child.album_key
                    expansions[uri] = {"Uri": uri, "Locator": "Album", "LocatorType": "Object",
                                       "Album": fake.album_json(fake.albums[child.album_key])}
        return envelope(method, request_uri, path, "Node", "Objects",
                        [fake.node_json(n) for n in page] or None, pages=pages, expansions=expansions)

    def album_download(self, method, request_uri, path, album):
        fake = self.fake
        if method == "POST":
            if fake.post_forbidden:
                return 403, {"Code": 403, "Message": "Permission denied: this token lacks the Add permission"}
            if not album.allow_downloads:
                return 403, {"Code": 403, "Message": "Downloads are not allowed for this album"}
            if album.key in fake.never_list:
                return fake.post_status, envelope(method, request_uri, path, "Download", "Objects", None,
                                                  code=fake.post_status)
            fake.new_archive(album.key)
            if fake.post_empty_body:
                return fake.post_status, b""
            if fake.post_answer is not None:
                return fake.post_answer
            downloads = fake.download_objects(album.key) if fake.post_lists_downloads else None
            return fake.post_status, envelope(method, request_uri, path, "Download", "Objects",
                                              downloads or None, code=fake.post_status)
        downloads = fake.download_objects(album.key)
        if not downloads and fake.empty_download_status == 204:
            return 204, b""
        if not downloads and fake.empty_download_status:
            return fake.empty_download_status, {"Response": {"Uri": path}, "Code": fake.empty_download_status,
                                                "Message": "Not Found"}
        if fake.download_max_count:
            start, count = self.paging(self.query_of(request_uri), 100, fake.download_max_count)
            page = downloads[start - 1:start - 1 + count]
            return 200, envelope(method, request_uri, path, "Download", "Objects", page or None,
                                 pages=self.pages(path, len(downloads), start, count, len(page)))
        return 200, envelope(method, request_uri, path, "Download", "Objects", downloads or None,
                             pages={"Total": len(downloads), "Start": 1, "Count": len(downloads),
                                    "RequestedCount": 100})

    @staticmethod
    def query_of(request_uri):
        return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(request_uri).query))

    # -- archive downloads ----------------------------------------------------

    def download(self, method, path):
        fake = self.fake
        pieces = path.split("/")       # '', 'download', id, part, name
        archive = fake.archive_by_id.get(pieces[2]) if len(pieces) >= 5 else None
        if fake.require_download_oauth:
            ok, _ = self.verify_oauth(method, b"", fake.tokens)
            if not ok:
                return self.send_error_json(401, "oauth_problem=signature_invalid")
        if archive is None:
            return self.send_error_json(404, "Not Found")
        part_index = int(pieces[3]) - 1
        name, content = archive.parts[part_index]
        if not fake.link_valid(archive, part_index + 1, self.query_of(self.path)):
            if fake.expired_link_login_page:
                self.record(method, path, {"range": self.headers.get("Range")}, 200, "archive")
                return self.send(200, LOGIN_PAGE, content_type="text/html")
            self.record(method, path, {"range": self.headers.get("Range")}, 403, "archive")
            return self.send(403, "<html><head><title>403 Forbidden</title></head><body><h1>Forbidden</h1>"
                                  "<p>Request has expired</p></body></html>", content_type="text/html")
        key = (archive.archive_id, part_index)
        with fake.lock:
            attempt = fake._download_attempts.get(key, 0)
            fake._download_attempts[key] = attempt + 1
        if archive.number == 1 and archive.album in fake.expired_html:
            archive.forced_status = "Removed"
            self.record(method, path, {"range": self.headers.get("Range")}, 200, "archive")
            return self.send(200, "<html><head><title>SmugMug - Log In</title></head><body>"
                                  "<form action='/login'>Please log in</form></body></html>",
                             content_type="text/html")
        if fake.removed_once.get(archive.album) == "during" and archive.number == 1:
            archive.forced_status = "Removed"
            return self.send(404, "<html>expired</html>", content_type="text/html")
        if archive.forced_status == "Removed" or fake.archive_status(archive, part_index) != "Complete" or (
                archive.number == 1 and (archive.album, part_index + 1) in fake.gone_parts):
            self.record(method, path, {"range": self.headers.get("Range")}, 404, "archive")
            return self.send(404, "<html>gone</html>", content_type="text/html")
        first = archive.number == 1
        if first and archive.album in fake.html_once and fake.once(("html", key)):
            self.record(method, path, {"range": self.headers.get("Range")}, 200, "archive")
            return self.send(200, "<html><head><title>SmugMug - Log In</title></head><body>"
                                  "<form action='/login'>Please log in</form></body></html>",
                             content_type="text/html")
        flip = None
        if first and part_index == 0 and archive.album in fake.corrupt_once and content.entries:
            flip = ("corrupt", archive.album, content.data_offsets[0] + content.entries[0][1].size // 2)
        self.stream(method, path, content, "archive", attempt=attempt, archive_faults=True, flip=flip,
                    served_key=(archive.archive_id, part_index + 1), content_type="application/zip")

    def file_download(self, method, path):
        """An image's original (/original/KEY/NAME, its ArchivedUri), a video's transcode
        (/video/KEY/1920/NAME-1920.mp4, its !largestvideo Url) or an image's rendition
        (/rendition/KEY/NAME-X3.jpg, its !largestimage Url)."""
        fake = self.fake
        pieces = path.split("/")
        route = pieces[1]
        if fake.require_download_oauth:
            ok, _ = self.verify_oauth(method, b"", fake.tokens)
            if not ok:
                self.record(method, path, {}, 401, "file")
                return self.send_error_json(401, "oauth_problem=signature_invalid")
        _album, image = fake.find_image(pieces[2]) if len(pieces) >= 4 else (None, None)
        if image is None or (route == "video" and not image.is_video):
            self.record(method, path, {}, 404, "file")
            return self.send_error_json(404, "Not Found")
        if route == "original" and image.key in fake.refuse_originals:
            self.record(method, path, {}, 403, "file")
            return self.send_error_json(403, "You do not have permission to download %s%s"
                                        % ("" if fake.echo_bare_path else "http://%s" % self.headers.get("Host"),
                                           self.path))
        content = {"original": image.content, "video": image.transcode, "rendition": image.rendition}[route]()
        flip = None
        if image.key in fake.wrong_file_once and content.size:
            flip = ("wrong", route, image.key, content.size // 2)
        short = image.key in fake.short_files_once and fake.once(("short", route, image.key))
        self.stream(method, path, content, "file", flip=flip, short=short,
                    content_type={"video": "video/mp4", "rendition": "image/jpeg"}.get(
                        route, "application/octet-stream"))

    def stream(self, method, path, content, kind, attempt=0, archive_faults=False, flip=None,
               served_key=None, content_type="application/octet-stream", short=False):
        """Sends content (Content-Length, Range, the bandwidth cap). archive_faults: the archive
        knobs apply (wrong_offset_once, cut_after/cut_times, short_times, no_content_length).
        flip: (one-time fault id..., offset): the first body covering that offset has that byte
        flipped. served_key: counts the bytes sent in fake.served. short: half the body is sent."""
        fake = self.fake
        size, start = content.size, 0
        status = 200
        headers = {"Accept-Ranges": "bytes"} if fake.honor_range else {}
        rng = self.headers.get("Range")
        if rng and fake.honor_range and rng.startswith("bytes="):
            first = int(rng[6:].split("-")[0])
            if first >= size:
                self.record(method, path, {"range": rng}, 416, kind)
                return self.send(416, b"", content_type=content_type,
                                 headers={"Content-Range": "bytes */%d" % size})
            start, status = first, 206
            if archive_faults and fake.wrong_offset_once:
                fake.wrong_offset_once = False
                start = max(0, first - 1000)
            headers["Content-Range"] = "bytes %d-%d/%d" % (start, size - 1, size)
        entry = self.record(method, path, {"range": rng}, status, kind)
        try:
            self.send_body(content, kind, status, start, size, headers, attempt, archive_faults, flip, served_key,
                           content_type, short)
        finally:
            entry["t_end"] = time.monotonic()

    def send_body(self, content, kind, status, start, size, headers, attempt, archive_faults, flip, served_key,
                  content_type, short=False):
        fake = self.fake
        end = size
        if short:
            end = start + (size - start) // 2
        if archive_faults:
            if attempt < fake.cut_times and fake.cut_after is not None:
                end = min(size, start + fake.cut_after)
            if attempt < fake.short_times:
                end = min(end, start + (size - start) // 2)
        flip_at = None
        if flip is not None and start <= flip[-1] < end and fake.once(flip[:-1]):
            flip_at = flip[-1]
        no_length = archive_faults and fake.no_content_length
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if no_length:
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(size - start))
        for k, v in headers.items():
            self.send_header(k, v)
        if end < size:
            self.send_header("Connection", "close")
        self.end_headers()
        pos = start
        while pos < end:
            n = min(256 * 1024, end - pos)
            before_outage = fake.download_bytes_before_outage()
            if before_outage is not None:
                n = min(n, before_outage)
                if n == 0 and fake._trigger_outage("download_bytes", fake.download_bytes):
                    raise ConnectionAbortedError("an outage began")
                n = n or min(256 * 1024, end - pos)     # another thread fired it meanwhile
            fake.take_bandwidth(n)
            chunk = content.read(pos, pos + n)
            if flip_at is not None and pos <= flip_at < pos + n:
                chunk = bytearray(chunk)
                chunk[flip_at - pos] ^= 0xFF
                chunk = bytes(chunk)
            self.count_sent(n, served_key)     # before the write: a client that has read it all
            try:                                # never sees a count that lags behind
                self.wfile.write(chunk)
            except OSError:
                self.count_sent(-n, served_key)
                raise
            pos += n
            if before_outage is not None and fake._trigger_outage("download_bytes", fake.download_bytes):
                raise ConnectionAbortedError("an outage began")
        if end < size:
            self.close_connection = True
            self.wfile.flush()

    def count_sent(self, n, served_key):
        fake = self.fake
        with fake.lock:
            fake.download_bytes += n
            if served_key is not None:
                fake.served[served_key] = fake.served.get(served_key, 0) + n

    # -- the OAuth 1.0a PIN flow ---------------------------------------------

    def oauth_flow(self, method, path, query, body):
        fake = self.fake
        step = path.rsplit("/", 1)[-1]
        form = dict(urllib.parse.parse_qsl(body.decode())) if body else {}
        if step == "getRequestToken":
            ok, params = self.verify_oauth(method, body, {}, need_token=False)
            if not ok or params.get("oauth_callback") != "oob":
                return self.send(401, "oauth_problem=signature_invalid", content_type="text/plain")
            token, secret = fake.new_id("rt"), fake.new_id("rts")
            fake.request_tokens[token] = (secret, "%06d" % random.randint(0, 999999), query)
            return self.send(200, "oauth_token=%s&oauth_token_secret=%s&oauth_callback_confirmed=true"
                             % (token, secret), content_type="application/x-www-form-urlencoded")
        if step == "authorize":
            entry = fake.request_tokens.get(query.get("oauth_token"))
            if entry is None:
                return self.send(404, "<html>unknown token</html>", content_type="text/html")
            fake.request_tokens[query["oauth_token"]] = (entry[0], entry[1], query)
            return self.send(200, "<html><body>Your code: <b id='code'>%s</b></body></html>" % entry[1],
                             content_type="text/html")
        if step == "getAccessToken":
            secrets = {t: e[0] for t, e in fake.request_tokens.items()}
            ok, params = self.verify_oauth(method, body, secrets)
            entry = fake.request_tokens.get(params.get("oauth_token"))
            verifier = params.get("oauth_verifier") or form.get("oauth_verifier")
            if not ok or entry is None or verifier != entry[1]:
                return self.send(401, "oauth_problem=permission_denied", content_type="text/plain")
            del fake.request_tokens[params["oauth_token"]]          # single use
            token, secret = fake.new_id("at"), fake.new_id("ats")
            fake.tokens[token] = secret
            fake.last_authorize_query = entry[2]
            return self.send(200, "oauth_token=%s&oauth_token_secret=%s" % (token, secret),
                             content_type="application/x-www-form-urlencoded")
        self.send(404, "not found", content_type="text/plain")


# A sample account ##############################################################

def sample_account(fake, part_size=3000):
    """An account with >=3 folder levels, >=10 albums, an empty album, an empty
    folder, a Page, an unknown node type, a 3-part album and a folder whose
    children span several pages (with max_count=4). Returns {name: album key}."""
    keys = {}
    family = fake.add_folder("Family", days=1)
    y2019 = fake.add_folder("2019", family, days=2)
    summer = fake.add_folder("Summer", y2019, days=3)
    keys["beach"] = fake.add_album("Beach Day", summer, sizes=(part_size,), days=4)
    keys["bbq"] = fake.add_album("BBQ", summer, sizes=(part_size + 17,), days=5)
    keys["xmas"] = fake.add_album("Christmas", y2019, sizes=(part_size + 1,), days=6)
    keys["big"] = fake.add_album("Big Trip", family, sizes=(part_size, part_size + 5, 1234), days=7)
    keys["empty"] = fake.add_album("Empty Album", family, sizes=(), days=8)
    fake.add_folder("Empty Folder", days=9)
    fake.add_node("Page", "About Me", fake.root_id, days=10)
    fake.add_node("Widget", "Mystery", fake.root_id, days=11)
    travel = fake.add_folder("Travel", days=12)
    for i in range(10):
        keys["travel%d" % i] = fake.add_album("Trip %02d" % i, travel, sizes=(part_size + 100 * i,), days=13 + i)
    beach = fake.albums[keys["beach"]].images[0]
    beach.title, beach.caption, beach.keywords = "Sunset", "The last swim of the summer", ["beach", "sunset"]
    beach.latitude, beach.longitude, beach.altitude = 36.6177, -121.9166, 3
    for n, image in enumerate(fake.albums[keys["big"]].images):
        image.caption, image.keywords = "Day %d of the trip" % (n + 1), ["trip", "day %d" % (n + 1)]
        image.date_time_original = iso(T0 + datetime.timedelta(days=200 + n, hours=9))
    return keys


def rich_account(fake, folder="Rich Media", parent=None):
    """Albums for file-level checks, in a new folder `folder`. Returns {name: album key}:
    "captions": every image with a title, caption, keywords and coordinates;
    "video": a video, Clip.MOV (with an ArchivedUri, and a 4000-byte !largestvideo transcode),
    between two photos;
    "clash": two images both named IMG_0001.JPG in one part (the zip renames one IMG_0001-1.JPG);
    "split": a 2-part album with DSC_0001.JPG in both parts (not renamed)."""
    top = fake.add_folder(folder, parent, days=40)
    keys = {}
    places = [("Lisbon", 38.7223, -9.1393, 12), ("Porto", 41.1579, -8.6291, 80), ("Sintra", 38.8029, -9.3817, 207)]
    keys["captions"] = fake.add_album("Captioned", top, days=41, images=[
        {"file_name": "P%04d.JPG" % (n + 1), "size": 2500 + 111 * n, "title": place,
         "caption": "A day in %s" % place, "keywords": [place.lower(), "portugal", "2021"],
         "latitude": lat, "longitude": lon, "altitude": alt,
         "date_time_original": "2021-05-%02dT10:%02d:00+00:00" % (n + 1, n)}
        for n, (place, lat, lon, alt) in enumerate(places)])
    keys["video"] = fake.add_album("With Video", top, days=42, images=[
        {"file_name": "Before.jpg", "size": 2000},
        {"file_name": "Clip.MOV", "size": 9000, "is_video": True, "caption": "Waves", "video_size": 4000},
        {"file_name": "After.jpg", "size": 2100}])
    keys["clash"] = fake.add_album("Same Names", top, days=43, images=[
        {"file_name": "IMG_0001.JPG", "size": 1500, "caption": "first"},
        {"file_name": "IMG_0001.JPG", "size": 1600, "caption": "second"}])
    keys["split"] = fake.add_album("Split Names", top, days=44, part_limit=4000, images=[
        {"file_name": "DSC_0001.JPG", "size": 3000},
        {"file_name": "DSC_0001.JPG", "size": 3000},
        {"file_name": "DSC_0002.JPG", "size": 500}])
    return keys


def rendition_account(fake, folder="Renditions", parent=None):
    """Albums of files SmugMug offers no original for, in a new folder `folder`. Returns
    {name: album key}:
    "collected": Own.jpg, then Theirs.jpg collected from the account "friend" (no Archived*
    fields; left out of the zip while zip_omit_collected);
    "edited": Edited.jpg with Serial 1 (its URIs use KEY-1) beside Plain.jpg;
    "video": Still.jpg, then Clip.mp4, a video the zip lacks (in_zip False) with no ArchivedUri:
    only its !largestvideo transcode (3000 bytes) is offered;
    "unsized": Shared.jpg, collected, whose !largestimage has no Size, and Live.mp4, a video the
    zip lacks, with no ArchivedUri, whose !largestvideo has no Size (made on the fly), then
    Zipped.jpg, the one file of its zip."""
    top = fake.add_folder(folder, parent, days=50)
    keys = {}
    keys["collected"] = fake.add_album("Collected", top, days=51, images=[
        {"file_name": "Own.jpg", "size": 2400},
        {"file_name": "Theirs.jpg", "size": 5000, "origin": "Collected", "collected_from": "friend",
         "caption": "Collected from a friend"}])
    keys["edited"] = fake.add_album("Edited", top, days=52, images=[
        {"file_name": "Edited.jpg", "size": 4100, "serial": 1, "caption": "Cropped"},
        {"file_name": "Plain.jpg", "size": 1900}])
    keys["video"] = fake.add_album("Video Without Original", top, days=53, images=[
        {"file_name": "Still.jpg", "size": 2200},
        {"file_name": "Clip.mp4", "size": 8000, "is_video": True, "archived": False, "in_zip": False,
         "video_size": 3000}])
    keys["unsized"] = fake.add_album("Sizes Unknown", top, days=54, images=[
        {"file_name": "Shared.jpg", "size": 4000, "origin": "Collected", "collected_from": "friend",
         "largest_no_size": True},
        {"file_name": "Live.mp4", "size": 6000, "is_video": True, "archived": False, "in_zip": False,
         "video_size": 2500, "video_no_size": True},
        {"file_name": "Zipped.jpg", "size": 1700}])
    return keys


def generated_account(fake, albums, folder="Generated", seed=1):
    """`albums` albums of 3-6 photos (100-400 KB each) in a few folders under a new folder
    `folder`; every third album also holds a video (MP4, 0.5-1 MB). Returns [album key]."""
    rng = random.Random(seed)
    top = fake.add_folder(folder, days=60)
    sets = [fake.add_folder("Set %d" % (i + 1), top, days=61 + i) for i in range(max(1, min(5, albums // 8)))]
    keys = []
    for i in range(albums):
        images = [{"file_name": "IMG_%04d.JPG" % (j + 1), "size": rng.randint(100_000, 400_000)}
                  for j in range(rng.randint(3, 6))]
        if i % 3 == 2:
            images.append({"file_name": "MOV_%04d.MP4" % (i + 1), "size": rng.randint(500_000, 1_000_000),
                           "is_video": True})
        keys.append(fake.add_album("Album %03d" % (i + 1), sets[i % len(sets)], images=images, days=70 + i))
    return keys


def huge_account(fake, albums, photos, folders=100, seed=1):
    """`albums` albums of `photos` tiny photos each (200-400 bytes: what is measured is the tool's
    bookkeeping, not its bytes) in `folders` folders of two levels, prepared at once (the
    emulator's prep_seconds set to 0): the benchmark's `huge` accounts. Returns [album key]."""
    rng = random.Random(seed)
    fake.prep_seconds = 0.0
    tops = [fake.add_folder("Year %02d" % i) for i in range(max(1, folders // 10))]
    leaves = [fake.add_folder("Event %03d" % i, tops[i % len(tops)]) for i in range(folders)]
    return [fake.add_album("Album %05d" % i, leaves[i % folders],
                           images=[{"file_name": "IMG_%04d.JPG" % (j + 1), "size": rng.randint(200, 400),
                                    "title": "Photo %d of album %d" % (j + 1, i + 1)} for j in range(photos)])
            for i in range(albums)]


EPILOG = """example: a 5 MB/s link, 40 more albums, videos outside the zips
  python tests/fake_smugmug.py --albums 40 --bandwidth 5 --videos-outside-zips --write-config demo.json
  .venv/bin/python smugmug_download.py --config demo.json     # in another terminal
  then delete a loose .MP4 from the backup and run the tool again: it fetches that video again."""


def main(argv=None):
    parser = argparse.ArgumentParser(description="Serve sample SmugMug accounts on localhost: the sample account\n"
                                     "and rich_account (folder Rich Media), plus --albums N generated ones.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="./sample-backup", help="output_dir of the printed config")
    parser.add_argument("--write-config", metavar="PATH", help="also write the config to PATH")
    parser.add_argument("--prep-seconds", type=float, default=2.0, help="archive preparation time in seconds (default 2)")
    parser.add_argument("--albums", type=int, default=0, metavar="N",
                        help="besides the sample and rich accounts, N generated albums of a few photos "
                             "(every third with a video) in a few folders under Generated")
    parser.add_argument("--bandwidth", type=float, metavar="MB_PER_S",
                        help="cap every download together at MB_PER_S megabytes a second (default: none)")
    parser.add_argument("--videos-outside-zips", action="store_true",
                        help="zips leave videos out: the tool fetches each on its own (and a rerun "
                             "fetches a loose video you deleted)")
    args = parser.parse_args(argv)
    if args.albums < 0 or (args.bandwidth is not None and args.bandwidth <= 0):
        parser.error("--albums must be 0 or more and --bandwidth more than 0")
    fake = FakeSmugMug()
    fake.prep_seconds = args.prep_seconds
    fake.max_count = 4
    fake.bandwidth = args.bandwidth * 1_000_000 if args.bandwidth else None
    fake.zip_omit_videos = args.videos_outside_zips
    sample_account(fake, part_size=200_000)
    rich_account(fake)
    if args.albums:
        generated_account(fake, args.albums)
    fake.start()
    config = fake.config(args.output_dir)
    del config["poll_seconds"], config["poll_max_seconds"]
    text = json.dumps(config, indent=2)
    if args.write_config:
        with open(args.write_config, "w") as f:
            f.write(text + "\n")
        os.chmod(args.write_config, 0o600)      # it holds (fake) secrets, like a real config
    served = "the sample account, rich_account (folder Rich Media)" + (
        " and %d generated albums (folder Generated)" % args.albums if args.albums else "")
    print("Fake SmugMug serving %s at %s (downloads from %s%s%s). A matching config:\n%s" % (
        served, fake.base, fake.photos_base,
        ", capped at %g MB/s" % args.bandwidth if args.bandwidth else "",
        ", videos outside the zips" if args.videos_outside_zips else "", text))
    if args.write_config:
        print("Config written to %s. In another terminal run:\n    .venv/bin/python smugmug_download.py --config %s"
              % (args.write_config, shlex.quote(args.write_config)))
    else:
        print("Save the config above as a file, e.g. demo-config.json, and in another terminal run:\n"
              "    .venv/bin/python smugmug_download.py --config demo-config.json")
    print("Ctrl-C to stop.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
