"""Hostile files in a source directory (and a hostile agent config): each gives one clear error, no traceback,
bounded memory and time.

Names that would escape a path or break a container name, files of hundreds of MB, YAML alias bombs and tags,
non-UTF-8 bytes, JSON and YAML nested thousands deep. Every error is one line, starts with the file's path and
holds no control character. The loader runs in-process; `dabctl validate` runs as a subprocess (under an
address-space cap, its peak RSS measured) for "no traceback" and for inputs that could hang or eat memory.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.config import MAX_CONFIG_BYTES, ConfigError, load_config
from bundles import BundleError, InvalidBundles, load_directory
from bundles.documents import MAX_DEPTH, MAX_FILE_BYTES, MAX_YAML_NODES

DABCTL = str(Path(sys.executable).parent / "dabctl")
WEB = {"Services": {"web": {"Image": "nginx:1.27", "Ports": [{"Port": 80}]}}}
WEB_JSON = json.dumps(WEB)
MB = 1024 * 1024


# --- helpers -------------------------------------------------------------------------------------------------------


def assert_one_clear_line(text: str, directory: Path) -> None:
    """One line, starting with the file's path, with no control character (newline, ESC ...) in it."""
    assert "\n" not in text and "\r" not in text, f"not one line: {text!r}"
    assert not [c for c in text if unicodedata.category(c) == "Cc"], f"control character in: {text!r}"
    assert text.startswith(f"{directory}{os.sep}"), text


def errors_of(directory: Path) -> list[BundleError]:
    with pytest.raises(InvalidBundles) as info:  # any other exception fails the test
        load_directory(directory)
    for err in info.value.errors:
        assert_one_clear_line(str(err), directory)
    return info.value.errors


def only_error(directory: Path) -> BundleError:
    errors = errors_of(directory)
    assert len(errors) == 1, [str(e) for e in errors]
    return errors[0]


def write(directory: Path, name: str | bytes, content: str | bytes) -> Path:
    """Write a file; a bytes name may hold bytes that are not UTF-8."""
    raw = content.encode() if isinstance(content, str) else content
    path = os.path.join(os.fsencode(directory), name if isinstance(name, bytes) else os.fsencode(name))
    with open(path, "wb") as f:
        f.write(raw)
    return Path(os.fsdecode(path))


def sparse(path: Path, size: int) -> Path:
    """A file of `size` bytes that allocates no disk (all zeros)."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@dataclass(kw_only=True)
class Run:
    returncode: int | None  # None: killed after the timeout
    stdout: str
    stderr: str
    seconds: float
    peak_rss_mb: float


def dabctl(*args: str, timeout: float = 60, address_space: int = 1 << 30) -> Run:
    """Run the dabctl binary under an address-space cap; a run past `timeout` is killed (returncode None)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DABCTL_")}
    env["DABCTL_STATE_DIR"] = tempfile.gettempdir()

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen([DABCTL, *args], stdout=out, stderr=err, env=env, preexec_fn=cap)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS, not all children's
        finally:
            timer.cancel()
        seconds = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        killed = os.WIFSIGNALED(status)
        out.seek(0)
        err.seek(0)
        return Run(
            returncode=None if killed else proc.returncode,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
            seconds=seconds,
            peak_rss_mb=usage.ru_maxrss / 1024,
        )


@pytest.fixture(scope="module")
def baseline_rss() -> float:
    """Peak RSS of `dabctl validate` on one small valid file."""
    with tempfile.TemporaryDirectory() as d:
        write(Path(d), "web.dab", WEB_JSON)
        run = dabctl("validate", d)
    assert run.returncode == 0, run.stderr
    return run.peak_rss_mb


