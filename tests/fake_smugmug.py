#!/usr/bin/env python3
"""A SmugMug API v2 emulator for tests, benchmarks and trying the tool out.

Serves real HTTP on 127.0.0.1 from a thread and plays the subset of the API
described in shared/smugmug-api.md: the envelope, !authuser, users, nodes,
paged !children (with a clamped count and _expand=Album), albums, the
!download archive lifecycle (Init -> Processing -> Complete on time knobs),
multi-part archives served with Content-Length and Range, and the OAuth 1.0a
PIN flow. Every API call's OAuth signature is verified with oauthlib; a bad
one gets 401. Faults are knobs on FakeSmugMug, each deterministic.

    python tests/fake_smugmug.py            # serve a sample account, print a config
"""

import argparse
import datetime
import email.utils
import http.server
import itertools
import json
import os
import random
import socketserver
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from oauthlib.common import Request as OAuthRequest
from oauthlib.oauth1.rfc5849 import signature as oauth_signature

APP_KEY, APP_SECRET = "test-app-key-7f3a", "test-app-secret-91c2"
ACCESS_KEY, ACCESS_SECRET = "test-access-token-5d8e", "test-access-secret-2b6f"
PATTERN_PERIOD = 65521       # a prime: content shifted by any offset differs
T0 = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)


def iso(moment):
    return moment.replace(microsecond=0).isoformat()


def pattern_block(seed):
    rng = random.Random(seed)
    block = bytes(rng.getrandbits(8) for _ in range(PATTERN_PERIOD))
    return block + block


