#!/usr/bin/env python3
"""Back up a whole SmugMug account to a local disk as album zip archives.

The account's folder tree is walked through the SmugMug API v2 (OAuth1-signed)
and mirrored under `output_dir`: one folder per SmugMug folder and album, each
album's photos in the zip archive(s) SmugMug prepares for it.

Design: a walk pool lists folders; every album found goes through three pools,
each a plain function run by one orchestrator loop that alone owns counters,
progress output and the backup state:
    request  ask SmugMug for a zip archive of the album (or reuse a fresh one)
    poll     look again, with growing delays, until every part is Complete
    download stream each part to NAME.part, check its length, rename it
Reruns are incremental: albums whose timestamps and files match the state
record cost no API call beyond the folder walk.

Usage:  python smugmug_download.py [--config config.json] [--dry-run] ...
"""

import argparse
import collections
import concurrent.futures
import datetime
import email.utils
import fnmatch
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
import tempfile
import threading
import time
import unicodedata
import urllib.parse
from dataclasses import dataclass, field, replace
from http.client import IncompleteRead, RemoteDisconnected
from typing import Dict, List, Optional, Tuple

try:
    import requests
    from requests.adapters import HTTPAdapter
    from requests_oauthlib import OAuth1, OAuth1Session
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
    "max_preparing": (int, 32),
    "archive_timeout_hours": ((int, float), 6),
    "poll_seconds": ((int, float), 2.0),
    "poll_max_seconds": ((int, float), 30.0),
}
SECRET_KEYS = ("app_key_secret", "access_key", "access_key_secret")
# Values shipped in config.example.json, and the shapes such placeholders take.
PLACEHOLDER_RE = re.compile(r"^\s*(<.*>|(paste|your|put)[-_ ].*|x{3,}|change[-_ ]?me)\s*$", re.IGNORECASE)

STATE_DIR = ".smugmug_download"          # inside output_dir
STATE_FILE = "state.json"                # snapshot, replaced atomically
JOURNAL_FILE = "journal.jsonl"           # one line per finished album since the snapshot
LOCK_FILE = ".smugmug_download.lock"     # inside output_dir, flock'ed while a run lives
STATE_VERSION = 1
RESERVED_TOP_NAMES = {STATE_DIR.casefold(), LOCK_FILE.casefold()}

# A timeout on every request: connecting should be quick; a busy server may
# think for a while before the first byte of a large listing.
TIMEOUT = (10, 60)
PAGE_COUNT = 100          # children asked per page; the server may clamp it
API_ATTEMPTS = 6          # tries of one API call on 5xx / network errors / bad bodies
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
ARCHIVE_ERROR_RETRIES = 3 # new archives after a Status "Error"
ARCHIVE_REMOVED_RETRIES = 3
REQUEST_AGAIN_AFTER_POLLS = 8  # ~35 s of looks with nothing listed: the request was lost
CHUNK_SIZE = 256 * 1024   # low CPU per byte, constant memory, and little lost when a run is killed
MAX_NAME_BYTES = 200
STATUS_INTERVAL = 0.1     # the progress line is redrawn at most ten times a second
PROGRESS_LOG_INTERVAL = 60.0


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


class DownloadError(BackupError):
    """A part could not be downloaded completely after retries."""


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
    max_preparing: int = 32
    archive_timeout_hours: float = 6
    poll_seconds: float = 2.0
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

    @property
    def rel(self):
        return "/".join(self.path)


@dataclass(frozen=True)
class ArchivePart:
    part: int
    file_name: str               # as the server sent it (cleaned later)
    status: str
    url: str
    date_added: str = ""
    size: Optional[int] = None

    @property
    def identity(self):
        """Which archive file this is, whatever order the server lists it in."""
        return "%s|%s|%s" % (strip_query(self.url), self.file_name, self.date_added)


@dataclass
class Summary:
    albums_found: int = 0
    backed_up: int = 0
    unchanged: int = 0
    moved: int = 0
    parts: int = 0
    bytes: int = 0
    failed: Dict[str, str] = field(default_factory=dict)   # album path -> reason
    gone: List[str] = field(default_factory=list)
    write_error: str = ""
    seconds: float = 0.0


# Pure helpers ###############################################################

_FORBIDDEN_CHARS = re.compile(r'[/\\:*?"<>|\x00-\x1f\x7f]')
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
    names = {}
    for folded, members in groups.items():
        members.sort()
        for index, (_order, key, cleaned) in enumerate(members):
            if index == 0 and folded not in reserved:
                names[key] = cleaned
            else:
                names[key] = with_suffix(cleaned, " (%s)" % clean_name(key))
    return names


def part_file_names(parts):
    """{part number: local file name} for an archive's parts, cleaned and unique."""
    names, seen = {}, set()
    for p in sorted(parts, key=lambda p: p.part):
        name = clean_name(p.file_name or "archive-%d.zip" % p.part, keep_extension=True)
        if name.lower().endswith(".part"):
            name += "_"   # never confusable with our own temporary files
        if name.casefold() in seen:
            name = with_suffix(name, " (part %d)" % p.part, keep_extension=True)
        seen.add(name.casefold())
        names[p.part] = name
    return names


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