def assert_refused_cleanly(run: Run, directory: Path) -> None:
    """Exit 1, no traceback, each problem one line naming a file in `directory`, then the summary line."""
    assert run.returncode is not None, f"dabctl was killed after {run.seconds:.0f}s (hung); stderr: {run.stderr[-500:]}"
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.returncode == 1, run.stderr[-3000:]
    lines = run.stderr.splitlines()
    assert lines, "no error printed"
    assert lines[-1].startswith("error: "), lines[-1]
    for line in lines[:-1]:
        assert line.startswith(f"{directory}{os.sep}"), f"not one line per problem: {run.stderr[-3000:]!r}"


# --- names ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "..dab",  # stem ".."-like: "."
        "...dab",  # stem ".."
        "a..dab",
        "a b.dab",
        "Web.dab",
        "wéb.dab",
        "-x.dab",
        "a" * 64 + ".dab",
        "a_b.dab",
        "a.b.dab",
        "--help.dab",
        "$(id).yaml",
        "a;b.json",
        "*.yml",
    ],
)
def test_a_file_name_that_is_not_a_stack_name_is_one_clear_error(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name, WEB_JSON)
    err = only_error(tmp_path)
    assert err.file == str(path)
    assert f"invalid stack name {path.stem!r}" in err.message
    assert "rename the file" in err.fix


@pytest.mark.parametrize("name", ["a" * 63 + ".dab", "web.DAB", "0.yaml", "a-b.YML"])
def test_names_at_the_limits_are_stacks(tmp_path: Path, name: str) -> None:
    write(tmp_path, name, WEB_JSON)
    assert list(load_directory(tmp_path).stacks) == [name.rsplit(".", 1)[0]]


@pytest.mark.parametrize("name", ["a\nb.dab", "x\x1b[2J.dab", "a\rb.yaml", "a\tb.json"])
def test_control_characters_in_a_file_name_stay_out_of_the_error_line(tmp_path: Path, name: str) -> None:
    # The path is printed as it is: a newline in the file name splits the error in two lines, and ESC sequences
    # reach the terminal.
    write(tmp_path, name, WEB_JSON)
    err = only_error(tmp_path)
    assert "invalid stack name" in err.message


@pytest.mark.parametrize("name", ["web\n.dab", "web\n.yaml"])
def test_a_stack_name_with_a_trailing_newline_is_refused(tmp_path: Path, name: str) -> None:
    # Found here, fixed in 738eb24: STACK_NAME_PATTERN was checked with re.match, whose `$` matches before a final
    # newline, so "web\n" passed as a stack name and a network "web\n_default" was created in Docker.
    # (That the path in the error then holds the newline is test_control_characters_in_a_file_name_...)
    write(tmp_path, name, WEB_JSON)
    with pytest.raises(InvalidBundles) as info:
        load_directory(tmp_path)
    assert [e.message for e in info.value.errors] == ["invalid stack name 'web\\n' (the file name)"]


def test_a_file_name_that_is_not_utf8(tmp_path: Path) -> None:
    write(tmp_path, b"\xff\xfe.dab", WEB_JSON)
    err = only_error(tmp_path)
    assert "invalid stack name" in err.message


def test_two_files_for_one_stack(tmp_path: Path) -> None:
    first = write(tmp_path, "web.dab", WEB_JSON)
    second = write(tmp_path, "web.yaml", "Services: {web: {Image: nginx}}\n")
    err = only_error(tmp_path)
    assert err.file == str(second)
    assert f"stack 'web' is also defined by {first}" in err.message


# --- size ----------------------------------------------------------------------------------------------------------


def test_a_300_mb_file_is_refused_by_size_without_reading_it(tmp_path: Path) -> None:
    path = sparse(tmp_path / "huge.dab", 300 * MB)
    tracemalloc.start()
    try:
        start = time.monotonic()
        err = only_error(tmp_path)
        seconds = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.file == str(path)
    assert err.message == f"file is {300 * MB} bytes, over the {MAX_FILE_BYTES} byte limit"
    assert peak < 50 * MB, f"peak {peak / MB:.0f} MB"
    assert seconds < 5


