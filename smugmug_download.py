#!/usr/bin/env python3
"""Back up a whole SmugMug account to a local disk, as album zip archives or as plain files.

The account's folder tree is walked through the SmugMug API v2 (OAuth1-signed)
and kept under `output_dir`: one folder per SmugMug folder and album, each
album's photos in the zip archive(s) SmugMug prepares for it (the zips layout),
or as plain files with XMP sidecars, unpacked from them (the files layout). It is a backup,
not a mirror: a file a run once saved is never deleted or overwritten by a
later run; what a new backup of an album replaces or no longer has goes to
`output_dir/.smugmug_download/versions/<run start>/`, kept `keep_versions_days`
(a version holding the last copy of a photo SmugMug no longer has: `keep_deleted_days`,
by default forever).

Design: a walk pool lists folders; every album found is an AlbumRun, a small
state machine moved through the pools by one orchestrator loop that routes
results and holds no policy of its own. Four owners do the rest:
    Scheduler  what may start now: requests, looks at archives, downloads,
               while the link is up and the API gate open
    Store      every write, rename, move and delete under output_dir,
               journalled so that a crash is finished by the next start
    Link       one view of whether SmugMug answers at all, for every thread
    Reporter   the status line, the log and the summary
The stages, each a plain function in a pool thread:
    request  ask SmugMug for a zip archive of the album (or reuse a fresh one)
    look     look again, paced by what preparations have taken, until Complete
    download stream each part to NAME.part, check it against the listed Size
    check    list the album's files (!images), CRC-test the zips, match them
    fetch    download on its own every file the zips lack (checked by MD5)
then the album's files take their final names together with its metadata.json,
only when every listed file is accounted for. Reruns are incremental: albums
whose timestamps and files match the state record cost no API call beyond the
folder walk (and a rolling recheck: each album is listed again every
`recheck_days`). --verify proves a backup against its manifests offline.
With `layout: files` every file is a plain file instead, unpacked from the zips
(which arrive in .smugmug_download/transport/), dated when taken, with an XMP
sidecar; index.csv at the top lists every file of every album and where it is.

Usage:  .venv/bin/python smugmug_download.py [--config config.json] [--dry-run] ...
"""

import argparse
import bisect
import codecs
import collections
import concurrent.futures
import csv
import datetime
import difflib
import email.utils
import errno
import fnmatch
import functools
import hashlib
import heapq
import itertools
import json
import logging
import math
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
import types
import unicodedata
import urllib.parse
import zipfile
import zlib
from dataclasses import dataclass, field, fields, replace
from http.client import HTTPException, IncompleteRead, RemoteDisconnected
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

__version__ = "1.1.0"

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
    "keep_versions_days": ((int, float), 90),
    "keep_deleted_days": ((int, float), None),
    "recheck_days": ((int, float), 30),
    "unreachable_minutes": ((int, float), 15),
    "layout": (str, "zips"),
    "xmp_sidecars": (str, ""),
}
# Every number is finite and at most this (the flags too): a year for the waits, a century for
# the days; far past any real setting, and far within what a timer can wait.
CONFIG_MAXIMUM = {"workers": 64, "max_preparing": 1000, "archive_timeout_hours": 8760, "poll_seconds": 3600,
                  "poll_max_seconds": 86400, "keep_versions_days": 36500, "keep_deleted_days": 36500,
                  "recheck_days": 36500, "unreachable_minutes": 525600}
# String keys with a fixed set of values ("" for xmp_sidecars: the layout's default).
CONFIG_CHOICES = {"layout": ("zips", "files"), "xmp_sidecars": ("ext", "noext", "none")}
SIDECARS_DEFAULT = {"zips": "none", "files": "ext"}   # XMP sidecars by layout, unless xmp_sidecars says
TRANSPORT_DIR = "transport"              # in STATE_DIR: transport/<AlbumKey>/ holds a files-layout album's zips
CONFIG_ZERO_OK = ("keep_versions_days", "recheck_days",      # 0: versions deleted at once; never recheck;
                  "keep_deleted_days")                       # the last copy of a gone photo too
CONFIG_NULL_OK = ("keep_deleted_days",)                      # null (or absent): forever
CONFIG_FLAGS = ("workers", "max_preparing", "keep_versions_days", "keep_deleted_days",
                "unreachable_minutes")                       # also --flags
CODE_TRIES = 3                       # --authorize: how many times a mistyped code is asked for
SECRET_KEYS = ("app_key_secret", "access_key", "access_key_secret")
# Values shipped in config.example.json, and the shapes such placeholders take.
PLACEHOLDER_RE = re.compile(r"^\s*(<.*>|(paste|your|put)[-_ ].*|x{3,}|change[-_ ]?me)\s*$", re.IGNORECASE)

STATE_DIR = ".smugmug_download"          # inside output_dir
STATE_FILE = "state.json"                # snapshot, replaced atomically
JOURNAL_FILE = "journal.jsonl"           # one line per change since the snapshot
SET_ASIDE_FILE = "journal.set-aside.jsonl"   # journal lines that could not be read, kept for a person
VERSIONS_DIR = "versions"                # in STATE_DIR: versions/<run start>/<path> of replaced files
LOCK_FILE = ".smugmug_download.lock"     # inside output_dir, flock'ed while a run lives
STATE_VERSION = 2                        # 1: parts only; 2: files, manifest, completeness
MANIFEST_NAME = "metadata.json"          # in every album folder: what the album holds, and where
INDEX_NAME = "index.csv"                 # at the top of output_dir: every file of every album, and where
RESERVED_TOP_NAMES = {STATE_DIR.casefold(), LOCK_FILE.casefold(), INDEX_NAME.casefold()}
STAMP_FORMAT = "%Y-%m-%dT%H%M%SZ"        # a run's start (UTC) names its versions folder

# A timeout on every request: connecting should be quick; a busy server may
# think for a while before the first byte of a large listing.
TIMEOUT = (10, 60)
PROBE_TIMEOUT = (5, 10)   # the one request that asks whether SmugMug answers at all
PAGE_COUNT = 100          # children asked per page; the server may clamp it
API_ATTEMPTS = 6          # tries of one API call on 5xx / bad bodies (while the link works)
REDIRECT_HOPS = 5         # redirects followed for one request, each hop signed for its own URL
CONNECT_ATTEMPTS = 2      # quick tries of a refused connect inside one attempt (urllib3 Retry)
LINK_PROBE_FIRST = 1.0    # seconds from a request that got no answer to the first probe of the link
LINK_PROBE_MAX = 10.0     # probes double their spacing up to this: a returning link is seen within it
RATE_LIMIT_ATTEMPTS = 20  # 429s tolerated for one call (each waits its Retry-After)
BACKOFF_BASE = 0.5        # seconds; doubled per attempt, full jitter, capped below
BACKOFF_CAP = 30.0
RETRY_AFTER_CAP = 600.0   # never believe a Retry-After of more than 10 minutes
RATE_LOW_WATER = 10       # X-RateLimit-Remaining under this (or a tenth of the limit, when it is
RATE_LOW_FRACTION = 0.1   # told): calls are few, spread them to the reset, the ones that move bytes first
DOWNLOAD_ATTEMPTS = 5     # tries of one part (resumed with Range where possible), while the link works
NOT_THE_FILE_ATTEMPTS = 2 # answers that are not the file (a login page) before the link counts as refused
LINK_REFRESHES = 2        # fresh links asked for one archive whose links were refused (expired)
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
                "ArchivedMD5", "Title", "Caption", "Keywords", "KeywordArray", "DateTimeOriginal",
                "DateTimeUploaded", "Date", "WebUri",
                "Latitude", "Longitude", "Altitude", "LastUpdated", "Origin", "CollectedFrom", "Serial",
                "Format", "OriginalSize", "OriginalWidth", "OriginalHeight", "ComponentFileTypes")
IMAGE_URIS = ("LargestImage", "LargestVideo")      # the renditions, asked for with _filteruri
# What the manifest keeps of an album (from the walk's expanded Album object).
ALBUM_FIELDS = ("AlbumKey", "NodeID", "Name", "Title", "Description", "Keywords", "WebUri",
                "LastUpdated", "ImagesLastUpdated")
CHUNK_SIZE = 1024 * 1024  # measured: 1 MiB reads cost a fifth of the CPU of 256 KiB ones; constant memory
MAX_NAME_BYTES = 200
STATUS_INTERVAL = 0.1     # the progress line is redrawn at most ten times a second
STATUS_RATE_SPAN = 10.0   # seconds over which the status line's rate is measured
ETA_ARCHIVES = 5          # archives listed before the time left is told (the rest counted at their average)
WAIT_LOG_INTERVAL = 60.0  # a wait is logged when it starts, when it changes, and once a minute
# The preparation window (albums requested and not yet downloading), sized as the run goes.
WINDOW_START = 32         # albums asked for at once before anything is known
WINDOW_FLOOR = 2
WINDOW_STEP = 0.25        # seconds between two sizings of the window
READY_HORIZON = 60.0      # no new request while more than a minute of downloading is prepared or coming
BACKLOG_PER_WORKER = 16   # ... or while this many archives per download worker wait for one (tiny albums)
WALK_AHEAD = 2            # folder listings in flight (or not yet handled) per walk thread: each holds its albums
WALK_WAITING = 2          # no folder is listed while this many albums per max_preparing wait for a request
RATE_SPAN = 5.0           # seconds over which the download rate is measured for pacing
LOOK_FIRST_PROBES = 16    # new albums that look for an archive SmugMug already has before asking for one
# Looks at archives in preparation (see LookPlanner).
SCOUT_GROWTH = 1.2        # before any archive is ready, scout looks at waits growing by this ...
SCOUT_SHARE = 0.006       # ... this share of the albums waiting per second waited (at least one)
SCOUT_EARLY = 0.08        # ... and at least this share of them / the wait (seconds) squared
SCOUT_LIMIT = 2           # a scout round may send this many looks per free look thread
LOOK_STOCK = 1.5          # seconds of downloading queued below which more ready archives are looked for
LOOK_ODDS_IDLE = 0.35     # an album is looked at when its chance of being ready is at least this while
LOOK_ODDS_BUSY = 0.9      # the link has nothing queued, rising to this once LOOK_ODDS_STOCK seconds are
LOOK_ODDS_STOCK = 0.5     # queued (measured in a simulation against a planner told the true spread)
READY_END_REACH = 1.5     # the last archive is not expected later than this many times the longest wait seen
BUSY_RATE_SECONDS = 0.1   # seconds of downloading before their rate is trusted
LOOK_SPARE = 4.0          # ... and to LOOK_ODDS_BUSY as the link's spare time before the last archive is ready grows to this
EXPLORE_SHARE = 0.03      # none likely ready, the link idle: one look, at most once per this share of the wait
WAIT_BINS = [0.0] + [0.25 * 1.04 ** k for k in range(500)]   # waits, in bins growing by 4 % from 0.25 s
LOOK_TICK = 0.02          # the soonest the orchestrator wakes for a due look (a look held back is not a spin)
ESTIMATE_ROUNDS = 30      # rounds of the self-consistent estimate, each from the last


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
    """Writing under output_dir failed. fatal (a full or read-only disk, output_dir or the
    state itself): the run stops new work; otherwise only the album it belongs to fails."""

    def __init__(self, path, exc, fatal=None):
        reason = exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
        super().__init__("%s: %s" % (path, reason))
        self.path = path
        code = exc.errno if isinstance(exc, OSError) else None
        self.fatal = fatal if fatal is not None else code in DISK_ERRNOS


# A full disk, a quota, a file-size limit, a read-only disk: every write will fail.
DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}


class Unreachable(BackupError):
    """SmugMug has not answered for unreachable_minutes: the run stops (exit 1).

    Raised by Link.wait_up() in every thread that waits for the link once the
    outage has lasted the limit. since: the wall-clock time (time.time()) the
    outage began; the message reads "SmugMug unreachable since HH:MM:SS: reason".
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
    keep_versions_days: float = 90
    keep_deleted_days: Optional[float] = None    # None: the last copy of a gone photo is kept forever
    recheck_days: float = 30
    unreachable_minutes: float = 15
    layout: str = "zips"         # "zips": the album's zip parts; "files": every file a plain file
    xmp_sidecars: str = ""       # "ext", "noext", "none"; "": the layout's default

    @property
    def sidecars(self):
        return self.xmp_sidecars or SIDECARS_DEFAULT[self.layout]

    def secrets(self):
        return [getattr(self, k) for k in SECRET_KEYS if getattr(self, k)]


def slotted(cls):
    """The dataclass cls with __slots__ and no __dict__ (dataclass(slots=True) of Python 3.10,
    for 3.9): a record held for each of 10,000 albums costs its fields alone."""
    names = tuple(f.name for f in fields(cls))
    body = {k: v for k, v in cls.__dict__.items() if k not in names + ("__dict__", "__weakref__")}
    made = type(cls)(cls.__name__, cls.__bases__, dict(body, __slots__=names))
    made.__qualname__ = cls.__qualname__
    return made


@dataclass(frozen=True)
class Folder:
    node_id: str
    children_uri: str
    path: Tuple[str, ...]        # cleaned names from output_dir down


@slotted
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
    info: str = ""               # the ALBUM_FIELDS of its Album object as JSON text, for the manifest (one
                                 # string, not one for each: an Album waits for each album found)

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
        """Which archive file this is, whatever order the server lists it in: its URL, name and
        DateAdded; "" when undated (then nothing proves it the same: its NAME.part is never resumed)."""
        return "%s|%s|%s" % (strip_query(self.url), self.file_name, self.date_added) if self.date_added else ""


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
    rendition_uri: str = ""      # !largestimage or !largestvideo (from the listing's Uris, else by Serial)
    fields: tuple = ()           # (field, value) pairs kept in the manifest

    @property
    def version(self):
        """Which edit of the file this is, as far as the listing says (LastUpdated, Serial); "" if not."""
        given = dict(self.fields)
        return "|".join("%s=%s" % (k, given[k]) for k in ("LastUpdated", "Serial") if given.get(k) not in (None, ""))


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
    rendition: bool = False      # SmugMug's largest rendition (!largestimage, !largestvideo), not the upload
    version: str = ""            # ListedFile.version: which edit of it

    @property
    def identity(self):
        """Which file, in which version, this is, where SmugMug says enough to prove it: ImageKey and
        MD5, or ImageKey, size and LastUpdated/Serial; "" when it does not (a rendition made on the
        fly): a NAME.part of such a file is never resumed, since the photo may have been edited."""
        if self.md5:
            return "file|%s|md5:%s" % (self.key, self.md5)
        if self.size is not None and self.version:
            return "file|%s|%d|%s" % (self.key, self.size, self.version)
        return ""


@dataclass(frozen=True)
class AlbumPlan:
    """What the check stage found: where each listed file is, and what to fetch."""
    listing: tuple               # ListedFile, in listing order
    locations: dict              # ImageKey -> {"archive", "entry"} | {"file"} | {"missing"}
    fetch: tuple = ()            # FileTask
    bad_parts: dict = field(default_factory=dict)   # part name -> reason (not a sound zip)
    files_checked: int = 0
    held_before: frozenset = frozenset()   # ImageKeys the previous backup holds (its manifest says where)
    incomplete: str = ""         # the listing was cut short: why (then nothing old is replaced)
    same: dict = field(default_factory=dict)   # parts downloaded byte for byte the same as the file at
                                               # their name -> that file's file_signature() then
    extracted: dict = field(default_factory=dict)   # files layout: file name -> size, unpacked from the
                                                    # parts into NAME.part, MD5-checked
    before: tuple = ()           # (identity, FileName, holder) the previous backup holds (gone_photos)
    kept: Optional[tuple] = None   # planned from the manifest: (name, size) of the parts on disk kept
    former: tuple = ()           # the manifest's former entries (what kept parts hold, no longer current)
    archive: str = ""            # planned from the manifest: why a fresh archive costs less ("" : it does not)


@dataclass
class Summary:
    albums_found: int = 0
    backed_up: int = 0
    unchanged: int = 0
    moved: int = 0
    parts: int = 0               # archive parts downloaded this run, and their bytes
    bytes: int = 0
    files_checked: int = 0
    files_fetched: int = 0       # files fetched on their own this run, and their bytes
    fetched_bytes: int = 0
    renditions: int = 0          # files saved as SmugMug's largest rendition (no original offered)
    versioned: int = 0           # files moved to versions this run
    by_file: List[str] = field(default_factory=list)         # albums saved file by file
    missing: Dict[str, list] = field(default_factory=dict)   # album path -> [(file, reason)]
    emptied: List[str] = field(default_factory=list)         # albums now empty on SmugMug (files kept)
    failed: Dict[str, str] = field(default_factory=dict)     # album path -> reason
    gone: List[str] = field(default_factory=list)
    gone_photos: list = field(default_factory=list)          # [(album path, file, where kept, kind, identity)]
    last_copies_removed: int = 0                             # gone photos whose keep_deleted_days ran out
    write_error: str = ""        # why the run stopped (a full disk, SmugMug unreachable...)
    reached: bool = False        # SmugMug answered the first calls (the account was found)
    cause_shown: str = ""        # the outage's cause, when a wait line on the console named it
    interrupted: bool = False
    seconds: float = 0.0
    waited: Dict[str, float] = field(default_factory=dict)   # what the run waited for -> seconds


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
    """A ListedFile from an AlbumImage object, or None when it names no file.

    Fields are kept as SmugMug gives them (Latitude as a string or a number,
    ComponentFileTypes as a list or an object); sizes are read as integers or
    digit strings. The rendition to save when no original is offered is the
    listing's Uris.LargestVideo / LargestImage where given, else built from the
    ImageKey and its Serial (an edited image is KEY-1)."""
    if not isinstance(obj, dict):
        return None
    key = obj.get("ImageKey")
    if not isinstance(key, str) or not key:
        return None
    uri = obj.get("ArchivedUri")
    md5 = obj.get("ArchivedMD5")
    is_video = obj.get("IsVideo") is True
    serial = int_or_none(obj.get("Serial")) or 0
    kind = "LargestVideo" if is_video else "LargestImage"
    rendition = uri_of(obj, kind) or "%s/image/%s-%d!%s" % (API_ROOT, key, serial, kind.lower())
    kept = [(k, obj[k]) for k in IMAGE_FIELDS if k in obj]
    # URLs without their query: a signed link's query is a credential, never kept
    kept = [(k, strip_query(v) if k == "ArchivedUri" and isinstance(v, str) else v) for k, v in kept]
    uris = {k: strip_query(uri_of(obj, k)) for k in IMAGE_URIS if uri_of(obj, k)}
    if uris:
        kept.append(("Uris", uris))
    return ListedFile(key=key, file_name=str(obj.get("FileName") or ""),
                      is_video=is_video, processing=obj.get("Processing") is True,
                      archived_uri=uri if isinstance(uri, str) else "",
                      archived_size=int_or_none(obj.get("ArchivedSize")),
                      archived_md5=md5.lower() if isinstance(md5, str) else "",
                      rendition_uri=path_and_query(rendition), fields=tuple(kept))


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
    info = json.loads(album.info) if album.info else {}
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
    doc = {"format": "smugmug_download manifest 1", "tool": "smugmug_download %s" % __version__,
           "album": {k: info[k] for k in ALBUM_FIELDS if k in info}, "path": album.rel,
           "parts": [{"file": name, "size": size} for name, size in parts],
           "files": files}
    if plan.former:     # what kept zip parts hold that is no longer current (a backup, not a mirror)
        doc["former"] = list(plan.former)
    return doc


# -- capture dates, XMP sidecars, the index: pure, from a listed file's fields --

def capture_time(fields):
    """When a file was taken, as SmugMug gives it: (ISO 8601 text, epoch seconds) from
    DateTimeOriginal, else DateTimeUploaded, else Date; (None, None) when none parses. The
    offset is used as given (SmugMug reads a camera time without a zone as its own; none given:
    UTC); the text in XMP's form (2019-01-12T21:06:08+01:00), however SmugMug wrote it."""
    for name in ("DateTimeOriginal", "DateTimeUploaded", "Date"):
        moment = parse_time(fields.get(name))
        if moment is not None:
            return moment.isoformat(), moment.timestamp()
    return None, None


def number_or_none(value):
    """A finite float from an API field (a number or a numeric string), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def position(fields):
    """(latitude, longitude, altitude or None) where SmugMug has a place for the file, else None:
    0, 0 is how SmugMug lists a file without one."""
    lat, lon = number_or_none(fields.get("Latitude")), number_or_none(fields.get("Longitude"))
    if lat is None or lon is None or (lat == 0 and lon == 0) or abs(lat) > 90 or abs(lon) > 180:
        return None
    return lat, lon, number_or_none(fields.get("Altitude"))


def keywords_of(fields):
    """The file's keywords: KeywordArray, else (absent or empty) Keywords split on ';' (and ','),
    or as a list."""
    words = fields.get("KeywordArray")
    if not isinstance(words, list) or not words:
        text = fields.get("Keywords")
        words = text if isinstance(text, list) else re.split(r"[;,]", text) if isinstance(text, str) else []
    return [w.strip() for w in words if isinstance(w, str) and w.strip()]


def text_field(fields, name):
    value = fields.get(name)
    return value if isinstance(value, str) else ""


_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_text(text):
    """text as XML element content: & < > " escaped, characters XML 1.0 cannot hold left out."""
    text = _XML_INVALID.sub("", text)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def gps_coordinate(value, positive, negative):
    """XMP's GPSCoordinate form (XMP spec part 2, EXIF schema): DDD,MM.mmmmmmk."""
    degrees, minutes = divmod(abs(value) * 60, 60)
    return "%d,%.6f%s" % (degrees, minutes, positive if value >= 0 else negative)


def xmp_sidecar(fields):
    """The XMP sidecar of a file, from its listed fields: title (dc:title), caption
    (dc:description), keywords (dc:subject), capture time (exif:DateTimeOriginal,
    photoshop:DateCreated) and place (exif:GPSLatitude/GPSLongitude/GPSAltitude) where
    SmugMug has them. UTF-8 text that any XMP reader parses."""
    props = []
    for tag, name in (("dc:title", "Title"), ("dc:description", "Caption")):
        value = text_field(fields, name).strip()
        if value:
            props.append('   <%s>\n    <rdf:Alt>\n     <rdf:li xml:lang="x-default">%s</rdf:li>\n'
                         '    </rdf:Alt>\n   </%s>' % (tag, xml_text(value), tag))
    words = keywords_of(fields)
    if words:
        props.append("   <dc:subject>\n    <rdf:Bag>\n%s\n    </rdf:Bag>\n   </dc:subject>"
                     % "\n".join("     <rdf:li>%s</rdf:li>" % xml_text(w) for w in words))
    taken, _ = capture_time(fields)
    if taken:
        props.append("   <exif:DateTimeOriginal>%s</exif:DateTimeOriginal>" % xml_text(taken))
        props.append("   <photoshop:DateCreated>%s</photoshop:DateCreated>" % xml_text(taken))
    place = position(fields)
    if place:
        lat, lon, alt = place
        props.append("   <exif:GPSVersionID>2.2.0.0</exif:GPSVersionID>")
        props.append("   <exif:GPSLatitude>%s</exif:GPSLatitude>" % gps_coordinate(lat, "N", "S"))
        props.append("   <exif:GPSLongitude>%s</exif:GPSLongitude>" % gps_coordinate(lon, "E", "W"))
        if alt is not None and alt != 0:      # 0: SmugMug's "not known"
            props.append("   <exif:GPSAltitude>%d/1000</exif:GPSAltitude>" % round(abs(alt) * 1000))
            props.append("   <exif:GPSAltitudeRef>%d</exif:GPSAltitudeRef>" % (alt < 0))
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="smugmug_download %s">\n'
            ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
            '  <rdf:Description rdf:about=""\n'
            '    xmlns:dc="http://purl.org/dc/elements/1.1/"\n'
            '    xmlns:exif="http://ns.adobe.com/exif/1.0/"\n'
            '    xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/">\n'
            '%s\n'
            '  </rdf:Description>\n'
            ' </rdf:RDF>\n'
            '</x:xmpmeta>\n') % (__version__, "\n".join(props))


def sidecar_names(files, style, taken=()):
    """{file name: sidecar name} for the plain files of one album folder.

    files: (local name, is a video) in listing order. style "ext": IMG_1.jpg.xmp;
    "noext": IMG_1.xmp, photos first, so that where a photo and a video share a stem
    (IMG_1.jpg, IMG_1.mov) the photo has IMG_1.xmp and the video IMG_1.mov.xmp (the full
    form, which the applications that read IMG_1.xmp find too: see README). A sidecar name
    never equals a file's own name or one in taken (ignoring case); a file whose both
    forms are taken gets none. "none": {}."""
    if style not in ("ext", "noext"):
        return {}
    used = {n.casefold() for n, _ in files} | {n.casefold() for n in taken}
    names = {}
    for name, _video in sorted(files, key=lambda f: f[1]) if style == "noext" else files:
        forms = ([os.path.splitext(name)[0] + ".xmp"] if style == "noext" else []) + [name + ".xmp"]
        for form in forms:
            if form.casefold() not in used and not form.lower().endswith(".part"):
                used.add(form.casefold())
                names[name] = form
                break
    return names


INDEX_COLUMNS = ("status", "album", "FileName", "ImageKey", "file", "archive", "entry", "size", "MD5",
                 "taken", "title", "caption", "keywords", "latitude", "longitude", "web address")
INDEX_STATUS = {"deleted": "deleted on SmugMug", "replaced": "replaced"}


def entry_bytes(item):
    """(size or None, lowercase MD5 or "") a manifest's file entry says its bytes have: a
    rendition's own, else SmugMug's ArchivedSize and ArchivedMD5."""
    md5 = item.get("md5") or item.get("ArchivedMD5")
    return (int_or_none(item.get("size") if "size" in item else item.get("ArchivedSize")),
            md5.lower() if isinstance(md5, str) else "")


def index_row(rel, item, status, base=None):
    """One row of index.csv for a file entry of an album's manifest (rel: the album's path; base:
    the folder its bytes are in, when not the album's own: a versions folder)."""
    base = base or rel
    where = {k: item.get(k) for k in ("file", "archive") if isinstance(item.get(k), str) and safe_rel(item[k])}
    place = position(item)
    size, md5 = entry_bytes(item)
    return [status, rel, text_field(item, "FileName"), text_field(item, "ImageKey"),
            base + "/" + where["file"] if "file" in where else "",
            base + "/" + where["archive"] if "archive" in where else "",
            text_field(item, "entry") if "archive" in where else "",
            "" if size is None else str(size), md5,
            capture_time(item)[0] or "", text_field(item, "Title"), text_field(item, "Caption"),
            "; ".join(keywords_of(item)), "%.8f" % place[0] if place else "", "%.8f" % place[1] if place else "",
            text_field(item, "WebUri")]


def index_rows(doc, rel, gone=False):
    """The rows of index.csv for one album's manifest: each listed file (current; deleted on
    SmugMug when the album is gone from it; missing when SmugMug did not give it), then the
    photos its backup still holds that SmugMug no longer lists or replaced (a "former"
    section, read tolerantly: each entry with its "status" or "why", "deleted" when it says
    nothing)."""
    for item in doc.get("files") or () if isinstance(doc, dict) else ():
        if isinstance(item, dict):
            yield index_row(rel, item, INDEX_STATUS["deleted"] if gone else "missing" if "missing" in item
                            else "current")
    former = doc.get("former") if isinstance(doc, dict) else None
    for item in former if isinstance(former, list) else ():
        if isinstance(item, dict):
            said = str(item.get("status") or item.get("why") or "")
            yield index_row(rel, item, INDEX_STATUS["replaced"] if "replace" in said.lower()
                            else INDEX_STATUS["deleted"])


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


# A query parameter whose name says it is a signature, an expiry, a token or a key: the
# value of a signed link (CDN links carry Signature, Expires, Key-Pair-Id, Policy...).
_SECRET_PARAM = r"[\w.-]*(?:sig|signature|expires?|token|key|policy|credential|secret|hash|hmac|nonce)[\w.-]*"
_SIGNED_QUERY = re.compile(r"\?(?=[^\s'\"<>]*(?<=[?&;])%s=)[^\s'\"<>)]*" % _SECRET_PARAM, re.IGNORECASE)
_SECRET_VALUE = re.compile(r"(?<![\w.-])(%s)=[^\s&;'\"<>)]+" % _SECRET_PARAM, re.IGNORECASE)


def redact_urls(text):
    """text without the secrets links carry: every full URL's query becomes '?...', and so
    does any other query (a bare path's) with a parameter that looks like a signature, an
    expiry or a token; such a NAME=VALUE anywhere else keeps only its name."""
    text = re.sub(r"(https?://[^\s?'\"<>]+)\?[^\s'\"<>)]*", r"\1?...", str(text))
    text = _SIGNED_QUERY.sub("?...", text)
    return _SECRET_VALUE.sub(r"\1=...", text)


def safe_rel(rel):
    """Is rel a relative path of clean components (nothing that could leave output_dir)?"""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return False
    return all(piece not in ("", ".", "..") for piece in rel.split("/"))


def own_name(value):
    """value when it names a file in an album's own folder (a clean name, no folder in it: as a
    manifest or the state names one), else None."""
    return value if safe_rel(value) and "/" not in value else None


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


def iso_now(now=None):
    """A moment (time.time() by default) as SmugMug writes times: ISO 8601, UTC, whole seconds."""
    moment = datetime.datetime.fromtimestamp(time.time() if now is None else now, datetime.timezone.utc)
    return moment.replace(microsecond=0).isoformat()


def run_stamp(now=None):
    """A run's start, UTC, as its versions folder is named: 2026-12-01T031500Z."""
    return time.strftime(STAMP_FORMAT, time.gmtime(time.time() if now is None else now))


def stamp_time(stamp):
    """The epoch seconds a run stamp names; ValueError for a name that is not one."""
    return datetime.datetime.strptime(stamp, STAMP_FORMAT).replace(tzinfo=datetime.timezone.utc).timestamp()


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


def backoff_delay(attempt, rng=random, base=None, cap=None):
    """Exponential backoff with full jitter: uniform in [d/2, d], d = base * 2**attempt, capped
    (BACKOFF_BASE and BACKOFF_CAP unless given)."""
    base = BACKOFF_BASE if base is None else base
    delay = min(BACKOFF_CAP if cap is None else cap, base * (2 ** attempt))
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

# What the network layer makes of a failed request (restic's retrying backend,
# urllib3's Retry): one map, decided from the exception alone. Callers never
# catch transport exceptions themselves.
LINK = "link"     # no answer at all: wait for the link, which costs the request no try
RETRY = "retry"   # an answer, but no good: try again, counting a try
FAIL = "fail"     # this request will not succeed: give up on it


class LinkBroken(BackupError):
    """A download's body was cut off mid-stream (the connection broke)."""


def failure_kind(exc):
    """LINK, RETRY or FAIL for an exception a request raised.

    LINK: refused, reset, closed, DNS, unreachable, a connect or read timeout, a
    body cut off. RETRY: a garbled body (ContentDecodingError), a TLS failure.
    FAIL: anything else (a bad URL, too many redirects)."""
    if isinstance(exc, (requests.exceptions.ContentDecodingError, urllib3.exceptions.DecodeError,
                        requests.exceptions.SSLError, SSLError)):
        return RETRY
    if isinstance(exc, (LinkBroken, requests.ConnectionError, requests.Timeout,
                        requests.exceptions.ChunkedEncodingError, urllib3.exceptions.HTTPError,
                        HTTPException, ConnectionError, TimeoutError, socket.gaierror)):
        return LINK
    return FAIL


