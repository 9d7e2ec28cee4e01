"""The command line: --authorize, --dry-run, --include/--exclude, progress, --help."""

import json
import os
import pty
import re
import select
import stat
import subprocess
import sys
import time
import urllib.request

import smugmug_download as sd
from conftest import SCRIPT, read_pty, sample_expected, spawn, tree, write_config


def read_until(stream, pattern, timeout=15):
    """Read a subprocess stream until pattern matches; return the text so far."""
    text, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], 0.1)
        if ready:
            chunk = os.read(stream.fileno(), 4096).decode()
            if not chunk:
                break
            text += chunk
            if re.search(pattern, text):
                return text
    raise AssertionError("pattern %r not seen in %r" % (pattern, text))


def test_authorize_pin_flow_end_to_end(fake, tmp_path):
    """--authorize: prints the URL at once, reads the code from a pipe, rewrites the config with
    the tokens (other keys and order kept, mode 0600), and the tokens then work."""
    path = tmp_path / "config.json"
    original = {"app_key": fake.app_key, "app_key_secret": fake.app_secret, "output_dir": str(tmp_path / "out"),
                "api_base": fake.base, "poll_seconds": 0.02, "poll_max_seconds": 0.1}
    path.write_text(json.dumps(original))
    proc = spawn(path, "--authorize", stdin=subprocess.PIPE)
    text = read_until(proc.stdout, r"http://\S+authorize\S+")
    url = re.search(r"http://\S+authorize\S+", text).group(0)
    assert "Access=Full" in url and "Permissions=Add" in url
    page = urllib.request.urlopen(url).read().decode()
    code = re.search(r"<b id='code'>(\d{6})</b>", page).group(1)
    proc.stdin.write((code + "\n").encode())
    proc.stdin.close()
    assert proc.wait(timeout=20) == 0, proc.stderr.read()
    data = json.loads(path.read_text())
    assert list(data)[:len(original)] == list(original)
    assert data["access_key"] in fake.tokens and data["access_key_secret"] == fake.tokens[data["access_key"]]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert fake.last_authorize_query.get("Access") == "Full"
    proc = spawn(path)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()


def test_authorize_creates_config_when_missing(fake, tmp_path):
    """With no config file, --authorize asks for key and secret on stdin and creates the file (0600);
    with the file's api_base pointed at the emulator, the flow then completes."""
    path = tmp_path / "new.json"
    # The new file names SmugMug itself: route that through a proxy that cannot exist, so the
    # first attempt fails here without any traffic leaving the machine.
    proc = spawn(path, "--authorize", stdin=subprocess.PIPE,
                 env={"HTTPS_PROXY": "http://proxy.invalid:9", "https_proxy": "http://proxy.invalid:9"})
    _, err = proc.communicate(("%s\n%s\n" % (fake.app_key, fake.app_secret)).encode(), timeout=60)
    assert proc.returncode == sd.EXIT_USAGE and err.decode().count("Error: ") == 1
    data = json.loads(path.read_text())
    assert data["app_key"] == fake.app_key and data["app_key_secret"] == fake.app_secret
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    data["api_base"] = fake.base
    path.write_text(json.dumps(data))
    proc = spawn(path, "--authorize", stdin=subprocess.PIPE)
    url = re.search(r"http://\S+authorize\S+", read_until(proc.stdout, r"authorize\S+")).group(0)
    code = re.search(r"(\d{6})", urllib.request.urlopen(url).read().decode()).group(1)
    _, err = proc.communicate((code + "\n").encode(), timeout=20)
    assert proc.returncode == 0, err
    assert json.loads(path.read_text())["access_key"] in fake.tokens


def test_authorize_stdin_ends_or_wrong_code(fake, tmp_path):
    """End of input before a code, or a wrong code: one line, exit 2, config untouched."""
    path = tmp_path / "config.json"
    original = json.dumps({"app_key": fake.app_key, "app_key_secret": fake.app_secret,
                           "output_dir": "x", "api_base": fake.base})
    path.write_text(original)
    proc = spawn(path, "--authorize")
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == sd.EXIT_USAGE
    assert "http://" in out.decode()
    assert err.decode().strip().splitlines()[-1].startswith("Error: no input")
    proc = spawn(path, "--authorize", stdin=subprocess.PIPE)       # wrong every time it is asked
    out, err = proc.communicate(b"123456\n12345\n654321\n", timeout=20)
    assert proc.returncode == sd.EXIT_USAGE
    err = err.decode()
    assert err.count("did not accept the code") == 2 and "six digits" in err, err
    assert err.count("Error: ") == 1 and err.endswith("; run --authorize again\n"), err
    assert path.read_text() == original


