"""Read bundle files strictly: syntax errors with line and column, field errors with path and nearest valid name."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from bundles.desired import DesiredState, StackBundle, bundle_hash
from bundles.errors import BundleError, InvalidBundles
from schemas.bundle import OBJECT_NAME_PATTERN, STACK_NAME_PATTERN, Bundle

BUNDLE_SUFFIXES = (".dab", ".json", ".yaml", ".yml")
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_YAML_NODES = 200_000
MAX_DEPTH = 64

_KEY_RULES = {
    "Services": (
        "service name",
        "use letters, digits, '-' and '_' (at most 63, starting with a letter or digit)",
    ),
    "Networks": (
        "network name",
        "use letters, digits, '-' and '_' (at most 63, starting with a letter or digit)",
    ),
}
_TYPE_NAMES = {
    "int_type": "an integer",
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "float_type": "a number",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def parse_bundle(text: str, file: str, suffix: str) -> Bundle:
    """Parse and validate one bundle document; raise InvalidBundles listing every problem in it."""
    data = _read_document(text, file, suffix)
    try:
        return Bundle.model_validate(data)
    except ValidationError as exc:
        raise InvalidBundles([_translate(file, err) for err in _without_echoes(exc.errors())]) from None


def _without_echoes(errors: list[Any]) -> list[Any]:
    """Drop "missing X" where an unknown field beside it is a misspelling of X: one mistake, one line."""
    unknown: dict[tuple[Any, ...], list[str]] = {}
    for err in errors:
        if err["type"] == "extra_forbidden":
            unknown.setdefault(tuple(err["loc"][:-1]), []).append(str(err["loc"][-1]))
    return [
        err
        for err in errors
        if not (
            err["type"] == "missing"
            and difflib.get_close_matches(str(err["loc"][-1]), unknown.get(tuple(err["loc"][:-1]), []), n=1, cutoff=0.6)
        )
    ]


def load_bundle_file(path: Path, display: str | None = None) -> StackBundle:
    """Load one bundle file as a stack named after its stem; the revision is the file's content hash."""
    file = display or str(path)
    problems: list[BundleError] = []
    name = path.stem
    if not _matches(STACK_NAME_PATTERN, name):
        problems.append(
            BundleError(
                file,
                f"invalid stack name {name!r} (the file name)",
                fix="rename the file: lowercase letters, digits and '-', at most 63 characters, e.g. "
                f"{_suggest_stack_name(name)!r}",
            )
        )
    raw = _read_bytes(path, file)
    text = _decode(raw, file)
    try:
        bundle = parse_bundle(text, file, path.suffix.lower())
    except InvalidBundles as exc:
        raise InvalidBundles(problems + exc.errors) from None
    if problems:
        raise InvalidBundles(problems)
    digest = hashlib.sha256(raw).hexdigest()
    return StackBundle(
        name=name,
        file=file,
        bundle=bundle,
        content=text,
        revision=f"dir@sha256:{digest}",
        bundle_hash=bundle_hash(bundle),
    )


def load_directory(directory: Path) -> DesiredState:
    """Every bundle file directly in `directory` is one stack; all problems are reported at once."""
    if not directory.is_dir():
        raise InvalidBundles([BundleError(str(directory), "not a directory", fix="pass the folder holding .dab files")])
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in BUNDLE_SUFFIXES)
    return _load_files(files)


def load_paths(paths: Sequence[Path]) -> DesiredState:
    """Load files and directories (each directory's own bundle files) as one desired state."""
    files: list[Path] = []
    errors: list[BundleError] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in BUNDLE_SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            errors.append(BundleError(str(p), "no such file or directory", fix="check the path"))
    try:
        state = _load_files(files)
    except InvalidBundles as exc:
        raise InvalidBundles(errors + exc.errors) from None
    if errors:
        raise InvalidBundles(errors)
    return state


def _load_files(files: Iterable[Path]) -> DesiredState:
    stacks: dict[str, StackBundle] = {}
    origin: dict[str, Path] = {}
    errors: list[BundleError] = []
    for path in files:
        if path.stem in origin:
            errors.append(
                BundleError(
                    str(path),
                    f"stack {path.stem!r} is also defined by {origin[path.stem]}",
                    fix="keep one file per stack name",
                )
            )
            continue
        origin[path.stem] = path
        try:
            stacks[path.stem] = load_bundle_file(path)
        except InvalidBundles as exc:
            errors.extend(exc.errors)
    if errors:
        raise InvalidBundles(errors)
    return DesiredState(stacks=stacks)


