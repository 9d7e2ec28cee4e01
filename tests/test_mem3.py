"""Memory flat in the number of albums (issue 27, the 10,000-album account): the download backlog
bounded in archives, not only in seconds of the link; the state snapshot read record by record."""

import json
import tracemalloc

import smugmug_download as sd

PHOTO = {"size": 300, "title": "a photo with a title"}


def test_archives_waiting_for_a_worker_stay_under_the_cap(fake, run, monkeypatch):
    """Many tiny albums prepared at once, on a link slow enough that their archives could pile
    up (a minute of the link is hundreds of them): no album is requested while BACKLOG_PER_WORKER
    archives per worker wait for a download worker, so what waits stays under the cap plus the
    albums already in preparation (each waiting archive is an album held whole, listing and plan);
    and the worker is kept fed (archives wait for it most of the run)."""
    monkeypatch.setattr(sd, "BACKLOG_PER_WORKER", 3)
    fake.prep_seconds = 0.0
    fake.bandwidth = 40_000              # bytes/s: an archive of a photo takes about 10 ms
    for i in range(40):
        fake.add_album("Album %02d" % i, images=[dict(PHOTO, file_name="IMG_0001.JPG")])
    waiting = []
    original = sd.Scheduler.queue_download

    def queue_download(self, task):
        original(self, task)
        waiting.append(self.queued["parts"])
    monkeypatch.setattr(sd.Scheduler, "queue_download", queue_download)
    code, _, err = run(workers=1, max_preparing=4)
    assert code == 0, err
    assert len(waiting) == 40
    assert max(waiting) <= 3 * 1 + 4, waiting
    assert max(waiting) >= 3, waiting


def state_text(albums):
    """A state snapshot of `albums` records, as the tool writes it."""
    records = {}
    for i in range(albums):
        key = "K%05d" % i
        record = sd.AlbumRecord(key, "N%05d" % i, "Year %02d/Event %03d/Album %05d" % (i % 9, i % 90, i),
                                "2026-12-0%dT10:00:%02d+00:00" % (1 + i % 7, i % 60),
                                "2026-12-0%dT11:00:%02d+00:00" % (1 + i % 7, i % 60),
                                [sd.SavedFile("Album %05d.zip" % i, 1000 + i, "archive")], 400, listed=sd.iso_now(),
                                image_count=5)
        records[key] = record.to_json()
    return json.dumps({"albums": records, "version": sd.STATE_VERSION, "partials": {}, "requested": []},
                      indent=1, sort_keys=True)


def load_peak(tmp_path, albums):
    """Peak bytes allocated while a state of `albums` records loads, above what is held after."""
    folder = tmp_path / str(albums)
    (folder / sd.STATE_DIR).mkdir(parents=True)
    (folder / sd.STATE_DIR / sd.STATE_FILE).write_text(state_text(albums), encoding="utf-8")
    tracemalloc.start()
    try:
        state = sd.BackupState(str(folder)).load()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(state.albums) == albums and state.unreadable is None
    return peak - held


def test_the_state_is_read_record_by_record(tmp_path):
    """Loading a state of 4,000 albums needs, above the records it keeps, little more than for
    400: under 150 bytes an album (read whole, its text and every record's parsed JSON at once
    took about 2.5 KB an album)."""
    sd.JsonStream.CHUNK = 1 << 16
    try:
        small, big = load_peak(tmp_path, 400), load_peak(tmp_path, 4000)
    finally:
        sd.JsonStream.CHUNK = 1 << 20
    per_album = (big - small) / (4000 - 400)
    assert per_album < 150, "%.0f bytes an album above the records while the state loads" % per_album


def test_the_state_read_record_by_record_is_what_json_reads(tmp_path):
    """The snapshot's document read piece by piece (pieces of a few characters, cut anywhere) is
    json.loads's, member for member; text json cannot read fails as json.loads fails."""
    def made(key, raw):
        return ["made", key, raw]

    def whole(text):
        data = json.loads(text)
        if isinstance(data, dict) and isinstance(data.get("albums"), dict):
            data["albums"] = {k: made(k, v) for k, v in data["albums"].items()}
        return data
    good = [state_text(30), json.dumps(json.loads(state_text(5))), ' {"version": 12345, "albums": {}} ',
            '{"albums": [1, 2]}', '[1]', '{"a": 1, "a": 2, "albums": {"K": 1}, "albums": {"J": {"x": "\\u00e9"}}}',
            '{"albums": {"K": {"x": "\u00e9\U0001f600"}}, "z": [true, false, null, -1.5e3]}']
    bad = ['{"albums": {"K": 1,}}', '{"a" 1}', '', '{', '{"a": 1} {}', '\ufeff{}', '{"albums": {"K": {}}',
           '{"a": 12', '{"a": 1}x']
    path = tmp_path / "state.json"
    for chunk in (1, 3, 1 << 20):
        sd.JsonStream.CHUNK = chunk
        try:
            for text in good + bad:
                path.write_text(text, encoding="utf-8")
                try:
                    want = whole(text)
                except ValueError as exc:
                    want = exc
                try:
                    got = sd.read_state_file(str(path), made)
                except ValueError as exc:
                    got = exc
                assert repr(got) == repr(want), (chunk, text[:40])
        finally:
            sd.JsonStream.CHUNK = 1 << 20


def test_the_walk_waits_while_many_albums_found_wait(fake, run, monkeypatch):
    """12 folders of 5 albums, the walk allowed 4 listings ahead of the loop and no listing while
    4 albums found wait for a request (WALK_WAITING twice max_preparing, 2): albums waiting never
    pass what the listings under way can bring on top of that (4 + 4 x 5); folder listings never
    pass 4; and every album is backed up (the walk goes on as they are requested)."""
    monkeypatch.setattr(sd, "WALK_AHEAD", 1)
    fake.prep_seconds = 0.0
    for f in range(12):
        folder = fake.add_folder("Event %02d" % f)
        for a in range(5):
            fake.add_album("Album %d" % a, folder, images=[dict(PHOTO, file_name="IMG_0001.JPG")])
    seen = []
    original = sd.Reporter.tick

    def tick(self, orchestrator):
        seen.append((len(orchestrator.scheduler.waiting), orchestrator.walk.listing))
        return original(self, orchestrator)
    monkeypatch.setattr(sd.Reporter, "tick", tick)
    code, _, err = run(workers=1, max_preparing=2)
    assert code == 0, err
    assert "60 albums backed up" in err, err
    assert max(w for w, _ in seen) <= 4 + 4 * 5, seen
    assert max(n for _, n in seen) <= 4, seen
