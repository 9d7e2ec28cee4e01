"""Unit tests of the pure helpers: name cleaning above all."""

import datetime
import email.utils
import random
import time

import pytest

import smugmug_download as sd


@pytest.mark.parametrize("raw, cleaned", [
    ("Family", "Family"),
    ("a/b\\c:d*e?f\"g<h>i|j", "a_b_c_d_e_f_g_h_i_j"),
    ("tab\there\x00nul\x1fend\x7f", "tab_here_nul_end_"),
    ("  spaced out  ", "spaced out"),
    ("trailing dots...", "trailing dots"),
    ("dots and spaces . . ", "dots and spaces"),
    ("", "_"),
    (".", "_"),
    ("..", "_"),
    ("   ", "_"),
    ("../../etc/passwd", ".._.._etc_passwd"),
    ("/absolute", "_absolute"),
    ("CON", "CON_"),
    ("con", "con_"),
    ("Lpt9", "Lpt9_"),
    ("com1.zip", "com1_.zip"),
    ("NUL.tar.gz", "NUL_.tar.gz"),
    ("CONSOLE", "CONSOLE"),
    ("COM10", "COM10"),
    (".hidden", ".hidden"),
])
def test_clean_name_rules(raw, cleaned):
    """Each rule of the name contract: forbidden characters, stripping, dots, device names."""
    assert sd.clean_name(raw) == cleaned


def test_clean_name_nfc():
    """Decomposed Unicode is stored composed (NFC)."""
    assert sd.clean_name("Cafe\u0301") == "Caf\u00e9"


def test_clean_name_byte_limit_respects_characters():
    """Long names are cut to at most 200 UTF-8 bytes without splitting a character."""
    name = sd.clean_name("\u00e9" * 1000)
    assert len(name.encode("utf-8")) <= 200
    assert name == "\u00e9" * 100
    assert len(sd.clean_name("x" * 1000).encode()) == 200


def test_clean_name_keeps_extension_when_cut():
    """A long archive file name keeps its .zip when cut."""
    name = sd.clean_name("y" * 500 + ".zip", keep_extension=True)
    assert name.endswith(".zip") and len(name.encode()) <= 200


def test_assign_names_case_collisions_get_node_id():
    """Siblings equal ignoring case: all but the oldest get the node id appended."""
    names = sd.assign_names([("n2", "Trip", ("2020", "n2")), ("n1", "trip", ("2019", "n1")),
                             ("n3", "TRIP ", ("2021", "n3")), ("n4", "Other", ("2018", "n4"))])
    assert names["n1"] == "trip"
    assert names["n2"] == "Trip (n2)"
    assert names["n3"] == "TRIP (n3)"
    assert names["n4"] == "Other"
    assert len({n.casefold() for n in names.values()}) == 4


def test_assign_names_reserved_and_long():
    """A top-level name equal to the state folder is suffixed; suffixes stay within 200 bytes."""
    names = sd.assign_names([("a", ".smugmug_download", ("", "a"))], sd.RESERVED_TOP_NAMES)
    assert names["a"] == ".smugmug_download (a)"
    long = sd.assign_names([("a", "z" * 300, ("1", "a")), ("b", "Z" * 300, ("2", "b"))])
    assert len(long["b"].encode()) <= 200 and long["b"].endswith(" (b)")


def test_part_file_names_unique_and_safe():
    """Archive file names are cleaned, de-duplicated, and never end in .part."""
    parts = [sd.ArchivePart(1, "../../x.zip", "Complete", "u"), sd.ArchivePart(2, "..\\..\\X.zip", "Complete", "u"),
             sd.ArchivePart(3, "", "Complete", "u"), sd.ArchivePart(4, "evil.part", "Complete", "u")]
    names = sd.part_file_names(parts)
    assert names[1] == ".._.._x.zip"
    assert names[2] == ".._.._X (part 2).zip"
    assert names[3] == "archive-3.zip"
    assert names[4] == "evil.part_"
    assert all("/" not in n and "\\" not in n for n in names.values())


def test_parse_retry_after():
    """Retry-After as seconds or an HTTP date; capped; garbage ignored."""
    assert sd.parse_retry_after("7") == 7
    assert sd.parse_retry_after("99999") == sd.RETRY_AFTER_CAP
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28 <= sd.parse_retry_after(date, now=now) <= 31
    assert sd.parse_retry_after("soon") is None
    assert sd.parse_retry_after(None) is None


def test_backoff_delay_grows_with_jitter_and_cap():
    """Backoff doubles per attempt within [d/2, d], never above the cap."""
    rng = random.Random(1)
    for attempt in range(12):
        d = min(sd.BACKOFF_CAP, sd.BACKOFF_BASE * 2 ** attempt)
        value = sd.backoff_delay(attempt, rng)
        assert d / 2 <= value <= d


def test_poll_delay_schedule():
    """Polls start near 2 s, look again soon, then grow to 30 s."""
    delays = [sd.poll_delay(n) for n in range(15)]
    assert delays[0] == 2.0
    assert delays[1] == 1.0
    assert all(a <= b for a, b in zip(delays[1:], delays[2:]))
    assert delays[-1] == 30.0
    assert sd.poll_delay(10 ** 6) == 30.0


