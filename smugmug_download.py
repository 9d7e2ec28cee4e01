#!/usr/bin/env python3
"""Back up a whole SmugMug account to a local disk as album zip archives.

The account's folder tree is walked through the SmugMug API v2 (OAuth1-signed)
and mirrored under `output_dir`: one folder per SmugMug folder and album, each
album's photos in the zip archive(s) SmugMug prepares for it.

Design: a walk pool lists folders; every album found is an AlbumRun, a small
state machine moved through the pools by one orchestrator loop that alone owns
counters, progress output, the backup state and the map of who owns each path:
    request  ask SmugMug for a zip archive of the album (or reuse a fresh one)
    poll     look again, paced by what preparations have taken, until Complete
    download stream each part to NAME.part, check it against the listed Size
    check    list the album's files (!images), CRC-test the zips, match them
    fetch    download on its own every file the zips lack (checked by MD5)
then the album's files take their final names together with its metadata.json.
Reruns are incremental: albums whose timestamps and files match the state
record cost no API call beyond the folder walk. --verify proves a backup
against its manifests without asking SmugMug anything.

Usage:  python smugmug_download.py [--config config.json] [--dry-run] ...
"""

import argparse
import collections
import concurrent.futures
import datetime
import difflib
import email.utils
import fnmatch
import hashlib
import heapq
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import stat
import sys
import threading
import time
import unicodedata
import urllib.parse
import zipfile
from dataclasses import dataclass, field, replace
from http.client import IncompleteRead, RemoteDisconnected
from typing import Dict, List, Optional, Tuple

try:
    import requests
    from requests.adapters import HTTPAdapter
    from requests_oauthlib import OAuth1, OAuth1Session
    import urllib3
    from urllib3.exceptions import (ConnectTimeoutError, NewConnectionError, ProtocolError,
                                    ReadTimeoutError, SSLError)
    from urllib3.util.retry import Retry
except ImportError as _missing:
    if __name__ != "__main__":
        raise
    # The usual cause: run with a Python other than the virtualenv's (cron's
    # python3, say). One line and exit 2, like any set-up error.
    _package = {"requests_oauthlib": "requests-oauthlib", "oauthlib": "requests-oauthlib",
                "urllib3": "requests"}.get(_missing.name or "", _missing.name or "a required package")
    sys.stderr.write("Error: the Python package '%s' is missing for %s. Install the requirements "
                     "into a virtualenv (pip install -r requirements.txt) and run the tool with its "
                     "Python: python3 -m venv .venv && .venv/bin/pip install -r requirements.txt\n"
                     % (_package, sys.executable))
    sys.exit(2)           # EXIT_USAGE

__version__ = "1.0.0"

log = logging.getLogger("smugmug_download")


# Constants ##################################################################

EXIT_OK = 0               # every album backed up or unchanged
EXIT_ALBUMS_FAILED = 1    # the run finished, but some albums failed
EXIT_USAGE = 2            # config, usage or credential error
EXIT_LOCKED = 3           # another run holds the lock on output_dir
EXIT_INTERRUPTED = 130    # Ctrl-C or SIGTERM (128 + SIGINT, the shell's convention)
EXIT_BROKEN_PIPE = 141    # stdout closed by its reader (`--dry-run | head`): 128 + SIGPIPE, as git gives

DEFAULT_API_BASE = "https://api.smugmug.com"
API_ROOT = "/api/v2"
CONFIG_REQUIRED = ("app_key", "app_key_secret", "access_key", "access_key_secret", "output_dir")
CONFIG_OPTIONAL = {
    # key: (type(s), default)
    "smugmug_user": (str, ""),
    "api_base": (str, DEFAULT_API_BASE),
    "workers": (int, 4),
    "max_preparing": (int, 256),
    "archive_timeout_hours": ((int, float), 6),
    "poll_seconds": ((int, float), 1.0),
    "poll_max_seconds": ((int, float), 30.0),
}
CONFIG_MAXIMUM = {"workers": 64, "max_preparing": 1000}     # the same bounds as the flags
SECRET_KEYS = ("app_key_secret", "access_key", "access_key_secret")
# Values shipped in config.example.json, and the shapes such placeholders take.
PLACEHOLDER_RE = re.compile(r"^\s*(<.*>|(paste|your|put)[-_ ].*|x{3,}|change[-_ ]?me)\s*$", re.IGNORECASE)

STATE_DIR = ".smugmug_download"          # inside output_dir
STATE_FILE = "state.json"                # snapshot, replaced atomically
JOURNAL_FILE = "journal.jsonl"           # one line per finished album since the snapshot
LOCK_FILE = ".smugmug_download.lock"     # inside output_dir, flock'ed while a run lives
STATE_VERSION = 2                        # 1: parts only; 2: files, manifest, completeness
MANIFEST_NAME = "metadata.json"          # in every album folder: what the album holds, and where
RESERVED_TOP_NAMES = {STATE_DIR.casefold(), LOCK_FILE.casefold()}

# A timeout on every request: connecting should be quick; a busy server may
# think for a while before the first byte of a large listing.
TIMEOUT = (10, 60)
PAGE_COUNT = 100          # children asked per page; the server may clamp it
API_ATTEMPTS = 6          # tries of one API call on 5xx / network errors / bad bodies
REDIRECT_HOPS = 5         # redirects followed for one request, each hop signed for its own URL
CONNECT_ATTEMPTS = 2      # quick tries of a refused connect inside one attempt (urllib3 Retry)
# Once every API call has failed with a network error for this long, the
# server is taken as gone: calls raise Unreachable instead of retrying on.
UNREACHABLE_SECONDS = 60.0
RATE_LIMIT_ATTEMPTS = 20  # 429s tolerated for one call (each waits its Retry-After)
BACKOFF_BASE = 0.5        # seconds; doubled per attempt, full jitter, capped below
BACKOFF_CAP = 30.0
RETRY_AFTER_CAP = 600.0   # never believe a Retry-After of more than 10 minutes
RATE_LOW_WATER = 10       # X-RateLimit-Remaining under this: spread calls until reset
DOWNLOAD_ATTEMPTS = 5     # tries of one part (resumed with Range where possible)
NOT_THE_FILE_ATTEMPTS = 2 # answers that are not the file (a login page) before the link counts as refused
ARCHIVE_ERROR_RETRIES = 3 # new archives after a Status "Error"
ARCHIVE_REMOVED_RETRIES = 3
REQUEST_AGAIN_AFTER_POLLS = 8  # looks with nothing listed for our request: it was lost
LOST_REQUEST_RETRIES = 2  # lost requests asked again before the album is saved file by file
REQUEST_AGAIN_DELAY = 1.1 # seconds before asking again: past the whole second of the archive given up
PART_CHECK_RETRIES = 2    # downloads again of a part that is not a sound zip, then the album fails
FILE_ATTEMPTS = 3         # downloads of one loose file that fails its size or MD5 check
IMAGES_PAGE_COUNT = 1000  # files asked per !images page; the server may clamp it
MAX_PAGES = 100000        # pages of one list before its paging is taken as endless
# The fields of !images the completeness check and the manifest use (_filter).
IMAGE_FIELDS = ("FileName", "ImageKey", "IsVideo", "Processing", "Hidden", "ArchivedUri", "ArchivedSize",
                "ArchivedMD5", "Title", "Caption", "Keywords", "KeywordArray", "DateTimeOriginal", "Date",
                "Latitude", "Longitude", "Altitude", "LastUpdated")
# What the manifest keeps of an album (from the walk's expanded Album object).
ALBUM_FIELDS = ("AlbumKey", "NodeID", "Name", "Title", "Description", "Keywords", "WebUri",
                "LastUpdated", "ImagesLastUpdated")
CHUNK_SIZE = 1024 * 1024  # measured: 1 MiB reads cost a fifth of the CPU of 256 KiB ones; constant memory
MAX_NAME_BYTES = 200
STATUS_INTERVAL = 0.1     # the progress line is redrawn at most ten times a second
PROGRESS_LOG_INTERVAL = 60.0
# The preparation window (albums requested and not yet downloading), sized as the run goes.
WINDOW_START = 32         # albums asked for at once before anything is known
WINDOW_FLOOR = 2
WINDOW_STEP = 0.25        # seconds between two sizings of the window
READY_HORIZON = 60.0      # no new request while more than a minute of downloading is prepared or coming
RATE_SPAN = 5.0           # seconds over which the download rate is measured
PACER_HISTORY = 50        # preparation times remembered to pace the looks at an archive
PACER_SCOUTS = 8          # albums looked at early while no preparation time is known yet
LOOK_FIRST_PROBES = 16    # new albums that look for an archive SmugMug already has before asking for one
LOOK_HOLD = 10.0          # no look at an archive while the download queue holds this many seconds of work


# Errors #####################################################################

class BackupError(Exception):
    """Base of the errors this tool raises on purpose."""


class UsageError(BackupError):
    """The user's config or command line is wrong: one line, exit 2."""


class AuthError(BackupError):
    """SmugMug rejected the credentials: the whole run stops, exit 2."""


class LockedError(BackupError):
    """Another run holds the lock on output_dir: exit 3."""


class Interrupted(BackupError):
    """Ctrl-C, SIGTERM, or the run is stopping: abandon this piece of work."""


class ApiError(BackupError):
    """An API call failed for good (after retries); the status is kept."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class NotFound(ApiError):
    """404: the node or album is gone."""


class Forbidden(ApiError):
    """403: SmugMug does not allow this (e.g. downloads of this album)."""


class ArchiveGone(BackupError):
    """The archive expired or vanished: request a new one."""


class Abandoned(BackupError):
    """The album gave up on the archive this download belongs to."""


class DownloadError(BackupError):
    """A part could not be downloaded completely after retries."""


class Refused(DownloadError):
    """The server refuses this file (401/403/404/410): retrying will not help."""


class NotTheFile(DownloadError):
    """The server answered with something other than the file (an HTML page, another length)."""


class BadArchive(BackupError):
    """A file that should be a zip is not a sound one (unreadable, or an entry fails its CRC)."""


class LocalWriteError(BackupError):
    """Writing to the local disk failed (disk full, permissions): the run stops new work."""


class Unreachable(BackupError):
    """Every API call has failed with a network error for UNREACHABLE_SECONDS: stop the run.

    Raised by SmugMugClient.call() (from any thread) instead of retrying
    further; every later call raises it too after its first failed try, until
    the server answers again. `since` is the wall-clock time (time.time()) of
    the first failure of the streak; the message reads "SmugMug unreachable
    since HH:MM:SS: <last reason>". Not an ApiError: it is about the run, not
    the album whose call happened to raise it.
    """

    def __init__(self, since, reason):
        super().__init__("SmugMug unreachable since %s: %s"
                         % (time.strftime("%H:%M:%S", time.localtime(since)), reason))
        self.since = since
        self.reason = reason


class OutputClosed(BackupError):
    """Standard output was closed by its reader (`--dry-run | head`): stop quietly."""


# Data model #################################################################

@dataclass(frozen=True)
class Config:
    app_key: str
    app_key_secret: str
    access_key: str
    access_key_secret: str
    output_dir: str
    smugmug_user: str = ""
    api_base: str = DEFAULT_API_BASE
    workers: int = 4
    max_preparing: int = 256
    archive_timeout_hours: float = 6
    poll_seconds: float = 1.0
    poll_max_seconds: float = 30.0

    def secrets(self):
        return [getattr(self, k) for k in SECRET_KEYS if getattr(self, k)]


@dataclass(frozen=True)
class Folder:
    node_id: str
    children_uri: str
    path: Tuple[str, ...]        # cleaned names from output_dir down


@dataclass(frozen=True)
class Album:
    node_id: str
    album_key: str
    uri: str                     # /api/v2/album/KEY
    path: Tuple[str, ...]
    last_updated: str = ""
    images_last_updated: str = ""
    image_count: Optional[int] = None
    has_details: bool = False    # timestamps known (from _expand or a GET)
    info: tuple = ()             # (field, value) pairs of ALBUM_FIELDS, for the manifest

    @property
    def rel(self):
        return "/".join(self.path)


@dataclass(frozen=True)
class ArchivePart:
    part: Optional[int]          # 1..n once archive_sets has numbered it; None: listed without a number
    file_name: str               # as the server sent it (cleaned later)
    status: str
    url: str
    date_added: str = ""
    size: Optional[int] = None

    @property
    def identity(self):
        """Which archive file this is, whatever order the server lists it in."""
        return "%s|%s|%s" % (strip_query(self.url), self.file_name, self.date_added)


@dataclass(frozen=True)
class ListedFile:
    """One file of an album as !images lists it."""
    key: str                     # ImageKey
    file_name: str
    is_video: bool = False
    processing: bool = False
    archived_uri: str = ""       # the original; absent where originals may not be downloaded
    archived_size: Optional[int] = None
    archived_md5: str = ""
    video_uri: str = ""          # !largestvideo, for videos without ArchivedUri
    fields: tuple = ()           # (field, value) pairs kept in the manifest


@dataclass(frozen=True)
class ZipEntry:
    """One file inside an archive part on disk."""
    part: str                    # the part's local file name
    name: str                    # its name inside the zip
    size: int
    md5: str = ""                # hex, when asked for


@dataclass(frozen=True)
class FileTask:
    """A file the archive lacks, to be fetched on its own into the album folder."""
    key: str                     # ImageKey
    name: str                    # local file name
    url: str
    size: Optional[int]
    md5: str
    transcode: bool = False      # from !largestvideo, not the uploaded original


@dataclass(frozen=True)
class AlbumPlan:
    """What the check stage found: where each listed file is, and what to fetch."""
    listing: tuple               # ListedFile, in listing order
    locations: dict              # ImageKey -> {"archive", "entry"} | {"file"} | {"missing"}
    fetch: tuple = ()            # FileTask
    bad_parts: dict = field(default_factory=dict)   # part name -> reason (not a sound zip)
    files_checked: int = 0


@dataclass
class Summary:
    albums_found: int = 0
    backed_up: int = 0
    unchanged: int = 0
    moved: int = 0
    parts: int = 0
    bytes: int = 0
    files_checked: int = 0
    files_fetched: int = 0
    by_file: List[str] = field(default_factory=list)         # albums saved file by file
    missing: Dict[str, list] = field(default_factory=dict)   # album path -> [(file, reason)]
    emptied: List[str] = field(default_factory=list)         # albums now empty on SmugMug (files kept)
    failed: Dict[str, str] = field(default_factory=dict)     # album path -> reason
    gone: List[str] = field(default_factory=list)
    write_error: str = ""
    seconds: float = 0.0


# Pure helpers ###############################################################

_FORBIDDEN_CHARS = re.compile(r'[/\\:*?"<>|\x00-\x1f\x7f-\x9f]')   # C0, DEL and C1 controls
_DEVICE_NAME = re.compile(r"^(con|prn|aux|nul|com[1-9]|lpt[1-9])(\.|$)", re.IGNORECASE)


def truncate_utf8(text, max_bytes):
    """The longest prefix of text that fits in max_bytes of UTF-8."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    return data[:max_bytes].decode("utf-8", "ignore")


def clean_name(name, max_bytes=MAX_NAME_BYTES, keep_extension=False):
    """One safe path component from a display name, by the product's rules.

    NFC; each of / \\ : * ? " < > | and control characters becomes _;
    surrounding whitespace and trailing dots are stripped; empty, . and ..
    become _; Windows device names get _ after the device part (CON.zip ->
    CON_.zip, which Windows no longer treats as a device); at most max_bytes
    of UTF-8 (a file name keeps its extension when cut).
    """
    text = unicodedata.normalize("NFC", "" if name is None else str(name))
    text = _FORBIDDEN_CHARS.sub("_", text)

    def strip(t):
        while True:
            s = t.strip().rstrip(".")
            if s == t:
                return t
            t = s

    text = strip(text)
    if len(text.encode("utf-8")) > max_bytes:
        stem, ext = os.path.splitext(text) if keep_extension else (text, "")
        if len(ext.encode("utf-8")) > 16:
            stem, ext = text, ""
        text = strip(truncate_utf8(stem, max_bytes - len(ext.encode("utf-8")))) + ext
        text = strip(text)
    if text in ("", ".", ".."):
        text = "_"
    match = _DEVICE_NAME.match(text)
    if match:
        cut = len(match.group(1))
        text = text[:cut] + "_" + text[cut:]
        text = truncate_utf8(text, max_bytes)
    return text


def with_suffix(name, suffix, max_bytes=MAX_NAME_BYTES, keep_extension=False):
    """name + suffix (before the extension for files), still within max_bytes."""
    stem, ext = os.path.splitext(name) if keep_extension else (name, "")
    room = max_bytes - len((suffix + ext).encode("utf-8"))
    return truncate_utf8(stem, max(room, 1)).rstrip() + suffix + ext


def unique_name(name, suffix, taken, keep_extension=False):
    """name + suffix (before the extension for files); if that is taken too (ignoring case),
    name + suffix + " 2", " 3"... taken: casefolded names."""
    candidate, n = with_suffix(name, suffix, keep_extension=keep_extension), 1
    while candidate.casefold() in taken:
        n += 1
        candidate = with_suffix(name, "%s %d" % (suffix, n), keep_extension=keep_extension)
    return candidate


def assign_names(entries, reserved=()):
    """Cleaned, unique names for siblings: {key: name}.

    entries: (key, display_name, sort_key) tuples. Siblings whose cleaned names
    are equal ignoring case all get " (key)" appended but the first by
    sort_key (the oldest), so adding a sibling later never renames one that is
    already backed up. Names equal to a reserved one are suffixed too.
    """
    groups = collections.defaultdict(list)
    for key, display, order in entries:
        cleaned = clean_name(display)
        groups[cleaned.casefold()].append((order, key, cleaned))
    names, suffixed = {}, []
    for folded, members in groups.items():
        members.sort()
        for index, (_order, key, cleaned) in enumerate(members):
            if index == 0 and folded not in reserved:
                names[key] = cleaned
            else:
                suffixed.append((key, cleaned))
    taken = {name.casefold() for name in names.values()} | set(reserved)
    for key, cleaned in suffixed:       # a suffixed name never takes a sibling's own name
        name = unique_name(cleaned, " (%s)" % clean_name(key), taken)
        taken.add(name.casefold())
        names[key] = name
    return names


def part_file_names(parts):
    """{part number: local file name} for an archive's parts, cleaned and unique, never the
    manifest's name."""
    names, seen = {}, {MANIFEST_NAME.casefold(), ("." + MANIFEST_NAME).casefold()}   # and its temp's stem
    for p in sorted(parts, key=lambda p: p.part):
        name = clean_name(p.file_name or "archive-%d.zip" % p.part, keep_extension=True)
        if name.lower().endswith(".part"):
            name += "_"   # never confusable with our own temporary files
        if name.casefold() in seen:
            name = unique_name(name, " (part %d)" % p.part, seen, keep_extension=True)
        seen.add(name.casefold())
        names[p.part] = name
    return names


def loose_file_names(files, taken):
    """{ImageKey: local name} for files saved on their own beside the archive parts.

    FileName cleaned by the name rules (extension kept); a name equal ignoring
    case to one in taken (the parts, the manifest) or to an earlier file gets
    " (ImageKey)" before its extension. files: (key, file name) in listing order.
    """
    seen = {name.casefold() for name in taken}
    names = {}
    for key, file_name in files:
        name = clean_name(file_name or key, keep_extension=True)
        if name.lower().endswith(".part"):
            name += "_"
        if name.casefold() in seen:
            name = unique_name(name, " (%s)" % clean_name(key), seen, keep_extension=True)
        seen.add(name.casefold())
        names[key] = name
    return names