class Link:
    """One view, shared by every thread of the run, of whether SmugMug answers at all.

    A request that gets no answer (failure_kind LINK) reports it with failed();
    from then on every request waits in wait_up() while one probe at a time (an
    unsigned GET of the API root: any answer will do) is sent, at once, then
    after 1 s, 2 s, 4 s... at most LINK_PROBE_MAX apart, so that a returning link
    is seen within that. An answer to anything ends the outage. A failure
    counts against its request's tries only if the link turned out to work (no
    probe failed while it lasted: the trouble was that request's own). After
    give_up seconds down, wait_up() raises Unreachable in every thread.
    """

    def __init__(self, probe, stop, give_up, clock=time.monotonic):
        self._cond = threading.Condition(threading.RLock())
        self._probe = probe             # () -> True when SmugMug answered
        self._stop = stop
        self._clock = clock
        self.give_up = give_up
        self.down_since = None          # clock() when the outage began; None while up
        self.since = None               # the same moment as wall-clock time, for messages
        self.reason = ""
        self.outage = 0                 # the number of the current (or last) outage
        self.confirmed = set()          # outages in which a probe failed too: real ones
        self.down_seconds = 0.0         # the run's time without the link, for the summary
        self.gave_up = None             # the Unreachable every thread raises once the limit passed
        self._next_probe = 0.0
        self._delay = 0.0
        self._probing = False

    @property
    def up(self):
        return self.down_since is None

    def failed(self, reason):
        """A request got no answer: the link is in doubt. The outage's number, for counts()."""
        with self._cond:
            if self.down_since is None:
                self.outage += 1
                self.down_since, self.since = self._clock(), time.time()
                self._delay, self._next_probe = 0.0, self.down_since      # the first probe at once
            self.reason = reason
            return self.outage

    def answered(self):
        """SmugMug answered something (any status): the link works."""
        with self._cond:
            if self.down_since is not None:
                self.down_seconds += self._clock() - self.down_since
                self.down_since = None
                self._cond.notify_all()

    def time_down(self):
        """The run's time without the link so far, the outage under way included."""
        with self._cond:
            return self.down_seconds + (self._clock() - self.down_since if self.down_since is not None else 0.0)

    def counts(self, outage):
        """Does a failure seen in this outage count as one of its request's tries?"""
        return outage not in self.confirmed

    def wait_up(self):
        """Return once the link is up, probing it meanwhile; Unreachable once it has been
        down for give_up seconds; Interrupted when the run stops."""
        while True:
            probe = False
            with self._cond:
                if self.gave_up is not None:
                    raise self.gave_up
                if self.down_since is None:
                    return
                now = self._clock()
                if now - self.down_since >= self.give_up:
                    self.gave_up = Unreachable(self.since, self.reason)
                    self._cond.notify_all()
                    raise self.gave_up
                if not self._probing and now >= self._next_probe:
                    self._probing = probe = True
                    outage = self.outage
                else:
                    self._cond.wait(min(0.25, max(0.01, self._next_probe - now)))
            if self._stop.is_set():
                raise Interrupted("stopping")
            if probe:
                answered = False
                try:
                    answered = self._probe()
                finally:
                    with self._cond:
                        self._probing = False
                        if answered:
                            self.answered()
                        else:
                            self.confirmed.add(outage)
                            self._delay = min(max(self._delay * 2, LINK_PROBE_FIRST), LINK_PROBE_MAX)
                            self._next_probe = self._clock() + self._delay

    def wait_after(self, reason):
        """A request got no answer: wait for the link. True when the failure counts as a try."""
        outage = self.failed(reason)
        self.wait_up()
        return self.counts(outage)


# API calls queue at the rate gate by what they do: when calls are scarce (a
# quota running low), those that move bytes soonest go first.
PRIORITY = {"check": 0, "look": 1, "walk": 2, "request": 3}


class RateGate:
    """One gate for every API call of the run: SmugMug's limit is per user.

    A 429's Retry-After (or a busy 5xx's) closes it for everyone. When
    X-RateLimit-Remaining runs low, the calls left are spread until the window
    resets, and the calls waiting go in order of priority (PRIORITY: the listing
    of an album already downloaded, a look at an archive, the walk, then new
    requests), so that a quota is spent where it moves bytes soonest.
    """

    def __init__(self, stop):
        self._cond = threading.Condition()
        self._stop = stop
        self._queue = []                # heap of (priority, seq) of the calls waiting
        self._seq = itertools.count()
        self._not_before = 0.0          # monotonic: no call before this
        self._spacing = 0.0             # while calls are scarce, seconds between two calls ...
        self._spacing_until = 0.0       # ... until the window resets
        self.pressure = 0               # 429s and low-water warnings so far (read by the scheduler)
        self.closed_seconds = 0.0       # how long the gate was closed in all (for the summary)

    def _close_until(self, moment):
        """No call before moment (monotonic); the closed time counted once."""
        now = time.monotonic()
        self.closed_seconds += max(0.0, moment - max(self._not_before, now))
        self._not_before = max(self._not_before, moment)

    def wait(self, priority=PRIORITY["walk"]):
        """Block until the gate is open and this call's turn has come; Interrupted if the run stops."""
        ticket = (priority, next(self._seq))
        with self._cond:
            heapq.heappush(self._queue, ticket)
            try:
                while True:
                    now = time.monotonic()
                    if self._queue[0] == ticket and now >= self._not_before:
                        heapq.heappop(self._queue)
                        if now < self._spacing_until:
                            self._not_before = now + self._spacing
                        self._cond.notify_all()
                        return
                    if self._stop.is_set():
                        raise Interrupted("stopping")
                    self._cond.wait(min(0.25, max(0.005, self._not_before - now)))
            except BaseException:
                if ticket in self._queue:
                    self._queue.remove(ticket)
                    heapq.heapify(self._queue)
                    self._cond.notify_all()
                raise

    def close_for(self, seconds):
        with self._cond:
            self.pressure += 1
            self._close_until(time.monotonic() + seconds)

    def observe(self, headers):
        """Spread the calls left when the server says few are (X-RateLimit-*)."""
        remaining = int_or_none((headers.get("X-RateLimit-Remaining") or "").strip())
        if remaining is None:
            return
        limit = int_or_none((headers.get("X-RateLimit-Limit") or "").strip())
        low = max(RATE_LOW_WATER, int(limit * RATE_LOW_FRACTION) if limit else 0)
        with self._cond:
            if remaining >= low:
                self._spacing_until = 0.0
                return
            try:                          # epoch seconds, or (a value no epoch has) seconds from now
                reset_in = float(headers.get("X-RateLimit-Reset", ""))
                reset_in -= time.time() if reset_in > 1e9 else 0.0
            except (TypeError, ValueError):
                reset_in = 10.0
            reset_in = max(0.0, min(reset_in, RETRY_AFTER_CAP))
            now = time.monotonic()
            if now >= self._spacing_until:
                self.pressure += 1
            self._spacing = reset_in / (remaining + 1)
            self._spacing_until = now + reset_in
            if remaining == 0:
                self._close_until(now + reset_in)

    def resumes(self):
        """When calls flow again (time.time()), while the gate holds them back for more than a
        second: closed by a Retry-After, or spread thin by a quota; else None."""
        with self._cond:
            now = time.monotonic()
            if self._not_before - now > 1.0:
                return time.time() + self._not_before - now
            if now < self._spacing_until and self._spacing > 1.0:
                return time.time() + self._spacing_until - now
            return None


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
    """OAuth1-signed access to the API: one requests.Session per thread, one rate gate, one
    view of the link (shared with the downloads)."""

    def __init__(self, config, stop):
        self.config = config
        self.base = config.api_base.rstrip("/")
        self.stop = stop
        self.gate = RateGate(stop)
        self.link = Link(self.probe, stop, config.unreachable_minutes * 60)
        self.auth = OAuth1(config.app_key, config.app_key_secret,
                           config.access_key, config.access_key_secret,
                           signature_method="HMAC-SHA1", signature_type="AUTH_HEADER")
        self._local = threading.local()
        self._sessions = []
        self._sessions_lock = threading.Lock()

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

    def set_priority(self, priority):
        """The priority at the rate gate of this thread's calls (a pool's initializer)."""
        self._local.priority = priority

    def close(self):
        with self._sessions_lock:
            for sess in self._sessions:
                sess.close()
            self._sessions.clear()

    def url(self, uri):
        return self.base + path_and_query(uri)

    def probe(self):
        """Does SmugMug answer at all? An unsigned GET of the API root: any answer will do."""
        try:
            resp = self.session().get(self.base + API_ROOT, headers={"Accept": "application/json"},
                                      timeout=PROBE_TIMEOUT, allow_redirects=False, auth=lambda request: request)
            resp.close()
            return True
        except Exception:           # whatever it is, SmugMug did not answer
            return False

    def pause(self, tries):
        """The backoff before try number tries + 1; Interrupted if the run stops meanwhile."""
        if self.stop.wait(backoff_delay(tries - 1)):
            raise Interrupted("stopping")

    def get(self, uri, **params):
        return self.call("GET", uri, params)

    def post(self, uri):
        return self.call("POST", uri, {})

    def call(self, method, uri, params):
        """One API call: the JSON body of a 2xx answer, or an exception.

        Redirects on the API host are followed, each hop signed anew. A 2xx
        without a JSON body is {} for a POST (accepted) and for a 204. No answer
        at all waits for the link (failure_kind LINK: no try counted while the
        link is down); 5xx and unreadable answers are retried API_ATTEMPTS times
        with backoff; 429 closes the gate for everyone for its Retry-After; 401
        raises AuthError, 403 Forbidden, 404 NotFound.
        """
        url = self.url(uri)
        tries = throttled = 0
        while True:
            if self.stop.is_set():
                raise Interrupted("stopping")
            self.link.wait_up()
            self.gate.wait(getattr(self._local, "priority", PRIORITY["walk"]))
            try:
                resp = send_following_redirects(self, method, url, {"Accept": "application/json"},
                                                api_only=True, params=params or None)
            except DownloadError as exc:            # a redirect that must not be followed
                raise ApiError(str(exc))
            except Exception as exc:
                kind = failure_kind(exc)
                reason = short_network_error(exc)
                if kind == FAIL:
                    raise ApiError(reason)
                if kind == LINK and not self.link.wait_after(reason):
                    continue                        # the link was down: no try counted
                tries += 1
                if tries >= API_ATTEMPTS:
                    raise ApiError(reason)
                log.debug("%s %s failed (%s), retrying", method, path_and_query(uri).split("?")[0], reason)
                self.pause(tries)
                continue
            self.link.answered()
            self.gate.observe(resp.headers)
            status = resp.status_code
            if status == 429:
                throttled += 1
                # Honour Retry-After, but never hammer a server that keeps saying 429.
                wait = max(parse_retry_after(resp.headers.get("Retry-After")) or 0.0, backoff_delay(throttled - 1))
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
            tries += 1
            if tries >= API_ATTEMPTS:
                raise ApiError(reason, status)
            log.debug("%s %s failed (%s), retrying", method, path_and_query(uri).split("?")[0], reason)
            self.pause(tries)


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


LIST_CHANGED = "SmugMug's count changed while the list was read:"


def list_all(client, link, first=None, expected=None, **extra):
    """list_pages(), read once more when its pages gave different Totals (items added or
    removed on SmugMug while it was read: one may have been skipped)."""
    for attempt in range(2):
        objects, expansions, short = list_pages(client, link, None if attempt else first, expected, **extra)
        if not short.startswith(LIST_CHANGED):
            break
    return objects, expansions, short


def list_pages(client, link, first=None, expected=None, **extra):
    """Every object of a paged list, all pages, each once, in order, and the Expansions of
    every page: (objects, expansions, short). short: "" when the list is whole, else why not
    (fewer objects than its Pages.Total; where no page gives a Total, fewer than expected,
    the count the list's owner gives, such as an album's ImageCount; pages that give different
    Totals: items were added or removed meanwhile, so some may have been skipped).

    first: the answer to link when already had (a POST's). Pages are followed as
    following_page() says, with extra added to each link (a NextPage may leave
    parameters out). Only a 404 or an empty page ends a run of pages guessed from
    Pages.Total (real !images pages carry no NextPage); any other error is raised:
    a list is never cut short in silence. A page that adds nothing new ends the
    listing (a server that ignores start), except an empty page the server
    itself links past.
    """
    objects, expansions, seen, asked, totals = [], {}, set(), set(), {}
    body, guessed, total = first, False, None
    while link:
        if len(asked) >= MAX_PAGES:
            raise ApiError("paging of %s does not end" % path_and_query(link).split("?")[0])
        asked.add(path_and_query(link))
        if body is None:
            try:
                body = client.get(link)
            except NotFound:
                if not guessed:
                    raise
                break               # a page guessed at past the last: the list ends here
        page = as_list(envelope_payload(body))
        response = body.get("Response") if isinstance(body, dict) else None
        pages = response.get("Pages") if isinstance(response, dict) else None
        if isinstance(pages, dict) and int_or_none(pages.get("Total")) is not None:
            total = int_or_none(pages.get("Total"))
            totals[total] = True
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
    short = ""
    if len(totals) > 1:             # items added or removed while it was read: some may be skipped
        short = "%s %s" % (LIST_CHANGED, " then ".join(map(str, totals)))
    elif total is not None and len(objects) < total:
        short = "SmugMug listed %d of %d" % (len(objects), total)
    elif total is None and expected is not None and len(objects) < expected:
        short = "SmugMug listed %d of its %d" % (len(objects), expected)
    return objects, expansions, short


def list_children(client, folder):
    """Every child node of a folder, all pages, with the expanded Album objects: (nodes, expansions, short)."""
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
                   info=json.dumps({k: details[k] for k in ALBUM_FIELDS if k in details}, ensure_ascii=False,
                                   separators=(",", ":")))


def walk_folder(client, folder):
    """Stage of the walk pool: (subfolders, albums, skipped, short) of one folder, names assigned;
    short: why the listing is not whole ("" when it is)."""
    nodes, expansions, short = list_children(client, folder)
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
    return folders, albums, skipped, short


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


def read_archive(listing, album, ticket, reuse_after=None):
    """What one !download listing means for the album: (state, parts, ticket).

    state: 'complete' (every part downloadable), 'preparing', 'error',
    'removed', or 'none' (nothing of ours listed yet). The listing is split
    into archives (archive_sets); the newest one that has its first part is
    chosen and remembered on the ticket by when it was made, and from then on
    only that archive counts. Decided by Status first: a URL is needed only to
    download, so a part in progress without one still counts, and a Complete
    part without one is an error. reuse_after (a datetime): before a request,
    an archive is reused only if dated after it too.
    """
    mine = [p for p in listing if part_key(p) not in ticket.stale]
    if ticket.posted and ticket.not_before:
        floor = parse_time(ticket.not_before)
        mine = [p for p in mine if (parse_time(p.date_added) or floor) >= floor]
    if not ticket.posted:
        changed = album_changed_at(album)
        if reuse_after is not None:
            changed = max(changed or reuse_after, reuse_after)
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


def request_archive(client, album, ticket, look_first, reuse_after=None):
    """Stage of the request pool: (album, state, parts, ticket).

    look_first (a changed album, or one the state remembers asking an archive
    for): list what SmugMug has first; an archive dated after the album's last
    change (and after reuse_after, for a change its timestamps do not show) is
    reused, complete or in preparation, and every other one listed is stale
    from then on. Otherwise, or with a ticket given up on, a new archive is
    asked for.
    """
    album = fetch_details(client, album)
    if album.image_count == 0:
        return album, "empty", [], ticket
    if not ticket.posted:
        existing = list_archives(client, album) if look_first else []
        state, parts, chosen = read_archive(existing, album, ticket, reuse_after)
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
        objects, _, _ = list_all(client, album.uri + "!download", first=first)
    except NotFound:
        return []
    return [archive_part(item) for item in objects]


def look_at_archive(client, album, ticket):
    """Stage of the look pool: one look at the album's archive (read_archive's answer); never sleeps."""
    return read_archive(list_archives(client, album), album, ticket)


def download_part(client, store, part, temp, resume_ok, progress, cancel):
    """Stage of the download pool: one archive part into temp (NAME.part); its size.

    A refusal of the archive's URL means it expired (or the machine slept): ArchiveGone."""
    try:
        return download_file(client, store, part.url, temp, part.size, resume_ok, progress, cancel)
    except Refused as exc:
        raise ArchiveGone("archive no longer available (%s)" % exc)


def fetch_file(client, store, task, temp, resume_ok, progress, cancel):
    """Stage of the download pool: a file the archive lacks into temp; its size.

    Checked against the listed size and MD5; a mismatch is fetched again from
    zero, FILE_ATTEMPTS times in all. Refused propagates: the file is missing."""
    for attempt in range(FILE_ATTEMPTS):
        size = download_file(client, store, task.url, temp, task.size, resume_ok and attempt == 0, progress,
                             cancel)
        if file_is(temp, None, task.md5, client.stop):
            return size
        log.debug("%s: MD5 mismatch (attempt %d)", task.name, attempt + 1)
        store.discard(temp)
    raise DownloadError("%s: bytes differ from SmugMug's MD5 after %d tries" % (task.name, FILE_ATTEMPTS))


def download_file(client, store, url, temp, listed_size, resume_ok, progress, cancel):
    """url streamed into temp, resumed with Range when resume_ok (the same file); the byte
    count checked against the listed size and the answer's own length; flushed to disk.
    Returns the size.

    No answer at all (failure_kind LINK) waits for the link and resumes where it
    stopped, costing no try while the link is down; other failures are tried
    DOWNLOAD_ATTEMPTS times. Raises Refused for a refusal, or for
    NOT_THE_FILE_ATTEMPTS answers that are not the file (a login page where an
    expired link leads)."""
    url = urllib.parse.urljoin(client.base + "/", url)    # a relative URL is on the API host
    if not is_secure_url(url):
        raise DownloadError("refusing to fetch over plain http from %s" % urllib.parse.urlsplit(url).hostname)
    if not resume_ok:
        store.discard(temp)
    tries = wrong = 0
    while True:
        client.link.wait_up()
        try:
            return fetch_to_file(client, store, url, temp, progress, listed_size, cancel)
        except (Refused, LocalWriteError, Interrupted, Abandoned):
            raise
        except NotTheFile as exc:
            # Once may be a hiccup; again, the link is as good as refused (an
            # expired link may answer a login page): the caller looks anew.
            wrong += 1
            reason = redact_urls(exc)
            if wrong >= NOT_THE_FILE_ATTEMPTS:
                raise Refused(reason)
        except DownloadError as exc:
            reason = redact_urls(exc)
        except Exception as exc:
            kind = failure_kind(exc)
            reason = short_network_error(exc) if not isinstance(exc, LinkBroken) else str(exc)
            if kind == FAIL:
                raise DownloadError(reason)
            if kind == LINK and not client.link.wait_after(reason):
                log.debug("%s: %s; resuming now that SmugMug answers again", os.path.basename(temp), reason)
                continue                     # the link was down: no try counted, resume with Range
        tries += 1
        log.debug("%s: %s (try %d)", os.path.basename(temp), reason, tries)
        if tries >= DOWNLOAD_ATTEMPTS:
            raise DownloadError("download failed after %d tries: %s" % (DOWNLOAD_ATTEMPTS, reason))
        client.pause(tries)


def fetch_to_file(client, store, url, temp, progress, listed_size=None, cancel=None):
    """One attempt at completing temp from url; returns the final size.

    The expected length is the listed size when SmugMug gave one (an answer of
    another length, such as a login page, is refused before a byte is written),
    else the answer's Content-Length / Content-Range."""
    offset = store.part_size(temp)
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = "bytes=%d-" % offset
    with send_following_redirects(client, "GET", url, headers, stream=True) as resp:
        client.link.answered()
        status = resp.status_code
        if status == 416 and offset:
            total = parse_unsatisfied_range(resp.headers.get("Content-Range"))
            if total == offset and listed_size in (None, offset):
                return offset       # the .part was already whole
            store.discard(temp)
            raise DownloadError("server refused to resume (416)")
        if status in (401, 403, 404, 410):
            raise Refused("HTTP %d: %s" % (status, error_message(resp)))
        if status == 206 and offset:
            span = parse_content_range(resp.headers.get("Content-Range"))
            if span is None or span[0] != offset:
                store.discard(temp)
                raise DownloadError("server resumed at the wrong offset (%s)" % resp.headers.get("Content-Range"))
            length = content_length(resp.headers)
            answered = span[2] if span[2] is not None else (offset + length if length is not None else None)
            append = True
        elif status == 200:
            offset, append = 0, False
            answered = content_length(resp.headers)
        else:
            raise DownloadError("HTTP %d: %s" % (status, error_message(resp)))
        if "text/html" in resp.headers.get("Content-Type", "").lower():
            raise NotTheFile("got an HTML page instead of the file (HTTP %d)" % status)
        if listed_size is not None and answered is not None and answered != listed_size:
            raise NotTheFile("the server sends %d bytes, SmugMug listed %d" % (answered, listed_size))
        expected = listed_size if listed_size is not None else answered
        written = offset
        with store.open_part(temp, append) as out:
            for chunk in body_chunks(resp):
                if client.stop.is_set():
                    raise Interrupted("stopping")
                if cancel is not None and cancel.is_set():
                    raise Abandoned("archive given up")
                out.write(chunk)
                written += len(chunk)
                progress(len(chunk))
            if expected is None or written == expected:
                out.sync()              # complete on disk before it can take its final name
    if expected is not None and written != expected:
        if written > expected:
            store.discard(temp)
        raise DownloadError("got %d of %d bytes" % (written, expected))
    return written


def body_chunks(resp):
    """The body of a streamed answer in chunks of up to CHUNK_SIZE, each as soon as it arrives.

    urllib3's read1 hands over what the socket has (measured: a fifth of the
    CPU of iter_content, and no waiting for a whole chunk on a slow link); a
    broken connection is LinkBroken (the caller waits for the link and resumes)."""
    raw = resp.raw
    if not hasattr(raw, "read1"):                  # urllib3 1.x
        try:
            yield from resp.iter_content(CHUNK_SIZE)
        except requests.RequestException as exc:
            raise LinkBroken(short_network_error(exc)) from exc
        return
    while True:
        try:
            chunk = raw.read1(CHUNK_SIZE, decode_content=False)   # we ask for identity
        except (urllib3.exceptions.HTTPError, requests.RequestException, HTTPException, OSError) as exc:
            raise LinkBroken(short_network_error(exc)) from exc
        if not chunk:
            return
        yield chunk


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


def zip_directory(path):
    """The file entries (ZipInfo) a zip's directory lists, nothing decompressed; None when it is
    not a readable zip."""
    try:
        with zipfile.ZipFile(path) as archive:
            return [i for i in archive.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError,
            ValueError, OSError):
        return None


def read_zip(path, part_name, visit, stop=None, progress=None, wanted=None):
    """The one reader of what a zip on disk holds: visit(info, name, chunks) for each file entry
    (name: as listed, zip_entry_names; only those wanted(name), when given), chunks its bytes,
    which visit reads to their end (zipfile then checks the entry's CRC). BadArchive names what
    is wrong; anything else visit raises passes through."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.is_dir():
                    continue
                name = zip_entry_names(info)
                if wanted is not None and not wanted(name):
                    continue
                try:
                    with archive.open(info) as member:
                        visit(info, name, read_chunks(member, stop, progress))
                except (zipfile.BadZipFile, EOFError, ValueError) as exc:
                    why = "CRC error" if "CRC" in str(exc) else "unreadable (%s)" % exc
                    raise BadArchive("%s: %s in entry %s" % (part_name, why, name))
    except zipfile.BadZipFile as exc:
        raise BadArchive("%s: not a zip (%s)" % (part_name, exc))
    except (zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError, ValueError) as exc:
        raise BadArchive("%s: unreadable zip (%s)" % (part_name, exc))
    except OSError as exc:
        raise BadArchive("%s: %s" % (part_name, exc.strerror or exc))


def scan_zip(path, part_name, want_md5, stop=None, progress=None):
    """[ZipEntry] of a zip on disk, every entry read to its end so that zipfile
    checks its CRC (and its MD5 taken when asked); nothing is extracted.
    BadArchive names what is wrong."""
    entries = []

    def visit(info, name, chunks):
        digest = hashlib.md5() if want_md5 else None
        for chunk in chunks:
            if digest:
                digest.update(chunk)
        entries.append(ZipEntry(part_name, name, info.file_size, digest.hexdigest() if digest else ""))
    read_zip(path, part_name, visit, stop, progress)
    return entries


def list_images(client, album):
    """Every file of the album (!images, all pages, only the fields used) as ListedFiles, and
    why the listing is not whole ("" when it is): shorter than its Pages.Total, or, with no
    Total given, than the album's ImageCount (which is not trusted over a Total: what it
    counts beside the listing's files is not documented), or its Total changed between pages
    in two listings running (list_all)."""
    extra = {"_filter": ",".join(IMAGE_FIELDS), "_filteruri": ",".join(IMAGE_URIS)}
    objects, _, short = list_all(client, add_query(album.uri + "!images", count=IMAGES_PAGE_COUNT, **extra),
                                 expected=album.image_count, **extra)
    files, seen = [], set()
    for obj in objects:
        found = listed_file(obj)
        if found and found.key not in seen:
            seen.add(found.key)
            files.append(found)
    return files, short and "%s files" % short


def largest_rendition(client, listed):
    """(url, size, md5) of SmugMug's largest rendition of a file (!largestvideo for a video,
    !largestimage for a photo); size None where SmugMug does not say (made on the fly), md5
    "" where it gives none (!largestimage never does)."""
    payload = envelope_payload(client.get(listed.rendition_uri))
    url = payload.get("Url") if isinstance(payload, dict) else None
    if not isinstance(url, str) or not url:
        raise ApiError("no rendition to download")
    md5 = payload.get("MD5")
    return url, int_or_none(payload.get("Size")), md5.lower() if isinstance(md5, str) else ""


@dataclass(frozen=True)
class OldBackup:
    """What an album's check needs of its previous backup (None for a new album)."""
    folder: str                  # where its files are now (after a move)
    loose: frozenset             # names of its files saved on their own
    light: bool = False          # planned from its manifest (a change, a rolling recheck): the zips'
                                 # entries are taken from it, and what costs more goes by an archive
    parts: tuple = ()            # (name, size) of its zip parts, as the state records them
    damaged: frozenset = frozenset()   # names of its files --verify found damaged (never trusted)


# Where a file's bytes are, as the manifest says: a zip part and entry, or a file of its own
# (a rendition with what it was checked against).
HOLDER_KEYS = ("archive", "entry", "file", "rendition", "size", "md5", "transcode")
# What the manifest keeps of a file a kept zip part still holds that is no longer current.
# (with what index.csv gives of every photo: its capture time, place and web address)
FORMER_KEYS = ("FileName", "ImageKey", "IsVideo", "ArchivedSize", "ArchivedMD5", "Title", "Caption",
               "Keywords", "KeywordArray", "DateTimeOriginal", "DateTimeUploaded", "Date", "Latitude", "Longitude",
               "Altitude", "WebUri", "LastUpdated", "Serial")
FORMER_DELETED, FORMER_REPLACED = "deleted on SmugMug", "replaced"


def read_text(path):
    """The text of a UTF-8 file (a manifest, a sidecar, the config). OSError: it cannot be read
    (FileNotFoundError: it is not there); ValueError: it is not UTF-8."""
    with open(path, encoding="utf-8") as f:
        return f.read()


def load_manifest(path):
    """The one reader of metadata.json (an album's, or one in versions): its document, a dict.
    OSError: it cannot be read (FileNotFoundError: it is not there); ValueError: it is not a
    JSON object."""
    doc = json.loads(read_text(path))
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


def read_manifest(path):
    """A metadata.json as a dict, or None (not there, unreadable)."""
    try:
        return load_manifest(path)
    except (OSError, ValueError):
        return None


