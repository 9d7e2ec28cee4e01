"""Boring in cron, clear on a terminal: set-up mistakes, closed pipes, dead servers, narrow terminals."""

import fcntl
import os
import pty
import re
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time

import pytest
import requests

import smugmug_download as sd
from conftest import SCRIPT, read_pty, sample_expected, spawn, tree, write_config


# Set-up mistakes ############################################################

@pytest.mark.parametrize("module, package", [("requests", "requests"),
                                             ("requests_oauthlib", "requests-oauthlib")])
def test_missing_package_is_one_line(tmp_path, module, package):
    """Run without requests (or requests-oauthlib) importable: one Error line naming the package
    and the virtualenv install command, exit 2, no traceback."""
    (tmp_path / (module + ".py")).write_text(
        'raise ModuleNotFoundError("No module named %s", name="%s")\n' % (module, module))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))        # shadows the installed package
    proc = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True,
                          env=env, stdin=subprocess.DEVNULL, timeout=30)
    assert proc.returncode == sd.EXIT_USAGE
    assert proc.stdout == ""
    assert proc.stderr.startswith("Error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "'%s' is missing" % package in proc.stderr
    assert "pip install -r requirements.txt" in proc.stderr and "virtualenv" in proc.stderr


def test_output_dir_that_is_a_file(fake, tmp_path, capsys):
    """output_dir naming a file: "... is not a folder", exit 2, before any network traffic."""
    target = tmp_path / "not-a-folder"
    target.write_text("x")
    path = write_config(tmp_path / "config.json", fake.config(target))
    for extra in ([], ["--dry-run"]):
        code = sd.main(["--config", path] + extra)
        err = capsys.readouterr().err
        assert code == sd.EXIT_USAGE
        assert err == "Error: output_dir %s is not a folder\n" % target
    assert fake.log == []


def test_output_dir_not_writable(fake, tmp_path, capsys):
    """An output_dir where the lock file cannot be written (here the lock path is a folder,
    which not even root can open for writing): one Error line, exit 2, no traffic."""
    out = tmp_path / "backup"
    (out / sd.LOCK_FILE).mkdir(parents=True)
    path = write_config(tmp_path / "config.json", fake.config(out))
    code = sd.main(["--config", path])
    err = capsys.readouterr().err
    assert code == sd.EXIT_USAGE
    assert err.startswith("Error: cannot write in output_dir %s: " % out) and err.count("\n") == 1
    assert fake.log == []


def _nobody_can_run_python():
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    try:
        probe = subprocess.run([sys.executable, "-c", "import requests, requests_oauthlib"],
                               preexec_fn=lambda: os.setuid(65534), capture_output=True, timeout=30)
    except OSError:                    # nobody may not even reach this Python
        return False
    return probe.returncode == 0


@pytest.mark.skipif(not _nobody_can_run_python(), reason="needs root and a Python that user nobody can run")
def test_output_dir_read_only_for_the_user(fake):
    """A read-only output_dir for a user who is not root (the child runs as nobody):
    "Permission denied" in one Error line, exit 2."""
    folder = tempfile.mkdtemp()
    try:
        os.chmod(folder, 0o755)
        out = os.path.join(folder, "backup")
        os.mkdir(out, 0o555)
        config = os.path.join(folder, "config.json")
        write_config(config, fake.config(out))
        os.chmod(config, 0o644)
        proc = subprocess.run([sys.executable, SCRIPT, "--config", config, "--quiet"], capture_output=True,
                              text=True, preexec_fn=lambda: os.setuid(65534), timeout=30, cwd=folder)
        assert proc.returncode == sd.EXIT_USAGE, proc.stderr
        assert proc.stderr.startswith("Error: cannot write in output_dir") and "Permission denied" in proc.stderr
        assert proc.stderr.count("\n") == 1
    finally:
        subprocess.run(["rm", "-rf", folder])


# Cron and pipes #############################################################

def test_cron_line_under_an_empty_environment(sample, tmp_path):
    """The README's cron line works as cron runs it: env -i with only PATH, stdin closed,
    no terminal; with --quiet a good run prints nothing at all (not even the sample's
    unknown-node warning) and exits 0."""
    out = tmp_path / "backup"
    config = write_config(tmp_path / "config.json", sample.config(out))
    proc = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", sys.executable, SCRIPT,
                           "--config", config, "--quiet", "--log-file", str(tmp_path / "backup.log")],
                          capture_output=True, preexec_fn=lambda: os.close(0), cwd=str(tmp_path), timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")
    assert tree(out) == sample_expected(sample)
    assert "unknown node type 'Widget'" in (tmp_path / "backup.log").read_text()