def test_one_byte_over_the_limit_is_refused_and_a_file_at_the_limit_is_read(tmp_path: Path) -> None:
    over = tmp_path / "over"
    over.mkdir()
    sparse(over / "big.dab", MAX_FILE_BYTES + 1)
    assert "over the" in only_error(over).message
    at = tmp_path / "at"
    at.mkdir()
    write(at, "big.dab", WEB_JSON + " " * (MAX_FILE_BYTES - len(WEB_JSON)))
    assert (at / "big.dab").stat().st_size == MAX_FILE_BYTES
    assert list(load_directory(at).stacks) == ["big"]


def test_a_300_mb_file_through_the_cli(tmp_path: Path, baseline_rss: float) -> None:
    sparse(tmp_path / "huge.yaml", 300 * MB)
    run = dabctl("validate", str(tmp_path))
    assert_refused_cleanly(run, tmp_path)
    assert "over the 4194304 byte limit" in run.stderr
    assert run.peak_rss_mb - baseline_rss < 50, f"peak RSS {run.peak_rss_mb:.0f} MB, baseline {baseline_rss:.0f} MB"


def test_a_3_mb_string_in_a_valid_bundle_still_validates(tmp_path: Path) -> None:
    value = "x" * (3 * MB)  # one per file: the limit is 4 MiB
    write(tmp_path, "json.dab", json.dumps({"Services": {"s": {"Image": "nginx", "Env": [f"BIG={value}"]}}}))
    write(tmp_path, "yaml.yaml", "Services:\n  s:\n    Image: nginx\n    Command: [" + json.dumps(value) + "]\n")
    stacks = load_directory(tmp_path).stacks
    assert stacks["json"].bundle.services["s"].env == [f"BIG={value}"]
    assert stacks["yaml"].bundle.services["s"].command == [value]


@pytest.mark.parametrize(
    ("service", "field"),
    [
        ({"Image": "x" * (3 * MB) + " y"}, "Services.s.Image"),
        ({"Image": "nginx", "PullPolicy": "x" * (3 * MB)}, "Services.s.PullPolicy"),
        ({"Image": "nginx", "StopGracePeriod": "5" * (3 * MB)}, "Services.s.StopGracePeriod"),
        ({"Image": "nginx", "Env": ["=" + "x" * (3 * MB)]}, "Services.s.Env"),
    ],
)
def test_a_3_mb_bad_value_gives_a_short_error(tmp_path: Path, service: dict[str, object], field: str) -> None:
    # The error echoes the offending value: a 3 MB value makes a 3 MB error line (log, status, metrics label).
    write(tmp_path, "big.dab", json.dumps({"Services": {"s": service}}))
    err = only_error(tmp_path)
    assert err.field == field
    assert len(str(err)) < 1000, f"error line of {len(str(err))} characters"


# --- YAML: aliases, tags, depth ------------------------------------------------------------------------------------


def billion_laughs(levels: int = 10) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    lines.append(f"Services: {{s: {{Image: nginx, Command: *l{levels - 1}}}}}")
    return "\n".join(lines) + "\n"


def test_a_billion_laughs_is_refused_fast_in_little_memory(tmp_path: Path) -> None:
    write(tmp_path, "lol.yaml", billion_laughs(10))
    tracemalloc.start()
    try:
        start = time.monotonic()
        err = only_error(tmp_path)
        seconds = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"more than {MAX_YAML_NODES} nodes" in err.message
    assert seconds < 5
    assert peak < 50 * MB


@pytest.mark.parametrize(
    "text",
    ["Services: &a [*a]\n", "Services: &a {s: *a}\n", "x: &a [[[*a]]]\nServices: {s: {Image: nginx}}\n"],
    ids=["list", "mapping", "unknown-field"],
)
def test_a_self_referencing_alias_is_refused(tmp_path: Path, text: str, baseline_rss: float) -> None:
    # _check_yaml_size walks a node that contains itself forever, pushing onto its stack: CPU and memory without
    # end. Run as a subprocess, capped at 1 GiB and killed after 15 s.
    write(tmp_path, "loop.yaml", text)
    run = dabctl("validate", str(tmp_path), timeout=15)
    assert_refused_cleanly(run, tmp_path)
    assert run.peak_rss_mb - baseline_rss < 50