def manifest_entries(doc):
    """A manifest's file entries: its files, then its former ones (files SmugMug no longer lists,
    or replaced, that a kept zip part still holds); [] for none."""
    out = []
    for section in ("files", "former"):
        items = doc.get(section) if isinstance(doc, dict) else None
        out += [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []
    return out


def previous_manifest(folder):
    """The file entries (manifest_entries) of the metadata.json in folder, or [] (none, unreadable)."""
    return manifest_entries(read_manifest(os.path.join(folder, MANIFEST_NAME)))


def held_keys(folder, entries):
    """The ImageKeys a previous backup holds: its manifest says where, and that file is there."""
    held = set()
    for item in entries:
        where = own_name(item.get("archive") or item.get("file"))
        if isinstance(item.get("ImageKey"), str) and where and os.path.exists(os.path.join(folder, where)):
            held.add(item["ImageKey"])
    return frozenset(held)


def photo_identity(key, md5="", size=None):
    """Which photo, and which bytes of it: "KEY md5:HEX", else "KEY size:N" (no MD5 given), else
    "KEY". What retention and the gone-photo record go by."""
    md5 = md5.lower() if isinstance(md5, str) else ""
    size = int_or_none(size)
    return "%s md5:%s" % (key, md5) if md5 else "%s size:%d" % (key, size) if size is not None else key


def identity_key(identity):
    """The ImageKey of a photo_identity()."""
    return identity.split(" ")[0]


def manifest_photos(doc, keys=None):
    """(identity, FileName, holder) of every photo a manifest says it holds, and where: its
    "files", and any other list of entries with an ImageKey (photos no longer listed that a kept
    part still holds). holder: the part ("archive") or the file ("file") that has its bytes.
    keys: only the photos with these ImageKeys."""
    if not isinstance(doc, dict):
        return
    for section in doc.values():
        for item in section if isinstance(section, list) else ():
            if not isinstance(item, dict) or not isinstance(item.get("ImageKey"), str) or (
                    keys is not None and item["ImageKey"] not in keys):
                continue
            holder = own_name(item.get("archive") if isinstance(item.get("entry"), str) else item.get("file"))
            if holder:
                name = item.get("FileName")
                yield (photo_identity(item["ImageKey"], item.get("ArchivedMD5"), item.get("ArchivedSize")),
                       name if isinstance(name, str) else item["ImageKey"], holder)


def gone_photos(before, listing):
    """The photos an album's previous backup holds (before: (identity, FileName, holder)) that
    SmugMug no longer lists: [(identity, FileName, holder)]. (A photo it lists with other bytes is
    not gone: its old bytes are a version like any other.)"""
    listed = {f.key for f in listing}
    return [p for p in dict.fromkeys(before) if identity_key(p[0]) not in listed]


def held_on_disk(listing, folder, parts, loose):
    """The ImageKeys a previous backup without a manifest (version 1, or deleted) holds, from
    the state's record and the disk: a file whose FileName (or SmugMug's renamed form of it) is
    an entry of one of its zip parts on disk, or one of its files saved on their own."""
    names = set(loose)
    for name, _size in parts:
        names.update(zip_entry_names(i).rsplit("/", 1)[-1] for i in zip_directory(os.path.join(folder, name)) or ())
    return frozenset(f.key for f in listing if f.file_name and (
        f.file_name in names or clean_name(f.file_name, keep_extension=True) in names
        or any(is_renamed_form(n, f.file_name) for n in names)))


def same_file(listed, item):
    """Is this manifest entry the listed file: the same ImageKey and FileName, and the same MD5,
    or where SmugMug gives no MD5, the same size (where given) and LastUpdated and Serial (those
    it gives: null or "" proves nothing)? Never by its name alone."""
    if item.get("ImageKey") != listed.key or item.get("FileName") != listed.file_name:
        return False
    md5 = item.get("ArchivedMD5")
    if bytes_differ(int_or_none(item.get("ArchivedSize")), md5.lower() if isinstance(md5, str) else "",
                    listed.archived_size, listed.archived_md5):
        return False
    if listed.archived_md5:
        return True
    fields = dict(listed.fields)
    stamps = [k for k in ("LastUpdated", "Serial") if fields.get(k) not in (None, "")]
    return bool(stamps) and all(item.get(k) == fields[k] for k in stamps)


def held_by_manifest(listing, previous, sound_parts, folder, stop=None, trusted=None):
    """{ImageKey: where} for the listed files the previous backup holds by their identity
    (same_file): in a zip part on disk that is sound (sound_parts: trusting the manifest's
    record of its entries), or as a file of its own at its recorded size and MD5 (trusted(name):
    at its recorded size, as the parts are; --verify and a recheck read its MD5)."""
    by_key = collections.defaultdict(list)
    for item in previous:
        if isinstance(item.get("ImageKey"), str):
            by_key[item["ImageKey"]].append(item)
    held, used = {}, set()
    for f in listing:
        for item in by_key.get(f.key, ()):
            if not same_file(f, item):
                continue
            part, entry, name = item.get("archive"), item.get("entry"), item.get("file")
            if part in sound_parts and isinstance(entry, str) and (part, entry) not in used:
                used.add((part, entry))
                held[f.key] = {"archive": part, "entry": entry}
                break
            if own_name(name) and ("file", name) not in used:
                rendition = item.get("rendition") is True
                size = int_or_none(item.get("size")) if rendition else f.archived_size
                md5 = (item.get("md5") or "") if rendition else f.archived_md5
                md5 = md5 if isinstance(md5, str) and not (trusted and trusted(name)) else ""
                if file_is(os.path.join(folder, name), size, md5, stop):
                    used.add(("file", name))
                    held[f.key] = {k: item[k] for k in HOLDER_KEYS if k in item and k not in ("archive", "entry")}
                    break
    return held


def former_entries(listing, locations, previous, kept):
    """The manifest's former section: every entry of a kept zip part (kept: names) that no
    listed file is held by now, carried forward from the previous manifest, with its status
    (a file SmugMug no longer lists, or one whose bytes it replaced)."""
    listed = {f.key for f in listing}
    live = {(w.get("archive"), w.get("entry")) for w in locations.values() if "archive" in w}
    out, seen = [], set()
    for item in previous:
        where = (item.get("archive"), item.get("entry"))
        if where[0] in kept and isinstance(where[1], str) and where not in live and where not in seen:
            seen.add(where)
            entry = {k: item[k] for k in FORMER_KEYS if k in item}
            entry.update(archive=where[0], entry=where[1],
                         status=FORMER_REPLACED if item.get("ImageKey") in listed else FORMER_DELETED)
            out.append(entry)
    return tuple(out)


def known_sizes(sizes):
    """Sizes with the unknown (None) counted at the average of the known (1 when none is)."""
    known = [s for s in sizes if s is not None]
    average = sum(known) / len(known) if known else 1
    return [average if s is None else s for s in sizes]


def delta_or_archive(needed, listed, dead, kept):
    """The rule for a changed album planned from its manifest: why it takes a fresh archive,
    or "" (it fetches what it needs on its own). needed: bytes of the files to fetch; listed:
    bytes of every listed file; dead: bytes of the entries of its kept zip parts that hold no
    current file (the manifest's former); kept: bytes of those parts. An archive when the
    files needed are more than half the album (one archive costs less than many files), or
    when more than half of the kept parts' bytes hold no current file (compaction: the zips
    do not fill with the dead)."""
    if kept and dead * 2 > kept:
        return "compaction: %s of its %s of zip parts hold no current file" % (human_bytes(dead), human_bytes(kept))
    if listed and needed * 2 > listed:
        return "%s of its %s to fetch" % (human_bytes(needed), human_bytes(listed))
    return ""


def check_album(client, album, parts, folder, old, plain=False):
    """Stage of the check pool: an AlbumPlan for an album whose parts are on disk.

    parts: [(part name, path)] (NAME.part files, or the final files of an
    earlier backup). Lists the album's files, CRC-tests every entry of every
    part (or, planned from its manifest, takes the entries the manifest
    records in the parts on disk at their recorded size), matches listing to
    entries, and decides for each file the archive lacks where it goes and
    where from: its original (ArchivedUri), else SmugMug's largest rendition (a
    collected photo, a video without an original). A file the previous backup
    holds is found by its identity (same_file), never by its name. The plan
    also says which files the previous backup holds (held_before, from its
    manifest, or without one from its zips on disk), so that nothing it has is
    replaced by a backup that lacks it; and, planned from the manifest, which
    parts are kept, what they hold that is no longer current (former), and
    whether a fresh archive costs less (delta_or_archive).

    plain (the files layout): every listed file is a plain file in folder, named
    over the whole listing; each one a part holds is unpacked into its NAME.part
    (unless the same file is there already), and the parts are not kept.
    """
    listing, short = list_images(client, album)
    previous = previous_manifest(old.folder) if old else []
    if previous:
        held = held_keys(old.folder, previous)
    else:
        held = held_on_disk(listing, old.folder, old.parts, old.loose) if old else frozenset()
    light = bool(old and old.light and previous)
    if old and old.light and not previous and not plain:      # nothing to plan from: an archive
        return AlbumPlan(tuple(listing), {}, held_before=held, incomplete=short, archive="no manifest to plan from")
    want_md5 = plain or any(f.archived_md5 for f in listing)    # plain: an entry replaces a file only
                                                                # when their MD5s differ
    entries, bad = [], {}
    if not light:
        for name, path in parts:
            try:
                entries.extend(scan_zip(path, name, want_md5, client.stop))
            except BadArchive as exc:
                bad[name] = str(exc)
    if bad and plain and old and all(path == os.path.join(folder, name) for name, path in parts):
        # the files layout unpacking an earlier backup's zips: a damaged one costs the files it held,
        # fetched on their own (it goes to versions with the others), not a new archive of the album
        for name, why in sorted(bad.items()):
            log.warning("%s: %s; its files are fetched on their own", album.rel, why)
        parts, bad = [(name, path) for name, path in parts if name not in bad], {}
    if bad:
        return AlbumPlan(tuple(listing), {}, (), bad, held_before=held, incomplete=short)
    found = match_files(listing, entries)
    locations = {k: {"archive": e.part, "entry": e.name} for k, e in found.items()}
    sound = {name for name, _ in parts} if light and not plain else set()
    locations.update(held_by_manifest([f for f in listing if f.key not in locations], previous, sound, folder,
                                      client.stop, light and (lambda name: name not in old.damaged)))
    same = {name: file_signature(os.path.join(folder, name)) for name, path in parts   # read here, off
            if not plain and path != os.path.join(folder, name)
            and same_bytes(os.path.join(folder, name), path, client.stop)}
    lacking = [f for f in listing if f.key not in locations]
    taken = [MANIFEST_NAME, "." + MANIFEST_NAME] + [w["file"] for w in locations.values() if "file" in w]
    if not plain:           # a file of its own is never named like a part, or over a current entry, unzipped
        taken += [n for n, _ in parts] + [w["entry"].rsplit("/", 1)[-1] for w in locations.values() if "entry" in w]
    names = loose_file_names([(f.key, f.file_name) for f in listing if f.key in found or f.key not in locations]
                             if plain else [(f.key, f.file_name) for f in lacking], taken)
    extracted = {}
    if plain:
        try:
            extracted = unpack_files(listing, found, names, dict(parts), folder, old, client.stop)
        except BadArchive as exc:
            return AlbumPlan(tuple(listing), {}, (), {str(exc).split(":", 1)[0]: str(exc)}, held_before=held,
                             incomplete=short)
        locations.update({k: {"file": names[k]} for k in found})
    tasks = []
    for f in lacking:
        if f.processing:
            locations[f.key] = {"missing": "still processing on SmugMug"}
            continue
        url, size, md5, rendition = f.archived_uri, f.archived_size, f.archived_md5, False
        if not url:
            try:
                url, size, md5 = largest_rendition(client, f)
                rendition = True
            except (ApiError, Forbidden) as exc:
                locations[f.key] = {"missing": "SmugMug offers no original and no rendition (%s)" % exc}
                continue
        name = names[f.key]
        locations[f.key] = {"file": name}
        if rendition:       # not the uploaded file: say so, with what it was checked against
            locations[f.key].update(rendition=True, size=size, md5=md5)
            if f.is_video:
                locations[f.key]["transcode"] = True
        # a file saved before with no manifest to say whose it is: its MD5 proves it
        if md5 and old and not previous and name in old.loose and file_is(os.path.join(folder, name), size, md5,
                                                                           client.stop):
            continue
        tasks.append(FileTask(f.key, name, url, size, md5, rendition, f.version))
    kept, former, archive = None, (), ""
    if light:
        live = {w["archive"] for w in locations.values() if "archive" in w}
        kept = tuple((n, s) for n, s in old.parts if n in sound and n in live)
        former = former_entries(listing, locations, previous, {n for n, _ in kept})
        sizes = dict(zip((f.key for f in listing), known_sizes([f.archived_size for f in listing])))
        average = sum(sizes.values()) / len(sizes) if sizes else 1
        dead = sum(int_or_none(e.get("ArchivedSize")) or average for e in former)
        needed = sum(sizes[t.key] for t in tasks)      # as the listing counts them (a rendition's own
                                                        # size is not in its unit: no ArchivedSize)
        if not short:
            archive = delta_or_archive(needed, sum(sizes.values()), dead, sum(s for _, s in kept))
    elif previous and not plain:    # the parts on disk (a recheck) keep what they held before
        on_disk = {n for n, path in parts if path == os.path.join(folder, n)}
        scanned = {(e.part, e.name) for e in entries}
        former = tuple(e for e in former_entries(listing, locations, previous, on_disk)
                       if (e["archive"], e["entry"]) in scanned)
    before = tuple(p for p in manifest_photos({"files": [p for p in previous if "status" not in p]})
                   if os.path.exists(os.path.join(old.folder, p[2]))) if old else ()
    return AlbumPlan(tuple(listing), locations, tuple(tasks), {}, files_checked=len(listing),
                     held_before=held, incomplete=short, same=same, extracted=extracted, before=before,
                     kept=kept, former=former, archive=archive)


def unpack_files(listing, found, names, part_paths, folder, old, stop=None):
    """The files layout: each listed file a part holds (found: ImageKey -> ZipEntry) unpacked
    into folder/NAME.part (names: ImageKey -> NAME), its MD5 checked, unless the previous
    backup has that file there already with the same size and MD5. {NAME: size} unpacked."""
    wanted = collections.defaultdict(dict)
    for f in listing:
        entry = found.get(f.key)
        if entry is None:
            continue
        name, md5 = names[f.key], f.archived_md5 or entry.md5
        if old and name in old.loose and file_is(os.path.join(folder, name), entry.size, md5, stop):
            continue
        wanted[entry.part].setdefault(entry.name, []).append((name, md5))    # a zip may hold one name twice
    extracted = {}
    for part, entries in wanted.items():
        extracted.update(Store.unpack(part_paths[part], part, entries, folder, stop))
    return extracted


def dry_check(client, album, parts, folder, old, plain=False):
    """A dry run's check of a changed album planned from its manifest (nothing is written: no
    part is read, so none unpacked): its AlbumPlan, or None when its files could not be listed."""
    try:
        return check_album(client, album, parts, folder, old, plain)
    except ApiError as exc:
        log.warning("%s: could not list its files: %s", album.rel, exc)
        return None


def ends_a_line(path):
    """Is the file at path empty, missing, or ending in a newline?"""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return True
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"
    except FileNotFoundError:
        return True


def bytes_differ(size, md5, want_size, want_md5):
    """The one comparison of bytes with what they should be: None when they are those, else
    ("size", size) or ("md5", None). size, md5: what they are (md5: its hex, or a function that
    reads it, called only when an MD5 is wanted); want_size None, want_md5 "": not compared."""
    if want_size is not None and size != want_size:
        return ("size", size)
    if want_md5 and (md5() if callable(md5) else md5) != want_md5.lower():
        return ("md5", None)
    return None


def file_mismatch(path, size, md5="", stop=None, progress=None):
    """The one check of a file on disk against a size and an MD5 (each where given; the file is
    there in any case): None when it is that file, else what is wrong: ("missing", None),
    ("size", its size), ("md5", None) or ("unreadable", the OSError). progress(n): the bytes
    read (all of them, when only the size is checked)."""
    try:
        have = os.path.getsize(path)
    except OSError:
        return ("missing", None)
    try:
        wrong = bytes_differ(have, lambda: md5_of(path, stop, progress), size, md5)
    except OSError as exc:
        return ("unreadable", exc)
    if wrong is None and not md5 and progress:
        progress(have)
    return wrong


def file_is(path, size, md5, stop=None):
    """Is the file at path there, with this size and MD5 (where given)?"""
    return file_mismatch(path, size, md5, stop) is None


# Storage ####################################################################
#
# Everything that writes, renames, moves or deletes under output_dir goes
# through the Store: download workers write NAME.part files through it, the
# orchestrator thread commits, moves, versions and cleans up through it. An
# OSError becomes a LocalWriteError naming the path. The primitives below (and
# PartFile, a download's stream) are the only code that writes or removes a
# file: whole files through write_file / write_atomic, lines through
# open_append / append_lines, flushed to disk by sync_file, removed by
# remove_quietly. The state's snapshot and journal, index.csv, the lock and the
# config (--authorize) are written through them too.

def sync_file(f):
    """Flush an open file to disk: what was written survives a power loss."""
    f.flush()
    os.fsync(f.fileno())


def write_file(path, write, mode=None, encoding="utf-8", newline=None):
    """The one writer of a whole file: path created or emptied (mode: its permissions), write(f)
    fills it (a text file), then it is flushed to disk (sync_file); write's result is returned.
    A file left half written by an error is removed. OSError: a write error."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "w", encoding=encoding, newline=newline) as f:
            result = write(f)
            sync_file(f)
        if mode is not None:
            os.chmod(path, mode)
    except BaseException:
        remove_quietly(path)
        raise
    return result


def temp_name(name):
    """.NAME.part: the temporary beside NAME a whole file is written to before it takes its name."""
    return "." + name + ".part"


def write_atomic(path, write, mode=None, encoding="utf-8", newline=None):
    """Replace path: write_file into its temp_name in the same folder (write: the text, str chunks
    written as they come, or a function that writes to the open file), os.replace, fsync the
    folder; write's result.

    The temp file's name is fixed (.NAME.part: like every file not yet complete,
    it ends in .part), so one left by a killed run is taken over by the next
    write rather than left behind."""
    folder = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(folder, temp_name(os.path.basename(path)))
    fill = write if callable(write) else (lambda f: f.write(write)) if isinstance(write, str) \
        else (lambda f: f.writelines(write))
    result = write_file(temp, fill, mode, encoding, newline)
    try:
        os.replace(temp, path)
    except BaseException:
        remove_quietly(temp)
        raise
    fsync_dir(folder)
    return result


def open_append(path):
    """path opened to append lines to (made if missing), the next line starting on a fresh line
    (a last line a crash cut short is left as it is, on its own). OSError: a write error."""
    f = open(path, "a", encoding="utf-8")
    try:
        if not ends_a_line(path):
            f.write("\n")
    except BaseException:
        f.close()
        raise
    return f


def append_lines(f, lines):
    """Lines (each without its newline) appended to a file from open_append, flushed to disk."""
    f.write("".join(line + "\n" for line in lines))
    sync_file(f)


def remove_quietly(path):
    """The one remover of a file: True when removed, False when it was not there. OSError: it
    could not be removed."""
    try:
        os.remove(path)
    except FileNotFoundError:
        return False
    return True


def file_in_the_way(root, rel):
    """The first path on the way to folder rel (relative to root, with /) that is there and is
    no folder (a file where a folder must go), or None."""
    path = root
    for name in rel.split("/") if rel else ():
        path = os.path.join(path, name)
        if not os.path.lexists(path):
            return None
        if not os.path.isdir(path):
            return path
    return None


def in_the_way_message(path):
    return "a file is in the way: %s is where a folder must go" % path


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


def same_entry(a, b):
    """Are paths a and b one file or folder on disk (a case-insensitive disk, as macOS and
    Windows have, gives Beach and beach as one)? False when either is missing."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def spelled_otherwise(path):
    """The name of path's last component as its folder lists it, when that differs from path's
    (a case-insensitive disk found path under another spelling); else None."""
    parent, name = os.path.split(path)
    try:
        names = os.listdir(parent or ".")
    except OSError:
        return None
    if name in names:
        return None
    found = [n for n in names if same_entry(os.path.join(parent, n), path)]
    return found[0] if len(found) == 1 else None