def test_dry_run_into_a_closed_pipe_stops_quietly(sample, tmp_path, capsys):
    """`--dry-run | head -3`: once the reader has gone the run stops without a traceback or
    any message, with exit 141 (128 + SIGPIPE, what git gives), and lists no more folders."""
    for i in range(12):                 # folders sorted last, ever longer to list: their albums'
        sub = sample.add_folder("More %d" % i, sample.add_folder("Zeta %d" % i))   # lines come one by one
        sample.add_album("Album %d" % i, sub)
        for j in range(40 * (i + 1)):
            sample.add_node("Page", "page %d" % j, sub)
    config = write_config(tmp_path / "config.json", sample.config(tmp_path / "out", workers=8))
    assert sd.main(["--config", config, "--dry-run"]) == 0
    capsys.readouterr()
    whole_walk = len(sample.log)
    sample.log.clear()
    sample.api_latency = 0.05          # listings come over time, so lines are still due after head ends
    proc = spawn(config, "--dry-run")
    lines = [proc.stdout.readline() for _ in range(3)]
    assert all(line.strip() for line in lines)
    proc.stdout.close()
    assert proc.wait(timeout=30) == sd.EXIT_BROKEN_PIPE
    err = proc.stderr.read().decode()
    assert "Traceback" not in err and "Error" not in err and "Broken pipe" not in err, err
    assert len(sample.log) < whole_walk


# Network errors #############################################################

def closed_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def one_connection_server(handle):
    """A socket server on 127.0.0.1 that accepts one connection, reads the request and
    hands the socket to handle; its URL."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        conn.recv(65536)
        handle(conn)
        server.close()

    threading.Thread(target=serve, daemon=True).start()
    return "http://127.0.0.1:%d/api/v2" % server.getsockname()[1]


def failure_of(url, timeout=2.0):
    with pytest.raises((requests.ConnectionError, requests.Timeout)) as info:
        requests.get(url, timeout=timeout)
    return info.value


def test_short_network_error_names_reason_and_server():
    """Real requests exceptions become a few words naming the server, never urllib3's text."""
    port = closed_port()
    assert sd.short_network_error(failure_of("http://127.0.0.1:%d/x" % port)) == \
        "connection refused by 127.0.0.1:%d" % port

    hold = threading.Event()
    silent = one_connection_server(lambda conn: (hold.wait(5), conn.close()))
    assert sd.short_network_error(failure_of(silent, timeout=0.2)) == "timed out reading from 127.0.0.1"
    hold.set()

    def reset(conn):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
    assert sd.short_network_error(failure_of(one_connection_server(reset))) == "connection reset by 127.0.0.1"
    closed = one_connection_server(lambda conn: conn.close())
    assert sd.short_network_error(failure_of(closed)) == "connection closed by 127.0.0.1"
    assert sd.short_network_error(failure_of("http://smugmug.invalid/x")) == \
        "cannot find the address of smugmug.invalid (DNS)"


def client_for(fake, api_base=None, **extra):
    config = sd.validate_config(dict(fake.config("/nonexistent-out", **extra),
                                     **({"api_base": api_base} if api_base else {})), "test")
    return sd.SmugMugClient(config, threading.Event())


def test_a_refused_server_is_waited_for_then_unreachable(fake):
    """A server refusing connections from the first call: the call waits for the link (probing
    it) for unreachable_minutes, then raises Unreachable naming when it began and why."""
    port = closed_port()
    client = client_for(fake, "http://127.0.0.1:%d" % port, unreachable_minutes=0.02)
    before = time.time()
    with pytest.raises(sd.Unreachable) as info:
        client.get(sd.API_ROOT + "!authuser")
    elapsed = time.time() - before
    assert 1.2 <= elapsed < 4.0
    assert before - 0.01 <= info.value.since <= before + 0.5
    assert re.fullmatch(r"SmugMug unreachable since \d\d:\d\d:\d\d: connection refused by 127\.0\.0\.1:%d" % port,
                        str(info.value)), str(info.value)
    started = time.monotonic()
    with pytest.raises(sd.Unreachable):           # every later call at once
        client.post(sd.API_ROOT + "/album/x!download")
    assert time.monotonic() - started < 0.5
    client.close()