class Content:
    """Deterministic archive bytes: byte i is block[i % PERIOD] for a seeded block."""

    _cache: Dict[str, bytes] = {}
    _lock = threading.Lock()

    def __init__(self, seed, size):
        self.seed, self.size = seed, size

    def block(self):
        with Content._lock:
            if self.seed not in Content._cache:
                Content._cache[self.seed] = pattern_block(self.seed)
            return Content._cache[self.seed]

    def read(self, start, end):
        block, out = self.block(), []
        pos = start
        while pos < end:
            offset = pos % PATTERN_PERIOD
            n = min(end - pos, PATTERN_PERIOD)
            out.append(block[offset:offset + n])
            pos += n
        return b"".join(out)

    def whole(self):
        return self.read(0, self.size)


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
    key: str
    node_id: str
    part_sizes: List[int]
    part_names: Optional[List[str]] = None
    version: int = 1
    last_updated: datetime.datetime = T0
    images_last_updated: datetime.datetime = T0
    image_count: Optional[int] = None
    allow_downloads: bool = True
    prep_seconds: Optional[float] = None

    def parts(self):
        """[(file name, Content)] of the album's current archive."""
        names = self.part_names or (
            ["%s.zip" % self.key] if len(self.part_sizes) == 1
            else ["%s-%d.zip" % (self.key, i + 1) for i in range(len(self.part_sizes))])
        return [(names[i], Content("%s:%d:%d" % (self.key, self.version, i), size))
                for i, size in enumerate(self.part_sizes)]


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
        self.garbage_every = 0          # every k-th API call gets a 200 with a non-JSON body
        self.throttle_calls = set()     # API call numbers answered 429 (opens a window)
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
        self.require_download_oauth = True
        self.post_empty_body = False    # POST answered with no body at all
        self.relative_web_uri = False   # WebUri given as a path on the API host
        self.redirect_downloads = False # WebUri answers 302 to the real file
        self.omit_part_numbers = False  # Download objects without "Part"
        self.lowercase_status = False   # "complete" instead of "Complete"
        self.no_content_length = False  # archive bodies end with the connection, no Content-Length
        self._download_attempts = {}
        self._bucket_lock = threading.Lock()
        self._bucket_time = time.monotonic()
        self._bucket_tokens = 0.0
        self.server = None

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

    def add_album(self, name, parent=None, sizes=(3000,), names=None, image_count=None, key=None, **kw):
        node = self.add_node("Album", name, parent or self.root_id, **kw)
        key = key or self.new_id("A")
        node.album_key = key
        count = image_count if image_count is not None else (0 if not sizes else 10 * len(sizes))
        self.albums[key] = FakeAlbum(key, node.node_id, list(sizes), names, image_count=count)
        return key

    def touch(self, key):
        """The album changed: new timestamps, new content."""
        with self.lock:
            album = self.albums[key]
            album.version += 1
            now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
            album.last_updated = album.images_last_updated = now + datetime.timedelta(seconds=1)

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

    def expected_parts(self, key):
        """{file name: bytes} of the album's current archive."""
        return {name: content.whole() for name, content in self.albums[key].parts()}

    # -- serving ----------------------------------------------------------

    @property
    def base(self):
        return "http://127.0.0.1:%d" % self.server.server_address[1]

    def start(self):
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.fake = self
        thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                  name="fake-smugmug", daemon=True)
        thread.start()
        return self

    def stop(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    def config(self, output_dir, **extra):
        data = {"app_key": self.app_key, "app_key_secret": self.app_secret,
                "access_key": ACCESS_KEY, "access_key_secret": self.tokens.get(ACCESS_KEY, ACCESS_SECRET),
                "output_dir": str(output_dir), "api_base": self.base,
                "poll_seconds": 0.02, "poll_max_seconds": 0.1}
        data.update(extra)
        return data

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

    def archive_status(self, archive):
        if archive.forced_status:
            return archive.forced_status
        album = self.albums[archive.album]
        elapsed = time.monotonic() - archive.created
        if elapsed >= archive.prep_seconds:
            if album.key in self.error_always or (album.key in self.error_once and archive.number == 1):
                return "Error"
            if self.removed_once.get(album.key) == "before" and archive.number == 1:
                return "Removed"          # expired before anyone downloaded it
            return "Complete"
        if self.unknown_status:
            return self.unknown_status
        return "Init" if elapsed < archive.prep_seconds / 3 else "Processing"

    def new_archive(self, key):
        album = self.albums[key]
        with self.lock:
            count = len(self.archives.get(key, [])) + 1
            archive = Archive("%s#%d" % (key, count), key, album.version, time.monotonic(),
                              datetime.datetime.now(datetime.timezone.utc),
                              album.prep_seconds if album.prep_seconds is not None else self.prep_seconds,
                              album.parts(), number=count)
            self.archives.setdefault(key, []).append(archive)
            self.archive_by_id[archive.archive_id] = archive
        return archive

    def download_objects(self, key):
        out = []
        for archive in self.archives.get(key, []):
            status = self.archive_status(archive)
            for i, (name, content) in enumerate(archive.parts):
                obj = {
                    "Part": i + 1, "FileName": name, "Status": status,
                    "DateAdded": iso(archive.created_at), "DateModified": iso(archive.created_at),
                    "Size": content.size,
                    "WebUri": "%s/%s/%s/%d/%s" % ("" if self.relative_web_uri else self.base,
                                                  "redirect" if self.redirect_downloads else "download",
                                                  urllib.parse.quote(archive.archive_id, safe=""),
                                                  i + 1, urllib.parse.quote(name, safe="")),
                    "Uri": "/api/v2/album/%s!download" % key}
                if self.omit_part_numbers:
                    del obj["Part"]
                if self.lowercase_status:
                    obj["Status"] = status.lower()
                out.append(obj)
        return out

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
                "SortMethod": "SortIndex", "Type": node.type, "UrlName": url_name,
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
                "ImageCount": album.image_count, "ImagesLastUpdated": iso(album.images_last_updated),
                "Keywords": "", "LastUpdated": iso(album.last_updated), "Name": name,
                "NiceName": album.key, "UrlName": album.key, "NodeID": album.node_id, "PasswordHint": "",
                "Protected": False, "ResponseLevel": "Full", "SecurityType": "None",
                "SortDirection": "Ascending", "SortMethod": "Position", "Title": name,
                "UrlPath": "/" + album.key, "Uri": "/api/v2/album/%s" % album.key,
                "WebUri": "https://%s.smugmug.invalid/%s" % (self.nickname, album.key),
                "UriDescription": "Album by key", "Uris": uris}

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
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request, client_address):
        """Clients hanging up (cut downloads, killed runs) are normal here."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True     # else each answer may wait ~40 ms for a delayed ACK

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
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error_json(self, status, message):
        self.send(status, {"Code": status, "Message": message})

    def record(self, method, path, query, status, kind):
        with self.fake.lock:
            self.fake.log.append({"t": time.monotonic(), "method": method, "path": path,
                                  "query": query, "status": status, "kind": kind})

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
        split = urllib.parse.urlsplit(self.path)
        path, query = urllib.parse.unquote(split.path), dict(urllib.parse.parse_qsl(split.query))
        body = self.read_body()
        try:
            if path.startswith("/services/oauth/1.0a/"):
                return self.oauth_flow(method, path, query, body)
            if path.startswith("/download/"):
                return self.download(method, path)
            if path.startswith("/redirect/"):
                ok, _ = self.verify_oauth(method, b"", self.fake.tokens)
                if not ok:
                    return self.send_error_json(401, "oauth_problem=signature_invalid")
                return self.send(302, b"", content_type="text/plain",
                                 headers={"Location": urllib.parse.quote("/download/" + path[len("/redirect/"):],
                                                                         safe="/")})
            if path.startswith("/api/v2"):
                return self.api(method, path, query, body)
            self.send_error_json(404, "Not Found")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def api(self, method, path, query, body):
        fake = self.fake
        with fake.lock:
            fake.api_count += 1
            number = fake.api_count
        kind = self.kind_of(method, path)
        if fake.api_latency:
            time.sleep(fake.api_latency)
        now = time.monotonic()
        headers = {}
        if fake.rate_remaining is not None:
            headers = {"X-RateLimit-Remaining": str(fake.rate_remaining),
                       "X-RateLimit-Reset": str(int(time.time()) + 1)}
        if now < fake.throttle_until:
            fake.throttled_log.append((now, path))
            self.record(method, path, query, 429, kind)
            return self.send(429, {"Code": 429, "Message": "Too Many Requests"},
                             headers={"Retry-After": str(fake.retry_after)})
        if number in fake.throttle_calls:
            if isinstance(fake.retry_after, (int, float)):
                wait = fake.retry_after
            else:
                wait = email.utils.parsedate_to_datetime(fake.retry_after).timestamp() - time.time()
            fake.throttle_until = now + wait
            fake.throttle_started = now
            self.record(method, path, query, 429, kind)
            return self.send(429, {"Code": 429, "Message": "Too Many Requests"},
                             headers={"Retry-After": str(fake.retry_after)})
        ok, _params = self.verify_oauth(method, body, fake.tokens)
        revoked = fake.revoke_after is not None and number > fake.revoke_after
        if not ok or revoked:
            self.record(method, path, query, 401, kind)
            return self.send_error_json(401, "oauth_problem=signature_invalid" if not ok else
                                        "oauth_problem=token_rejected")
        if fake.fail_every and number % fake.fail_every == 0:
            status = (500, 502, 503, 504)[(number // fake.fail_every) % 4]
            self.record(method, path, query, status, kind)
            if number % 2:
                return self.send(status, "<html><body><h1>%d Server Error</h1></body></html>" % status,
                                 content_type="text/html")
            return self.send_error_json(status, "Server Error")
        if fake.garbage_every and number % fake.garbage_every == 0:
            self.record(method, path, query, 200, kind)
            return self.send(200, "<html>SmugMug API browser</html>", content_type="text/html")
        start = int(query.get("start", "1") or 1)
        canned = fake.canned.get((path, start)) or fake.canned.get((path, None))
        if canned is not None and method == "GET":
            self.record(method, path, query, 200, kind)
            return self.send(200, canned, headers=headers)
        status, answer = self.route(method, path, query)
        self.record(method, path, query, status, kind)
        self.send(status, answer, headers=headers)

    @staticmethod
    def kind_of(method, path):
        if path.endswith("!download"):
            return "post" if method == "POST" else "download-get"
        if path.endswith("!children"):
            return "walk"
        if path.startswith("/api/v2/album/"):
            return "album"
        return "walk"

    def route(self, method, path, query):
        fake = self.fake
        request_uri = self.path
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
            if album is None:
                return 404, {"Code": 404, "Message": "Not Found"}
            if action == "":
                return 200, envelope(method, request_uri, path, "Album", "Object", fake.album_json(album))
            if action == "download":
                return self.album_download(method, request_uri, path, album)
        return 404, {"Code": 404, "Message": "Not Found"}

    def children(self, method, request_uri, path, node, query):
        fake = self.fake
        try:
            count = int(query.get("count") or fake.default_count)
            start = max(1, int(query.get("start") or 1))
        except ValueError:
            count, start = fake.default_count, 1
        count = max(1, min(count, fake.max_count))
        with fake.lock:
            ids = list(node.children)
        page = [fake.nodes[i] for i in ids[start - 1:start - 1 + count] if i in fake.nodes]
        total = len(ids)
        extra = "&_expand=Album" if query.get("_expand") == "Album" else ""
        link = lambda s: "%s?count=%d&start=%d%s" % (path, count, s, extra)
        pages = {"Total": total, "Start": start, "Count": len(page), "RequestedCount": count,
                 "FirstPage": link(1), "LastPage": link(max(1, ((total - 1) // count) * count + 1))}
        if start + count <= total:
            pages["NextPage"] = link(start + count)
        if start > 1:
            pages["PrevPage"] = link(max(1, start - count))
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
            if not album.allow_downloads:
                return 403, {"Code": 403, "Message": "Downloads are not allowed for this album"}
            fake.new_archive(album.key)
            if fake.post_empty_body:
                return fake.post_status, b""
            downloads = fake.download_objects(album.key) if fake.post_lists_downloads else None
            return fake.post_status, envelope(method, request_uri, path, "Download", "Objects",
                                              downloads or None, code=fake.post_status)
        downloads = fake.download_objects(album.key)
        return 200, envelope(method, request_uri, path, "Download", "Objects", downloads or None,
                             pages={"Total": len(downloads), "Start": 1, "Count": len(downloads),
                                    "RequestedCount": 100})

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
        key = (archive.archive_id, part_index)
        with fake.lock:
            attempt = fake._download_attempts.get(key, 0)
            fake._download_attempts[key] = attempt + 1
        if fake.removed_once.get(archive.album) == "during" and archive.number == 1:
            archive.forced_status = "Removed"
            return self.send(404, "<html>expired</html>", content_type="text/html")
        if archive.forced_status == "Removed" or fake.archive_status(archive) != "Complete":
            return self.send(404, "<html>gone</html>", content_type="text/html")
        size, start = content.size, 0
        status = 200
        headers = {"Accept-Ranges": "bytes"} if fake.honor_range else {}
        rng = self.headers.get("Range")
        if rng and fake.honor_range and rng.startswith("bytes="):
            first = int(rng[6:].split("-")[0])
            if first >= size:
                self.record(method, path, {}, 416, "archive")
                return self.send(416, b"", content_type="application/zip",
                                 headers={"Content-Range": "bytes */%d" % size})
            start, status = first, 206
            if fake.wrong_offset_once:
                fake.wrong_offset_once = False
                start = max(0, first - 1000)
            headers["Content-Range"] = "bytes %d-%d/%d" % (start, size - 1, size)
        self.record(method, path, {"range": rng}, status, "archive")
        end = size
        if attempt < fake.cut_times and fake.cut_after is not None:
            end = min(size, start + fake.cut_after)
        short = attempt < fake.short_times
        if short:
            end = min(end, start + (size - start) // 2)
        self.send_response(status)
        self.send_header("Content-Type", "application/zip")
        if fake.no_content_length:
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
            fake.take_bandwidth(n)
            self.wfile.write(content.read(pos, pos + n))
            pos += n
            with fake.lock:
                fake.download_bytes += n
        if end < size:
            self.close_connection = True
            self.wfile.flush()

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
    return keys


def main(argv=None):
    parser = argparse.ArgumentParser(description="Serve a sample SmugMug account on localhost.")
    parser.add_argument("--output-dir", default="./sample-backup", help="output_dir of the printed config")
    parser.add_argument("--write-config", metavar="PATH", help="also write the config to PATH")
    parser.add_argument("--prep-seconds", type=float, default=2.0, help="archive preparation time")
    args = parser.parse_args(argv)
    fake = FakeSmugMug()
    fake.prep_seconds = args.prep_seconds
    fake.max_count = 4
    sample_account(fake, part_size=200_000)
    fake.start()
    config = fake.config(args.output_dir)
    del config["poll_seconds"], config["poll_max_seconds"]
    text = json.dumps(config, indent=2)
    if args.write_config:
        with open(args.write_config, "w") as f:
            f.write(text + "\n")
        os.chmod(args.write_config, 0o600)      # it holds (fake) secrets, like a real config
    print("Fake SmugMug serving a sample account at %s. A matching config:\n%s" % (fake.base, text))
    print("Save it as config.json (or use --write-config) and run: python smugmug_download.py")
    print("Ctrl-C to stop.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