def file_signature(path):
    """(size, mtime in ns) of a file, or None: tells whether it changed since it was looked at."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns


def same_bytes(a, b, stop=None, chunk=1 << 20):
    """Do files a and b hold the same bytes? False when either cannot be read (or on stop)."""
    try:
        if os.path.getsize(a) != os.path.getsize(b):
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while not (stop and stop.is_set()):
                block = fa.read(chunk)
                if block != fb.read(chunk):
                    return False
                if not block:
                    return True
    except OSError:
        pass
    return False


def is_versions_manifest(name):
    """metadata.json, or the " (2)" form a second one in one versions folder takes."""
    return re.fullmatch(r"metadata( \(\d+\))?\.json", name) is not None


def zip_identities(path):
    """The identities of a zip's entries as its directory gives them ("entry:NAME crc:HEX size:N";
    nothing decompressed), for a version no manifest describes; None when it is not a readable zip."""
    entries = zip_directory(path)
    return None if entries is None else {"entry:%s crc:%08x size:%d" % (zip_entry_names(i), i.CRC, i.file_size)
                                         for i in entries}


def file_crc(path):
    """The CRC-32 of a file (-1 when it cannot be read)."""
    crc = 0
    try:
        with open(path, "rb") as f:
            for chunk in read_chunks(f):
                crc = zlib.crc32(chunk, crc)
    except OSError:
        return -1
    return crc


@dataclass(frozen=True)
class VersionFile:
    """A file in a versions folder, and what retention knows of it."""
    rel: str                     # its path under output_dir
    order: tuple                 # (run stamp, rel): later in order is newer
    photos: Optional[list]       # [(identity, FileName)] it holds; None: no photo the tool can tell
    album_key: str = ""          # the album its manifest names
    album_path: str = ""         # the album folder it came from


def retention_unheld(photos, order, held_now, listed, newest):
    """The photos a version holds that nothing else in the backup holds: no current file holds
    these bytes (held_now: identities), or other bytes of a photo SmugMug still lists (listed:
    ImageKeys: the version is an old one of a live photo, kept keep_versions_days like any), and
    no version later in order does (newest: identity -> the order of the last version holding it)."""
    return [(i, name) for i, name in photos if i not in held_now and identity_key(i) not in listed
            and newest.get(i, order) <= order]


def retention_may_go(unheld, since, keep_deleted_days, now):
    """May a version go, the photos only it holds being unheld? Only when there are none, or every
    one has been gone from SmugMug (since: identity -> when first found gone, epoch seconds) for
    keep_deleted_days (None: forever, so never)."""
    if not unheld:
        return True
    if keep_deleted_days is None:
        return False
    return all(i in since and now - since[i] >= keep_deleted_days * 86400 for i, _ in unheld)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def utf8_safe(text):
    """JSON text (ensure_ascii off, so names and captions stay readable) made valid UTF-8: a lone
    UTF-16 surrogate SmugMug's JSON may carry (a caption cut in the middle of an emoji) is written
    as its \\u escape, which reads back as the same string."""
    return _LONE_SURROGATE.sub(lambda m: "\\u%04x" % ord(m.group()), text)


def json_text(obj, **kw):
    """obj as JSON text that is valid UTF-8 (utf8_safe)."""
    return utf8_safe(json.dumps(obj, ensure_ascii=False, **kw))


class PartFile:
    """A NAME.part open for a download worker: OSErrors become LocalWriteError naming the file."""

    def __init__(self, path, append):
        self.path = path
        try:
            self.file = open(path, "ab" if append else "wb")
        except OSError as exc:
            raise LocalWriteError(path, exc) from exc

    def write(self, chunk):
        try:
            self.file.write(chunk)
        except OSError as exc:
            raise LocalWriteError(self.path, exc) from exc

    def sync(self):
        """Flush to disk: complete before it can take its final name."""
        try:
            sync_file(self.file)
        except OSError as exc:
            raise LocalWriteError(self.path, exc) from exc

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.file.close()
        except OSError as error:
            if exc[0] is None:
                raise LocalWriteError(self.path, error) from error


class PathOwners:
    """Who owns each path under output_dir: an album folder or file belongs to one AlbumKey.
    The one place that decides it: from the state's records, and for a folder the state does not
    know, from the metadata.json there (a backup the state lost).

    Like git's index, it is consulted before anything is written, renamed or
    deleted, so that no album ever touches another's files, kept or live; and
    before an album is given its folder (place, adopt).
    Paths compare ignoring case and Unicode form, as some disks do."""

    def __init__(self, records=(), root=None):
        self._owner = {}
        self._at_start = {}             # album folder -> AlbumKey, as the run began (begin)
        self.root = root                # output_dir, where the manifests are read (None: not read)
        for record in records:
            self.claim(record)

    def begin(self, records):
        """The run begins (an earlier run's changes finished): the album folders the records
        hold now stay theirs for place() the whole run, even once their album moves away. Each
        folder's key is the string the owners hold (not a second one for each album)."""
        folders = {self._key(r.path): r.key for r in records}
        self._at_start = {k: folders.pop(k) for k in self._owner if k in folders}
        self._at_start.update(folders)

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

    def on_disk(self, rel):
        """The AlbumKey the metadata.json in folder rel names, or None (none there, or unreadable)."""
        if self.root is None:
            return None
        return manifest_album_key(read_manifest(os.path.join(self.root, *rel.split("/"), MANIFEST_NAME)))

    def place(self, album, record):
        """The album with its local path: the walk's, unless another album owned that folder at
        the start of the run (a kept backup, or one moving away), owns it now, or a metadata.json
        there names another album (a backup the state lost): then with " (NodeID)"."""
        alternative = alternative_path(album)
        if record and record.path in (album.rel, "/".join(alternative)):
            return album if record.path == album.rel else replace(album, path=alternative)
        owner = self._at_start.get(self._key(album.rel)) or self.owner(album.rel) or self.on_disk(album.rel)
        return replace(album, path=alternative) if owner not in (None, album.album_key) else album

    def adopt(self, album):
        """For an album the state does not know: a record rebuilt from its own metadata.json, at
        its path or at its " (NodeID)" one (a lost or damaged state), claimed; or None."""
        for path in (album.path, alternative_path(album)):
            record = record_from_manifest(self.root, replace(album, path=path)) if self.root else None
            if record and self.owner(record.path) in (None, record.key):
                self.claim(record)
                log.info("%s: not in the state; its metadata.json says what is on disk: checking that", record.path)
                return record
        return None


class PathTaken(BackupError):
    """A change would write at a path another album owns: refused, the album fails."""


class Store:
    """The one owner of every write, rename, move and delete under output_dir.

    Mercurial's vfs and transaction: a change to an album's files is a list of
    steps, journalled as one intent (with the album's record as it will be)
    before the first step is taken:
        ("version", REL, VREL)   move a file this backup replaces or no longer has
                                 into versions (VREL: versions/<run start>/REL)
        ("place", TEMP, REL)     a finished TEMP (NAME.part) takes its final name
        ("move", SRC, DST)       a file of a renamed or moved album goes along
    Each step can be taken again: one whose source is gone (or, for a version,
    whose copy is there) is done. Files and the folders touched are fsynced;
    then the record is written. A crash in between is finished by the next
    start (recover()). Nothing is overwritten: a file in the way of a place goes
    to versions first, a move stops short of it. A destination another album
    owns (PathOwners) is refused before anything is done.
    """

    def __init__(self, root, stamp, state=None):
        self.root = root
        folder = os.path.join(root, STATE_DIR, VERSIONS_DIR)
        while os.path.lexists(os.path.join(folder, stamp)):    # a run that started in the same second
            stamp = run_stamp(stamp_time(stamp) + 1)   # takes the next second's name
        self.stamp = stamp               # the run's start, UTC: its versions folder
        self.state = state               # the BackupState that journals each change
        self.owners = PathOwners(state.albums.values() if state else (), root)
        self.versioned = 0               # files moved to versions by this run
        self.blocked = {}                # AlbumKey -> why: a journalled change recover() could not finish
        self.last_versioned = {}         # path -> versions path, of the last change taken
        self._ids = itertools.count(1)

    # -- paths --

    def abs(self, rel):
        return os.path.join(self.root, *rel.split("/"))

    def versions_rel(self, rel, stamp=None):
        return "/".join((STATE_DIR, VERSIONS_DIR, stamp or self.stamp, rel))

    def error(self, rel, exc):
        """A LocalWriteError for an OSError at rel: fatal for a full or read-only disk, and for
        output_dir itself or the state; otherwise it concerns one album."""
        fatal = None                     # decided by the errno: a full or read-only disk
        if not rel or rel.split("/")[0] == STATE_DIR or (
                isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM)
                and not os.access(self.root, os.W_OK)):
            fatal = True
        return LocalWriteError(self.abs(rel) if rel else self.root, exc, fatal=fatal)

    # -- NAME.part files, for download workers (any thread) --

    @staticmethod
    def open_part(path, append):
        return PartFile(path, append)

    @staticmethod
    def part_size(path):
        try:
            return os.path.getsize(path)
        except OSError:
            return 0

    @staticmethod
    def unpack(zip_path, part_name, entries, folder, stop=None):
        """Entries of a zip on disk, each into folder/NAME.part ({entry name: (NAME, MD5 or "")},
        or a list of those where a zip holds two entries of one name), streamed, their MD5
        checked: {NAME: size}. Of entries of one name, each goes to the file its MD5 is listed
        for (or, without one, the next). BadArchive names what is wrong."""
        done = {}
        pending = {entry: [targets] if isinstance(targets, tuple) else list(targets)
                   for entry, targets in entries.items()}

        def visit(info, entry, chunks):
            targets = pending[entry]
            first = os.path.join(folder, targets[0][0]) + ".part"
            digest = hashlib.md5()
            with PartFile(first, False) as out:   # (writes: LocalWriteError)
                for chunk in chunks:
                    digest.update(chunk)
                    out.write(chunk)
                out.sync()
            match = [t for t in targets if not bytes_differ(info.file_size, digest.hexdigest(), None, t[1])]
            if not match:
                return                  # not the file listed (another entry of its name may be)
            name = match[0][0]
            if name != targets[0][0]:
                try:
                    os.replace(first, os.path.join(folder, name) + ".part")
                except OSError as exc:
                    raise LocalWriteError(first, exc) from exc
            done[name] = info.file_size
            targets.remove(match[0])
            if not targets:
                del pending[entry]
        read_zip(zip_path, part_name, visit, stop, wanted=lambda entry: entry in pending)
        if pending:
            count = sum(map(len, pending.values()))
            raise BadArchive("%s: %d entr%s missing or not the file listed (MD5): %s" % (
                part_name, count, "y" if count == 1 else "ies", ", ".join(sorted(pending)[:3])))
        return done

    @staticmethod
    def discard(path):
        """Remove a temporary file (a name ending in .part, and only such a name)."""
        if path.endswith(".part"):
            try:
                remove_quietly(path)
            except OSError as exc:
                raise LocalWriteError(path, exc) from exc

    # -- the orchestrator's changes --

    def make_folders(self, rel, quiet=False):
        """output_dir/rel and the folders above it. quiet (a SmugMug folder's, whose albums fail
        one by one as they come): an error is logged, and raised only when the run must stop."""
        try:
            os.makedirs(self.abs(rel), exist_ok=True)
        except OSError as exc:
            error = self.error(rel, exc)
            if error.fatal or not quiet:
                raise error from exc
            in_way = file_in_the_way(self.root, rel)
            if in_way is None:
                log.error("could not make folder %s", error)
            elif in_way == self.abs(rel):       # (one above it: said for that one already)
                log.error("%s; the albums in it fail", in_the_way_message(in_way))

    def write_temp(self, rel, text):
        """text into .NAME.part beside rel (flushed to disk), to be placed by a step: its rel."""
        folder, name = rel.rsplit("/", 1) if "/" in rel else ("", rel)
        temp = (folder + "/" if folder else "") + temp_name(name)
        try:
            os.makedirs(os.path.dirname(self.abs(temp)), exist_ok=True)
            write_file(self.abs(temp), lambda f: f.write(text))
        except OSError as exc:
            raise self.error(temp, exc) from exc
        return temp

    def commit(self, key, rel, outcome):
        """An album's new backup takes its place, as one change: the files it replaces or no
        longer has go to versions, its manifest and finished NAME.part files their final names,
        and its record (outcome.record) is saved. A new part byte for byte the same as the one
        at its name (outcome.same: compared by the check stage, and unchanged since) leaves
        that one where it is: there is nothing to keep, and a repair that fetched a whole
        album again versions only what differs. Returns how many files went to versions (a
        file already gone from the disk is not one)."""
        same = {n for n, sig in outcome.same.items() if file_signature(self.abs(rel + "/" + n)) == sig}
        steps = [("version", rel + "/" + name) for name in outcome.replaced if name not in same]
        if outcome.manifest is not None:
            steps.append(("place", self.write_temp(rel + "/" + MANIFEST_NAME, outcome.manifest),
                          rel + "/" + MANIFEST_NAME))
        steps += [("place", self.write_temp(rel + "/" + name, text), rel + "/" + name)
                  for name, text in sorted(outcome.sidecars.items())]
        steps += [("place", rel + "/" + name + ".part", rel + "/" + name) for name in outcome.placed
                  if name not in same]
        self.make_folders(rel)
        before = self.versioned
        placing = {name for name in outcome.placed if name not in same}
        self.set_dates(rel, {name + ".part": when for name, when in outcome.dates.items() if name in placing})
        self.apply(key, steps, outcome.record)
        self.set_dates(rel, {name: when for name, when in outcome.dates.items() if name not in placing})
        return self.versioned - before

    def set_dates(self, rel, dates):
        """Each file's modification time in folder rel becomes the time given (when it was taken):
        its bytes are not touched. A file not there is skipped."""
        for name, when in dates.items():
            path = self.abs(rel + "/" + name)
            try:
                if os.path.exists(path) and os.stat(path).st_mtime != when:
                    os.utime(path, (when, when))
            except (OverflowError, ValueError):
                log.debug("%s: %r is no time this system can set", rel + "/" + name, when)
            except OSError as exc:
                raise self.error(rel + "/" + name, exc) from exc

    def move_album(self, record, new):
        """An album renamed or moved on SmugMug: its own files go to folder new (never the folder
        itself, which may hold other albums' files). A file in the way is left where it is and
        named; the record after the move marks it damaged, so it is fetched again. A file
        already at its new path (a rename that only changes case, on a case-insensitive disk:
        the same file under both spellings) stays; its folder then takes the new spelling
        through a temporary name (case_rename_steps)."""
        names = [f.name for f in record.files] + ([MANIFEST_NAME] if record.manifest is not None else [])
        there = [n for n in names if same_entry(self.abs(record.path + "/" + n), self.abs(new + "/" + n))]
        left = [n for n in names if n not in there and (os.path.lexists(self.abs(new + "/" + n))
                                                        or not self.owners.may_write(new + "/" + n, record.key))]
        for name in left:
            log.warning("%s: %s/%s is in the way; %s/%s is left where it is", new, new, name, record.path, name)
        moved = replace(record, path=new, damaged=sorted(set(record.damaged) | set(left)))
        one_folder = same_entry(self.abs(record.path), self.abs(new))
        self.apply(record.key, [("move", record.path + "/" + n, new + "/" + n) for n in names
                                if n not in left and n not in there]
                   + (self.case_rename_steps(record.path, new, names) if one_folder else []), moved)
        if not one_folder:
            self.prune_folder(self.abs(record.path))
        log.info("moved %s -> %s", record.path, new)
        return moved

    def case_rename_steps(self, old, new, names):
        """Steps that give the album's folder, which a case-insensitive disk shows as old, the
        spelling of new: through a temporary name, as such a disk will not rename a folder to
        itself. Only when the folder holds nothing but the album's own files (names)."""
        spelled = spelled_otherwise(self.abs(new))
        if spelled is None or spelled == new.rsplit("/", 1)[-1]:
            return []
        try:
            if not set(os.listdir(self.abs(new))) <= set(names):
                return []
        except OSError:
            return []
        parent = new.rsplit("/", 1)[0] + "/" if "/" in new else ""
        temp = parent + "." + spelled + ".renaming"
        return [("move", parent + spelled, temp), ("move", temp, new)]

    def apply(self, key, steps, record=None):
        """Take steps for album key as one journalled change, then save record (the album's
        record after it). Returns the moves left undone because something was in the way."""
        if key in self.blocked:
            raise PathTaken(self.blocked[key])
        for step in steps:
            if step[0] in ("place", "move") and not self.owners.may_write(step[2], key):
                raise PathTaken("%s belongs to album %s" % (step[2], self.owners.owner(step[2])))
        steps = [("version", step[1], self.versions_rel(step[1])) if step[0] == "version" and len(step) == 2
                 else tuple(step) for step in steps]
        intent = "%s#%d" % (self.stamp, next(self._ids))
        self.journal({"intent": {"id": intent, "key": key, "steps": steps,
                                 "album": record.to_json() if record else None}})
        left, versioned = self.take(steps)
        self.finish(intent, record, versioned)
        return left

    def take(self, steps, replay=False):
        """Do the steps of an intent, each at most once; fsync what they touched. replay: the
        intent of a run that crashed (a version whose copy is there was taken then).
        (moves left in the way, [(rel, versions rel)] moved to versions)."""
        left, versioned, touched = [], [], set()
        for kind, src, dst in steps:
            path = src
            try:
                source, target = self.abs(src), self.abs(dst)
                if kind == "version" and os.path.lexists(target):
                    if replay:
                        versioned.append((src, dst))        # taken before the crash
                        continue
                    dst = self.free_versions_rel(src)       # never over an older copy
                    target = self.abs(dst)
                if not os.path.lexists(source):
                    continue
                path = dst
                if os.path.lexists(target):
                    if kind == "move":
                        left.append((src, dst))
                        continue
                    if kind == "place":                     # never overwrite: the old one to versions
                        kept = self.free_versions_rel(dst)
                        os.makedirs(os.path.dirname(self.abs(kept)), exist_ok=True)
                        os.rename(target, self.abs(kept))
                        versioned.append((dst, kept))
                        touched.add(os.path.dirname(self.abs(kept)))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(source, target) if kind == "place" else os.rename(source, target)
                touched.update((os.path.dirname(source), os.path.dirname(target)))
                if kind == "version":
                    versioned.append((src, dst))
            except OSError as exc:
                raise self.error(path, exc) from exc
        for folder in sorted(touched):
            fsync_dir(folder)
        return left, versioned

    def free_versions_rel(self, rel):
        """This run's versions path for rel, with " (2)", " (3)"... where it is taken."""
        candidate, n = self.versions_rel(rel), 1
        while os.path.lexists(self.abs(candidate)):
            n += 1
            candidate = self.versions_rel(with_suffix(rel, " (%d)" % n, max_bytes=10 ** 6, keep_extension=True))
        return candidate

    def finish(self, intent, record, versioned):
        """The intent's steps are taken: the record is saved, and the versions noted."""
        entry = {"done": intent}
        if record is not None:
            entry["album"] = record.to_json()
            old = self.state.albums.get(record.key)
            if old is not None:
                self.owners.release(old)
            self.owners.claim(record)
        if versioned:
            entry["versions"] = [[src, dst] for src, dst in versioned]
            self.versioned += len(versioned)
        self.last_versioned = dict(versioned)
        self.journal(entry)

    def journal(self, entry):
        """A change in the state's journal, on disk before anything else happens."""
        try:
            self.state.record(entry)
        except OSError as exc:
            raise LocalWriteError(getattr(exc, "filename", None) or self.state.journal_path, exc,
                                  fatal=True) from exc

    def set_gone(self, changes):
        """Photos found gone from SmugMug, or no longer (BackupState.gone_entry), in the journal."""
        entry = self.state.gone_entry(changes)
        if entry:
            self.journal(entry)

    def save_record(self, record):
        """An album's record changes, and no file does (emptied, gone, a recheck that found the same)."""
        old = self.state.albums.get(record.key)
        if old is not None:
            self.owners.release(old)
        self.owners.claim(record)
        self.journal({"album": record.to_json()})

    def recover(self):
        """Finish the changes a crashed run journalled and did not end. One that cannot be finished
        now (a write error) stays in the journal for the next start, and blocks its album
        (self.blocked: AlbumKey -> why): no other change to that album may come before it."""
        for intent, data in sorted(self.state.intents.items()):
            try:
                steps = [tuple(step) for step in data.get("steps") or []]
                if not all(len(step) == 3 and step[0] in ("version", "place", "move")
                           and safe_rel(step[1]) and safe_rel(step[2]) for step in steps):
                    raise ValueError("a damaged entry")
                record = AlbumRecord.from_json(data["key"], data["album"]) if data.get("album") else None
                _left, versioned = self.take(steps, replay=True)
                for kind, src, _dst in steps:
                    if kind == "move":
                        self.prune_folder(os.path.dirname(self.abs(src)))
                self.finish(intent, record, versioned)
                log.info("finished a change an earlier run left half done (%s)",
                         record.path if record else data.get("key"))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("the journal holds a change that cannot be finished (%s): left as it is", exc)
                self.journal({"done": intent})
            except LocalWriteError as exc:
                log.warning("could not finish a change an earlier run left half done: %s", exc)
                self.blocked[data["key"]] = "a change an earlier run left half done cannot be finished " \
                    "(%s): its files are left as they are until it can be" % exc

    def write_index(self, rows):
        """index.csv at the top of output_dir, replaced atomically, written row by row (memory does
        not grow with the account): UTF-8 with a BOM, so that spreadsheets keep accents. It is
        derived from the manifests: not versioned."""
        def write(f):
            writer = csv.writer(f)
            writer.writerow(INDEX_COLUMNS)
            count = 0
            for row in rows:            # (a lone surrogate, which UTF-8 cannot hold: "?")
                writer.writerow([_LONE_SURROGATE.sub("?", c) if isinstance(c, str) else c for c in row])
                count += 1
            return count
        try:
            return write_atomic(self.abs(INDEX_NAME), write, encoding="utf-8-sig", newline="")
        except OSError as exc:
            raise self.error(INDEX_NAME, exc) from exc

    @staticmethod
    def prune_folder(folder):
        """Remove a folder a move left empty (only when nothing at all is left in it)."""
        try:
            os.rmdir(folder)
            fsync_dir(os.path.dirname(folder))
        except OSError:
            pass

    def discard_parts(self, albums=None, keep=()):
        """Remove the NAME.part files no album will resume: those of albums (None: of every album
        but keep's) that no journalled change still needs."""
        pending = {step[1] for intent in self.state.intents.values() for step in intent.get("steps") or []}
        partials = self.state.partials
        for rel, partial in ([(rel, partials[rel]) for key in albums for rel in self.state.partials_of.get(key, ())]
                             if albums is not None else list(partials.items())):
            if (partial.album not in albums if albums is not None else partial.album in keep) \
                    or rel + ".part" in pending:
                continue
            try:
                self.discard(self.abs(rel) + ".part")
            except LocalWriteError as exc:
                log.warning("could not remove %s.part: %s", rel, exc)
            else:
                self.state.set_partial(rel, None)

    def version_stamps(self):
        """[(stamp, its time)] of the runs' versions folders, oldest first (other names: not ours)."""
        try:
            names = sorted(os.listdir(self.abs("/".join((STATE_DIR, VERSIONS_DIR)))))
        except OSError:
            return []
        stamps = []
        for stamp in names:
            try:                          # 2026-12-01T031500Z (-2, -3... from an earlier version)
                if re.fullmatch(r"(-\d+)?", stamp[18:]):
                    stamps.append((stamp, stamp_time(stamp[:18])))
            except ValueError:
                continue
        return stamps

    def prune_versions(self, keep_days, keep_deleted_days=None, now=None, summary=None):
        """Retention, at the end of a run that saw the whole account: a file in a versions folder
        older than keep_days (0: every one) is removed when every photo it holds is held elsewhere
        in the backup (a current file, or a version later than it), or gone from SmugMug longer
        than keep_deleted_days (None: never); a file that holds no photo the tool can tell goes by
        its age alone. A version's manifest goes with the last file beside it. The number of
        versions folders removed whole; gone photos found and last copies removed go to summary."""
        now = time.time() if now is None else now
        stamps = self.version_stamps()
        old = {stamp for stamp, made in stamps if keep_days <= 0 or now - made >= keep_days * 86400}
        candidates = [vf for stamp, _ in stamps if stamp in old for vf in self.version_files(stamp)]
        if not candidates:
            return self.prune_folders(sorted(old))
        gone = {i: (key, photo) for key, photos in self.state.gone.items() for i, photo in photos.items()}
        wanted = set(gone).union(*[{i for i, _ in vf.photos} for vf in candidates if vf.photos])
        entries = {}                      # album path -> identities of zip entries no manifest names
        for vf in candidates:
            for identity, _ in vf.photos or ():
                if identity.startswith("entry:"):
                    entries.setdefault(vf.album_path, set()).add(identity)
        held_now, listed = self.held_now(wanted, entries) if wanted else (set(), set())
        newest = {}                       # identity -> the last version (in order) that holds it
        for vf in candidates + [vf for stamp, _ in stamps if stamp not in old for vf in self.version_files(stamp)]:
            for identity, _ in vf.photos or ():
                if identity in wanted and vf.order > newest.get(identity, ()):
                    newest[identity] = vf.order
        since = {i: parse_time(photo.since).timestamp() for i, (_, photo) in gone.items()}
        candidates.sort(key=lambda v: v.order)
        unheld, found = {}, []
        for vf in candidates:
            unheld[vf.rel] = retention_unheld(vf.photos or (), vf.order, held_now, listed, newest)
            for identity, name in unheld[vf.rel]:
                if identity not in since:          # a last copy no run recorded: found gone now
                    photo = GonePhoto(name, iso_now(now), "unlisted", vf.rel)
                    found.append((vf.album_key, identity, photo))
                    gone[identity], since[identity] = (vf.album_key, photo), now
                    if summary is not None:
                        summary.gone_photos.append((vf.album_path, name, vf.rel, photo.kind, identity))
        self.set_gone(found)
        removed, kept, dropped = [], set(), set()
        for vf in candidates:
            if not retention_may_go(unheld[vf.rel], since, keep_deleted_days, now):
                kept.update(i for i, _ in vf.photos or ())
                continue
            try:
                remove_quietly(self.abs(vf.rel))
            except OSError as exc:
                log.warning("could not remove the old version %s: %s", self.abs(vf.rel), exc.strerror or exc)
                kept.update(i for i, _ in vf.photos or ())
                continue
            removed.append(vf.rel)
            dropped.update(i for i, _ in unheld[vf.rel])
        if removed:
            self.journal({"pruned_files": removed})
        lost = [i for i in gone if i not in held_now and identity_key(i) not in listed and i not in kept
                and not (i in newest and newest[i][0] not in old)]
        back = [i for i in gone if identity_key(i) in listed]     # listed again (in another album, say)
        self.set_gone([(gone[i][0], i, None) for i in lost + back])   # no copy left, or not gone: forgotten
        last = len(dropped.intersection(lost))
        if summary is not None:
            summary.last_copies_removed += last
        if last:
            log.info("removed the last copy of %d photo%s gone from SmugMug more than keep_deleted_days (%g) "
                     "ago", last, plural(last), keep_deleted_days)
        gone_from = set(removed)
        count = sum(1 for vf in candidates if vf.photos is not None and vf.rel not in gone_from)
        if count:
            log.info("kept %d version%s older than keep_versions_days: %s the last copy of a photo",
                     count, plural(count), "it holds" if count == 1 else "each holds")
        return self.prune_folders(sorted(old))

    def prune_folders(self, stamps):
        """In the old versions folders: a manifest with no file left beside it goes (nothing needs it
        to be understood), then every empty folder; a versions folder left empty is removed and
        journalled. The number of versions folders removed."""
        top = self.abs("/".join((STATE_DIR, VERSIONS_DIR)))
        removed = 0
        for stamp in stamps:
            manifests = []
            for dirpath, _dirs, names in sorted(os.walk(os.path.join(top, stamp)), reverse=True):
                if names and all(is_versions_manifest(n) for n in names):
                    for name in names:
                        try:
                            remove_quietly(os.path.join(dirpath, name))
                            manifests.append(os.path.relpath(os.path.join(dirpath, name), self.root))
                        except OSError as exc:
                            log.warning("could not remove the old version %s: %s", os.path.join(dirpath, name),
                                        exc.strerror or exc)
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass
            if os.path.lexists(os.path.join(top, stamp)):
                if manifests:
                    self.journal({"pruned_files": [m.replace(os.sep, "/") for m in manifests]})
                continue
            self.journal({"pruned": stamp})
            removed += 1
        return removed

    def version_files(self, stamp):
        """[VersionFile] of one versions folder, each with the photos it holds."""
        origin = {v[1]: v[0] for v in self.state.versions if v[2] == stamp}
        keys = {r.path: k for k, r in self.state.albums.items()}
        found = []
        for dirpath, dirs, names in os.walk(self.abs("/".join((STATE_DIR, VERSIONS_DIR, stamp)))):
            dirs.sort()
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            manifests, holds, sizes, album_key = [n for n in names if is_versions_manifest(n)], {}, {}, ""
            for name in manifests:
                doc = read_manifest(os.path.join(dirpath, name))
                if doc is None:
                    continue
                if isinstance(doc.get("album"), dict):
                    album_key = album_key or str(doc["album"].get("AlbumKey") or "")
                for identity, file_name, holder in manifest_photos(doc):
                    holds.setdefault(holder, []).append((identity, file_name))
                for part in doc.get("parts") or []:
                    if isinstance(part, dict) and isinstance(part.get("file"), str):
                        sizes.setdefault(part["file"], set()).add(int_or_none(part.get("size")))
            for name in sorted(n for n in names if not is_versions_manifest(n)):
                vrel = rel + "/" + name
                src = origin.get(vrel, rel.split("/", 3)[3] + "/" + name if rel.count("/") >= 3 else name)
                holder, path = src.rsplit("/", 1)[-1], os.path.join(dirpath, name)
                album_path = src.rsplit("/", 1)[0] if "/" in src else ""
                photos = holds.get(holder)
                if photos is not None and holder in sizes and Store.part_size(path) not in sizes[holder]:
                    photos = None           # not the part its manifest describes
                if photos is None:          # no manifest names it: a zip is read for its entries
                    entries = zip_identities(path)
                    photos = None if entries is None else [(i, i.split(" crc:")[0][6:]) for i in entries]
                found.append(VersionFile(vrel, (stamp, vrel), photos, album_key or keys.get(album_path, ""),
                                         album_path))
        return found

    def held_now(self, wanted, entries):
        """(of the identities wanted, those a current file holds; the ImageKeys of theirs that
        SmugMug lists and a current file holds, whatever its bytes): as each album's manifest says
        (read one at a time), the file there and not found damaged; and zip entries no manifest
        named (entries: album path -> identities), in that album's current parts or its loose files
        of the same name, size and CRC."""
        held, keys = set(), {identity_key(i) for i in wanted}
        listed = set()
        for record in list(self.state.albums.values()):
            folder = self.abs(record.path)
            doc = read_manifest(os.path.join(folder, MANIFEST_NAME)) or {}
            for name, section in doc.items():
                for identity, _name, holder in manifest_photos({name: section}, keys):
                    if holder in record.damaged or not os.path.exists(os.path.join(folder, holder)):
                        continue
                    if identity in wanted:
                        held.add(identity)
                    if name == "files" and record.image_count != 0:   # SmugMug lists it (other sections,
                        listed.add(identity_key(identity))                 # an album emptied: no longer)
            want = entries.get(record.path)
            for f in record.files if want else ():
                path = os.path.join(folder, f.name)
                if f.name in record.damaged:
                    continue
                if f.kind == "archive":
                    held.update((zip_identities(path) or set()) & want)
                elif any(i.startswith("entry:") and i.rsplit(" size:", 1)[1] == str(f.size) and
                         i.split(" crc:")[0][6:].rsplit("/", 1)[-1] == f.name for i in want):
                    crc = file_crc(path)
                    held.update(i for i in want if i == "entry:%s crc:%08x size:%d" % (
                        i.split(" crc:")[0][6:], crc, f.size))
        return held, listed


# State ######################################################################

@slotted
@dataclass
class SavedFile:
    """One file of an album's backup, in the album's folder."""
    name: str
    size: int
    kind: str = "archive"        # "archive" (a zip part), "file" (a plain file), "sidecar" (a file's XMP)


@slotted
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
    damaged: List[str] = field(default_factory=list)   # what --verify found wrong (none read: ())
    listed: str = ""             # when its files were last listed (UTC, ISO 8601): the rolling recheck
    image_count: Optional[int] = None   # ImageCount when backed up: the timestamps have whole seconds,
                                        # so a count that moved is a change they may not show

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
            raw = data.get("parts") or []
            if not isinstance(raw, list):
                raise ValueError("parts")
            raw = [{"name": p.get("FileName"), "size": p.get("size")} if isinstance(p, dict) else p for p in raw]
        if not isinstance(raw, list):
            raise ValueError("files")
        files = []
        for item in raw:
            if not isinstance(item, dict):
                raise ValueError("files")
            name, size, kind = item.get("name"), item.get("size"), item.get("kind", "archive")
            if not own_name(name):
                raise ValueError("files.name")
            if int_or_none(size) is None or isinstance(size, str):
                raise ValueError("files.size")
            if kind not in ("archive", "file", "sidecar"):
                raise ValueError("files.kind")
            files.append(SavedFile(name, size, sys.intern(kind)))
        manifest = data.get("manifest")
        if manifest is not None and (int_or_none(manifest) is None or isinstance(manifest, str)):
            raise ValueError("manifest")
        complete, damaged = data.get("complete", True), data.get("damaged", [])
        if not isinstance(complete, bool):
            raise ValueError("complete")
        if not isinstance(damaged, list) or not all(isinstance(d, str) for d in damaged):
            raise ValueError("damaged")
        listed = data.get("Listed") or ""
        if not isinstance(listed, str) or (listed and parse_time(listed) is None):
            raise ValueError("Listed")
        count = data.get("ImageCount")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
            raise ValueError("ImageCount")
        return cls(key, strings["NodeID"], strings["path"], strings["LastUpdated"], strings["ImagesLastUpdated"],
                   files[:], manifest, complete, list(damaged) if damaged else (),       # (no spare room: a
                   sys.intern(listed), count)                # record each album; Listed one string a second)

    def to_json(self):
        return {"AlbumKey": self.key, "NodeID": self.node_id, "path": self.path,
                "LastUpdated": self.last_updated, "ImagesLastUpdated": self.images_last_updated,
                "files": [{"name": f.name, "size": f.size, "kind": f.kind} for f in self.files],
                # the archive parts, as version 1 wrote them (and scripts may read them)
                "parts": [{"FileName": f.name, "size": f.size} for f in self.parts],
                "manifest": self.manifest, "complete": self.complete, "damaged": self.damaged,
                "Listed": self.listed, "ImageCount": self.image_count}

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


def _is_str_list(value, lengths):
    return isinstance(value, list) and len(value) in lengths and all(isinstance(x, str) for x in value)


def journal_entry_problem(entry):
    """Why entry cannot be a journal entry (BackupState._apply), naming the field; "" when it can.
    The fields it has must each have their shape (a record inside "album" is judged apart, by
    AlbumRecord.from_json); a field it does not know is left alone (a newer version's)."""
    if not isinstance(entry, dict):
        return "not an object"
    known = ("album", "drop", "partial", "requested", "intent", "done", "versions", "pruned", "pruned_files",
             "gone")
    if not any(k in entry for k in known):
        return "no field this version knows"
    if "album" in entry:
        raw = entry["album"]
        key = entry.get("key") or (raw.get("AlbumKey") if isinstance(raw, dict) else None)
        if not isinstance(key, str) or not key:
            return "album"
    for name in ("drop", "done", "pruned"):
        if name in entry and not isinstance(entry[name], str):
            return name
    partial = entry.get("partial", ["", None])
    if not (isinstance(partial, list) and len(partial) == 2 and isinstance(partial[0], str)
            and isinstance(partial[1], (str, dict, type(None)))):
        return "partial"
    requested = entry.get("requested", ["", True])
    if not (isinstance(requested, list) and len(requested) == 2 and isinstance(requested[0], str)
            and isinstance(requested[1], bool)):
        return "requested"
    intent = entry.get("intent", {"id": "", "key": "", "steps": []})
    if not (isinstance(intent, dict) and isinstance(intent.get("id"), str) and isinstance(intent.get("key"), str)
            and isinstance(intent.get("steps"), list) and all(_is_str_list(x, (3,)) for x in intent["steps"])
            and isinstance(intent.get("album"), (dict, type(None)))):
        return "intent"
    versions = entry.get("versions", [])
    if not (isinstance(versions, list) and all(_is_str_list(x, (2, 3)) for x in versions)):
        return "versions"
    if not _is_str_list(entry.get("pruned_files", []), range(1 << 62)):
        return "pruned_files"
    gone = entry.get("gone", [])          # [[AlbumKey, photo identity, GonePhoto or None]...]
    if not (isinstance(gone, list) and all(isinstance(x, list) and len(x) == 3 and _is_str_list(x[:2], (2,))
                                           and isinstance(x[2], (dict, type(None))) for x in gone)):
        return "gone"
    return ""
@dataclass(frozen=True)
class GonePhoto:
    """A photo (these bytes of it) SmugMug no longer has, whose copy the backup keeps: since when
    (the run that first found it gone: keep_deleted_days counts from there), and where it was kept."""
    file_name: str
    since: str                   # UTC, ISO 8601
    kind: str = "deleted"        # "deleted" on SmugMug (found by a backup of its album), or
                                 # "unlisted": a version's photo no current file holds, found by retention
    where: str = ""              # the file that held it then (a versions path, or a kept part)

    KINDS = ("deleted", "unlisted")

    @classmethod
    def from_json(cls, identity, data):
        """A valid record, or ValueError naming the bad field."""
        if not isinstance(identity, str) or not identity or "\n" in identity:
            raise ValueError("identity")
        if not isinstance(data, dict):
            raise ValueError("not an object")
        name, since, kind, where = (data.get(k) for k in ("FileName", "Since", "Kind", "Where"))
        if not isinstance(name, str):
            raise ValueError("FileName")
        if not isinstance(since, str) or parse_time(since) is None:
            raise ValueError("Since")
        if kind not in cls.KINDS:
            raise ValueError("Kind")
        if where is not None and not isinstance(where, str):
            raise ValueError("Where")
        return cls(name, since, kind, where or "")

    def to_json(self):
        return {"FileName": self.file_name, "Since": self.since, "Kind": self.kind, "Where": self.where}


class JsonStream:
    """A JSON text read from a file a piece at a time: members() walks an object member by member,
    value() decodes one value, so a state file of 10,000 albums is never held whole, as its text
    or as every record's parsed JSON. ValueError: the text is not JSON (or not of that shape)."""

    CHUNK = 1 << 20                   # characters read at a time (more while one value is longer)
    SPACE = re.compile(r"[ \t\n\r]*")
    decode = json.JSONDecoder().raw_decode

    def __init__(self, f):
        self.f, self.text, self.pos, self.eof = f, "", 0, False

    def _more(self):
        piece = self.f.read(max(self.CHUNK, len(self.text) - self.pos))
        self.eof = not piece
        self.text, self.pos = self.text[self.pos:] + piece, 0
        return not self.eof

    def peek(self):
        """The next character past white space ("" at the end)."""
        while True:
            self.pos = self.SPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text) or not self._more():
                return self.text[self.pos:self.pos + 1]

    def value(self):
        self.peek()
        while True:
            try:               # a value ends before the text read does (a number may go on), or at the end
                value, end = self.decode(self.text, self.pos)
                if end < len(self.text) or self.eof:
                    self.pos = end
                    return value
            except ValueError:            # cut short where the piece read ends, or not JSON
                if self.eof:
                    raise
            self._more()

    def members(self):
        """The names of the object here, one at a time, each with the stream at its value: the
        caller reads it (value(), or members() of an object) before asking for the next."""
        if self.peek() != "{":
            raise ValueError("not an object")
        self.pos += 1
        if self.peek() == "}":
            self.pos += 1
            return
        while True:
            if self.peek() != '"':
                raise ValueError("a name expected")
            name = self.value()
            if self.peek() != ":":
                raise ValueError("':' expected")
            self.pos += 1
            yield name
            after = self.peek()
            self.pos += 1
            if after == "}":
                return
            if after != ",":
                raise ValueError("',' expected")


def read_state_file(path, album):
    """The state snapshot's document, its "albums" (when an object) made album(AlbumKey, raw
    record) record by record as it is read: the file is never held whole, nor every record's
    parsed JSON at once. A file that is not such JSON is read again whole by json.loads: its
    errors (OSError, ValueError) are what they have always been."""
    with open(path, encoding="utf-8") as f:
        stream, data = JsonStream(f), {}
        try:
            for name in stream.members():
                if name == "albums" and stream.peek() == "{":
                    data[name] = {key: album(key, stream.value()) for key in stream.members()}
                else:
                    data[name] = stream.value()
            if not stream.peek():
                return data
        except ValueError:
            pass
    data = json.loads(read_text(path))
    if isinstance(data, dict) and isinstance(data.get("albums"), dict):
        raw = data["albums"]
        data["albums"] = {key: album(key, raw.pop(key)) for key in list(raw)}
    return data


def record_json(obj):
    """json's default for the state snapshot: an AlbumRecord as it is stored."""
    if not isinstance(obj, AlbumRecord):
        raise TypeError("%s is not JSON serializable" % type(obj).__name__)
    return obj.to_json()


