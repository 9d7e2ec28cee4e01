"""End to end: the real script against the emulator over HTTP, byte for byte."""

import datetime
import os

import smugmug_download as sd
from conftest import SAMPLE_PATHS, expected_tree, sample_expected, tree


def test_full_backup_mirrors_the_account(sample, run):
    """Every album of a 3-level account lands at its path with identical bytes; exit 0."""
    code, out, err = run()
    assert code == sd.EXIT_OK, err
    assert tree(run.out) == sample_expected(sample)
    # empty album and empty folder are mirrored as folders; Page and unknown types are not
    assert os.path.isdir(run.out / "Family" / "Empty Album")
    assert os.listdir(run.out / "Family" / "Empty Album") == []
    assert os.path.isdir(run.out / "Empty Folder")
    assert not os.path.exists(run.out / "About Me") and not os.path.exists(run.out / "Mystery")
    assert "unknown node type" in err
    # the 10-child folder was paged (server clamps count to 4): 3 pages
    travel = [e for e in sample.calls("walk") if e["path"].endswith("!children")
              and e["path"].startswith("/api/v2/node/") and e["query"].get("start") in ("5", "9")]
    assert len(travel) >= 2
    # every call was signed correctly
    assert not [e for e in sample.log if e["status"] == 401]
    assert "15 albums backed up" in err
    assert not [n for n in tree(run.out) if n.endswith(".part")]


def test_three_part_album_all_parts(sample, run):
    """A 3-part archive yields three complete files."""
    code, _, err = run()
    assert code == 0, err
    big = sorted(os.listdir(run.out / "Family" / "Big Trip"))
    assert big == sorted(list(sample.expected_parts(sample.keys["big"])) + [sd.MANIFEST_NAME])
    assert len(big) == 4


def test_hostile_names_stay_inside_output_dir(fake, run):
    """Names with ../, separators, NUL, device names, 1,000 characters or equal but for case are
    cleaned; nothing is written outside output_dir."""
    evil = fake.add_folder("../..", days=1)
    a1 = fake.add_album("/etc/passwd", evil, days=2)
    a2 = fake.add_album("CON", evil, days=3)
    fake.add_album("x\x00y" + "L" * 1000, evil, days=4)
    a4 = fake.add_album("Same", evil, days=5)
    a5 = fake.add_album("same", evil, days=6)
    a6 = fake.add_album("zip", evil, names=["../../../escaped.zip"], days=7)
    code, _, err = run()
    assert code == 0, err
    node5 = fake.albums[a5].node_id
    expected = expected_tree(fake, {a1: ".._/_etc_passwd", a2: ".._/CON_", a4: ".._/Same",
                                    a5: ".._/same (%s)" % node5})
    got = tree(run.out)
    for path, data in expected.items():
        assert got[path] == data
    long_dirs = [p for p in got if p.startswith(".._/x_y")]
    assert len(long_dirs) == 1 and len(long_dirs[0].split("/")[1].encode()) == 200
    assert got[".._/zip/.._.._.._escaped.zip"] == list(fake.expected_parts(a6).values())[0]
    assert not os.path.exists(run.tmp / "escaped.zip")
    assert sorted(os.listdir(run.tmp)) == ["backup", "config.json"]


def test_post_answer_variants(sample, run):
    """POST answered 200 without a Download list, and an unknown preparing status, still work."""
    sample.post_status = 200
    sample.post_lists_downloads = False
    sample.unknown_status = "Queued"
    code, _, err = run()
    assert code == 0, err
    assert tree(run.out) == sample_expected(sample)


def test_empty_post_relative_web_uri_and_redirects(sample, run):
    """POST answered with an empty body, WebUri as a path on the API host, and downloads that
    redirect (each hop signed anew): still a byte-identical backup."""
    sample.post_empty_body = True
    sample.relative_web_uri = True
    sample.redirect_downloads = True
    code, _, err = run()
    assert code == 0, err
    assert tree(run.out) == sample_expected(sample)
    assert any(e["path"].startswith("/download/") for e in sample.log) is True


def test_parts_without_numbers_lowercase_status_no_length(sample, run):
    """Download objects without Part, statuses in lower case, and archive bodies without
    Content-Length (checked against the listed Size): still a byte-identical backup."""
    sample.omit_part_numbers = True
    sample.lowercase_status = True
    sample.no_content_length = True
    code, _, err = run()
    assert code == 0, err
    assert tree(run.out) == sample_expected(sample)


def test_existing_fresh_archive_is_reused(sample, run):
    """A changed album for which SmugMug already prepared an archive after the change (a killed
    run's): that archive is downloaded, no new one is requested."""
    assert run()[0] == 0
    key = sample.keys["xmas"]
    sample.touch(key)
    archive = sample.new_archive(key)
    archive.created_at += datetime.timedelta(seconds=3)       # dated after the change
    posts = len(sample.calls("post"))
    code, _, err = run()
    assert code == 0, err
    assert len(sample.calls("post")) == posts
    assert tree(run.out) == sample_expected(sample)


def test_an_archive_smugmug_has_for_a_new_album_is_reused(sample, run):
    """SmugMug already has an archive for an album the state does not know (asked for on the
    web, or by a run whose state was lost): it is downloaded, none is asked for."""
    key = sample.keys["xmas"]
    sample.new_archive(key)
    code, _, err = run()
    assert code == 0, err
    assert [e for e in sample.calls("post") if "/%s!" % key in e["path"]] == []
    assert tree(run.out) == sample_expected(sample)