def poll_delay(attempt, first=2.0, maximum=30.0):
    """Seconds before the next look at a preparing archive.

    The first look comes after `first` seconds; most archives are ready
    within seconds, so the next looks follow closely (first/2, then growing by
    half each time) up to `maximum`, so that a long preparation costs few calls.
    """
    if attempt <= 0:
        return first
    return min(maximum, (first / 2.0) * (1.5 ** min(attempt - 1, 60)))


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
    """Can an album under folder rel be selected? (Else the folder is not walked.)"""
    if excludes and path_matches(excludes, rel):
        return False
    if not includes:
        return True
    folder = rel + "/"
    for pattern in includes:
        prefix = glob_literal_prefix(pattern)
        if folder.startswith(prefix) or prefix.startswith(folder) or path_matches([pattern], rel):
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

        Retries 5xx and unreadable bodies API_ATTEMPTS times with backoff; 429
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
                resp = self.session().request(
                    method, url, params=params or None, timeout=TIMEOUT,
                    headers={"Accept": "application/json"})
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
                    if method == "POST" and not resp.content.strip():
                        return {}         # accepted, no body: what it started is seen by looking again
                    reason = "unreadable answer (HTTP %d, not JSON)" % status
                elif status >= 500:
                    reason = "HTTP %d: %s" % (status, error_message(resp))
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


def list_children(client, folder):
    """Every child node of a folder, all pages, with the expanded Album objects.

    Returns (nodes, expansions); follows NextPage until absent rather than
    trusting the count we asked for.
    """
    nodes, expansions = [], {}
    link = add_query(folder.children_uri, count=PAGE_COUNT, _expand="Album")
    pages = 0
    while link:
        body = client.get(link)
        nodes.extend(as_list(envelope_payload(body)))
        found = body.get("Expansions")
        if isinstance(found, dict):
            expansions.update(found)
        link = next_page(body)
        if link:
            link = add_query(path_and_query(link), _expand="Album")
        pages += 1
        if pages > 10000:
            raise ApiError("paging of %s does not end" % folder.children_uri)
    return nodes, expansions


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
    count = details.get("ImageCount")
    return replace(album,
                   album_key=str(details.get("AlbumKey") or album.album_key),
                   last_updated=str(details.get("LastUpdated") or ""),
                   images_last_updated=str(details.get("ImagesLastUpdated") or ""),
                   image_count=count if isinstance(count, int) and not isinstance(count, bool) else None,
                   has_details=True)


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
        if kind == "Folder":
            children = uri_of(node, "ChildNodes") or "%s/node/%s!children" % (API_ROOT, node["NodeID"])
            folders.append(Folder(node["NodeID"], path_and_query(children), path))
        elif kind == "Album":
            album = album_from_node(node, path, expansions)
            if album is None:
                skipped.append(("/".join(path), "album without an Album link"))
            else:
                albums.append(album)
        elif kind == "Page":
            log.debug("skipping page %s (pages hold no files)", "/".join(path))
        else:
            skipped.append(("/".join(path), "unknown node type %r" % (kind,)))
    return folders, albums, skipped


# Stages #####################################################################

def archive_parts(body):
    """The Download objects of a !download answer as ArchiveParts (bad ones dropped)."""
    parts = []
    for index, item in enumerate(as_list(envelope_payload(body)), 1):
        url = item.get("WebUri") or item.get("Url") or item.get("URL")
        if not isinstance(url, str) or not url:
            continue
        try:
            number = int(item["Part"])
        except (KeyError, TypeError, ValueError):
            number = index         # no Part numbers: the listing order tells the parts apart
        size = item.get("Size")
        parts.append(ArchivePart(
            part=number,
            file_name=str(item.get("FileName") or ""),
            status=str(item.get("Status") or "Unknown").strip().capitalize(),
            url=url,
            date_added=str(item.get("DateAdded") or ""),
            size=size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None))
    return parts


def album_changed_at(album):
    """The latest of the album's LastUpdated and ImagesLastUpdated, or None."""
    times = [t for t in (parse_time(album.last_updated), parse_time(album.images_last_updated)) if t]
    return max(times) if times else None


def is_fresh(part, album, requested, ignored):
    """May this archive part be used for the album as it is now?

    Never one in ignored (listed before our request, or given up on). Once we
    have requested an archive, every other one is ours; before that, only one
    not older than the album's last change (its DateAdded proves it).
    """
    if requested:
        # An undated archive cannot be told from an older one at the same URL:
        # trust what the server lists after our request rather than wait forever.
        return not (part.date_added and part.identity in ignored)
    if part.identity in ignored:
        return False
    added, changed = parse_time(part.date_added), album_changed_at(album)
    # Strictly later: times have whole seconds, and an archive from the very
    # second of a change may predate it.
    return added is not None and changed is not None and added > changed


def current_archive(parts, album, requested, ignored=frozenset()):
    """The parts of the newest usable archive, one per Part number, or []."""
    best = {}
    for p in parts:
        if p.status in ("Error", "Removed") or not is_fresh(p, album, requested, ignored):
            continue
        added = parse_time(p.date_added)
        key = (added or datetime.datetime.min.replace(tzinfo=datetime.timezone.utc))
        if p.part not in best or key >= best[p.part][0]:
            best[p.part] = (key, p)
    return [best[n][1] for n in sorted(best)]