class BackupState:
    """The incremental-backup record in output_dir/.smugmug_download/.

    albums: AlbumKey -> AlbumRecord. partials: NAME.part path -> Partial.
    requested: AlbumKeys whose archive was asked for and not yet saved (a run
    that is stopped looks first at what SmugMug already prepared). gone: AlbumKey
    -> {photo identity: GonePhoto}, only the photos SmugMug no longer has. Owned by the
    orchestrator thread alone. A snapshot (state.json, replaced atomically)
    plus a journal with one line per change: a crash loses at most the album
    in flight. A record that does not validate is set aside (kept in the
    snapshot, with a warning) and that album is checked again. A journal line
    that does not parse (cut short by a crash) or has the wrong shape is set
    aside (SET_ASIDE_FILE, one warning); every append starts on a fresh line.
    Replaying the journal over a snapshot that already holds it (a crash
    between the two) changes nothing: every entry can be applied twice.
    """

    def __init__(self, output_dir, read_only=False):
        self.dir = os.path.join(output_dir, STATE_DIR)
        self.read_only = read_only
        self.unreadable = None
        self.albums = {}
        self.partials = {}
        self.partials_of = {}           # AlbumKey -> the paths in partials that are its (set)
        self.requested = set()
        self.set_aside = {}
        self.intents = {}               # changes journalled and not yet done: id -> intent (Store.recover)
        self.versions = []              # [path, versions path, run stamp] of each file moved to versions
        self.torn = []                  # journal lines set aside on load (not parsed, or of the wrong shape)
        self._versioned = set()         # the versions paths in self.versions
        self.gone = {}                  # AlbumKey -> {identity: GonePhoto}
        self.gone_set_aside = {}        # AlbumKey -> {identity: what did not validate}, kept as it was
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
            data = read_state_file(self.snapshot_path, self._record_as_read)
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
            partials, requested = data.get("partials") or {}, data.get("requested") or []
            if not isinstance(partials, dict) or not isinstance(requested, list):
                raise ValueError("partials or requested of the wrong type")
            intents, versions = data.get("intents") or {}, data.get("versions") or []
            if not isinstance(intents, dict) or not isinstance(versions, list):
                raise ValueError("intents or versions of the wrong type")
            rest = ([{"partial": [path, raw]} for path, raw in partials.items()]
                    + [{"intent": intent} for intent in intents.values()]
                    + [{"versions": [item]} for item in versions]
                    + [{"gone": [[key, identity, photo]]} for raw in (data.get("gone"), data.get("gone_set_aside"))
                       for key, photos in (raw if isinstance(raw, dict) else {}).items()
                       for identity, photo in (photos if isinstance(photos, dict) else {}).items()])
            albums = data["albums"]
            entries = itertools.chain(({"album": albums.pop(key), "key": key} for key in list(albums)), rest)
            wrong = 0
            for entry in entries:
                try:
                    self._apply(entry)
                except ValueError:
                    wrong += 1
            if wrong and warn:
                log.warning("state file %s has %d entr%s of the wrong shape: ignored", self.snapshot_path,
                            wrong, "y" if wrong == 1 else "ies")
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
        now = iso_now()
        for record in self.albums.values():
            record.listed = record.listed or now    # unknown (an older version): its rechecks start now
        return self

    @staticmethod
    def _record_as_read(key, raw):
        """A raw record of the snapshot as it is read: its AlbumRecord (the raw one let go), or raw
        when it is not one (_apply sets it aside, with its warning, in turn)."""
        try:
            return AlbumRecord.from_json(key, raw) if key else raw
        except ValueError:
            return raw

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
        """Apply the journal's lines; those that cannot be applied are set aside, with one warning."""
        try:
            with open(self.journal_path, encoding="utf-8", errors="replace") as f:
                lines = f.readlines()
        except OSError:
            return
        for line in lines:
            if not line.strip():
                continue
            try:
                self._apply(json.loads(line))
            except ValueError:    # torn by a crash (a power cut mid-append), or of the wrong shape
                self.torn.append(line.rstrip("\n"))
        if self.torn:
            log.warning("the journal %s has %d line%s that cannot be read (cut short by a crash, or of the "
                        "wrong shape): ignored, and kept in %s", self.journal_path, len(self.torn),
                        plural(len(self.torn)), os.path.join(self.dir, SET_ASIDE_FILE))

    def _apply(self, entry):
        """One journal entry: {"album": record} | {"drop": key} | {"partial": [path, Partial|None]}
        | {"requested": [key, bool]} | {"intent": change} | {"done": intent id, "versions": [[path,
        versions path]...]} | {"pruned": run stamp} | {"pruned_files": [versions path...]}
        | {"gone": [[key, identity, GonePhoto|None]...]}. A bad record is set aside with a warning; an
        entry of the wrong shape is refused whole (ValueError), before anything changes. Applying
        an entry twice is applying it once."""
        problem = journal_entry_problem(entry)
        if problem:
            raise ValueError("a journal entry of the wrong shape (%s)" % problem)
        if "album" in entry:
            raw = entry["album"]
            key = entry.get("key") or raw["AlbumKey"]
            try:
                self.albums[key] = raw if isinstance(raw, AlbumRecord) else AlbumRecord.from_json(key, raw)
                self.set_aside.pop(key, None)
            except ValueError as exc:
                log.warning("state record of album %s is damaged (bad %s): set aside, the album "
                            "is checked again", key, exc)
                self.albums.pop(key, None)
                self.set_aside[key] = raw
        if "drop" in entry:
            self.albums.pop(entry["drop"], None)
        if "partial" in entry:
            path, raw = entry["partial"]
            try:
                partial = None if raw is None else Partial.from_json(path, raw)
            except ValueError:
                log.warning("state entry for %r is damaged: ignored", path)
            else:
                old = self.partials.pop(path, None)
                if old is not None:
                    self.partials_of[old.album].discard(path)
                    if not self.partials_of[old.album]:
                        del self.partials_of[old.album]
                if partial is not None:
                    self.partials[path] = partial
                    self.partials_of.setdefault(partial.album, set()).add(path)
        if "requested" in entry:
            key, on = entry["requested"]
            (self.requested.add if on else self.requested.discard)(key)
        if "intent" in entry:
            self.intents[entry["intent"]["id"]] = entry["intent"]
        if "done" in entry:
            self.intents.pop(entry["done"], None)
        for item in entry.get("versions") or []:
            if item[1] not in self._versioned:       # a versions path holds one file: noted once
                stamp = item[2] if len(item) > 2 else item[1].split("/")[2] if item[1].count("/") > 2 else ""
                self.versions.append([item[0], item[1], stamp])
                self._versioned.add(item[1])
        if "pruned" in entry:
            self.versions = [v for v in self.versions if v[2] != entry["pruned"]]
            self._versioned = {v[1] for v in self.versions}
        if "pruned_files" in entry:
            pruned = set(entry["pruned_files"])
            self.versions = [v for v in self.versions if v[1] not in pruned]
            self._versioned = {v[1] for v in self.versions}
        for key, identity, raw in entry.get("gone") or ():
            photos = self.gone.setdefault(key, {})
            if raw is None:
                photos.pop(identity, None)
            else:
                try:
                    photos[identity] = GonePhoto.from_json(identity, raw)
                except ValueError as exc:
                    log.warning("state record of a photo gone from album %s is damaged (bad %s): set aside",
                                key, exc)
                    self.gone_set_aside.setdefault(key, {})[identity] = raw
            if not photos:
                del self.gone[key]

    def record(self, entry):
        """Apply an entry and append it to the journal (flushed and fsynced). OSError: a write error."""
        self._apply(json.loads(json.dumps(entry)))
        if self.read_only:
            return
        if self._journal is None:
            os.makedirs(self.dir, exist_ok=True)
            self._journal = open_append(self.journal_path)     # a line cut short by a crash: ours starts anew
        append_lines(self._journal, [json_text(entry)])

    def save_album(self, record):
        self.record({"album": record.to_json()})

    def set_partial(self, path, partial):
        if self.partials.get(path) != partial:
            self.record({"partial": [path, partial.to_json() if partial else None]})

    def claim_partial(self, path, partial, resume=True):
        """path + ".part" is to hold partial: True if what it holds may be resumed (the state says
        it holds the same file), else it is recorded as partial's from now on."""
        if resume and self.partials.get(path) == partial:
            return True
        self.set_partial(path, partial)
        return False

    def gone_entry(self, changes):
        """The journal entry for [(album key, photo identity, GonePhoto: gone from SmugMug | None: no
        longer)], those that change something; None when none does."""
        changes = [[k, i, p.to_json() if p else None] for k, i, p in changes if self.gone.get(k, {}).get(i) != p]
        return {"gone": changes} if changes else None

    def set_requested(self, key, on):
        if (key in self.requested) != on:
            self.record({"requested": [key, on]})

    def save(self):
        """Write the snapshot atomically, then start an empty journal. OSError: a write error."""
        if self.read_only:
            return
        os.makedirs(self.dir, exist_ok=True)
        data = {"version": STATE_VERSION, "tool": "smugmug_download %s" % __version__,
                "albums": self.albums,      # each record made JSON as it is written, one at a time
                "partials": {p: v.to_json() for p, v in self.partials.items()},
                "requested": sorted(self.requested)}
        if self.set_aside:
            data["set_aside"] = self.set_aside
        if self.intents:
            data["intents"] = self.intents
        if self.versions:
            data["versions"] = self.versions
        if self.gone:
            data["gone"] = {k: {i: p.to_json() for i, p in photos.items()} for k, photos in self.gone.items()}
        if self.gone_set_aside:
            data["gone_set_aside"] = self.gone_set_aside
        encoder = json.JSONEncoder(ensure_ascii=False, indent=1, sort_keys=True, default=record_json)
        write_atomic(self.snapshot_path, map(utf8_safe, encoder.iterencode(data)))   # streamed: never the whole text
        if self.torn:                   # the journal's unreadable lines outlive it, for a person
            with open_append(os.path.join(self.dir, SET_ASIDE_FILE)) as f:
                append_lines(f, self.torn)
            self.torn = []
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


def file_sizes_match(folder, files):
    """Is every file on disk at its recorded size?"""
    return all(file_is(os.path.join(folder, f.name), f.size, "") for f in files)


def manifest_album_key(doc):
    """The AlbumKey a metadata.json document says it belongs to, or None."""
    info = doc.get("album") if isinstance(doc, dict) else None
    key = info.get("AlbumKey") if isinstance(info, dict) else None
    return key if isinstance(key, str) and key else None


def record_from_manifest(output_dir, album):
    """An album the state does not know (a lost or damaged state) whose folder holds its own
    metadata.json: a record rebuilt from it, to be checked again (not complete), so that a
    lost state costs a check of the files on disk, not a new download. None otherwise."""
    path = os.path.join(output_dir, *album.path, MANIFEST_NAME)
    try:
        doc = load_manifest(path)
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
    for item, kind in ((item, kind) for item in listed_files for kind in ("file", "sidecar")):
        name = own_name(item.get(kind)) if isinstance(item, dict) else None
        if name:
            try:
                loose.append({"name": name, "size": os.path.getsize(os.path.join(os.path.dirname(path), name)),
                              "kind": kind})
            except OSError:
                pass            # gone: the check fetches it again
    try:
        return AlbumRecord.from_json(album.album_key, {
            "NodeID": album.node_id, "path": album.rel, "LastUpdated": info.get("LastUpdated") or "",
            "ImagesLastUpdated": info.get("ImagesLastUpdated") or "", "files": parts + loose,
            "manifest": size, "complete": False})
    except ValueError:
        return None


def alternative_path(album):
    """The album's path with " (NodeID)": where a new album goes whose folder another owns."""
    return album.path[:-1] + (with_suffix(album.path[-1], " (%s)" % clean_name(album.node_id)),)


def recheck_due(record, days, now=None):
    """Is the rolling recheck of this album due (its files listed again, checked against its
    manifest)? Every album has its own day in each period of `days` (from its key), so that
    about 1/days of a large account comes due each night; it is due when it was last listed
    before the latest such day. An album listed within the period costs nothing."""
    if days <= 0 or not record.listed:
        return False
    listed = parse_time(record.listed)
    if listed is None:
        return True
    period = days * 86400.0
    phase = int(hashlib.md5(record.key.encode("utf-8")).hexdigest()[:12], 16) / float(16 ** 12) * period
    now = time.time() if now is None else now
    latest = math.floor((now - phase) / period) * period + phase
    return listed.timestamp() < latest


def needs_unpack(record, plain, sidecars):
    """Does an album backed up before need its files laid out again: the files layout asked for
    and zip parts on disk (they are unpacked, no download), or sidecars asked for and none there?"""
    if not record or not record.files:
        return False
    if plain and record.parts:
        return True
    files = [f for f in record.files if f.kind == "file"]
    return sidecars != "none" and bool(files) and not any(f.kind == "sidecar" for f in record.files)


def count_moved(album, record):
    """The album's ImageCount is not the one backed up: a change its timestamps (whole seconds)
    may not show, and one no archive SmugMug already has can be trusted with."""
    return None not in (record.image_count, album.image_count) and record.image_count != album.image_count


def plan_from_manifest(record, output_dir):
    """Can a changed album be planned from its listing against its manifest (and so fetch only
    what changed), rather than from a fresh archive: a backup in place with its manifest there?"""
    folder = os.path.join(output_dir, *record.path.split("/"))
    return bool(record.files) and record.manifest is not None and \
        file_sizes_match(folder, [SavedFile(MANIFEST_NAME, record.manifest)])


def classify(album, record, output_dir, recheck_days=0, now=None):
    """What an album needs against its state record (timestamps known):

    'new' / 'changed' (an archive), 'recheck' (list and check what is on disk,
    fetch only what is missing: no manifest yet, files missing or damaged, or
    files SmugMug was still processing last time), 'due' (the rolling recheck:
    list its files and compare them with its manifest), or 'unchanged'.
    """
    if not record:
        return "new"
    if record.last_updated != album.last_updated or record.images_last_updated != album.images_last_updated:
        return "changed"
    if count_moved(album, record):
        return "changed"
    folder = os.path.join(output_dir, *record.path.split("/"))
    damaged_parts = {f.name for f in record.parts} & set(record.damaged)
    if damaged_parts or not file_sizes_match(folder, record.parts):
        return "changed"
    loose = [f for f in record.files if f.kind == "file"]
    sidecars_there = all(os.path.exists(os.path.join(folder, f.name)) for f in record.files if f.kind == "sidecar")
    manifest_ok = not record.files or (    # an empty album has no manifest to check
        record.manifest is not None and file_sizes_match(folder, [SavedFile(MANIFEST_NAME, record.manifest)]))
    if not manifest_ok or not record.complete or record.damaged or not file_sizes_match(folder, loose) \
            or not sidecars_there:      # (a sidecar an application edited is left as it is)
        return "recheck"
    if record.files and recheck_due(record, recheck_days, now):
        return "due"
    return "unchanged"


def index_lines(output_dir, state, gone=()):
    """The rows of index.csv, album by album in path order, one manifest read at a time: every
    file each album lists (status current, or deleted on SmugMug for an album gone from it or
    emptied there), then the photos SmugMug no longer lists or replaced whose last copy the
    backup still holds: a manifest's own "former" section, and the manifests in versions (newest
    first: their "files" and "former"), each file that is not the current one named where its
    copy is, once. A manifest in versions describes the files that went to versions beside it
    (the album's files before that run: versioned_copy); a file it names that is not there (it
    stayed, and a later manifest names it; or it was pruned) has no row from it. A manifest
    versioned under a path no album has now (the album renamed or moved since) is its AlbumKey's."""
    versioned = collections.defaultdict(list)
    for path, vrel, stamp in state.versions:
        if path.rsplit("/", 1)[-1] == MANIFEST_NAME:
            versioned[path.rsplit("/", 1)[0]].append((stamp, vrel))
    paths = {record.path for record in state.albums.values()}
    for path in [p for p in versioned if p not in paths]:
        for stamp, vrel in versioned.pop(path):
            key = manifest_album_key(read_manifest(os.path.join(output_dir, *vrel.split("/"))))
            if key in state.albums:
                versioned[state.albums[key].path].append((stamp, vrel))
    gone = set(gone)
    for record in sorted(state.albums.values(), key=lambda r: r.path):
        doc = read_manifest(os.path.join(output_dir, *record.path.split("/"), MANIFEST_NAME)) or {}
        current, seen = {}, set()
        emptied = record.image_count == 0           # emptied on SmugMug: its files kept are deleted there
        for row in index_rows(doc, record.path, gone=record.path in gone or emptied):
            if row[0] in ("current", "missing"):
                current[row[3]] = row[8]
            else:
                seen.add((row[3], row[8]))
            yield row
        for _stamp, vrel in sorted(versioned.get(record.path, ()), reverse=True):
            old = read_manifest(os.path.join(output_dir, *vrel.split("/"))) or {}
            if manifest_album_key(old) not in (None, record.key):     # another album's, once at this path
                continue
            folder, zips = vrel.rsplit("/", 1)[0], {}
            for item in [i for section in ("files", "former") for i in old.get(section) or ()
                         if isinstance(i, dict) and "missing" not in i]:
                row = index_row(record.path, item, "")
                if not row[3] or current.get(row[3], None) == row[8] or (row[3], row[8]) in seen \
                        or not versioned_copy(output_dir, folder, item, zips):
                    continue
                row = index_row(record.path, item, INDEX_STATUS["replaced" if row[3] in current else "deleted"],
                                folder)
                seen.add((row[3], row[8]))
                yield row


def versioned_copy(output_dir, folder, item, zips):
    """Is the copy a versioned manifest's entry (of its files or former) names in the versions
    folder beside it, with the entry's size (its zip entry's, for a part; zips: {path: {entry:
    size}}, cached)?"""
    where = item.get("archive") if isinstance(item.get("entry"), str) else item.get("file")
    if not isinstance(where, str) or "/" in where or not safe_rel(where):
        return False
    full = os.path.join(output_dir, *folder.split("/"), where)
    size = int_or_none(item.get("size") if item.get("rendition") is True else item.get("ArchivedSize"))
    if not isinstance(item.get("entry"), str):
        return os.path.isfile(full) and size in (None, os.path.getsize(full))
    if full not in zips:
        try:
            with zipfile.ZipFile(full) as archive:
                zips[full] = {n: i.file_size for i in archive.infolist() for n in (i.filename, zip_entry_names(i))}
        except (OSError, zipfile.BadZipFile, ValueError, RuntimeError, NotImplementedError):
            zips[full] = {}
    return item["entry"] in zips[full] and size in (None, zips[full][item["entry"]])


class RunLock:
    """An exclusive lock on output_dir/.smugmug_download.lock, released by the OS if we die.

    The file holds the pid of the run holding it and is removed when the run ends,
    so a lock file left over names a run that died (the next run takes it over)."""

    def __init__(self, output_dir):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.file = None

    def acquire(self):
        """Hold the lock, or LockedError naming the holder; UsageError when output_dir is not writable."""
        while True:
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
            try:                        # the file we locked may have been removed by a run ending
                same = os.path.samestat(os.fstat(self.file.fileno()), os.stat(self.path))
            except OSError:
                same = False
            if same:
                break
            self.file.close()
        self.file.seek(0)
        self.file.truncate()
        self.file.write("%d\n" % os.getpid())     # through the locked handle (Windows locks its bytes)
        sync_file(self.file)
        return self

    def release(self):
        if self.file is not None:
            try:
                remove_quietly(self.path)   # before closing: no other run can hold it yet
            except OSError:
                pass
            self.file.close()           # closing drops the lock
            self.file = None


# Scheduling #################################################################

class Meter:
    """Bytes downloaded, counted by the download threads; rates read by the orchestrator."""

    def __init__(self, clock=time.monotonic):
        self._lock = threading.Lock()
        self._clock = clock
        self.done = 0
        self.samples = collections.deque([(clock(), 0)])

    def add(self, n):
        with self._lock:
            self.done += n

    def sample(self):
        """Note the count now (the orchestrator's loop does, at least every STATUS_INTERVAL)."""
        now = self._clock()
        self.samples.append((now, self.done))
        while len(self.samples) > 2 and now - self.samples[1][0] > STATUS_RATE_SPAN:
            self.samples.popleft()

    def rate(self, span):
        """Bytes per second over the last span seconds (None while not known: under half a second
        of samples, or nothing moved)."""
        now = self._clock()
        recent = [(t, b) for t, b in self.samples if now - t <= span] or [self.samples[-1]]
        older = [(t, b) for t, b in self.samples if now - t > span]
        t0, b0 = older[-1] if older else recent[0]
        t1, b1 = self.samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 - t0 >= 0.5 and b1 > b0 else None


class PrepWindow:
    """How many albums may be in SmugMug's preparation (requested and not yet
    Complete) at once: sized as the run goes.

    It grows while download workers sit idle and nothing prepared waits for
    them; it holds while prepared archives wait; it halves when SmugMug
    rate-limits. Never above cap, never below floor. (What is prepared, or
    will be, is bounded apart in bytes: Scheduler.backlog_full.)
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


def wait_bin(wait):
    """The bin of a wait: bin k holds the waits in (WAIT_BINS[k-1], WAIT_BINS[k]]; 0 is no wait."""
    return min(bisect.bisect_left(WAIT_BINS, wait), len(WAIT_BINS) - 1)


def ready_shares(spans, shares=None, rounds=ESTIMATE_ROUNDS):
    """How preparation times spread, from what the looks saw. spans: per album, the bins (a, b)
    within which its archive became ready: bins a to b - 1 (from the bin after that of the last
    look that missed it to that of the look that found it; b is None while it has not been seen
    ready: from bin a on). Returns the share of archives ready in each bin, the
    last entry being the share beyond every bin seen: the self-consistent estimate (Turnbull's
    for interval-censored times), each round spreading each album over its bins in proportion to
    the last round's shares (evenly where those add up to next to nothing, under 1e-12: a sum
    taken as a difference of running sums is not exact below that). shares: a last estimate of
    the same length to start from."""
    top = max(max(a, b or 0) for a, b in spans)        # the share beyond every bin seen
    counts = collections.Counter((a, b if b is not None else top + 1) for a, b in spans)
    if shares is None or len(shares) != top + 1:
        shares = [0.0] + [1.0 / top] * top
    for _ in range(rounds):         # each round linear in spans + bins: a few ms in all
        before = [0.0, *itertools.accumulate(shares)]
        scale = [0.0] * (top + 2)   # per bin, summed over the spans holding it: n / their share, and
        even = [0.0] * (top + 2)    # n / their length for a span of no share (both as differences)
        for (a, b), n in counts.items():
            total = before[b] - before[a]
            step, into = (n / total, scale) if total > 1e-12 else (n / (b - a), even)
            into[a] += step
            into[b] -= step
        scale, even = itertools.accumulate(scale), itertools.accumulate(even)
        shares = [(x * f + e) / len(spans) for x, f, e in zip(shares, scale, even)]
    return shares


def scout_count(wait, albums):
    """How many albums a scout round looks at, at this wait of the oldest, with this many in
    preparation: SCOUT_SHARE of them per second waited (few early, while archives are unlikely
    ready), and at least SCOUT_EARLY of them / the wait squared, so that the first archives of
    quick preparations are found within a few tenths of a second (a link idle at a wait of one
    second is a larger share of the run; the extra looks add up to a few, whatever the wait)."""
    return max(1, int(wait * SCOUT_SHARE * albums), round(SCOUT_EARLY * albums / max(wait, 1e-3) ** 2))


@dataclass
class Preparing:
    """An album whose archive SmugMug prepares, as the LookPlanner sees it."""
    asked: float                 # when it was requested (clock)
    learn: bool = True           # False: an archive asked for before this run (its wait is not known)
    seen: float = 0.0            # its wait at the last look that found it not ready (0: none yet)
    looks: int = 0
    looking: bool = False        # a look is under way


class LookPlanner:
    """When to look at archives in preparation: each look is an API call.

    Looks follow demand: they are made only when the link will soon have
    nothing to do (less than LOOK_STOCK seconds of downloading queued, or a
    worker idle). Before any archive has been seen ready, scout looks go out
    at waits growing by SCOUT_GROWTH, a few more the longer the wait: few
    calls early. After that, the run learns from its looks how preparation
    times spread (each album's time lies between its last look that missed and
    the one that found it: ready_shares), and from that each album's chance of
    being ready now, given it was not at its last look: an album that has
    waited longer than most took is likely ready. The likeliest are looked at,
    as many as should find what the link needs, while their chance is at least
    LOOK_ODDS_IDLE with nothing queued, rising to LOOK_ODDS_BUSY as downloads
    queue up. With none that likely, the link idle and no look under way, one
    look goes to the album looked at least lately for its wait, at most once
    per EXPLORE_SHARE of the wait: the slowest album sets the run's end (the
    estimate gives no chance past the longest wait seen). An album not looked
    at for poll_max_seconds counts as ready: it goes first when looks are
    wanted (scouts included), as one of the looks the link needs, never on a
    timer (which would look at every album every poll_max_seconds when all
    take longer than that).
    """

    def __init__(self, first, maximum, clock=time.monotonic):
        self.first, self.maximum = first, maximum
        self._clock = clock
        self.albums = {}             # run -> Preparing
        self.ready_spans = []        # (after, by) wait bins of the archives seen ready
        self.found = 0               # archives seen ready so far
        self.scout_wait = 0.0        # the wait of the last scout looks
        self.shares = None           # ready_shares(...) as last estimated, and their running sum
        self.cumulative = []
        self._dirty = False          # a look has come back since the last estimate
        self.explore_after = 0.0     # no exploring look before this

    def add(self, run, asked, learn=True):
        self.albums[run] = Preparing(asked, learn)

    def drop(self, run):
        self.albums.pop(run, None)

    def seen(self, run, ready, now):
        """A look at run's archive came back: ready or not."""
        item = self.albums.get(run)
        if item is None:
            return
        item.looking = False
        self._dirty = True
        if ready:
            if item.learn:
                self.found += 1
                found = wait_bin(now - item.asked)
                self.ready_spans.append((min(wait_bin(item.seen) + 1, found), found + 1))
            self.drop(run)
        else:
            item.seen, item.looks = now - item.asked, item.looks + 1

    def estimate(self):
        """Learn again how preparation times spread, if a look has come back since the last time."""
        if not self._dirty:
            return
        self._dirty = False
        spans = self.ready_spans + [(wait_bin(i.seen) + 1, None) for i in self.albums.values() if i.seen and i.learn]
        self.shares = ready_shares(spans, self.shares)
        self.cumulative = list(itertools.accumulate(self.shares))

    def ready_by(self, wait):
        """The share of archives ready by this wait, as estimated (within a bin: linearly; past
        the longest wait seen: no more than by then, until a look says otherwise)."""
        k = wait_bin(wait)
        if k == 0 or not self.cumulative:
            return 0.0
        if k >= len(self.cumulative) - 1:
            return self.cumulative[-2] if len(self.cumulative) > 1 else 0.0
        low, high = WAIT_BINS[k - 1], WAIT_BINS[k]
        return self.cumulative[k - 1] + (self.cumulative[k] - self.cumulative[k - 1]) * (wait - low) / (high - low)

    def overdue(self, item, now):
        """Not looked at for poll_max_seconds (or never, since asked that long ago): taken as ready."""
        return now - item.asked - item.seen >= self.maximum

    def chance(self, item, now):
        """The chance that item's archive is ready now, given it was not at its last look."""
        wait = now - item.asked
        if self.overdue(item, now):
            return 1.0
        before = self.ready_by(item.seen) if item.seen else 0.0
        if before >= 1.0 - 1e-9:
            return 1.0
        return max(0.0, (self.ready_by(wait) - before) / (1.0 - before))

    def ready_end(self, now):
        """When the last album in preparation should be ready, as estimated (None: nothing seen
        ready yet). The estimate knows no wait past the longest seen; beyond it, the share of
        archives ready is taken to grow as fast as it did from the first ready wait to there (a
        share of 60 % ready 4 s after the first: all ready 6.7 s after it)."""
        if not self.found or not self.albums:
            return None
        self.estimate()
        top = len(self.cumulative) - 2                  # the last bin seen; beyond it: cumulative[-1]
        first = next((k for k, f in enumerate(self.cumulative) if f > 1e-9), top)
        low, high, share = WAIT_BINS[max(0, first - 1)], WAIT_BINS[top], self.cumulative[top]
        end = min(low + (high - low) / max(share, 1e-3), high * READY_END_REACH)
        return max(item.asked + max(end, now - item.asked) for item in self.albums.values())

    def plan(self, now, need, limit, stock=0.0, spare=0.0):
        """The albums to look at now, the link needing about `need` more archives and holding
        `stock` seconds of downloading: at most limit. spare: seconds the link could stay idle
        and still take every archive still in preparation before the last is ready (Scheduler.
        spare_seconds): while there are LOOK_SPARE of them, only near-certain albums are looked at."""
        chosen = []
        if limit <= 0 or not self.albums:
            return chosen
        idle = {run: item for run, item in self.albums.items() if not item.looking and now - item.asked >= self.first}
        if not self.found:                  # nothing seen ready yet: scouts, at growing waits
            waits = {run: now - item.asked for run, item in idle.items()}
            oldest = max(waits.values(), default=0.0)
            if oldest < self.scout_wait:        # the albums scouted are gone (asked again, saved): start over
                self.scout_wait = 0.0
            if oldest and oldest >= self.scout_wait * SCOUT_GROWTH:
                self.scout_wait = oldest
                count = scout_count(oldest, len(self.albums))
                due = [run for run, wait in waits.items() if wait >= self.albums[run].seen * SCOUT_GROWTH]
                # not looked at for poll_max_seconds first, then the least looked at, the longest waiting
                due.sort(key=lambda run: (not self.overdue(self.albums[run], now),
                                          self.albums[run].looks, -waits[run]))
                chosen = due[:min(limit * SCOUT_LIMIT, count)]
        elif idle:
            self.estimate()
            odds = sorted(((self.chance(item, now), run) for run, item in idle.items()), key=lambda c: -c[0])
            fill = max((stock or 0.0) / LOOK_ODDS_STOCK, (spare or 0.0) / LOOK_SPARE)
            least = LOOK_ODDS_IDLE + (LOOK_ODDS_BUSY - LOOK_ODDS_IDLE) * min(1.0, fill)
            expected = 0.5 * sum(1 for item in self.albums.values() if item.looking)
            for odds_of, run in odds:
                if len(chosen) >= limit or expected >= need or odds_of < least:
                    break
                chosen.append(run)
                expected += odds_of
            if (not chosen and not stock and now >= self.explore_after
                    and not any(item.looking for item in self.albums.values())):
                run = min(idle, key=lambda r: idle[r].seen / max(1e-9, now - idle[r].asked))
                chosen = [run]
                self.explore_after = now + EXPLORE_SHARE * (now - idle[run].asked)
        for run in chosen:
            self.albums[run].looking = True
        return chosen

    def next_due(self, now):
        """Seconds until a look may be due (for the orchestrator's wait), or None."""
        idle = [item for item in self.albums.values() if not item.looking]
        if not idle or self.found:      # chances grow by the moment: the orchestrator's regular wake-up
            return None
        oldest = max(now - item.asked for item in idle)
        due = max(self.first, self.scout_wait * SCOUT_GROWTH) - oldest
        return max(LOOK_TICK, due)      # never 0: looks may be held back (paused, link busy)


class Scheduler:
    """What may start now: the orchestrator asks, and starts what it is told.

    Requests go out while the preparation window has room (PrepWindow) and
    the archives prepared or coming do not exceed READY_HORIZON seconds of
    the link (they expire); looks as the LookPlanner says; queued downloads on
    free workers. Nothing new starts while the link is down; while the API
    gate holds calls back (a quota, a Retry-After), no new requests start, so
    the calls left go to looks and checks, which move bytes sooner.
    """

    def __init__(self, config, workers, link, gate, meter, clock=time.monotonic):
        self.workers = workers
        self.link, self.gate, self.meter = link, gate, meter
        self._clock = clock
        self.window = PrepWindow(config.max_preparing)
        self.looks = LookPlanner(config.poll_seconds, config.poll_max_seconds, clock)
        self.waiting = collections.deque()      # AlbumRuns waiting for a window slot
        self.delayed = []                       # heap of (when, seq, AlbumRun): asking again soon
        self.queue = collections.deque()        # DownloadTasks waiting for a worker (_queued counts them)
        self.queued = collections.Counter()     # of the queue: bytes, parts, part_bytes (asked every turn)
        self.running = []                       # DownloadTasks at work
        self.in_window = set()                  # AlbumRuns requested and not yet prepared
        self.link_rate = 0.0                    # the best download rate seen: what the link takes
        self._busy = None                       # (clock, bytes) when downloads began to run, and the
        self._busy_sum = [0.0, 0.0]             # seconds and bytes while some ran, before (busy_rate)
        self.prepared = self.prepared_bytes = 0 # archives prepared so far, and their listed sizes
        self.probes = LOOK_FIRST_PROBES         # new albums left that look first while none has paid
        self.reused = False                     # an archive SmugMug already had was reused this run
        self._seq = itertools.count()
        self._last_adjust = 0.0
        self._pressure_seen = 0

    # -- what the orchestrator tells it --

    def want_archive(self, run, delay=0.0):
        """run needs an archive: request it when the window has room (after delay seconds)."""
        if delay:
            heapq.heappush(self.delayed, (self._clock() + delay, next(self._seq), run))
        else:
            self.waiting.append(run)

    def look_first(self, run, asked_before):
        """Should the album look for an archive SmugMug already has before asking for one? A
        changed album, or one a stopped run had asked for, does; of new albums (an archive asked
        for on the web, or by a run whose state was lost), the first LOOK_FIRST_PROBES do, and
        all once such a look has paid (reused)."""
        if run.record is not None or asked_before or self.reused:
            return True
        self.probes -= 1
        return self.probes >= 0

    def preparing(self, run, asked, learn=True):
        """run's archive is being prepared: the looks at it are planned (once). learn: it was
        asked for at `asked` (not reused from before this run), so its looks tell preparation times."""
        if run not in self.looks.albums:
            self.looks.add(run, asked, learn)

    def looked(self, run, ready):
        self.looks.seen(run, ready, self._clock())

    def prepared_archive(self, run, size):
        """run's archive is ready (its parts about to be queued): it leaves the window."""
        self.leave(run)
        self.prepared += 1
        self.prepared_bytes += size

    def leave(self, run):
        """run needs nothing more of the window or the looks (prepared, failed, given up)."""
        self.in_window.discard(run)
        self.looks.drop(run)

    def queue_download(self, task):
        self.queue.append(task)
        self._queued(task, 1)

    def _queued(self, task, sign):
        """The sums over the queue, kept as tasks join it (sign 1) and leave it (-1); exactly 0
        when it is empty (sizes that are not whole numbers leave no rounding behind)."""
        if not self.queue:
            return self.queued.clear()
        self.queued["bytes"] += sign * task.size
        if task.part is not None:
            self.queued["parts"] += sign
            self.queued["part_bytes"] += sign * task.size

    def download_done(self, task):
        if task in self.running:
            self.running.remove(task)
            if not self.running and self._busy:
                self._busy_sum[0] += self._clock() - self._busy[0]
                self._busy_sum[1] += self.meter.done - self._busy[1]
                self._busy = None

    def busy_rate(self):
        """Bytes per second while downloads run (0: not known): what the link takes when
        preparation sets the pace, and it idles between archives."""
        seconds, done = self._busy_sum
        if self._busy:
            seconds, done = seconds + self._clock() - self._busy[0], done + self.meter.done - self._busy[1]
        return done / seconds if seconds >= BUSY_RATE_SECONDS and done else 0.0

    # -- what may start --

    def paused(self):
        return not self.link.up

    def requests(self):
        """Albums to request now."""
        self.adjust_window()
        now = self._clock()
        while self.delayed and self.delayed[0][0] <= now:
            self.waiting.appendleft(heapq.heappop(self.delayed)[2])
        started = []
        if self.paused() or self.gate.resumes() is not None:
            return started
        while self.waiting and len(self.in_window) < self.window.limit and not self.backlog_full():
            run = self.waiting.popleft()
            self.in_window.add(run)
            started.append(run)
        return started

    def looks_now(self):
        """Albums whose archive to look at now: only while the link will soon want more."""
        if self.paused():
            return []
        stock = self.stock_seconds()
        busy = len(self.running) + len(self.queue)
        if busy >= self.workers and stock is not None and stock >= LOOK_STOCK:
            return []
        album_bytes = self.prepared_bytes / self.prepared if self.prepared and self.prepared_bytes else 0
        if self.link_rate and album_bytes and stock is not None:        # what fills the stock, a worker's
            need = min(float(self.workers), max(1.0, (LOOK_STOCK - stock) * self.link_rate / album_bytes))
        else:                                                            # worth at a time at most
            need = float(max(1, self.workers - busy))
        looking = sum(1 for i in self.looks.albums.values() if i.looking)
        return self.looks.plan(self._clock(), need, self.workers - looking, stock, self.spare_seconds(stock))

    def spare_seconds(self, stock):
        """Seconds the link could stay idle and still download every archive in preparation (and
        what is queued) before the last of them should be ready (LookPlanner.ready_end): 0 while
        either is not known."""
        end = self.looks.ready_end(self._clock())
        rate = max(self.link_rate, self.busy_rate())
        if end is None or not rate or not self.prepared:
            return 0.0
        left = self.queued["bytes"] + sum(max(0, t.size - t.done) for t in self.running)
        coming = len(self.looks.albums) * self.prepared_bytes / self.prepared
        return max(0.0, end - self._clock() - (left + coming) / rate)

    def downloads(self):
        """Queued downloads to start now on free workers: never two on one album's old and new archive."""
        started, skipped = [], collections.deque()
        if self.paused():
            return started
        while self.queue and len(self.running) < self.workers:
            task = self.queue.popleft()
            self._queued(task, -1)
            run = task.run
            if task.generation != run.generation or run.state in ("done", "failed"):
                continue                                     # an archive given up on
            if any(n for g, n in run.running.items() if g != run.generation):
                skipped.append(task)                         # the old archive's downloads are still stopping
                continue
            if not self.running:
                self._busy = (self._clock(), self.meter.done)
            self.running.append(task)
            started.append(task)
        self.queue.extendleft(reversed(skipped))
        for task in skipped:
            self._queued(task, 1)
        return started

    def stock_seconds(self):
        """Seconds of downloading queued or under way, at the link's best rate (None: no rate yet,
        and less than a task per worker)."""
        left = self.queued["bytes"] + sum(max(0, t.size - t.done) for t in self.running)
        if not self.link_rate:
            return None if len(self.queue) + len(self.running) < self.workers else LOOK_STOCK
        return left / self.link_rate

    def backlog_full(self):
        """Would another request let archives pile up? They expire: no new request while what
        waits for a download worker, plus what the albums in preparation will bring, exceeds
        READY_HORIZON seconds of the best download rate seen (before any rate is known: while
        two archives per worker wait), or BACKLOG_PER_WORKER archives per worker wait: each is
        an album held whole (its listing, its plan) until downloaded, and tiny albums make many
        archives of a second of the link; that many keep every worker busy while the next ones
        are prepared."""
        if self.queued["parts"] >= BACKLOG_PER_WORKER * self.workers:
            return True
        if not self.link_rate:
            return self.queued["parts"] >= 2 * self.workers
        album_bytes = self.prepared_bytes / self.prepared if self.prepared else 0
        coming = self.queued["part_bytes"] + len(self.in_window) * album_bytes
        return coming > self.link_rate * READY_HORIZON

    def adjust_window(self):
        now = self._clock()
        if now - self._last_adjust < WINDOW_STEP:
            return
        self._last_adjust = now
        throttled, self._pressure_seen = self.gate.pressure > self._pressure_seen, self.gate.pressure
        self.link_rate = max(self.link_rate, self.meter.rate(RATE_SPAN) or 0)
        ready = self.queued["parts"]
        self.window.adjust(idle_workers=self.workers - len(self.running), ready_waiting=ready,
                           throttled=throttled, wanted=bool(self.waiting))

    def timeout(self):
        """Seconds until something may start on its own (a delayed request, a due look)."""
        now = self._clock()
        timeout = STATUS_INTERVAL
        if self.delayed:
            timeout = min(timeout, max(0.0, self.delayed[0][0] - now))
        due = self.looks.next_due(now)
        if due is not None:
            timeout = min(timeout, due)
        return timeout

    def has_work(self):
        return bool(self.waiting or self.delayed or self.queue or self.looks.albums)

    def clear(self):
        """Stop: nothing queued starts any more."""
        self.waiting.clear()
        self.delayed.clear()
        self.queue.clear()
        self.queued.clear()
        self.looks.albums.clear()