def test_a_wide_yaml_document_is_refused_before_it_is_built(tmp_path: Path, baseline_rss: float) -> None:
    # 4 MB of "a," (2 million nodes): the node limit is checked only after the whole document is composed, which
    # takes about 80 s of CPU and 1.6 GB of memory. Capped at 1 GiB and 30 s here.
    write(tmp_path, "wide.yaml", "[" + ",".join(["a"] * 2_000_000) + "]")
    assert (tmp_path / "wide.yaml").stat().st_size < MAX_FILE_BYTES
    run = dabctl("validate", str(tmp_path), timeout=30)
    assert_refused_cleanly(run, tmp_path)
    assert f"more than {MAX_YAML_NODES} nodes" in run.stderr
    assert run.peak_rss_mb - baseline_rss < 100, f"peak RSS {run.peak_rss_mb:.0f} MB"


@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:os.system ['touch {marker}']",
        "!!python/object/new:os.system ['touch {marker}']",
        "!!python/name:os.system",
        "!!python/module:os",
        "!!python/object:builtins.dict {{}}",
        "!custom nginx",
        "!<tag:example.com,2000:app> nginx",
    ],
)
def test_yaml_tags_that_construct_objects_are_refused(tmp_path: Path, tag: str) -> None:
    marker = tmp_path / "pwned"
    write(tmp_path, "tags.yaml", f"Services:\n  s:\n    Image: {tag.format(marker=marker)}\n")
    err = only_error(tmp_path)
    assert "invalid YAML: could not determine a constructor for the tag" in err.message
    assert err.line == 3
    assert not marker.exists()


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ("!!binary aGVsbG8=", "Services.s.Image"),
        ("!!timestamp 2001-12-14", "Services.s.Image"),
        ("!!float 1", "Services.s.Image"),
        ("!!set {a, b}", "Services.s.Image"),
        ("!!omap [a: 1]", "Services.s.Image"),
    ],
)
def test_safe_yaml_tags_of_the_wrong_type_are_field_errors(tmp_path: Path, value: str, field: str) -> None:
    write(tmp_path, "tags.yaml", f"Services:\n  s:\n    Image: {value}\n")
    err = only_error(tmp_path)
    assert err.field == field
    assert err.message.startswith("expected a string")


@pytest.mark.parametrize(("suffix", "what"), [(".dab", "JSON"), (".yaml", "YAML")])
@pytest.mark.parametrize("opening", ["[", '{"a": ', '[{"a": '])
def test_documents_nested_100000_deep(tmp_path: Path, suffix: str, what: str, opening: str) -> None:
    write(tmp_path, "deep" + suffix, opening * 100_000)
    start = time.monotonic()
    err = only_error(tmp_path)  # not RecursionError
    assert "nested" in err.message
    assert time.monotonic() - start < 30  # no hang (about 1 s of CPU)


@pytest.mark.parametrize(("suffix", "expected"), [(".dab", "nested more than"), (".yaml", "nested more than")])
def test_one_level_past_the_depth_limit(tmp_path: Path, suffix: str, expected: str) -> None:
    write(tmp_path, "deep" + suffix, "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    assert f"{expected} {MAX_DEPTH}" in only_error(tmp_path).message


# --- bytes and characters ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "byte", "line"),
    [
        ("latin1.dab", b'{\n  "Services": {\n    "s": {"Image": "caf\xe9"}}}', 0xE9, 3),
        ("latin1.yaml", b"Services:\n  s:\n    Image: caf\xe9\n", 0xE9, 3),
        ("lone.yaml", b"\xff", 0xFF, 1),
        ("utf16.dab", WEB_JSON.encode("utf-16"), 0xFF, 1),
        ("cesu.dab", b'{"Services": {"s": {"Image": "\xed\xa0\x80"}}}', 0xED, 1),
        ("overlong.dab", b'{"Services": {"s": {"Image": "\xc0\xaf"}}}', 0xC0, 1),
    ],
)
def test_bytes_that_are_not_utf8_are_named(tmp_path: Path, name: str, content: bytes, byte: int, line: int) -> None:
    path = write(tmp_path, name, content)
    err = only_error(tmp_path)
    assert err.file == str(path)
    assert err.message == f"byte 0x{byte:02x} is not UTF-8"
    assert err.line == line


