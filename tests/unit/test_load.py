"""Loading a directory of bundle files: one stack per file, every problem at once, each in one line."""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from pathlib import Path

import pytest

from bundles import BundleError, InvalidBundles, load_directory

WEB = {"Version": "0.1", "Services": {"web": {"Image": "nginx:1.27", "Ports": [{"Port": 80}]}}}
WEB_YAML = "Version: '0.1'\nServices:\n  web:\n    Image: nginx:1.27\n    Ports:\n      - Port: 80\n"


def write(directory: Path, name: str, content: str | bytes) -> Path:
    """Write one file under `directory` (creating parents) and return its path."""
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def load_errors(directory: Path) -> list[BundleError]:
    """The errors load_directory reports; fails the test when the directory loads."""
    with pytest.raises(InvalidBundles) as info:
        load_directory(directory)
    return info.value.errors


def only_error(directory: Path) -> BundleError:
    errors = load_errors(directory)
    assert len(errors) == 1, [str(e) for e in errors]
    return errors[0]


# --- which files are stacks --------------------------------------------------------------------------------------


def test_stacks_are_the_bundle_files_directly_in_the_directory(tmp_path: Path) -> None:
    for name in ("web.dab", "api.json", "ops.yaml", "db.yml"):
        write(tmp_path, name, json.dumps(WEB))
    for name in ("notes.txt", "README.md", "web.dab.bak", "sub/nested.dab", "deeper/a/b.yaml", "noext"):
        write(tmp_path, name, "not a bundle {")
    (tmp_path / "folder.dab").mkdir()  # a directory with a bundle suffix is not a file
    state = load_directory(tmp_path)
    assert sorted(state.stacks) == ["api", "db", "ops", "web"]
    assert {s.name: Path(s.file).name for s in state.stacks.values()} == {
        "api": "api.json",
        "db": "db.yml",
        "ops": "ops.yaml",
        "web": "web.dab",
    }


def test_empty_directory_is_an_empty_state(tmp_path: Path) -> None:
    assert dict(load_directory(tmp_path).stacks) == {}


def test_not_a_directory(tmp_path: Path) -> None:
    err = only_error(tmp_path / "missing")
    assert err.file == str(tmp_path / "missing")
    assert "not a directory" in str(err)


def test_yaml_and_json_of_the_same_bundle_are_the_same_bundle(tmp_path: Path) -> None:
    write(tmp_path, "a.dab", json.dumps(WEB))
    write(tmp_path, "b.yaml", WEB_YAML)
    stacks = load_directory(tmp_path).stacks
    assert stacks["a"].bundle == stacks["b"].bundle
    assert stacks["a"].bundle_hash == stacks["b"].bundle_hash


@pytest.mark.parametrize(
    ("first", "second"),
    [("web.dab", "web.json"), ("web.json", "web.yaml"), ("web.yaml", "web.yml")],
)
def test_two_files_with_the_same_stem(tmp_path: Path, first: str, second: str) -> None:
    write(tmp_path, first, json.dumps(WEB))
    write(tmp_path, second, json.dumps(WEB))
    err = only_error(tmp_path)
    assert first in str(err) and second in str(err)
    assert "'web'" in err.message


@pytest.mark.parametrize(
    ("name", "suggested"),
    [
        ("Web.dab", "web"),
        ("web_shop.dab", "web-shop"),
        ("Web_Shop.yaml", "web-shop"),
        ("web.shop.json", "web-shop"),
        ("-web.dab", "web"),
        ("w" * 64 + ".dab", "w" * 63),
    ],
)
def test_invalid_stack_name_suggests_one(tmp_path: Path, name: str, suggested: str) -> None:
    write(tmp_path, name, json.dumps(WEB))
    err = only_error(tmp_path)
    assert err.file == str(tmp_path / name)
    assert "invalid stack name" in err.message
    assert f"{suggested!r}" in err.fix


def test_invalid_stack_name_and_invalid_content_are_both_reported(tmp_path: Path) -> None:
    write(tmp_path, "Web.dab", json.dumps({"Services": {"web": {"Imge": "x"}}}))
    errors = load_errors(tmp_path)
    # The name and the misspelt field; "Image is missing" would only echo the misspelling.
    assert len(errors) == 2
    assert "invalid stack name" in errors[0].message