def test_an_archive_reused_in_preparation_teaches_the_looks_nothing(sample, run, planner_adds):
    """An archive SmugMug was already preparing (asked for before this run) has waited longer
    than this run can tell: the look planner must not learn a preparation time from it. Every
    archive this run asked for does teach it."""
    key = sample.keys["xmas"]
    sample.prep_seconds = 0.3
    sample.new_archive(key).prep_seconds = 1.0                  # still preparing at the first look
    code, _, err = run()
    learnt = {k: learn for k, (_, learn) in planner_adds.items()}
    assert code == 0, err
    assert [e for e in sample.calls("post") if "/%s!" % key in e["path"]] == []
    assert learnt.pop(key) is False
    assert learnt and all(learnt.values())
    assert tree(run.out) == sample_expected(sample)


def test_new_albums_stop_looking_first_when_it_never_pays(fake, run):
    """On a fresh account, the first LOOK_FIRST_PROBES new albums look at the listing before
    asking for an archive; once none of them found one, the others ask at once."""
    keys = [fake.add_album("Album %02d" % i, sizes=(500,)) for i in range(sd.LOOK_FIRST_PROBES + 8)]
    code, _, err = run()
    assert code == 0, err
    looked_first = 0
    for key in keys:
        calls = [e for e in fake.log if "/%s!download" % key in e["path"]]
        assert [e["method"] for e in calls].count("POST") == 1
        looked_first += calls[0]["method"] == "GET"
    assert looked_first == sd.LOOK_FIRST_PROBES


def test_a_refused_archive_request_saves_the_album_file_by_file(sample, run):
    """403 on POST !download (a token without Add permission, or an album whose archives SmugMug
    refuses): reading needs only Read, so the album is saved file by file (its originals),
    the rest from archives; exit 0, and the request is not retried."""
    key = sample.keys["bbq"]
    sample.albums[key].allow_downloads = False
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    assert "Family/2019/Summer/BBQ: SmugMug would not prepare an archive" in err
    assert "saving it file by file" in err
    assert len([e for e in sample.calls("post") if key in e["path"]]) == 1     # not retried
    expected = sample_expected(sample)
    del expected["Family/2019/Summer/BBQ/%s.zip" % key]
    image = sample.albums[key].images[0]
    expected["Family/2019/Summer/BBQ/" + image.file_name] = sample.original_bytes(image.key)
    assert tree(run.out) == expected


def test_a_token_without_add_permission_backs_up_everything_file_by_file(sample, run):
    """Defect 8: every POST answered 403 (the token lacks Add): every album is saved file by
    file, byte for byte the originals, exit 0."""
    sample.post_forbidden = True
    code, _, err = run()
    assert code == sd.EXIT_OK, err
    got = tree(run.out)
    for name, rel in SAMPLE_PATHS.items():
        for image in sample.albums[sample.keys[name]].images:
            assert got[rel + "/" + image.file_name] == sample.original_bytes(image.key)
    assert "14 albums saved file by file" in err


def test_named_user_and_authuser(sample, run):
    """smugmug_user names the account; without it the token's own user is used."""
    code, _, err = run(smugmug_user="tester")
    assert code == 0, err
    assert not [e for e in sample.log if e["path"] == "/api/v2!authuser"]
    code, _, err = run(smugmug_user="nobody-here")
    assert code == sd.EXIT_USAGE
    assert err.count("\n") == 1 and "not found" in err


def test_bad_credentials_exit_2(sample, run):
    """A wrong secret: the server answers 401, the run stops with one line and exit 2."""
    code, _, err = run(access_key_secret="wrong-secret-value")
    assert code == sd.EXIT_USAGE
    assert err.strip() == ("Error: SmugMug rejected the credentials: oauth_problem=signature_invalid. To fix: "
                           "run --authorize again (config file %s)" % run.config_path)
    assert "Traceback" not in err


def test_no_look_at_archives_while_downloads_are_stocked(fake, run, monkeypatch):
    """While the downloads queued hold more work than LOOK_STOCK seconds of the link, archives in
    preparation are not looked at (each look is an API call); the looks resume, and the album
    is backed up, once the queue runs low."""
    monkeypatch.setattr(sd, "LOOK_STOCK", 0.2)
    fake.bandwidth = 10_000                                  # each 10 KB archive takes a second
    fake.prep_seconds = 0.01
    stocked = [fake.add_album("A%d" % i, sizes=(10_000,)) for i in range(5)]
    slow = fake.add_album("Slow", sizes=(500,))
    fake.albums[slow].prep_seconds = 2.5
    code, _, err = run(workers=1)
    assert code == 0, err
    names = {k: "A%d" % i for i, k in enumerate(stocked)}
    assert tree(run.out) == expected_tree(fake, dict(names, **{slow: "Slow"}))
    starts = sorted(e["t"] for e in fake.calls("archive") if "/%s.zip" % slow not in e["path"])
    looks = [e["t"] for e in fake.calls("download-get") if "/%s!" % slow in e["path"]]
    # from a second into the first download (the link's rate known by then) until the last
    # stocked archive is handed to the worker (its request reaches the server a moment
    # later), a second of work or more waits for the worker: no look at Slow
    held = (starts[0] + 1.0, starts[-1] - 0.05)
    assert held[1] - held[0] > 1.5
    assert not [t for t in looks if held[0] < t < held[1]], (held, looks)
