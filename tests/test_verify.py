"""--verify (issue #12): prove a backup against its manifests offline, and let the next run
repair what it finds."""

import json
import os
import zipfile

import fake_smugmug
import smugmug_download as sd
from conftest import manifest, tree


def flip_byte_in_entry(path):
    """Flip one byte inside the first entry's data of a zip (its length unchanged)."""
    with zipfile.ZipFile(path) as z:
        info = z.infolist()[0]
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_verify_finds_exactly_the_damage_and_a_run_repairs_it(fake, run):
    """Flip a byte inside an entry, truncate a loose file, delete a part, delete a manifest:
    --verify exits 1 naming exactly those albums, without an API call; a normal run repairs
    them byte for byte; --verify then exits 0."""
    fake.zip_omit_videos = True
    sample = fake_smugmug.sample_account(fake)
    fake.add_album("With video", images=[{"file_name": "a.jpg", "size": 3000},
                                                       {"file_name": "v.mp4", "size": 8000, "is_video": True}])
    code, _, err = run()
    assert code == 0, err
    good = tree(run.out, manifests=True)
    flip_byte_in_entry(run.out / "Travel" / "Trip 01" / ("%s.zip" % sample["travel1"]))
    with open(run.out / "With video" / "v.mp4", "r+b") as f:
        f.truncate(100)
    os.remove(run.out / "Family" / "Big Trip" / ("%s-2.zip" % sample["big"]))
    os.remove(run.out / "Travel" / "Trip 05" / sd.MANIFEST_NAME)
    calls = len(fake.log)
    code, out, err = run("--verify")
    assert code == sd.EXIT_ALBUMS_FAILED, err
    assert fake.log[calls:] == []
    damaged = sorted(line.split(":")[0].split(None, 1)[1] for line in out.splitlines() if line.startswith("damaged"))
    assert damaged == ["Family/Big Trip", "Travel/Trip 01", "Travel/Trip 05", "With video"]
    assert "CRC error" in out and "manifest missing" in out
    assert "Family/Big Trip: %s-2.zip: part missing" % sample["big"] in out
    assert "4 damaged" in err
    code, _, err = run()
    assert code == 0, err
    # the deleted part's photo is fetched on its own (the other parts stay); the rest as it was
    lost = fake.albums[sample["big"]].images[1]
    good.pop("Family/Big Trip/%s-2.zip" % sample["big"])
    good["Family/Big Trip/" + lost.file_name] = fake.original_bytes(lost.key)
    assert tree(run.out, manifests=True).keys() == good.keys()
    assert {k: v for k, v in tree(run.out).items()} == {k: v for k, v in good.items()
                                                         if not k.endswith(sd.MANIFEST_NAME)}
    code, out, err = run("--verify")
    assert code == 0, err
    assert out == "" and "all intact" in err


def test_verify_of_a_sound_backup_asks_nothing(sample, run):
    """A backup with nothing damaged: exit 0, no API call, a summary with albums and bytes."""
    assert run()[0] == 0
    calls = len(sample.log)
    code, out, err = run("--verify")
    assert code == 0, err
    assert sample.log[calls:] == []
    assert "Verified 15 albums" in err


def test_verify_respects_include_and_exclude(sample, run):
    """--verify with --include checks only the selected albums."""
    assert run()[0] == 0
    os.remove(run.out / "Travel" / "Trip 03" / sd.MANIFEST_NAME)
    code, out, _ = run("--verify", "--include", "Family/*")
    assert code == 0 and out == ""
    code, out, _ = run("--verify", "--include", "Travel/*")
    assert code == sd.EXIT_ALBUMS_FAILED and "Travel/Trip 03" in out


