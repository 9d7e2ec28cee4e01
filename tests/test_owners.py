"""One owner per format (issue 28): the one reader of metadata.json, the one writer of a whole
file, of appended lines, the one remover, the one size/MD5 check, and PathOwners deciding
alone who owns a folder. The primitives as plain unit tests; the ownership decision end to end."""

import hashlib
import json
import os

import pytest

import smugmug_download as sd
from conftest import tree


def test_load_manifest_tells_missing_from_unreadable(tmp_path):
    """load_manifest raises FileNotFoundError for no file, ValueError for bad JSON or not an
    object; read_manifest gives None for each, the document otherwise."""
    path = tmp_path / sd.MANIFEST_NAME
    with pytest.raises(FileNotFoundError):
        sd.load_manifest(str(path))
    for text in ("{not json", "[1, 2]", "\xff"):
        path.write_bytes(text.encode("latin-1"))
        with pytest.raises(ValueError):
            sd.load_manifest(str(path))
        assert sd.read_manifest(str(path)) is None
    path.write_text(json.dumps({"files": [{"file": "a.jpg"}, 3], "former": [{"archive": "p.zip"}]}))
    assert sd.read_manifest(str(path))["files"][0] == {"file": "a.jpg"}
    assert sd.previous_manifest(str(tmp_path)) == [{"file": "a.jpg"}, {"archive": "p.zip"}]


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path):
    """The old file stays whole when the writer fails midway, and no temp is left; a callback's
    result is returned; the new file is in place with the given mode."""
    path = tmp_path / "index.csv"
    path.write_text("old\n")

    def failing(f):
        f.write("half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        sd.write_atomic(str(path), failing)
    assert path.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["index.csv"]
    assert sd.write_atomic(str(path), lambda f: f.write("new\n") and 7, mode=0o600) == 7
    assert path.read_text() == "new\n" and sorted(os.listdir(tmp_path)) == ["index.csv"]
    if os.name == "posix":
        assert os.stat(path).st_mode & 0o777 == 0o600


def test_appended_lines_start_on_a_fresh_line(tmp_path):
    """A line cut short by a crash is left on its own: the next append starts a new line."""
    path = tmp_path / "journal.jsonl"
    path.write_text('{"a": 1}\n{"cut')
    with sd.open_append(str(path)) as f:
        sd.append_lines(f, ['{"b": 2}'])
    with sd.open_append(str(path)) as f:
        sd.append_lines(f, ['{"c": 3}'])
    assert path.read_text().splitlines() == ['{"a": 1}', '{"cut', '{"b": 2}', '{"c": 3}']


def test_remove_quietly_and_discard(tmp_path):
    """remove_quietly: True when removed, False when not there; Store.discard removes only .part."""
    kept, part = tmp_path / "photo.jpg", tmp_path / "photo.jpg.part"
    kept.write_bytes(b"x")
    part.write_bytes(b"y")
    sd.Store.discard(str(kept))
    sd.Store.discard(str(part))
    assert kept.exists() and not part.exists()
    assert sd.remove_quietly(str(kept)) is True and sd.remove_quietly(str(kept)) is False


def test_file_mismatch_says_what_is_wrong(tmp_path):
    """One check of a file against a size and MD5: missing, another size, another MD5, or none."""
    path = tmp_path / "a.jpg"
    data = b"12345"
    md5 = hashlib.md5(data).hexdigest()
    assert sd.file_mismatch(str(path), 5, md5) == ("missing", None)
    assert not sd.file_is(str(path), None, "")          # there, in any case
    path.write_bytes(data)
    assert sd.file_mismatch(str(path), 5, md5.upper()) is None and sd.file_is(str(path), None, "")
    assert sd.file_mismatch(str(path), 4, md5) == ("size", 5)
    assert sd.file_mismatch(str(path), 5, "0" * 32) == ("md5", None)
    read = []
    assert sd.file_mismatch(str(path), 5, "", progress=read.append) is None and read == [5]
    assert sd.bytes_differ(5, lambda: pytest.fail("MD5 read when none is wanted"), 5, "") is None


def test_a_lost_state_sends_a_new_album_beside_a_folder_another_manifest_names(fake, run):
    """Album X is gone from SmugMug (its files kept), the state is lost, and a new album X comes
    in that same run: the kept folder's metadata.json names another album, so the new one goes
    to "X (NodeID)" and the kept files (manifest too) stay as they were."""
    gone = fake.add_album("X", sizes=(3000,))
    assert run()[0] == 0
    kept = tree(run.out, manifests=True)
    fake.remove_node(fake.albums[gone].node_id)
    (run.out / sd.STATE_DIR / sd.STATE_FILE).unlink()
    new = fake.add_album("X", sizes=(2500,))
    result = run()
    assert result[0] == 0, result[2]
    after = tree(run.out, manifests=True)
    assert kept.items() <= after.items()            # the kept files, manifest too, as they were
    assert not [k for k in after if k.startswith("X/") and k not in kept]
    assert after["X (%s)/%s.zip" % (fake.albums[new].node_id, new)] == fake.expected_parts(new)["%s.zip" % new]