def test_a_call_waits_through_an_outage_and_costs_no_try(fake, monkeypatch):
    """The server goes away for a while (connections refused on both ports) and comes back on
    the same ports: a call made meanwhile waits, probing the link at once and then 1 s, 2 s...
    apart, and answers once the server does; more failures than API_ATTEMPTS cost no try."""
    monkeypatch.setattr(sd, "LINK_PROBE_MAX", 0.2)
    monkeypatch.setattr(sd, "LINK_PROBE_FIRST", 0.1)
    client = client_for(fake)
    assert client.get(sd.API_ROOT + "!authuser")
    client.close()
    fake.outage(2.0, mode="refuse")
    started = time.monotonic()
    assert sd.envelope_payload(client.get(sd.API_ROOT + "!authuser"))["NickName"] == fake.nickname
    assert 1.8 <= time.monotonic() - started < 4.0
    assert client.link.up and 1.5 <= client.link.down_seconds < 4.0
    assert len(client.link.confirmed) == 1                # one outage, probes failed in it: no try counted
    client.close()


def test_a_silent_server_at_the_start_stops_the_run_with_exit_1(fake, tmp_path, capsys, monkeypatch):
    """A server that accepts connections but never answers: the run waits unreachable_minutes,
    then stops with one stopped summary, exit 1 (an outage is not a config error), no traceback."""
    monkeypatch.setattr(sd, "TIMEOUT", (1, 0.1))
    monkeypatch.setattr(sd, "PROBE_TIMEOUT", (1, 0.1))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(50)                 # connections wait in the backlog, never answered
    try:
        data = fake.config(tmp_path / "out", api_base="http://127.0.0.1:%d" % listener.getsockname()[1],
                           unreachable_minutes=0.01)
        code = sd.main(["--config", write_config(tmp_path / "config.json", data), "--quiet"])
    finally:
        listener.close()
    err = capsys.readouterr().err
    assert code == sd.EXIT_ALBUMS_FAILED
    assert "Traceback" not in err
    assert re.fullmatch(r"Stopped after \d+ s, before reaching the account: nothing was backed up "
                        r"\(SmugMug unreachable since \d\d:\d\d:\d\d: timed out reading from 127\.0\.0\.1\)\.\n", err), err


# The status line ############################################################

def test_fit_line_cuts_cleanly():
    """A status text wider than the terminal is cut at a word, marked '...', never longer than asked."""
    text = "albums: 120 found, 32 preparing, 4 downloading, 50 done, 0 failed | 120.5 MB at 30.1 MB/s"
    assert sd.fit_line(text, 200) == text
    for width in range(0, len(text)):
        assert len(sd.fit_line(text, width)) <= width
    assert sd.fit_line(text, 39) == "albums: 120 found, 32 preparing, 4..."
    assert sd.fit_line(text, 60) == "albums: 120 found, 32 preparing, 4 downloading, 50 done..."


def test_status_line_fits_a_narrow_terminal(sample, tmp_path):
    """On a 40-column terminal every redraw of the status line fits in 39 columns (so it never wraps)."""
    sample.prep_seconds = 0.3
    config = write_config(tmp_path / "config.json", sample.config(tmp_path / "out"))
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 40, 0, 0))
    proc = spawn(config, stderr=slave)
    os.close(slave)
    shown = read_pty(proc, master)
    assert proc.returncode == 0
    drawn = [piece.split("\x1b[K")[0] for piece in shown.split("\r")[1:] if "\x1b[K" in piece]
    drawn = [d for d in drawn if d]
    assert drawn and max(len(d) for d in drawn) <= 39, max(drawn, key=len)
    assert any(re.fullmatch(r"\d+ of \d+ albums( \| .*)?", d) for d in drawn), drawn
