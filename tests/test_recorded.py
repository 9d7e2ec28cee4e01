"""Real responses recorded from the live API (tests/data/, from the public cmac account)."""

import json
import os

import pytest

import fake_smugmug
import smugmug_download as sd
from conftest import HERE, tree

DATA = os.path.join(HERE, "data")


def load(name):
    with open(os.path.join(DATA, name)) as f:
        return json.load(f)


ROOT_ID, PHOTOGRAPHY_ID = "zx4Fx", "n83bK"


@pytest.fixture
def recorded(fake):
    """The emulator serving the recorded walk as it is: !authuser, the user, the root's 17 folders
    and the 16 albums of Photography, both paged 10 at a time. Other folders are empty (no Node key)."""
    fake.nickname = "cmac"
    fake.canned[("/api/v2!authuser", None)] = load("authuser.json")
    fake.canned[("/api/v2/user/cmac", None)] = load("user.json")
    fake.canned[("/api/v2/node/%s!children" % ROOT_ID, 1)] = load("root_children.json")
    fake.canned[("/api/v2/node/%s!children" % ROOT_ID, 11)] = load("root_children_page2.json")
    fake.canned[("/api/v2/node/%s!children" % PHOTOGRAPHY_ID, 1)] = load("folder_children.json")
    fake.canned[("/api/v2/node/%s!children" % PHOTOGRAPHY_ID, 11)] = load("folder_children_page2.json")
    fake.canned[("/api/v2/album/DDnhRD", None)] = load("album.json")
    folders = [n for f in ("root_children.json", "root_children_page2.json")
               for n in load(f)["Response"]["Node"]]
    for node in folders:
        if node["NodeID"] != PHOTOGRAPHY_ID:
            fake.canned[("/api/v2/node/%s!children" % node["NodeID"], None)] = {
                "Code": 200, "Message": "Ok",
                "Response": {"Uri": node["Uris"]["ChildNodes"]["Uri"], "Locator": "Node",
                             "LocatorType": "Objects",
                             "Pages": {"Total": 0, "Start": 1, "Count": 0, "RequestedCount": 10}}}
    fake.recorded_albums = [n for f in ("folder_children.json", "folder_children_page2.json")
                            for n in load(f)["Response"]["Node"]]
    fake.recorded_folders = folders
    return fake


def test_recorded_walk_finds_every_album_at_its_path(recorded, run):
    """From !authuser through 17 folders, the 16 albums of Photography are listed at the right paths."""
    code, out, err = run("--dry-run")
    assert code == 0, err
    listed = sorted(line.split(None, 1)[1] for line in out.splitlines() if not line.startswith("total:"))
    expected = sorted("Photography/" + sd.clean_name(n["Name"]) for n in recorded.recorded_albums)
    assert listed == expected and len(listed) == 16
    assert "Photography/Baldy's first experiments with HDR" in listed
    walked = {e["path"] for e in recorded.log if e["path"].endswith("!children")}
    assert len(walked) == 18          # the root and its 17 folders
    pages = [e for e in recorded.log if e["path"] == "/api/v2/node/%s!children" % PHOTOGRAPHY_ID]
    assert [e["query"].get("start") for e in pages] == [None, "11"]


def test_recorded_tree_full_backup(recorded, run):
    """A full backup over the recorded tree (no _expand in the recordings: each album is fetched),
    with archives from the emulator: every album's bytes at its recorded path."""
    for node in recorded.recorded_albums:
        key = node["Uris"]["Album"]["Uri"].rsplit("/", 1)[1]
        recorded.albums[key] = fake_smugmug.FakeAlbum(key, node["NodeID"], [2000 + len(key)], image_count=5)
        recorded.nodes[node["NodeID"]] = fake_smugmug.Node(node["NodeID"], "Album", node["Name"], None,
                                                           album_key=key)
    code, _, err = run()
    assert code == 0, err
    got = tree(run.out)
    for node in recorded.recorded_albums:
        key = node["Uris"]["Album"]["Uri"].rsplit("/", 1)[1]
        for name, data in recorded.expected_parts(key).items():
            assert got["Photography/%s/%s" % (sd.clean_name(node["Name"]), name)] == data
    assert len(got) == 16
    assert {f["Name"] for f in recorded.recorded_folders} <= set(os.listdir(run.out))


