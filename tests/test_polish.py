"""What a newcomer following the README against the emulator found: an emptied album's files
listed as deleted on SmugMug and recorded as found gone, the dry run's exact count of files to
versions in the files layout, its notes (moved from, unpack), the summary's bytes after a
resume, the first line of advice for a fresh config, --authorize's messages, wording, a file
where a folder must go, --config naming the path, --help, and the status line's start."""

import json
import os
import re

import pytest

import smugmug_download as sd
from conftest import tree


def versions_line(out, rel):
    """The dry run's count of old files to versions for album rel ("up to N" or "N")."""
    (line,) = [l for l in out.splitlines() if l.split(None, 1)[-1].startswith(rel + " (")]
    return re.search(r"((?:up to )?\d+) old files? to versions", line).group(1)


def moved_to_versions(err):
    return int(re.search(r"(\d+) moved to versions", err).group(1))


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