def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    write(tmp_path, "bom.dab", b"\xef\xbb\xbf" + WEB_JSON.encode())
    write(tmp_path, "bomy.yaml", b"\xef\xbb\xbfServices: {web: {Image: nginx}}\n")
    assert sorted(load_directory(tmp_path).stacks) == ["bom", "bomy"]


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\x7f", "\ufffe"])
def test_a_control_character_in_yaml_is_one_line(tmp_path: Path, char: str) -> None:
    # PyYAML's ReaderError prints as two lines ('... not allowed\n  in "<unicode string>", position 26').
    write(tmp_path, "ctl.yaml", f"Services:\n  s:\n    Image: a{char}b\n")
    assert "unacceptable character" in only_error(tmp_path).message


def test_a_control_character_in_a_json_string_is_one_line(tmp_path: Path) -> None:
    write(tmp_path, "ctl.dab", '{"Services": {"s": {"Image": "a\x07b"}}}')
    err = only_error(tmp_path)
    assert err.message.startswith("invalid JSON: Invalid control character")
    assert (err.line, err.column) == (1, 32)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("json.dab", '{"Services": {"s": {"Image": "nginx", "Command": ["\\ud800"]}}}'),
        ("pair.dab", '{"Services": {"s": {"Image": "nginx", "Labels": {"k": "\\udfff\\ud800"}}}}'),
        ("yaml.yaml", 'Services: {s: {Image: nginx, Command: ["\\ud800"]}}\n'),
    ],
)
def test_an_escaped_lone_surrogate_is_one_clear_error(tmp_path: Path, name: str, text: str) -> None:
    # The escape passes validation; bundle_hash then encodes the bundle as UTF-8 and raises UnicodeEncodeError.
    write(tmp_path, name, text)
    errors_of(tmp_path)


@pytest.mark.parametrize(
    "doc",
    [
        {"Services": {"s": {"Image": "nginx"}}, "Extra\nKey": 1},
        {"Services": {"s": {"Image": "nginx", "Deploy\x1b[31m": {}}}},
        {"Services": {"s": {"Image": "nginx", "Labels": {"a\nb": 1}}}},
    ],
    ids=["top-level", "escape", "label-value"],
)
def test_a_field_name_with_control_characters_stays_one_line(tmp_path: Path, doc: dict[str, object]) -> None:
    # The field path is printed as it is written in the file.
    write(tmp_path, "keys.dab", json.dumps(doc))
    errors_of(tmp_path)