# Reporting ##################################################################

NOTICE = logging.ERROR + 5       # what a person must see even with --quiet, printed without "Error:"
logging.addLevelName(NOTICE, "NOTICE")


def fit_parts(parts, width):
    """A status line from (priority, text) parts that fits width: parts are dropped, the least
    important (highest priority number) first and of those the rightmost, before the line
    is cut; the others keep their order."""
    parts = [p for p in parts if p[1]]
    while len(parts) > 1 and len(" | ".join(text for _, text in parts)) > width:
        worst = max(range(len(parts)), key=lambda i: (parts[i][0], i))
        del parts[worst]
    return fit_line(" | ".join(text for _, text in parts), width)


def human_eta(seconds):
    """How long is left, as a person says it."""
    if seconds < 60:
        return "less than a minute left"
    if seconds < 3600:
        return "about %d min left" % max(1, round(seconds / 60.0))
    hours, rest = divmod(int(round(seconds / 60.0)), 60)
    return "about %d h %02d min left" % (hours, rest)


class StatusLine:
    """The live status line on a terminal; log lines clear it before printing."""

    def __init__(self, stream, enabled):
        self.stream = stream
        self.enabled = enabled
        self.lock = threading.Lock()
        self.text = ""
        self.parts = []
        self.last = 0.0
        self.resized = False         # set by SIGWINCH: redraw at the new width now

    def show(self, parts, force=False):
        """Draw the line from (priority, text) parts (see fit_parts), at most every STATUS_INTERVAL."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and not self.resized and now - self.last < STATUS_INTERVAL:
            return
        self.last, self.resized, self.parts = now, False, list(parts)
        with self.lock:
            self.text = fit_parts(self.parts, self.width())
            self.stream.write("\r" + self.text + "\x1b[K")
            self.stream.flush()

    def resize(self, *_signal):
        self.resized = True

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


class Reporter:
    """What a run says, and where: a status line on a terminal (redrawn in place), one log
    line per album finished or failed (always in the log file; on the console when there is
    no status line), each wait when it starts, changes and once a minute, and the summary.
    Owned by the orchestrator thread."""

    def __init__(self, options, status, meter, clock=time.monotonic):
        self.options, self.status, self.meter = options, status, meter
        self._clock = clock
        self.wait = None             # (kind, text, cause) of what the run waits for now
        self.wait_since = 0.0
        self.wait_logged = None      # when the current wait was last logged (None: not yet)
        self.cause_logged = ""       # the outage's cause as last logged
        self.started = clock()
        self.dry_counts = collections.defaultdict(lambda: [0, 0])   # a dry run's status -> [albums, images]
        self.dry_lines = []          # heap of (path, line) of a dry run, printed in path order

    def album(self, text, *args):
        """One line for an album finished or failed."""
        log.info(text, *args, extra={"album": True})

    def emptied(self, summary, rel, kept):
        """An album emptied on SmugMug whose files from before are kept: its backup is up to date
        (counted as backed up, as an album empty from the start is), and said."""
        summary.emptied.append(rel)
        summary.backed_up += 1
        log.warning("%s is empty on SmugMug now: its %d file%s from before %s kept", rel, kept, plural(kept),
                    "is" if kept == 1 else "are")

    def committed(self, summary, run, outcome, versioned):
        """An album's backup took its place: counted, and said in one line. Returns why the
        album still fails (files SmugMug would not give), or ""."""
        rel = run.album.rel
        total = (0 if run.from_disk else sum(run.sizes.values())) + sum(run.fetched.values())   # downloaded
        summary.renditions += outcome.renditions
        if run.by_file:
            summary.by_file.append(rel)
        if outcome.missing:
            names = {f.key: f.file_name for f in run.plan.listing}
            summary.missing[rel] = sorted((names.get(k, k), why) for k, why in outcome.missing.items())
        lacking = [why for why in outcome.missing.values() if why != "still processing on SmugMug"]
        if lacking:
            return "%d file%s missing: %s" % (len(lacking), plural(len(lacking)), "; ".join(sorted(set(lacking))))
        summary.backed_up += 1
        if run.plain:                       # each file unpacked, kept as it was, or fetched
            kept = sum(1 for n in outcome.loose if n not in run.plan.extracted and n not in run.fetched)
            self.album("backed up %s (%s%s, %d file%s: %d unpacked, %s%s; %s downloaded%s)",
                       rel, run.reason, ", file by file" if run.by_file else "", len(outcome.loose),
                       plural(len(outcome.loose)), len(run.plan.extracted), "%d kept, " % kept if kept else "",
                       on_their_own(len(run.fetched)), human_bytes(total),
                       ", %d to versions" % versioned if versioned else "")
            return ""
        self.album("backed up %s (%s%s, %d part%s, %s, %s%s)", rel, run.reason,
                   ", file by file" if run.by_file else "", len(outcome.parts), plural(len(outcome.parts)),
                   on_their_own(len(outcome.loose), "file"), human_bytes(total),
                   ", %d to versions" % versioned if versioned else "")
        return ""

    def dry_run(self, run, status, plan=None, on_disk=None, sidecars=None):
        """A dry run's line for an album (into the heap of lines, printed in path order) and its count;
        for a changed album planned from its manifest (plan: its files listed; on_disk: the names
        of its files there; sidecars: sidecar_files of the new backup), what it would fetch."""
        album, record = run.album, run.record
        moved = record is not None and record.path != album.rel
        if status == "unchanged" and moved:
            status = "moved"
        shown = "recheck" if status == "due" else status
        notes = ["moved from %s" % record.path] if moved else []
        if status == "due":
            notes.append("its rolling recheck is due")
        if status == "unpack":              # what needs_unpack found to do
            done = ["zips unpacked"] if run.plain and record.parts else []
            done += ["sidecars written"] if run.sidecars != "none" else []
            notes.append("%s; nothing downloaded" % ", ".join(done))
        if status == "changed" and record and record.files and album.image_count == 0:
            count = len(record.files)
            notes.append("empty on SmugMug now: its %d file%s %s kept" % (count, plural(count),
                                                                         "is" if count == 1 else "are"))
        elif plan is not None and run.plain and record.parts:     # a switch to files: its zips unpacked
            fetch = plan.fetch
            notes.append("files listed: its %d zip part%s unpacked, %d file%s to fetch on its own, no archive" % (
                len(record.parts), plural(len(record.parts)), len(fetch), plural(len(fetch))))
            count = len(record.files) + (record.manifest is not None)
            notes.append("up to %d old file%s to versions" % (count, plural(count)))
        elif plan is not None and not plan.archive:
            fetch = plan.fetch
            notes.append("files listed: %d file%s to fetch on its own, no archive" % (len(fetch), plural(len(fetch))))
            kept = {n for n, _ in plan.kept or ()} | {w["file"] for w in plan.locations.values() if "file" in w}
            rewritten = {n for n, (_, changed) in (sidecars or {}).items() if changed}   # (a sidecar whose text
            kept |= set(sidecars or ())                                                 # stays, stays)
            count = 1 + sum(1 for f in record.files if f.name in on_disk and (
                f.name not in kept or f.name in rewritten or f.name in {t.name for t in fetch}))
            notes.append("%d old file%s to versions" % (count, plural(count)))
        elif status == "changed" and record and record.files and run.plain and plan is None:
            notes.append("listed and compared with the files on disk; only what changed is fetched")
        elif status == "changed" and record and record.files:
            if plan is not None:
                notes.append("files listed: a fresh archive (%s)" % plan.archive)
            # only what the new backup replaces with other bytes, or no longer has, goes: the
            # dry run cannot know which (it downloads nothing), so it says how many at most
            count = len(record.files) + (record.manifest is not None)
            notes.append("up to %d old file%s to versions" % (count, plural(count)))
        self.dry_counts[shown][0] += 1
        self.dry_counts[shown][1] += album.image_count or 0
        heapq.heappush(self.dry_lines, (album.path, "%-9s %s%s" % (shown, album.rel, " (%s)" % "; ".join(notes)
                                                           if notes else "")))

    def dry_lines_ready(self, pending):
        """Print the dry run's lines in path order as soon as no folder still being listed (pending:
        their paths) can hold a path that sorts before them, so that `| head` ends the walk early."""
        bound = min(pending) if pending else None
        while self.dry_lines and (bound is None or self.dry_lines[0][0] < bound):
            self.options.print_line(heapq.heappop(self.dry_lines)[1])

    def tick(self, orchestrator):
        """Once per turn of the orchestrator's loop: the rate, the waits, the status line."""
        now = self._clock()
        self.meter.sample()
        wait = self.current_wait(orchestrator)
        if (wait and wait[0]) != (self.wait and self.wait[0]):
            if self.wait and self.wait[0] == "unreachable" and self.wait_logged is not None:
                log.info("SmugMug answers again after %s", human_seconds(now - self.wait_since))
            self.wait, self.wait_since, self.wait_logged = wait, now, None
        elif wait:
            self.wait = wait
        if wait and (self.wait_logged is None and (wait[0] != "preparation" or now - self.wait_since >= 5.0)
                     or self.wait_logged is not None and now - self.wait_logged >= WAIT_LOG_INTERVAL):
            _kind, text, cause = wait
            if cause and self.wait_logged is not None and cause == self.cause_logged:
                log.info("%s", text.replace("unreachable", "still unreachable", 1))   # the cause once
            else:
                log.info("%s%s", text, " (%s)" % cause if cause else "")
            self.wait_logged, self.cause_logged = now, cause
            if cause and not self.options.quiet:
                orchestrator.summary.cause_shown = cause
        if self.status.enabled and not self.options.dry_run:
            self.status.show(self.line(orchestrator, wait))

    def current_wait(self, orchestrator):
        """What the run waits for now, if it waits: (kind, text, cause or ""), else None. An
        outage says since when, and when the run gives up (unreachable_minutes after)."""
        link, gate = orchestrator.client.link, orchestrator.client.gate
        since = link.since
        if not link.up and since is not None:
            return "unreachable", "SmugMug unreachable since %s, giving up at %s" % (
                time.strftime("%H:%M", time.localtime(since)),
                time.strftime("%H:%M", time.localtime(since + link.give_up))), link.reason
        resumes = gate.resumes()
        if resumes is not None:
            return "rate limit", "SmugMug rate limit: resuming at %s" % time.strftime(
                "%H:%M:%S", time.localtime(resumes)), ""
        preparing = orchestrator.count("requesting", "preparing")
        if preparing and not orchestrator.scheduler.running:
            return "preparation", "waiting for %d archive%s to be prepared" % (preparing, plural(preparing)), ""
        return None

    def line(self, orchestrator, wait):
        """The status line's parts: albums done of found, bytes done of the known total, the
        recent rate and the time left, what the run waits for; (--verbose) the pipeline."""
        s, scheduler = orchestrator.summary, orchestrator.scheduler
        done = s.backed_up + s.unchanged
        known = max(orchestrator.bytes_known, self.meter.done)
        listing = not s.albums_found and (any(kind in ("root", "walk") for kind, _ in orchestrator.futures.values())
                                          or bool(orchestrator.walk.to_list))
        parts = [(1, "" if wait and not s.albums_found else "listing folders..." if listing    # (no album yet)
                  else "%d of %d album%s" % (done, s.albums_found, plural(s.albums_found))),
                 (2, "%s of %s" % (human_bytes(self.meter.done), human_bytes(known)) if known else "")]
        rate = self.meter.rate(STATUS_RATE_SPAN)
        left = self.bytes_left(orchestrator)
        if left is not None and left[1]:           # a total extrapolated from the archives seen
            parts[1] = (2, "%s of about %s" % (human_bytes(self.meter.done), human_bytes(self.meter.done + left[0])))
        elif left is None and known:               # sizes still unknown: the total so far is a floor
            parts[1] = (2, "%s of at least %s" % (human_bytes(self.meter.done), human_bytes(known)))
        if wait and wait[0] != "preparation" or not rate:     # an outage outranks the counts, its cause not
            parts += [(0 if wait and wait[2] else 1, wait[1] if wait else ""), (3, wait[2] if wait else "")]
        else:
            parts.append((1, "%s/s" % human_bytes(rate)))
            if left is not None:
                parts.append((1, human_eta(left[0] / rate)))
        if s.failed:
            parts.append((2, "%d failed" % len(s.failed)))
        if self.options.verbose:
            parts.append((3, "%d preparing, %d ready, %d downloading, window %d" % (
                orchestrator.count("requesting", "preparing"), len(scheduler.queue), len(scheduler.running),
                scheduler.window.limit)))
        return parts


    def bytes_left(self, orchestrator):
        """(bytes still to download, extrapolated?) once it can be told: the walk done, and a few
        archives listed (the albums whose archive is not yet listed counted at the average
        archive seen so far); else None."""
        if orchestrator.walk.to_list or any(kind in ("root", "walk", "details")
                                            for kind, _ in orchestrator.futures.values()):
            return None
        unknown = orchestrator.count("new", "waiting", "requesting", "preparing")
        prepared, size = orchestrator.scheduler.prepared, orchestrator.scheduler.prepared_bytes
        if unknown and prepared < ETA_ARCHIVES:
            return None
        known = max(0, orchestrator.bytes_known - self.meter.done)
        return (known + unknown * size / prepared, True) if unknown else (known, False)


def plural(n):
    return "" if n == 1 else "s"


def on_their_own(n, noun=""):
    """ "1 file on its own", "3 files on their own" (noun ""): "1 fetched on its own"..."""
    return "%d %s on %s own" % (n, noun + plural(n) if noun else "fetched", "its" if n == 1 else "their")


def print_summary(summary, options):
    """The end of a run, the same for a finished, stopped and interrupted one: one line, then
    the failed albums each once with its reason, then what was checked, fetched and versioned.

    In the log it always comes last; under --quiet only a run that did not succeed reaches
    the terminal (the first line and the failures), so cron mails only on trouble."""
    failed = len(summary.failed)
    done = summary.backed_up + summary.unchanged
    not_attempted = max(0, summary.albums_found - done - failed)
    trouble = failed or summary.write_error or summary.interrupted
    how = "Interrupted" if summary.interrupted else "Stopped" if summary.write_error else "Done"
    why = "Ctrl-C or SIGTERM" if summary.interrupted else summary.write_error
    if not summary.reached:          # nothing to count: one line, naming the cause unless a wait line did
        shown = summary.cause_shown and why.endswith(": " + summary.cause_shown)
        log.log(NOTICE, "%s after %s, before reaching the account: nothing was backed up%s.", how,
                human_seconds(summary.seconds), " (%s)" % why if why and not shown else "")
        return
    log.log(NOTICE if trouble else logging.INFO,
            "%s after %s: %d album%s backed up, %d unchanged, %d failed, %d not attempted%s.", how,
            human_seconds(summary.seconds), summary.backed_up, plural(summary.backed_up), summary.unchanged,
            failed, not_attempted, " (%s)" % why if why else "")
    for path, reason in sorted(summary.failed.items()):
        log.log(NOTICE, "  failed: %s: %s", path, reason)
    counts = ["%d file%s checked against SmugMug's listing" % (summary.files_checked, plural(summary.files_checked)),
              on_their_own(summary.files_fetched) + (" (%s)" % human_bytes(summary.fetched_bytes)
                                                     if summary.files_fetched else ""),
              "%d moved to versions" % summary.versioned]
    if summary.parts:
        counts.insert(0, "%d part%s (%s) downloaded" % (summary.parts, plural(summary.parts),
                                                        human_bytes(summary.bytes)))
    log.info("%s.", ", ".join(counts))
    if summary.renditions:
        log.info("%d file%s saved as SmugMug's largest rendition: no original offered.", summary.renditions,
                 plural(summary.renditions))
    if summary.by_file:
        log.info("%d album%s saved file by file: %s", len(summary.by_file), plural(len(summary.by_file)),
                 ", ".join(summary.by_file[:5]) + (" ..." if len(summary.by_file) > 5 else ""))
    if summary.moved:
        log.info("%d album%s moved or renamed on SmugMug: %s files moved along.", summary.moved,
                 plural(summary.moved), "its" if summary.moved == 1 else "their")
    for path, files in sorted(summary.missing.items()):
        log.info("%s: %d file%s not saved:", path, len(files), plural(len(files)))
        for name, why in files[:20]:
            log.info("  %s: %s", name, why)
        if len(files) > 20:
            log.info("  ... and %d more (see its metadata.json)", len(files) - 20)
    if summary.emptied:
        log.info("%d album%s empty on SmugMug now (local files kept): %s", len(summary.emptied),
                 plural(len(summary.emptied)), ", ".join(summary.emptied))
    if summary.gone_photos:
        print_gone_photos(summary.gone_photos)
    if summary.last_copies_removed:
        log.info("%d photo%s gone from SmugMug longer than keep_deleted_days: the last cop%s removed.",
                 summary.last_copies_removed, plural(summary.last_copies_removed),
                 "y" if summary.last_copies_removed == 1 else "ies")
    if summary.gone:
        log.info("%d album%s gone from SmugMug (local files kept):", len(summary.gone), plural(len(summary.gone)))
        for path in summary.gone:
            log.info("  %s", path)
    waits = [(kind, seconds) for kind, seconds in sorted(summary.waited.items()) if seconds >= 1]
    if waits:
        log.info("Waited %s in all: %s.", human_seconds(sum(s for _, s in waits)),
                 ", ".join("%s %s" % ("SmugMug unreachable" if kind == "unreachable" else "SmugMug's " + kind,
                                      human_seconds(s)) for kind, s in waits))


def print_gone_photos(photos, groups=5, names=5):
    """The photos a run found gone from SmugMug ([(album path, file, where kept, kind, identity)]): how many,
    then a line per file that keeps them (a few of each, then counts)."""
    log.info("%d photo%s found gone from SmugMug, kept in the backup:", len(photos), plural(len(photos)))
    held = collections.OrderedDict()
    for album, name, where, kind, _identity in photos:
        held.setdefault(where, []).append("%s%s" % (name, " (replaced)" if kind == "replaced" else ""))
    for where, files in list(held.items())[:groups]:
        log.info("  %s%s: in %s", ", ".join(files[:names]),
                 " and %d more" % (len(files) - names) if len(files) > names else "", where)
    if len(held) > groups:
        rest = list(held.values())[groups:]
        log.info("  ... and %d more in %d other file%s", sum(map(len, rest)), len(rest), plural(len(rest)))


def print_dry_run(reporter, summary, options):
    """A dry run's findings, in path order (so that nightly dry runs compare), and the totals:
    albums (and the images they hold) by status."""
    for _path, line in sorted(reporter.dry_lines + [(tuple(p.split("/")), "%-9s %s" % ("gone", p))
                                                     for p in summary.gone]):
        options.print_line(line)
    counts = reporter.dry_counts
    counts["gone"][0] = len(summary.gone)
    shown = [s for s in ("new", "changed", "recheck", "unpack", "unchanged", "moved", "gone", "skipped")
             if counts[s][0] or s not in ("recheck", "unpack")]
    work = sum(counts[s][1] for s in ("new", "changed", "recheck"))
    options.print_line("total: %s; %d image%s in the albums to back up" % (
        ", ".join("%d %s" % (counts[s][0], s) + (" (%d image%s)" % (counts[s][1], plural(counts[s][1]))
                                                  if counts[s][1] else "")
                  for s in shown), work, plural(work)))


# Pipeline ###################################################################

class AlbumRun:
    """One album's way through a run: an explicit state machine, touched by the orchestrator alone.

        new -> waiting -> requesting -> preparing -> downloading -> checking -> fetching -> done
    and besides: waiting again when its archive failed, expired or was never
    listed (a new request); preparing again from downloading when a download
    link was refused (a fresh link is looked up); checking straight from
    requesting or preparing when SmugMug will not prepare the archive (saved
    file by file) or from new for a recheck of what is on disk; downloading
    again from checking when a part is not a sound zip; waiting from checking when a changed
    album planned from its manifest costs less through an archive; failed from anywhere.
    Every retry counter is in tries.
    """

    __slots__ = ("album", "record", "reason", "state", "ticket", "_tries", "asked_at", "first_asked_at",
                 "answered_at", "looks", "generation", "_cancel", "_running", "outstanding", "parts", "sizes",
                 "from_disk", "by_file", "plan", "fetched", "missing", "unfetched", "plain", "sidecars",
                 "tally")    # no __dict__: an AlbumRun waits for each album found, 10,000 of them
    NOTHING = types.MappingProxyType({})   # the parts and files of an album that has none yet: one for
    NO_TICKET = ArchiveTicket()            # all, read-only; the ticket of an archive not asked for yet

    MOVES = {
        "new": ("waiting", "checking", "done", "failed"),
        "waiting": ("requesting", "failed"),
        "requesting": ("preparing", "downloading", "waiting", "checking", "done", "failed"),
        "preparing": ("downloading", "waiting", "checking", "failed"),
        "downloading": ("checking", "waiting", "preparing", "failed"),
        "checking": ("fetching", "downloading", "waiting", "done", "failed"),
        "fetching": ("done", "failed"),
        "done": (),
        "failed": (),
    }

    def __init__(self, album, record, reason):
        self.album = album
        self.record = record          # AlbumRecord before this run, or None
        self.reason = reason          # new / changed / recheck / due
        self.state = "new"
        self.ticket = self.NO_TICKET  # the archive this album waits for
        self._tries = None            # error, removed, lost, part_check, refresh (tries)
        self.asked_at = 0.0           # when the current archive was requested (monotonic)
        self.first_asked_at = 0.0     # the timeout spans every request
        self.answered_at = 0.0        # when SmugMug answered that request: the looks' waits count from it
        self.looks = 0                # looks at the current request
        self.generation = 0           # bumped when an archive is given up: its downloads are stale
        self._cancel = None           # set when the current archive is given up (made when first asked for)
        self._running = None          # downloads in flight, by generation (running)
        self.outstanding = 0          # downloads (parts or files) of this step not finished
        self.parts = self.NOTHING     # local part name -> ArchivePart of the current archive
        self.sizes = self.NOTHING     # local part name -> size on disk
        self.from_disk = False        # the parts are the recorded final files (a recheck)
        self.by_file = ""             # why the album is saved file by file, if it is
        self.plan = None              # AlbumPlan from the check stage
        self.fetched = self.NOTHING   # loose file name -> size (each a dict from fetching on)
        self.missing = self.NOTHING   # ImageKey -> why SmugMug would not give it (refused)
        self.unfetched = self.NOTHING  # ImageKey -> why it could not be fetched (retry next run)
        self.plain = False            # the files layout: every file plain, parts downloaded to transport/
        self.sidecars = "none"        # XMP sidecar names: ext, noext, none
        self.tally = None             # the orchestrator's count of its runs by state, while one of them

    def release(self):
        """The album is settled (done or failed): what it needed in flight (its listing and plan,
        its parts, what it fetched) is let go. What stays of a backed-up album is its record in
        the state, so that a run's memory does not grow with the photos it has saved."""
        self.plan, self.parts, self.sizes, self.fetched = None, self.NOTHING, self.NOTHING, self.NOTHING
        self.missing, self.unfetched = self.NOTHING, self.NOTHING
        self.ticket = self.NO_TICKET

    @property
    def tries(self):
        """The retry counters (made when first counted: none for an album waiting its turn)."""
        if self._tries is None:
            self._tries = collections.Counter()
        return self._tries

    @property
    def running(self):
        """Downloads in flight, by generation (made when the first starts)."""
        if self._running is None:
            self._running = collections.Counter()
        return self._running

    def to(self, state):
        """Move to state; a move the table does not allow is a bug, said loudly."""
        if state not in self.MOVES[self.state]:
            raise RuntimeError("album %s: %s -> %s is not a move" % (self.album.rel, self.state, state))
        if self.tally is not None:
            self.tally[self.state] -= 1
            self.tally[state] += 1
        if state == "fetching":             # (entered once: then done or failed)
            self.fetched, self.missing, self.unfetched = {}, {}, {}
        self.state = state

    @property
    def cancel(self):
        """The Event the current archive's downloads stop on: made when a download first needs it
        (an Event is a lock and a condition: not one for each of 10,000 albums waiting)."""
        if self._cancel is None:
            self._cancel = threading.Event()
        return self._cancel

    def abandon_archive(self):
        """Give up on the current archive: its running downloads stop and are ignored."""
        self.generation += 1
        if self._cancel is not None:
            self._cancel.set()
        self._cancel = None
        self.outstanding = 0
        self.parts, self.sizes = {}, {}

    def new_archive(self, given_up):
        """Back to waiting for a new archive (given_up: the current one failed; it and every
        archive listed with it are stale from now on)."""
        self.abandon_archive()
        if given_up:
            self.ticket = self.ticket.given_up()
        else:                                   # the parts on disk are bad: an archive, not a recheck
            self.from_disk, self.reason = False, "changed"
        self.to("waiting")

    def take_archive(self, parts):
        """Downloading the archive's parts: {file name: ArchivePart}, all outstanding."""
        self.to("downloading")
        names = part_file_names(parts)
        self.parts, self.sizes, self.outstanding = {names[p.part]: p for p in parts}, {}, len(parts)
        return self.parts

    def part_done(self, name, size):
        """A part is downloaded: True when it was the last one."""
        self.sizes[name] = size
        self.outstanding -= 1
        return self.outstanding == 0

    def file_done(self, task, exc, size):
        """A file the zips lack is fetched, or not (refused: SmugMug will not give it; else the
        next run tries again): True when it was the last one."""
        if exc is None:
            self.fetched[task.name] = size
        elif isinstance(exc, Refused):
            self.missing[task.file.key] = "refused by SmugMug (%s)" % exc
        else:
            self.unfetched[task.file.key] = str(exc)
        self.outstanding -= 1
        return self.outstanding == 0

    def check_inputs(self, folder, transport):
        """(parts, folder, old, plain) for the check stage: the parts just downloaded (NAME.part,
        in transport for the files layout), those on disk (a recheck; planned from the manifest,
        only those that are sound) or none (file by file); what it needs of the previous backup,
        if any. The files layout unpacks parts on disk: it reads them."""
        light = self.from_disk and self.reason in ("due", "changed") and not (self.plain and self.record.parts)
        if self.by_file:
            parts = []
        elif self.from_disk:        # planned from the manifest: only the parts on disk that are sound
            parts = [(f.name, os.path.join(folder, f.name)) for f in self.record.parts
                     if not light or (f.name not in self.record.damaged and file_sizes_match(folder, [f]))]
        else:
            parts = [(name, os.path.join(transport if self.plain else folder, name) + ".part")
                     for name in sorted(self.parts)]
        old = None
        if self.record and self.record.path == self.album.rel:
            old = OldBackup(folder, frozenset(f.name for f in self.record.files if f.kind == "file"),
                            light=light, parts=tuple((f.name, f.size) for f in self.record.parts),
                            damaged=frozenset(self.record.damaged))
        return parts, folder, old, self.plain

    def take_an_archive(self):
        """Planned from its manifest, the album costs less through a fresh archive: waiting for one."""
        self.from_disk, self.reason, self.plan = False, "changed", None
        self.to("waiting")

    # What the album does next: (action, why) for Orchestrator.act(). The actions: download,
    # wait (for its archive), again (a new archive), refresh (fresh links for the same one),
    # by_file, recheck (the parts on disk are bad: a new archive), redownload (bad parts),
    # vanished, fail. The retry counters are counted here, and only here.

    def after_archive(self, state, timeout, now):
        """SmugMug said `state` of the archive the album waits for."""
        if state == "complete":
            return "download", ""
        if state in ("error", "removed"):
            return self.archive_failed(state, "SmugMug could not prepare the archive (Error)" if state == "error"
                                       else "archive expired (Removed)")
        if now - self.first_asked_at > timeout:
            return "by_file", "archive not ready after %s" % human_seconds(now - self.first_asked_at)
        if state == "none" and self.looks >= REQUEST_AGAIN_AFTER_POLLS:
            self.tries["lost"] += 1
            if self.tries["lost"] > LOST_REQUEST_RETRIES:
                return "by_file", "SmugMug never listed the archive (%d requests)" % self.tries["lost"]
            return "again", ""
        return "wait", ""

    def archive_failed(self, kind, why):
        """Error or Removed: a new archive a bounded number of times, then file by file."""
        self.tries[kind] += 1
        if self.tries[kind] > (ARCHIVE_ERROR_RETRIES if kind == "error" else ARCHIVE_REMOVED_RETRIES):
            return "by_file", "%s, %d tries" % (why, self.tries[kind])
        return "again", why

    def after_error(self, kind, exc):
        """A stage of kind raised exc for this album."""
        if isinstance(exc, ArchiveGone):        # a link refused: expired (the machine slept?) or gone
            self.tries["refresh"] += 1
            if self.tries["refresh"] > LINK_REFRESHES:
                return self.archive_failed("removed", str(exc))
            return "refresh", str(exc)
        if isinstance(exc, Forbidden) and kind == "request":
            return "by_file", "SmugMug would not prepare an archive (%s)" % exc
        if isinstance(exc, NotFound) and kind in ("request", "details", "check"):   # (the listing's 404)
            return "vanished", ""
        return "fail", str(exc)

    def after_check(self, plan):
        """The check found parts that are not sound zips (plan.bad_parts)."""
        why = "; ".join(sorted(plan.bad_parts.values()))
        self.tries["part_check"] += 1
        if self.tries["part_check"] > PART_CHECK_RETRIES:
            return "fail", "archive is not a sound zip after %d downloads: %s" % (self.tries["part_check"], why)
        return ("recheck" if self.from_disk else "redownload"), why


