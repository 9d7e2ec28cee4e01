"""The review's findings (issue 28: 2, 3, 4, 5, 6, 9, 11): never silently wrong. End to end:
the real tool against the emulator, over HTTP, comparing the bytes on disk; crashes are
real processes dying at a chosen step."""

import json
import os
import random
import subprocess
import sys

import pytest

import fake_smugmug
import smugmug_download as sd
from conftest import ROOT, expected_tree, spawn, tree, wait_for, write_config


def state_of(out):
    with open(out / sd.STATE_DIR / sd.STATE_FILE, encoding="utf-8") as f:
        return json.load(f)


def journal_path(out):
    return out / sd.STATE_DIR / sd.JOURNAL_FILE


# The process dies at a chosen step: os.<what> called on a path holding <needle> ends it (exit 9)
# before the call is made, as a power cut would.
CRASH_AT = """
import os, sys
sys.path.insert(0, %r)
import smugmug_download as sd
what, needle = sys.argv[1], sys.argv[2]
real = getattr(os, what)
def crash(*args, **kw):
    if needle in str(args[-1]):
        os._exit(9)
    return real(*args, **kw)
setattr(os, what, crash)
sys.exit(sd.main(sys.argv[3:]))
""" % ROOT


def crash_at(config, what, needle):
    proc = subprocess.run([sys.executable, "-c", CRASH_AT, what, needle, "--config", config, "--quiet"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    return proc


def final(files):
    """The files at their final names (no NAME.part)."""
    return {p: data for p, data in files.items() if not p.endswith(".part")}


def changed(fake, key, sizes):
    """The album on SmugMug changes: new photos (other bytes and sizes), new timestamps."""
    fake.albums[key].part_sizes = list(sizes)
    fake.touch(key)


# 2. A .part is resumed only when its identity proves it the same file ######

@pytest.mark.parametrize("sized, edited", [(False, True), (True, True), (True, False)])
def test_a_part_of_a_file_edited_since_is_fetched_anew_never_mixed(fake, tmp_path, sized, edited):
    """A run killed while fetching a collected photo's rendition (no MD5; a Size or none) leaves
    Shared.jpg.part. The photo is then edited on SmugMug (other bytes, same size, Serial and
    LastUpdated moved): the next run fetches it from zero, never the old head on the new tail.
    Not edited, and with a Size to prove it, the part is resumed with Range."""
    key = fake.add_album("Edits", images=[
        {"file_name": "Own.jpg", "size": 2000},
        {"file_name": "Shared.jpg", "size": 1_000_000, "origin": "Collected", "collected_from": "friend",
         "largest_no_size": not sized}])
    shared = fake.albums[key].images[1]
    fake.bandwidth = 200_000
    out = tmp_path / "backup"
    config = write_config(tmp_path / "config.json", fake.config(out))
    proc = spawn(config)
    part = out / "Edits" / "Shared.jpg.part"
    assert wait_for(lambda: part.exists() and part.stat().st_size >= 100_000, timeout=30)
    proc.kill()
    proc.wait()
    have = part.stat().st_size
    fake.bandwidth = 10 ** 9
    if edited:
        shared.seed, shared.serial = "edited", 1
        shared.last_updated = fake_smugmug.now_plus_one()
    calls = len(fake.calls("file"))
    proc = spawn(config)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    assert (out / "Edits" / "Shared.jpg").read_bytes() == fake.rendition_bytes(shared.key)
    ranges = [e["query"]["range"] for e in fake.calls("file")[calls:] if "/rendition/" in e["path"]]
    assert ranges == [None if edited else "bytes=%d-" % have]


def test_a_file_identity_is_proven_or_there_is_none():
    """Pure: a file's identity is ImageKey + MD5, or ImageKey + size + LastUpdated/Serial; with
    less (a rendition made on the fly) there is none, and an undated archive part has none."""
    task = sd.FileTask("K", "a.jpg", "u", None, "", True, "LastUpdated=2020|Serial=1")
    assert task.identity == ""
    assert sd.FileTask("K", "a.jpg", "u", 10, "", True, "").identity == ""
    sized = sd.FileTask("K", "a.jpg", "u", 10, "", True, "LastUpdated=2020|Serial=1")
    assert sized.identity and sized.identity != sd.FileTask("K", "a.jpg", "u", 10, "", True,
                                                             "LastUpdated=2021|Serial=1").identity
    assert sd.FileTask("K", "a.jpg", "u", None, "abc", False).identity.endswith("abc")
    assert sd.ArchivePart(1, "a.zip", "Complete", "https://x/a.zip").identity == ""
    listed = sd.listed_file({"ImageKey": "K", "FileName": "a.jpg", "LastUpdated": "2020", "Serial": 2})
    assert listed.version == "LastUpdated=2020|Serial=2"


# 3. A listing without Pages, shorter than the album's ImageCount #############

def test_a_listing_without_pages_shorter_than_the_image_count_replaces_nothing(fake, run):
    """The album's listing comes without a Pages block, one file a page: 1 file of the 3 its
    ImageCount counts. It is incomplete and says so by name: the album fails, its previous files
    stay where they are (nothing to versions), and a later whole listing backs it up. A listing
    without Pages that holds every file is taken as it is."""
    key = fake.add_album("Three", images=[{"file_name": "a.jpg", "size": 2000},
                                          {"file_name": "b.jpg", "size": 2100},
                                          {"file_name": "Clip.MOV", "size": 4000, "is_video": True}])
    fake.images_no_pages = True
    code, _, err = run()                        # no Pages, one page holds all: whole
    assert code == 0, err
    first = tree(run.out, manifests=True)
    assert len(json.loads(first["Three/metadata.json"])["files"]) == 3
    fake.touch(key)
    fake.images_max_count = 1
    code, _, err = run()
    assert code == sd.EXIT_ALBUMS_FAILED, err
    assert "failed: Three: SmugMug listed 1 of its 3 files" in err
    assert final(tree(run.out, manifests=True)) == first          # its new zip is kept as a .part
    assert not (run.out / sd.STATE_DIR / sd.VERSIONS_DIR).exists()
    fake.images_no_pages = False
    code, _, err = run()
    assert code == 0, err
    assert tree(run.out) == expected_tree(fake, {key: "Three"})


# 4. The journal: a line of the wrong shape, a line cut short ################

WRONG = [1, 1.5, "x", None, True, [], {}, [1, 2], ["x", "y", "z"], {"a": 1}, [[1, 2, 3]]]


def wrong_lines(good, rng):
    """Lines no run may stop at: each good entry cut short at random points, and with each of its
    fields (and each field's items) of the wrong types; and lines that are not objects."""
    lines = [json.dumps(x) for x in (1, [], "text", None)] + ['{"versions": 1}']
    for entry in good:
        text = json.dumps(entry)
        lines += [text[:rng.randrange(1, len(text) - 1)] for _ in range(3)]
        for name, value in entry.items():
            for wrong in rng.sample(WRONG, 5):
                lines.append(json.dumps(dict(entry, **{name: wrong})))
            if isinstance(value, list) and value:
                lines.append(json.dumps(dict(entry, **{name: [rng.choice(WRONG)] + value[1:]})))
            if isinstance(value, dict):
                for field in value:
                    lines.append(json.dumps(dict(entry, **{name: dict(value, **{field: rng.choice(WRONG)})})))
    return lines


@pytest.mark.parametrize("seed", [1, 2])
def test_journal_lines_of_the_wrong_shape_are_set_aside_and_the_tool_runs(fake, run, seed):
    """Lines of the wrong shape or cut short, mixed with good ones: every run and --verify
    goes on (no internal error), with one warning naming what was set aside, the backup intact."""
    one = fake.add_album("One", sizes=(2000, 2100))
    two = fake.add_album("Two", sizes=(2200,))
    assert run()[0] == 0
    record = state_of(run.out)["albums"][one]
    versions = ".smugmug_download/versions/2020-01-01T000000Z/Gone/x.zip"
    good = [{"album": record}, {"partial": ["One/nothing.zip", {"album": one, "identity": "i"}]},
            {"requested": [two, True]}, {"requested": [two, False]},
            {"intent": {"id": "old#1", "key": "NOPE", "steps": [["version", "Gone/x.zip", versions]],
                        "album": None}},
            {"done": "old#1", "versions": [["Gone/x.zip", versions]]}, {"pruned": "2020-01-01T000000Z"},
            {"drop": "NOPE"}]
    rng = random.Random(seed)
    bad = wrong_lines(good, rng)
    lines = [json.dumps(g) for g in good] + bad
    rng.shuffle(lines)
    journal_path(run.out).write_text("\n".join(lines) + "\n")
    for args in (("--verify",), (), ("--verify",)):
        code, out, err = run(*args)
        assert code in (0, 1) if args else code == 0, err      # the first --verify may find a record odd
        assert "internal error" not in err and "Traceback" not in err, err
        assert err.count("cannot be read") == (1 if args and lines else 0), err
        lines = ()
    assert code == 0
    assert tree(run.out) == expected_tree(fake, {one: "One", two: "Two"})
    aside = (run.out / sd.STATE_DIR / sd.SET_ASIDE_FILE).read_text().splitlines()
    assert '{"versions": 1}' in aside
    assert len(aside) == sum(1 for line in bad if sd.journal_entry_problem(safe_json(line)))


def safe_json(line):
    try:
        return json.loads(line)
    except ValueError:
        return None


def test_a_state_of_the_wrong_shape_stops_nothing(fake, run):
    """The snapshot's intents, versions and partials of the wrong shape: the run and --verify go on."""
    key = fake.add_album("One", sizes=(2000,))
    assert run()[0] == 0
    path = run.out / sd.STATE_DIR / sd.STATE_FILE
    data = json.loads(path.read_text())
    data["intents"] = {"a": 1, "b": {"id": "b", "key": "K", "steps": 5}, "c": {"id": "c", "steps": [[1]]}}
    data["versions"] = [1, ["x"], None, [1, 2, 3]]
    data["partials"] = {"One/x.zip": 5}
    path.write_text(json.dumps(data))
    for args in ((), ("--verify",)):
        code, _, err = run(*args)
        assert code == 0 and "internal error" not in err, err
    assert tree(run.out) == expected_tree(fake, {key: "One"})


def test_a_line_cut_short_by_a_crash_never_swallows_the_next_entry(fake, tmp_path):
    """The journal ends in half a line (the power went mid-append). The next run's first entry
    starts a fresh line, so when that run dies too, its entries are all there on reload and only
    the torn half is set aside; the run after finishes the backup."""
    key = fake.add_album("A", sizes=(2000, 2100))
    out = tmp_path / "backup"
    config = write_config(tmp_path / "config.json", fake.config(out))
    assert sd.main(["--config", config, "--quiet"]) == 0
    torn = '{"album": {"AlbumKey": "ZZ'
    with open(journal_path(out), "a") as f:
        f.write(torn)
    changed(fake, key, (2500,))
    crash_at(config, "rename", "/versions/")         # after its change is journalled
    state = sd.BackupState(str(out), read_only=True).load()
    assert state.torn == [torn]
    assert [i["key"] for i in state.intents.values()] == [key]
    assert sd.main(["--config", config, "--quiet"]) == 0
    assert tree(out) == expected_tree(fake, {key: "A"})


# 5. --include neither prunes versions nor removes other albums' parts #######

def test_include_prunes_no_versions_and_keeps_other_albums_parts(fake, run):
    """A run narrowed by --include saw only part of the account: old versions stay, and so does
    the .part file another album will resume. A run that sees the whole account cleans both."""
    one = fake.add_album("One", sizes=(2000,))
    two = fake.add_album("Two", sizes=(2100,))
    assert run()[0] == 0
    old = run.out / sd.STATE_DIR / sd.VERSIONS_DIR / "2020-01-01T000000Z" / "One"
    os.makedirs(old)
    (old / "a.zip").write_bytes(b"an old version")
    path = run.out / sd.STATE_DIR / sd.STATE_FILE
    data = json.loads(path.read_text())
    data["partials"]["Two/next.zip"] = {"album": two, "identity": "some archive"}
    path.write_text(json.dumps(data))
    part = run.out / "Two" / "next.zip.part"
    part.write_bytes(b"half a download")
    fake.touch(one)
    for args in (("--include", "One"), ("--exclude", "Two")):
        code, _, err = run(*args, keep_versions_days=1)
        assert code == 0, err
        assert (old / "a.zip").read_bytes() == b"an old version"
        assert part.read_bytes() == b"half a download"
    code, _, err = run(keep_versions_days=1)
    assert code == 0, err
    assert not old.exists() and not part.exists()
    assert tree(run.out) == expected_tree(fake, {one: "One", two: "Two"})


# 6. Every number of the config is finite and in range ########################

@pytest.mark.parametrize("key", ["keep_versions_days", "unreachable_minutes", "recheck_days", "poll_seconds",
                                 "poll_max_seconds", "archive_timeout_hours", "workers", "max_preparing"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e300])
def test_a_number_that_is_not_finite_or_out_of_range_is_exit_2(fake, run, key, value):
    """NaN, Infinity (JSON readers take both) and numbers past any real setting: one Error line
    naming the key, exit 2, before any traffic and with nothing written."""
    code, out, err = run(**{key: value})
    assert code == sd.EXIT_USAGE, err
    assert err.startswith("Error: config file ") and err.count("\n") == 1 and key in err, err
    assert not fake.log and not run.out.exists()


@pytest.mark.parametrize("flag", ["--keep-versions-days", "--unreachable-minutes"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e300"])
def test_a_flag_that_is_not_finite_or_out_of_range_is_exit_2(fake, run, capsys, flag, value):
    """The same values as flags: one Error line naming the flag, exit 2."""
    run.config()
    with pytest.raises(SystemExit) as info:
        sd.main(["--config", str(run.config_path), "%s=%s" % (flag, value)])
    err = capsys.readouterr().err
    assert info.value.code == sd.EXIT_USAGE
    assert err.startswith("Error: " + flag) and err.count("\n") == 1, err
    assert not fake.log


def test_keep_versions_days_nan_keeps_every_version(fake, run):
    """The finding itself: "keep_versions_days": NaN in config.json removed every version."""
    key = fake.add_album("One", sizes=(2000,))
    assert run()[0] == 0
    changed(fake, key, (2100,))
    assert run()[0] == 0
    versions = run.out / sd.STATE_DIR / sd.VERSIONS_DIR
    before = tree(versions)
    assert before
    with open(run.config_path) as f:
        text = f.read()
    data = json.loads(text)
    data["keep_versions_days"] = float("nan")
    write_config(run.config_path, data)
    assert "NaN" in run.config_path.read_text()
    assert sd.main(["--config", str(run.config_path)]) == sd.EXIT_USAGE
    assert tree(versions) == before


# 9. A change recovery cannot finish blocks its album #########################

def test_a_change_recovery_cannot_finish_blocks_its_album_until_it_can(fake, tmp_path):
    """A run dies midway through committing a changed album. The next start cannot finish that
    change (something is in the way of its versions folder): the album fails by name and its
    files stay as they are, rather than being committed again over a change still pending (which a
    later start would replay over the newer commit). Once the way is clear, the change is finished
    and the album is whole, nothing downloaded again."""
    key = fake.add_album("A", sizes=(2000, 2100))
    out = tmp_path / "backup"
    config = write_config(tmp_path / "config.json", fake.config(out))
    assert sd.main(["--config", config, "--quiet"]) == 0
    changed(fake, key, (2500, 2600))
    crash_at(config, "rename", "/versions/")
    (intent,) = sd.BackupState(str(out), read_only=True).load().intents.values()
    stamp = intent["steps"][0][2].split("/")[2]
    versions = out / sd.STATE_DIR / sd.VERSIONS_DIR
    os.rmdir(versions / stamp / "A")
    os.rmdir(versions / stamp)
    (versions / stamp).write_text("in the way")
    before = tree(out)
    downloads = len(fake.calls("archive"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "smugmug_download.py"), "--config", config],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == sd.EXIT_ALBUMS_FAILED, proc.stderr
    assert "failed: A: a change an earlier run left half done cannot be finished" in proc.stderr
    assert tree(out) == before
    os.remove(versions / stamp)
    assert sd.main(["--config", config, "--quiet"]) == 0
    assert tree(out) == expected_tree(fake, {key: "A"})
    assert len(fake.calls("archive")) == downloads
    assert not sd.BackupState(str(out), read_only=True).load().intents


# 11. A crash between the state and the journal's removal ####################

def test_a_crash_after_the_state_is_written_records_each_version_once(fake, tmp_path):
    """The run dies after writing state.json and before removing the journal: the next start
    replays the journal over a state that already holds it, and still records each file moved
    to versions once."""
    key = fake.add_album("A", sizes=(2000, 2100))
    out = tmp_path / "backup"
    config = write_config(tmp_path / "config.json", fake.config(out))
    assert sd.main(["--config", config, "--quiet"]) == 0
    changed(fake, key, (2500,))
    crash_at(config, "remove", sd.JOURNAL_FILE)
    assert journal_path(out).exists()
    assert sd.main(["--config", config, "--quiet"]) == 0
    recorded = [v[1] for v in state_of(out)["versions"]]
    on_disk = ["/".join((sd.STATE_DIR, sd.VERSIONS_DIR, p)) for p in tree(out / sd.STATE_DIR / sd.VERSIONS_DIR,
                                                                         manifests=True)]
    assert sorted(recorded) == sorted(on_disk) and len(recorded) == 3     # two zips and a manifest


# The pure helpers ###########################################################

def test_number_problem_names_what_a_number_must_be():
    assert sd.number_problem("keep_versions_days", 0) == "" and sd.number_problem("workers", 64) == ""
    assert "finite" in sd.number_problem("keep_versions_days", float("nan"))
    assert "finite" in sd.number_problem("unreachable_minutes", float("inf"))
    assert sd.number_problem("unreachable_minutes", 0) == "must be greater than 0"
    assert sd.number_problem("recheck_days", -1) == "must be 0 or more"
    assert sd.number_problem("max_preparing", 5000) == "must be at most 1000"
    assert sd.number_problem("workers", 2.5) == "must be a whole number"
    assert sd.number_problem("poll_seconds", True) == "must be a number"


def test_journal_entry_problem_judges_each_field_it_has():
    good = [{"album": {"AlbumKey": "K"}}, {"album": {}, "key": "K"}, {"drop": "K"},
            {"partial": ["A/a.zip", None]}, {"partial": ["A/a.zip", {"album": "K", "identity": "i"}]},
            {"requested": ["K", False]}, {"intent": {"id": "i", "key": "K", "steps": [["place", "a", "b"]]}},
            {"done": "i", "versions": [["a", "b"], ["c", "d", "e"]]}, {"pruned": "s"}, {"drop": "K", "new": 1}]
    assert [sd.journal_entry_problem(e) for e in good] == [""] * len(good)
    bad = {"versions": {"versions": 1}, "album": {"album": {}}, "partial": {"partial": ["a"]},
           "requested": {"requested": ["K", "yes"]}, "intent": {"intent": {"id": "i", "steps": []}},
           "done": {"done": 1}, "not an object": [1], "no field this version knows": {"new": 1}}
    assert {sd.journal_entry_problem(e): e for e in bad.values()}.keys() == bad.keys()