@pytest.mark.parametrize(
    ("name", "text", "field", "message"),
    [
        (
            "nan.dab",
            '{"Services": {"s": {"Image": "nginx", "Deploy": {"Replicas": NaN}}}}',
            "Services.s.Deploy.Replicas",
            "nan is not a finite number",
        ),
        (
            "inf.dab",
            '{"Services": {"s": {"Image": "nginx", "Labels": {"k": 1e999}}}}',
            "Services.s.Labels.k",
            "inf is not a finite number",
        ),
        (
            "inf.yaml",
            "Services: {s: {Image: nginx, Deploy: {UpdateConfig: {MaxFailureRatio: .inf}}}}\n",
            "Services.s.Deploy.UpdateConfig.MaxFailureRatio",
            "inf is not a finite number",
        ),
        (
            "key.dab",
            '{"Services": {"s": {"Image": "nginx", "Labels": {"\\ud800": "v"}}}}',
            "Services.s.Labels.\ud800",
            "lone surrogate",
        ),
    ],
)
def test_values_no_bundle_can_hold_name_their_field(
    tmp_path: Path, name: str, text: str, field: str, message: str
) -> None:
    write(tmp_path, name, text)
    err = only_error(tmp_path)
    assert (err.field, message in err.message) == (field, True), str(err)
    assert f": {field.encode('unicode_escape').decode()}: " in str(err)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "int.dab",
            '{"Services": {"s": {"Image": "nginx", "Deploy": {"Replicas": ' + "9" * 5000 + "}}}}",
            "invalid JSON: a number has too many digits",
        ),
        (
            "int.yaml",
            "Services: {s: {Image: nginx, Deploy: {Replicas: " + "9" * 5000 + "}}}\n",
            "invalid YAML: cannot read '99999",
        ),
        (
            "date.yaml",
            "Services: {s: {Image: !!timestamp 2001-13-45}}\n",
            "invalid YAML: cannot read '2001-13-45' as timestamp",
        ),
    ],
)
def test_scalars_python_cannot_hold_are_one_line(tmp_path: Path, name: str, text: str, message: str) -> None:
    # int() of more than 4300 digits and datetime() of a 13th month raise ValueError, which escaped the loaders.
    write(tmp_path, name, text)
    err = only_error(tmp_path)
    assert err.message.startswith(message), str(err)
    assert len(str(err)) < 1000


def test_a_network_label_under_a_reserved_prefix_is_refused(tmp_path: Path) -> None:
    doc = {"Services": {"s": {"Image": "nginx"}}, "Networks": {"n": {"Labels": {"dabctl.stack": "other"}}}}
    write(tmp_path, "net.dab", json.dumps(doc))
    err = only_error(tmp_path)
    assert err.field == "Networks.n.Labels"
    assert err.message.startswith("label 'dabctl.stack' is reserved")


def test_a_long_unknown_key_is_cut_in_the_error(tmp_path: Path) -> None:
    write(tmp_path, "key.dab", json.dumps({"Services": {"s": {"Image": "nginx", "K" * (3 * MB): 1}}}))
    err = only_error(tmp_path)
    assert err.field == "Services.s." + "K" * 80 + "..."
    assert len(str(err)) < 1000


# --- links and special files ---------------------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the source directory."""
    other = tmp_path / "outside"
    other.mkdir()
    return other


def test_a_symlink_out_of_the_directory_is_refused_unread(tmp_path: Path, outside: Path) -> None:
    # Links used to be followed wherever they pointed (`Path.is_file` follows them): a link in a repository made the
    # agent read any file it could read, and errors quoted what they found there.
    source = tmp_path / "stacks"
    source.mkdir()
    write(outside, "real.dab", WEB_JSON)
    write(outside, "secret.txt", "hunter2\n")
    (source / "linked.dab").symlink_to(outside / "real.dab")
    (source / "leak.yaml").symlink_to(outside / "secret.txt")
    (source / "up.dab").symlink_to("../outside/real.dab")
    errors = errors_of(source)
    assert [e.file for e in errors] == [str(source / n) for n in ("leak.yaml", "linked.dab", "up.dab")]
    assert all("symbolic link to" in e.message and "outside" in e.message for e in errors)
    assert "hunter2" not in " ".join(str(e) for e in errors)


def test_a_symlink_within_the_directory_is_a_stack(tmp_path: Path) -> None:
    write(tmp_path, "web.dab", WEB_JSON)
    (tmp_path / "alias.dab").symlink_to("web.dab")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "api.yaml", "Services: {api: {Image: nginx}}\n")
    (tmp_path / "api.yaml").symlink_to(tmp_path / "sub" / "api.yaml")
    assert sorted(load_directory(tmp_path).stacks) == ["alias", "api", "web"]