def archive_state(parts, album, requested, ignored):
    """('complete'|'preparing'|'error'|'removed', parts) for one look at !download."""
    fresh_failed = [p for p in parts if p.status in ("Error", "Removed") and is_fresh(p, album, requested, ignored)]
    usable = current_archive(parts, album, requested, ignored)
    if usable and all(p.status == "Complete" for p in usable):
        return "complete", usable
    if not usable and fresh_failed:
        status = "error" if any(p.status == "Error" for p in fresh_failed) else "removed"
        return status, fresh_failed
    return "preparing", usable


def fetch_details(client, album):
    """album with its timestamps, fetched with one GET when the walk had no expansion."""
    if album.has_details:
        return album
    details = envelope_payload(client.get(album.uri))
    if not isinstance(details, dict):
        raise ApiError("album %s: unreadable answer" % album.album_key)
    return with_details(album, details)


def request_archive(client, album, force_new, ignored):
    """Stage of the request pool: (state, album, parts, stale identities).

    Reuses a fresh archive SmugMug already has (complete or in preparation)
    unless force_new; otherwise POSTs for a new one. Every archive listed
    before the POST is returned as stale: from then on, only a new one is ours.
    """
    album = fetch_details(client, album)
    if album.image_count == 0:
        return "empty", album, [], set()
    download_uri = album.uri + "!download"
    existing = archive_parts(client.get(download_uri))
    if not force_new:
        state, parts = archive_state(existing, album, False, ignored)
        if state == "complete" or (state == "preparing" and parts):
            return state, album, parts, set()
    stale = {p.identity for p in existing}
    body = client.post(download_uri)
    state, parts = archive_state(archive_parts(body), album, True, set(ignored) | stale)
    return ("complete" if state == "complete" else "preparing"), album, parts, stale


def poll_archive(client, album, ignored):
    """Stage of the poll pool: one look at the album's archive; never sleeps."""
    body = client.get(album.uri + "!download")
    return archive_state(archive_parts(body), album, True, ignored)


def download_part(client, part, final_path, resume_ok, progress):
    """Stage of the download pool: the part streamed to final_path + '.part'.

    Resumes an existing .part with Range when resume_ok (same archive); a 200
    restarts from zero; a 206 at the wrong offset is an error and restarts.
    The byte count is checked against Content-Length / Content-Range. Returns
    the size. The caller renames the .part once every part of the album is done.
    """
    url = urllib.parse.urljoin(client.base + "/", part.url)    # a relative WebUri is on the API host
    if not is_secure_url(url):
        raise DownloadError("refusing to fetch an archive over plain http from %s"
                            % urllib.parse.urlsplit(url).hostname)
    temp = final_path + ".part"
    if not resume_ok:
        remove_quietly(temp)
    last_error = None
    for attempt in range(DOWNLOAD_ATTEMPTS):
        if attempt:
            if client.stop.wait(backoff_delay(attempt - 1)):
                raise Interrupted("stopping")
        try:
            return fetch_to_file(client, url, temp, progress, part.size)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                DownloadError) as exc:
            last_error = redact_urls(exc)
            log.debug("part %d of %s: %s (attempt %d)", part.part, os.path.basename(final_path),
                      last_error, attempt + 1)
    raise DownloadError("download failed after %d tries: %s" % (DOWNLOAD_ATTEMPTS, last_error))


def fetch_to_file(client, url, temp, progress, listed_size=None):
    """One attempt at completing temp from url; returns the final size.

    The length to check is the answer's Content-Length (or Content-Range);
    without one, the Size SmugMug listed for the part, if any."""
    try:
        offset = os.path.getsize(temp)
    except OSError:
        offset = 0
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = "bytes=%d-" % offset
    with open_following_redirects(client, url, headers) as resp:
        status = resp.status_code
        if status == 416 and offset:
            total = parse_unsatisfied_range(resp.headers.get("Content-Range"))
            if total == offset:
                return offset       # the .part was already whole
            remove_quietly(temp)
            raise DownloadError("server refused to resume (416)")
        if status in (404, 410):
            raise ArchiveGone("archive no longer available (HTTP %d)" % status)
        if status in (401, 403):
            raise ArchiveGone("archive refused (HTTP %d): %s" % (status, error_message(resp)))
        if status == 206 and offset:
            span = parse_content_range(resp.headers.get("Content-Range"))
            if span is None or span[0] != offset:
                remove_quietly(temp)
                raise DownloadError("server resumed at the wrong offset (%s)" % resp.headers.get("Content-Range"))
            expected = span[2] if span[2] is not None else (
                offset + content_length(resp.headers) if content_length(resp.headers) is not None else listed_size)
            mode = "ab"
        elif status == 200:
            offset, mode = 0, "wb"
            expected = content_length(resp.headers)
            expected = listed_size if expected is None else expected
        else:
            raise DownloadError("HTTP %d: %s" % (status, error_message(resp)))
        written = offset
        # Only the local side's OSErrors are write errors: requests' network
        # errors are OSErrors too, and are retried by the caller.
        try:
            out = open(temp, mode)
        except OSError as exc:
            raise LocalWriteError("%s: %s" % (temp, exc.strerror or exc)) from exc
        try:
            for chunk in resp.iter_content(CHUNK_SIZE):
                if client.stop.is_set():
                    raise Interrupted("stopping")
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise LocalWriteError("%s: %s" % (temp, exc.strerror or exc)) from exc
                written += len(chunk)
                progress(len(chunk))
        finally:
            try:
                out.close()
            except OSError as exc:
                raise LocalWriteError("%s: %s" % (temp, exc.strerror or exc)) from exc
    if expected is not None and written != expected:
        raise DownloadError("got %d of %d bytes" % (written, expected))
    return written