def test_verify_detects_an_md5_mismatch_in_a_zip(fake, run):
    """An entry whose bytes were replaced (and its CRC fixed up, as a rewrite would) no longer
    has SmugMug's MD5: damaged."""
    key = fake.add_album("Rewritten", sizes=(3000,))
    assert run()[0] == 0
    path = run.out / "Rewritten" / ("%s.zip" % key)
    with zipfile.ZipFile(path) as z:
        entries = [(i.filename, z.read(i)) for i in z.infolist()]
    size = os.path.getsize(path)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries:
            z.writestr(name, bytes([data[0] ^ 1]) + data[1:])
    assert os.path.getsize(path) == size
    code, out, _ = run("--verify")
    assert code == sd.EXIT_ALBUMS_FAILED and "MD5 mismatch" in out
    assert manifest(run.out / "Rewritten")["files"][0]["archive"] == "%s.zip" % key
    assert run()[0] == 0
    assert tree(run.out)["Rewritten/%s.zip" % key] == fake.expected_parts(key)["%s.zip" % key]
    assert run("--verify")[0] == 0


def test_verify_needs_an_existing_backup(fake, run):
    """--verify before any backup: one line, exit 2."""
    code, _, err = run("--verify")
    assert code == sd.EXIT_USAGE and err.count("\n") == 1 and "nothing to verify" in err


def test_verify_with_nothing_to_check_is_a_usage_error(sample, run):
    """An output_dir with no backup in it, or a filter that selects no backed-up album: one
    line, exit 2, never "all intact"."""
    run.out.mkdir()
    code, _, err = run("--verify")
    assert code == sd.EXIT_USAGE and err.count("\n") == 1 and "nothing to verify" in err
    assert not (run.out / sd.STATE_DIR).exists()
    assert run()[0] == 0
    code, _, err = run("--verify", "--include", "family/*")
    assert code == sd.EXIT_USAGE and err.count("\n") == 1
    assert "matches no album" in err and "Family/" in err
    code, _, err = run("--verify", "--exclude", "*")
    assert code == sd.EXIT_USAGE and "no album to verify" in err


def test_verify_names_an_unreadable_state_and_leaves_it(sample, run):
    """A damaged state file is damage: one line, exit 1, the file left as it is (the next
    normal run sets it aside and checks every album again)."""
    assert run()[0] == 0
    state = run.out / sd.STATE_DIR / sd.STATE_FILE
    state.write_text('{"version": 2, "albums": ')
    code, out, err = run("--verify")
    assert code == sd.EXIT_ALBUMS_FAILED, err
    assert out.count("\n") == 1 and "damaged" in out and str(state) in out
    assert state.read_text() == '{"version": 2, "albums": '
    assert os.listdir(run.out / sd.STATE_DIR) == [sd.STATE_FILE]


def test_verify_names_an_unreadable_file_without_a_traceback(fake, run):
    """A loose file that cannot be read (here: a folder in its place) is damage named by --verify,
    exit 1, never a traceback."""
    fake.zip_omit_videos = True
    fake.add_album("V", images=[{"file_name": "a.jpg", "size": 2000},
                                {"file_name": "c.mov", "size": 4096, "is_video": True}])
    assert run()[0] == 0
    os.remove(run.out / "V" / "c.mov")
    os.makedirs(run.out / "V" / "c.mov")
    code, out, err = run("--verify")
    assert code == sd.EXIT_ALBUMS_FAILED
    assert "Traceback" not in err and "damaged   V: " in out


def test_verify_counts_a_damaged_state_record_and_logs_a_damaged_state(sample, run, tmp_path):
    """A record set aside as damaged is damage (exit 1, named), even when it is the only one;
    an unreadable state is named in the log file too."""
    assert run()[0] == 0
    path = run.out / sd.STATE_DIR / sd.STATE_FILE
    good = path.read_text()
    state = json.loads(good)
    key = sample.keys["bbq"]
    state["albums"][key]["path"] = None
    path.write_text(json.dumps(state))
    code, out, err = run("--verify")
    assert code == sd.EXIT_ALBUMS_FAILED, err
    assert out.splitlines() == ["damaged   album %s: its record in the backup state is damaged" % key]
    for record in state["albums"].values():
        record["path"] = None
    path.write_text(json.dumps(state))
    code, out, _ = run("--verify")
    assert code == sd.EXIT_ALBUMS_FAILED and out.count("\n") == len(state["albums"])
    path.write_text("{ not json")
    log_file = tmp_path / "verify.log"
    code, _, _ = run("--verify", "--quiet", "--log-file", str(log_file))
    assert code == sd.EXIT_ALBUMS_FAILED and "backup state is unreadable" in log_file.read_text()