def test_a_source_directory_reached_through_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    write(real, "web.dab", WEB_JSON)
    (real / "alias.dab").symlink_to(real / "web.dab")
    (tmp_path / "link").symlink_to(real)
    assert sorted(load_directory(tmp_path / "link").stacks) == ["alias", "web"]


@pytest.mark.parametrize("target", ["gone.dab", "loop.dab"], ids=["dangling", "loop"])
def test_a_dangling_symlink_is_an_error_not_a_missing_stack(tmp_path: Path, target: str) -> None:
    # Skipping it would prune the stack it held.
    write(tmp_path, "web.dab", WEB_JSON)
    (tmp_path / "loop.dab").symlink_to(tmp_path / target)
    err = only_error(tmp_path)
    assert err.file == str(tmp_path / "loop.dab")
    assert err.message == "symbolic link to nothing"


def test_special_files_are_not_read(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.dab")  # opening it would block for ever
    (tmp_path / "dir.dab").symlink_to(tmp_path)
    (tmp_path / "real-dir.yaml").mkdir()
    write(tmp_path, "web.dab", WEB_JSON)
    assert list(load_directory(tmp_path).stacks) == ["web"]
    (tmp_path / "zero.dab").symlink_to("/dev/zero")  # reading it would never end
    assert "outside" in only_error(tmp_path).message


# --- through the CLI -----------------------------------------------------------------------------------------------

CLI_CASES: dict[str, tuple[str | bytes, str | bytes, str]] = {
    "bad-name": ("a_b.dab", WEB_JSON, "invalid stack name 'a_b'"),
    "escape-name": ("../x.dab".replace("/", "_"), WEB_JSON, "invalid stack name"),
    "latin1": ("l.dab", b'{"Services": {"s": {"Image": "caf\xe9"}}}', "byte 0xe9 is not UTF-8"),
    "deep-json": ("deep.dab", "[" * 100_000, "nested too deeply"),
    "deep-yaml": ("deep.yaml", "{a: " * 100_000, "nested more than 64 levels"),
    "billion-laughs": ("lol.yaml", billion_laughs(10), "alias bomb"),
    "python-tag": ("tag.yaml", "Services: !!python/object/apply:os.system ['true']\n", "could not determine"),
    "bad-json": ("syntax.json", '{"Services": {"s": {"Image": "nginx",}}}', "invalid JSON"),
    "yaml-control-char": ("ctl.yaml", "Services: {s: {Image: a\x07b}}\n", "unacceptable character"),
    "lone-surrogate": ("sur.dab", '{"Services": {"s": {"Image": "nginx", "Command": ["\\ud800"]}}}', "sur.dab"),
    "huge-cpus": (
        "cpu.dab",
        json.dumps({"Services": {"s": {"Image": "nginx", "Deploy": {"Resources": {"Limits": {"Cpus": "9" * 400}}}}}}),
        "Cpus",
    ),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_dabctl_validate_prints_one_line_per_problem_and_no_traceback(tmp_path: Path, case: str) -> None:
    name, content, expected = CLI_CASES[case]
    write(tmp_path, "web.dab", WEB_JSON)  # a valid stack beside it
    write(tmp_path, name, content)
    run = dabctl("validate", str(tmp_path), timeout=60)
    assert_refused_cleanly(run, tmp_path)
    assert expected in run.stderr
    assert run.stdout == ""


# --- the agent config ----------------------------------------------------------------------------------------------


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:  # any other exception fails the test
        load_config(path, {}, environ={})
    message = str(info.value)
    assert "\n" not in message, message
    assert re.match(re.escape(str(path)) + r"(:\d+){0,2}: ", message), message  # file[:line[:col]]: ...
    return message


@pytest.mark.parametrize(
    "content",
    [b"node_name: caf\xe9\n", b"\xff\xfe", "source: /srv\n".encode("utf-16")],
    ids=["latin1", "lone-ff", "utf16"],
)
def test_a_config_file_that_is_not_utf8(tmp_path: Path, content: bytes) -> None:
    # load_config reads with read_text(encoding="utf-8") and catches OSError only: UnicodeDecodeError escapes.
    path = write(tmp_path, "agent.yaml", content)
    assert "UTF-8" in config_error(path)


@pytest.mark.parametrize("text", ["source: " + "[" * 100_000, "{a: " * 100_000, "- " * 100_000 + "x"])
def test_a_config_nested_100000_deep(tmp_path: Path, text: str) -> None:
    # yaml.safe_load without limits: RecursionError escapes.
    path = write(tmp_path, "agent.yaml", text)
    config_error(path)


def test_a_config_key_with_a_newline_is_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "agent.yaml", '"bad\\nkey": 1\n')
    assert "remove it" in config_error(path)


def test_a_config_alias_bomb_and_tags_are_refused(tmp_path: Path) -> None:
    levels = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 10)]
    bomb = write(tmp_path, "bomb.yaml", "source: [" + ", ".join(levels) + "]\n")
    start = time.monotonic()
    assert f"more than {MAX_YAML_NODES} nodes (alias bomb?)" in config_error(bomb)
    assert time.monotonic() - start < 5
    tag = write(tmp_path, "tag.yaml", "source: !!python/object/apply:os.system ['true']\n")
    assert "could not determine a constructor" in config_error(tag)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("node_name: a\nnode_name: b\n", "key 'node_name' appears twice"),
        ("poll_interval: .inf\n", "poll_interval: inf is not a finite number"),
        ("resync_interval: .nan\n", "resync_interval: nan is not a finite number"),
        ("backoff_max: -.inf\n", "backoff_max: -inf is not a finite number"),
    ],
)
def test_a_config_refuses_duplicate_keys_and_non_finite_numbers(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, "agent.yaml", text)
    assert message in config_error(path)