def test_content_range_parsing():
    assert sd.parse_content_range("bytes 100-199/200") == (100, 199, 200)
    assert sd.parse_content_range("bytes 0-9/*") == (0, 9, None)
    assert sd.parse_content_range("items 1-2/3") is None
    assert sd.parse_unsatisfied_range("bytes */500") == 500


def test_include_exclude_selection():
    """Globs match the album path or a folder above it; excludes win."""
    inc, exc = ["Family/2019/*"], ["*/Private"]
    assert sd.is_selected("Family/2019/Xmas", inc, exc)
    assert not sd.is_selected("Family/2020/Xmas", inc, exc)
    assert not sd.is_selected("Family/2019/Private", inc, exc)
    assert sd.is_selected("Travel/Paris", ["Travel"], [])
    assert not sd.is_selected("Travel/Paris", [], ["Travel"])


def test_folder_pruning():
    """Folders that cannot hold a selected album are not walked."""
    inc = ["Family/2019/*"]
    assert sd.folder_may_match("Family", inc, [])
    assert sd.folder_may_match("Family/2019", inc, [])
    assert not sd.folder_may_match("Travel", inc, [])
    assert not sd.folder_may_match("Family/2020", inc, [])
    assert sd.folder_may_match("Anything", ["*/2019/*"], [])
    assert not sd.folder_may_match("Family", [], ["Family"])


def _album(lu="2020-01-01T00:00:00+00:00"):
    return sd.Album("n", "K", "/api/v2/album/K", ("A",), lu, lu, 3, True)


def _part(n, status, added, url="https://x/a"):
    return sd.ArchivePart(n, "a-%d.zip" % n, status, url, added)


def test_archive_selection_freshness():
    """Only archives not older than the album's last change are reused; newest per part."""
    album = _album()
    old = [_part(1, "Complete", "2019-12-31T00:00:00+00:00")]
    assert sd.archive_state(old, album, False, set()) == ("preparing", [])
    fresh = [_part(1, "Complete", "2020-01-02T00:00:00+00:00", "https://x/1"),
             _part(1, "Complete", "2020-01-03T00:00:00+00:00", "https://x/2"),
             _part(2, "Processing", "2020-01-03T00:00:00+00:00")]
    state, parts = sd.archive_state(fresh, album, False, set())
    assert state == "preparing" and [p.url for p in parts] == ["https://x/2", "https://x/a"]
    done = [_part(1, "Complete", "2020-01-03T00:00:00+00:00"), _part(2, "Complete", "2020-01-03T00:00:00+00:00")]
    assert sd.archive_state(done, album, False, set())[0] == "complete"


def test_archive_states_error_removed_unknown():
    """Error and Removed are reported; unknown statuses count as in progress."""
    album = _album()
    err = [_part(1, "Error", "2020-01-03T00:00:00+00:00")]
    assert sd.archive_state(err, album, True, set())[0] == "error"
    assert sd.archive_state(err, album, True, {err[0].identity})[0] == "preparing"
    gone = [_part(1, "Removed", "2020-01-03T00:00:00+00:00")]
    assert sd.archive_state(gone, album, True, set())[0] == "removed"
    odd = [_part(1, "Queued", "2020-01-03T00:00:00+00:00")]
    assert sd.archive_state(odd, album, True, set())[0] == "preparing"
    undated = [_part(1, "Complete", "")]
    assert sd.archive_state(undated, album, False, set())[0] == "preparing"
    assert sd.archive_state(undated, album, True, set())[0] == "complete"


def test_envelope_helpers_tolerate_missing_locator():
    """An empty collection has no Locator key: that is an empty list, not a crash."""
    assert sd.as_list(sd.envelope_payload({"Response": {"Locator": "Node", "LocatorType": "Objects"}})) == []
    assert sd.as_list(sd.envelope_payload({"Code": 401})) == []
    assert sd.next_page({"Response": {"Pages": {"Total": 3}}}) is None
    assert sd.uri_of({"Uris": {"Node": "/api/v2/node/x"}}, "Node") == "/api/v2/node/x"
    assert sd.uri_of({"Uris": {"Node": {"Uri": "/api/v2/node/y"}}}, "Node") == "/api/v2/node/y"


def test_links_never_leave_the_api_host():
    """A NextPage or Uri pointing at another host keeps only its path and query."""
    assert sd.path_and_query("https://evil.invalid/api/v2/node/x!children?start=5") == \
        "/api/v2/node/x!children?start=5"
    assert sd.add_query("/a?start=11&count=10", _expand="Album", count=100) == \
        "/a?start=11&count=10&_expand=Album"


def test_redaction_of_urls():
    assert sd.redact_urls("GET https://photos.invalid/x.zip?Signature=abc&k=v failed") == \
        "GET https://photos.invalid/x.zip?... failed"


def test_parse_time_variants():
    assert sd.parse_time("2014-11-25T23:18:13+00:00") == datetime.datetime(
        2014, 11, 25, 23, 18, 13, tzinfo=datetime.timezone.utc)
    assert sd.parse_time("2014-11-25T23:18:13Z") is not None
    assert sd.parse_time("yesterday") is None