@dataclass(eq=False)
class DownloadTask:
    """A part or a loose file waiting for a download worker."""
    run: AlbumRun
    generation: int
    name: str                     # local final name in the album's folder
    temp: str
    resume_ok: bool
    part: Optional[ArchivePart] = None
    file: Optional[FileTask] = None
    done: int = 0                 # bytes written so far (by its worker)

    def advance(self, meter, n):
        """Called from the download thread: n more bytes written."""
        self.done += n
        meter.add(n)

    @property
    def size(self):
        return (self.part.size if self.part else self.file.size) or 0


def partial_key(album, name):
    """How the state names an album's NAME.part: its path relative to output_dir."""
    return "/".join(album.path + (name,))


def transport_rel(album, name=None):
    """Where the files layout downloads an album's zip parts (and name, one of them): the tool's
    own folder, not the album's."""
    return "/".join((STATE_DIR, TRANSPORT_DIR, clean_name(album.album_key)) + ((name,) if name else ()))


class Walk:
    """What the folder walk has seen, and what of it --include/--exclude select: the folders to
    list, the albums found (each once), the patterns that matched, and whether it saw the whole
    account (only then can an album be called gone)."""

    def __init__(self, options):
        self.includes, self.excludes = options.includes, options.excludes
        self.nodes, self.paths, self.include_hits, self.keys = set(), set(), set(), set()
        self.complete = True
        self.to_list = collections.deque()      # folders found, not yet submitted for listing
        self.listing = 0                        # folders submitted for listing, their result not yet handled

    def selected(self, rel):
        return is_selected(rel, self.includes, self.excludes)

    def folders(self, folders):
        """The subfolders to list: each once, only where a selected album may be."""
        if self.includes:
            self.paths.update("/".join(f.path) for f in folders)
        fresh = [f for f in folders if f.node_id not in self.nodes
                 and folder_may_match("/".join(f.path), self.includes, self.excludes)]
        self.nodes.update(f.node_id for f in fresh)
        return fresh

    def albums(self, albums):
        """The albums to back up: each once (by AlbumKey: the walk keeps no second set of their
        node ids), selected (not counted otherwise)."""
        if self.includes:                   # the paths are for the message of an --include unmatched
            self.paths.update(a.rel for a in albums)
        fresh = []
        for album in albums:
            if album.album_key not in self.keys and self.selected(album.rel):
                self.include_hits.update(p for p in self.includes if path_matches([p], album.rel))
                self.keys.add(album.album_key)
                fresh.append(album)
        return fresh

    @property
    def whole(self):
        """Did the walk see the whole account (every folder listed, no --include/--exclude)?"""
        return self.complete and not (self.includes or self.excludes)

    def gone(self, recorded):
        """The paths of the albums recorded (AlbumKey -> AlbumRecord) that a whole walk did not
        find: none when --include/--exclude chose what to walk."""
        if not self.whole:
            return []
        return sorted(r.path for k, r in recorded.items() if k not in self.keys)

    def unmatched(self):
        """The --include patterns no album matched."""
        return [p for p in self.includes if p not in self.include_hits]


def walk_threads(workers):
    return max(4, 2 * workers)


def stage_pools(client, workers):
    """The stages' thread pools, by name; each thread's API calls go with its stage's priority."""
    sizes = {"walk": walk_threads(workers), "request": workers, "look": workers, "check": workers,
             "download": workers}
    return {name: concurrent.futures.ThreadPoolExecutor(size, name, initializer=client.set_priority,
                                                        initargs=(PRIORITY.get(name, PRIORITY["walk"]),))
            for name, size in sizes.items()}


class Orchestrator:
    """Routes albums between the pools and holds no policy of its own: the Scheduler says
    what may start, the AlbumRun what an album does next, the Store changes the disk, the
    Reporter says what happened; each stage's result goes to its handler (self.handlers).

    One error policy: a LocalWriteError fails its album, and stops new work when it is
    fatal (a full disk, output_dir, the state); anything else a worker raises is its
    album's failure; AuthError, Unreachable and Interrupted end the run.
    """

    def __init__(self, client, config, options, state, store, reporter):
        self.client, self.config, self.options = client, config, options
        self.state, self.store, self.reporter = state, store, reporter
        self.out = config.output_dir
        self.summary = Summary()
        workers = max(1, config.workers)
        self.pools = stage_pools(client, workers)
        self.scheduler = Scheduler(config, workers, client.link, client.gate, reporter.meter)
        self.futures = {}                       # future -> (kind, payload)
        self.runs = {}                          # AlbumKey -> AlbumRun of this run (enlist, settled)
        self.states = collections.Counter()     # those runs by state, counted as they move (count())
        store.owners.begin(state.albums.values())
        self.walk = Walk(options)
        self.walk_ahead = WALK_AHEAD * walk_threads(workers)
        self.walk_waiting = WALK_WAITING * max(1, config.max_preparing)     # twice what the window may hold
        self.halt = False                       # start nothing new (a fatal write error, SmugMug unreachable)
        self.bytes_known = 0
        self.nickname = None                    # the account's, once found (the walk has begun)
        self.handlers = {"walk": self.on_walk, "details": self.on_details, "dry": self.on_dry_check,
                         "request": self.on_request,
                         "look": self.on_look, "download": self.on_download, "check": self.on_check,
                         "fetch": self.on_fetch, "wait": lambda run, result: None}

    # -- the loop --

    def submit(self, pool, kind, payload, fn, *args):
        self.futures[self.pools[pool].submit(fn, *args)] = (kind, payload)

    def run(self):
        self.submit("walk", "root", None, find_root, self.client, self.config)
        try:
            while self.futures or (not self.halt and (self.scheduler.has_work() or self.walk.to_list)):
                self.start_work()
                done, _ = concurrent.futures.wait(list(self.futures), timeout=self.scheduler.timeout(),
                                                  return_when=concurrent.futures.FIRST_COMPLETED)
                while done:                     # popped: a result (an album's listing...) is held
                    self.finished(done.pop())   # no longer than it is handled
                self.reporter.tick(self)
        except Unreachable as exc:            # like a write error: stop, keep what is done (the wait's
            self.stop_new_work(str(exc), say=False)     # line named the cause, the summary names it)
            self.client.stop.set()
        self.finish()
        return self.summary

    def start_work(self):
        """Start what the scheduler says may start now."""
        if self.halt:
            return
        self.list_folders()
        for run in self.scheduler.requests():
            run.to("requesting")
            run.asked_at = time.monotonic()
            run.first_asked_at, run.looks = run.first_asked_at or run.asked_at, 0   # the timeout spans re-requests
            asked = run.album.album_key in self.state.requested      # by a run since the last backup
            moved = bool(run.record) and count_moved(run.album, run.record)   # then only an archive a run
            self.submit("request", "request", (run, run.generation), request_archive, self.client, run.album,
                        run.ticket, moved or self.scheduler.look_first(run, asked),      # asked for since
                        MAX_TIME if moved and not asked else None)
        for run in self.scheduler.looks_now():
            self.submit("look", "look", (run, run.generation), look_at_archive, self.client, run.album, run.ticket)
        for task in self.scheduler.downloads():
            task.run.running[task.generation] += 1
            stage, what = (download_part, task.part) if task.part is not None else (fetch_file, task.file)
            self.submit("download", "download" if task.part is not None else "fetch", task, stage, self.client,
                        self.store, what, task.temp, task.resume_ok,
                        functools.partial(task.advance, self.reporter.meter), task.run.cancel)
        if self.scheduler.paused() and "wait" not in (kind for kind, _ in self.futures.values()):
            self.submit("walk", "wait", None, self.client.link.wait_up)   # someone probes the link
        if not self.futures:
            self.client.stop.wait(self.scheduler.timeout())

    def list_folders(self):
        """Folders the walk found are listed a few at a time: not while listings the loop has not
        yet handled hold walk_ahead folders' albums, nor while walk_waiting albums found wait for
        a request (each waits whole: 10,000 at once would cost their memory at once)."""
        walk = self.walk
        while walk.to_list and walk.listing < self.walk_ahead and len(self.scheduler.waiting) < self.walk_waiting:
            folder = walk.to_list.popleft()
            walk.listing += 1
            self.submit("walk", "walk", folder, walk_folder, self.client, folder)

    def finished(self, future):
        """A finished piece of work: its result goes to its handler, unless it is stale (its album
        gave up the archive it was for); errors go by the one policy."""
        kind, payload = self.futures.pop(future)
        if kind == "walk":
            self.walk.listing -= 1
        if kind == "root":
            return self.on_root(future)
        task = payload if isinstance(payload, DownloadTask) else None
        run, generation = (task.run, task.generation) if task else payload if isinstance(payload, tuple) else \
            (None, None)
        if task:
            self.scheduler.download_done(task)
            run.running[generation] -= 1
        live = run is None or (generation == run.generation and run.state not in ("done", "failed"))
        exc = future.exception()
        try:
            if kind == "look":
                self.scheduler.looked(run, exc is None and future.result()[0] == "complete")
            if exc is None:
                return live and self.handlers[kind](payload if kind in ("walk", "download", "fetch") else run,
                                                    future.result())
            if isinstance(exc, (AuthError, Interrupted, Unreachable, OutputClosed, LocalWriteError, PathTaken)):
                raise exc
            if not isinstance(exc, BackupError):     # a bug or an unforeseen answer: this piece fails
                log.debug("unexpected error in %s", kind, exc_info=exc)
                exc = BackupError("%s: %s" % (type(exc).__name__, redact_urls(exc)))
            if kind == "walk":
                self.walk_failed(payload, exc)
            elif live and not isinstance(exc, Abandoned):   # (a download of an archive given up on stops)
                self.file_done(payload, exc) if kind == "fetch" else self.act(run, *run.after_error(kind, exc))
        except LocalWriteError as exc:
            if exc.fatal:
                self.stop_new_work(str(exc))
            self.fail(run, "could not write %s" % exc, where=getattr(payload, "path", None))
        except PathTaken as exc:
            self.fail(run, str(exc))
        except (AuthError, Interrupted, Unreachable, OutputClosed):
            raise
        except Exception as exc:           # a bug here: fail the album by name rather than the run
            log.debug("internal error after %s", kind, exc_info=True)
            if run is not None and run.state in ("done", "failed"):
                log.error("internal error after %s of %s: %s: %s", kind, run.album.rel, type(exc).__name__,
                          redact_urls(exc))
            self.fail(run, "internal error: %s: %s" % (type(exc).__name__, redact_urls(exc)),
                      where=getattr(payload, "path", None))

    # -- walk --

    def on_root(self, future):
        """The account to back up, or none: SmugMug failing (5xx, 429, no or broken answers,
        after the tries) stops the run; a 4xx (a user not found, no access) is the config's,
        for the caller to say."""
        try:
            self.nickname, root = future.result()
        except ApiError as exc:
            if exc.status is not None and 400 <= exc.status < 500 and exc.status != 429:
                raise
            return self.stop_new_work("could not reach the account: %s" % exc)
        self.summary.reached = True
        if self.options.dry_run:
            log.info("Dry run of account %s against the backup in %s (nothing is downloaded or written)",
                     self.nickname, self.out)
        else:
            log.info("Backing up account %s into %s", self.nickname, self.out)
        self.walk.nodes.add(root.node_id)
        self.walk.to_list.append(root)

    def walk_failed(self, folder, exc):
        self.walk.complete = False
        if isinstance(exc, NotFound):
            log.warning("folder %s is gone (404): skipped", "/".join(folder.path) or "the root folder")
        else:
            self.fail(None, "could not list folder: %s" % exc, where=folder.path)

    def on_walk(self, folder, result):
        folders, albums, skipped, short = result
        if short:
            self.walk_failed(folder, "%s children" % short)
        for where, why in skipped:
            if self.walk.selected(where):
                self.reporter.dry_counts["skipped"][0] += 1
                if not why.startswith("album without"):
                    log.warning("skipping %s: %s", where, why)
                else:                               # an album the run cannot back up: found, and failed
                    self.summary.albums_found += 1
                    self.fail(None, why, where=where.split("/"), folder=False)
        for sub in self.walk.folders(folders) if not self.halt else ():
            if not self.options.dry_run and self.walk.selected("/".join(sub.path)):
                self.store.make_folders("/".join(sub.path), quiet=True)
            self.walk.to_list.append(sub)
        for album in self.walk.albums(albums):
            self.found(album)
        self.dry_lines_ready()

    def found(self, album):
        """An album the walk found (and --include/--exclude select): where it goes, whether it
        moved, what it needs."""
        self.summary.albums_found += 1
        record = self.state.albums.get(album.album_key) or self.store.owners.adopt(album)
        album = self.store.owners.place(album, record)
        run = AlbumRun(album, record, "new")
        if album.album_key in self.store.blocked and not self.options.dry_run:
            self.enlist(run)
            return self.fail(run, self.store.blocked[album.album_key])
        run.plain, run.sidecars = self.config.layout == "files", self.config.sidecars
        in_way = None if self.options.dry_run else file_in_the_way(self.out, album.rel)
        if in_way is not None:                  # it cannot be placed: nothing is asked for
            self.enlist(run)
            return self.fail(run, in_the_way_message(in_way))
        if record and record.path != album.rel and not self.options.dry_run and not self.halt:
            self.enlist(run)
            try:
                run.record = self.store.move_album(record, album.rel)
                self.summary.moved += 1
            except (LocalWriteError, PathTaken) as exc:
                if getattr(exc, "fatal", False):
                    self.stop_new_work(str(exc))
                return self.fail(run, "could not move its files: %s" % exc)
        if album.has_details or not record:
            self.route(run)
        else:
            self.submit("request", "details", (run, run.generation), fetch_details, self.client, album)

    def on_details(self, run, album):
        run.album = album
        self.route(run)
        self.dry_lines_ready()

    def route(self, run):
        """Decide what an album needs once its timestamps are known (or it is new)."""
        album, record = run.album, run.record
        status = classify(album, record, self.out, self.config.recheck_days) if album.has_details or record else "new"
        if status in ("unchanged", "due", "recheck") and needs_unpack(record, run.plain, run.sidecars):
            status = "unpack"
        delta = status == "changed" and record.path == album.rel and plan_from_manifest(record, self.out)
        if self.options.dry_run and delta:
            run.from_disk, run.reason = True, status         # its files are listed, to say what it would fetch
            inputs = run.check_inputs(self.store.abs(album.rel), self.store.abs(transport_rel(album)))
            if run.plain and record.parts:      # zips to unpack: what they hold is taken from the manifest (none read)
                _, folder, old, _ = inputs
                inputs = ([(f.name, os.path.join(folder, f.name)) for f in record.parts if f.name not in
                           record.damaged and file_sizes_match(folder, [f])], folder, replace(old, light=True), False)
            return self.submit("check", "dry", (run, run.generation), dry_check, self.client, album, *inputs)
        if self.options.dry_run:
            return self.reporter.dry_run(run, status)
        if status == "unchanged":
            self.summary.unchanged += 1
        elif not self.halt:
            run.reason = status
            self.enlist(run)
            if album.image_count == 0:
                self.emptied(run)
            elif status in ("recheck", "due", "unpack") or delta or (run.plain and record and status == "changed"):
                run.from_disk = True         # only what changed is fetched (or an archive, if it costs less)
                self.check(run)
            else:
                run.to("waiting")
                self.scheduler.want_archive(run)

    def dry_lines_ready(self):
        """Lines of a dry run that no folder still being listed can precede: printed now."""
        if self.options.dry_run and not any(kind == "root" for kind, _ in self.futures.values()):
            self.reporter.dry_lines_ready([
                tuple(payload.path) if kind == "walk" else payload[0].album.path
                for kind, payload in self.futures.values() if kind in ("walk", "details", "dry")]
                + [tuple(folder.path) for folder in self.walk.to_list])

    def on_dry_check(self, run, plan):
        """A dry run's changed album, its files listed: what it would fetch, or an archive (and
        how many of its files on disk would go to versions)."""
        folder = self.store.abs(run.album.rel)
        on_disk = {f.name for f in run.record.files if os.path.lexists(os.path.join(folder, f.name))}
        sidecars = sidecar_files(plan.listing, {k: dict(w) for k, w in plan.locations.items()}, run.sidecars,
                                 folder, [n for n, _ in plan.kept or ()], written_sidecars(folder)) if plan.listing else {}
        self.reporter.dry_run(run, "changed", plan, on_disk, sidecars)
        self.dry_lines_ready()

    def emptied(self, run):
        """An album with no images: its folder; the files kept from before stay (and the summary says so)."""
        record = run.record
        if not (record and record.files):
            run.plan = AlbumPlan((), {})
            return self.commit(run)
        self.store.save_record(replace(record, last_updated=run.album.last_updated,
                                       images_last_updated=run.album.images_last_updated, image_count=0))
        self.reporter.emptied(self.summary, run.album.rel, len(record.files))
        folder = self.store.abs(record.path)        # its photos, kept where they are, are found gone
        doc = read_manifest(os.path.join(folder, MANIFEST_NAME))
        run.plan = AlbumPlan((), {}, before=tuple(p for p in manifest_photos(doc)
                                                  if os.path.exists(os.path.join(folder, p[2]))))
        self.note_gone(run, record.path)
        run.to("done")
        self.settled(run)

    # -- request and look --

    def on_request(self, run, result):
        album, state, parts, ticket = result
        if run.state != "requesting":
            return
        run.album, run.ticket, run.answered_at = album, ticket, time.monotonic()
        self.scheduler.reused = self.scheduler.reused or (not ticket.posted and state in ("complete", "preparing"))
        if ticket.posted:
            self.state.set_requested(album.album_key, True)
        if state == "empty":
            self.scheduler.leave(run)
            return self.emptied(run)
        self.archive_state(run, state, parts)

    def on_look(self, run, result):
        state, parts, ticket = result
        if run.state == "preparing":
            run.ticket = ticket
            run.looks += 1
            self.archive_state(run, state, parts)

    def archive_state(self, run, state, parts):
        """What SmugMug said of the archive the album waits for."""
        self.act(run, *run.after_archive(state, self.config.archive_timeout_hours * 3600, time.monotonic()),
                 parts=parts)

    NEXT = {"again": "requesting a new one", "recheck": "requesting a new archive",
            "by_file": "saving it file by file", "redownload": "downloading it again"}

    def act(self, run, action, why, parts=(), plan=None):
        """Do what the album decided (AlbumRun.after_*)."""
        if why and action in self.NEXT:
            log.warning("%s: %s; %s", run.album.rel, why, self.NEXT[action])
        if action == "download":
            self.scheduler.prepared_archive(run, sum(p.size or 0 for p in parts))
            self.store.make_folders(run.album.rel)
            if run.plain:
                self.store.make_folders(transport_rel(run.album))
            for name, part in run.take_archive(parts).items():
                self.queue_download(run, name, part=part)
        elif action == "wait":
            if run.state == "requesting":
                run.to("preparing")
            self.scheduler.preparing(run, max(run.asked_at, run.answered_at), learn=run.ticket.posted)
        elif action in ("again", "recheck"):     # a new archive, a little later (DateAdded has whole
            self.scheduler.leave(run)             # seconds: the new one is told apart by its second)
            run.new_archive(given_up=action == "again")
            self.scheduler.want_archive(run, REQUEST_AGAIN_DELAY if action == "again" else 0.0)
        elif action == "refresh":
            log.debug("%s: %s; looking up the archive again for fresh links", run.album.rel, why)
            run.abandon_archive()
            run.to("preparing")
            self.submit("look", "look", (run, run.generation), look_at_archive, self.client, run.album, run.ticket)
        elif action == "by_file":                 # SmugMug will not prepare it: every file on its own
            self.scheduler.leave(run)
            run.abandon_archive()
            run.by_file = why
            self.check(run)
        elif action == "redownload":
            run.to("downloading")
            run.outstanding = len(plan.bad_parts)
            for name in plan.bad_parts:
                self.queue_download(run, name, part=run.parts[name], resume=False)
        elif action == "vanished":                # deleted since the walk listed it (404): not a failure
            run.to("done")
            self.scheduler.leave(run)
            run.abandon_archive()
            log.warning("%s is gone from SmugMug since the walk listed it (404): skipped%s", run.album.rel,
                        "; its files from before are kept" if run.record else "")
            self.settled(run)
        else:
            self.fail(run, why)

    # -- download, check, fetch --

    def queue_download(self, run, name, part=None, file=None, resume=True):
        """Queue a part or a file; a NAME.part is resumed only if the state says it holds the same
        (its identity proves it: none, no resume)."""
        key = transport_rel(run.album, name) if part is not None and run.plain else partial_key(run.album, name)
        identity = part.identity if part else file.identity
        resume_ok = self.state.claim_partial(key, Partial(run.album.album_key, identity), resume and bool(identity))
        self.bytes_known += (part.size if part else file.size) or 0
        self.scheduler.queue_download(DownloadTask(run, run.generation, name, self.store.abs(key) + ".part",
                                                   resume_ok, part, file))

    def on_download(self, task, size):
        if task.done or not size:           # counted as downloaded: only what came this run (a part
            self.summary.parts += 1         # resumed, its rest; one already whole on disk, not at all)
        self.summary.bytes += task.done
        if task.run.state == "downloading" and task.run.part_done(task.name, size):
            self.check(task.run)

    def check(self, run):
        """List the album's files and test its zips (the parts just downloaded, or those on disk)."""
        run.to("checking")
        folder = self.store.abs(run.album.rel)
        self.submit("check", "check", (run, run.generation), check_album, self.client, run.album,
                    *run.check_inputs(folder, self.store.abs(transport_rel(run.album))))

    def on_check(self, run, plan):
        if run.state != "checking":
            return
        if plan.bad_parts:
            self.summary.files_checked += plan.files_checked
            return self.act(run, *run.after_check(plan), plan=plan)
        if plan.archive and run.from_disk:
            log.debug("%s: %s: taking a fresh archive", run.album.rel, plan.archive)
            run.take_an_archive()
            return self.scheduler.want_archive(run)
        self.summary.files_checked += plan.files_checked
        run.plan = plan
        if not plan.fetch:
            return self.commit(run)
        run.to("fetching")
        self.store.make_folders(run.album.rel)
        run.outstanding = len(plan.fetch)
        for task in plan.fetch:
            self.queue_download(run, task.name, file=task)

    def on_fetch(self, task, size):
        self.file_done(task, None, size)

    def file_done(self, task, exc, size=0):
        self.summary.files_fetched += exc is None
        self.summary.fetched_bytes += task.done if exc is None else 0     # this run's bytes (a resume: its rest)
        if task.run.state == "fetching" and task.run.file_done(task, exc, size):
            self.commit(task.run)

    # -- the commit point --

    def commit(self, run):
        """Every listed file is accounted for (in a part, saved on its own, or refused by
        SmugMug): the album's new backup takes its place (Store.commit: one journalled change;
        what it replaces goes to versions). When a file could not be fetched, or SmugMug no
        longer gives a file the previous backup has, or its listing was cut short, the previous
        files stay where they are and the album fails by name: the next run tries again."""
        if "done" not in AlbumRun.MOVES[run.state]:
            raise RuntimeError("album %s: commit from %s" % (run.album.rel, run.state))
        outcome = commit_outcome(run, self.store.abs(run.album.rel))
        if outcome.keep:
            return self.fail(run, outcome.keep)
        versioned = self.store.commit(run.album.album_key, run.album.rel, outcome)
        self.note_gone(run)
        self.state.set_requested(run.album.album_key, False)
        self.store.discard_parts(albums={run.album.album_key})
        if run.plain:
            self.store.prune_folder(self.store.abs(transport_rel(run.album)))
        run.to("done")
        lacking = self.reporter.committed(self.summary, run, outcome, versioned)
        self.settled(run)                   # its listing is released: memory does not grow with photos
        if lacking:
            self.fail(run, lacking, done=True)

    def moved_not_gone(self):
        """After a run that saw the whole account: a photo this run found gone from one album that
        another album lists (moved on SmugMug, or collected in both) is not gone from SmugMug: it
        leaves the summary and the record of gone photos (as a later run's retention would do)."""
        found = self.summary.gone_photos
        if not found:
            return
        _, listed = self.store.held_now({p[4] for p in found}, {})
        if listed:
            self.summary.gone_photos = [p for p in found if identity_key(p[4]) not in listed]
            self.store.set_gone([(key, i, None) for key, photos in self.state.gone.items() for i in photos
                                 if identity_key(i) in listed])

    def note_gone(self, run, rel=None):
        """After a commit (or an album emptied: rel, where its files stay): the photos the previous
        backup held that SmugMug no longer has are recorded (from now: keep_deleted_days) with
        where they are kept, a versions path or the part or file that stays, and named in the
        summary; those SmugMug lists again are no longer gone."""
        key, rel = run.album.album_key, rel or run.album.rel
        if run.plan.incomplete:
            return
        recorded = self.state.gone.get(key, {})
        listed = {photo_identity(f.key, f.archived_md5, f.archived_size) for f in run.plan.listing}
        changes = [(key, identity, None) for identity in recorded if identity in listed]
        for identity, name, holder in gone_photos(run.plan.before, run.plan.listing):
            where = self.store.last_versioned.get(rel + "/" + holder)
            if where is None and os.path.exists(self.store.abs(rel + "/" + holder)):
                where = rel + "/" + holder          # a part that stays, for the photos it still holds
            if where is None or identity in recorded:
                continue
            changes.append((key, identity, GonePhoto(name, iso_now(), "deleted", where)))
            self.summary.gone_photos.append((rel, name, where, "deleted", identity))
        self.store.set_gone(changes)

    def fail(self, run, reason, where=None, folder=True, done=False):
        """An album fails by name (or, run None, the folder or node at where)."""
        if run is None:
            path = "/".join(where or ())
            self.summary.failed[path + "/" if path and folder else path or "the root folder"] = reason
            return self.reporter.album("failed: %s: %s", path or "the root folder", reason)
        if run.state in ("done", "failed") and not done:
            return
        if not done:
            run.to("failed")
            self.scheduler.leave(run)
            run.abandon_archive()
            for name in run.plan.extracted if run.plan else ():
                try:
                    self.store.discard(self.store.abs(run.album.rel + "/" + name) + ".part")
                except LocalWriteError as exc:
                    log.warning("could not remove %s: %s", name + ".part", exc)
            self.settled(run)
        self.summary.failed[run.album.rel] = reason
        self.reporter.album("failed: %s: %s", run.album.rel, reason)

    def settled(self, run):
        """An album is done or failed: it lets go of what it held in flight, and a done one
        leaves self.runs (a failed one stays: finish() keeps its unfinished downloads)."""
        run.release()
        if run.state == "done" and self.runs.get(run.album.album_key) is run:
            del self.runs[run.album.album_key]
            self.states[run.state] -= 1
            run.tally = None

    def enlist(self, run):
        """run is one of this run's albums (self.runs), counted by state from now on."""
        old = self.runs.get(run.album.album_key)
        if old is run:
            return
        if old is not None:                 # (an AlbumKey the walk found twice: the last one counts)
            self.states[old.state] -= 1
            old.tally = None
        self.runs[run.album.album_key] = run
        self.states[run.state] += 1
        run.tally = self.states

    def stop_new_work(self, why, say=True):
        """A fatal write error, or SmugMug unreachable: start nothing new (the walk included).
        say: name why now (a run that goes on with the downloads under way); the summary says it
        at the end either way."""
        if not self.halt:
            if say and self.nickname is not None:   # (before SmugMug answered, the summary alone says why)
                log.error("stopping new downloads: %s", why)
            self.summary.write_error = why
        self.halt = True
        self.walk.complete = False          # folders not listed now: nothing can be called gone
        for future, _ in list(self.futures.items()):
            if future.cancel():
                del self.futures[future]
        self.scheduler.clear()

    # -- the end --

    def count(self, *states):
        """How many of this run's albums are in these states: kept as they move, not counted
        here (the reporter asks on every turn of the loop)."""
        return sum(self.states[state] for state in states)

    def finish(self):
        """Gone albums, clean-up and retention: only after a run that saw the whole account
        (not one that --include or --exclude narrowed)."""
        whole = self.walk.whole and not self.halt and not self.client.stop.is_set()
        if whole:
            self.summary.gone = self.walk.gone(self.state.albums)
        if whole and not self.options.dry_run:
            self.store.discard_parts(keep={k for k, r in self.runs.items() if r.state != "done"})
            try:
                self.moved_not_gone()
                pruned = self.store.prune_versions(self.config.keep_versions_days, self.config.keep_deleted_days,
                                                   summary=self.summary)
            except LocalWriteError as exc:
                log.error("retention of old versions stopped: %s", exc)
                self.summary.write_error = self.summary.write_error or str(exc)
                pruned = 0
            if pruned:
                log.info("removed %d versions folder%s older than keep_versions_days (%g)", pruned,
                         plural(pruned), self.config.keep_versions_days)
            if not (self.options.includes or self.options.excludes):
                try:
                    rows = self.store.write_index(index_lines(self.out, self.state, self.summary.gone))
                    log.info("%s lists %d file%s", INDEX_NAME, rows, plural(rows))
                except LocalWriteError as exc:
                    log.error("could not write %s: %s", INDEX_NAME, exc)
                    self.summary.write_error = self.summary.write_error or "could not write %s" % INDEX_NAME
        self.summary.versioned = self.store.versioned
        self.summary.waited = {"unreachable": self.client.link.time_down(),
                               "rate limit": self.client.gate.closed_seconds}
        self.summary.seconds = time.monotonic() - self.reporter.started

    def shutdown(self, wait):
        for pool in self.pools.values():
            pool.shutdown(wait=wait, cancel_futures=True)