def test_a_config_file_at_the_size_limit_is_read_and_one_byte_more_is_not(tmp_path: Path) -> None:
    at = write(tmp_path, "at.yaml", "node_name: n\n" + "#" * (MAX_CONFIG_BYTES - 14) + "\n")
    assert at.stat().st_size == MAX_CONFIG_BYTES
    assert load_config(at, {}, environ={}).node_name == "n"
    over = write(tmp_path, "over.yaml", "node_name: n\n" + "#" * (MAX_CONFIG_BYTES - 13) + "\n")
    assert f"over the {MAX_CONFIG_BYTES} byte limit" in config_error(over)


def test_an_empty_config_file_is_the_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "agent.yaml", "# nothing set\n")
    assert load_config(path, {}, environ={}) == load_config(None, {}, environ={})


def test_a_300_mb_config_file_is_refused_by_size(tmp_path: Path, baseline_rss: float) -> None:
    # load_config reads the whole file (bytes, then text) before YAML sees the first NUL: ~600 MB for 300 MB.
    source = tmp_path / "stacks"
    source.mkdir()
    write(source, "web.dab", WEB_JSON)
    config = sparse(tmp_path / "agent.yaml", 300 * MB)
    run = dabctl("validate", "--config", str(config), str(source))
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert run.stderr.startswith(f"error: {config}: "), run.stderr
    assert run.peak_rss_mb - baseline_rss < 50, f"peak RSS {run.peak_rss_mb:.0f} MB, baseline {baseline_rss:.0f} MB"


@pytest.mark.parametrize("name", ["k.yaml", "agent.yaml"])
def test_a_yaml_key_that_is_a_list_is_one_line(tmp_path: Path, name: str) -> None:
    # Found by test_properties: the duplicate-key check added the key to a set, and a list raised TypeError.
    path = write(tmp_path, name, "? [a]\n: 1\n")
    if name == "agent.yaml":
        assert "found unhashable key" in config_error(path)
    else:
        assert "found unhashable key" in only_error(tmp_path).message
