"""Read JSON and YAML documents strictly and within limits: the one reader of bundle, Compose and agent config files.

Every refusal is an InvalidBundles holding one BundleError that names the file (and the line and column where they
are known). A file over the size limit is not read. A YAML document is refused while it is being composed, as soon
as it nests too deeply or expands (through aliases) past the node limit, so neither time nor memory grows with what
an attacker writes. A loaded document holds no lone surrogate (it could not be encoded again) and no NaN or infinity.
"""

from __future__ import annotations

import json
import math
import os
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from bundles.errors import BundleError, InvalidBundles
from schemas.quoting import QUOTE_LIMIT, quoted

MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_YAML_NODES = 100_000  # composing one costs ~600 bytes and ~50 us in pure-Python PyYAML
MAX_DEPTH = 64
# A parser's own message may quote what it choked on (a 4 MB tag, an anchor name): cut it to this.
_PROBLEM_LIMIT = 200
_DEPTH_FIX = "bundles and configs are a few levels deep"
_SURROGATE = re.compile("[\ud800-\udfff]")


def read_file(
    path: Path, file: str, limit: int = MAX_FILE_BYTES, fix: str = "split the stack", what: str = "the file"
) -> bytes:
    """The bytes of `path` (shown as `file`), refused unread when they are more than `limit`; `fix` says how to
    shrink it, `what` names it in an error."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise _too_big(file, f"file is {size} bytes", limit, fix)
            raw = f.read(limit + 1)  # stat does not tell the size of a pipe, and a file may grow meanwhile
    except OSError as exc:
        raise InvalidBundles(
            [BundleError(file, f"cannot read {what}: {exc.strerror}", fix="check the path and permissions")]
        ) from None
    if len(raw) > limit:
        raise _too_big(file, "file is more than that", limit, fix)
    return raw


def _too_big(file: str, size: str, limit: int, fix: str) -> InvalidBundles:
    return InvalidBundles([BundleError(file, f"{size}, over the {limit} byte limit", fix=fix)])


def decode(raw: bytes, file: str) -> str:
    """`raw` as UTF-8 text (a byte order mark is dropped); the first byte that is not UTF-8 is named with its line."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InvalidBundles(
            [BundleError(file, f"byte 0x{raw[exc.start]:02x} is not UTF-8", fix="save the file as UTF-8", line=line)]
        ) from None


def read_document(text: str, file: str, suffix: str) -> Any:
    """The one document in a JSON text, or a YAML one when `suffix` is .yaml or .yml."""
    if suffix in (".yaml", ".yml"):
        return read_yaml(text, file)
    return read_json(text, file)