def test_dry_run_writes_nothing_and_posts_nothing(sample, run):
    """--dry-run lists albums as new/changed/unchanged, with no POST and nothing written."""
    code, out, err = run("--dry-run")
    assert code == 0, err
    assert not run.out.exists()
    assert sample.calls("post") == [] and sample.calls("archive") == []
    lines = out.splitlines()
    assert "new       Family/Big Trip" in lines and len(lines) == 16
    assert lines[-1] == ("total: 15 new (16 images), 0 changed, 0 unchanged, 0 moved, 0 gone, 1 skipped; "
                         "16 images in the albums to back up")
    assert run()[0] == 0
    sample.touch(sample.keys["bbq"])
    before = tree(run.out)
    posts = len(sample.calls("post"))
    code, out, err = run("--dry-run")
    assert code == 0
    assert "changed   Family/2019/Summer/BBQ (files listed: a fresh archive (3.0 KB of its 3.0 KB to fetch); " \
           "up to 2 old files to versions)" in out.splitlines()
    assert "unchanged Family/Big Trip" in out.splitlines()
    albums = [line[10:].split(" (")[0] for line in out.splitlines()[:-1]]
    assert albums == sorted(albums)                      # path order: nightly dry runs compare
    assert len(sample.calls("post")) == posts and tree(run.out) == before
    sample.rename(sample.albums[sample.keys["travel1"]].node_id, "Trip One")
    sample.remove_node(sample.albums[sample.keys["travel2"]].node_id)
    code, out, err = run("--dry-run")
    assert "moved     Travel/Trip One (moved from Travel/Trip 01)" in out.splitlines()
    assert "gone      Travel/Trip 02" in out.splitlines()
    sample.rename(sample.albums[sample.keys["travel3"]].node_id, "Trip Three")
    sample.touch(sample.keys["travel3"])
    code, out, err = run("--dry-run")
    assert "changed   Travel/Trip Three (moved from Travel/Trip 03; up to 2 old files to versions)" in out.splitlines()
    assert tree(run.out) == before


def test_include_exclude_select_exactly(sample, run):
    """--include/--exclude pick exactly the matching albums; excluded folders are not walked."""
    code, _, err = run("--include", "Family/2019/*", "--include", "Travel/Trip 0[12]",
                       "--exclude", "*/Christmas")
    assert code == 0, err
    got = {p.rsplit("/", 1)[0] for p in tree(run.out)}
    assert got == {"Family/2019/Summer/Beach Day", "Family/2019/Summer/BBQ", "Travel/Trip 01", "Travel/Trip 02"}
    walked = {e["path"] for e in sample.calls("walk")}
    empty_folder = [n for n in sample.nodes.values() if n.name == "Empty Folder"][0]
    assert "/api/v2/node/%s!children" % empty_folder.node_id not in walked


def test_output_dir_flag_overrides_config(sample, run, tmp_path):
    """--output-dir wins over the config's output_dir."""
    other = tmp_path / "elsewhere"
    code, _, err = run("--output-dir", str(other))
    assert code == 0, err
    assert tree(other) == sample_expected(sample)
    assert not run.out.exists()


def test_status_line_on_a_terminal_only(sample, tmp_path):
    """On a terminal, a live status line (carriage returns) on stderr; off a terminal, log lines."""
    sample.prep_seconds = 0.4
    config = write_config(tmp_path / "config.json", sample.config(tmp_path / "out"))
    master, slave = pty.openpty()
    proc = spawn(config, stderr=slave)
    os.close(slave)
    shown = read_pty(proc, master)
    assert proc.returncode == 0
    assert re.search(r"\r\d+ of \d+ albums \| ", shown)
    assert "waiting for" in shown and "archives to be prepared" in shown
    assert "backed up Family/Big Trip" not in shown        # per-album lines only off a terminal
    config2 = write_config(tmp_path / "config2.json", sample.config(tmp_path / "out2"))
    proc = spawn(config2)
    _, err = proc.communicate(timeout=30)
    assert "\r" not in err.decode() and "backed up Family/Big Trip" in err.decode()