def int_or_none(value):
    """A non-negative int from an API field (int or digit string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    return value if isinstance(value, int) and value >= 0 else None


def listed_file(obj):
    """A ListedFile from an AlbumImage object, or None when it names no file."""
    if not isinstance(obj, dict):
        return None
    key = obj.get("ImageKey")
    if not isinstance(key, str) or not key:
        return None
    uri = obj.get("ArchivedUri")
    md5 = obj.get("ArchivedMD5")
    video = uri_of(obj, "LargestVideo") or ""
    kept = [(k, obj[k]) for k in IMAGE_FIELDS if k in obj]
    # URLs without their query: a signed link's query is a credential, never kept
    kept = [(k, strip_query(v) if k == "ArchivedUri" and isinstance(v, str) else v) for k, v in kept]
    if video:
        kept.append(("Uris", {"LargestVideo": strip_query(video)}))
    return ListedFile(key=key, file_name=str(obj.get("FileName") or ""),
                      is_video=obj.get("IsVideo") is True, processing=obj.get("Processing") is True,
                      archived_uri=uri if isinstance(uri, str) else "",
                      archived_size=int_or_none(obj.get("ArchivedSize")),
                      archived_md5=md5.lower() if isinstance(md5, str) else "",
                      video_uri=video, fields=tuple(kept))


_RENAMED = re.compile(r"-\d+| \(\d+\)")


def is_renamed_form(entry_name, file_name):
    """Is entry_name file_name as SmugMug renames a clash inside a zip (IMG-1.jpg, IMG (1).jpg)?"""
    stem, ext = os.path.splitext(file_name)
    if not (entry_name.startswith(stem) and entry_name.endswith(ext)) or len(entry_name) <= len(file_name):
        return False
    return bool(_RENAMED.fullmatch(entry_name[len(stem):len(entry_name) - len(ext)]))


def match_files(listing, entries):
    """{ImageKey: ZipEntry}: which archive entry holds each listed file.

    An entry holds a file when its name (last path component) is the file's
    FileName, or SmugMug's renamed form of it, and where the listing gives
    them, the size and MD5 agree. Each entry is used at most once; exact names
    are matched before renamed forms, so IMG-1.jpg that is a file's own name is
    never taken by the clash of IMG.jpg.
    """
    def fits(f, e):
        return ((f.archived_size is None or e.size == f.archived_size)
                and (not f.archived_md5 or not e.md5 or e.md5 == f.archived_md5))

    used, found = set(), {}
    base = [(i, e, e.name.rsplit("/", 1)[-1]) for i, e in enumerate(entries)]
    for same_name in (True, False):
        for f in listing:
            if f.key in found or not f.file_name:
                continue
            for i, e, name in base:
                if i in used or not fits(f, e):
                    continue
                if (name == f.file_name) if same_name else is_renamed_form(name, f.file_name):
                    used.add(i)
                    found[f.key] = e
                    break
    return found


def manifest_document(album, plan, parts):
    """The metadata.json of an album: the album, its parts, and each listed file with where it is."""
    info = dict(album.info)
    info.setdefault("AlbumKey", album.album_key)
    info.setdefault("NodeID", album.node_id)
    info["LastUpdated"], info["ImagesLastUpdated"] = album.last_updated, album.images_last_updated
    files = []
    for f in plan.listing:
        entry = dict(f.fields)
        entry.setdefault("FileName", f.file_name)
        entry.setdefault("ImageKey", f.key)
        entry.update(plan.locations.get(f.key) or {"missing": "not found"})
        files.append(entry)
    return {"format": "smugmug_download manifest 1", "tool": "smugmug_download %s" % __version__,
            "album": {k: info[k] for k in ALBUM_FIELDS if k in info}, "path": album.rel,
            "parts": [{"file": name, "size": size} for name, size in parts],
            "files": files}


def locator_payload(obj):
    """obj[obj.Locator] (a Response, or an entry of Expansions), or None when absent."""
    if not isinstance(obj, dict) or not isinstance(obj.get("Locator"), str):
        return None
    return obj.get(obj["Locator"])


def envelope_payload(body):
    """The payload of an API envelope: Response[Response.Locator], or None when absent."""
    return locator_payload(body.get("Response") if isinstance(body, dict) else None)


def as_list(payload):
    """A Locator payload as a list of dicts: absent -> [], one object -> [it]."""
    if payload is None:
        return []
    if isinstance(payload, dict):
        return [payload]
    if isinstance(payload, list):
        return [x for x in payload if isinstance(x, dict)]
    return []


def next_page(body):
    """The NextPage link of a list response, or None on the last page."""
    response = body.get("Response") if isinstance(body, dict) else None
    pages = response.get("Pages") if isinstance(response, dict) else None
    link = pages.get("NextPage") if isinstance(pages, dict) else None
    return link if isinstance(link, str) and link else None


def following_page(body, link):
    """The link to the page after body (the answer to link), or None on the last page.

    NextPage where given. Without it, where Pages says more exist (Total past
    Start + Count - 1, as in a real !images answer: Total 34, Count 30, no
    NextPage), link again from start = Start + Count, its count kept. A Count
    smaller than asked for never ends a listing on its own.
    """
    found = next_page(body)
    if found:
        return found
    response = body.get("Response") if isinstance(body, dict) else None
    pages = response.get("Pages") if isinstance(response, dict) else None
    if not isinstance(pages, dict):
        return None
    total, start, count = (int_or_none(pages.get(k)) for k in ("Total", "Start", "Count"))
    if count is None:
        count = len(as_list(envelope_payload(body)))
    if total is None or not start or not count or start + count - 1 >= total:
        return None
    return set_query(link, start=start + count)


def uri_of(obj, name):
    """obj['Uris'][name] as a path: a dict with 'Uri', or a plain string (_verbosity=1)."""
    uris = obj.get("Uris") if isinstance(obj, dict) else None
    value = uris.get(name) if isinstance(uris, dict) else None
    if isinstance(value, dict):
        value = value.get("Uri")
    return value if isinstance(value, str) and value else None


def path_and_query(link):
    """Only the path and query of a link, so a response can never aim our signed
    requests at another host."""
    parts = urllib.parse.urlsplit(link)
    return urllib.parse.urlunsplit(("", "", parts.path, parts.query, ""))


def add_query(link, **params):
    """link with params added where it does not already carry them."""
    parts = urllib.parse.urlsplit(link)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    present = {k for k, _ in query}
    query += [(k, str(v)) for k, v in params.items() if k not in present]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def set_query(link, **params):
    """link with params set, replacing any value it carries."""
    parts = urllib.parse.urlsplit(link)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    query += [(k, str(v)) for k, v in params.items()]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def strip_query(url):
    """A URL without its query and fragment (signed URLs carry secrets there)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def redact_urls(text):
    """text with every URL's query string replaced by '?...'."""
    return re.sub(r"(https?://[^\s?'\"]+)\?[^\s'\")]*", r"\1?...", str(text))


def is_loopback_host(host):
    return (host or "").lower() in ("localhost", "::1") or (host or "").startswith("127.")


def is_secure_url(url):
    """https anywhere, plain http only to this machine."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme == "https" or (parts.scheme == "http" and is_loopback_host(parts.hostname))


def parse_time(text):
    """An ISO 8601 time from the API as an aware datetime, or None."""
    if not isinstance(text, str) or not text:
        return None
    try:
        value = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)


def parse_retry_after(value, now=None):
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), capped; None if unusable."""
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, min(seconds, RETRY_AFTER_CAP))


def backoff_delay(attempt, rng=random, base=BACKOFF_BASE, cap=BACKOFF_CAP):
    """Exponential backoff with full jitter: uniform in [d/2, d], d = base * 2**attempt, capped."""
    delay = min(cap, base * (2 ** attempt))
    return delay * (0.5 + 0.5 * rng.random())


def parse_content_range(value):
    """(start, end, total) from 'bytes start-end/total'; total may be None ('*')."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not match:
        return None
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), int(match.group(2)), total


def parse_unsatisfied_range(value):
    """total from 'bytes */total' (a 416 answer), or None."""
    match = re.fullmatch(r"\s*bytes\s+\*/(\d+)\s*", value or "")
    return int(match.group(1)) if match else None


def content_length(headers):
    """Content-Length as an int, or None when missing, negative or garbled (= unknown)."""
    try:
        value = int(headers.get("Content-Length", ""))
    except (TypeError, ValueError):
        return None
    return value if value >= 0 else None


def error_message(resp):
    """A short, single-line reason from an error response: JSON Message or the text."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("Message"), str):
        message = body["Message"]
    else:
        message = re.sub(r"<[^>]*>", " ", resp.text or "")
    message = " ".join(message.split())[:200]
    return message or resp.reason or "HTTP %d" % resp.status_code


def glob_literal_prefix(pattern):
    """The part of a glob before its first wildcard."""
    match = re.search(r"[*?\[]", pattern)
    return pattern if match is None else pattern[:match.start()]


def path_matches(patterns, rel):
    """Does rel, or one of the folders above it, match one of the globs?"""
    pieces = rel.split("/")
    candidates = ["/".join(pieces[:i]) for i in range(1, len(pieces) + 1)]
    return any(fnmatch.fnmatchcase(c, p) for p in patterns for c in candidates)


def is_selected(rel, includes, excludes):
    """An album (or folder) path selected by --include/--exclude; excludes win."""
    if excludes and path_matches(excludes, rel):
        return False
    return not includes or path_matches(includes, rel)


def folder_may_match(rel, includes, excludes):
    """Can an album under folder rel be selected? (Else the folder is not walked.)

    Includes are compared ignoring case here, so that an --include that differs
    from a path only by case still walks it, and the no-match error can name it;
    albums are selected case-sensitively (is_selected)."""
    if excludes and path_matches(excludes, rel):
        return False
    if not includes:
        return True
    folder = (rel + "/").casefold()
    for pattern in includes:
        prefix = glob_literal_prefix(pattern).casefold()
        if folder.startswith(prefix) or prefix.startswith(folder) or path_matches([pattern.casefold()],
                                                                                  rel.casefold()):
            return True
    return False


def fit_line(text, width):
    """text cut to at most width characters, at a word where one is near, marked with "...".

    For a status line that must never wrap (a wrapped line cannot be redrawn
    in place with a carriage return).
    """
    if len(text) <= width:
        return text
    if width <= 3:
        return text[:max(width, 0)]
    cut = text[:width - 3]
    space = cut.rfind(" ")
    if space >= (width - 3) * 2 // 3:      # a word boundary not too far back
        cut = cut[:space]
    return cut.rstrip(" |,;:") + "..."


def human_bytes(n):
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return ("%d %s" % (value, unit)) if unit == "B" else ("%.1f %s" % (value, unit))
        value /= 1000.0