# --- syntax and encoding ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ('{"Services": {"web": {"Image": "x",}}}', 1, 36),
        ('{\n  "Services": {\n    "web": {"Image" "x"}\n  }\n}\n', 3, 21),
        ("", 1, 1),
        ('{"Services": {"web": {"Image": "x"}}} trailing', 1, 39),
    ],
)
def test_json_syntax_error_gives_line_and_column(tmp_path: Path, text: str, line: int, column: int) -> None:
    path = write(tmp_path, "web.dab", text)
    err = only_error(tmp_path)
    assert (err.line, err.column) == (line, column)
    assert str(err).startswith(f"{path}:{line}:{column}: invalid JSON")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("Services:\n  web:\n    Image: [x\n", 4),
        ("Services:\n  web:\n    Image: x\n   Env: [A]\n", 4),
        ("Services:\n  web: {Image: x}}\n", 2),
        ("Services:\n\tweb: {}\n", 2),
    ],
)
def test_yaml_syntax_error_gives_line(tmp_path: Path, text: str, line: int) -> None:
    path = write(tmp_path, "web.yaml", text)
    err = only_error(tmp_path)
    assert err.line == line
    assert str(err).startswith(f"{path}:{line}:")
    assert "invalid YAML" in err.message


@pytest.mark.parametrize(
    "text",
    [
        "Services: !!python/object:os.system {}\n",
        "Services:\n  web: !!python/object/apply:os.system ['echo pwned']\n",
        "Services:\n  web:\n    Image: !!python/name:os.system\n",
        "Services: !custom {}\n",
    ],
)
def test_yaml_tags_are_refused(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, "web.yaml", text)
    err = only_error(tmp_path)
    assert str(err).startswith(f"{path}:")
    assert "constructor for the tag" in err.message
    assert "no tags" in err.fix


def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    # Billion laughs: 9 levels of 9 aliases each expand to 9**9 (~387 million) nodes.
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    names = "abcdefghi"
    for prev, name in itertools.pairwise(names):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    write(tmp_path, "bomb.yaml", "\n".join(lines) + "\n")
    start = time.monotonic()
    err = only_error(tmp_path)
    assert time.monotonic() - start < 2
    assert "alias bomb" in err.message


def test_yaml_aliases_within_limits_are_fine(tmp_path: Path) -> None:
    text = "x-env: &env [A=1, B=2]\nServices:\n  web: {Image: x, Env: *env}\n  api: {Image: y, Env: *env}\n"
    write(tmp_path, "web.yaml", text)
    # The anchor lives under an unknown top-level key: the model refuses it, but the loader read it.
    err = only_error(tmp_path)
    assert err.field == "x-env"


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("[" * 10_000 + "]" * 10_000, id="arrays"),
        pytest.param('{"a":' * 10_000 + "1" + "}" * 10_000, id="objects"),
        pytest.param('{"Services":' * 100 + "1" + "}" * 100, id="past-max-depth"),
    ],
)
def test_deeply_nested_json_is_a_clear_error(tmp_path: Path, text: str) -> None:
    write(tmp_path, "deep.dab", text)
    err = only_error(tmp_path)
    assert "nested" in err.message
    assert "few levels deep" in err.fix


@pytest.mark.parametrize(
    ("content", "byte", "line"),
    [
        (b'{"Services": {"web": {"Image": "caf\xe9"}}}', "0xe9", 1),
        (b'{\n"Services":\n{"web": {"Image": "\xff"}}}', "0xff", 3),
        (b"\xfe\xff\x00{", "0xfe", 1),
    ],
)
def test_non_utf8_names_the_byte(tmp_path: Path, content: bytes, byte: str, line: int) -> None:
    path = write(tmp_path, "web.dab", content)
    err = only_error(tmp_path)
    assert byte in err.message
    assert err.line == line
    assert str(err).startswith(f"{path}:{line}: ")


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    write(tmp_path, "web.dab", b"\xef\xbb\xbf" + json.dumps(WEB).encode())
    assert "web" in load_directory(tmp_path).stacks


@pytest.mark.parametrize(
    ("name", "text", "key"),
    [
        ("web.dab", '{"Services": {"web": {"Image": "x"}}, "Services": {}}', "Services"),
        ("web.dab", '{"Services": {"web": {"Image": "x", "Image": "y"}}}', "Image"),
        ("web.yaml", "Services:\n  web: {Image: x}\n  web: {Image: y}\n", "web"),
    ],
)
def test_duplicate_keys_are_an_error(tmp_path: Path, name: str, text: str, key: str) -> None:
    write(tmp_path, name, text)
    err = only_error(tmp_path)
    assert f"key {key!r} appears twice" in err.message