def test_help_version_and_flag_checks(capsys):
    """--help groups options with examples; --version; bad combinations are usage errors (exit 2)."""
    proc = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for word in ("set-up", "examples", "--include 'Family/2019/*'", "exit codes", "0 3 * * *",
                 ".venv/bin/python smugmug_download.py --authorize", "--keep-versions-days", "--unreachable-minutes"):
        assert word in proc.stdout
    epilog = proc.stdout[proc.stdout.index("examples"):]
    assert max(len(line) for line in epilog.splitlines()) <= 80
    proc = subprocess.run([sys.executable, SCRIPT, "--version"], capture_output=True, text=True)
    assert proc.stdout.strip() == "smugmug_download.py %s" % sd.__version__
    for args, words in ((["--quiet", "--verbose"], "--quiet and --verbose"), (["--bogus"], "--bogus"),
                        (["--workers", "0"], "--workers"), (["--workers", "four"], "'four'")):
        proc = subprocess.run([sys.executable, SCRIPT] + args, capture_output=True, text=True)
        assert proc.returncode == 2 and words in proc.stderr
        assert proc.stderr.startswith("Error: ") and proc.stderr.count("\n") == 1, proc.stderr   # one line


def test_never_prompts_without_a_terminal(sample, tmp_path):
    """A cron-style run (stdin closed, no terminal) completes without asking anything."""
    config = write_config(tmp_path / "config.json", sample.config(tmp_path / "out"))
    proc = spawn(config, "--quiet", stdin=subprocess.DEVNULL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert out == b""


def test_status_line_at_80_columns_shows_rate_and_time_left(fake, tmp_path):
    """At 80 columns the status line says albums done of found, bytes done of the known total,
    the recent rate and the time left, and never runs past the terminal's width."""
    import fcntl
    import struct
    import termios
    key = fake.add_album("Large", sizes=(1_500_000,))
    fake.add_album("Small", sizes=(2000,))
    fake.bandwidth = 500_000
    out = tmp_path / "out"
    config = write_config(tmp_path / "config.json", fake.config(out))
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = spawn(config, stderr=slave)
    os.close(slave)
    shown = read_pty(proc, master)
    assert proc.returncode == 0, shown
    drawn = [piece.split("\x1b[K")[0] for piece in shown.split("\r") if "\x1b[K" in piece]
    drawn = [d for d in drawn if d]
    assert drawn and max(len(d) for d in drawn) <= 79, [d for d in drawn if len(d) > 79]
    pattern = (r"^\d of 2 albums \| [\d.]+ [KM]?B of 1\.5 MB \| [\d.]+ [KM]B/s \| "
               r"(less than a minute|about \d+ min) left$")
    assert any(re.match(pattern, d) for d in drawn), drawn[-8:]
    assert tree(out)["Large/%s.zip" % key] == fake.expected_parts(key)["%s.zip" % key]


def test_include_that_matches_nothing_is_a_usage_error(sample, run):
    """--include 'family/*' when the folder is Family selects nothing: exit 2, one line naming
    the closest existing path; nothing is written."""
    code, out, err = run("--include", "family/*")
    assert code == sd.EXIT_USAGE
    assert err.count("Error: ") == 1 and "matches no album" in err and "closest: Family" in err
    assert sample.calls("post") == []
    code, _, err = run("--dry-run", "--include", "Travel/Trip 99")
    assert code == sd.EXIT_USAGE and "Travel/Trip 09" in err
    code, _, err = run("--dry-run", "--include", "family/2019/summer/*")       # a case deeper down
    assert code == sd.EXIT_USAGE and "closest: Family/2019/Summer" in err
    assert [n for n in os.listdir(run.out) if not n.startswith(".")] == []      # no folder made


def test_an_include_whose_albums_are_all_excluded_matches_nothing(sample, run):
    """--include 'Travel/*' --exclude 'Travel/Trip*' selects no album: exit 2, however the
    exclude is written, in a dry run too."""
    for args in (["--exclude", "Travel/Trip*"], ["--exclude", "Travel"], ["--dry-run", "--exclude", "Travel/*"]):
        code, _, err = run("--include", "Travel/*", *args)
        assert code == sd.EXIT_USAGE, (args, err)
        assert "matches no album outside --exclude" in err


def test_each_include_must_match_an_album(sample, run):
    """Of two --include patterns one matches nothing (a typo): the other's albums are backed
    up, and the run still ends with a usage error naming the pattern, exit 2."""
    code, out, err = run("--include", "Travel/*", "--include", "Travle/*")
    assert code == sd.EXIT_USAGE
    assert "Error: --include 'Travle/*' matches no album" in err and "closest: Travel" in err
    assert sorted(os.listdir(run.out / "Travel")) == ["Trip %02d" % i for i in range(10)]
