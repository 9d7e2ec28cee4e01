"""Memory that does not grow with the account: what an album needs in flight (its listing, its
plan, its parts) is let go once it is committed, and a run keeps no per-photo data.

Each test runs the real tool in-process against the emulator and looks at what is still
alive when the run ends (Orchestrator.finish: every album committed, the summary and the
reporter still held), by the objects the garbage collector can reach and by the memory
tracemalloc sees allocated from the tool's own code."""

import collections
import gc
import json
import time
import tracemalloc
import urllib.parse

import pytest

import fake_smugmug
import smugmug_download as sd
from conftest import Runner

PER_ALBUM = 2600    # bytes held at the end of a run for each album backed up (measured 1,945-2,049)
PER_WAITING = 1200  # bytes held for each album waiting its turn (measured 1,093-1,095; 1,281 with
                    # Album.info a string for each field, not slotted; 1,961-2,124 before)
PHOTO = {"size": 300, "title": "a photo with a title", "caption": "and a caption"}


def photos(count, **extra):
    return [dict(PHOTO, file_name="IMG_%04d.JPG" % (i + 1), **extra) for i in range(count)]


@pytest.fixture
def at_finish(monkeypatch):
    """Calls probe(orchestrator) when a run reaches Orchestrator.finish; the results, in a list."""
    seen = []

    def install(probe):
        original = sd.Orchestrator.finish

        def finish(self):
            gc.collect()
            seen.append(probe(self))
            return original(self)
        monkeypatch.setattr(sd.Orchestrator, "finish", finish)
        return seen
    return install


def alive(cls, before=()):
    """The objects of cls the garbage collector can reach, but those in before (made by an
    earlier test in this process)."""
    known = {id(o) for o in before}
    return [o for o in gc.get_objects() if isinstance(o, cls) and id(o) not in known]


def test_committed_albums_hold_no_listing_plan_or_run(fake, run, at_finish):
    """Once an album is committed, nothing of its listing (ListedFile), its plan (AlbumPlan,
    FileTask) or its AlbumRun is reachable: not from the orchestrator, the summary, the
    reporter, the scheduler nor the futures. Albums of each way: archives, a file fetched on
    its own, a file SmugMug refuses (the album is saved, and fails by name), an empty album."""
    fake.prep_seconds = 0.0
    for i in range(4):
        fake.add_album("Album %d" % i, images=photos(6))
    fake.add_album("Loose", images=photos(3) + [{"file_name": "MOV_0001.MP4", "size": 500, "is_video": True,
                                                  "in_zip": False}])
    fake.add_album("Empty", sizes=())
    refused = fake.add_album("Refused", images=photos(4))
    fake.albums[refused].images[0].in_zip = False
    fake.refuse_originals = {fake.albums[refused].images[0].key}
    gc.collect()
    before = [o for cls in (sd.ListedFile, sd.AlbumPlan, sd.FileTask, sd.AlbumRun) for o in alive(cls)]
    seen = at_finish(lambda o: {"listed": len(alive(sd.ListedFile, before)),
                                "plans": len(alive(sd.AlbumPlan, before)),
                                "tasks": len(alive(sd.FileTask, before)), "runs": len(o.runs),
                                "done runs": len([r for r in alive(sd.AlbumRun, before) if r.state == "done"])})
    code, _, err = run()
    assert code == sd.EXIT_ALBUMS_FAILED, err
    assert "failed: Refused: 1 file missing" in err and "6 albums backed up" in err
    assert seen == [{"listed": 0, "plans": 0, "tasks": 0, "runs": 0, "done runs": 0}]
    assert (run.out / "Loose" / "MOV_0001.MP4").exists()
    # the state snapshot, written record by record as it streams, is the text json.dumps makes of it
    text = (run.out / sd.STATE_DIR / sd.STATE_FILE).read_text(encoding="utf-8")
    assert text == json.dumps(json.loads(text), ensure_ascii=False, indent=1, sort_keys=True)
    assert len(json.loads(text)["albums"]) == 7


def held_by_the_tool():
    """Bytes tracemalloc sees allocated from smugmug_download.py (any frame) and still held, once
    the other threads have let go of what they were passing on (a worker's frame outlives the
    result it handed over by a moment) and urllib's global cache of parsed links is emptied (it
    keeps the last 128 links any code parsed, whichever run parsed them)."""
    time.sleep(0.1)
    urllib.parse.clear_cache()
    gc.collect()
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, sd.__file__, all_frames=True)])
    return sum(stat.size for stat in snapshot.statistics("filename"))


