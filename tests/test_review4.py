"""Review of the memory changes of issue 27 (the state read record by record, the walk paced):
what a fresh look found wrong, each end to end against the emulator."""

import json
import os

import smugmug_download as sd


def two_albums_backed_up(fake, run):
    """Two albums backed up; their AlbumKeys, the first's record to damage."""
    fake.prep_seconds = 0.0
    first, second = fake.add_album("First", sizes=(900,)), fake.add_album("Second", sizes=(700,))
    code, _, err = run()
    assert code == 0 and "2 albums backed up" in err, err
    return first, second


def test_a_journal_record_whose_parts_are_a_number_is_set_aside_alone(fake, run):
    """A record in the journal (written by hand, or damaged) whose version-1 "parts" is a number
    and not a list: that record is set aside with a warning and its album checked again, like
    any record that does not validate; the run neither fails nor forgets the other albums (a
    TypeError escaped the journal's replay: every run ended in an internal error)."""
    first, second = two_albums_backed_up(fake, run)
    journal = os.path.join(str(run.out), sd.STATE_DIR, sd.JOURNAL_FILE)
    with open(journal, "a", encoding="utf-8") as f:
        f.write(json.dumps({"album": {"AlbumKey": first, "path": "First", "parts": 5}}) + "\n")
    code, _, err = run()
    assert code == 0, err
    assert "state record of album %s is damaged (bad parts)" % first in err, err
    assert "internal error" not in err, err
    assert "1 album backed up, 1 unchanged" in err, err


def test_a_snapshot_record_whose_parts_are_a_number_leaves_the_others(fake, run):
    """The same record in the snapshot: it alone is set aside (the state was read as unreadable
    whole, every album checked again; and a newer version's state was called unreadable, not
    newer, since each record is now read as the snapshot is)."""
    first, second = two_albums_backed_up(fake, run)
    path = os.path.join(str(run.out), sd.STATE_DIR, sd.STATE_FILE)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    data["albums"][first] = {"AlbumKey": first, "path": "First", "parts": 5}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    code, _, err = run()
    assert code == 0, err
    assert "state record of album %s is damaged (bad parts)" % first in err, err
    assert "unreadable" not in err, err
    assert "1 album backed up, 1 unchanged" in err, err
    data["version"] = sd.STATE_VERSION + 1
    state = sd.BackupState(str(run.tmp / "future"))
    os.makedirs(state.dir)
    with open(state.snapshot_path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    assert state.load().unreadable == "from a newer version (%d) of this tool" % (sd.STATE_VERSION + 1)
