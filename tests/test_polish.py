"""What a newcomer following the README against the emulator found: an emptied album's files
listed as deleted on SmugMug and recorded as found gone, the dry run's exact count of files to
versions in the files layout, its notes (moved from, unpack), the summary's bytes after a
resume, the first line of advice for a fresh config, --authorize's messages, wording, a file
where a folder must go, --config naming the path, --help, and the status line's start."""

import csv
import json
import os
import re

import pytest

import smugmug_download as sd
from conftest import ROOT, read_pty, spawn, tree, wait_for, write_config
from test_person import on_a_terminal, status_lines
from test_person2 import authorize_refusing


def versions_line(out, rel):
    """The dry run's count of old files to versions for album rel ("up to N" or "N")."""
    (line,) = [l for l in out.splitlines() if l.split(None, 1)[-1].startswith(rel + " (")]
    return re.search(r"((?:up to )?\d+) old files? to versions", line).group(1)


def moved_to_versions(err):
    return int(re.search(r"(\d+) moved to versions", err).group(1))


def read_index(out):
    with open(out / "index.csv", encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def state_of(out):
    with open(out / sd.STATE_DIR / sd.STATE_FILE, encoding="utf-8") as f:
        return json.load(f)


# 1. An album emptied on SmugMug ##############################################

@pytest.mark.parametrize("layout", ["zips", "files"])
def test_an_emptied_albums_kept_photos_are_deleted_on_smugmug_and_found_gone(fake, run, layout):
    """Every photo of an album deleted on SmugMug: its files stay where they are, index.csv
    lists them as deleted on SmugMug (not current), the summary names them found gone, and
    the state records each as gone, where it is kept; the next run finds nothing new."""
    key = fake.add_album("Emptied", sizes=(3000, 4000))
    other = fake.add_album("Other", sizes=(2000,))
    assert run(layout=layout)[0] == 0
    names = sorted(im.file_name for im in fake.albums[key].images)
    before = tree(run.out)
    fake.albums[key].images = []
    fake.albums[key].part_sizes = []
    fake.albums[key].image_count = 0
    fake.touch(key)
    code, _, err = run(layout=layout)
    assert code == 0, err
    assert tree(run.out) == before
    rows = {r["FileName"]: r["status"] for r in read_index(run.out) if r["album"] == "Emptied"}
    assert sorted(rows) == names and set(rows.values()) == {"deleted on SmugMug"}, rows
    assert "2 photos found gone from SmugMug, kept in the backup:" in err, err
    gone = state_of(run.out)["gone"][key]
    assert sorted(p["FileName"] for p in gone.values()) == names
    assert all(p["Kind"] == "deleted" and p["Where"].startswith("Emptied/")
               and os.path.exists(run.out / p["Where"]) for p in gone.values())
    fake.touch(other)                   # versions to prune: retention still knows them gone
    code, _, err = run("--keep-versions-days", "0", layout=layout)
    assert code == 0 and "found gone" not in err, err
    assert {r["status"] for r in read_index(run.out) if r["album"] == "Emptied"} == {"deleted on SmugMug"}
    assert state_of(run.out)["gone"][key] == gone


# 2. The dry run's count of files to versions, in the files layout ##########

def test_the_dry_runs_count_of_files_to_versions_is_exact_in_the_files_layout(fake, run):
    """With sidecars (noext), one photo deleted and one caption edited: the dry run says as
    many old files go to versions as the run then moves (the deleted photo and its sidecar,
    the edited photo's sidecar, the manifest), not every sidecar."""
    key = fake.add_album("Trip", sizes=(3000, 3000, 3000, 3000))
    layout = dict(layout="files", xmp_sidecars="noext")
    assert run(**layout)[0] == 0
    album = fake.albums[key]
    album.images.pop(1)
    fake.edit_image(album.images[0].key, caption="a new caption")
    code, out, _ = run("--dry-run", **layout)
    said = versions_line(out, "Trip")
    code, _, err = run(**layout)
    assert code == 0, err
    assert said == str(moved_to_versions(err)) == "4", (out, err)


# 3. A pure move in the dry run ##############################################

def test_the_dry_run_says_where_an_album_moved_from(fake, run):
    """An album renamed on SmugMug, nothing else changed: the dry run's line names its old path."""
    key = fake.add_album("Trip 1", parent=fake.add_folder("Travel"))
    assert run()[0] == 0
    fake.rename(fake.albums[key].node_id, "Trip Two")
    code, out, _ = run("--dry-run")
    assert code == 0
    assert "moved     Travel/Trip Two (moved from Travel/Trip 1)" in out.splitlines(), out


# 4. The summary's bytes after a resume ######################################

def test_the_summary_counts_only_the_bytes_downloaded_after_a_resume(fake, run):
    """A run killed mid-download leaves a part whole and one half done: the rerun resumes the
    half (206) and finds the whole one whole (416); its summary counts the one part it
    downloaded from, and only the bytes that came this run."""
    key = fake.add_album("Large", sizes=(5000, 600_000))
    whole = fake.expected_parts(key)
    fake.bandwidth = 300_000
    proc = spawn(run.config())
    folder = run.out / "Large"

    def parts():
        return {n[:-5]: (folder / n).stat().st_size for n in os.listdir(folder) if n.endswith(".part")} \
            if folder.exists() else {}

    small, big = sorted(whole, key=lambda n: len(whole[n]))
    assert wait_for(lambda: parts().get(small) == len(whole[small]) and parts().get(big, 0) >= 150_000)
    proc.kill()
    proc.wait()
    have = parts()[big]
    fake.bandwidth = 10 ** 12          # (not None: a thread may still serve the killed run)
    code, _, err = run()
    assert code == 0, err
    assert sorted(c["status"] for c in fake.calls("archive")[-2:]) == [206, 416]
    assert "1 part (%s) downloaded" % sd.human_bytes(len(whole[big]) - have) in err, err


# 5. A config copied from config.example.json ################################

def test_a_fresh_config_from_the_example_names_the_placeholder_first(fake, tmp_path, capsys):
    """config.example.json copied, output_dir set, nothing else: a plain run and --authorize both
    say the API key still holds the placeholder (not that access_key is missing)."""
    with open(os.path.join(ROOT, "config.example.json"), encoding="utf-8") as f:
        data = json.load(f)
    path = write_config(tmp_path / "config.json", dict(data, output_dir=str(tmp_path / "out"), api_base=fake.base))
    for args in ([], ["--authorize"]):
        code = sd.main(["--config", path] + args)
        err = capsys.readouterr().err
        assert code == sd.EXIT_USAGE
        assert err == "Error: config file %s: app_key still holds the placeholder from config.example.json\n" % path


# 6. --authorize's messages ####################################################

def test_authorize_says_why_a_code_is_refused_in_one_clean_sentence(fake, tmp_path):
    """A code SmugMug refuses, then one with letters, then the right one: each refusal is one
    clean line (no library text, no ".;"), the second says digits; the flow then completes."""
    returncode, err, _ = authorize_refusing(fake, tmp_path, "abcdef")
    assert returncode == 0, err
    lines = [l.split("code SmugMug shows: ")[-1] for l in err.splitlines() if "try again" in l]
    assert lines[0] == "SmugMug did not accept the code (wrong or expired? HTTP 401, permission_denied); " \
                       "try again (2 more tries)", err
    assert lines[1] == "the code must be six digits (0-9), as SmugMug shows it; got 6 characters, " \
                       "not all digits; try again (1 more try)", err


# 11. --config naming a path that is not there ################################

def test_a_missing_config_names_the_path_given(tmp_path, capsys, monkeypatch):
    """--config nonexist/x.json: the error names that path (and its folder not there), never
    config.json; a missing file in a folder that exists: copy the example to the path given."""
    monkeypatch.chdir(tmp_path)
    assert sd.main(["--config", "nonexist/x.json"]) == sd.EXIT_USAGE
    err = capsys.readouterr().err
    assert err == "Error: config file %s not found (its folder %s does not exist)\n" % (
        tmp_path / "nonexist" / "x.json", tmp_path / "nonexist"), err
    assert sd.main(["--config", "x.json"]) == sd.EXIT_USAGE
    err = capsys.readouterr().err
    assert "copy config.example.json to x.json and fill it in, or run --authorize --config x.json)" in err, err


# 7 and 8. Sidecars turned on in the zips layout, then the switch to files ####

def test_the_unpack_note_and_line_say_what_is_done(fake, run):
    """A zips backup holding a file the zip lacks: turning on sidecars, the dry run's note says
    sidecars are written (nothing is unpacked); switching to files, the album's line counts the
    file already there as kept, so that its counts add up."""
    fake.add_album("Trip", images=[{"file_name": "A.jpg", "size": 2000}, {"file_name": "B.jpg", "size": 2100},
                                   {"file_name": "Lacking.jpg", "size": 1500, "in_zip": False}])
    assert run()[0] == 0
    code, out, _ = run("--dry-run", xmp_sidecars="ext")
    assert "unpack    Trip (sidecars written; nothing downloaded)" in out.splitlines(), out
    code, out, _ = run("--dry-run", layout="files")
    assert "unpack    Trip (zips unpacked, sidecars written; nothing downloaded)" in out.splitlines(), out
    code, out, err = run(layout="files", xmp_sidecars="none")
    assert code == 0, err
    assert "backed up Trip (unpack, 3 files: 2 unpacked, 1 kept, 0 fetched on their own; 0 B downloaded, " \
           "2 to versions)" in out + err, out + err


# 9. Wording: one file, one album ##############################################

def test_one_file_and_one_album_are_said_in_the_singular(fake, run):
    """An album of one photo emptied on SmugMug, another renamed: "its 1 file is kept" (dry
    run), "its 1 file from before is kept", "1 album moved or renamed ...: its files moved along"."""
    key = fake.add_album("Emptied", sizes=(3000,))
    other = fake.add_album("Old Name", sizes=(2000,))
    assert run()[0] == 0
    fake.albums[key].images = []
    fake.albums[key].part_sizes = []
    fake.albums[key].image_count = 0
    fake.touch(key)
    fake.rename(fake.albums[other].node_id, "New Name")
    code, out, _ = run("--dry-run")
    assert "changed   Emptied (empty on SmugMug now: its 1 file is kept)" in out.splitlines(), out
    code, out, err = run()
    assert code == 0, err
    assert "Emptied is empty on SmugMug now: its 1 file from before is kept" in err, err
    assert "1 album moved or renamed on SmugMug: its files moved along." in err.splitlines(), err
    (zip_name,) = [n for n in os.listdir(run.out / "New Name") if n.endswith(".zip")]
    (run.out / "New Name" / zip_name).write_bytes(b"not a zip")
    code, out, err = run("--verify")
    assert ": 1 damaged (the next run fetches it again)." in out + err, out + err


# 10. A file where a folder must go ##########################################

def test_a_file_where_a_folder_must_go_is_named_and_nothing_is_asked_for_its_albums(fake, run):
    """A file Travel where the folder Travel must go: one line names it; its albums fail, each
    saying a file is in the way, before any archive of theirs is requested or downloaded; the
    other albums are backed up; the file stays."""
    travel = fake.add_folder("Travel")
    keys = [fake.add_album("Trip %d" % i, travel, sizes=(2000,)) for i in range(3)]
    fake.add_album("Home", sizes=(2000,))
    run.out.mkdir()
    (run.out / "Travel").write_text("not a folder")
    code, out, err = run()
    assert code == sd.EXIT_ALBUMS_FAILED
    said = "a file is in the way: %s is where a folder must go" % (run.out / "Travel")
    assert "Error: %s; the albums in it fail" % said in err.splitlines(), err
    assert "File exists" not in err and "Not a directory" not in err, err
    for i in range(3):
        assert "  failed: Travel/Trip %d: %s" % (i, said) in err.splitlines(), err
    asked = " ".join(c["path"] for c in fake.calls("post"))
    assert not any(k in asked for k in keys) and len(fake.calls("post")) == 1, fake.calls("post")
    assert (run.out / "Travel").read_text() == "not a folder"
    assert any(p.startswith("Home/") and p.endswith(".zip") for p in tree(run.out)), tree(run.out)


# 12. --help ####################################################################

def test_help_describes_both_layouts(capsys):
    with pytest.raises(SystemExit) as exit:
        sd.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit.value.code == 0
    assert "as album zip archives or as plain files with XMP sidecars (--layout files)." in out, out
    assert "or as plain files" in sd.__doc__.splitlines()[0]


# 13. The status line before any album is known ##############################

def test_the_status_line_says_it_lists_folders_until_albums_are_found(fake, tmp_path):
    """On a terminal, while the first folders are listed (slow API answers): the status line
    says "listing folders...", never "0 of 0 albums"; then it counts the albums."""
    folder = fake.add_folder("Deep")
    fake.add_album("Trip", folder, sizes=(2000,))
    fake.api_latency = 0.15
    config = write_config(tmp_path / "config.json", fake.config(tmp_path / "out"))
    proc, master = on_a_terminal(config, columns=80)
    drawn = status_lines(read_pty(proc, master))
    assert proc.returncode == 0, drawn
    assert drawn and drawn[0].startswith("listing folders..."), drawn
    assert not any("0 of 0 albums" in d for d in drawn), drawn
    assert any(d.startswith("0 of 1 album") for d in drawn), sorted(set(drawn))