def human_seconds(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return "%d s" % seconds
    if seconds < 3600:
        return "%d min %02d s" % divmod(seconds, 60)
    hours, rest = divmod(seconds, 3600)
    return "%d h %02d min" % (hours, rest // 60)


# HTTP #######################################################################

class RateGate:
    """One gate for every API request of the run: SmugMug's limit is per user.

    A 429's Retry-After closes it for everyone; a low X-RateLimit-Remaining
    spreads the remaining calls until the window resets.
    """

    def __init__(self, stop):
        self._lock = threading.Lock()
        self._stop = stop
        self._not_before = 0.0      # monotonic
        self._spacing = 0.0
        self._spacing_until = 0.0
        self.pressure = 0           # 429s and low-water warnings so far (read by the orchestrator)

    def wait(self):
        """Block until the gate is open and take a turn; raise Interrupted if the run stops."""
        while True:
            with self._lock:
                now = time.monotonic()
                if now >= self._not_before:
                    if now < self._spacing_until:
                        self._not_before = now + self._spacing
                    return
                delay = self._not_before - now
            if self._stop.wait(min(delay, 0.25)):
                raise Interrupted("stopping")

    def close_for(self, seconds):
        with self._lock:
            self.pressure += 1
            self._not_before = max(self._not_before, time.monotonic() + seconds)

    def observe(self, headers):
        """Slow down before a 429 when the server says few calls are left."""
        try:
            remaining = int(headers.get("X-RateLimit-Remaining", ""))
        except (TypeError, ValueError):
            return
        if remaining >= RATE_LOW_WATER:
            return
        try:
            reset_in = float(headers.get("X-RateLimit-Reset", "")) - time.time()
        except (TypeError, ValueError):
            reset_in = 10.0
        reset_in = max(0.0, min(reset_in, RETRY_AFTER_CAP))
        with self._lock:
            if time.monotonic() >= self._spacing_until:
                self.pressure += 1
            self._spacing = reset_in / max(remaining, 1)
            self._spacing_until = time.monotonic() + reset_in


def connect_retry():
    """urllib3 retries for failures before a request reaches the server.

    Only the connect phase, and quickly (a refused connection costs well under
    a second): SmugMugClient.call() does the patient retrying, and a request
    that reached the server is retried there, signed anew, since an OAuth
    nonce must not be reused.
    """
    kwargs = dict(total=None, connect=CONNECT_ATTEMPTS - 1, read=0, redirect=5, status=0, other=0,
                  backoff_factor=0.1, raise_on_status=False)
    try:
        return Retry(backoff_jitter=0.1, **kwargs)
    except TypeError:          # urllib3 1.x
        return Retry(**kwargs)


def reached_server(exc):
    """Did a failed request get past connecting (so it may have reached the server)?"""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return False
    return not any(isinstance(e, (NewConnectionError, ConnectTimeoutError)) for e in exception_chain(exc))


def exception_chain(exc):
    """exc and every exception it wraps (args, .reason, __cause__, __context__), outermost first."""
    found, todo, seen = [], [exc], set()
    while todo:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        found.append(e)
        todo.extend([getattr(e, "reason", None), e.__cause__, e.__context__, *e.args])
    return found


def failed_endpoint(exc):
    """(host, port) a requests network error was about, from its request or urllib3's pool."""
    url = getattr(getattr(exc, "request", None), "url", None)
    if isinstance(url, str) and url:
        parts = urllib.parse.urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = None
        return parts.hostname, port or {"http": 80, "https": 443}.get(parts.scheme)
    for e in exception_chain(exc):
        pool = getattr(e, "pool", None) or getattr(e, "conn", None)
        if getattr(pool, "host", None):
            return pool.host, getattr(pool, "port", None)
    return None, None


def short_network_error(exc):
    """Why a request got no answer, in a few words naming the server: e.g.
    "connection refused by api.smugmug.com:443", "timed out reading from HOST",
    "connection reset by HOST". Never a URL, never urllib3's repr soup."""
    host, port = failed_endpoint(exc)
    shown = "the server" if not host else "[%s]" % host if ":" in host else host
    chain = exception_chain(exc)

    def has(*kinds):
        return any(isinstance(e, kinds) for e in chain)

    if has(ConnectionRefusedError):
        return "connection refused by %s%s" % (shown, ":%d" % port if port else "")
    if has(socket.gaierror):
        return "cannot find the address of %s (DNS)" % shown
    if has(RemoteDisconnected):          # a ConnectionResetError too, but a polite one
        return "connection closed by %s" % shown
    if has(ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
        return "connection reset by %s" % shown
    if has(ReadTimeoutError, requests.exceptions.ReadTimeout):
        return "timed out reading from %s" % shown
    if has(requests.exceptions.ConnectTimeout) or (has(ConnectTimeoutError) and not has(NewConnectionError)):
        return "timed out connecting to %s" % shown
    if has(IncompleteRead, ProtocolError):
        return "connection closed by %s" % shown
    if has(SSLError, requests.exceptions.SSLError):
        return "TLS handshake with %s failed" % shown
    oserrors = [e for e in chain if isinstance(e, OSError) and e.strerror]
    if oserrors:
        return "%s (%s)" % (oserrors[-1].strerror, shown)
    text = re.sub(r"<[^>]*>:?\s*", "", str(chain[-1]))      # urllib3 puts object reprs first
    return redact_urls(" ".join(text.split()))[:200] or type(exc).__name__


def send_following_redirects(client, method, url, headers, api_only=False, **kwargs):
    """client's request of url, following redirects by hand, REDIRECT_HOPS at most.

    requests would resend the first Authorization header, whose OAuth
    signature covers the first URL and whose nonce is spent: here each hop is
    signed afresh for its own URL where it is on the first URL's host or the
    API's, and sent unsigned elsewhere, or with api_only refused. A 303 makes
    it a GET; never plain http off this machine. Raises DownloadError.
    """
    trusted = {urllib.parse.urlsplit(url).netloc, urllib.parse.urlsplit(client.base).netloc}
    for _hop in range(REDIRECT_HOPS + 1):
        auth = None if urllib.parse.urlsplit(url).netloc in trusted else (lambda request: request)
        resp = client.session().request(method, url, headers=headers, timeout=TIMEOUT,
                                        allow_redirects=False, auth=auth, **kwargs)
        location = resp.headers.get("Location")
        if resp.status_code not in (301, 302, 303, 307, 308) or not location:
            return resp
        resp.close()
        url = urllib.parse.urljoin(url, location)
        host = urllib.parse.urlsplit(url).hostname
        if not is_secure_url(url):
            raise DownloadError("redirected to plain http on %s" % host)
        if api_only and urllib.parse.urlsplit(url).netloc not in trusted:
            raise DownloadError("redirected away from the API, to %s" % host)
        if resp.status_code == 303:
            method = "GET"
        kwargs.pop("params", None)          # a Location is a whole URL
    raise DownloadError("too many redirects")


class SmugMugClient:
    """OAuth1-signed access to the API: one requests.Session per thread, one rate gate.

    It also watches whether SmugMug answers at all: unreachable_since is the
    wall-clock time (time.time()) since which every API call has failed with a
    network error, None while the server answers (any status counts).
    """

    def __init__(self, config, stop):
        self.config = config
        self.base = config.api_base.rstrip("/")
        self.stop = stop
        self.gate = RateGate(stop)
        self.auth = OAuth1(config.app_key, config.app_key_secret,
                           config.access_key, config.access_key_secret,
                           signature_method="HMAC-SHA1", signature_type="AUTH_HEADER")
        self._local = threading.local()
        self._sessions = []
        self._sessions_lock = threading.Lock()
        self._reach_lock = threading.Lock()
        self._failing_since = None      # monotonic start of the current streak of network errors
        self.unreachable_since = None   # the same moment as wall-clock time, for messages
        self.last_answer = None         # monotonic time of the last answer from the server

    def session(self):
        sess = getattr(self._local, "session", None)
        if sess is None:
            sess = requests.Session()
            adapter = HTTPAdapter(max_retries=connect_retry(), pool_maxsize=4)
            sess.mount("https://", adapter)
            sess.mount("http://", adapter)
            sess.auth = self.auth
            sess.headers["User-Agent"] = "smugmug_download/%s" % __version__
            self._local.session = sess
            with self._sessions_lock:
                self._sessions.append(sess)
        return sess

    def close(self):
        with self._sessions_lock:
            for sess in self._sessions:
                sess.close()
            self._sessions.clear()

    def url(self, uri):
        return self.base + path_and_query(uri)

    def note_answer(self):
        """The server answered (whatever the status): any streak of network errors is over."""
        with self._reach_lock:
            self._failing_since = self.unreachable_since = None
            self.last_answer = time.monotonic()

    def note_network_error(self):
        """A call got no answer: start the streak if none is going; seconds it has lasted."""
        with self._reach_lock:
            if self._failing_since is None:
                self._failing_since, self.unreachable_since = time.monotonic(), time.time()
            return time.monotonic() - self._failing_since

    def seconds_until_unreachable(self):
        """How long the current streak may go on before calls raise Unreachable (None: no streak)."""
        with self._reach_lock:
            if self._failing_since is None:
                return None
            return max(0.0, self._failing_since + UNREACHABLE_SECONDS - time.monotonic())

    def get(self, uri, **params):
        return self.call("GET", uri, params)

    def post(self, uri):
        return self.call("POST", uri, {})

    def call(self, method, uri, params):
        """One API call: the JSON body of a 2xx answer, or an exception.

        Redirects on the API host are followed, each hop signed anew. A 2xx
        without a JSON body is {} for a POST (accepted) and for a 204; other
        unreadable bodies and 5xx are retried API_ATTEMPTS times with backoff; 429
        closes the gate for everyone for its Retry-After; 401 raises AuthError.
        Network errors: a refused connection before the server ever answered
        is an ApiError at once (wrong api_base, no network). Later ones are
        retried while the outage lasts; a call gives up with ApiError after
        API_ATTEMPTS only if the server answered others meanwhile (the trouble
        is this call's), and raises Unreachable once every call has failed for
        UNREACHABLE_SECONDS.
        """
        url = self.url(uri)
        failures = throttled = 0
        first_network_error = None
        while True:
            if self.stop.is_set():
                raise Interrupted("stopping")
            self.gate.wait()
            try:
                resp = send_following_redirects(self, method, url, {"Accept": "application/json"},
                                                api_only=True, params=params or None)
            except DownloadError as exc:
                raise ApiError(str(exc))
            except (requests.ConnectionError, requests.Timeout) as exc:
                reason = short_network_error(exc)
                failing_for = self.note_network_error()
                if self.last_answer is None and not reached_server(exc):
                    raise ApiError("cannot connect to SmugMug: %s" % reason)
                if failing_for >= UNREACHABLE_SECONDS:
                    raise Unreachable(self.unreachable_since or time.time(), reason)
                first_network_error = first_network_error or time.monotonic()
                resp = None
            if resp is not None:
                self.note_answer()
                self.gate.observe(resp.headers)
                status = resp.status_code
                if status == 429:
                    throttled += 1
                    # Honour Retry-After, but never hammer a server that keeps saying 429.
                    wait = max(parse_retry_after(resp.headers.get("Retry-After")) or 0.0,
                               backoff_delay(throttled - 1))
                    log.warning("SmugMug asks to slow down (429): pausing all API calls for %.1f s", wait)
                    self.gate.close_for(wait)
                    if throttled >= RATE_LIMIT_ATTEMPTS:
                        raise ApiError("still rate limited after %d tries" % throttled, 429)
                    continue
                if status == 401:
                    raise AuthError(error_message(resp))
                if status == 403:
                    raise Forbidden(error_message(resp), 403)
                if status == 404:
                    raise NotFound(error_message(resp), 404)
                if 200 <= status < 300:
                    try:
                        body = resp.json()
                    except ValueError:
                        body = None
                    if isinstance(body, dict):
                        return body
                    if method == "POST" or status == 204:
                        return {}         # accepted (what it started is seen by looking again), or no content
                    reason = "unreadable answer (HTTP %d, not JSON)" % status
                elif status >= 500:
                    reason = "HTTP %d: %s" % (status, error_message(resp))
                    busy = parse_retry_after(resp.headers.get("Retry-After"))
                    if busy:        # busy (e.g. too many archives in preparation): everyone waits
                        log.warning("SmugMug is busy (%d): pausing all API calls for %.1f s", status, busy)
                        self.gate.close_for(busy)
                else:
                    raise ApiError("HTTP %d: %s" % (status, error_message(resp)), status)
            failures += 1
            delay = backoff_delay(failures - 1)
            if resp is None:
                answered_others = (self.last_answer or 0.0) > first_network_error
                if failures >= API_ATTEMPTS and answered_others:
                    raise ApiError(reason)
                left = self.seconds_until_unreachable()
                if left is not None:
                    delay = min(delay, left + 0.01)   # one last try right when the window ends
            elif failures >= API_ATTEMPTS:
                raise ApiError(reason)
            log.debug("%s %s failed (%s), retrying", method, path_and_query(uri).split("?")[0], reason)
            if self.stop.wait(delay):
                raise Interrupted("stopping")


# Walk #######################################################################

def find_root(client, config):
    """(nickname, root Folder) of the account to back up."""
    nickname = config.smugmug_user
    user = None
    if not nickname:
        user = envelope_payload(client.get(API_ROOT + "!authuser"))
        nickname = user.get("NickName") if isinstance(user, dict) else None
        if not nickname:
            raise ApiError("!authuser did not name a user")
    if not uri_of(user, "Node"):
        user = envelope_payload(client.get("%s/user/%s" % (API_ROOT, urllib.parse.quote(nickname))))
    node_uri = uri_of(user, "Node")
    if not node_uri:
        raise ApiError("user %s has no root node" % nickname)
    root_id = node_uri.rstrip("/").rsplit("/", 1)[-1]
    return nickname, Folder(root_id, node_uri + "!children", ())


def list_all(client, link, first=None, **extra):
    """Every object of a paged list, all pages, each once, in order, and the
    Expansions of every page: (objects, expansions).

    first: the answer to link when already had (a POST's). Pages are followed
    as following_page() says, with extra added to each link (a NextPage may
    leave parameters out). A page that adds nothing new ends the listing (a
    server that ignores start, or a Total that counts hidden objects), except
    an empty page the server itself links past.
    """
    objects, expansions, seen, asked = [], {}, set(), set()
    body, guessed = first, False
    while link:
        if len(asked) >= MAX_PAGES:
            raise ApiError("paging of %s does not end" % path_and_query(link).split("?")[0])
        asked.add(path_and_query(link))
        if body is None:
            try:
                body = client.get(link)
            except ApiError as exc:
                if not guessed:
                    raise
                # a page we guessed at (Pages said more, no NextPage): the list ends here
                log.debug("%s: no page past the last one given (%s)", path_and_query(link).split("?")[0], exc)
                break
        page = as_list(envelope_payload(body))
        fresh = [(hash(json.dumps(o, sort_keys=True, default=str)), o) for o in page]
        fresh = [(h, o) for h, o in fresh if h not in seen]
        if len(asked) > 1 and not fresh and (page or guessed):
            break
        for h, o in fresh:
            seen.add(h)
            objects.append(o)
        found = body.get("Expansions") if isinstance(body, dict) else None
        if isinstance(found, dict):
            expansions.update(found)
        guessed = next_page(body) is None
        following = following_page(body, link)
        link = add_query(path_and_query(following), **extra) if following else None
        if link and path_and_query(link) in asked:
            break
        body = None
    return objects, expansions


def list_children(client, folder):
    """Every child node of a folder, all pages, with the expanded Album objects: (nodes, expansions)."""
    return list_all(client, add_query(folder.children_uri, count=PAGE_COUNT, _expand="Album"), _expand="Album")


def album_from_node(node, path, expansions):
    """An Album from a child node (+ its expanded Album object when present), or None."""
    album_uri = uri_of(node, "Album")
    if not album_uri:
        return None
    album_uri = path_and_query(album_uri).split("?")[0]
    details = locator_payload(expansions.get(album_uri))
    key = album_uri.rstrip("/").rsplit("/", 1)[-1]
    album = Album(node_id=str(node.get("NodeID") or key), album_key=key, uri=album_uri, path=path)
    return with_details(album, details) if isinstance(details, dict) else album


def with_details(album, details):
    """album completed with the timestamps and image count of an Album object."""
    return replace(album,
                   album_key=str(details.get("AlbumKey") or album.album_key),
                   last_updated=str(details.get("LastUpdated") or ""),
                   images_last_updated=str(details.get("ImagesLastUpdated") or ""),
                   image_count=int_or_none(details.get("ImageCount")),
                   has_details=True,
                   info=tuple((k, details[k]) for k in ALBUM_FIELDS if k in details))


def walk_folder(client, folder):
    """Stage of the walk pool: (subfolders, albums, skipped) of one folder, names assigned."""
    nodes, expansions = list_children(client, folder)
    unique, seen = [], set()
    for node in nodes:
        node_id = node.get("NodeID")
        if not isinstance(node_id, str) or node_id in seen:
            continue
        seen.add(node_id)
        unique.append(node)
    reserved = RESERVED_TOP_NAMES if not folder.path else ()
    names = assign_names([(n["NodeID"], n.get("Name") or n.get("UrlName") or n["NodeID"],
                           (str(n.get("DateAdded") or ""), n["NodeID"])) for n in unique],
                         reserved)
    folders, albums, skipped = [], [], []
    for node in unique:
        path = folder.path + (names[node["NodeID"]],)
        kind = node.get("Type")
        kind = kind.strip().casefold() if isinstance(kind, str) else kind      # "album", "FOLDER" alike
        if kind == "folder":
            children = uri_of(node, "ChildNodes") or "%s/node/%s!children" % (API_ROOT, node["NodeID"])
            folders.append(Folder(node["NodeID"], path_and_query(children), path))
        elif kind == "album":
            album = album_from_node(node, path, expansions)
            if album is None:
                skipped.append(("/".join(path), "album without an Album link"))
            else:
                albums.append(album)
        elif kind == "page":
            log.debug("skipping page %s (pages hold no files)", "/".join(path))
        else:
            skipped.append(("/".join(path), "unknown node type %r" % (node.get("Type"),)))
    return folders, albums, skipped


# Stages #####################################################################
#
# Each stage is a plain function run in a pool thread: it talks to SmugMug or
# reads files and returns what it found. None of them touches shared state;
# the orchestrator decides what a result means for the album.

MIN_TIME = datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)
MAX_TIME = datetime.datetime.max.replace(tzinfo=datetime.timezone.utc)


@dataclass(frozen=True)
class ArchiveTicket:
    """Which archive an album waits for: stored on the album, never re-derived.

    posted: we asked SmugMug for a new archive, so a part is ours unless it is
    stale (listed before our request, or of an archive given up on) or dated
    before the newest stale one (not_before); before a request, only an
    archive dated after the album's last change is. added: the DateAdded of
    the archive chosen when first seen; from then on only that archive's parts
    count, whatever else SmugMug lists. seen: its parts so far, which become
    stale if it is given up.
    """
    posted: bool = False
    stale: frozenset = frozenset()
    not_before: Optional[str] = None
    added: Optional[str] = None
    seen: frozenset = frozenset()

    def given_up(self):
        """The ticket for a new request after this archive failed: it joins the stale ones."""
        return ArchiveTicket(posted=True, stale=self.stale | self.seen,
                             not_before=newest_time(self.not_before, self.added))

    def after_listing(self, listed):
        """The ticket for a request made after this listing: everything in it is stale."""
        dates = [p.date_added for p in listed if parse_time(p.date_added)]
        return ArchiveTicket(posted=True, stale=self.stale | {part_key(p) for p in listed},
                             not_before=newest_time(self.not_before, *dates))


def part_key(part):
    """One Download object, told apart from any other archive's (even one of the same second)."""
    return "%s|%s|%s|%s" % (part.date_added, part.part, part.file_name, strip_query(part.url))


def newest_time(*texts):
    """The latest of some API times (None and unreadable ones ignored), as given, or None."""
    dated = [t for t in texts if parse_time(t)]
    return max(dated, key=parse_time) if dated else None


def archive_part(item):
    """A Download object as an ArchivePart, URL or not (Status decides); part None when unnumbered."""
    url = item.get("WebUri") or item.get("Url") or item.get("URL")
    return ArchivePart(
        part=int_or_none(item.get("Part")),
        file_name=str(item.get("FileName") or ""),
        status=str(item.get("Status") or "Unknown").strip().capitalize(),
        url=url if isinstance(url, str) else "",
        date_added=str(item.get("DateAdded") or ""),
        size=int_or_none(item.get("Size")))


def archive_parts(body):
    """The Download objects of one !download answer as ArchiveParts."""
    return [archive_part(item) for item in as_list(envelope_payload(body))]


def archive_sets(parts):
    """The archives a listing holds, oldest first: each a list of its parts, numbered 1..n.

    Each part may carry its own DateAdded (a large archive is built part after
    part), so an archive is told apart by its numbering: parts are taken by
    DateAdded (undated last: a part still being built may have none yet),
    those of one time in listing order or, where their numbers do not repeat,
    by number; a part numbered no higher than the one before starts the next
    archive. Unnumbered parts start one at each new DateAdded and are numbered
    in listing order; numbers from 0 are shifted to start at 1.
    """
    blocks = {}
    for p in parts:
        blocks.setdefault(p.date_added if parse_time(p.date_added) else "", []).append(p)
    order = []
    for added in sorted(blocks, key=lambda t: parse_time(t) or MAX_TIME):
        block = blocks[added]
        numbers = [p.part for p in block if p.part is not None]
        if len(set(numbers)) == len(block):          # one archive's parts: in order of number
            block = sorted(block, key=lambda p: p.part)
        order.extend(block)
    sets = []
    for p in order:
        last = sets[-1][-1] if sets else None
        if last is None or (p.part is None and last.date_added != p.date_added) or (
                p.part is not None and last.part is not None and p.part <= last.part):
            sets.append([p])
        else:
            sets[-1].append(p)
    numbered = []
    for group in sets:
        shift = 1 if min((p.part for p in group if p.part is not None), default=1) == 0 else 0
        numbered.append([replace(p, part=p.part + shift if p.part is not None else index)
                         for index, p in enumerate(group, 1)])
    return numbered


def archive_added(group):
    """When an archive (from archive_sets) was made: its earliest DateAdded, None while it has none."""
    first = group[0].date_added if group else ""
    return first if parse_time(first) else None


def album_changed_at(album):
    """The latest of the album's LastUpdated and ImagesLastUpdated, or None."""
    times = [t for t in (parse_time(album.last_updated), parse_time(album.images_last_updated)) if t]
    return max(times) if times else None


def read_archive(listing, album, ticket):
    """What one !download listing means for the album: (state, parts, ticket).

    state: 'complete' (every part downloadable), 'preparing', 'error',
    'removed', or 'none' (nothing of ours listed yet). The listing is split
    into archives (archive_sets); the newest one that has its first part is
    chosen and remembered on the ticket by when it was made, and from then on
    only that archive counts. Decided by Status first: a URL is needed only to
    download, so a part in progress without one still counts, and a Complete
    part without one is an error.
    """
    mine = [p for p in listing if part_key(p) not in ticket.stale]
    if ticket.posted and ticket.not_before:
        floor = parse_time(ticket.not_before)
        mine = [p for p in mine if (parse_time(p.date_added) or floor) >= floor]
    if not ticket.posted:
        changed = album_changed_at(album)
        # Strictly later: times have whole seconds, and an archive from the very
        # second of a change may predate it. Undated archives are never reused.
        mine = [p for p in mine if changed is not None and (parse_time(p.date_added) or MIN_TIME) > changed]
    sets = archive_sets(mine)
    if ticket.added is None:
        begun = [group for group in sets if group[0].part == 1]
        if not begun:
            return ("preparing" if sets else "none"), [], ticket
        parts = begun[-1]
        if archive_added(parts):           # undated: not pinned until it has a date
            ticket = replace(ticket, added=archive_added(parts))
    else:
        chosen = [group for group in sets if archive_added(group) == ticket.added]
        if not chosen:
            return "removed", [], ticket       # the archive we waited for is listed no more
        parts = chosen[-1]
    ticket = replace(ticket, seen=ticket.seen | {part_key(p) for p in parts})
    statuses = {p.status for p in parts}
    if "Error" in statuses:
        return "error", parts, ticket
    if "Removed" in statuses:
        return "removed", parts, ticket
    if statuses != {"Complete"} or [p.part for p in parts] != list(range(1, len(parts) + 1)):
        return "preparing", parts, ticket      # a part still in progress, or not listed yet
    if any(not p.url for p in parts):
        return "error", parts, ticket          # Complete, but nothing to download it from
    return "complete", parts, ticket


def fetch_details(client, album):
    """album with its timestamps, fetched with one GET when the walk had no expansion."""
    if album.has_details:
        return album
    details = envelope_payload(client.get(album.uri))
    if not isinstance(details, dict):
        raise ApiError("album %s: unreadable answer" % album.album_key)
    return with_details(album, details)


def request_archive(client, album, ticket, look_first):
    """Stage of the request pool: (album, state, parts, ticket).

    look_first (a changed album, or one the state remembers asking an archive
    for): list what SmugMug has first; an archive dated after the album's last
    change is reused, complete or in preparation, and every other one listed is
    stale from then on. Otherwise, or with a ticket given up on, a new archive
    is asked for.
    """
    album = fetch_details(client, album)
    if album.image_count == 0:
        return album, "empty", [], ticket
    if not ticket.posted:
        existing = list_archives(client, album) if look_first else []
        state, parts, chosen = read_archive(existing, album, ticket)
        if state in ("complete", "preparing") and chosen.seen:
            others = [p for p in existing if part_key(p) not in chosen.seen]
            return album, state, parts, replace(chosen, stale=chosen.stale | {part_key(p) for p in others})
        ticket = ticket.after_listing(existing)
    # Any 2xx is an accepted request (call() gives {} for a body that is not
    # JSON): the archive is then found by looking, never asked for twice.
    try:
        answer = client.post(album.uri + "!download")
    except NotFound as exc:             # the album deleted since the walk, or only its archive refused?
        client.get(album.uri)           # NotFound again: gone (the orchestrator skips it)
        raise ApiError("SmugMug answered 404 to the archive request: %s" % exc, 404)
    state, parts, ticket = read_archive(list_archives(client, album, first=answer), album, ticket)
    return album, state, parts, ticket


def list_archives(client, album, first=None):
    """The album's archives as ArchiveParts: its !download listing, all pages (first: a POST's
    answer, its further pages listed). A 404 is no archive, as an empty listing is."""
    try:
        objects, _ = list_all(client, album.uri + "!download", first=first)
    except NotFound:
        return []
    return [archive_part(item) for item in objects]


def poll_archive(client, album, ticket):
    """Stage of the poll pool: one look at the album's archive; never sleeps."""
    return read_archive(list_archives(client, album), album, ticket)


def download_part(client, part, temp, resume_ok, progress, cancel):
    """Stage of the download pool: one archive part into temp (NAME.part); its size.

    A refusal of the archive's URL means it expired: ArchiveGone."""
    try:
        return download_file(client, part.url, temp, part.size, resume_ok, progress, cancel)
    except Refused as exc:
        raise ArchiveGone("archive no longer available (%s)" % exc)


def fetch_file(client, task, temp, resume_ok, progress, cancel):
    """Stage of the download pool: a file the archive lacks into temp; its size.

    Checked against the listed size and MD5; a mismatch is fetched again from
    zero, FILE_ATTEMPTS times in all. Refused propagates: the file is missing."""
    for attempt in range(FILE_ATTEMPTS):
        size = download_file(client, task.url, temp, task.size, resume_ok and attempt == 0, progress, cancel)
        if not task.md5 or md5_of(temp, client.stop) == task.md5:
            return size
        log.debug("%s: MD5 mismatch (attempt %d)", task.name, attempt + 1)
        remove_quietly(temp)
    raise DownloadError("%s: bytes differ from SmugMug's MD5 after %d tries" % (task.name, FILE_ATTEMPTS))


def download_file(client, url, temp, listed_size, resume_ok, progress, cancel):
    """url streamed into temp, resumed with Range when resume_ok (the same file),
    retried on network errors; the byte count checked against the listed size
    and the answer's own length; flushed to disk. Returns the size. Raises
    Refused for a refusal, or for NOT_THE_FILE_ATTEMPTS answers that are not
    the file (a login page where an expired link leads)."""
    url = urllib.parse.urljoin(client.base + "/", url)    # a relative URL is on the API host
    if not is_secure_url(url):
        raise DownloadError("refusing to fetch over plain http from %s" % urllib.parse.urlsplit(url).hostname)
    if not resume_ok:
        remove_quietly(temp)
    last_error, wrong = None, 0
    for attempt in range(DOWNLOAD_ATTEMPTS):
        if attempt and client.stop.wait(backoff_delay(attempt - 1)):
            raise Interrupted("stopping")
        try:
            return fetch_to_file(client, url, temp, progress, listed_size, cancel)
        except Refused:
            raise
        except NotTheFile as exc:
            # Once may be a hiccup; again, the link is as good as refused (an
            # expired link may answer a login page): the caller looks anew.
            wrong += 1
            last_error = redact_urls(exc)
            if wrong >= NOT_THE_FILE_ATTEMPTS:
                raise Refused(last_error)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            last_error = short_network_error(exc)
        except DownloadError as exc:
            last_error = redact_urls(exc)
        log.debug("%s: %s (attempt %d)", os.path.basename(temp), last_error, attempt + 1)
    raise DownloadError("download failed after %d tries: %s" % (DOWNLOAD_ATTEMPTS, last_error))


def fetch_to_file(client, url, temp, progress, listed_size=None, cancel=None):
    """One attempt at completing temp from url; returns the final size.

    The expected length is the listed size when SmugMug gave one (an answer of
    another length, such as a login page, is refused before a byte is
    written), else the answer's Content-Length / Content-Range."""
    try:
        offset = os.path.getsize(temp)
    except OSError:
        offset = 0
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = "bytes=%d-" % offset
    with send_following_redirects(client, "GET", url, headers, stream=True) as resp:
        status = resp.status_code
        if status == 416 and offset:
            total = parse_unsatisfied_range(resp.headers.get("Content-Range"))
            if total == offset and listed_size in (None, offset):
                return offset       # the .part was already whole
            remove_quietly(temp)
            raise DownloadError("server refused to resume (416)")
        if status in (401, 403, 404, 410):
            raise Refused("HTTP %d: %s" % (status, error_message(resp)))
        if status == 206 and offset:
            span = parse_content_range(resp.headers.get("Content-Range"))
            if span is None or span[0] != offset:
                remove_quietly(temp)
                raise DownloadError("server resumed at the wrong offset (%s)" % resp.headers.get("Content-Range"))
            length = content_length(resp.headers)
            answered = span[2] if span[2] is not None else (offset + length if length is not None else None)
            mode = "ab"
        elif status == 200:
            offset, mode = 0, "wb"
            answered = content_length(resp.headers)
        else:
            raise DownloadError("HTTP %d: %s" % (status, error_message(resp)))
        if "text/html" in resp.headers.get("Content-Type", "").lower():
            raise NotTheFile("got an HTML page instead of the file (HTTP %d)" % status)
        if listed_size is not None and answered is not None and answered != listed_size:
            raise NotTheFile("the server sends %d bytes, SmugMug listed %d" % (answered, listed_size))
        expected = listed_size if listed_size is not None else answered
        written = offset
        # Only the local side's OSErrors are write errors: requests' network
        # errors are OSErrors too, and are retried by the caller.
        try:
            out = open(temp, mode)
        except OSError as exc:
            raise LocalWriteError("%s: %s" % (temp, exc.strerror or exc)) from exc
        try:
            for chunk in body_chunks(resp):
                if client.stop.is_set():
                    raise Interrupted("stopping")
                if cancel is not None and cancel.is_set():
                    raise Abandoned("archive given up")
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise LocalWriteError("%s: %s" % (temp, exc.strerror or exc)) from exc
                written += len(chunk)
                progress(len(chunk))
            if expected is None or written == expected:
                try:
                    out.flush()
                    os.fsync(out.fileno())      # complete on disk before it can take its final name
                except OSError as exc:
                    raise LocalWriteError("%s: %s" % (temp, exc.strerror or exc)) from exc
        finally:
            try:
                out.close()
            except OSError as exc:
                raise LocalWriteError("%s: %s" % (temp, exc.strerror or exc)) from exc
    if expected is not None and written != expected:
        if written > expected:
            remove_quietly(temp)
        raise DownloadError("got %d of %d bytes" % (written, expected))
    return written


def body_chunks(resp):
    """The body of a streamed answer in chunks of up to CHUNK_SIZE, each as soon as it arrives.

    urllib3's read1 hands over what the socket has (measured: a fifth of the
    CPU of iter_content, and no waiting for a whole chunk on a slow link); a
    broken connection is a DownloadError, retried by the caller."""
    raw = resp.raw
    if not hasattr(raw, "read1"):                  # urllib3 1.x
        yield from resp.iter_content(CHUNK_SIZE)
        return
    while True:
        try:
            chunk = raw.read1(CHUNK_SIZE, decode_content=False)   # we ask for identity
        except (urllib3.exceptions.HTTPError, requests.RequestException) as exc:
            raise DownloadError("connection broken: %s" % short_network_error(exc)) from exc
        if not chunk:
            return
        yield chunk


def remove_quietly(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def read_chunks(f, stop=None, progress=None):
    """The chunks of an open file to its end, for checks in constant memory."""
    while True:
        if stop is not None and stop.is_set():
            raise Interrupted("stopping")
        chunk = f.read(CHUNK_SIZE)
        if not chunk:
            return
        if progress:
            progress(len(chunk))
        yield chunk


def md5_of(path, stop=None, progress=None):
    """Hex MD5 of a file, streamed."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in read_chunks(f, stop, progress):
            digest.update(chunk)
    return digest.hexdigest()


def zip_entry_names(info):
    """The names an entry may be listed under: as stored, and UTF-8 read from a zip that did not flag it."""
    if info.flag_bits & 0x800:
        return info.filename
    try:
        return info.filename.encode("cp437").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return info.filename


def scan_zip(path, part_name, want_md5, stop=None, progress=None):
    """[ZipEntry] of a zip on disk, every entry read to its end so that zipfile
    checks its CRC (and its MD5 taken when asked); nothing is extracted.
    BadArchive names what is wrong."""
    entries = []
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.is_dir():
                    continue
                digest = hashlib.md5() if want_md5 else None
                try:
                    with archive.open(info) as member:
                        for chunk in read_chunks(member, stop, progress):
                            if digest:
                                digest.update(chunk)
                except (zipfile.BadZipFile, EOFError, ValueError) as exc:
                    why = "CRC error" if "CRC" in str(exc) else "unreadable (%s)" % exc
                    raise BadArchive("%s: %s in entry %s" % (part_name, why, zip_entry_names(info)))
                entries.append(ZipEntry(part_name, zip_entry_names(info), info.file_size,
                                        digest.hexdigest() if digest else ""))
    except zipfile.BadZipFile as exc:
        raise BadArchive("%s: not a zip (%s)" % (part_name, exc))
    except (zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError, ValueError) as exc:
        raise BadArchive("%s: unreadable zip (%s)" % (part_name, exc))
    except OSError as exc:
        raise BadArchive("%s: %s" % (part_name, exc.strerror or exc))
    return entries


def list_images(client, album):
    """Every file of the album (!images, all pages, only the fields used), as ListedFiles."""
    extra = {"_filter": ",".join(IMAGE_FIELDS), "_filteruri": "LargestVideo"}
    objects, _ = list_all(client, add_query(album.uri + "!images", count=IMAGES_PAGE_COUNT, **extra), **extra)
    files, seen = [], set()
    for obj in objects:
        found = listed_file(obj)
        if found and found.key not in seen:
            seen.add(found.key)
            files.append(found)
    return files


def largest_video(client, listed):
    """(url, size, md5) of the largest transcode of a video (!largestvideo)."""
    uri = listed.video_uri or "%s/image/%s-0!largestvideo" % (API_ROOT, listed.key)
    video = envelope_payload(client.get(uri))
    url = video.get("Url") if isinstance(video, dict) else None
    if not isinstance(url, str) or not url:
        raise ApiError("no video to download")
    md5 = video.get("MD5")
    return url, int_or_none(video.get("Size")), md5.lower() if isinstance(md5, str) else ""


def check_album(client, album, parts, folder, old_files):
    """Stage of the check pool: an AlbumPlan for an album whose parts are on disk.

    parts: [(part name, path)] (NAME.part files, or the final files of an
    earlier backup). Lists the album's files, CRC-tests every entry of every
    part, matches listing to entries, and decides for each file the archive
    lacks where it goes and where from; a loose file saved before (old_files)
    that still has the listed size and MD5 is kept rather than fetched again.
    """
    listing = list_images(client, album)
    want_md5 = any(f.archived_md5 for f in listing)
    entries, bad = [], {}
    for name, path in parts:
        try:
            entries.extend(scan_zip(path, name, want_md5, client.stop))
        except BadArchive as exc:
            bad[name] = str(exc)
    if bad:
        return AlbumPlan(tuple(listing), {}, (), bad)
    found = match_files(listing, entries)
    locations = {k: {"archive": e.part, "entry": e.name} for k, e in found.items()}
    lacking = [f for f in listing if f.key not in found]
    names = loose_file_names([(f.key, f.file_name) for f in lacking], [n for n, _ in parts] + [MANIFEST_NAME, "." + MANIFEST_NAME])
    tasks = []
    for f in lacking:
        if f.processing:
            locations[f.key] = {"missing": "still processing on SmugMug"}
            continue
        url, size, md5, transcode = f.archived_uri, f.archived_size, f.archived_md5, False
        if not url and f.is_video:
            try:
                url, size, md5 = largest_video(client, f)
                transcode = True
            except ApiError as exc:
                locations[f.key] = {"missing": "video not downloadable: %s" % exc}
                continue
        if not url:
            locations[f.key] = {"missing": "SmugMug offers no original to download"}
            continue
        name = names[f.key]
        locations[f.key] = {"file": name}
        if transcode:       # not the uploaded file: say so, with what it was checked against
            locations[f.key].update(transcode=True, size=size, md5=md5)
        path = os.path.join(folder, name)
        if name in old_files and file_is(path, size, md5, client.stop):
            continue
        tasks.append(FileTask(f.key, name, url, size, md5, transcode))
    return AlbumPlan(tuple(listing), locations, tuple(tasks), {}, files_checked=len(listing))


def file_is(path, size, md5, stop=None):
    """Does the file at path have this size and MD5 (where given)?"""
    try:
        if size is not None and os.path.getsize(path) != size:
            return False
        return not md5 or md5_of(path, stop) == md5
    except OSError:
        return False


# State ######################################################################

def safe_rel(rel):
    """Is rel a relative path of clean components (nothing that could leave output_dir)?"""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return False
    return all(piece not in ("", ".", "..") for piece in rel.split("/"))


@dataclass
class SavedFile:
    """One file of an album's backup, in the album's folder."""
    name: str
    size: int
    kind: str = "archive"        # "archive" (a zip part) or "file" (saved on its own)


@dataclass
class AlbumRecord:
    """What the state knows of a backed-up album. Typed and validated on load."""
    key: str
    node_id: str
    path: str                    # relative to output_dir, with /
    last_updated: str = ""
    images_last_updated: str = ""
    files: List[SavedFile] = field(default_factory=list)
    manifest: Optional[int] = None   # size of metadata.json; None: not written yet (a version 1 backup)
    complete: bool = True        # False: files were missing or still processing: look again next run
    damaged: List[str] = field(default_factory=list)   # what --verify found wrong

    @property
    def parts(self):
        return [f for f in self.files if f.kind == "archive"]

    @classmethod
    def from_json(cls, key, data):
        """A valid record, or ValueError naming the bad field."""
        if not isinstance(data, dict):
            raise ValueError("not an object")
        if data.get("AlbumKey", key) != key:
            raise ValueError("AlbumKey")
        strings = {}
        for name in ("NodeID", "path", "LastUpdated", "ImagesLastUpdated"):
            value = data.get(name, "")
            if not isinstance(value, str):
                raise ValueError(name)
            strings[name] = value
        if not safe_rel(strings["path"]):
            raise ValueError("path")
        raw = data.get("files")
        if raw is None:        # version 1: archive parts only
            raw = [{"name": p.get("FileName"), "size": p.get("size")} if isinstance(p, dict) else p
                   for p in (data.get("parts") or [])]
        if not isinstance(raw, list):
            raise ValueError("files")
        files = []
        for item in raw:
            if not isinstance(item, dict):
                raise ValueError("files")
            name, size, kind = item.get("name"), item.get("size"), item.get("kind", "archive")
            if not isinstance(name, str) or "/" in name or not safe_rel(name):
                raise ValueError("files.name")
            if int_or_none(size) is None or isinstance(size, str):
                raise ValueError("files.size")
            if kind not in ("archive", "file"):
                raise ValueError("files.kind")
            files.append(SavedFile(name, size, kind))
        manifest = data.get("manifest")
        if manifest is not None and (int_or_none(manifest) is None or isinstance(manifest, str)):
            raise ValueError("manifest")
        complete, damaged = data.get("complete", True), data.get("damaged", [])
        if not isinstance(complete, bool):
            raise ValueError("complete")
        if not isinstance(damaged, list) or not all(isinstance(d, str) for d in damaged):
            raise ValueError("damaged")
        return cls(key, strings["NodeID"], strings["path"], strings["LastUpdated"],
                   strings["ImagesLastUpdated"], files, manifest, complete, list(damaged))

    def to_json(self):
        return {"AlbumKey": self.key, "NodeID": self.node_id, "path": self.path,
                "LastUpdated": self.last_updated, "ImagesLastUpdated": self.images_last_updated,
                "files": [{"name": f.name, "size": f.size, "kind": f.kind} for f in self.files],
                # the archive parts, as version 1 wrote them (and scripts may read them)
                "parts": [{"FileName": f.name, "size": f.size} for f in self.parts],
                "manifest": self.manifest, "complete": self.complete, "damaged": self.damaged}

    def owned_paths(self):
        """Every path under output_dir this album owns: its folder, its files, its manifest."""
        paths = [self.path] + [self.path + "/" + f.name for f in self.files]
        return paths + ([self.path + "/" + MANIFEST_NAME] if self.manifest is not None else [])


@dataclass(frozen=True)
class Partial:
    """An unfinished NAME.part: whose it is and which file it holds, so only the same is resumed into it."""
    album: str
    identity: str

    @classmethod
    def from_json(cls, path, data):
        if not safe_rel(path):
            raise ValueError("path")
        if isinstance(data, str):                 # version 1: the identity alone
            return cls("", data)
        if isinstance(data, dict) and isinstance(data.get("album"), str) and isinstance(data.get("identity"), str):
            return cls(data["album"], data["identity"])
        raise ValueError("partial")

    def to_json(self):
        return {"album": self.album, "identity": self.identity}


class PathOwners:
    """Who owns each path under output_dir: an album folder or file belongs to one AlbumKey.

    Like git's index, it is consulted before anything is written, renamed or
    deleted, so that no album ever touches another's files, kept or live.
    Paths compare ignoring case and Unicode form, as some disks do."""

    def __init__(self, records=()):
        self._owner = {}
        for record in records:
            self.claim(record)

    @staticmethod
    def _key(rel):
        return unicodedata.normalize("NFC", rel).casefold()

    def owner(self, rel):
        return self._owner.get(self._key(rel))

    def may_write(self, rel, key):
        return self.owner(rel) in (None, key)

    def claim(self, record):
        for rel in record.owned_paths():
            self._owner[self._key(rel)] = record.key

    def release(self, record):
        for rel in record.owned_paths():
            if self.owner(rel) == record.key:
                del self._owner[self._key(rel)]


class BackupState:
    """The incremental-backup record in output_dir/.smugmug_download/.

    albums: AlbumKey -> AlbumRecord. partials: NAME.part path -> Partial.
    requested: AlbumKeys whose archive was asked for and not yet saved (a run
    that is stopped looks first at what SmugMug already prepared). Owned by the
    orchestrator thread alone. A snapshot (state.json, replaced atomically)
    plus a journal with one line per change: a crash loses at most the album
    in flight. A record that does not validate is set aside (kept in the
    snapshot, with a warning) and that album is checked again.
    """

    def __init__(self, output_dir, read_only=False):
        self.dir = os.path.join(output_dir, STATE_DIR)
        self.read_only = read_only
        self.unreadable = None
        self.albums = {}
        self.partials = {}
        self.requested = set()
        self.set_aside = {}
        self._journal = None

    @property
    def snapshot_path(self):
        return os.path.join(self.dir, STATE_FILE)

    @property
    def journal_path(self):
        return os.path.join(self.dir, JOURNAL_FILE)

    def load(self, warn=True):
        """Read snapshot + journal; an unreadable or future state warns (unless not warn) and
        starts empty (self.unreadable says why)."""
        try:
            with open(self.snapshot_path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict) or not isinstance(data.get("albums"), dict):
                raise ValueError("not a state record")
            version = data.get("version")
            if not isinstance(version, int) or version > STATE_VERSION:
                self.unreadable = "from a newer version (%r) of this tool" % (version,)
                if warn:
                    log.warning("state file %s is %s: checking every album again (the file is kept)",
                                self.snapshot_path, self.unreadable)
                self._set_aside_file()
                return self
            for key, raw in data["albums"].items():
                self._apply({"album": raw, "key": key})
            partials, requested = data.get("partials") or {}, data.get("requested") or []
            if not isinstance(partials, dict) or not isinstance(requested, list):
                raise ValueError("partials or requested of the wrong type")
            for path, raw in partials.items():
                self._apply({"partial": [path, raw]})
            self.requested = {k for k in requested if isinstance(k, str)}
            set_aside = data.get("set_aside")
            self.set_aside.update(set_aside if isinstance(set_aside, dict) else {})
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            self.unreadable = "unreadable (%s)" % exc
            if warn:
                log.warning("state file %s is %s: checking every album again (the file is kept)",
                            self.snapshot_path, self.unreadable)
            self._set_aside_file()
            return self
        self._replay_journal()
        return self

    def _set_aside_file(self):
        """Keep a bad state file under another name rather than overwrite it silently."""
        if self.read_only:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for path in (self.snapshot_path, self.journal_path):
            if os.path.exists(path):
                kept = "%s.bad-%s" % (path, stamp)
                try:
                    os.replace(path, kept)
                    log.warning("kept the old state as %s", kept)
                except OSError:
                    pass

    def _replay_journal(self):
        try:
            with open(self.journal_path, encoding="utf-8") as f:
                lines = f.readlines()
        except OSError:
            return
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue          # a line torn by a crash
            if isinstance(entry, dict):
                self._apply(entry)

    def _apply(self, entry):
        """One journal entry: {"album": record} | {"drop": key} | {"partial": [path, Partial|None]}
        | {"requested": [key, bool]}. A bad record is set aside with a warning."""
        if "album" in entry:
            raw = entry["album"]
            key = entry.get("key") or (raw.get("AlbumKey") if isinstance(raw, dict) else None)
            if not isinstance(key, str) or not key:
                return
            try:
                self.albums[key] = AlbumRecord.from_json(key, raw)
                self.set_aside.pop(key, None)
            except ValueError as exc:
                log.warning("state record of album %s is damaged (bad %s): set aside, the album "
                            "is checked again", key, exc)
                self.albums.pop(key, None)
                self.set_aside[key] = raw
        if isinstance(entry.get("drop"), str):
            self.albums.pop(entry["drop"], None)
        if isinstance(entry.get("partial"), list) and len(entry["partial"]) == 2:
            path, raw = entry["partial"]
            if not isinstance(path, str):
                return
            if raw is None:
                self.partials.pop(path, None)
            else:
                try:
                    self.partials[path] = Partial.from_json(path, raw)
                except ValueError:
                    log.warning("state entry for %r is damaged: ignored", path)
        if isinstance(entry.get("requested"), list) and len(entry["requested"]) == 2:
            key, on = entry["requested"]
            if isinstance(key, str):
                (self.requested.add if on else self.requested.discard)(key)

    def record(self, entry):
        """Apply an entry and append it to the journal (flushed and fsynced). OSError: a write error."""
        self._apply(json.loads(json.dumps(entry)))
        if self.read_only:
            return
        if self._journal is None:
            os.makedirs(self.dir, exist_ok=True)
            self._journal = open(self.journal_path, "a", encoding="utf-8")
        self._journal.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def save_album(self, record):
        self.record({"album": record.to_json()})

    def set_partial(self, path, partial):
        if self.partials.get(path) != partial:
            self.record({"partial": [path, partial.to_json() if partial else None]})

    def set_requested(self, key, on):
        if (key in self.requested) != on:
            self.record({"requested": [key, on]})

    def save(self):
        """Write the snapshot atomically, then start an empty journal. OSError: a write error."""
        if self.read_only:
            return
        os.makedirs(self.dir, exist_ok=True)
        data = {"version": STATE_VERSION, "tool": "smugmug_download %s" % __version__,
                "albums": {k: r.to_json() for k, r in self.albums.items()},
                "partials": {p: v.to_json() for p, v in self.partials.items()},
                "requested": sorted(self.requested)}
        if self.set_aside:
            data["set_aside"] = self.set_aside
        write_atomic(self.snapshot_path, json.dumps(data, ensure_ascii=False, indent=1, sort_keys=True))
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        remove_quietly(self.journal_path)

    def close(self):
        if self._journal is not None:
            try:
                self._journal.close()
            except OSError:
                pass
            self._journal = None


def fsync_dir(folder):
    """Make renames in folder survive a power loss (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path, text, mode=None):
    """Replace path with text: a temp file in the same folder, fsync, os.replace, fsync the folder.

    The temp file's name is fixed (.NAME.part: like every file not yet complete,
    it ends in .part), so one left by a killed run is taken over by the next
    write rather than left behind."""
    folder = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(folder, "." + os.path.basename(path) + ".part")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        remove_quietly(temp)
        raise
    fsync_dir(folder)


def file_sizes_match(folder, files):
    """Is every file on disk at its recorded size?"""
    for f in files:
        try:
            if os.path.getsize(os.path.join(folder, f.name)) != f.size:
                return False
        except OSError:
            return False
    return True


def manifest_album_key(doc):
    """The AlbumKey a metadata.json document says it belongs to, or None."""
    info = doc.get("album") if isinstance(doc, dict) else None
    key = info.get("AlbumKey") if isinstance(info, dict) else None
    return key if isinstance(key, str) and key else None


def manifest_owner(output_dir, rel):
    """The AlbumKey of the metadata.json in folder rel, or None (none there, or unreadable)."""
    try:
        with open(os.path.join(output_dir, *rel.split("/"), MANIFEST_NAME), encoding="utf-8") as f:
            return manifest_album_key(json.load(f))
    except (OSError, ValueError):
        return None


def record_from_manifest(output_dir, album):
    """An album the state does not know (a lost or damaged state) whose folder holds its own
    metadata.json: a record rebuilt from it, to be checked again (not complete), so that a
    lost state costs a check of the files on disk, not a new download. None otherwise."""
    path = os.path.join(output_dir, *album.path, MANIFEST_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        size = os.path.getsize(path)
    except (OSError, ValueError):
        return None
    if manifest_album_key(doc) != album.album_key:
        return None
    info = doc["album"]
    listed_parts, listed_files = doc.get("parts"), doc.get("files")
    if not isinstance(listed_parts, list) or not isinstance(listed_files, list):
        return None
    parts = [{"name": p.get("file"), "size": p.get("size")} for p in listed_parts if isinstance(p, dict)]
    loose = []
    for item in listed_files:
        name = item.get("file") if isinstance(item, dict) else None
        if isinstance(name, str) and safe_rel(name) and "/" not in name:
            try:
                loose.append({"name": name, "size": os.path.getsize(os.path.join(os.path.dirname(path), name)),
                              "kind": "file"})
            except OSError:
                pass            # gone: the check fetches it again
    try:
        return AlbumRecord.from_json(album.album_key, {
            "NodeID": album.node_id, "path": album.rel, "LastUpdated": info.get("LastUpdated") or "",
            "ImagesLastUpdated": info.get("ImagesLastUpdated") or "", "files": parts + loose,
            "manifest": size, "complete": False})
    except ValueError:
        return None


def classify(album, record, output_dir):
    """What an album needs against its state record (timestamps known):

    'new' / 'changed' (an archive), 'recheck' (list and check what is on disk,
    fetch only what is missing: no manifest yet, files missing or damaged, or
    files SmugMug was still processing last time), or 'unchanged'.
    """
    if not record:
        return "new"
    if record.last_updated != album.last_updated or record.images_last_updated != album.images_last_updated:
        return "changed"
    folder = os.path.join(output_dir, *record.path.split("/"))
    damaged_parts = {f.name for f in record.parts} & set(record.damaged)
    if damaged_parts or not file_sizes_match(folder, record.parts):
        return "changed"
    loose = [f for f in record.files if f.kind == "file"]
    manifest_ok = not record.files or (    # an empty album has no manifest to check
        record.manifest is not None and file_sizes_match(folder, [SavedFile(MANIFEST_NAME, record.manifest)]))
    if not manifest_ok or not record.complete or record.damaged or not file_sizes_match(folder, loose):
        return "recheck"
    return "unchanged"


class RunLock:
    """An exclusive lock on output_dir/.smugmug_download.lock, released by the OS if we die."""

    def __init__(self, output_dir):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.file = None

    def acquire(self):
        """Hold the lock, or LockedError naming the holder; UsageError when output_dir is not writable."""
        try:
            self.file = open(self.path, "a+")
        except OSError as exc:
            raise UsageError("cannot write in output_dir %s: %s (%s)" % (
                os.path.dirname(self.path), exc.strerror or exc, self.path)) from exc
        try:
            if os.name == "nt":
                import msvcrt
                self.file.seek(0)
                msvcrt.locking(self.file.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl
                fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            self.file = None
            raise LockedError("another smugmug_download run (pid %s) is already backing up %s"
                              % (holder, os.path.dirname(self.path)))
        self.file.seek(0)
        self.file.truncate()
        self.file.write("%d\n" % os.getpid())
        self.file.flush()
        return self

    def release(self):
        if self.file is not None:
            self.file.close()      # closing drops the lock
            self.file = None


# Pipeline ###################################################################

class StatusLine:
    """The live status line on a terminal; log lines clear it before printing."""

    def __init__(self, stream, enabled):
        self.stream = stream
        self.enabled = enabled
        self.lock = threading.Lock()
        self.text = ""
        self.last = 0.0

    def show(self, text, force=False):
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last < STATUS_INTERVAL:
            return
        self.last = now
        with self.lock:
            self.text = fit_line(text, self.width())
            self.stream.write("\r" + self.text + "\x1b[K")
            self.stream.flush()

    def width(self):
        """Columns the line may use: the terminal's width now (so a resize counts at the
        next redraw), less one, since writing the last column makes some terminals wrap."""
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            columns = 0
        if columns <= 0:                     # not a terminal, or one that does not know its size
            columns = shutil.get_terminal_size().columns     # $COLUMNS, else 80
        return max(columns, 2) - 1

    def clear(self):
        if self.enabled and self.text:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.text = ""


class AlbumRun:
    """One album's way through a run: an explicit state machine, touched by the orchestrator alone.

        new -> waiting -> requesting -> preparing -> downloading -> checking -> fetching -> done
    and besides: waiting again when its archive failed, expired or was never
    listed (a new request); checking straight from requesting or preparing when
    SmugMug will not prepare the archive (saved file by file) or from new for
    a recheck of what is on disk; downloading again from checking when a part
    is not a sound zip; failed from anywhere. Every retry counter is in tries.
    """

    MOVES = {
        "new": ("waiting", "checking", "done", "failed"),
        "waiting": ("requesting", "failed"),
        "requesting": ("preparing", "downloading", "waiting", "checking", "done", "failed"),
        "preparing": ("downloading", "waiting", "checking", "failed"),
        "downloading": ("checking", "waiting", "failed"),
        "checking": ("fetching", "downloading", "waiting", "done", "failed"),
        "fetching": ("done", "failed"),
        "done": (),
        "failed": (),
    }

    def __init__(self, album, record, reason):
        self.album = album
        self.record = record          # AlbumRecord before this run, or None
        self.reason = reason          # new / changed / recheck
        self.state = "new"
        self.ticket = ArchiveTicket()  # the archive this album waits for
        self.tries = collections.Counter()   # error, removed, lost, part_check
        self.asked_at = 0.0           # when the current archive was requested (monotonic)
        self.first_asked_at = 0.0     # the timeout spans every request
        self.looks = 0                # polls of the current request
        self.look_token = 0           # the one planned look that counts (earlier plans are dropped)
        self.in_window = False        # counted in the preparation window
        self.generation = 0           # bumped when an archive is given up: its downloads are stale
        self.cancel = threading.Event()
        self.running = collections.Counter()  # downloads in flight, by generation
        self.outstanding = 0          # downloads (parts or files) of this step not finished
        self.parts = {}               # local part name -> ArchivePart of the current archive
        self.sizes = {}               # local part name -> size on disk
        self.from_disk = False        # the parts are the recorded final files (a recheck)
        self.by_file = ""             # why the album is saved file by file, if it is
        self.plan = None              # AlbumPlan from the check stage
        self.fetched = {}             # loose file name -> size
        self.missing = {}             # ImageKey -> why it could not be fetched

    def to(self, state):
        """Move to state; a move the table does not allow is a bug, said loudly."""
        if state not in self.MOVES[self.state]:
            raise RuntimeError("album %s: %s -> %s is not a move" % (self.album.rel, self.state, state))
        self.state = state

    def abandon_archive(self):
        """Give up on the current archive: its running downloads stop and are ignored."""
        self.generation += 1
        self.cancel.set()
        self.cancel = threading.Event()
        self.outstanding = 0
        self.parts, self.sizes = {}, {}


@dataclass
class DownloadTask:
    """A part or a loose file waiting for a download worker."""
    run: AlbumRun
    generation: int
    name: str                     # local final name in the album's folder
    temp: str
    resume_ok: bool
    part: Optional[ArchivePart] = None
    file: Optional[FileTask] = None

    @property
    def size(self):
        return (self.part.size if self.part else self.file.size) or 0


class PrepWindow:
    """How many albums may be in SmugMug's preparation (requested and not yet
    Complete) at once: sized as the run goes.

    It grows while download workers sit idle and nothing prepared waits for
    them; it holds while prepared archives wait; it halves when SmugMug
    rate-limits. Never above cap, never below floor. (What is prepared, or
    will be, is bounded apart in bytes: see Orchestrator.backlog_full.)
    """

    def __init__(self, cap, floor=WINDOW_FLOOR, start=WINDOW_START):
        self.cap = max(1, cap)
        self.floor = min(floor, self.cap)
        self.size = float(min(max(start, self.floor), self.cap))

    @property
    def limit(self):
        return int(self.size)

    def adjust(self, idle_workers, ready_waiting, throttled, wanted):
        """One step; wanted: albums are waiting for a slot (growing only helps then)."""
        if throttled:
            self.size = max(self.floor, self.size / 2)
        elif idle_workers and wanted and not ready_waiting:
            self.size = min(self.cap, self.size * 1.5 + 1)
        return self.limit


class PollPacer:
    """When to look at an archive in preparation, from what preparations have taken.

    Before anything is known, a few scout albums are looked at early and often
    (after `first` seconds, then after half the time waited so far); the
    others wait for the first scout's archive to be ready (at most `maximum`
    seconds). From then on no album is looked at before the typical archive
    was ready (the median of the last ones), and each later look comes after
    half the time waited so far, between first/2 and maximum seconds. A long
    preparation costs few calls, and a ready archive sits unseen for about a
    third of its own preparation time at most.
    """

    def __init__(self, first, maximum):
        self.first, self.maximum = first, maximum
        self.taken = collections.deque(maxlen=PACER_HISTORY)
        self.scouts = 0

    def observe(self, seconds):
        self.taken.append(seconds)

    def typical(self):
        """The median preparation time seen (the fastest while fewer than three), or None."""
        if not self.taken:
            return None
        ordered = sorted(self.taken)
        return ordered[len(ordered) // 2] if len(ordered) >= 3 else ordered[0]

    def first_delay(self):
        """Seconds from a request to its first look; None: wait for what the scouts find."""
        typical = self.typical()
        if typical is not None:
            return max(self.first, typical)
        if self.scouts < PACER_SCOUTS:
            self.scouts += 1
            return self.first
        return None

    def next_delay(self, waited):
        """Seconds to the next look at an archive not ready after waited seconds: half that, but
        not before the typical preparation time (it may have grown since the last look)."""
        typical = self.typical() or 0.0
        return max(min(self.maximum, max(self.first / 2.0, 0.5 * waited)), typical - waited)


def partial_key(album, name):
    """How the state names an album's NAME.part: its path relative to output_dir."""
    return "/".join(album.path + (name,))


class Orchestrator:
    """Moves albums between the pools; alone owns counters, output, the state and the path owners.

    One error policy: an OSError on this thread is a write error (stop new
    work, name the file, exit 1); anything a worker raises is its album's
    failure, with its reason.
    """

    def __init__(self, client, config, options, state, status):
        self.client = client
        self.config = config
        self.options = options
        self.state = state
        self.status = status
        self.out = config.output_dir
        self.summary = Summary()
        self.workers = max(1, config.workers)
        self.pools = {
            "walk": concurrent.futures.ThreadPoolExecutor(max(4, 2 * self.workers), "walk"),
            "request": concurrent.futures.ThreadPoolExecutor(self.workers, "request"),
            "poll": concurrent.futures.ThreadPoolExecutor(self.workers, "poll"),
            "check": concurrent.futures.ThreadPoolExecutor(self.workers, "check"),
            "download": concurrent.futures.ThreadPoolExecutor(self.workers, "download"),
        }
        self.futures = {}                       # future -> (kind, payload)
        self.waiting = collections.deque()      # AlbumRuns waiting for a window slot
        self.delayed = []                       # heap of (when, seq, AlbumRun): asking again soon
        self.polls = []                         # heap of (due, seq, AlbumRun, look token)
        self.deferred = []                      # AlbumRuns waiting for the scouts' first finding
        self.queue = collections.deque()        # DownloadTasks waiting for a worker
        self.busy = 0                           # download workers at work
        self.seq = 0
        self.window = PrepWindow(config.max_preparing)
        self.in_window = 0
        self.pacer = PollPacer(config.poll_seconds, config.poll_max_seconds)
        self.runs = {}                          # AlbumKey -> AlbumRun of this run
        self.owners = PathOwners(state.albums.values())
        self.owned_at_start = {PathOwners._key(r.path): k for k, r in state.albums.items()}
        self.seen_nodes = set()
        self.seen_paths = set()                 # every folder and album path listed (for --include hints)
        self.include_hits = set()               # the --include patterns some album matched
        self.probes = LOOK_FIRST_PROBES         # new albums left that look first while none has paid
        self.reused = False                     # an archive SmugMug already had was reused this run
        self.walk_complete = True
        self.halt = False                       # a local write error: start nothing new
        self.found_keys = set()
        self.dry_counts = collections.defaultdict(lambda: [0, 0])   # status -> [albums, images]
        self.bytes_done = 0
        self.bytes_known = 0
        self.resumed = 0
        self._bytes_lock = threading.Lock()
        self.started = time.monotonic()
        self.rate_samples = collections.deque([(self.started, 0)])
        self.link_rate = 0.0                    # the best download rate seen: what the link takes
        self.prepared = self.prepared_bytes = 0 # archives prepared so far, and their listed sizes
        self.last_adjust = 0.0
        self.pressure_seen = 0
        self.last_progress_log = self.started

    # -- submitting work --

    def submit(self, pool, kind, payload, fn, *args):
        future = self.pools[pool].submit(fn, *args)
        self.futures[future] = (kind, payload)

    def start(self, root):
        self.seen_nodes.add(root.node_id)
        self.submit("walk", "walk", root, walk_folder, self.client, root)

    def pump(self):
        """Start what may start: requests inside the window, due polls, downloads on free workers."""
        if self.halt:
            return
        self.adjust_window()
        now = time.monotonic()
        while self.delayed and self.delayed[0][0] <= now:
            self.waiting.appendleft(heapq.heappop(self.delayed)[2])
        while self.waiting and self.in_window < self.window.limit and not self.backlog_full():
            self.request(self.waiting.popleft())
        now = time.monotonic()
        while self.looks_planned() and self.polls[0][0] <= now and not self.downloads_stocked():
            run = heapq.heappop(self.polls)[2]
            self.submit("poll", "poll", (run, run.generation), poll_archive, self.client, run.album, run.ticket)
        self.start_downloads()

    def start_downloads(self):
        """Hand queued downloads to free workers; never two downloads on one album's old and new archive."""
        skipped = collections.deque()
        while self.queue and self.busy < self.workers:
            task = self.queue.popleft()
            run = task.run
            if task.generation != run.generation or run.state in ("done", "failed"):
                continue                                     # an archive given up on
            if any(n for g, n in run.running.items() if g != run.generation):
                skipped.append(task)                         # the old archive's downloads are still stopping
                continue
            self.busy += 1
            run.running[task.generation] += 1
            if task.resume_ok and os.path.exists(task.temp):
                self.resumed += 1
            if task.part is not None:
                self.submit("download", "download", task, download_part, self.client, task.part, task.temp,
                            task.resume_ok, self.add_bytes, run.cancel)
            else:
                self.submit("download", "fetch", task, fetch_file, self.client, task.file, task.temp,
                            task.resume_ok, self.add_bytes, run.cancel)
        self.queue.extendleft(reversed(skipped))

    def backlog_full(self):
        """Would another request let archives pile up? They expire: no new request while what
        waits for a download worker, plus what the albums in preparation will bring, exceeds
        READY_HORIZON seconds of the best download rate seen (before any rate is known: while
        two archives per worker wait)."""
        parts = [t for t in self.queue if t.part is not None]
        if not self.link_rate:
            return len(parts) >= 2 * self.workers
        album_bytes = self.prepared_bytes / self.prepared if self.prepared else 0
        coming = sum(t.size for t in parts) + self.in_window * album_bytes
        return coming > self.link_rate * READY_HORIZON

    def downloads_stocked(self):
        """Does the download queue hold LOOK_HOLD seconds of work? Then finding more ready
        archives can wait: the looks that come due meanwhile are made, oldest first, once it
        runs low. (Each look is an API call; a ready archive found early gains nothing while
        the link is busy.)"""
        return bool(self.link_rate) and sum(t.size for t in self.queue) > self.link_rate * LOOK_HOLD

    def adjust_window(self):
        now = time.monotonic()
        if now - self.last_adjust < WINDOW_STEP:
            return
        self.last_adjust = now
        pressure = self.client.gate.pressure
        throttled, self.pressure_seen = pressure > self.pressure_seen, pressure
        parts = [t for t in self.queue if t.part is not None]
        self.link_rate = max(self.link_rate, self.recent_rate() or 0)
        self.window.adjust(idle_workers=self.workers - self.busy, ready_waiting=len(parts),
                           throttled=throttled, wanted=bool(self.waiting))

    def recent_rate(self):
        """Download bytes per second over the last few seconds (None until known)."""
        now = time.monotonic()
        self.rate_samples.append((now, self.bytes_done))
        while len(self.rate_samples) > 2 and now - self.rate_samples[1][0] > RATE_SPAN:
            self.rate_samples.popleft()
        (t0, b0), (t1, b1) = self.rate_samples[0], self.rate_samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 - t0 >= 0.5 and b1 > b0 else None

    def looks_planned(self):
        """Is a look at some archive planned? (Plans replaced by later ones are dropped here.)"""
        while self.polls and (self.polls[0][2].state != "preparing" or self.polls[0][3] != self.polls[0][2].look_token):
            heapq.heappop(self.polls)
        return bool(self.polls)

    def next_timeout(self):
        timeout = STATUS_INTERVAL if self.status.enabled else 0.25
        self.looks_planned()
        for heap in (self.delayed,) if self.downloads_stocked() else (self.polls, self.delayed):
            if heap:
                timeout = min(timeout, max(0.0, heap[0][0] - time.monotonic()))
        return timeout

    def enter_window(self, run):
        if not run.in_window:
            run.in_window = True
            self.in_window += 1

    def leave_window(self, run):
        if run.in_window:
            run.in_window = False
            self.in_window -= 1

    # -- the loop --

    def run(self, root):
        self.start(root)
        while self.futures or (not self.halt and (self.looks_planned() or self.waiting or self.delayed or self.queue)):
            self.pump()
            done, _ = concurrent.futures.wait(list(self.futures), timeout=self.next_timeout(),
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                kind, payload = self.futures.pop(future)
                self.handle(kind, payload, future)
            self.show_progress()
        self.finish()
        return self.summary

    def handle(self, kind, payload, future):
        """A finished piece of work: its result moves its album on; by the one error policy."""
        if kind in ("download", "fetch"):
            self.busy -= 1
            payload.run.running[payload.generation] -= 1
        if kind in ("download", "fetch"):
            run = payload.run
        else:
            run = payload[0] if isinstance(payload, tuple) else None     # a walk's payload is its Folder
        try:
            try:
                result = future.result()
            except (AuthError, Interrupted, Unreachable, OutputClosed):
                raise
            except LocalWriteError as exc:
                self.stop_new_work(str(exc))
                self.fail(run, "could not write: %s" % exc)
                return
            except BackupError as exc:
                self.on_error(kind, payload, exc)
                return
            except Exception as exc:       # a bug or an unforeseen answer: fail this piece, go on
                log.debug("unexpected error in %s", kind, exc_info=True)
                self.on_error(kind, payload, BackupError("%s: %s" % (type(exc).__name__, redact_urls(exc))))
                return
            getattr(self, "on_" + kind)(payload, result)
        except OSError as exc:
            where = getattr(exc, "filename", None) or self.out
            self.stop_new_work("%s: %s" % (where, exc.strerror or exc))
            self.fail(run, "could not write: %s" % (exc.strerror or exc))
        except (AuthError, Interrupted, Unreachable, OutputClosed):
            raise
        except Exception as exc:           # a bug here: fail the album by name rather than the run
            log.debug("internal error after %s", kind, exc_info=True)
            if run is not None:
                self.fail(run, "internal error: %s: %s" % (type(exc).__name__, exc))
            else:
                self.walk_complete = False
                self.summary.failed["/".join(getattr(payload, "path", ())) + "/"] = "internal error: %s" % exc

    def on_error(self, kind, payload, exc):
        if kind == "walk":
            self.walk_complete = False
            where = "/".join(payload.path) or "the root folder"
            if isinstance(exc, NotFound):
                log.warning("folder %s is gone (404): skipped", where)
            else:
                log.error("could not list folder %s: %s", where, exc)
                self.summary.failed[where + "/"] = "could not list folder: %s" % exc
            return
        if kind in ("download", "fetch"):
            run = payload.run
            if payload.generation != run.generation or run.state in ("done", "failed") or isinstance(exc, Abandoned):
                self.start_pending(run)
                return                          # a download of an archive given up on
            if kind == "fetch":
                self.file_done(run, payload, exc)
            elif isinstance(exc, ArchiveGone):
                self.archive_failed(run, "removed", str(exc))
            else:
                self.fail(run, str(exc))
            return
        run, generation = payload
        if generation != run.generation or run.state in ("done", "failed"):
            return
        if isinstance(exc, Forbidden) and kind == "request":
            self.fail(run, "downloads not allowed: %s" % exc)
        elif isinstance(exc, NotFound) and kind in ("request", "details"):
            self.vanished(run)
        else:
            self.fail(run, str(exc))

    def vanished(self, run):
        """An album deleted on SmugMug since the walk listed it (404): nothing to back up; its
        files from before are kept, as for any album gone from SmugMug. Not a failure."""
        run.to("done")
        self.leave_window(run)
        run.abandon_archive()
        log.warning("%s is gone from SmugMug since the walk listed it (404): skipped%s", run.album.rel,
                    "; its files from before are kept" if run.record else "")

    def start_pending(self, run):
        """Once the last download of an abandoned archive has stopped, the new one may start."""
        if not any(n for g, n in run.running.items() if g != run.generation):
            self.start_downloads()

    # -- walk --

    def on_walk(self, folder, result):
        folders, albums, skipped = result
        for where, why in skipped:
            if not is_selected(where, self.options.includes, self.options.excludes):
                continue
            self.dry_counts["skipped"][0] += 1
            if why.startswith("album without"):
                log.info("failed: %s: %s", where, why)
                self.summary.failed[where] = why
            else:
                log.warning("skipping %s: %s", where, why)
        self.seen_paths.update("/".join(item.path) for item in folders + albums)
        for sub in folders:
            if sub.node_id in self.seen_nodes or self.halt:
                continue
            self.seen_nodes.add(sub.node_id)
            rel = "/".join(sub.path)
            if not folder_may_match(rel, self.options.includes, self.options.excludes):
                log.debug("not walking %s (outside --include/--exclude)", rel)
                continue
            if not self.options.dry_run and is_selected(rel, self.options.includes, self.options.excludes):
                os.makedirs(os.path.join(self.out, *sub.path), exist_ok=True)
            self.submit("walk", "walk", sub, walk_folder, self.client, sub)
        for album in albums:
            if album.node_id in self.seen_nodes:
                continue
            self.seen_nodes.add(album.node_id)
            self.on_album(album)

    def place(self, album, record):
        """The album's local path: the walk's, unless another album owned that folder at the
        start of the run (a kept backup, or one moving away): then with " (NodeID)"."""
        alternative = self.alternative_path(album)
        if record and record.path in (album.rel, "/".join(alternative)):
            return album if record.path == album.rel else replace(album, path=alternative)
        owner = (self.owned_at_start.get(PathOwners._key(album.rel)) or self.owners.owner(album.rel)
                 or manifest_owner(self.out, album.rel))     # a backup the state lost still has its manifest
        if owner not in (None, album.album_key):
            return replace(album, path=alternative)
        return album

    @staticmethod
    def alternative_path(album):
        return album.path[:-1] + (with_suffix(album.path[-1], " (%s)" % clean_name(album.node_id)),)

    def rebuilt_record(self, album):
        """For an album the state does not know: a record rebuilt from its own metadata.json,
        at its path or at its " (NodeID)" one (a lost or damaged state), or None."""
        for path in (album.path, self.alternative_path(album)):
            record = record_from_manifest(self.out, replace(album, path=path))
            if record and self.owners.owner(record.path) in (None, record.key):
                self.owners.claim(record)
                log.info("%s: not in the state; its metadata.json says what is on disk: checking that",
                         record.path)
                return record
        return None

    def on_album(self, album):
        if not is_selected(album.rel, self.options.includes, self.options.excludes):
            return              # outside --include/--exclude: not counted (pruned folders are not even seen)
        self.include_hits.update(p for p in self.options.includes if path_matches([p], album.rel))
        self.summary.albums_found += 1
        self.found_keys.add(album.album_key)
        record = self.state.albums.get(album.album_key)
        if record is None:
            record = self.rebuilt_record(album)
        album = self.place(album, record)
        run = AlbumRun(album, record, "new")
        if record and record.path != album.rel and not self.options.dry_run and not self.halt:
            self.move_album(run)
        if album.has_details or not record:
            self.route(run)
        else:
            self.submit("request", "details", (run, run.generation), fetch_details, self.client, album)

    def on_details(self, payload, album):
        run, _generation = payload
        run.album = album
        self.route(run)

    def route(self, run):
        """Decide what an album needs once its timestamps are known (or it is new)."""
        album = run.album
        status = classify(album, run.record, self.out) if album.has_details or run.record else "new"
        if self.options.dry_run:
            if status == "unchanged" and run.record.path != album.rel:
                status = "moved"
            counts = self.dry_counts[status]
            counts[0] += 1
            counts[1] += album.image_count or 0
            moved = status != "moved" and run.record and run.record.path != album.rel
            self.options.print_line("%-9s %s%s" % (status, album.rel,
                                                   " (moved from %s)" % run.record.path if moved else ""))
            return
        if status == "unchanged":
            self.summary.unchanged += 1
            return
        if self.halt:
            return
        run.reason = status
        self.runs[album.album_key] = run
        if album.image_count == 0:
            self.emptied(run)
        elif status == "recheck":
            run.from_disk = True
            self.check(run)
        else:
            run.to("waiting")
            self.waiting.append(run)

    def move_album(self, run):
        """The album was renamed or moved on SmugMug: move its own files along (never the
        folder, which may hold other albums' files), never over a file another album owns."""
        record = run.record
        old = os.path.join(self.out, *record.path.split("/"))
        new = os.path.join(self.out, *run.album.path)
        left = []
        for name in [f.name for f in record.files] + ([MANIFEST_NAME] if record.manifest is not None else []):
            src, dst = os.path.join(old, name), os.path.join(new, name)
            if not os.path.exists(src):
                continue
            if os.path.exists(dst) or not self.owners.may_write(run.album.rel + "/" + name, record.key):
                # Left where it is (and named): the album lacks it at its new place and fetches it again.
                log.warning("%s: %s/%s is in the way; %s/%s is left where it is", run.album.rel,
                            run.album.rel, name, record.path, name)
                left.append(name)
                continue
            os.makedirs(new, exist_ok=True)
            os.rename(src, dst)
        try:
            os.rmdir(old)                   # only when nothing else is left in it
        except OSError:
            pass
        moved = replace(record, path=run.album.rel, damaged=sorted(set(record.damaged) | set(left)))
        self.owners.release(record)
        self.owners.claim(moved)
        self.state.save_album(moved)
        run.record = moved
        log.info("moved %s -> %s", record.path, run.album.rel)
        self.summary.moved += 1

    def emptied(self, run):
        """An album with no images: its folder and a manifest; files kept from before stay."""
        record = run.record
        if record and record.files:
            kept = replace(record, last_updated=run.album.last_updated,
                           images_last_updated=run.album.images_last_updated)
            self.state.save_album(kept)
            self.summary.emptied.append(run.album.rel)
            log.warning("%s is empty on SmugMug now: its %d file%s from before are kept", run.album.rel,
                        len(record.files), "" if len(record.files) == 1 else "s")
            run.to("done")
            return
        run.plan = AlbumPlan((), {})
        self.commit(run)

    # -- request and poll --

    def request(self, run):
        run.to("requesting")
        self.enter_window(run)
        run.asked_at = time.monotonic()
        run.first_asked_at = run.first_asked_at or run.asked_at   # the timeout spans re-requests
        run.looks = 0
        look_first = run.record is not None or run.album.album_key in self.state.requested or self.probe()
        self.submit("request", "request", (run, run.generation), request_archive, self.client, run.album,
                    run.ticket, look_first)

    def probe(self):
        """Should a new album look for an archive SmugMug already has (one asked for on the
        web, or by a run whose state was lost) before asking for one? The first
        LOOK_FIRST_PROBES do; the others only once such a look has paid. A fresh account
        pays one call per album less."""
        if self.reused:
            return True
        self.probes -= 1
        return self.probes >= 0

    def on_request(self, payload, result):
        run, generation = payload
        album, state, parts, ticket = result
        if generation != run.generation or run.state != "requesting":
            return
        run.album, run.ticket = album, ticket
        self.reused = self.reused or (not ticket.posted and state in ("complete", "preparing"))
        if ticket.posted:
            self.state.set_requested(album.album_key, True)
        if state == "empty":
            self.leave_window(run)
            self.emptied(run)
            return
        self.on_archive(run, state, parts)

    def on_poll(self, payload, result):
        run, generation = payload
        state, parts, ticket = result
        if generation != run.generation or run.state != "preparing":
            return
        run.ticket = ticket
        self.on_archive(run, state, parts)

    def on_archive(self, run, state, parts):
        now = time.monotonic()
        if state == "complete":
            self.leave_window(run)                    # prepared: the backlog bound takes over
            first_finding = self.pacer.typical() is None
            self.pacer.observe(now - run.asked_at)
            if first_finding:
                for other in self.deferred:           # the scouts found something: look at the rest
                    self.schedule_look(other, max(now, other.asked_at + self.pacer.typical()))
                self.deferred = []
            self.download(run, parts)
        elif state in ("error", "removed"):
            self.archive_failed(run, state, "SmugMug could not prepare the archive (Error)"
                                if state == "error" else "archive expired (Removed)")
        elif now - run.first_asked_at > self.config.archive_timeout_hours * 3600:
            self.save_by_file(run, "archive not ready after %s" % human_seconds(now - run.first_asked_at))
        elif state == "none" and run.looks >= REQUEST_AGAIN_AFTER_POLLS:
            run.tries["lost"] += 1
            if run.tries["lost"] > LOST_REQUEST_RETRIES:
                self.save_by_file(run, "SmugMug never listed the archive (%d requests)" % run.tries["lost"])
            else:
                log.debug("%s: no archive listed after %d looks; requesting again", run.album.rel, run.looks)
                self.request_again(run)
        else:
            if run.state != "preparing":
                run.to("preparing")
            delay = self.pacer.first_delay() if run.looks == 0 else self.pacer.next_delay(now - run.asked_at)
            run.looks += 1
            if delay is None:           # nothing known yet: wait for the scouts, not longer than poll_max
                self.deferred.append(run)
                delay = self.config.poll_max_seconds
            self.schedule_look(run, now + delay)

    def schedule_look(self, run, due):
        """The next look at the album's archive (any earlier one planned is dropped)."""
        run.look_token += 1
        self.seq += 1
        heapq.heappush(self.polls, (due, self.seq, run, run.look_token))

    def archive_failed(self, run, kind, why):
        """Error or Removed: ask again a bounded number of times, then save the album file by file."""
        run.tries[kind] += 1
        limit = ARCHIVE_ERROR_RETRIES if kind == "error" else ARCHIVE_REMOVED_RETRIES
        if run.tries[kind] > limit:
            self.save_by_file(run, "%s, %d tries" % (why, run.tries[kind]))
            return
        log.warning("%s: %s; requesting a new one", run.album.rel, why)
        self.request_again(run)

    def request_again(self, run):
        """Give up on the current archive (its downloads stop and are ignored) and ask again, a
        little later: DateAdded has whole seconds, so the new archive is told apart by its second."""
        self.leave_window(run)
        run.abandon_archive()
        run.ticket = run.ticket.given_up()
        run.to("waiting")
        self.seq += 1
        heapq.heappush(self.delayed, (time.monotonic() + REQUEST_AGAIN_DELAY, self.seq, run))

    def save_by_file(self, run, why):
        """SmugMug will not prepare the archive: list the album and fetch every file on its own."""
        self.leave_window(run)
        run.abandon_archive()
        run.by_file = why
        log.warning("%s: %s; saving it file by file", run.album.rel, why)
        self.check(run)

    # -- download and check --

    def folder_of(self, run):
        return os.path.join(self.out, *run.album.path)

    def claimable(self, run, names):
        """Fail the album if one of these names in its folder belongs to another album."""
        for name in names:
            owner = self.owners.owner(run.album.rel + "/" + name)
            if owner not in (None, run.album.album_key):
                self.fail(run, "%s/%s belongs to album %s" % (run.album.rel, name, owner))
                return False
        return True

    def queue_download(self, run, name, part=None, file=None, resume=True):
        """Queue a part or a file; a NAME.part is resumed only if the state says it holds the same."""
        temp = os.path.join(self.folder_of(run), name) + ".part"
        key = partial_key(run.album, name)
        identity = part.identity if part else "file|%s|%s|%s" % (file.key, file.size, file.md5)
        partial = Partial(run.album.album_key, identity)
        resume_ok = resume and self.state.partials.get(key) == partial
        if not resume_ok:
            self.state.set_partial(key, partial)
        self.bytes_known += (part.size if part else file.size) or 0
        self.queue.append(DownloadTask(run, run.generation, name, temp, resume_ok, part, file))

    def download(self, run, parts):
        run.to("downloading")
        names = part_file_names(parts)
        if not self.claimable(run, names.values()):
            return
        os.makedirs(self.folder_of(run), exist_ok=True)
        run.parts = {names[p.part]: p for p in parts}
        run.sizes = {}
        self.prepared += 1
        self.prepared_bytes += sum(p.size or 0 for p in parts)
        run.outstanding = len(parts)
        for p in parts:
            self.queue_download(run, names[p.part], part=p)

    def add_bytes(self, n):
        """Called from download threads; the orchestrator only reads the total."""
        with self._bytes_lock:
            self.bytes_done += n

    def on_download(self, task, size):
        run = task.run
        if task.generation != run.generation or run.state != "downloading":
            self.start_pending(run)
            return
        run.sizes[task.name] = size
        run.outstanding -= 1
        if run.outstanding == 0:
            self.check(run)

    def check(self, run):
        """List the album's files and test its zips (the parts just downloaded, or those on disk)."""
        run.to("checking")
        folder = self.folder_of(run)
        if run.by_file:
            parts = []
        elif run.from_disk:
            parts = [(f.name, os.path.join(folder, f.name)) for f in run.record.parts]
        else:
            parts = [(name, os.path.join(folder, name) + ".part") for name in sorted(run.parts)]
        old_files = {f.name for f in run.record.files if f.kind == "file"} if run.record else set()
        self.submit("check", "check", (run, run.generation), check_album, self.client, run.album, parts,
                    folder, old_files)

    def on_check(self, payload, plan):
        run, generation = payload
        if generation != run.generation or run.state != "checking":
            return
        self.summary.files_checked += plan.files_checked
        if plan.bad_parts:
            why = "; ".join(sorted(plan.bad_parts.values()))
            run.tries["part_check"] += 1
            if run.tries["part_check"] > PART_CHECK_RETRIES:
                self.fail(run, "archive is not a sound zip after %d downloads: %s" % (run.tries["part_check"], why))
            elif run.from_disk:
                log.warning("%s: %s; requesting a new archive", run.album.rel, why)
                run.from_disk, run.reason = False, "changed"
                run.to("waiting")
                self.waiting.append(run)
            else:
                log.warning("%s: %s; downloading it again", run.album.rel, why)
                run.to("downloading")
                run.outstanding = len(plan.bad_parts)
                for name in plan.bad_parts:
                    self.queue_download(run, name, part=run.parts[name], resume=False)
            return
        run.plan = plan
        if not self.claimable(run, [t.name for t in plan.fetch]):
            return
        if plan.fetch:
            run.to("fetching")
            os.makedirs(self.folder_of(run), exist_ok=True)
            run.outstanding = len(plan.fetch)
            for task in plan.fetch:
                self.queue_download(run, task.name, file=task)
        else:
            self.commit(run)

    def on_fetch(self, task, size):
        self.file_done(task.run, task, None, size)

    def file_done(self, run, task, exc, size=0):
        if task.generation != run.generation or run.state != "fetching":
            return
        if exc is None:
            run.fetched[task.name] = size
            self.summary.files_fetched += 1
        else:
            run.missing[task.file.key] = ("refused by SmugMug (%s)" % exc) if isinstance(exc, Refused) else str(exc)
        run.outstanding -= 1
        if run.outstanding == 0:
            self.commit(run)

    # -- the commit point --

    def commit(self, run):
        """Every file of the album is checked and complete beside its final name: rename them
        all, write metadata.json, record the album; then drop its old files it no longer has.

        Old files are dropped only when nothing is missing: an incomplete backup
        never replaces more than it must."""
        folder, album, plan = self.folder_of(run), run.album, run.plan
        os.makedirs(folder, exist_ok=True)
        locations = dict(plan.locations)
        for key, why in run.missing.items():
            locations[key] = {"missing": why}
        for key, where in list(locations.items()):
            if "missing" in where:      # the server's words may carry a signed URL
                locations[key] = dict(where, missing=redact_urls(where["missing"]))
        new_parts = []
        if run.from_disk:
            new_parts = [(f.name, f.size) for f in run.record.parts]
        elif not run.by_file:
            new_parts = [(name, run.sizes[name]) for name in sorted(run.parts)]
        loose = sorted({where["file"] for where in locations.values() if "file" in where})
        empty = not new_parts and not loose and not plan.listing     # an empty folder, no manifest
        if not self.claimable(run, [n for n, _ in new_parts] + loose + ([] if empty else [MANIFEST_NAME])):
            return
        renamed = [n for n, _ in new_parts if not run.from_disk] + [n for n in loose if n in run.fetched]
        for name in renamed:
            os.replace(os.path.join(folder, name) + ".part", os.path.join(folder, name))
        files = [SavedFile(n, s, "archive") for n, s in new_parts]
        files += [SavedFile(n, os.path.getsize(os.path.join(folder, n)), "file") for n in loose]
        manifest_size = None
        if not empty:
            manifest = manifest_document(album, replace(plan, locations=locations), new_parts)
            text = json.dumps(manifest, ensure_ascii=False, indent=2) + "\n"
            write_atomic(os.path.join(folder, MANIFEST_NAME), text)
            manifest_size = len(text.encode("utf-8"))
        missing = {k: w["missing"] for k, w in locations.items() if "missing" in w}
        lacking = {k: w for k, w in missing.items() if w != "still processing on SmugMug"}
        old = run.record
        same_place = old is not None and old.path == album.rel
        obsolete = [f for f in (old.files if same_place else []) if f.name not in {s.name for s in files}]
        if missing and same_place:
            files += [f for f in obsolete if os.path.exists(os.path.join(folder, f.name))]
            obsolete = []
        record = AlbumRecord(album.album_key, album.node_id, album.rel, album.last_updated,
                             album.images_last_updated, files, manifest_size, complete=not missing)
        if old is not None:
            self.owners.release(old)
        self.owners.claim(record)
        self.state.save_album(record)
        self.state.set_requested(album.album_key, False)
        for path, partial in list(self.state.partials.items()):
            if partial.album == album.album_key:
                remove_quietly(os.path.join(self.out, *path.split("/")) + ".part")
                self.state.set_partial(path, None)
        for f in obsolete:
            if self.owners.may_write(album.rel + "/" + f.name, album.album_key):
                remove_quietly(os.path.join(folder, f.name))
        fsync_dir(folder)
        run.to("done")
        total = sum(s for _, s in new_parts if not run.from_disk) + sum(run.fetched.values())
        self.summary.backed_up += 1
        self.summary.parts += 0 if run.from_disk else len(new_parts)
        self.summary.bytes += total
        if run.by_file:
            self.summary.by_file.append(album.rel)
        if missing:
            names = {f.key: f.file_name for f in plan.listing}
            self.summary.missing[album.rel] = sorted((names.get(k, k), why) for k, why in missing.items())
        if lacking:
            self.summary.backed_up -= 1
            self.summary.failed[album.rel] = "%d file%s missing: %s" % (
                len(lacking), "" if len(lacking) == 1 else "s", "; ".join(sorted(set(lacking.values()))))
            log.info("failed: %s: %s", album.rel, self.summary.failed[album.rel])   # the summary says it
        elif not self.status.enabled or self.options.verbose:
            log.info("backed up %s (%s%s, %d part%s, %d file%s on their own, %s)", album.rel, run.reason,
                     ", file by file" if run.by_file else "", len(new_parts), "" if len(new_parts) == 1 else "s",
                     len(loose), "" if len(loose) == 1 else "s", human_bytes(total))

    def fail(self, run, reason):
        if run is None or run.state in ("done", "failed"):
            return
        run.to("failed")
        self.leave_window(run)
        run.abandon_archive()
        self.summary.failed[run.album.rel] = reason
        log.info("failed: %s: %s", run.album.rel, reason)     # the summary says it once, as an error

    def stop_new_work(self, why):
        """A write error: start nothing new (the walk included), let running work end."""
        if not self.halt:
            log.error("stopping new downloads: %s", why)
            self.summary.write_error = why
        self.halt = True
        self.walk_complete = False          # folders not listed now: nothing can be called gone
        for future, (kind, _payload) in list(self.futures.items()):
            if future.cancel():
                del self.futures[future]
                if kind == "walk":
                    self.walk_complete = False
        self.waiting.clear()
        self.delayed.clear()
        self.polls.clear()
        self.queue.clear()

    # -- output --

    def progress_text(self):
        s = self.summary
        done, failed = s.backed_up + s.unchanged, len(s.failed)
        preparing = sum(1 for r in self.runs.values() if r.state in ("requesting", "preparing"))
        ready = sum(1 for t in self.queue if t.part is not None)
        downloading = sum(1 for r in self.runs.values() if r.state in ("downloading", "fetching"))
        head = "albums: %d found, %d done, %d failed" % (s.albums_found, done, failed)
        if preparing and not downloading and not self.busy:
            return "%s | waiting for %d archive%s to be prepared (window %d)" % (
                head, preparing, "" if preparing == 1 else "s", self.window.limit)
        rate = self.recent_rate()
        text = "%s | %d preparing, %d ready, %d downloading (window %d) | %s of %s" % (
            head, preparing, ready, downloading, self.window.limit, human_bytes(self.bytes_done),
            human_bytes(max(self.bytes_known, self.bytes_done)))
        if rate:
            text += " at %s/s" % human_bytes(rate)
            left = self.bytes_known - self.bytes_done
            if left > 0 and not self.waiting and self.walk_done():
                text += ", ETA %s" % human_seconds(left / rate)
        if self.resumed:
            text += " | %d resumed" % self.resumed
        return text

    def walk_done(self):
        return not any(kind in ("walk", "details") for kind, _ in self.futures.values())

    def show_progress(self):
        if self.options.dry_run:
            return
        if self.status.enabled:
            self.status.show(self.progress_text())
        now = time.monotonic()
        if not self.status.enabled and now - self.last_progress_log >= PROGRESS_LOG_INTERVAL:
            self.last_progress_log = now
            waiting = sum(1 for r in self.runs.values() if r.state in ("requesting", "preparing"))
            if waiting and not self.busy:
                log.info("waiting for %d archive%s to be prepared by SmugMug", waiting,
                         "" if waiting == 1 else "s")

    def finish(self):
        unfiltered = not self.options.includes and not self.options.excludes
        if self.walk_complete and unfiltered:
            self.summary.gone = sorted(r.path for k, r in self.state.albums.items() if k not in self.found_keys)
            if not self.options.dry_run and not self.halt and not self.client.stop.is_set():
                self.drop_abandoned_partials()
        self.summary.seconds = time.monotonic() - self.started

    def drop_abandoned_partials(self):
        """NAME.part files no unfinished album of this run may resume are removed, with their entries."""
        keep = {k for k, r in self.runs.items() if r.state != "done"}
        for path, partial in list(self.state.partials.items()):
            if partial.album not in keep:
                try:
                    remove_quietly(os.path.join(self.out, *path.split("/")) + ".part")
                    self.state.set_partial(path, None)
                except OSError as exc:
                    log.warning("could not remove %s.part: %s", path, exc.strerror or exc)

    def shutdown(self, wait):
        for pool in self.pools.values():
            pool.shutdown(wait=wait, cancel_futures=True)


# CLI ########################################################################

EPILOG = """\
examples:
  first time:   python smugmug_download.py --authorize
  back up:      python smugmug_download.py
  what's new:   python smugmug_download.py --dry-run
  check disk:   python smugmug_download.py --verify
  some albums:  python smugmug_download.py --include 'Family/2019/*' --exclude '*/Private'
  cron (the virtualenv's Python, absolute paths; prints only on trouble):
    0 3 * * * cd /home/me/smugmug_download && /home/me/smugmug_download/.venv/bin/python smugmug_download.py --quiet --log-file /home/me/smugmug-backup.log

exit codes: 0 all backed up (or unchanged; --verify: all intact), 1 some albums
failed, a write error or SmugMug unreachable (--verify: something damaged), 2 config/
usage/credentials error, 3 another run holds the lock, 130 interrupted, 141 stdout
closed by its reader (`--dry-run | head`).
"""


class Options:
    """What the command line asked for, beyond the config."""

    def __init__(self, args, out=None):
        self.dry_run = args.dry_run
        self.verify = getattr(args, "verify", False)
        self.includes = args.include or []
        self.excludes = args.exclude or []
        self.verbose = args.verbose
        self.quiet = args.quiet
        self._out = out or sys.stdout

    def print_line(self, text):
        """One line on stdout; OutputClosed when its reader has gone (`| head`)."""
        try:
            self._out.write(text + "\n")
            self._out.flush()
        except BrokenPipeError as exc:
            raise OutputClosed("standard output was closed") from exc


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line, like every other user error."""

    def error(self, message):
        sys.stderr.write("Error: %s (see --help)\n" % message)
        sys.exit(EXIT_USAGE)


def build_parser():
    parser = Parser(
        prog="smugmug_download.py",
        description="Back up a whole SmugMug account to a local disk as album zip archives.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    setup = parser.add_argument_group("set-up")
    setup.add_argument("--config", default="config.json", metavar="PATH",
                       help="config file (default: ./config.json)")
    setup.add_argument("--authorize", action="store_true",
                       help="get an access token for the app key in the config (opens no browser: "
                            "prints a URL, reads the six-digit code) and save it in the config")
    what = parser.add_argument_group("what to back up")
    what.add_argument("--output-dir", metavar="DIR", help="back up here instead of the config's output_dir")
    what.add_argument("--include", action="append", metavar="GLOB",
                      help="only albums whose local path (relative to output_dir) or a folder above "
                           "it matches; repeatable")
    what.add_argument("--exclude", action="append", metavar="GLOB",
                      help="skip albums whose path or a folder above it matches; repeatable; wins over --include")
    what.add_argument("--dry-run", action="store_true",
                      help="list each album as new, changed or unchanged; request and write nothing")
    what.add_argument("--verify", action="store_true",
                      help="check the backup on disk against its manifests (every zip entry's CRC and "
                           "MD5, every loose file) without asking SmugMug; damaged albums are fetched "
                           "again by the next run")
    how = parser.add_argument_group("how")
    how.add_argument("--workers", type=int, metavar="N",
                     help="parallel downloads (default 4; the other pools are sized to match)")
    how.add_argument("--max-preparing", type=int, metavar="N",
                     help="at most this many albums with SmugMug's archive preparation at once; the "
                          "window grows to it only while downloads wait (default 256)")
    out = parser.add_argument_group("output")
    out.add_argument("--quiet", action="store_true",
                     help="print only errors, and a summary line if the run did not succeed (for "
                          "cron); warnings go to --log-file only")
    out.add_argument("--verbose", action="store_true", help="debug logging")
    out.add_argument("--log-file", metavar="PATH", help="append timestamped log lines (info level) to PATH")
    return parser


def check_args(parser, args):
    """Every cross-option check, in one place."""
    if args.quiet and args.verbose:
        parser.error("--quiet and --verbose do not go together")
    if args.workers is not None and not 1 <= args.workers <= CONFIG_MAXIMUM["workers"]:
        parser.error("--workers must be between 1 and %d" % CONFIG_MAXIMUM["workers"])
    if args.max_preparing is not None and not 1 <= args.max_preparing <= CONFIG_MAXIMUM["max_preparing"]:
        parser.error("--max-preparing must be between 1 and %d" % CONFIG_MAXIMUM["max_preparing"])
    if args.authorize and (args.dry_run or args.verify or args.include or args.exclude):
        parser.error("--authorize does not go with --dry-run, --verify, --include or --exclude")
    if args.verify and args.dry_run:
        parser.error("--verify and --dry-run do not go together")


def read_config_file(path):
    """The config file as a dict, or UsageError naming the problem."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UsageError("config file %s not found (copy config.example.json to config.json "
                         "and fill it in, or run --authorize)" % path)
    except OSError as exc:
        raise UsageError("cannot read config file %s: %s" % (path, exc.strerror or exc))
    try:
        data = json.loads(text)
    except ValueError as exc:
        where = " at line %d column %d" % (exc.lineno, exc.colno) if hasattr(exc, "lineno") else ""
        raise UsageError("config file %s is not valid JSON%s: %s" % (path, where, getattr(exc, "msg", exc)))
    if not isinstance(data, dict):
        raise UsageError("config file %s must hold a JSON object" % path)
    return data


def validate_config(data, path, required=CONFIG_REQUIRED):
    """A Config from the file's dict: each problem is one UsageError line."""
    values = {}
    for key in required:
        if key not in data or data[key] in ("", None):
            raise UsageError("config file %s: %s is missing%s" % (
                path, key, " (run --authorize to fill it in)" if key.startswith("access_key") else ""))
    for key in CONFIG_REQUIRED:
        value = data.get(key, "")
        if not isinstance(value, str):
            raise UsageError("config file %s: %s must be a string" % (path, key))
        if value and PLACEHOLDER_RE.match(value) and key != "output_dir":
            raise UsageError("config file %s: %s still holds the placeholder from config.example.json"
                             % (path, key))
        values[key] = value.strip()
    for key, (kind, default) in CONFIG_OPTIONAL.items():
        value = data.get(key, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, kind):
            raise UsageError("config file %s: %s must be %s" % (
                path, key, "a string" if kind is str else "a number"))
        if kind is not str and value <= 0:
            raise UsageError("config file %s: %s must be greater than 0" % (path, key))
        if key in CONFIG_MAXIMUM and value > CONFIG_MAXIMUM[key]:
            raise UsageError("config file %s: %s must be at most %d" % (path, key, CONFIG_MAXIMUM[key]))
        values[key] = value.strip() if isinstance(value, str) else value
    for key in data:
        if key not in CONFIG_REQUIRED and key not in CONFIG_OPTIONAL:
            log.warning("config file %s: unknown key %r ignored (a typo?)", path, key)
    values["api_base"] = values["api_base"] or DEFAULT_API_BASE
    parts = urllib.parse.urlsplit(values["api_base"])
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError("config file %s: api_base %r is not an http(s) URL" % (path, values["api_base"]))
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise UsageError("config file %s: api_base uses plain http:// on %s; only https is allowed "
                         "(credentials must not cross a network in clear)" % (path, parts.hostname))
    if values["output_dir"]:
        values["output_dir"] = os.path.abspath(os.path.expanduser(values["output_dir"]))
        if os.path.exists(values["output_dir"]) and not os.path.isdir(values["output_dir"]):
            raise UsageError("output_dir %s is not a folder" % values["output_dir"])
    return Config(**values)


def warn_if_readable(path):
    if os.name != "posix":
        return
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s can be read by other users; it holds your SmugMug secrets "
                    "(chmod 600 %s)", path, path)


class RedactingFilter(logging.Filter):
    """Replaces every secret, and the query of every URL, in a log line."""

    def __init__(self, secrets):
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 4]

    def filter(self, record):
        message = record.getMessage()
        if record.exc_info or record.exc_text or record.stack_info:
            # A traceback carries URLs and arguments too: format it here, redacted, and
            # leave nothing for a handler to format unredacted.
            extra = [record.exc_text or (logging.Formatter().formatException(record.exc_info)
                                         if record.exc_info else ""), record.stack_info or ""]
            message = "\n".join([message] + [e for e in extra if e])
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        message = redact_urls(message)
        for secret in self.secrets:
            message = message.replace(secret, "***")
        record.msg, record.args = message, None
        return True


class ConsoleHandler(logging.StreamHandler):
    """Log lines on stderr that clear the status line first."""

    def __init__(self, status):
        super().__init__(sys.stderr)
        self.status = status

    def emit(self, record):
        with self.status.lock:
            self.status.clear()
            super().emit(record)


class ConsoleFormatter(logging.Formatter):
    def format(self, record):
        message = super().format(record)
        if record.levelno >= logging.ERROR:
            return "Error: " + message
        if record.levelno >= logging.WARNING:
            return "Warning: " + message
        return message


def setup_logging(args, status, secrets=()):
    """Configure our logger only (called from main); the libraries stay quiet."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    log.setLevel(logging.DEBUG)
    log.propagate = False
    redact = RedactingFilter(secrets)
    console = ConsoleHandler(status)
    # --quiet (cron): only what needs a person, i.e. errors; warnings go to the log file.
    console.setLevel(logging.ERROR if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    fmt = "[%(threadName)s] %(message)s" if args.verbose else "%(message)s"
    console.setFormatter(ConsoleFormatter(fmt))
    console.addFilter(redact)
    log.addHandler(console)
    if args.log_file:
        try:
            handler = logging.FileHandler(os.path.expanduser(args.log_file), encoding="utf-8")
        except OSError as exc:
            raise UsageError("cannot open log file %s: %s" % (args.log_file, exc.strerror or exc))
        handler.setLevel(logging.DEBUG if args.verbose else logging.INFO)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(threadName)s] %(message)s"))
        handler.addFilter(redact)
        log.addHandler(handler)
    # oauthlib and requests_oauthlib log tokens and signatures at DEBUG; urllib3 logs URLs.
    for name in ("oauthlib", "requests_oauthlib", "urllib3", "requests"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return redact


def update_secrets(redact, config):
    redact.secrets = [s for s in config.secrets() if s and len(s) >= 4]


def read_line(prompt, what):
    """One line from stdin (terminal or pipe); UsageError at end of input."""
    sys.stderr.write(prompt)
    sys.stderr.flush()
    line = sys.stdin.readline() if sys.stdin else ""
    if not line:
        sys.stderr.write("\n")
        raise UsageError("no input: standard input ended before %s was given" % what)
    return line.strip()


def authorize(config_path, data, out=sys.stdout):
    """The OAuth 1.0a PIN flow; writes access_key/access_key_secret into the config."""
    base = (data.get("api_base") or DEFAULT_API_BASE).rstrip("/")
    check = validate_config(dict(data, access_key=data.get("access_key") or "-",
                                 access_key_secret=data.get("access_key_secret") or "-",
                                 output_dir=data.get("output_dir") or "-"),
                            config_path, required=("app_key", "app_key_secret"))
    oauth = OAuth1Session(check.app_key, client_secret=check.app_key_secret, callback_uri="oob")
    services = base + "/services/oauth/1.0a"
    try:
        oauth.fetch_request_token(services + "/getRequestToken", timeout=TIMEOUT)
        url = oauth.authorization_url(services + "/authorize", Access="Full", Permissions="Add")
    except (requests.RequestException, ValueError) as exc:
        raise UsageError("SmugMug refused the app key (check app_key and app_key_secret): %s"
                         % redact_urls(getattr(exc, "description", None) or exc))
    out.write("Open this URL in a browser, log in to SmugMug and allow access:\n\n  %s\n\n" % url)
    out.flush()
    code = read_line("Then type the six-digit code SmugMug shows: ", "the code")
    if not re.fullmatch(r"\d{6}", code):
        raise UsageError("the code must be the six digits SmugMug shows (got %d characters)" % len(code))
    oauth = OAuth1Session(check.app_key, client_secret=check.app_key_secret,
                          resource_owner_key=oauth.token.get("oauth_token"),
                          resource_owner_secret=oauth.token.get("oauth_token_secret"), verifier=code)
    try:
        token = oauth.fetch_access_token(services + "/getAccessToken", timeout=TIMEOUT)
    except (requests.RequestException, ValueError) as exc:
        raise UsageError("SmugMug did not accept the code (wrong or expired? run --authorize again): %s"
                         % redact_urls(getattr(exc, "description", None) or exc))
    data = dict(data, access_key=token.get("oauth_token", ""), access_key_secret=token.get("oauth_token_secret", ""))
    config = validate_config(dict(data, output_dir=data.get("output_dir") or "-"), config_path)
    client = SmugMugClient(config, threading.Event())
    try:
        user = envelope_payload(client.get(API_ROOT + "!authuser"))
    except AuthError as exc:
        raise UsageError("SmugMug rejected the new token: %s" % exc)
    except (ApiError, Interrupted) as exc:
        raise UsageError("could not check the new token: %s" % exc)
    finally:
        client.close()
    write_atomic(config_path, json.dumps(data, indent=2, ensure_ascii=False) + "\n",
                 mode=0o600 if os.name == "posix" else None)
    nickname = user.get("NickName") if isinstance(user, dict) else "?"
    out.write("Authorized as %s; the access token is saved in %s.\n" % (nickname, config_path))
    out.flush()


def create_config(path):
    """A new config file from an app key typed in (when --authorize finds none), mode 0600."""
    key = read_line("No config file %s yet. SmugMug API key: " % path, "the API key")
    secret = read_line("API secret: ", "the API secret")
    data = {"app_key": key, "app_key_secret": secret, "access_key": "", "access_key_secret": "",
            "output_dir": "~/SmugMug-backup"}
    validate_config(dict(data, access_key="-", access_key_secret="-"), path, required=("app_key", "app_key_secret"))
    write_atomic(path, json.dumps(data, indent=2) + "\n", mode=0o600 if os.name == "posix" else None)
    log.info("created %s (output_dir %s: edit it if you like)", path, data["output_dir"])
    return data


def print_summary(summary, options, interrupted=False, stopped=""):
    """The end of a run, in the log (the log file always ends with it); failures as errors.

    Under --quiet only the errors reach the terminal, so cron mails only on trouble."""
    failed = len(summary.failed)
    done = summary.backed_up + summary.unchanged
    not_attempted = max(0, summary.albums_found - done - failed)
    plural = lambda n: "" if n == 1 else "s"
    if interrupted or stopped or summary.write_error:
        log.info("%s after %s: %d album%s done, %d failed, %d not attempted%s.",
                 "Interrupted" if interrupted else "Stopped", human_seconds(summary.seconds), done, plural(done),
                 failed, not_attempted, " (%s)" % (stopped or summary.write_error) if not interrupted else "")
    else:
        log.info("Done in %s: %d album%s backed up (%d part%s, %s), %d unchanged%s.",
                 human_seconds(summary.seconds), summary.backed_up, plural(summary.backed_up), summary.parts,
                 plural(summary.parts), human_bytes(summary.bytes), summary.unchanged,
                 ", %d moved" % summary.moved if summary.moved else "")
    if summary.files_checked or summary.files_fetched or summary.by_file:
        log.info("%d file%s checked against SmugMug's listing, %d fetched on their own, %d album%s saved "
                 "file by file%s.", summary.files_checked, plural(summary.files_checked), summary.files_fetched,
                 len(summary.by_file), plural(len(summary.by_file)),
                 (": " + ", ".join(summary.by_file[:5]) + (" ..." if len(summary.by_file) > 5 else ""))
                 if summary.by_file else "")
    for path, files in sorted(summary.missing.items()):
        log.info("%s: %d file%s not saved:", path, len(files), plural(len(files)))
        for name, why in files[:20]:
            log.info("  %s: %s", name, why)
        if len(files) > 20:
            log.info("  ... and %d more (see its metadata.json)", len(files) - 20)
    if summary.emptied:
        log.info("%d album%s empty on SmugMug now (local files kept): %s", len(summary.emptied),
                 plural(len(summary.emptied)), ", ".join(summary.emptied))
    if summary.gone:
        log.info("%d album%s gone from SmugMug (local files kept):", len(summary.gone), plural(len(summary.gone)))
        for path in summary.gone:
            log.info("  %s", path)
    if summary.failed:
        log.error("%d album%s failed:", failed, plural(failed))
        for path, reason in sorted(summary.failed.items()):
            log.error("  %s: %s", path, reason)
    if options.quiet and (failed or summary.write_error or interrupted or stopped):
        what = ("interrupted" if interrupted else "stopped: %s" % (stopped or summary.write_error)
                if stopped or summary.write_error else "%d album%s failed" % (failed, plural(failed)))
        log.error("smugmug_download: %s (%d backed up, %d unchanged, %d not attempted)", what,
                  summary.backed_up, summary.unchanged, not_attempted)


def print_dry_run_totals(orchestrator, options):
    """The size of the job a real run would do: albums (and the images they hold) by status."""
    counts = orchestrator.dry_counts
    counts["gone"][0] = len(orchestrator.summary.gone)
    shown = [s for s in ("new", "changed", "recheck", "unchanged", "moved", "gone", "skipped")
             if counts[s][0] or s not in ("recheck",)]
    work = sum(counts[s][1] for s in ("new", "changed", "recheck"))
    options.print_line("total: %s; %d image%s in the albums to back up" % (
        ", ".join("%d %s" % (counts[s][0], s) + (" (%d image%s)" % (counts[s][1], "" if counts[s][1] == 1 else "s")
                                                  if counts[s][1] else "")
                  for s in shown), work, "" if work == 1 else "s"))


def run(config, options, status):
    """A backup (or dry run) of the account: the exit code."""
    stop = threading.Event()
    client = SmugMugClient(config, stop)
    state = BackupState(config.output_dir, read_only=options.dry_run)
    lock = None
    if not options.dry_run:
        try:
            os.makedirs(config.output_dir, exist_ok=True)
        except OSError as exc:
            raise UsageError("cannot create output_dir %s: %s" % (config.output_dir, exc.strerror or exc))
        lock = RunLock(config.output_dir).acquire()
    orchestrator = None
    try:
        state.load()
        nickname, root = find_root(client, config)
        log.info("%s account %s into %s", "Checking" if options.dry_run else "Backing up",
                 nickname, config.output_dir)
        orchestrator = Orchestrator(client, config, options, state, status)
        stopped = ""
        try:
            summary = orchestrator.run(root)
        except (KeyboardInterrupt, Interrupted):
            stop.set()
            orchestrator.shutdown(wait=False)
            status.clear()
            orchestrator.walk_complete = False
            orchestrator.finish()
            save_state(state, orchestrator.summary)
            print_summary(orchestrator.summary, options, interrupted=True)
            return EXIT_INTERRUPTED
        except AuthError as exc:           # mid-run: the error, then the summary (the log ends with it)
            stop.set()
            orchestrator.shutdown(wait=False)
            status.clear()
            orchestrator.walk_complete = False
            orchestrator.finish()
            save_state(state, orchestrator.summary)
            log.error("%s", auth_message(exc))
            print_summary(orchestrator.summary, options, stopped="SmugMug rejected the credentials")
            return EXIT_USAGE
        except Unreachable as exc:
            stop.set()
            orchestrator.shutdown(wait=False)
            orchestrator.walk_complete = False
            orchestrator.finish()
            summary, stopped = orchestrator.summary, str(exc)
        else:
            orchestrator.shutdown(wait=True)
        save_state(state, summary)
        unmatched = [p for p in options.includes if p not in orchestrator.include_hits]
        no_match = unmatched and orchestrator.walk_complete and no_match_message(
            unmatched, orchestrator.seen_paths, options.excludes)
        if no_match and not summary.albums_found:
            raise UsageError(no_match)
        status.clear()
        if options.dry_run:
            for path in summary.gone:
                options.print_line("%-9s %s" % ("gone", path))
            print_dry_run_totals(orchestrator, options)
        else:
            print_summary(summary, options, stopped=stopped)
        if no_match:                # the other patterns' albums are done: still a usage error
            raise UsageError(no_match)
        return EXIT_ALBUMS_FAILED if (summary.failed or summary.write_error or stopped) else EXIT_OK
    except NotFound as exc:
        raise UsageError("SmugMug user %r not found: %s" % (config.smugmug_user, exc))
    except ApiError as exc:
        raise UsageError("could not reach the account: %s" % exc)
    finally:
        stop.set()
        client.close()
        state.close()
        if lock:
            lock.release()


def no_match_message(includes, paths, excludes=()):
    """--include that selects nothing: a usage error naming the closest existing paths."""
    hints = []
    for pattern in includes:
        folded, prefix = pattern.casefold(), glob_literal_prefix(pattern).rstrip("/").casefold()
        hints += sorted(p for p in paths if path_matches([folded], p.casefold()) or p.casefold() == prefix)[:3]
        hints += difflib.get_close_matches(pattern.rstrip("/*"), sorted(paths), n=2, cutoff=0.6)
    hints = list(dict.fromkeys(hints))[:4]
    return "--include %s matches no album%s%s (names are case-sensitive)" % (
        " ".join(repr(p) for p in includes), " outside --exclude" if excludes else "",
        "; closest: " + ", ".join(hints) if hints else "")


def save_state(state, summary):
    """The snapshot at the end of a run; a write error there is named, and makes the run fail."""
    try:
        state.save()
    except OSError as exc:
        why = "%s: %s" % (getattr(exc, "filename", None) or state.snapshot_path, exc.strerror or exc)
        log.error("could not save the backup state: %s (the journal keeps what was done)", why)
        summary.write_error = summary.write_error or why


# Verify #####################################################################

def verify_album(output_dir, record, stop, progress):
    """What is wrong with one backed-up album on disk: [(file name, problem)], [] when intact.

    Offline: every part at its recorded size and a sound zip (each entry read
    to its end, its CRC checked and its MD5 taken), the entries and loose files
    the manifest names present with the listed size and MD5.
    """
    folder = os.path.join(output_dir, *record.path.split("/"))
    problems = []
    manifest = None
    if not record.files:
        return problems          # an empty album: an empty folder, nothing to prove
    try:
        with open(os.path.join(folder, MANIFEST_NAME), encoding="utf-8") as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
            raise ValueError("no file list")
    except FileNotFoundError:
        problems.append((MANIFEST_NAME, "manifest missing"))
        manifest = None
    except (OSError, ValueError) as exc:
        problems.append((MANIFEST_NAME, "manifest unreadable (%s)" % exc))
        manifest = None
    entries = {}
    for saved in record.parts:
        path = os.path.join(folder, saved.name)
        try:
            size = os.path.getsize(path)
        except OSError:
            problems.append((saved.name, "part missing"))
            continue
        if size != saved.size:
            problems.append((saved.name, "wrong size (%d bytes, %d saved)" % (size, saved.size)))
            continue
        try:
            for entry in scan_zip(path, saved.name, True, stop, progress):
                entries.setdefault((saved.name, entry.name), entry)
        except BadArchive as exc:
            problems.append((saved.name, str(exc)))
    sizes = {f.name: f.size for f in record.files}
    for item in (manifest or {}).get("files", []):
        if not isinstance(item, dict):
            continue
        name = item.get("FileName") or item.get("ImageKey") or "?"
        md5 = item.get("md5") or item.get("ArchivedMD5") or ""
        size = int_or_none(item.get("size") if "size" in item else item.get("ArchivedSize"))
        if "archive" in item:
            part = item.get("archive")
            if any(p == part for p, _ in problems):
                continue
            entry = entries.get((part, item.get("entry")))
            if entry is None:
                problems.append((part, "entry %s of %s missing" % (item.get("entry"), name)))
            elif size is not None and entry.size != size:
                problems.append((part, "entry %s: %d bytes, %d listed" % (entry.name, entry.size, size)))
            elif md5 and entry.md5 != md5.lower():
                problems.append((part, "MD5 mismatch for file %s" % name))
        elif "file" in item:
            loose = item.get("file")
            path = os.path.join(folder, loose) if isinstance(loose, str) and safe_rel(loose) else None
            try:
                have = os.path.getsize(path) if path else None
            except OSError:
                have = None
            want = size if size is not None else sizes.get(loose)
            if have is None:
                problems.append((loose, "file %s missing" % loose))
            elif want is not None and have != want:
                problems.append((loose, "file %s: %d bytes, %d listed" % (loose, have, want)))
            elif md5:
                try:
                    if md5_of(path, stop, progress) != md5.lower():
                        problems.append((loose, "MD5 mismatch for file %s" % loose))
                except OSError as exc:
                    problems.append((loose, "file %s unreadable (%s)" % (loose, exc.strerror or exc)))
            elif progress:
                progress(have)
    return problems


def verify(config, options, status):
    """--verify: prove the backup against its manifests without asking SmugMug; the exit code."""
    if not os.path.isdir(config.output_dir):
        raise UsageError("output_dir %s does not exist: nothing to verify" % config.output_dir)
    lock = RunLock(config.output_dir).acquire()
    state = BackupState(config.output_dir, read_only=True)     # a bad state file is named, not set aside
    stop = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(max(1, config.workers), "verify")
    try:
        state.load(warn=False)
        if state.unreadable:
            options.print_line("damaged   the backup state %s is %s: the next run checks every album again"
                               % (state.snapshot_path, state.unreadable))
            log.error("smugmug_download --verify: the backup state is %s", state.unreadable)
            return EXIT_ALBUMS_FAILED
        state.read_only = False
        bad_records = sorted(key for key, raw in state.set_aside.items()
                             if not isinstance(raw, dict) or not isinstance(raw.get("path"), str)
                             or is_selected(raw["path"], options.includes, options.excludes))
        if not state.albums and not bad_records:
            raise UsageError("no backup recorded in %s: nothing to verify" % config.output_dir)
        records = sorted((r for r in state.albums.values()
                          if is_selected(r.path, options.includes, options.excludes)), key=lambda r: r.path)
        if not records and not bad_records:
            if options.includes:
                raise UsageError(no_match_message(options.includes, [r.path for r in state.albums.values()],
                                                  options.excludes))
            raise UsageError("--exclude leaves no album to verify")
        total = sum(f.size for r in records for f in r.files)
        checked = [0]
        lock_bytes = threading.Lock()

        def progress(n):
            with lock_bytes:
                checked[0] += n

        started = time.monotonic()
        for key in bad_records:         # set aside on load: the next run checks the album again
            options.print_line("damaged   album %s: its record in the backup state is damaged" % key)
        futures = {pool.submit(verify_album, config.output_dir, r, stop, progress): r for r in records}
        damaged, write_error = len(bad_records), ""
        pending = set(futures)
        try:
            while pending:
                done, pending = concurrent.futures.wait(pending, timeout=STATUS_INTERVAL,
                                                        return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    record = futures[future]
                    try:
                        problems = future.result()
                    except (Interrupted, KeyboardInterrupt):
                        raise
                    except Exception as exc:        # a bug: name the album rather than stop
                        log.debug("checking %s", record.path, exc_info=True)
                        problems = [(MANIFEST_NAME, "could not be checked (%s: %s)" % (type(exc).__name__, exc))]
                    if problems:
                        damaged += 1
                        status.clear()
                        options.print_line("damaged   %s: %s" % (record.path, "; ".join(
                            p if name in p else "%s: %s" % (name, p) for name, p in problems)))
                    names = sorted({name for name, _ in problems})
                    if names != record.damaged and not write_error:
                        try:
                            state.save_album(replace(record, damaged=names))
                        except OSError as exc:
                            write_error = "%s: %s" % (getattr(exc, "filename", None) or state.journal_path,
                                                      exc.strerror or exc)
                            log.error("could not mark damaged albums in the state: %s", write_error)
                elapsed = max(time.monotonic() - started, 0.001)
                status.show("verifying: %s of %s checked at %s/s, %d damaged" % (
                    human_bytes(checked[0]), human_bytes(total), human_bytes(checked[0] / elapsed), damaged))
        except (KeyboardInterrupt, Interrupted):
            stop.set()
            status.clear()
            save_state(state, Summary())
            log.error("interrupted")
            return EXIT_INTERRUPTED
        status.clear()
        summary = Summary(write_error=write_error)
        if not write_error:
            save_state(state, summary)
        seconds = time.monotonic() - started
        incomplete = sum(1 for r in records if not r.complete)
        log.info("Verified %d album%s, %s in %s (%s/s): %s%s.", len(records), "" if len(records) == 1 else "s",
                 human_bytes(checked[0]), human_seconds(seconds), human_bytes(checked[0] / max(seconds, 0.001)),
                 "%d damaged (the next run fetches them again)" % damaged if damaged else "all intact",
                 "; %d album%s files SmugMug did not give (named as missing in the metadata.json)" % (
                     incomplete, " lacks" if incomplete == 1 else "s lack") if incomplete else "")
        if damaged and options.quiet:
            log.error("smugmug_download --verify: %d damaged album%s", damaged, "" if damaged == 1 else "s")
        return EXIT_ALBUMS_FAILED if damaged or summary.write_error else EXIT_OK
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        state.close()
        lock.release()


def auth_message(exc):
    return "SmugMug rejected the credentials: %s. Run --authorize or check config.json" % exc


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt()


def main(argv=None):
    """The command line: parse, validate, run; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    status = StatusLine(sys.stderr, enabled=sys.stderr.isatty() and not args.quiet and not args.dry_run)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        redact = setup_logging(args, status)
        if args.authorize:
            if not os.path.exists(args.config):
                data = create_config(args.config)
            else:
                data = read_config_file(args.config)
            redact.secrets = [str(v) for k, v in data.items() if k in SECRET_KEYS and v]
            authorize(args.config, data)
            return EXIT_OK
        data = read_config_file(args.config)
        if args.output_dir:
            data = dict(data, output_dir=args.output_dir)
        if args.workers:
            data = dict(data, workers=args.workers)
        if args.max_preparing:
            data = dict(data, max_preparing=args.max_preparing)
        config = validate_config(data, args.config)
        update_secrets(redact, config)
        warn_if_readable(args.config)
        if args.verify:
            return verify(config, Options(args), status)
        return run(config, Options(args), status)
    except UsageError as exc:
        status.clear()
        log.error("%s", exc)
        return EXIT_USAGE
    except AuthError as exc:
        status.clear()
        log.error("%s", auth_message(exc))
        return EXIT_USAGE
    except Unreachable as exc:
        status.clear()
        log.error("%s", exc)
        return EXIT_USAGE
    except LockedError as exc:
        log.error("%s", exc)
        return EXIT_LOCKED
    except OutputClosed:
        # Whoever read our output has what they wanted (`--dry-run | head -3`):
        # stop without a word, with the status git and other tools give.
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        status.clear()
        log.error("interrupted")
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    exit_code = main()
    # After an interruption or a stop, a worker thread may still sit in a socket
    # read for up to the read timeout; state is saved and .part files are kept,
    # so leave at once instead of joining it.
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):       # closed by its reader: nothing more to say
            pass
    os._exit(exit_code)