def test_recorded_unknown_node_type_and_expansions_parse():
    """A node with an unknown Type is skipped with a reason; real Expansions give album timestamps."""
    node = sd.envelope_payload(load("node_zx4Fx_type_unknown.json"))
    assert node["Type"] not in ("Folder", "Album", "Page")
    body = load("album_2XrGxm_expansions.json")
    assert sd.locator_payload(body["Expansions"]["/api/v2/node/jM739r"])["NodeID"] == "jM739r"
    nodes = sd.as_list(sd.envelope_payload(load("node_children_zx4Fx_page_2.json")))
    album_node = [n for n in nodes if n["Type"] == "Album"][0]
    expansions = {"/api/v2/album/RM4BL2": {"Locator": "Album", "Album": {
        "AlbumKey": "RM4BL2", "LastUpdated": "2020-01-01T00:00:00+00:00",
        "ImagesLastUpdated": "2020-01-02T00:00:00+00:00", "ImageCount": 3}}}
    album = sd.album_from_node(album_node, ("Zero",), expansions)
    assert album.album_key == "RM4BL2" and album.has_details and album.image_count == 3
    assert sd.next_page(load("node_children_zx4Fx_page_1.json")).endswith("start=11&count=10")


def keys_of(obj):
    return set(obj) if isinstance(obj, dict) else set()


@pytest.mark.parametrize("recorded_file, path, query", [
    ("authuser.json", "/api/v2!authuser", ""),
    ("user.json", "/api/v2/user/tester", ""),
    ("root_children.json", "/api/v2/node/{root}!children", "?count=2"),
    ("folder_children.json", "/api/v2/node/{folder}!children", "?count=2"),
    ("album.json", "/api/v2/album/{album}", ""),
])
def test_emulator_envelopes_carry_the_recorded_keys(sample, recorded_file, path, query):
    """The emulator's envelopes, Response, Pages and objects carry every key the real API sent."""
    import requests
    from requests_oauthlib import OAuth1
    real = load(recorded_file)
    folder = [n for n in sample.nodes.values() if n.name == "Travel"][0].node_id
    url = sample.base + path.format(root=sample.root_id, folder=folder, album=sample.keys["beach"]) + query
    auth = OAuth1(sample.app_key, sample.app_secret, fake_smugmug.ACCESS_KEY, fake_smugmug.ACCESS_SECRET)
    ours = requests.get(url, auth=auth, headers={"Accept": "application/json"}).json()
    assert keys_of(real) - {"Options"} <= keys_of(ours)
    assert keys_of(real["Response"]) - {"DocUri"} <= keys_of(ours["Response"])
    if "Pages" in real["Response"]:
        assert keys_of(real["Response"]["Pages"]) - {"PrevPage"} <= keys_of(ours["Response"]["Pages"])
    real_obj = sd.envelope_payload(real)
    our_obj = sd.envelope_payload(ours)
    real_obj = real_obj[0] if isinstance(real_obj, list) else real_obj
    our_obj = our_obj[0] if isinstance(our_obj, list) else our_obj
    important = {"NodeID", "Name", "Type", "Uri", "Uris", "UrlPath", "DateAdded", "DateModified", "HasChildren",
                 "IsRoot", "AlbumKey", "LastUpdated", "ImagesLastUpdated", "ImageCount", "NickName"}
    assert (keys_of(real_obj) & important) <= keys_of(our_obj)
    missing = keys_of(real_obj) - keys_of(our_obj)
    assert len(missing) <= len(keys_of(real_obj)) // 3, missing


def test_recorded_image_listings_parse():
    """Real !images answers give each file's key, name, archived size and MD5; a protected
    album's (no Archived* fields) gives files with nothing to download, never a crash."""
    first = [sd.listed_file(o) for o in sd.as_list(sd.envelope_payload(load("album_images.json")))]
    second = [sd.listed_file(o) for o in sd.as_list(sd.envelope_payload(load("album_images_page2.json")))]
    files = first + second
    raw = [o for name in ("album_images.json", "album_images_page2.json")
           for o in sd.as_list(sd.envelope_payload(load(name)))]
    assert len(files) == len(raw) == 26
    for listed, obj in zip(files, raw):
        assert listed.key == obj["ImageKey"] and listed.file_name == obj["FileName"]
        assert listed.archived_size == obj["ArchivedSize"] and listed.archived_md5 == obj["ArchivedMD5"]
        assert listed.archived_uri == obj["ArchivedUri"]
        assert dict(listed.fields)["Caption"] == obj["Caption"] and dict(listed.fields)["ArchivedUri"] == obj["ArchivedUri"].split("?")[0]
    protected = [sd.listed_file(o) for o in
                 sd.as_list(sd.envelope_payload(load("album_images_HZMsPf_page_1.json")))]
    assert protected and all(f.archived_uri == "" and f.archived_size is None for f in protected)
    names = sd.loose_file_names([(f.key, f.file_name) for f in files], [sd.MANIFEST_NAME])
    assert len(set(n.casefold() for n in names.values())) == len({f.key for f in files})
