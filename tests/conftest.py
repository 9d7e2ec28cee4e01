"""Shared fixtures: a running emulator and ways to run the real tool against it."""

import json
import os
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import fake_smugmug  # noqa: E402
import smugmug_download  # noqa: E402

SCRIPT = os.path.join(ROOT, "smugmug_download.py")

# Every test talks to 127.0.0.1 only: never through a proxy from the environment.
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"


@pytest.fixture
def fake():
    server = fake_smugmug.FakeSmugMug().start()
    yield server
    server.stop()


@pytest.fixture
def sample(fake):
    """The emulator with the sample account; children paged 4 at a time."""
    fake.max_count = 4
    fake.keys = fake_smugmug.sample_account(fake)
    return fake


def write_config(path, data):
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    os.chmod(path, 0o600)
    return str(path)


class Runner:
    """Runs the tool in-process (main(argv)) against an emulator."""

    def __init__(self, fake, tmp_path, capsys):
        self.fake = fake
        self.tmp = tmp_path
        self.capsys = capsys
        self.out = tmp_path / "backup"
        self.config_path = tmp_path / "config.json"
        self.extra = {}

    def config(self, **extra):
        data = self.fake.config(self.out, **dict(self.extra, **extra))
        return write_config(self.config_path, data)

    def __call__(self, *args, **extra):
        self.config(**extra)
        code = smugmug_download.main(["--config", str(self.config_path)] + list(args))
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err


@pytest.fixture
def planner_adds(monkeypatch):
    """{AlbumKey: (when its wait counts from, whether its looks teach preparation times)} for
    each album the run's LookPlanner is given, as LookPlanner.add is called."""
    added = {}
    add = smugmug_download.LookPlanner.add

    def spy(self, album_run, asked, learn=True):
        added[album_run.album.album_key] = (asked, learn)
        return add(self, album_run, asked, learn)
    monkeypatch.setattr(smugmug_download.LookPlanner, "add", spy)
    return added


@pytest.fixture
def run(fake, tmp_path, capsys):
    return Runner(fake, tmp_path, capsys)


def tree(folder, manifests=False):
    """{relative path: bytes} of every file under folder, state, lock and the top index.csv (derived,
    rewritten by every run) left out (and the albums' metadata.json unless manifests)."""
    files = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d != smugmug_download.STATE_DIR]
        for name in names:
            if name == smugmug_download.LOCK_FILE or (name == "metadata.json" and not manifests):
                continue
            if name == smugmug_download.INDEX_NAME and os.path.samefile(root, folder):
                continue
            full = os.path.join(root, name)
            try:
                with open(full, "rb") as f:
                    files[os.path.relpath(full, folder).replace(os.sep, "/")] = f.read()
            except FileNotFoundError:       # renamed by a run still going (a test waiting on one)
                pass
    return files


def expected_tree(fake, paths):
    """{relative path: bytes} the backup must hold: paths maps album key -> local album path."""
    files = {}
    for key, rel in paths.items():
        for name, data in fake.expected_parts(key).items():
            files[rel + "/" + name] = data
    return files


SAMPLE_PATHS = {
    "beach": "Family/2019/Summer/Beach Day",
    "bbq": "Family/2019/Summer/BBQ",
    "xmas": "Family/2019/Christmas",
    "big": "Family/Big Trip",
    "empty": "Family/Empty Album",
    **{"travel%d" % i: "Travel/Trip %02d" % i for i in range(10)},
}


def sample_expected(fake):
    return expected_tree(fake, {fake.keys[name]: rel for name, rel in SAMPLE_PATHS.items()})


def spawn(config_path, *args, **kw):
    """The tool as a subprocess (for signals, locks, terminals)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **kw.pop("env", {}))
    return subprocess.Popen([sys.executable, SCRIPT, "--config", str(config_path)] + list(args),
                            stdout=kw.pop("stdout", subprocess.PIPE), stderr=kw.pop("stderr", subprocess.PIPE),
                            stdin=kw.pop("stdin", subprocess.DEVNULL), env=env, **kw)


def read_pty(proc, master, timeout=60):
    """Everything a subprocess wrote to the terminal whose master side is master, until it ends."""
    text = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        text += chunk
    proc.wait(timeout=timeout)
    os.close(master)
    return text.decode(errors="replace")


def file_size_limit(limit):
    """A preexec_fn for spawn: writes past limit bytes fail with EFBIG (a stand-in for a full disk)."""
    def apply():
        import resource
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def manifest(folder):
    """The metadata.json of an album folder, parsed."""
    with open(os.path.join(folder, smugmug_download.MANIFEST_NAME), encoding="utf-8") as f:
        return json.load(f)


def wait_for(predicate, timeout=20.0, step=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False