def retained_by_the_tool(fake, runner, at_finish, albums, count):
    """Bytes allocated from smugmug_download.py and still held when a first run of `albums`
    albums of `count` photos reaches finish()."""
    fake.prep_seconds = 0.0
    for i in range(albums):
        fake.add_album("Album %02d" % i, images=photos(count))

    seen = at_finish(lambda orchestrator: held_by_the_tool())
    tracemalloc.start(8)
    try:
        code, _, err = runner()
    finally:
        tracemalloc.stop()
    assert code == 0, err
    return seen[-1]


def test_memory_held_at_the_end_does_not_grow_with_the_photos(fake, run, at_finish, tmp_path, capsys):
    """After a first run (what a process sets up once is set up), a run of four albums of 10
    photos and one of four albums of 100 (each a new account): what the tool still holds at the
    end of the run grows by less than 500 bytes a photo listed (by 3.6 KB a photo when every
    committed album kept its listing and plan)."""
    fake.prep_seconds = 0.0
    fake.add_album("Warm-up", images=photos(10))
    assert run()[0] == 0
    held = []
    for count in (10, 100):
        other = fake_smugmug.FakeSmugMug().start()
        try:
            (tmp_path / str(count)).mkdir(exist_ok=True)
            held.append(retained_by_the_tool(other, Runner(other, tmp_path / str(count), capsys), at_finish, 4,
                                             count))
        finally:
            other.stop()
    per_photo = (held[1] - held[0]) / (4 * (100 - 10))
    assert per_photo < 500, "%.0f bytes per photo still held at the end of the run" % per_photo


def test_memory_grows_little_with_the_albums(fake, run, at_finish, tmp_path, capsys, monkeypatch):
    """A first run of 30 albums of one photo and one of 120 (each a new account). When the walk
    has listed the folder, every album found waits its turn: what the tool holds then grows by
    less than PER_WAITING bytes an album (its Album and an AlbumRun with no containers of its
    own yet; with a __dict__, two Counters, five empty dicts and a ticket of its own for each,
    and Album.info a tuple of pairs, about 2.1 KB). At the end it grows by less than PER_ALBUM
    bytes an album (the record of its backup, the paths it owns, the walk's note of it): a
    guard against a per-album leak (an AlbumRun or its listing kept adds kilobytes an album)."""
    fake.prep_seconds = 0.0
    fake.add_album("Warm-up", images=photos(1))
    assert run()[0] == 0
    walked = []
    original = sd.Orchestrator.on_walk

    def on_walk(self, folder, result):
        original(self, folder, result)
        walked.append(held_by_the_tool())
    monkeypatch.setattr(sd.Orchestrator, "on_walk", on_walk)
    waiting, at_end = [], []
    for albums in (30, 120):
        other = fake_smugmug.FakeSmugMug().start()
        try:
            (tmp_path / str(albums)).mkdir(exist_ok=True)
            at_end.append(retained_by_the_tool(other, Runner(other, tmp_path / str(albums), capsys), at_finish,
                                               albums, 1))
            waiting.append(walked[-1])
        finally:
            other.stop()
    per_album = (waiting[1] - waiting[0]) / (120 - 30)
    assert per_album < PER_WAITING, "%.0f bytes per album waiting its turn" % per_album
    per_album = (at_end[1] - at_end[0]) / (120 - 30)
    assert per_album < PER_ALBUM, "%.0f bytes per album still held at the end of the run" % per_album


def test_the_loops_counts_of_albums_by_state_stay_right(fake, run, monkeypatch):
    """Orchestrator.count, which the reporter asks on every turn of the loop, is kept as the
    albums move (not counted over every run): on every turn it equals the count over the runs,
    through archives, an album saved file by file, a failed one and a rerun."""
    fake.prep_seconds = 0.0
    for i in range(5):
        fake.add_album("Album %d" % i, images=photos(3))
    refused = fake.add_album("Refused", images=photos(2))
    fake.albums[refused].images[0].in_zip = False
    fake.refuse_originals = {fake.albums[refused].images[0].key}
    turns = []
    original = sd.Reporter.tick

    def tick(self, orchestrator):
        scanned = collections.Counter(r.state for r in orchestrator.runs.values())
        turns.append(all(orchestrator.count(s) == scanned[s] for s in sd.AlbumRun.MOVES)
                     and orchestrator.count(*sd.AlbumRun.MOVES) == len(orchestrator.runs))
        return original(self, orchestrator)
    monkeypatch.setattr(sd.Reporter, "tick", tick)
    assert run()[0] == sd.EXIT_ALBUMS_FAILED
    fake.add_album("Later", images=photos(2))
    assert run()[0] == sd.EXIT_ALBUMS_FAILED
    assert len(turns) > 5 and all(turns), turns
