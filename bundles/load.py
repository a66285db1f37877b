"""Read bundle files strictly: syntax errors with line and column, field errors with path and nearest valid name."""

from __future__ import annotations

import difflib
import hashlib
import re
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from bundles.desired import DesiredState, StackBundle, bundle_hash
from bundles.documents import MAX_FILE_BYTES, decode, field_path, read_document, read_file
from bundles.errors import BundleError, InvalidBundles
from schemas.annotations import field_types
from schemas.bundle import OBJECT_NAME_PATTERN, STACK_NAME_PATTERN, Bundle
from schemas.quoting import describe, quoted

BUNDLE_SUFFIXES = (".dab", ".json", ".yaml", ".yml")

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
    data = read_document(text, file, suffix)
    try:
        return Bundle.model_validate(data)
    except ValidationError as exc:
        raise InvalidBundles([translate_error(file, err) for err in _without_echoes(exc.errors())]) from None


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
    raw = read_file(path, file)
    return stack_bundle(path.stem, file, raw, path.suffix.lower(), f"dir@sha256:{hashlib.sha256(raw).hexdigest()}")


def stack_bundle(name: str, file: str, raw: bytes, suffix: str, revision: str) -> StackBundle:
    """A file's bytes as the stack `name` at `revision`, every problem (name, size, encoding, content) reported
    together; the one way directory and git sources turn a file into a stack."""
    problems: list[BundleError] = []
    if not _matches(STACK_NAME_PATTERN, name):
        problems.append(
            BundleError(
                file,
                f"invalid stack name {quoted(name)} (the file name)",
                fix="rename the file: lowercase letters, digits and '-', at most 63 characters, e.g. "
                f"{_suggest_stack_name(name)!r}",
            )
        )
    if len(raw) > MAX_FILE_BYTES:  # a directory's reader refuses before reading; a git blob is read whole
        size = BundleError(
            file, f"file is {len(raw)} bytes, over the {MAX_FILE_BYTES} byte limit", fix="split the stack"
        )
        raise InvalidBundles([*problems, size])
    try:
        text = decode(raw, file)
        bundle = parse_bundle(text, file, suffix)
    except InvalidBundles as exc:
        raise InvalidBundles(problems + exc.errors) from None
    if problems:
        raise InvalidBundles(problems)
    return StackBundle(
        name=name, file=file, bundle=bundle, content=text, revision=revision, bundle_hash=bundle_hash(bundle)
    )


def load_directory(directory: Path) -> DesiredState:
    """Every bundle file directly in `directory` is one stack; all problems are reported at once."""
    if not directory.is_dir():
        raise InvalidBundles([BundleError(str(directory), "not a directory", fix="pass the folder holding .dab files")])
    files, errors = _bundle_files(directory)
    return _load_files(files, errors)


def load_paths(paths: Sequence[Path]) -> DesiredState:
    """Load files and directories (each directory's own bundle files) as one desired state."""
    files: list[Path] = []
    errors: list[BundleError] = []
    for p in paths:
        if p.is_dir():
            found, refused = _bundle_files(p)
            files.extend(found)
            errors.extend(refused)
        elif p.is_file():
            files.append(p)
        else:
            errors.append(BundleError(str(p), "no such file or directory", fix="check the path"))
    return _load_files(files, errors)


def _bundle_files(directory: Path) -> tuple[list[Path], list[BundleError]]:
    """The bundle files directly in `directory`, and an error for each symbolic link that is not one of them.

    A link may name another file of the directory. One that leads out of it is refused unread: the agent would read
    whatever it can read and quote it in errors. A dangling link is an error, not a missing stack: skipping it would
    prune the stack it held.
    """
    files: list[Path] = []
    errors: list[BundleError] = []
    home = directory.resolve()
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() not in BUNDLE_SUFFIXES:
            continue
        if path.is_symlink():
            try:
                target = path.resolve(strict=True)
            except (OSError, RuntimeError):  # RuntimeError: a loop of links (Python 3.11)
                errors.append(
                    BundleError(str(path), "symbolic link to nothing", fix="point it at a bundle file or remove it")
                )
                continue
            if not target.is_relative_to(home):
                errors.append(
                    BundleError(
                        str(path),
                        f"symbolic link to {target}, outside {home}: not read",
                        fix="link only to files in the same directory, or copy the file in",
                    )
                )
                continue
        if path.is_file():  # not a directory, FIFO or device (opening a FIFO would block)
            files.append(path)
    return files, errors


def _load_files(files: Iterable[Path], errors: list[BundleError]) -> DesiredState:
    """Load `files` as stacks; raise InvalidBundles with `errors` and every problem found in them."""
    stacks: dict[str, StackBundle] = {}
    origin: dict[str, Path] = {}
    errors = list(errors)
    for path in files:
        if path.stem in origin:
            errors.append(
                BundleError(
                    str(path),
                    f"stack {quoted(path.stem)} is also defined by {origin[path.stem]}",
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


# --- validation errors -> one line each -------------------------------------------------------------------


def translate_error(file: str, err: Any) -> BundleError:
    """One pydantic validation error (an item of ValidationError.errors()) as one line: what, where, how to fix."""
    loc: tuple[int | str, ...] = tuple(err["loc"])
    kind: str = err["type"]
    field = field_path(loc)
    given = err.get("input")
    if kind == "extra_forbidden":
        name = str(loc[-1])
        valid = _valid_names(loc[:-1])
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
        if close:
            fix = f"did you mean {quoted(close[0])}?"
        else:
            nested = _nested_match(loc[:-1], name)
            fix = f"did you mean {nested!r}?" if nested else f"valid fields here: {', '.join(valid)}"
        return BundleError(file, "unknown field", field=field, fix=fix)
    if kind == "missing":
        return BundleError(file, "required field is missing", field=field, fix=f"add {loc[-1]}")
    if "[key]" in loc:
        parent = str(loc[0]) if len(loc) >= 1 else ""
        what, rule = _KEY_RULES.get(parent, ("name", "use letters, digits, '-' and '_'"))
        return BundleError(file, f"invalid {what} {quoted(loc[-2])}", field=field_path(loc[:-2]), fix=rule)
    if kind in ("less_than_equal", "greater_than_equal", "less_than", "greater_than"):
        ctx = err.get("ctx", {})
        bound = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in ctx.items())
        if loc and loc[-1] in ("Port", "PublishedPort"):
            return BundleError(
                file, f"{quoted(given)} is not a valid port", field=field, fix="use a port from 1 to 65535"
            )
        return BundleError(file, f"{quoted(given)} is out of range", field=field, fix=f"use a value {bound}")
    if kind in _TYPE_NAMES:
        return BundleError(
            file,
            f"expected {_TYPE_NAMES[kind]}, got {describe(given)}",
            field=field,
            fix='quote it in YAML ("...")' if kind == "string_type" else f"write {_TYPE_NAMES[kind]}",
        )
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return BundleError(file, f"{quoted(given)} is not allowed", field=field, fix=f"use one of {expected}")
    if kind == "string_pattern_mismatch":
        return BundleError(file, f"{quoted(given)} has an invalid form", field=field, fix=_pattern_fix(loc))
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


def _model_at(loc: Sequence[int | str]) -> type[BaseModel] | None:
    current: Any = Bundle
    for part in loc:
        candidates = field_types(current)
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
    for cand in field_types(current):
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
        for sub in field_types(info.annotation):
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