def open_following_redirects(client, url, headers):
    """A streamed GET of url, following redirects by hand: each hop is signed
    afresh for its own URL on the archive's or the API's host, sent unsigned
    elsewhere, and never to plain http off this machine."""
    trusted = {urllib.parse.urlsplit(url).netloc, urllib.parse.urlsplit(client.base).netloc}
    for _hop in range(6):
        auth = None if urllib.parse.urlsplit(url).netloc in trusted else (lambda request: request)
        resp = client.session().get(url, headers=headers, stream=True, timeout=TIMEOUT,
                                    allow_redirects=False, auth=auth)
        location = resp.headers.get("Location")
        if resp.status_code not in (301, 302, 303, 307, 308) or not location:
            return resp
        resp.close()
        url = urllib.parse.urljoin(url, location)
        if not is_secure_url(url):
            raise DownloadError("archive redirected to plain http on %s" % urllib.parse.urlsplit(url).hostname)
    raise DownloadError("too many redirects")


def remove_quietly(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# State ######################################################################

class BackupState:
    """The incremental-backup record in output_dir/.smugmug_download/.

    albums: AlbumKey -> {AlbumKey, NodeID, path, LastUpdated,
    ImagesLastUpdated, parts: [{FileName, size}]}. partials: the archive
    identity each unfinished NAME.part belongs to, so that only the same
    archive is ever resumed into it. Owned by the orchestrator thread alone.
    A snapshot (state.json, replaced atomically) plus a journal with one line
    per finished album: a crash loses at most the album in flight.
    """

    def __init__(self, output_dir, read_only=False):
        self.dir = os.path.join(output_dir, STATE_DIR)
        self.read_only = read_only
        self.albums = {}
        self.partials = {}
        self._journal = None

    @property
    def snapshot_path(self):
        return os.path.join(self.dir, STATE_FILE)

    @property
    def journal_path(self):
        return os.path.join(self.dir, JOURNAL_FILE)

    def load(self):
        """Read snapshot + journal; an unreadable or future state warns and starts empty."""
        try:
            with open(self.snapshot_path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict) or not isinstance(data.get("albums"), dict):
                raise ValueError("not a state record")
            version = data.get("version")
            if not isinstance(version, int) or version > STATE_VERSION:
                log.warning("state file %s is from a newer version (%r) of this tool: "
                            "checking every album again (the file is kept)", self.snapshot_path, version)
                self._set_aside()
                return self
            self.albums = {k: v for k, v in data["albums"].items() if isinstance(v, dict)}
            partials = data.get("partials")
            self.partials = dict(partials) if isinstance(partials, dict) else {}
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("state file %s is unreadable (%s): checking every album again "
                        "(the file is kept)", self.snapshot_path, exc)
            self._set_aside()
            return self
        self._replay_journal()
        return self

    def _set_aside(self):
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
        if isinstance(entry.get("album"), dict) and entry["album"].get("AlbumKey"):
            self.albums[entry["album"]["AlbumKey"]] = entry["album"]
        if isinstance(entry.get("partial"), list) and len(entry["partial"]) == 2:
            path, identity = entry["partial"]
            if identity is None:
                self.partials.pop(path, None)
            else:
                self.partials[path] = identity

    def record(self, entry):
        """Apply an entry and append it to the journal (flushed and fsynced)."""
        self._apply(entry)
        if self.read_only:
            return
        if self._journal is None:
            os.makedirs(self.dir, exist_ok=True)
            self._journal = open(self.journal_path, "a", encoding="utf-8")
        self._journal.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def save(self):
        """Write the snapshot atomically, then start an empty journal."""
        if self.read_only:
            return
        os.makedirs(self.dir, exist_ok=True)
        data = {"version": STATE_VERSION, "tool": "smugmug_download %s" % __version__,
                "albums": self.albums, "partials": self.partials}
        write_atomic(self.snapshot_path, json.dumps(data, ensure_ascii=False, indent=1, sort_keys=True))
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        remove_quietly(self.journal_path)


def write_atomic(path, text, mode=None):
    """Replace path with text: a temp file in the same folder, fsync, os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
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


def album_record(album, names, sizes):
    return {"AlbumKey": album.album_key, "NodeID": album.node_id, "path": album.rel,
            "LastUpdated": album.last_updated, "ImagesLastUpdated": album.images_last_updated,
            "parts": [{"FileName": names[n], "size": sizes[n]} for n in sorted(names)]}


def record_is_complete(record, output_dir):
    """Is every part the record names on disk, at its recorded size?"""
    folder = os.path.join(output_dir, *record.get("path", "").split("/"))
    for part in record.get("parts") or []:
        try:
            if os.path.getsize(os.path.join(folder, part["FileName"])) != part["size"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
    return True


def classify(album, record, output_dir):
    """'new', 'changed' or 'unchanged' against the state record (timestamps known)."""
    if not record:
        return "new"
    if (record.get("LastUpdated") == album.last_updated
            and record.get("ImagesLastUpdated") == album.images_last_updated
            and record_is_complete(record, output_dir)):
        return "unchanged"
    return "changed"


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


@dataclass
class AlbumJob:
    """One album's way through the pipeline; touched by the orchestrator only."""
    album: Album
    record: Optional[dict]
    reason: str = "new"                # new / changed
    ignored: set = field(default_factory=set)
    errors: int = 0
    removals: int = 0
    requested_at: float = 0.0
    polls: int = 0
    names: Dict[int, str] = field(default_factory=dict)
    sizes: Dict[int, int] = field(default_factory=dict)
    pending_parts: int = 0
    failed: bool = False
    in_prep: bool = False              # counted in Orchestrator.preparing
    generation: int = 0                # bumped per archive request; stale downloads are ignored


def job_of(kind, payload):
    """The AlbumJob a finished piece of work was about (None for a folder listing)."""
    if kind == "walk":
        return None
    return payload[0] if kind == "download" else payload


def partial_key(album, name):
    """How the state names an album's NAME.part: its path relative to output_dir."""
    return "/".join(album.path + (name,))


class Orchestrator:
    """Moves albums between the pools; alone owns counters, output and state."""

    def __init__(self, client, config, options, state, status):
        self.client = client
        self.config = config
        self.options = options
        self.state = state
        self.status = status
        self.out = config.output_dir
        self.summary = Summary()
        workers = max(1, config.workers)
        self.pools = {
            "walk": concurrent.futures.ThreadPoolExecutor(max(4, 2 * workers), "walk"),
            "request": concurrent.futures.ThreadPoolExecutor(workers, "request"),
            "poll": concurrent.futures.ThreadPoolExecutor(workers, "poll"),
            "download": concurrent.futures.ThreadPoolExecutor(workers, "download"),
        }
        self.futures = {}                       # future -> (kind, payload)
        self.waiting = collections.deque()      # AlbumJobs waiting for a request slot
        self.polls = []                         # heap of (due, seq, AlbumJob)
        self.seq = 0
        self.preparing = 0                      # requested and not yet seen Complete
        self.downloading = set()
        self.seen_nodes = set()
        self.walk_complete = True
        self.halt = False                       # a local write error: start nothing new
        self.found_keys = set()
        self.bytes_done = 0
        self._bytes_lock = threading.Lock()
        self.started = time.monotonic()
        self.last_progress_log = self.started

    # -- submitting work --

    def submit(self, pool, kind, payload, fn, *args):
        future = self.pools[pool].submit(fn, *args)
        self.futures[future] = (kind, payload)

    def start(self, root):
        self.seen_nodes.add(root.node_id)
        self.submit("walk", "walk", root, walk_folder, self.client, root)

    def pump(self):
        """Start what may start: requests under the preparing bound, due polls."""
        if self.halt:
            return
        while self.waiting and self.preparing < self.config.max_preparing:
            job = self.waiting.popleft()
            self.preparing += 1
            job.in_prep = True
            job.requested_at = job.requested_at or time.monotonic()   # the limit spans re-requests
            # After an Error or a Removed archive, ask for a new one rather than look again.
            force_new = job.errors > 0 or job.removals > 0
            self.submit("request", "request", job, request_archive, self.client, job.album,
                        force_new, frozenset(job.ignored))
        now = time.monotonic()
        while self.polls and self.polls[0][0] <= now:
            _due, _seq, job = heapq.heappop(self.polls)
            self.submit("poll", "poll", job, poll_archive, self.client, job.album, frozenset(job.ignored))

    def next_timeout(self):
        timeout = STATUS_INTERVAL if self.status.enabled else 1.0
        if self.polls:
            timeout = min(timeout, max(0.0, self.polls[0][0] - time.monotonic()))
        return timeout

    # -- the loop --

    def run(self, root):
        self.start(root)
        while self.futures or (self.polls and not self.halt) or (self.waiting and not self.halt):
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
        try:
            result = future.result()
        except (AuthError, Interrupted):
            raise
        except LocalWriteError as exc:
            self.stop_new_work(str(exc))
            self.fail(job_of(kind, payload), "could not write: %s" % exc)
            return
        except BackupError as exc:
            self.on_error(kind, payload, exc)
            return
        except Exception as exc:       # a bug or an unforeseen answer: fail this piece, go on
            log.debug("unexpected error in %s", kind, exc_info=True)
            self.on_error(kind, payload, BackupError("%s: %s" % (type(exc).__name__, redact_urls(exc))))
            return
        getattr(self, "on_" + kind)(payload, result)

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
        job = job_of(kind, payload)
        if kind == "download" and payload[3] != job.generation:
            return                      # a part of an archive we have already given up on
        self.end_preparing(job)
        if isinstance(exc, Forbidden) and kind == "request":
            self.fail(job, "downloads not allowed: %s" % exc)
        elif isinstance(exc, ArchiveGone) and kind == "download" and not job.failed:
            self.archive_vanished(job, str(exc))
        else:
            self.fail(job, str(exc))

    def end_preparing(self, job):
        if job.in_prep:
            job.in_prep = False
            self.preparing -= 1

    # -- walk --

    def on_walk(self, folder, result):
        folders, albums, skipped = result
        for where, why in skipped:
            log.warning("skipping %s: %s", where, why)
        for sub in folders:
            if sub.node_id in self.seen_nodes:
                continue
            self.seen_nodes.add(sub.node_id)
            rel = "/".join(sub.path)
            if not folder_may_match(rel, self.options.includes, self.options.excludes):
                log.debug("not walking %s (outside --include/--exclude)", rel)
                continue
            if not self.options.dry_run and not self.halt:
                self.make_dirs(sub.path)
            self.submit("walk", "walk", sub, walk_folder, self.client, sub)
        for album in albums:
            if album.node_id in self.seen_nodes:
                continue
            self.seen_nodes.add(album.node_id)
            self.on_album(album)

    def make_dirs(self, path):
        try:
            os.makedirs(os.path.join(self.out, *path), exist_ok=True)
        except OSError as exc:
            self.stop_new_work("%s: %s" % (os.path.join(self.out, *path), exc.strerror or exc))

    def on_album(self, album):
        if not is_selected(album.rel, self.options.includes, self.options.excludes):
            return
        self.summary.albums_found += 1
        self.found_keys.add(album.album_key)
        record = self.state.albums.get(album.album_key)
        job = AlbumJob(album, record)
        if record and record.get("path") != album.rel and not self.options.dry_run:
            self.move_album(job)
        if album.has_details or not record:
            self.route(job)
        else:
            self.submit("request", "details", job, fetch_details, self.client, album)

    def on_details(self, job, album):
        job.album = album
        self.route(job)

    def route(self, job):
        """Decide what an album needs once its timestamps are known (or it is new)."""
        album = job.album
        status = classify(album, job.record, self.out) if album.has_details or job.record else "new"
        if self.options.dry_run:
            if status == "unchanged" and job.record.get("path") != album.rel:
                status = "moved"
            self.options.print_line("%-9s %s" % (status, album.rel))
            return
        if status == "unchanged":
            self.summary.unchanged += 1
            return
        if self.halt:
            return
        job.reason = status
        if album.image_count == 0:
            self.finish_album(job)       # an empty album: its folder, no archive
            return
        self.waiting.append(job)

    def move_album(self, job):
        """The album was renamed or moved on SmugMug: move its local folder along."""
        old_rel = job.record["path"]
        old = os.path.join(self.out, *old_rel.split("/"))
        new = os.path.join(self.out, *job.album.path)
        if not os.path.isdir(old):
            return
        try:
            if not os.path.exists(new):
                os.makedirs(os.path.dirname(new), exist_ok=True)
                os.rename(old, new)
            else:
                for part in job.record.get("parts") or []:
                    src, dst = os.path.join(old, part["FileName"]), os.path.join(new, part["FileName"])
                    if os.path.exists(src) and not os.path.exists(dst):   # never over another album's file
                        os.rename(src, dst)
        except OSError as exc:
            log.warning("could not move %s to %s (%s): downloading it again", old_rel, job.album.rel, exc)
            return
        log.info("moved %s -> %s", old_rel, job.album.rel)
        self.summary.moved += 1
        job.record = dict(job.record, path=job.album.rel)
        self.state.record({"album": job.record})

    # -- request and poll --

    def on_request(self, job, result):
        state, album, parts, stale = result
        job.album = album
        job.ignored.update(stale)
        if state == "empty":
            self.end_preparing(job)
            self.finish_album(job)
            return
        self.on_archive(job, state, parts)

    def on_poll(self, job, result):
        state, parts = result
        self.on_archive(job, state, parts)

    def on_archive(self, job, state, parts):
        if state == "complete":
            self.end_preparing(job)
            self.start_downloads(job, parts)
        elif state in ("error", "removed"):
            self.end_preparing(job)
            job.ignored.update(p.identity for p in parts)
            if state == "error":
                job.errors += 1
                if job.errors > ARCHIVE_ERROR_RETRIES:
                    self.fail(job, "SmugMug could not prepare the archive (Error, %d tries)" % job.errors)
                    return
                log.warning("archive of %s failed on SmugMug: requesting a new one", job.album.rel)
            else:
                self.archive_vanished(job, "archive expired (Removed)")
                return
            self.request_again(job)
        else:
            limit = self.config.archive_timeout_hours * 3600
            if time.monotonic() - job.requested_at > limit:
                self.end_preparing(job)
                self.fail(job, "archive not ready after %s" % human_seconds(limit))
                return
            if not parts and job.polls >= REQUEST_AGAIN_AFTER_POLLS:
                # SmugMug lists nothing for our request: it was probably lost; ask again.
                self.end_preparing(job)
                log.debug("%s: no archive listed after %d looks; requesting again", job.album.rel, job.polls)
                self.request_again(job)
                return
            delay = poll_delay(job.polls, self.config.poll_seconds, self.config.poll_max_seconds)
            job.polls += 1
            self.seq += 1
            heapq.heappush(self.polls, (time.monotonic() + delay, self.seq, job))

    def archive_vanished(self, job, why):
        """Removed or gone: ask again, a bounded number of times."""
        job.removals += 1
        if job.removals > ARCHIVE_REMOVED_RETRIES:
            self.fail(job, why)
            return
        log.warning("%s: %s; requesting it again", job.album.rel, why)
        self.request_again(job)

    def request_again(self, job):
        """Give up on the current archive (its downloads still running are ignored) and queue a new request."""
        job.generation += 1
        job.polls = 0
        job.pending_parts = 0
        self.downloading.discard(job.album.album_key)
        self.waiting.appendleft(job)

    # -- download --

    def start_downloads(self, job, parts):
        if self.halt:
            return
        if not parts:
            self.fail(job, "SmugMug listed no archive parts")
            return
        job.names = part_file_names(parts)
        job.sizes = {}
        job.pending_parts = len(parts)
        folder = os.path.join(self.out, *job.album.path)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            self.stop_new_work("%s: %s" % (folder, exc.strerror or exc))
            self.fail(job, "could not create its folder")
            return
        self.downloading.add(job.album.album_key)
        for p in parts:
            final = os.path.join(folder, job.names[p.part])
            key = partial_key(job.album, job.names[p.part])
            resume_ok = self.state.partials.get(key) == p.identity
            if not resume_ok:
                self.state.record({"partial": [key, p.identity]})
            self.submit("download", "download", (job, p, final, job.generation), download_part,
                        self.client, p, final, resume_ok, self.add_bytes)

    def add_bytes(self, n):
        """Called from download threads; the orchestrator only reads the total."""
        with self._bytes_lock:
            self.bytes_done += n

    def on_download(self, payload, size):
        job, part, final, generation = payload
        if job.failed or generation != job.generation:
            return
        job.sizes[part.part] = size
        job.pending_parts -= 1
        if job.pending_parts == 0:
            self.finish_album(job)

    def finish_album(self, job):
        """Every part is a complete NAME.part: rename them, drop obsolete parts, record."""
        folder = os.path.join(self.out, *job.album.path)
        try:
            os.makedirs(folder, exist_ok=True)
            for name in job.names.values():
                os.replace(os.path.join(folder, name) + ".part", os.path.join(folder, name))
            keep = {n.casefold() for n in job.names.values()}
            for old in (job.record or {}).get("parts") or []:
                name = old.get("FileName")
                if isinstance(name, str) and name.casefold() not in keep and name == clean_name(name, keep_extension=True):
                    remove_quietly(os.path.join(folder, name))
        except OSError as exc:
            self.stop_new_work("%s: %s" % (folder, exc.strerror or exc))
            self.fail(job, "could not finish its files: %s" % exc)
            return
        self.downloading.discard(job.album.album_key)
        for name in job.names.values():
            key = partial_key(job.album, name)
            if key in self.state.partials:
                self.state.record({"partial": [key, None]})
        self.state.record({"album": album_record(job.album, job.names, job.sizes)})
        total = sum(job.sizes.values())
        self.summary.backed_up += 1
        self.summary.parts += len(job.names)
        self.summary.bytes += total
        if not self.status.enabled or self.options.verbose:
            log.info("backed up %s (%s, %d part%s, %s)", job.album.rel, job.reason, len(job.names),
                     "" if len(job.names) == 1 else "s", human_bytes(total))

    def fail(self, job, reason):
        if job is None or job.failed:
            return
        job.failed = True
        self.end_preparing(job)
        self.downloading.discard(job.album.album_key)
        self.summary.failed[job.album.rel] = reason
        log.error("%s: %s", job.album.rel, reason)

    def stop_new_work(self, why):
        if not self.halt:
            log.error("stopping new downloads: %s", why)
            self.summary.write_error = why
        self.halt = True
        for future, (kind, _payload) in list(self.futures.items()):
            if kind in ("download", "request", "poll") and future.cancel():
                del self.futures[future]
        self.waiting.clear()
        self.polls.clear()

    # -- output --

    def progress_text(self):
        elapsed = max(time.monotonic() - self.started, 0.001)
        waiting = self.preparing + len(self.waiting)
        done, failed = self.summary.backed_up + self.summary.unchanged, len(self.summary.failed)
        if waiting and not self.downloading:
            return "albums: %d found, %d done, %d failed | waiting for %d archive%s to be prepared" % (
                self.summary.albums_found, done, failed, waiting, "" if waiting == 1 else "s")
        return "albums: %d found, %d preparing, %d downloading, %d done, %d failed | %s at %s/s" % (
            self.summary.albums_found, waiting, len(self.downloading), done, failed,
            human_bytes(self.bytes_done), human_bytes(self.bytes_done / elapsed))

    def show_progress(self):
        if self.options.dry_run:
            return
        self.status.show(self.progress_text())
        now = time.monotonic()
        if not self.status.enabled and now - self.last_progress_log >= PROGRESS_LOG_INTERVAL:
            self.last_progress_log = now
            waiting = self.preparing + len(self.waiting)
            if waiting and not self.downloading:
                log.info("waiting for %d archive%s to be prepared by SmugMug", waiting,
                         "" if waiting == 1 else "s")

    def finish(self):
        if self.walk_complete and not self.options.includes and not self.options.excludes:
            self.summary.gone = sorted(r.get("path", k) for k, r in self.state.albums.items()
                                       if k not in self.found_keys)
        self.summary.seconds = time.monotonic() - self.started

    def shutdown(self, wait):
        for pool in self.pools.values():
            pool.shutdown(wait=wait, cancel_futures=True)


# CLI ########################################################################

EPILOG = """\
examples:
  first time:   python smugmug_download.py --authorize
  back up:      python smugmug_download.py
  what's new:   python smugmug_download.py --dry-run
  some albums:  python smugmug_download.py --include 'Family/2019/*' --exclude '*/Private'
  cron (the virtualenv's Python, absolute paths; prints only on trouble):
    0 3 * * * cd /home/me/smugmug_download && /home/me/smugmug_download/.venv/bin/python smugmug_download.py --quiet --log-file /home/me/smugmug-backup.log

exit codes: 0 all backed up (or unchanged), 1 some albums failed, 2 config/usage/
credentials error, 3 another run holds the lock, 130 interrupted, 141 stdout closed
by its reader (`--dry-run | head`).
"""


class Options:
    """What the command line asked for, beyond the config."""

    def __init__(self, args, out=None):
        self.dry_run = args.dry_run
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


def build_parser():
    parser = argparse.ArgumentParser(
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
    how = parser.add_argument_group("how")
    how.add_argument("--workers", type=int, metavar="N",
                     help="parallel downloads (default 4; the other pools are sized to match)")
    how.add_argument("--max-preparing", type=int, metavar="N",
                     help="albums being prepared by SmugMug at once (default 32)")
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
    if args.workers is not None and not 1 <= args.workers <= 64:
        parser.error("--workers must be between 1 and 64")
    if args.max_preparing is not None and not 1 <= args.max_preparing <= 1000:
        parser.error("--max-preparing must be between 1 and 1000")
    if args.authorize and (args.dry_run or args.include or args.exclude):
        parser.error("--authorize does not go with --dry-run, --include or --exclude")


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
        message = redact_urls(record.getMessage())
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


def print_summary(summary, options, interrupted=False):
    failed = len(summary.failed)
    if options.quiet:
        if failed or summary.write_error or interrupted:
            what = "interrupted" if interrupted else "%d album%s failed" % (failed, "" if failed == 1 else "s")
            first = "; ".join("%s: %s" % kv for kv in list(summary.failed.items())[:3])
            log.error("smugmug_download: %s (%d backed up, %d unchanged)%s%s", what, summary.backed_up,
                      summary.unchanged, ": " + first if first else "",
                      " ..." if failed > 3 else "")
        return
    log.info("%s in %s: %d album%s backed up (%d part%s, %s), %d unchanged%s.",
             "Interrupted" if interrupted else "Done", human_seconds(summary.seconds),
             summary.backed_up, "" if summary.backed_up == 1 else "s", summary.parts,
             "" if summary.parts == 1 else "s", human_bytes(summary.bytes), summary.unchanged,
             ", %d moved" % summary.moved if summary.moved else "")
    if summary.failed:
        log.error("%d album%s failed:", failed, "" if failed == 1 else "s")
        for path, reason in sorted(summary.failed.items()):
            log.error("  %s: %s", path, reason)
    if summary.gone:
        log.info("%d album%s gone from SmugMug (local files kept):", len(summary.gone),
                 "" if len(summary.gone) == 1 else "s")
        for path in summary.gone:
            log.info("  %s", path)


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
        try:
            summary = orchestrator.run(root)
        except (KeyboardInterrupt, Interrupted):
            stop.set()
            orchestrator.shutdown(wait=False)
            status.clear()
            state.save()
            orchestrator.finish()
            print_summary(orchestrator.summary, options, interrupted=True)
            return EXIT_INTERRUPTED
        except AuthError:
            stop.set()
            orchestrator.shutdown(wait=False)
            state.save()
            raise
        orchestrator.shutdown(wait=True)
        state.save()
        status.clear()
        if options.dry_run:
            for path in summary.gone:
                options.print_line("%-9s %s" % ("gone", path))
        else:
            print_summary(summary, options)
        return EXIT_ALBUMS_FAILED if (summary.failed or summary.write_error) else EXIT_OK
    except NotFound as exc:
        raise UsageError("SmugMug user %r not found: %s" % (config.smugmug_user, exc))
    except ApiError as exc:
        raise UsageError("could not reach the account: %s" % exc)
    finally:
        stop.set()
        client.close()
        if lock:
            lock.release()


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
        return run(config, Options(args), status)
    except UsageError as exc:
        status.clear()
        log.error("%s", exc)
        return EXIT_USAGE
    except AuthError as exc:
        status.clear()
        log.error("SmugMug rejected the credentials: %s. Run --authorize or check config.json", exc)
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
