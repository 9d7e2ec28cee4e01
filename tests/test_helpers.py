"""Unit tests of the pure helpers: name cleaning above all."""

import datetime
import email.utils
import itertools
import math
import random
import time

import pytest

import smugmug_download as sd


@pytest.mark.parametrize("raw, cleaned", [
    ("Family", "Family"),
    ("a/b\\c:d*e?f\"g<h>i|j", "a_b_c_d_e_f_g_h_i_j"),
    ("tab\there\x00nul\x1fend\x7f", "tab_here_nul_end_"),
    ("c1\x85next\x9fline", "c1_next_line"),
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


def test_a_suffixed_name_never_takes_a_siblings_own_name():
    """"trip" suffixed with its node id would be "trip (n3)", the name of an older sibling:
    it gets a number too, so no two siblings share a folder."""
    names = sd.assign_names([("A1", "Trip", 1), ("n3", "trip", 2), ("A5", "trip (n3)", 0)])
    assert names == {"A1": "Trip", "A5": "trip (n3)", "n3": "trip (n3) 2"}


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
    manifest = sd.part_file_names([sd.ArchivePart(1, "Metadata.JSON", "Complete", "u"),
                                   sd.ArchivePart(2, "metadata (part 1).json", "Complete", "u")])
    assert manifest == {1: "Metadata (part 1).JSON", 2: "metadata (part 1) (part 2).json"}


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
    assert sd.folder_may_match("Family/2019", ["family/2019/*"], [])      # walked, for the no-match hint
    assert not sd.is_selected("Family/2019/Christmas", ["family/2019/*"], [])


def _album(lu="2020-01-01T00:00:00+00:00"):
    return sd.Album("n", "K", "/api/v2/album/K", ("A",), lu, lu, 3, True)


def _part(n, status, added, url="https://x/a"):
    return sd.ArchivePart(n, "a-%d.zip" % n, status, url, added)


NEW, NEWER = "2020-01-02T00:00:00+00:00", "2020-01-03T00:00:00+00:00"


def test_reuse_only_archives_after_the_change():
    """Before a request, only an archive dated strictly after the album's last change is used;
    the newest such archive is chosen and remembered on the ticket."""
    album = _album()
    old = [_part(1, "Complete", "2019-12-31T00:00:00+00:00"), _part(1, "Complete", "2020-01-01T00:00:00+00:00")]
    assert sd.read_archive(old, album, sd.ArchiveTicket())[0] == "none"
    listing = [_part(1, "Complete", NEW, "https://x/1"), _part(1, "Processing", NEWER, ""),
               _part(2, "Processing", NEWER, "")]
    state, parts, ticket = sd.read_archive(listing, album, sd.ArchiveTicket())
    assert state == "preparing" and ticket.added == NEWER and [p.part for p in parts] == [1, 2]


def test_the_chosen_archive_failing_never_falls_back_to_another():
    """Defect 1: once an archive is chosen, its Error is the album's Error, even when an older
    Complete archive is listed beside it; given up, it becomes stale."""
    album = _album()
    ticket = sd.ArchiveTicket(posted=True, added=NEWER)
    listing = [_part(1, "Complete", NEW, "https://x/old"), _part(1, "Error", NEWER, "")]
    assert sd.read_archive(listing, album, ticket)[0] == "error"
    again = ticket.given_up()
    assert again.posted and again.not_before == NEWER and again.added is None
    _, _, seen = sd.read_archive(listing, album, ticket)
    again = seen.given_up()
    assert sd.read_archive(listing, album, again)[0] == "none"
    later = listing + [_part(1, "Complete", NEWER, "https://x/new")]       # the same second
    state, parts, _ = sd.read_archive(later, album, again)
    assert state == "complete" and parts[0].url == "https://x/new"


def test_status_decides_before_the_url():
    """Defect 12: parts without a URL still count by their Status: Error is an error, a part in
    progress keeps the archive preparing; Complete with no URL is an error; parts must be 1..n."""
    album = _album()
    ticket = sd.ArchiveTicket(posted=True)
    assert sd.read_archive([_part(1, "Error", NEW, "")], album, ticket)[0] == "error"
    mixed = [_part(1, "Complete", NEW), _part(2, "Processing", NEW, "")]
    assert sd.read_archive(mixed, album, ticket)[0] == "preparing"
    assert sd.read_archive([_part(2, "Complete", NEW)], album, ticket)[0] == "preparing"
    assert sd.read_archive([_part(1, "Complete", NEW, "")], album, ticket)[0] == "error"
    assert sd.read_archive([_part(1, "Removed", NEW)], album, ticket)[0] == "removed"
    assert sd.read_archive([_part(1, "Queued", NEW)], album, ticket)[0] == "preparing"
    assert sd.read_archive([], album, ticket)[0] == "none"


def test_undated_and_unnumbered_archives():
    """Undated archives are never reused, but trusted after our request; parts without numbers
    are numbered by their order within their archive."""
    album = _album()
    undated = [_part(1, "Complete", "")]
    assert sd.read_archive(undated, album, sd.ArchiveTicket())[0] == "none"
    assert sd.read_archive(undated, album, sd.ArchiveTicket(posted=True))[0] == "complete"
    body = {"Response": {"Locator": "Download", "Download": [
        {"FileName": "a.zip", "Status": "complete", "DateAdded": NEW, "WebUri": "https://x/1"},
        {"FileName": "b.zip", "Status": "Complete", "DateAdded": NEW, "WebUri": "https://x/2"},
        {"FileName": "c.zip", "Status": "Complete", "DateAdded": NEWER, "WebUri": "https://x/3"}]}}
    state, parts, _ = sd.read_archive(sd.archive_parts(body), album,
                                      sd.ArchiveTicket(posted=True, stale=frozenset(
                                          sd.part_key(p) for p in sd.archive_parts(body)[2:])))
    assert state == "complete" and [(p.part, p.file_name) for p in parts] == [(1, "a.zip"), (2, "b.zip")]


def _listed(key, name, size=None, md5=""):
    return sd.ListedFile(key, name, archived_size=size, archived_md5=md5)


def test_match_by_name_and_size_renamed_forms_once_each():
    """Entries match by FileName or SmugMug's renamed forms (-1, (1)) and by size; each entry
    once; an exact name wins over a renamed form."""
    listing = [_listed("a", "IMG.jpg", 10), _listed("b", "IMG.jpg", 20), _listed("c", "IMG-1.jpg", 30),
               _listed("d", "DSC.jpg", 5), _listed("e", "DSC.jpg", 5), _listed("f", "gone.mov", 7)]
    entries = [sd.ZipEntry("p1.zip", "IMG.jpg", 20), sd.ZipEntry("p1.zip", "IMG-2.jpg", 10),
               sd.ZipEntry("p2.zip", "IMG-1.jpg", 30), sd.ZipEntry("p1.zip", "DSC.jpg", 5),
               sd.ZipEntry("p2.zip", "folder/DSC (1).jpg", 5)]
    found = sd.match_files(listing, entries)
    assert found["a"].name == "IMG-2.jpg" and found["b"].name == "IMG.jpg" and found["c"].name == "IMG-1.jpg"
    assert {found["d"].name, found["e"].name} == {"DSC.jpg", "folder/DSC (1).jpg"}
    assert "f" not in found
    assert sd.match_files([_listed("x", "a.jpg", 3, "abc")], [sd.ZipEntry("p", "a.jpg", 3, "def")]) == {}


def test_loose_file_names_avoid_parts_manifest_and_each_other():
    """Loose files keep their cleaned FileName; a clash gets " (ImageKey)" before the extension."""
    names = sd.loose_file_names([("k1", "a.zip"), ("k2", "Metadata.JSON"), ("k3", "x/y.jpg"), ("k4", "X_Y.JPG")],
                                ["a.zip", sd.MANIFEST_NAME])
    assert names == {"k1": "a (k1).zip", "k2": "Metadata (k2).JSON", "k3": "x_y.jpg", "k4": "X_Y (k4).JPG"}


def test_state_records_are_validated(tmp_path):
    """Defect 6: a record with a bad field (path null, a path leaving output_dir, a negative size)
    is set aside with its key, the others load; version 1 records load as archive parts."""
    good = {"AlbumKey": "G", "NodeID": "n", "path": "A/B", "LastUpdated": "", "ImagesLastUpdated": "",
            "parts": [{"FileName": "G.zip", "size": 3}]}
    assert sd.AlbumRecord.from_json("G", good).files == [sd.SavedFile("G.zip", 3, "archive")]
    for bad in ({"path": None}, {"path": "../etc"}, {"path": "A//B"}, {"files": [{"name": "x", "size": -1}]},
                {"files": [{"name": "../x", "size": 1}]}, {"complete": "yes"}, {"NodeID": 5}):
        with pytest.raises(ValueError):
            sd.AlbumRecord.from_json("G", dict(good, **bad))
    import json
    os = __import__("os")
    state_dir = tmp_path / sd.STATE_DIR
    os.makedirs(state_dir)
    (state_dir / sd.STATE_FILE).write_text(json.dumps({"version": 1, "albums": {
        "G": good, "B": dict(good, AlbumKey="B", path=None)}, "partials": {"A/B/G.zip": "id"}}))
    state = sd.BackupState(str(tmp_path)).load()
    assert set(state.albums) == {"G"} and "B" in state.set_aside
    assert state.partials["A/B/G.zip"] == sd.Partial("", "id")


def test_path_owners():
    """Every recorded path has one owner; case and Unicode form do not make a second path."""
    record = sd.AlbumRecord("K", "n", "Family/Caf\u00e9", files=[sd.SavedFile("K.zip", 1)], manifest=5)
    owners = sd.PathOwners([record])
    assert owners.owner("family/CAFE\u0301") == "K"
    assert owners.owner("Family/Caf\u00e9/K.ZIP") == "K" and owners.owner("Family/Caf\u00e9/metadata.json") == "K"
    assert owners.may_write("Family/Caf\u00e9/K.zip", "K") and not owners.may_write("Family/Caf\u00e9/K.zip", "Z")
    owners.release(record)
    assert owners.owner("Family/Caf\u00e9") is None


def test_prep_window_grows_holds_halves():
    """The window grows while downloads idle with nothing prepared and albums wait for it, holds
    while prepared archives wait or nobody wants a slot, halves on 429; within floor and cap."""
    w = sd.PrepWindow(cap=100, floor=2, start=8)
    sizes = [w.adjust(4, 0, False, True) for _ in range(30)]
    assert sizes[0] > 8 and sizes[-1] == 100 and sizes == sorted(sizes)
    assert w.adjust(4, 5, False, True) == 100                              # archives wait: holds
    assert w.adjust(4, 0, True, True) == 50                                # rate limited: halves
    assert w.adjust(4, 0, False, False) == 50                              # nothing to admit: holds
    assert w.adjust(0, 0, False, True) == 50                               # no idle worker: holds
    for _ in range(10):
        w.adjust(4, 0, True, True)
    assert w.limit == 2
    small = sd.PrepWindow(cap=3)
    assert small.limit <= 3 and all(small.adjust(4, 0, False, True) <= 3 for _ in range(5))


def test_look_planner_scouts_then_looks_at_the_likeliest_ready():
    """Before any archive is ready, scout looks go out at waits growing by SCOUT_GROWTH (never
    before poll_seconds). Once archives are found ready, the planner learns how preparation
    times spread and looks at the albums likeliest ready, while that chance is at least
    LOOK_ODDS_IDLE (higher while downloads are queued), as many as the link needs."""
    planner = sd.LookPlanner(1.0, 30.0)
    runs = ["album %d" % i for i in range(40)]
    for run in runs:
        planner.add(run, 0.0)
    assert planner.plan(0.5, need=4, limit=4) == []                 # before poll_seconds
    first = planner.plan(1.0, need=4, limit=4)
    assert len(first) == sd.scout_count(1.0, 40) > 1                # more at the first waits
    for run in first:
        planner.seen(run, False, 1.0)
    assert planner.plan(1.1, need=4, limit=4) == []                 # the next scouts wait for 1.2 s
    scouts = planner.plan(1.2, need=4, limit=4)
    assert len(scouts) == sd.scout_count(1.2, 40) and not set(scouts) & set(first)   # fresh albums
    for run in scouts:
        planner.seen(run, False, 1.2)
    many = planner.plan(10.0, need=4, limit=4)                      # long waits: a few scouts at once
    assert len(many) == int(10.0 * sd.SCOUT_SHARE * 40)
    for run in many:
        planner.seen(run, False, 10.0)
    # Twenty albums looked at 12 s: half ready. Most of the rest are likely ready by 14 s.
    looked = [r for r in runs if not planner.albums[r].looks][:20]
    for i, run in enumerate(looked):
        planner.albums[run].looking = True
        planner.seen(run, i % 2 == 0, 12.0)
    assert planner.found == 10
    planner.estimate()
    assert 0.3 < planner.ready_by(12.0) < 0.6 and planner.ready_by(9.0) < 0.1      # ready after the scouts
    fresh = [r for r in planner.albums if not planner.albums[r].looks]
    odds = planner.chance(planner.albums[fresh[0]], 12.0)
    assert odds > sd.LOOK_ODDS_IDLE
    chosen = planner.plan(12.0, need=2, limit=40)
    assert len(chosen) == math.ceil(2 / odds)                       # enough for two, at their chance
    assert all(not planner.albums[r].looks for r in chosen)         # unlooked ones first: the likeliest
    for run in chosen:
        planner.albums[run].looking = False
    busy = planner.plan(12.0, need=40, limit=40, stock=10.0)        # downloads queued: only near-certain
    assert all(planner.chance(planner.albums[r], 12.0) >= sd.LOOK_ODDS_BUSY for r in busy)
    likely = [r for r, i in planner.albums.items() if not i.looking and planner.chance(i, 12.0) >= sd.LOOK_ODDS_BUSY]
    assert len(busy) < len(chosen) and not likely                   # fewer, and none near-certain left out
    for run in busy:
        planner.albums[run].looking = False
    in_flight = planner.plan(12.0, need=1, limit=2)                 # two looks under way count half each:
    assert len(in_flight) == 2 and planner.plan(12.0, need=1, limit=40) == []   # no third for one archive
    missed = looked[1]                                              # not ready at 12 s: unlikely at 12.1
    assert planner.chance(planner.albums[missed], 12.1) < planner.chance(planner.albums[missed], 20.0)
    assert planner.chance(planner.albums[missed], 12.0 + 29.9) < 1.0
    assert planner.chance(planner.albums[missed], 12.0 + 30.0) == 1.0   # poll_max_seconds since its last look
    planner.albums[missed].looking = True
    planner.seen(missed, True, 13.0)                                # ready between its last miss and now
    assert planner.ready_spans[-1] == (sd.wait_bin(12.0) + 1, sd.wait_bin(13.0) + 1)


def test_look_planner_estimates_when_looks_come_back_and_never_spins():
    """The spread is estimated again only when a look has come back since. An album not looked
    at for poll_max_seconds goes first, among the scouts too (but only as one of the looks
    wanted: never all at once). The wake-up for a due look is never 0 (a look held back, the
    link busy or paused, must not spin the orchestrator)."""
    planner = sd.LookPlanner(1.0, 5.0)
    planner.add("old", 0.0)
    assert planner.plan(1.0, need=4, limit=4) == ["old"]
    planner.seen("old", False, 1.0)
    assert sd.LOOK_TICK <= planner.next_due(1.0) <= 0.2 + 1e-9
    assert planner.next_due(3.0) == sd.LOOK_TICK                    # due and not taken: a tick, not 0
    for i in range(20):
        planner.add("young %d" % i, 4.5)
    assert planner.plan(6.0, need=4, limit=4) == ["old"]            # 5 s since its look: before the unlooked
    planner.seen("old", False, 6.0)
    scouts = planner.plan(7.3, need=4, limit=4)
    assert len(scouts) == 1 and scouts != ["old"]                   # then the least looked at again
    planner.seen(scouts[0], True, 7.3)
    planner.plan(7.3, need=1, limit=4)
    estimated = planner.shares
    planner.plan(8.0, need=1, limit=4)
    assert planner.shares is estimated                              # nothing came back: not again
    planner.seen("old", False, 8.0)
    planner.plan(8.0, need=1, limit=4)
    assert planner.shares is not estimated
    for item in planner.albums.values():
        item.looking = False
    overdue = planner.plan(20.0, need=2, limit=8)                   # every album 5 s unlooked: as many
    assert len(overdue) == 2                                        # as the link needs, not all eight


def test_look_planner_learns_nothing_from_archives_asked_for_before_the_run():
    """An archive a stopped run asked for, reused in preparation, has waited longer than this
    run knows: found ready at once, it must not teach that preparation is quick (nor end the
    scouting), and a miss of it is not a wait seen either."""
    planner = sd.LookPlanner(1.0, 30.0)
    planner.add("reused", 0.0, learn=False)
    planner.add("stale", -10.0, learn=False)
    planner.add("new", 0.0)
    planner.seen("stale", False, 10.0)                              # not ready after 20 s: says nothing
    planner.seen("reused", True, 1.0)
    assert planner.found == 0 and planner.ready_spans == [] and "reused" not in planner.albums
    planner.seen("new", False, 11.5)
    planner.seen("new", True, 12.0)
    planner.estimate()
    assert planner.ready_by(11.0) < 0.05 and planner.ready_by(12.5) > 0.99   # one wait learnt: 11.5-12 s


def test_ready_shares_is_the_self_consistent_estimate():
    """ready_shares does each round in one pass (prefix sums): the same as spreading each album
    over its bins one by one, in proportion to the last round's shares (evenly where they are 0;
    below 1e-12 ready_shares spreads evenly too, where the definition would not)."""
    def by_definition(spans, shares, rounds):
        top = max(max(a, b or 0) for a, b in spans)
        for _ in range(rounds):
            new = [0.0] * (top + 1)
            for a, b in spans:
                b = top + 1 if b is None else b
                total = sum(shares[a:b])
                for k in range(a, b):
                    new[k] += shares[k] / total if total > 0 else 1.0 / (b - a)
            shares = [x / len(spans) for x in new]
        return shares
    rng = random.Random(3)
    for _ in range(100):
        spans = []
        for _ in range(rng.randint(1, 60)):
            a = rng.randint(1, 120)
            spans.append((a, rng.choice([None, a + rng.randint(1, 30)])))
        top = max(max(a, b or 0) for a, b in spans)
        start = [0.0] + [rng.choice([0.0, rng.random()]) for _ in range(top)]
        got = sd.ready_shares(spans, list(start), rounds=5)
        assert max(abs(x - y) for x, y in zip(got, by_definition(spans, list(start), 5))) < 1e-9


def test_look_planner_looks_only_at_near_certain_albums_while_downloads_are_queued():
    """Ten archives were all ready between 5 and 6 s: an album asked 6 s ago is near certain,
    and is looked at even with downloads queued; one just seen not ready at 5.5 s is not."""
    planner = sd.LookPlanner(1.0, 30.0)
    for i in range(10):
        planner.add(i, 0.0)
        planner.seen(i, False, 5.0)
        planner.seen(i, True, 6.0)
    planner.add("fresh", 0.0)
    planner.add("seen", 0.0)
    planner.seen("seen", False, 6.0)
    planner.add("young", 3.0)
    assert planner.plan(6.5, need=4, limit=4, stock=10.0) == ["fresh"]
    assert planner.chance(planner.albums["young"], 6.5) < sd.LOOK_ODDS_IDLE


def test_look_planner_explores_when_nothing_is_likely_and_the_link_is_idle():
    """The last, slow album: past every wait seen, the estimate gives it no chance; with the link
    idle, one look goes to it, at most once per EXPLORE_SHARE of its wait."""
    planner = sd.LookPlanner(1.0, 300.0)
    for run in ("fast", "slow", "slower"):
        planner.add(run, 0.0)
    planner.seen("fast", True, 5.0)
    planner.seen("slow", False, 5.0)
    planner.seen("slower", False, 4.99)
    planner.estimate()
    assert planner.chance(planner.albums["slow"], 6.0) < sd.LOOK_ODDS_IDLE
    assert planner.chance(planner.albums["slower"], 6.0) < sd.LOOK_ODDS_IDLE
    assert planner.plan(6.0, need=1, limit=4, stock=2.0) == []      # downloads queued: no exploring
    planner.albums["slow"].looking = True
    assert planner.plan(6.0, need=1, limit=4) == []                 # a look under way: no exploring
    planner.seen("slow", False, 5.0)
    assert planner.plan(6.0, need=1, limit=4) == ["slower"]         # link idle: one look, at the least lately
    planner.seen("slower", False, 6.0)
    assert planner.plan(6.1, need=1, limit=4) == []                 # not again before 6 + 3 % of 6 s
    assert planner.plan(6.0 + sd.EXPLORE_SHARE * 6.0 + 0.01, need=1, limit=4) == ["slow"]


def test_ready_shares_learns_how_preparation_times_spread():
    """From looks alone (each album seen not ready at one wait and ready at a later one, or not
    yet), the estimate finds the spread of preparation times: here uniform over 8-20 s."""
    rng = random.Random(5)
    spans = []
    for _ in range(400):
        ready_at = rng.uniform(8.0, 20.0)
        looks = sorted(rng.uniform(2.0, 24.0) for _ in range(3))
        misses = [w for w in looks if w < ready_at]
        hits = [w for w in looks if w >= ready_at]
        after = sd.wait_bin(misses[-1]) + 1 if misses else 1
        spans.append((after, sd.wait_bin(hits[0]) + 1 if hits else None))
    shares = sd.ready_shares(spans)
    assert abs(sum(shares) - 1.0) < 1e-9
    cumulative = list(itertools.accumulate(shares))
    assert cumulative[sd.wait_bin(7.5)] < 0.03                      # none before 8 s
    assert abs(cumulative[sd.wait_bin(14.0)] - 0.5) < 0.1           # half by 14 s
    assert cumulative[sd.wait_bin(21.0)] > 0.97                     # all by 20 s
    assert sd.wait_bin(0.0) == 0 and sd.WAIT_BINS[sd.wait_bin(10.0) - 1] < 10.0 <= sd.WAIT_BINS[sd.wait_bin(10.0)]


def test_scan_zip_checks_every_crc(tmp_path):
    """A sound zip gives its entries with sizes and MD5s; a flipped byte is a CRC error in that
    entry; an HTML page is not a zip."""
    import hashlib
    import zipfile
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("one.jpg", b"1" * 5000)
        z.writestr("two.jpg", b"2" * 7000)
    entries = sd.scan_zip(str(path), "a.zip", True)
    assert [(e.name, e.size, e.md5) for e in entries] == [
        ("one.jpg", 5000, hashlib.md5(b"1" * 5000).hexdigest()), ("two.jpg", 7000, hashlib.md5(b"2" * 7000).hexdigest())]
    data = bytearray(path.read_bytes())
    data[data.index(b"2" * 100) + 50] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(sd.BadArchive, match="two.jpg"):
        sd.scan_zip(str(path), "a.zip", False)
    (tmp_path / "b.zip").write_bytes(b"<html><body>Please log in</body></html>")
    with pytest.raises(sd.BadArchive, match="not a zip"):
        sd.scan_zip(str(tmp_path / "b.zip"), "b.zip", False)


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