# --- reading ------------------------------------------------------------------------------------------


def _read_bytes(path: Path, file: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise InvalidBundles(
                [
                    BundleError(
                        file,
                        f"file is {size} bytes, over the {MAX_FILE_BYTES} byte limit",
                        fix="split the stack",
                    )
                ]
            )
        return path.read_bytes()
    except OSError as exc:
        raise InvalidBundles(
            [BundleError(file, f"cannot read: {exc.strerror}", fix="check the path and permissions")]
        ) from None


def _decode(raw: bytes, file: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InvalidBundles(
            [BundleError(file, f"byte 0x{raw[exc.start]:02x} is not UTF-8", fix="save the file as UTF-8", line=line)]
        ) from None


def _read_document(text: str, file: str, suffix: str) -> Any:
    if suffix in (".yaml", ".yml"):
        return _read_yaml(text, file)
    return _read_json(text, file)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _read_json(text: str, file: str) -> Any:
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
    except _DuplicateKey as exc:
        raise InvalidBundles([BundleError(file, f"key {exc.key!r} appears twice", fix="keep one")]) from None
    except RecursionError:
        raise InvalidBundles(
            [BundleError(file, "JSON nested too deeply", fix="a bundle is a few levels deep")]
        ) from None
    _check_depth(data, file)
    return data


class _LimitedSafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and documents whose aliases expand past a node limit."""

    def compose_document(self) -> yaml.Node | None:
        node: yaml.Node | None = super().compose_document()
        if node is not None:
            _check_yaml_size(node)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_yaml_size(root: yaml.Node) -> None:
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    depth_of: dict[int, int] = {id(root): 1}
    while stack:
        node, done = stack.pop()
        if id(node) in sizes and not done:
            continue
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if done:
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_YAML_NODES:
                raise yaml.YAMLError(f"document expands to more than {MAX_YAML_NODES} nodes (alias bomb?)")
            continue
        stack.append((node, True))
        for c in children:
            depth_of.setdefault(id(c), depth_of[id(node)] + 1)
            if depth_of[id(c)] > MAX_DEPTH:
                raise yaml.YAMLError(f"document nested more than {MAX_DEPTH} levels deep")
            if id(c) not in sizes:
                stack.append((c, False))


def _read_yaml(text: str, file: str, loader: type[_LimitedSafeLoader] | None = None) -> Any:
    """The one document in a YAML text, loaded safely (`loader`: a _LimitedSafeLoader subclass)."""
    try:
        docs = list(yaml.load_all(text, Loader=loader or _LimitedSafeLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        raise InvalidBundles(
            [
                BundleError(
                    file,
                    f"invalid YAML: {problem}",
                    fix="fix the syntax there (only plain YAML is accepted: no tags)",
                    line=mark.line + 1 if mark else None,
                    column=mark.column + 1 if mark else None,
                )
            ]
        ) from None
    except yaml.YAMLError as exc:
        raise InvalidBundles(
            [BundleError(file, f"invalid YAML: {exc}", fix="write the document out plainly")]
        ) from None
    except RecursionError:
        raise InvalidBundles(
            [BundleError(file, "YAML nested too deeply", fix="a bundle is a few levels deep")]
        ) from None
    if not docs:
        raise InvalidBundles([BundleError(file, "the file is empty", fix="write one document in it")])
    if len(docs) > 1:
        raise InvalidBundles(
            [BundleError(file, f"{len(docs)} YAML documents", fix="put exactly one document in a file")]
        )
    return docs[0]


def _check_depth(data: Any, file: str) -> None:
    todo: list[tuple[Any, int]] = [(data, 1)]
    while todo:
        item, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise InvalidBundles(
                [BundleError(file, f"nested more than {MAX_DEPTH} levels", fix="a bundle is a few levels deep")]
            )
        if isinstance(item, dict):
            todo.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            todo.extend((v, depth + 1) for v in item)


# --- validation errors -> one line each -------------------------------------------------------------------


def _field_path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _translate(file: str, err: Any) -> BundleError:
    loc: tuple[int | str, ...] = tuple(err["loc"])
    kind: str = err["type"]
    field = _field_path(loc)
    given = err.get("input")
    if kind == "extra_forbidden":
        name = str(loc[-1])
        valid = _valid_names(loc[:-1])
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
        if close:
            fix = f"did you mean {close[0]!r}?"
        else:
            nested = _nested_match(loc[:-1], name)
            fix = f"did you mean {nested!r}?" if nested else f"valid fields here: {', '.join(valid)}"
        return BundleError(file, "unknown field", field=field, fix=fix)
    if kind == "missing":
        return BundleError(file, "required field is missing", field=field, fix=f"add {loc[-1]}")
    if "[key]" in loc:
        parent = str(loc[0]) if len(loc) >= 1 else ""
        what, rule = _KEY_RULES.get(parent, ("name", "use letters, digits, '-' and '_'"))
        return BundleError(file, f"invalid {what} {loc[-2]!r}", field=_field_path(loc[:-2]), fix=rule)
    if kind in ("less_than_equal", "greater_than_equal", "less_than", "greater_than"):
        ctx = err.get("ctx", {})
        bound = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in ctx.items())
        if loc and loc[-1] in ("Port", "PublishedPort"):
            return BundleError(file, f"{given} is not a valid port", field=field, fix="use a port from 1 to 65535")
        return BundleError(file, f"{given!r} is out of range", field=field, fix=f"use a value {bound}")
    if kind in _TYPE_NAMES:
        return BundleError(
            file,
            f"expected {_TYPE_NAMES[kind]}, got {_describe(given)}",
            field=field,
            fix='quote it in YAML ("...")' if kind == "string_type" else f"write {_TYPE_NAMES[kind]}",
        )
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return BundleError(file, f"{given!r} is not allowed", field=field, fix=f"use one of {expected}")
    if kind == "string_pattern_mismatch":
        return BundleError(file, f"{given!r} has an invalid form", field=field, fix=_pattern_fix(loc))
    if kind in ("too_short", "string_too_short"):
        return BundleError(
            file,
            "is empty",
            field=field,
            fix="give at least one entry" if kind == "too_short" else "fill it in",
        )
    msg = str(err["msg"]).removeprefix("Value error, ")
    return BundleError(file, msg, field=field)


def _pattern_fix(loc: Sequence[int | str]) -> str:
    if "Networks" in loc:
        return f"a network name must match {OBJECT_NAME_PATTERN}"
    if loc and loc[-1] == "Image":
        return 'an image reference has no spaces, e.g. "nginx:1.27"'
    if loc and loc[-1] == "StopSignal":
        return 'use a signal name such as "SIGTERM"'
    return "see `dabctl schema bundle` for the expected form"


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"string {value!r}"
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


def _unwrap(annotation: Any) -> list[Any]:
    """The model classes and containers an annotation can hold."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for a in typing.get_args(annotation) for t in _unwrap(a)]
    return [annotation]


def _model_at(loc: Sequence[int | str]) -> type[BaseModel] | None:
    current: Any = Bundle
    for part in loc:
        candidates = _unwrap(current)
        nxt: Any = None
        for cand in candidates:
            origin = typing.get_origin(cand)
            if isinstance(cand, type) and issubclass(cand, BaseModel) and isinstance(part, str):
                for name, info in cand.model_fields.items():
                    if (info.alias or name) == part:
                        nxt = info.annotation
            elif origin is list and isinstance(part, int):
                nxt = typing.get_args(cand)[0]
            elif origin is dict and isinstance(part, str):
                nxt = typing.get_args(cand)[1]
        if nxt is None:
            return None
        current = nxt
    for cand in _unwrap(current):
        if isinstance(cand, type) and issubclass(cand, BaseModel):
            return cand
    return None


def _aliases(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _valid_names(loc: Sequence[int | str]) -> list[str]:
    model = _model_at(loc)
    return _aliases(model) if model else []


def _nested_match(loc: Sequence[int | str], name: str) -> str | None:
    """A field of the same (or a similar) name one or two levels down, e.g. Replicas -> Deploy.Replicas."""
    model = _model_at(loc)
    if model is None:
        return None
    paths: dict[str, str] = {}
    for name1, info in model.model_fields.items():
        for sub in _unwrap(info.annotation):
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                for alias2 in _aliases(sub):
                    paths.setdefault(alias2, f"{info.alias or name1}.{alias2}")
    close = difflib.get_close_matches(name, list(paths), n=1, cutoff=0.75)
    return paths[close[0]] if close else None


def _matches(pattern: str, text: str) -> bool:
    return re.fullmatch(pattern, text) is not None


def _suggest_stack_name(name: str) -> str:
    cleaned = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63]
    return cleaned or "my-stack"