def test_several_yaml_documents_are_an_error(tmp_path: Path) -> None:
    write(tmp_path, "web.yaml", f"---\n{WEB_YAML}---\n{WEB_YAML}")
    assert "2 YAML documents" in only_error(tmp_path).message


# --- every problem at once, each one line ---------------------------------------------------------------------------


def broken_directory(directory: Path) -> dict[str, int]:
    """A directory with several broken files and one good one; returns the number of problems per file."""
    write(directory, "good.dab", json.dumps(WEB))
    write(directory, "syntax.dab", '{"Services": ')
    write(directory, "fields.json", json.dumps({"Services": {"web": {"Imge": "x", "Image": "y", "Replicas": 2}}}))
    write(directory, "tags.yaml", "Services: !!python/object:os.system {}\n")
    write(directory, "bytes.yml", b"Services: \xff\n")
    write(directory, "Bad_Name.dab", json.dumps(WEB))
    write(directory, "dupe.dab", json.dumps(WEB))
    write(directory, "dupe.yaml", WEB_YAML)
    return {
        "syntax.dab": 1,
        "fields.json": 2,
        "tags.yaml": 1,
        "bytes.yml": 1,
        "Bad_Name.dab": 1,
        "dupe.yaml": 1,
    }


def test_every_broken_file_is_reported_at_once(tmp_path: Path) -> None:
    expected = broken_directory(tmp_path)
    errors = load_errors(tmp_path)
    per_file: dict[str, int] = {}
    for err in errors:
        per_file[Path(err.file).name] = per_file.get(Path(err.file).name, 0) + 1
    assert per_file == expected


def test_every_error_is_one_line_starting_with_the_file(tmp_path: Path) -> None:
    broken_directory(tmp_path)
    with pytest.raises(InvalidBundles) as info:
        load_directory(tmp_path)
    for err in info.value.errors:
        text = str(err)
        assert "\n" not in text
        assert text.startswith(f"{err.file}:")
        assert Path(err.file).parent == tmp_path
    assert str(info.value).splitlines() == [str(e) for e in info.value.errors]


# --- revision and hash --------------------------------------------------------------------------------------------


def test_revision_is_the_hash_of_the_file_bytes(tmp_path: Path) -> None:
    raw = json.dumps(WEB, indent=2).encode()
    write(tmp_path, "web.dab", raw)
    stack = load_directory(tmp_path).stacks["web"]
    assert stack.revision == f"dir@sha256:{hashlib.sha256(raw).hexdigest()}"
    assert stack.content == raw.decode()
    assert stack.name == "web"


@pytest.mark.parametrize(
    "reformat",
    [
        lambda doc: json.dumps(doc, indent=4),
        lambda doc: json.dumps(doc, separators=(",", ":")),
        lambda doc: "\n\n" + json.dumps(doc, indent="\t") + "\n",
        lambda doc: json.dumps(dict(reversed(list(doc.items())))),
    ],
    ids=["indent-4", "compact", "tabs", "key-order"],
)
def test_bundle_hash_ignores_formatting_revision_does_not(tmp_path: Path, reformat: object) -> None:
    write(tmp_path / "a", "web.dab", json.dumps(WEB))
    write(tmp_path / "b", "web.dab", reformat(WEB))  # type: ignore[operator]
    a = load_directory(tmp_path / "a").stacks["web"]
    b = load_directory(tmp_path / "b").stacks["web"]
    assert a.bundle_hash == b.bundle_hash
    assert a.bundle_hash.startswith("sha256:")
    assert a.revision != b.revision


def test_bundle_hash_ignores_explicit_defaults(tmp_path: Path) -> None:
    explicit = json.loads(json.dumps(WEB))
    explicit["Services"]["web"].update({"StopGracePeriod": "10s", "Deploy": {"Mode": "replicated"}})
    write(tmp_path / "a", "web.dab", json.dumps(WEB))
    write(tmp_path / "b", "web.dab", json.dumps(explicit))
    a = load_directory(tmp_path / "a").stacks["web"]
    b = load_directory(tmp_path / "b").stacks["web"]
    assert a.bundle_hash == b.bundle_hash


def test_bundle_hash_changes_with_content(tmp_path: Path) -> None:
    changed = json.loads(json.dumps(WEB))
    changed["Services"]["web"]["Deploy"] = {"Replicas": 2}
    write(tmp_path / "a", "web.dab", json.dumps(WEB))
    write(tmp_path / "b", "web.dab", json.dumps(changed))
    assert load_directory(tmp_path / "a").stacks["web"].bundle_hash != (
        load_directory(tmp_path / "b").stacks["web"].bundle_hash
    )