def field_path(loc: Sequence[int | str]) -> str:
    """`("Services", "web", "Ports", 0)` -> `Services.web.Ports[0]`; pydantic's `[key]` marker is left out and a
    key longer than QUOTE_LIMIT is cut."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            continue
        else:
            part = part if len(part) <= QUOTE_LIMIT else f"{part[:QUOTE_LIMIT]}..."
            out += f".{part}" if out else part
    return out


# --- JSON ------------------------------------------------------------------------------------------------------------


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def read_json(text: str, file: str) -> Any:
    """The JSON document in `text`: no key twice in an object, at most MAX_DEPTH levels."""
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise InvalidBundles(
            [
                BundleError(
                    file,
                    f"invalid JSON: {exc.msg}",
                    fix="fix the syntax there",
                    line=exc.lineno,
                    column=exc.colno,
                )
            ]
        ) from None
    except ValueError:  # the one other: an integer past sys.get_int_max_str_digits()
        raise InvalidBundles(
            [BundleError(file, "invalid JSON: a number has too many digits to read", fix="write a smaller number")]
        ) from None
    except _DuplicateKey as exc:
        raise InvalidBundles([BundleError(file, f"key {quoted(exc.key)} appears twice", fix="keep one")]) from None
    except RecursionError:
        raise _too_deep(file, "JSON nested too deeply") from None
    _check_values(data, file)
    return data


def _too_deep(file: str, message: str) -> InvalidBundles:
    return InvalidBundles([BundleError(file, message, fix=_DEPTH_FIX)])


# --- YAML ------------------------------------------------------------------------------------------------------------


class LimitedSafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, and a document nested past MAX_DEPTH or expanding (each alias counted
    as the nodes it repeats) past MAX_YAML_NODES, as it composes: it stops at the first node over a limit."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._nodes = 0  # in the whole file: a file of many documents is refused anyway
        self._depth = 0
        self._deepest = 0  # the deepest level reached below the node being composed
        self._extent: dict[str, tuple[int, int]] = {}  # anchor -> (nodes, levels) of the node it names, once composed

    def compose_document(self) -> yaml.Node | None:
        self._extent = {}
        node: yaml.Node | None = super().compose_document()
        return node

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
        mark = typing.cast(yaml.Mark, event.start_mark)
        if isinstance(event, yaml.AliasEvent):
            extent = self._extent.get(event.anchor or "")
            if extent is None and event.anchor in self.anchors:
                raise yaml.composer.ComposerError(None, None, "an alias refers to the node that holds it", mark)
            if extent is not None:
                self._grow(extent[0], self._depth + extent[1], mark, alias=True)
            return super().compose_node(parent, index)
        anchor: str | None = getattr(event, "anchor", None)
        nodes_before, deepest_before = self._nodes, self._deepest
        self._depth += 1
        self._deepest = self._depth
        self._grow(1, self._depth, mark, alias=False)
        node = super().compose_node(parent, index)
        if anchor is not None:
            self._extent[anchor] = (self._nodes - nodes_before, self._deepest - self._depth + 1)
        self._depth -= 1
        self._deepest = max(deepest_before, self._deepest)
        return node

    def _grow(self, nodes: int, depth: int, mark: yaml.Mark, alias: bool) -> None:
        self._nodes += nodes
        self._deepest = max(self._deepest, depth)
        if depth > MAX_DEPTH:
            raise _OverLimit(f"nested more than {MAX_DEPTH} levels", mark, _DEPTH_FIX)
        if self._nodes > MAX_YAML_NODES:
            if alias:
                raise _OverLimit(
                    f"document expands to more than {MAX_YAML_NODES} nodes (alias bomb?)",
                    mark,
                    "an alias counts as every node it repeats: use fewer aliases",
                )
            raise _OverLimit(f"document has more than {MAX_YAML_NODES} nodes", mark, "split the file")

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError):  # a scalar Python cannot hold: a 5000-digit int, a 13th month
            kind = str(node.tag).rsplit(":", 1)[-1]
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {quoted(node.value)} as {kind}", node.start_mark
            ) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # SafeConstructor refuses it ("found unhashable key")
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {quoted(key)} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _OverLimit(yaml.composer.ComposerError):
    def __init__(self, problem: str, mark: yaml.Mark, fix: str) -> None:
        super().__init__(None, None, problem, mark)
        self.fix = fix


def read_yaml(
    text: str, file: str, loader: type[LimitedSafeLoader] = LimitedSafeLoader, allow_empty: bool = False
) -> Any:
    """The one document in a YAML text, loaded safely (no tags beyond YAML's own) and within the limits.

    An empty text (or only comments) is an error, or None when `allow_empty`.
    """
    try:
        docs = list(yaml.load_all(text, Loader=loader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        raise InvalidBundles(
            [
                BundleError(
                    file,
                    f"invalid YAML: {_cut(problem)}",
                    fix=exc.fix
                    if isinstance(exc, _OverLimit)
                    else "fix it there (only plain YAML is accepted: no tags)",
                    line=mark.line + 1 if mark else None,
                    column=mark.column + 1 if mark else None,
                )
            ]
        ) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        raise InvalidBundles(
            [
                BundleError(
                    file,
                    f"invalid YAML: unacceptable character U+{exc.character:04X}",
                    fix="remove it, or write it as an escape in a double-quoted string",
                    line=line,
                    column=column,
                )
            ]
        ) from None
    except yaml.YAMLError as exc:
        raise InvalidBundles(
            [BundleError(file, f"invalid YAML: {_cut(' '.join(str(exc).split()))}", fix="write it out plainly")]
        ) from None
    except RecursionError:
        raise _too_deep(file, "YAML nested too deeply") from None
    if not docs and allow_empty:
        return None
    if not docs:
        raise InvalidBundles([BundleError(file, "the file is empty", fix="write one document in it")])
    if len(docs) > 1:
        raise InvalidBundles(
            [
                BundleError(
                    file,
                    f"invalid YAML: {len(docs)} YAML documents in one file",
                    fix="put exactly one document in a file",
                )
            ]
        )
    _check_values(docs[0], file)
    return docs[0]


def _cut(problem: str) -> str:
    return problem if len(problem) <= _PROBLEM_LIMIT else f"{problem[:_PROBLEM_LIMIT]}... ({len(problem)} characters)"


# --- what a loaded document may hold ---------------------------------------------------------------------------------


def _check_values(data: Any, file: str) -> None:
    """Refuse nesting past MAX_DEPTH, then the first lone surrogate or non-finite number, naming its field."""
    todo: list[tuple[Any, int]] = [(data, 1)]
    while todo:
        item, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise _too_deep(file, f"nested more than {MAX_DEPTH} levels")
        if isinstance(item, dict):
            todo.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            todo.extend((v, depth + 1) for v in item)
    loc: list[int | str] = []
    problem = _first_bad_value(data, loc)
    if problem is not None:
        message, fix = problem
        raise InvalidBundles([BundleError(file, message, field=field_path(loc), fix=fix)])


def _first_bad_value(item: Any, loc: list[int | str]) -> tuple[str, str] | None:
    """What is wrong with the first bad value or key under `item`; `loc` is left holding its path."""
    # Recursive: _check_values has bounded the depth.
    if isinstance(item, str) and (bad := _SURROGATE.search(item)):
        return (
            f"holds the escape of a lone surrogate ({bad.group()!r}), which no UTF-8 text can hold",
            "write the character itself",
        )
    if isinstance(item, float) and not math.isfinite(item):
        return f"{item} is not a finite number", "write a number"
    if isinstance(item, dict):
        for key, value in item.items():
            loc.append(key if isinstance(key, str) else str(key))
            if (problem := _first_bad_value(key, loc)) or (problem := _first_bad_value(value, loc)):
                return problem
            loc.pop()
    elif isinstance(item, list):
        for i, value in enumerate(item):
            loc.append(i)
            if problem := _first_bad_value(value, loc):
                return problem
            loc.pop()
    return None