@dataclass
class Outcome:
    """What committing an album comes to (commit_outcome): keep (why the previous files stay
    and the album fails), or the files: parts and loose files the backup holds, those placed
    now, old ones replaced (to versions), the new manifest text (None: unchanged or none)."""
    keep: str = ""
    parts: list = field(default_factory=list)       # [(name, size)]
    loose: list = field(default_factory=list)
    placed: list = field(default_factory=list)
    replaced: list = field(default_factory=list)
    manifest: Optional[str] = None
    files: bool = False                             # the album holds files (else: no manifest)
    missing: dict = field(default_factory=dict)     # ImageKey -> why SmugMug did not give it
    renditions: int = 0
    record: Optional["AlbumRecord"] = None           # the album's record once committed
    same: dict = field(default_factory=dict)        # placed files the same as the ones they replace
    dates: dict = field(default_factory=dict)       # plain file name -> when taken (epoch): its mtime
    sidecars: dict = field(default_factory=dict)    # XMP sidecar name -> its text, to write (new or changed)


def commit_outcome(run, folder):
    """The rules of the commit point, decided from the run alone (no I/O but reading the old
    manifest's and sidecars' text): replace only when complete, never what only the previous
    backup has."""
    album, plan, old = run.album, run.plan, run.record
    locations = {key: dict(where) for key, where in plan.locations.items()}
    for key, why in run.missing.items():
        locations[key] = {"missing": why}
    for key, where in list(locations.items()):
        if "missing" in where:              # the server's words may carry a signed URL
            locations[key] = dict(where, missing=redact_urls(where["missing"]))
    for key, where in locations.items():    # a rendition of unknown size: the size it came with
        if where.get("rendition") and where.get("size") is None and where["file"] in run.fetched:
            where["size"] = run.fetched[where["file"]]
    old_here = old is not None and old.path == album.rel
    missing = {k: w["missing"] for k, w in locations.items() if "missing" in w}
    if run.unfetched:
        return Outcome(keep="%d file%s could not be fetched (the next run tries again): %s" % (
            len(run.unfetched), plural(len(run.unfetched)), "; ".join(sorted(set(run.unfetched.values())))))
    if old_here and old.files:
        lost = sorted(set(missing) & plan.held_before)
        if plan.incomplete:
            return Outcome(keep="%s; the previous backup is kept as it is" % plan.incomplete)
        if lost:
            names = {f.key: f.file_name for f in plan.listing}
            return Outcome(keep="SmugMug no longer gives %s, which the previous backup has: it is kept as it "
                                "is (%s)" % (", ".join(names.get(k, k) for k in lost[:5]),
                                             "; ".join(sorted({missing[k] for k in lost}))))
    elif plan.incomplete:
        missing["(listing)"] = plan.incomplete
    if run.plain:                           # the files layout keeps no parts
        parts = []
    elif run.from_disk:
        parts = list(plan.kept) if plan.kept is not None else [(f.name, f.size) for f in old.parts]
    elif run.by_file:
        parts = []
    else:
        parts = [(name, run.sizes[name]) for name in sorted(run.parts)]
    loose = sorted({where["file"] for where in locations.values() if "file" in where})
    placed = [n for n, _ in parts if not run.from_disk] + [n for n in loose
                                                           if n in run.fetched or n in plan.extracted]
    sidecars = sidecar_files(plan.listing, locations, run.sidecars, folder, [n for n, _ in parts],
                             written_sidecars(folder) if old_here else None)
    holds = bool(parts or loose or plan.listing)
    kept = {n for n, _ in parts} | set(loose) | set(sidecars)
    replaced = [f.name for f in (old.files if old_here else []) if f.name in placed or f.name not in kept]
    text = None
    if holds:
        doc = manifest_document(album, replace(plan, locations=locations), parts)
        text = json_text(doc, indent=2) + "\n"
        if old_here and old.manifest is not None:
            try:
                same = read_text(os.path.join(folder, MANIFEST_NAME)) == text
            except (OSError, ValueError):
                same = False
            if same:
                text = None                 # unchanged: neither rewritten nor versioned
            else:
                replaced.append(MANIFEST_NAME)
    renditions = sum(1 for where in locations.values() if where.get("rendition") and where["file"] in placed)
    manifest_size = old.manifest if holds and old_here else None
    if text is not None:
        manifest_size = len(text.encode("utf-8"))
    files = [SavedFile(n, s, "archive") for n, s in parts]
    for name in loose:
        size = run.fetched.get(name, plan.extracted.get(name))
        if size is None:
            try:
                size = os.path.getsize(os.path.join(folder, name))
            except OSError:
                size = 0
        files.append(SavedFile(name, size, "file"))
    files += [SavedFile(name, len(text.encode("utf-8")), "sidecar") for name, (text, _) in sorted(sidecars.items())]
    record = AlbumRecord(album.album_key, album.node_id, album.rel, album.last_updated, album.images_last_updated,
                         files, manifest_size, complete=not missing, listed=iso_now(), image_count=album.image_count)
    taken = {f.key: capture_time(dict(f.fields))[1] for f in plan.listing}
    dates = {where["file"]: taken[key] for key, where in locations.items()
             if "file" in where and taken.get(key) is not None}
    return Outcome("", parts, loose, placed, replaced, text, holds, missing, renditions, record,
                   {n: sig for n, sig in plan.same.items() if n in placed and n in replaced}, dates,
                   {name: text for name, (text, changed) in sidecars.items() if changed})


def written_sidecars(folder):
    """{ImageKey: its entry} of the files the album's metadata.json in folder says have a sidecar:
    the fields the tool wrote that sidecar from."""
    doc = read_manifest(os.path.join(folder, MANIFEST_NAME)) or {}
    return {item["ImageKey"]: item for item in doc.get("files") or ()
            if isinstance(item, dict) and isinstance(item.get("ImageKey"), str) and item.get("sidecar")}


def sidecar_files(listing, locations, style, folder, taken, written=None):
    """The XMP sidecars of an album's plain files: {sidecar name: (text, to be written)}; each
    file's location names its sidecar ("sidecar"). taken: names they must not have. written
    (written_sidecars): a sidecar there that the tool wrote from the same metadata stays as it
    is, whatever an application wrote into it since; otherwise one that differs is written."""
    videos = {f.key for f in listing if f.is_video}
    plain = [(f, locations[f.key]["file"]) for f in listing if "file" in (locations.get(f.key) or {})]
    names = sidecar_names([(name, f.key in videos) for f, name in plain], style, list(taken) + [MANIFEST_NAME])
    out = {}
    for f, name in plain:
        if name not in names:
            continue
        locations[f.key]["sidecar"] = names[name]
        text = xmp_sidecar(dict(f.fields))
        before = (written or {}).get(f.key)
        if before is not None and before.get("sidecar") == names[name] and xmp_sidecar(before) == text and \
                os.path.isfile(os.path.join(folder, names[name])):
            out[names[name]] = (text, False)      # SmugMug's metadata for it has not changed
            continue
        try:
            changed = read_text(os.path.join(folder, names[name])) != text
        except (OSError, ValueError):
            changed = True
        out[names[name]] = (text, changed)
    return out


# CLI ########################################################################

EPILOG = """\
examples (the virtualenv's Python, as cron needs it):
  first time:  .venv/bin/python smugmug_download.py --authorize
  back up:     .venv/bin/python smugmug_download.py
  what's new:  .venv/bin/python smugmug_download.py --dry-run
  check disk:  .venv/bin/python smugmug_download.py --verify
  some albums: .venv/bin/python smugmug_download.py --include 'Family/2019/*'
  as files:    .venv/bin/python smugmug_download.py --layout files
               (plain files, XMP sidecars; every run: "layout" in the config)
  cron, every night at 03:00 (prints only on trouble):
    0 3 * * * cd /home/me/smugmug_download && .venv/bin/python \\
        smugmug_download.py --quiet --log-file /home/me/smugmug.log

exit codes: 0 all backed up or unchanged (--verify: all intact); 1 some
albums failed, a write error, or SmugMug unreachable for unreachable_minutes
(--verify: something damaged); 2 config, usage or credentials error; 3 another
run holds the lock; 130 interrupted; 141 stdout closed (`--dry-run | head`).
"""


def write_text(stream, text):
    """text on stream; what the stream's encoding cannot hold (a C locale, PYTHONIOENCODING=ascii)
    is escaped (\\xe9), never an error."""
    try:
        stream.write(text)
    except UnicodeEncodeError:
        encoding = getattr(stream, "encoding", None) or "ascii"
        stream.write(text.encode(encoding, "backslashreplace").decode(encoding))


def reexec_for_utf8_names():
    """Under a C or POSIX locale with UTF-8 mode turned off, Python names files in ASCII and
    cannot write an album called Café: run again in UTF-8 mode (-X utf8; the same process,
    the same arguments), so that names are UTF-8 on disk, as in every other locale."""
    if os.name != "posix" or sys.flags.utf8_mode or not sys.executable:
        return
    if codecs.lookup(sys.getfilesystemencoding()).name != "ascii":
        return
    os.execv(sys.executable, [sys.executable, "-X", "utf8", os.path.abspath(__file__)] + sys.argv[1:])


class Options:
    """What the command line asked for, beyond the config."""

    def __init__(self, args, out=None):
        self.dry_run = args.dry_run
        self.verify = getattr(args, "verify", False)
        self.includes = args.include or []
        self.excludes = args.exclude or []
        self.verbose = args.verbose
        self.quiet = args.quiet
        self.config_path = os.path.abspath(getattr(args, "config", None) or "config.json")
        self._out = out or sys.stdout

    def print_line(self, text):
        """One line on stdout; OutputClosed when its reader has gone (`| head`)."""
        try:
            write_text(self._out, text + "\n")
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
        description="Back up a whole SmugMug account to a local disk, as album zip archives or as\n"
                    "plain files with XMP sidecars (--layout files).",
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
    how.add_argument("--keep-versions-days", type=float, metavar="DAYS",
                     help="keep files a backup replaced or no longer has (in "
                          ".smugmug_download/versions/) this many days; 0 deletes them at the end of the "
                          "run, earlier runs' too (default 90); a version that holds the last copy of a "
                          "photo is kept longer (see --keep-deleted-days)")
    how.add_argument("--keep-deleted-days", type=float, metavar="DAYS",
                     help="keep the last copy of a photo SmugMug no longer has this many days from the "
                          "run that first found it gone (default: forever)")
    how.add_argument("--layout", choices=CONFIG_CHOICES["layout"],
                     help="zips: each album as SmugMug's zip archive(s) (the default); files: every photo "
                          "and video a plain file in its album's folder, dated when taken, with an XMP "
                          "sidecar; switching a zips backup to files unpacks the zips on disk (no download)")
    how.add_argument("--unreachable-minutes", type=float, metavar="MIN",
                     help="wait this long for SmugMug to answer again before the run stops (exit 1; "
                          "default 15)")
    out = parser.add_argument_group("output")
    out.add_argument("--quiet", action="store_true",
                     help="print only errors, and a summary line if the run did not succeed (for "
                          "cron); warnings go to --log-file only")
    out.add_argument("--verbose", action="store_true", help="debug logging")
    out.add_argument("--log-file", metavar="PATH", help="append timestamped log lines (info level) to PATH")
    return parser


def number_problem(key, value):
    """Why value cannot be config key's number ("must be ..."), or "" when it can: a number (not
    a bool), finite (JSON readers take NaN and Infinity), within CONFIG_MAXIMUM, and more than 0
    (0 allowed for CONFIG_ZERO_OK)."""
    kind = CONFIG_OPTIONAL[key][0]
    if isinstance(value, bool) or not isinstance(value, kind):
        return "must be a whole number" if kind is int and isinstance(value, float) else "must be a number" + (
            " of days, or null (forever)" if key in CONFIG_NULL_OK else "")
    if not math.isfinite(value):
        return "must be a finite number (%s, at most %g), not %s" % (
            "0 or more" if key in CONFIG_ZERO_OK else "above 0", CONFIG_MAXIMUM[key], value)
    if value < 0 if key in CONFIG_ZERO_OK else value <= 0:
        return "must be %s" % ("0 or more" if key in CONFIG_ZERO_OK else "greater than 0")
    if value > CONFIG_MAXIMUM[key]:
        return "must be at most %g" % CONFIG_MAXIMUM[key]
    return ""


def check_args(parser, args):
    """Every cross-option check, in one place."""
    if args.quiet and args.verbose:
        parser.error("--quiet and --verbose do not go together")
    for key in CONFIG_FLAGS:
        value = getattr(args, key)
        problem = value is not None and number_problem(key, value)
        if problem:
            parser.error("--%s %s" % (key.replace("_", "-"), problem))
    if args.authorize and (args.dry_run or args.verify or args.include or args.exclude):
        parser.error("--authorize does not go with --dry-run, --verify, --include or --exclude")
    if args.verify and args.dry_run:
        parser.error("--verify and --dry-run do not go together")


def read_config_file(path):
    """The config file as a dict, or UsageError naming the problem (and the absolute path)."""
    given, path = path, os.path.abspath(path)
    try:
        text = read_text(path)
    except FileNotFoundError:
        if not os.path.isdir(os.path.dirname(path)):
            raise UsageError("config file %s not found (its folder %s does not exist)"
                             % (path, os.path.dirname(path)))
        raise UsageError("config file %s not found (copy config.example.json to %s and fill it in, or run "
                         "--authorize%s)" % (path, given, "" if given == "config.json" else " --config " + given))
    except OSError as exc:
        raise UsageError("cannot read config file %s: %s" % (path, exc.strerror or exc))
    try:
        data = json.loads(text)
    except ValueError as exc:
        where = " at line %d column %d" % (exc.lineno, exc.colno) if hasattr(exc, "lineno") else ""
        raise UsageError("config file %s is not valid JSON%s (%s)" % (path, where, getattr(exc, "msg", exc)))
    if not isinstance(data, dict):
        raise UsageError("config file %s must hold a JSON object" % path)
    return data


def closest_key(key, known):
    """The known key a mistyped one most likely meant, or None."""
    found = difflib.get_close_matches(key.strip().lower(), known, n=1, cutoff=0.6)
    return found[0] if found else None


def validate_config(data, path, required=CONFIG_REQUIRED, output_base=None, flags=()):
    """A Config from the file's dict: each problem is one UsageError line.

    A relative output_dir is relative to the config file's folder (output_base
    overrides: --output-dir is relative to the working directory). flags: the keys
    whose values came from the command line (a problem names the flag)."""
    path = os.path.abspath(path)
    known = list(CONFIG_REQUIRED) + list(CONFIG_OPTIONAL)
    for key in data:
        if key not in known and not key.startswith("_"):      # "_comment": JSON has no comments
            near = closest_key(key, known)
            raise UsageError("config file %s: unknown key %r%s" % (
                path, key, " (did you mean %r?)" % near if near else " (known keys: %s)" % ", ".join(known)))
    values = {}
    for key in CONFIG_REQUIRED:             # a placeholder first: no advice on what comes after it
        value = data.get(key)
        if isinstance(value, str) and value and PLACEHOLDER_RE.match(value) and key != "output_dir":
            raise UsageError("config file %s: %s still holds the placeholder from config.example.json"
                             % (path, key))
    for key in required:
        if key not in data or data[key] in ("", None):
            raise UsageError("config file %s: %s is missing%s" % (
                path, key, " (run --authorize to fill it in)" if key.startswith("access_key") else ""))
    for key in CONFIG_REQUIRED:
        value = data.get(key, "")
        if not isinstance(value, str):
            raise UsageError("config file %s: %s must be a string" % (path, key))
        values[key] = value.strip()
    for key, (kind, default) in CONFIG_OPTIONAL.items():
        value = data.get(key, default)
        if value is None:
            value = default
        if value is None and key in CONFIG_NULL_OK:
            values[key] = None
            continue
        problem = number_problem(key, value) if kind is not str else "" if isinstance(value, str) \
            else "must be a string"
        if problem:
            where = "--%s" % key.replace("_", "-") if key in flags else "config file %s: %s" % (path, key)
            raise UsageError("%s %s" % (where, problem))
        values[key] = (value.strip() or default) if isinstance(value, str) else value
        if key in CONFIG_CHOICES and values[key] not in CONFIG_CHOICES[key] + (default,):
            raise UsageError("config file %s: %s must be one of %s" % (path, key, ", ".join(CONFIG_CHOICES[key])))
    values["api_base"] = values["api_base"] or DEFAULT_API_BASE
    parts = urllib.parse.urlsplit(values["api_base"])
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError("config file %s: api_base %r is not an http(s) URL" % (path, values["api_base"]))
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise UsageError("config file %s: api_base uses plain http:// on %s; only https is allowed "
                         "(credentials must not cross a network in clear)" % (path, parts.hostname))
    if values["output_dir"]:
        base = output_base if output_base is not None else os.path.dirname(path)
        values["output_dir"] = os.path.abspath(os.path.join(base, os.path.expanduser(values["output_dir"])))
        if os.path.exists(values["output_dir"]) and not os.path.isdir(values["output_dir"]):
            raise UsageError("output_dir %s is not a folder" % values["output_dir"])
    return Config(**values)


def warn_if_readable(path):
    """A config readable by other users: a warning a person must see, even with --quiet."""
    if os.name != "posix":
        return
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        path = os.path.abspath(path)
        log.log(NOTICE, "Warning: %s can be read by other users; it holds your SmugMug secrets "
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
    """Log lines on stderr that clear the status line first. The per-album lines stay off
    the terminal while the status line shows the progress (they go to the log file)."""

    def __init__(self, status, verbose=False):
        super().__init__(sys.stderr)
        self.status = status
        self.verbose = verbose

    def emit(self, record):
        if getattr(record, "album", False) and self.status.enabled and not self.verbose:
            return
        with self.status.lock:
            self.status.clear()
            super().emit(record)


class ConsoleFormatter(logging.Formatter):
    """'Error: ' or 'Warning: ' before the message (after the thread's name with --verbose)."""

    def __init__(self, verbose):
        super().__init__("%(message)s")
        self.verbose = verbose

    def format(self, record):
        message = super().format(record)
        if record.levelno == logging.ERROR or record.levelno == logging.CRITICAL:
            message = "Error: " + message
        elif record.levelno == logging.WARNING:
            message = "Warning: " + message
        return "[%s] %s" % (record.threadName, message) if self.verbose else message


class LogFileHandler(logging.FileHandler):
    """The --log-file: a write that fails (a full disk) is said once on stderr, in one line, and
    the log file is dropped for the rest of the run: never a traceback per line."""

    def handleError(self, record):
        error = sys.exc_info()[1]
        log.removeHandler(self)
        try:
            sys.stderr.write("Warning: cannot write to the log file %s (%s); the rest of this run is not "
                             "logged there\n" % (self.baseFilename, getattr(error, "strerror", None) or error))
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        try:
            self.close()
        except (OSError, ValueError):
            pass


def setup_logging(args, status, secrets=()):
    """Configure our logger only (called from main); the libraries stay quiet."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        try:
            handler.close()
        except (OSError, ValueError):
            pass
    log.setLevel(logging.DEBUG)
    log.propagate = False
    redact = RedactingFilter(secrets)
    console = ConsoleHandler(status, args.verbose)
    # --quiet (cron): only what needs a person (errors, and NOTICE: a summary of trouble, a
    # world-readable config); warnings go to the log file.
    console.setLevel(logging.ERROR if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    console.setFormatter(ConsoleFormatter(args.verbose))
    console.addFilter(redact)
    log.addHandler(console)
    if args.log_file:
        try:
            handler = LogFileHandler(os.path.expanduser(args.log_file), encoding="utf-8")
        except OSError as exc:
            raise UsageError("cannot open log file %s: %s" % (os.path.abspath(args.log_file), exc.strerror or exc))
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


def token_refusal(exc):
    """Why a token request failed, short: "HTTP 401, permission_denied" from the library's
    "Token request failed with code 401, response was 'oauth_problem=permission_denied'.", else
    its text without a closing period."""
    text = redact_urls(getattr(exc, "description", None) or exc)
    status = getattr(exc, "status_code", None)
    if not isinstance(status, int):
        found = re.search(r"\bcode (\d{3})\b", text)
        status = int(found.group(1)) if found else None
    problem = re.search(r"oauth_problem=([\w.-]+)", text)
    said = ["HTTP %d" % status] if status else []
    said += [problem.group(1)] if problem else []
    return ", ".join(said) if said else text.strip().rstrip(".")


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
    request = oauth.token
    for tries_left in range(CODE_TRIES - 1, -1, -1):     # a mistyped code is asked for again
        code = read_line("Then type the six-digit code SmugMug shows: ", "the code")
        if not re.fullmatch(r"\d{6}", code):
            problem = "the code must be six digits (0-9), as SmugMug shows it; got %s" % (
                "%d digit%s" % (len(code), plural(len(code))) if code.isdigit() else "nothing" if not code
                else "%d character%s, not all digits" % (len(code), plural(len(code))))
        else:
            oauth = OAuth1Session(check.app_key, client_secret=check.app_key_secret,
                                  resource_owner_key=request.get("oauth_token"),
                                  resource_owner_secret=request.get("oauth_token_secret"), verifier=code)
            try:
                token = oauth.fetch_access_token(services + "/getAccessToken", timeout=TIMEOUT)
                break
            except (requests.RequestException, ValueError) as exc:
                problem = "SmugMug did not accept the code (wrong or expired? %s)" % token_refusal(exc)
        if not tries_left:
            raise UsageError("%s; run --authorize again" % problem)
        log.log(NOTICE, "%s; try again (%d more tr%s)", problem, tries_left, "y" if tries_left == 1 else "ies")
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
    write_config(config_path, data)
    nickname = user.get("NickName") if isinstance(user, dict) else "?"
    write_text(out, "Authorized as %s; the access token is saved in %s.\n" % (nickname, config_path))
    out.flush()


def write_config(path, data):
    """The config file written (replaced atomically), readable by its owner alone: it holds secrets."""
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n",
                 mode=0o600 if os.name == "posix" else None)


def create_config(path):
    """A new config file from an app key typed in (when --authorize finds none), mode 0600."""
    key = read_line("No config file %s yet. SmugMug API key: " % path, "the API key")
    secret = read_line("API secret: ", "the API secret")
    data = {"app_key": key, "app_key_secret": secret, "access_key": "", "access_key_secret": "",
            "output_dir": "~/SmugMug-backup"}
    validate_config(dict(data, access_key="-", access_key_secret="-"), path, required=("app_key", "app_key_secret"))
    write_config(path, data)
    log.info("created %s (output_dir %s: edit it if you like)", path, data["output_dir"])
    return data


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
    try:
        state.load()
        store = Store(config.output_dir, run_stamp(), state)
        if not options.dry_run:
            store.recover()
        reporter = Reporter(options, status, Meter())
        orchestrator = Orchestrator(client, config, options, state, store, reporter)
        try:
            summary = orchestrator.run()
        except (KeyboardInterrupt, Interrupted, AuthError) as exc:
            if isinstance(exc, AuthError) and orchestrator.nickname is None:
                orchestrator.shutdown(wait=False)
                raise                           # at the first call: one line, no summary
            stop.set()
            orchestrator.shutdown(wait=False)
            status.clear()
            orchestrator.walk.complete = False
            orchestrator.finish()
            summary = orchestrator.summary
            save_state(state, summary)
            if isinstance(exc, AuthError):       # mid-run: the error, then the summary (the log ends with it)
                log.error("%s", auth_message(exc, options.config_path))
                summary.write_error = "SmugMug rejected the credentials"
                print_summary(summary, options)
                return EXIT_USAGE
            summary.interrupted = True
            print_summary(summary, options)
            return EXIT_INTERRUPTED
        orchestrator.shutdown(wait=not stop.is_set())
        save_state(state, summary)
        unmatched = orchestrator.walk.unmatched()
        no_match = unmatched and orchestrator.walk.complete and no_match_message(
            unmatched, orchestrator.walk.paths, options.excludes)
        if no_match and not summary.albums_found:
            raise UsageError(no_match)
        status.clear()
        if options.dry_run and summary.reached:
            print_dry_run(reporter, summary, options)
        else:
            print_summary(summary, options)
        if no_match:                # the other patterns' albums are done: still a usage error
            raise UsageError(no_match)
        return EXIT_ALBUMS_FAILED if (summary.failed or summary.write_error) else EXIT_OK
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
    to its end, its CRC checked and its MD5 taken), the entries and plain files
    the manifest names present with the listed size and MD5 (in the files layout,
    every file), and each file's XMP sidecar present.
    """
    folder = os.path.join(output_dir, *record.path.split("/"))
    problems = []
    manifest = None
    if not record.files:
        return problems          # an empty album: an empty folder, nothing to prove
    try:
        manifest = load_manifest(os.path.join(folder, MANIFEST_NAME))
        if not isinstance(manifest.get("files"), list):
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
        wrong = file_mismatch(path, saved.size)
        if wrong:
            problems.append((saved.name, "part missing" if wrong[0] == "missing"
                             else "wrong size (%d bytes, %d saved)" % (wrong[1], saved.size)))
            continue
        try:
            for entry in scan_zip(path, saved.name, True, stop, progress):
                entries.setdefault((saved.name, entry.name), entry)
        except BadArchive as exc:
            problems.append((saved.name, str(exc)))
    sizes = {f.name: f.size for f in record.files}
    for item in manifest_entries(manifest):     # every holder the manifest names: the former's too
        name = item.get("FileName") or item.get("ImageKey") or "?"
        size, md5 = entry_bytes(item)
        if "archive" in item:
            part = item.get("archive")
            if any(p == part for p, _ in problems):
                continue
            entry = entries.get((part, item.get("entry")))
            wrong = bytes_differ(entry.size, entry.md5, size, md5) if entry else None
            if entry is None:
                problems.append((part, "entry %s of %s missing" % (item.get("entry"), name)))
            elif wrong and wrong[0] == "size":
                problems.append((part, "entry %s: %d bytes, %d listed" % (entry.name, entry.size, size)))
            elif wrong:
                problems.append((part, "MD5 mismatch for file %s" % name))
        elif "file" in item:
            loose = item.get("file")
            path = os.path.join(folder, loose) if own_name(loose) else None
            want = size if size is not None else sizes.get(loose)
            wrong = file_mismatch(path, want, md5, stop, progress) if path else ("missing", None)
            if wrong and wrong[0] == "missing":
                problems.append((loose, "file %s missing" % loose))
            elif wrong and wrong[0] == "size":
                problems.append((loose, "file %s: %d bytes, %d listed" % (loose, wrong[1], want)))
            elif wrong and wrong[0] == "md5":
                problems.append((loose, "MD5 mismatch for file %s" % loose))
            elif wrong:
                problems.append((loose, "file %s unreadable (%s)" % (loose, wrong[1].strerror or wrong[1])))
        side = item.get("sidecar")
        if isinstance(side, str) and (not own_name(side) or not os.path.isfile(os.path.join(folder, side))):
            problems.append((side, "sidecar %s missing" % side))
    return problems


def verify(config, options, status):
    """--verify: prove the backup against its manifests without asking SmugMug; the exit code."""
    if not os.path.isdir(config.output_dir):
        raise UsageError("output_dir %s does not exist: nothing to verify" % config.output_dir)
    writable = os.access(config.output_dir, os.W_OK)
    lock = RunLock(config.output_dir).acquire() if writable else None
    if not writable:        # read-only media (a USB disk, a snapshot): verify, and write nothing
        log.warning("%s cannot be written (read-only): verifying without a lock, and damaged albums are "
                    "not marked for the next run", config.output_dir)
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
        state.read_only = not writable
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
                    if names != list(record.damaged) and not write_error:
                        try:
                            state.save_album(replace(record, damaged=names))
                        except OSError as exc:
                            write_error = "%s: %s" % (getattr(exc, "filename", None) or state.journal_path,
                                                      exc.strerror or exc)
                            log.error("could not mark damaged albums in the state: %s", write_error)
                elapsed = max(time.monotonic() - started, 0.001)
                status.show([(0, "verifying: %s of %s checked" % (human_bytes(checked[0]), human_bytes(total))),
                             (1, "%d damaged" % damaged), (2, "%s/s" % human_bytes(checked[0] / elapsed))])
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
        log.info("Verified %d album%s, %s in %s (%s/s): %s%s.", len(records), plural(len(records)),
                 human_bytes(checked[0]), human_seconds(seconds), human_bytes(checked[0] / max(seconds, 0.001)),
                 "%d damaged (the next run fetches %s again)" % (damaged, "it" if damaged == 1 else "them")
                 if damaged else "all intact",
                 "; %d album%s files SmugMug did not give (named as missing in the metadata.json)" % (
                     incomplete, " lacks" if incomplete == 1 else "s lack") if incomplete else "")
        if damaged and options.quiet:
            log.error("smugmug_download --verify: %d damaged album%s", damaged, plural(damaged))
        return EXIT_ALBUMS_FAILED if damaged or summary.write_error else EXIT_OK
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        state.close()
        if lock:
            lock.release()


def auth_message(exc, config_path):
    """SmugMug's own words for a 401, and what to do about the common ones."""
    words = str(exc).strip().rstrip(".") or "HTTP 401"
    lowered = words.lower()
    if "v2" in lowered or "terms" in lowered:
        todo = ("accept the API terms for your key (app_key in %s) on SmugMug's developer page "
                "(https://api.smugmug.com/api/developer/accept), then run again" % config_path)
    elif any(w in lowered for w in ("token", "expired", "revoked", "invalid", "signature", "permission")):
        todo = "run --authorize again (config file %s)" % config_path
    else:
        todo = "check app_key and app_key_secret in %s, or run --authorize again" % config_path
    return "SmugMug rejected the credentials: %s. To fix: %s" % (words, todo)


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt()


def main(argv=None):
    """The command line: parse, validate, run; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    status = StatusLine(sys.stderr, enabled=sys.stderr.isatty() and not args.quiet and not args.dry_run)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, raise_interrupt)
        if status.enabled and hasattr(signal, "SIGWINCH"):
            previous[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, status.resize)
    config_path = os.path.abspath(args.config)
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
        flags = [key for key in CONFIG_FLAGS if getattr(args, key) is not None]
        data = dict(data, **{key: getattr(args, key) for key in flags})
        if args.layout is not None:
            data = dict(data, layout=args.layout)
        output_base = None
        if args.output_dir:            # on the command line: relative to the working directory
            data, output_base = dict(data, output_dir=args.output_dir), os.getcwd()
        config = validate_config(data, args.config, output_base=output_base, flags=flags)
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
        log.error("%s", auth_message(exc, config_path))
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
    except Exception as exc:           # the last resort: one line, never a traceback
        status.clear()
        log.debug("internal error", exc_info=True)
        log.error("internal error: %s: %s (please report it; --verbose shows where)", type(exc).__name__,
                  redact_urls(exc))
        return EXIT_ALBUMS_FAILED
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    reexec_for_utf8_names()
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
