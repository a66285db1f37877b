"""Compose files -> bundles: carry every key a bundle can express and name each one it cannot.

Every line in `Conversion.dropped` reads `<compose key path>: <what> (<why, and what to do instead>)`, e.g.
`services.web.build: not carried (bundles deploy prebuilt images; build and push it, then set image)`.
Problems that make a bundle impossible raise InvalidBundles, one line each, naming the Compose key.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import shlex
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic.alias_generators import to_pascal, to_snake

from bundles.documents import LimitedSafeLoader, read_yaml
from bundles.errors import BundleError, InvalidBundles
from bundles.load import translate_error
from schemas.bundle import OBJECT_NAME_PATTERN, Bundle
from schemas.quoting import describe, quoted

Loc = tuple[str | int, ...]

_NO_EQUIVALENT = "the bundle format has no equivalent"
_RESOLVE_FIRST = "resolve it first, e.g. with `docker compose config`"
_NAME_RULE = "use letters, digits, '-' and '_' (at most 63, starting with a letter or digit)"
_BUILD = "bundles deploy prebuilt images; build and push it, then set image"
_SERVICE_DROP_REASONS = {
    "build": _BUILD,
    "depends_on": "dabctl starts services independently; make each service retry what it depends on",
    "container_name": "dabctl names containers <stack>_<service>.<slot>.<id>",
    "links": "services on a shared network reach each other by service name",
    "external_links": "services on a shared network reach each other by service name",
    "env_file": "dabctl reads only the bundle; copy the variables into environment",
    "secrets": "bundles have no secrets; bind-mount the file from the host instead",
    "configs": "bundles have no configs; bind-mount the file from the host instead",
    "logging": "containers use the Docker daemon's default log driver; set it in daemon.json",
    "network_mode": "dabctl attaches every service to stack networks",
    "expose": "containers on a shared network reach each other's ports without it",
    "profiles": "a bundle deploys all its services; put optional ones in a bundle of their own",
    "extends": _RESOLVE_FIRST,
    "volumes_from": "list the shared volume under volumes of each service",
    "privileged": "bundles grant containers no extra privileges",
    "cap_add": "bundles grant containers no extra privileges",
    "security_opt": "bundles grant containers no extra privileges",
    "devices": "bundles grant containers no extra privileges",
    "develop": "Compose Watch is a development tool",
}
_TOP_DROP_REASONS = {
    "secrets": "bundles have no secrets; bind-mount the file from the host instead",
    "configs": "bundles have no configs; bind-mount the file from the host instead",
    "include": "merge the included files first, e.g. with `docker compose config`",
}
_SERVICE_NETWORK_DROP_REASONS = {
    "aliases": "other services reach it by its service name only",
    "ipv4_address": "dabctl allocates container addresses",
    "ipv6_address": "dabctl allocates container addresses",
}
_DEPLOY_DROP_REASONS = {
    "labels": "dabctl services have no service-level labels; move them to labels to put them on the containers",
    "endpoint_mode": "dabctl balances published ports itself",
    "preferences": "dabctl's scheduler takes constraints only",
}
_PASSTHROUGH = {
    "image": "Image",
    "working_dir": "WorkingDir",
    "user": "User",
    "stop_grace_period": "StopGracePeriod",
    "stop_signal": "StopSignal",
}
_UPDATE_KEYS = ("parallelism", "delay", "failure_action", "monitor", "max_failure_ratio", "order")
_RESTART = {"no": "none", "always": "any", "unless-stopped": "any", "on-failure": "on-failure"}
# Compose key -> (the deploy setting that overrides it, where it lands in the bundle)
_SWARM_EQUIVALENTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "restart": (("deploy", "restart_policy"), ("Deploy", "RestartPolicy", "Condition")),
    "scale": (("deploy", "replicas"), ("Deploy", "Replicas")),
    "cpus": (("deploy", "resources", "limits", "cpus"), ("Deploy", "Resources", "Limits", "Cpus")),
    "mem_limit": (("deploy", "resources", "limits", "memory"), ("Deploy", "Resources", "Limits", "Memory")),
    "mem_reservation": (
        ("deploy", "resources", "reservations", "memory"),
        ("Deploy", "Resources", "Reservations", "Memory"),
    ),
}
_PULL = {"always": "always", "never": "never", "missing": "if-not-present", "if_not_present": "if-not-present"}
_VOLUME_OPTION_REASONS = {
    "nocopy": "Docker copies the image's files into a new volume",
    "z": "bundles set no SELinux labels",
    "Z": "bundles set no SELinux labels",
}
# `$$` is Compose's escape for a literal `$`; the other forms are interpolation, which needs the shell's environment.
_DOLLAR = re.compile(r"\$\$|\$\{[^}]*\}?|\$[A-Za-z_][A-Za-z0-9_]*")
_PORT_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_YAML11_SCALARS = {f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float", "timestamp")}


class _ComposeLoader(LimitedSafeLoader):
    """The bundle loader's limits, but plain scalars resolved as Compose does (YAML 1.2): `22:22` and `no` stay text."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML11_SCALARS]
        for first, resolvers in LimitedSafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # Compose files share settings with `<<: *anchor`; keys merged in may be overridden, written ones not repeated.
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeConstructor refuses it ("found unhashable key")
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {quoted(key)} appears twice", key_node.start_mark
                )
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(self, node, deep=deep)


_ComposeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_ComposeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"), list("-+0123456789")
)
_ComposeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


@dataclass(frozen=True)
class Conversion:
    """A validated bundle and one line for every Compose key it does not carry as written."""

    bundle: Bundle
    dropped: list[str]


def convert_compose(text: str, file: str) -> Conversion:
    """Convert a Compose file's text to a bundle; raise InvalidBundles (file/field/fix lines) when it cannot."""
    # The bundle loader's reader with Compose's plain-value rules (YAML 1.1 would read `- 22:22` as 1342).
    return _Converter(file).convert(read_yaml(text, file, _ComposeLoader))


def _key(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith((prefix + ".", prefix + "["))


def _port_range(text: str) -> list[int] | None:
    m = _PORT_RANGE.match(text.strip())
    if not m:
        return None
    first, last = int(m.group(1)), int(m.group(2) or m.group(1))
    return list(range(first, last + 1)) if first <= last else None


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _scalar_text(value: Any) -> str:
    """A Compose scalar as the string Compose passes on: true -> "true", 1 -> "1"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _cpus_text(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    # The schema wants a decimal string; str(1e-05) would not be one.
    return f"{value:.9f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)


def _memory_text(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


@dataclass
class _Service:
    """One service being converted: its Compose mapping, the bundle fields so far and where they sit."""

    name: str
    path: str
    raw: dict[str, Any]
    out: dict[str, Any] = field(default_factory=dict)

    @property
    def loc(self) -> Loc:
        return ("Services", self.name)

    def sets(self, *keys: str) -> bool:
        """Whether the Compose service sets the nested key, e.g. sets("deploy", "replicas")."""
        node: Any = self.raw
        for k in keys:
            if not isinstance(node, dict) or node.get(k) is None:
                return False
            node = node[k]
        return True


class _Converter:
    """One conversion: its errors, its dropped lines, and the Compose key each bundle field came from."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.errors: list[BundleError] = []
        self.dropped: list[str] = []
        self.skipped: list[str] = []
        self.interpolated: dict[str, list[str]] = {}
        # bundle location -> (Compose path, whether deeper bundle names mirror Compose's snake_case names)
        self.origins: dict[Loc, tuple[str, bool]] = {}
        self.network_names: dict[str, str] = {}
        self.volume_names: dict[str, str] = {}

    # --- bookkeeping ----------------------------------------------------------------------------------

    def error(self, path: str, message: str, fix: str) -> None:
        self.errors.append(BundleError(self.file, message, field=path, fix=fix))

    def drop(self, path: str, why: str, what: str = "") -> None:
        """Report `what` at path (the whole key when empty) as not carried."""
        self.dropped.append(f"{path}: {what + ' ' if what else ''}not carried ({why})")
        if not what:
            self.skipped.append(path)

    def note(self, path: str, text: str) -> None:
        self.dropped.append(f"{path}: {text}")

    def ignore(self, path: str) -> None:
        self.skipped.append(path)

    def put(self, svc: _Service, keys: Loc, value: Any, path: str, mirrors: bool = False) -> None:
        node = svc.out
        for k in keys[:-1]:
            node = node.setdefault(str(k), {})
        node[str(keys[-1])] = value
        self.origins[svc.loc + keys] = (path, mirrors)

    def entries(self, value: Any, path: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """(name, path, mapping) of each named entry; `x-` extension keys are skipped, as Compose defines."""
        for name, raw in (self.mapping(value, path) or {}).items():
            p = _key(path, name)
            if name.startswith("x-"):
                self.ignore(p)
                continue
            spec = self.mapping(raw, p)
            if spec is not None:
                yield name, p, spec

    def mapping(self, value: Any, path: str) -> dict[str, Any] | None:
        """The value as a mapping with string keys (null is empty); None after reporting anything else."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.error(path, f"expected a mapping, got {describe(value)}", "write a mapping")
            return None
        for k in value:
            if not isinstance(k, str):
                self.error(_key(path, k), f"key {k!r} is not a string", 'quote it in YAML ("...")')
                return None
        return value

    def sequence(self, value: Any, path: str) -> list[Any] | None:
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(path, f"expected a list, got {describe(value)}", "write a list")
            return None
        return value

    def text(self, value: Any, path: str) -> str | None:
        if isinstance(value, str):
            return value
        self.error(path, f"expected a string, got {describe(value)}", 'quote it in YAML ("...")')
        return None

    def strings(self, value: Any, path: str) -> list[str] | None:
        items = self.sequence(value, path)
        if items is None:
            return None
        texts = [self.text(v, f"{path}[{i}]") for i, v in enumerate(items)]
        out = [t for t in texts if t is not None]
        return out if len(out) == len(texts) else None

    def name(self, name: str, path: str, what: str) -> bool:
        if re.fullmatch(OBJECT_NAME_PATTERN, name):
            return True
        suggestion = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-_")[:63] or "my-name"
        self.error(path, f"invalid {what} {name!r} for a bundle", f"rename it: {_NAME_RULE}, e.g. {suggestion!r}")
        return False

    # --- the whole file ----------------------------------------------------------------------------------

    def convert(self, raw: Any) -> Conversion:
        top = self.mapping(raw, "")
        if top is None:
            raise InvalidBundles(self.errors)
        top = self.unescape(top, "")
        # Definitions first: services refer to networks and volumes by the names these give them.
        networks = self.top_networks(top.get("networks"), "networks")
        volumes = self.top_volumes(top.get("volumes"), "volumes")
        services: dict[str, Any] = {}
        for key, value in top.items():
            if key == "services":
                services = self.services(value, key)
            elif key.startswith("x-") or key in ("version", "name"):
                # x-* is Compose's extension contract; version is obsolete; the stack is named after the bundle file.
                self.ignore(key)
            elif key in ("networks", "volumes"):
                continue
            elif value not in (None, {}, []):
                self.drop(key, _TOP_DROP_REASONS.get(key, _NO_EQUIVALENT))
        if "services" not in top and not self.errors:
            self.error("services", "no services", "add at least one service under services:")
        if self.errors:
            raise InvalidBundles(self.errors)
        doc: dict[str, Any] = {"Version": "0.1", "Services": services}
        if networks:
            doc["Networks"] = networks
        if volumes:
            doc["Volumes"] = volumes
        try:
            bundle = Bundle.model_validate(doc)
        except ValidationError as exc:
            raise InvalidBundles([self.translate(err) for err in exc.errors()]) from None
        for path, found in self.interpolated.items():
            if not any(_under(path, p) for p in self.skipped):
                tokens = ", ".join(found)
                self.note(path, f"contains {tokens} interpolation, which dabctl does not perform ({_RESOLVE_FIRST})")
        return Conversion(bundle=bundle, dropped=self.dropped)

    def unescape(self, value: Any, path: str) -> Any:
        """Compose's `$$` -> `$` in every string; strings that interpolate are kept as written and remembered."""
        if isinstance(value, dict):
            return {k: self.unescape(v, _key(path, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.unescape(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, str) and "$" in value:
            found = [m.group(0) for m in _DOLLAR.finditer(value) if m.group(0) != "$$"]
            if found:
                self.interpolated[path] = found
                return value
            return value.replace("$$", "$")
        return value

    def translate(self, err: Any) -> BundleError:
        """A pydantic error on the converted bundle, pointed back at the Compose key it came from."""
        problem = translate_error(self.file, err)
        loc: Loc = tuple(p for p in err["loc"] if p != "[key]")
        for n in range(len(loc), 0, -1):
            if loc[:n] in self.origins:
                path, mirrors = self.origins[loc[:n]]
                if mirrors:
                    path += "".join(f"[{p}]" if isinstance(p, int) else f".{to_snake(p)}" for p in loc[n:])
                fix = f"{_RESOLVE_FIRST} ({problem.fix})" if path in self.interpolated and problem.fix else problem.fix
                return dataclasses.replace(problem, field=path, fix=fix)
        return problem

    # --- top-level definitions ----------------------------------------------------------------------------

    def top_networks(self, value: Any, path: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, p, spec in self.entries(value, path):
            real, external = self.external_name(spec, name, p)
            net: dict[str, Any] = {}
            for key, v in spec.items():
                kp = _key(p, key)
                if key == "driver" and v == "overlay":
                    why = "overlay needs Swarm mode; dabctl connects the nodes' bridge networks itself"
                    self.drop(kp, why, "driver overlay")
                elif key in ("driver", "internal"):
                    net[to_pascal(key)] = v
                elif key == "labels" and v:
                    net["Labels"] = self.labels(v, kp)
                elif key == "external":
                    if external:
                        net["External"] = True
                elif key == "name":
                    if not external:
                        self.drop(kp, "dabctl names stack networks <stack>_<network>")
                elif key.startswith("x-"):
                    self.ignore(kp)
                else:
                    self.drop(kp, _NO_EQUIVALENT)
            if self.name(real, p, "network name"):
                self.network_names[name] = real
                out[real] = net
                self.origins[("Networks", real)] = (p, True)
        return out

    def external_name(self, spec: dict[str, Any], name: str, path: str) -> tuple[str, bool]:
        """The engine's name of a network and whether it is external (`external: {name: x}` is the old spelling)."""
        ext = spec.get("external")
        if ext is None or ext is False:
            return name, False
        if ext is True:
            real, where = spec.get("name", name), _key(path, "name")
        elif isinstance(ext, dict):
            real, where = ext.get("name", spec.get("name", name)), _key(path, "external.name")
        else:
            self.error(_key(path, "external"), f"expected true or false, got {describe(ext)}", "write true or false")
            return name, False
        return (real, True) if self.text(real, where) is not None else (name, True)

    def top_volumes(self, value: Any, path: str) -> dict[str, Any]:
        """Compose's volumes: an external one becomes `Volumes: {name: {External: true}}` under its engine name;
        the others are the stack's (`<stack>_<volume>` on the engine)."""
        out: dict[str, Any] = {}
        for name, p, spec in self.entries(value, path):
            real, external = self.external_name(spec, name, p)
            if external:
                self.volume_names[name] = real
                out[real] = {"External": True}
                self.origins[("Volumes", real)] = (p, True)
            for key in spec:
                kp = _key(p, key)
                if key == "external":
                    continue
                if key == "name":
                    if not external:
                        self.drop(
                            kp,
                            "dabctl names stack volumes <stack>_<volume>; for a volume outside the stack, "
                            "add external: true",
                        )
                elif key in ("driver", "driver_opts"):
                    self.drop(kp, "Docker creates named volumes with the local driver; create it on each node first")
                elif key == "labels":
                    self.drop(kp, "Docker creates named volumes without labels")
                elif key.startswith("x-"):
                    self.ignore(kp)
                else:
                    self.drop(kp, _NO_EQUIVALENT)
        return out

    # --- services ---------------------------------------------------------------------------------------

    def services(self, value: Any, path: str) -> dict[str, Any]:
        raw = self.mapping(value, path)
        out: dict[str, Any] = {}
        if raw is not None and not raw:
            self.error(path, "no services", "add at least one service under services:")
        for name, p, svc in self.entries(raw, path):
            if self.name(name, p, "service name"):
                out[name] = self.service(_Service(name, p, svc))
        return out

    def service(self, svc: _Service) -> dict[str, Any]:
        self.origins[svc.loc] = (svc.path, False)
        if svc.raw.get("image") is None and "build" in svc.raw:
            self.error(svc.path, "has build but no image", f"add image: ({_BUILD})")
        elif svc.raw.get("image") is None:
            self.error(svc.path, "has no image", "add image: the image to run, e.g. image: nginx:1.27")
        handlers: dict[str, Callable[[_Service, Any, str], None]] = {
            # Compose's entrypoint/command are the engine's Entrypoint/Cmd: DAB's Command/Args.
            "entrypoint": functools.partial(self.argv_field, "Command"),
            "command": functools.partial(self.argv_field, "Args"),
            "environment": self.environment,
            "labels": self.service_labels,
            "ports": self.ports,
            "networks": self.service_networks,
            "volumes": self.volumes,
            "tmpfs": self.tmpfs,
            "healthcheck": self.healthcheck,
            "pull_policy": self.pull_policy,
            "deploy": self.deploy,
        }
        for key, value in svc.raw.items():
            p = _key(svc.path, key)
            if key.startswith("x-"):
                self.ignore(p)
            elif value is None:
                continue
            elif key in _PASSTHROUGH:
                self.put(svc, (_PASSTHROUGH[key],), value, p)
            elif key in handlers:
                handlers[key](svc, value, p)
            elif key in _SWARM_EQUIVALENTS:
                self.swarm_equivalent(svc, key, value, p)
            else:
                self.drop(p, _SERVICE_DROP_REASONS.get(key, _NO_EQUIVALENT))
        return svc.out

    def argv_field(self, field: str, svc: _Service, value: Any, path: str) -> None:
        argv = self.argv(value, path)
        if argv is not None:
            self.put(svc, (field,), argv, path)

    def service_labels(self, svc: _Service, value: Any, path: str) -> None:
        labels = self.labels(value, path)
        if labels:
            self.put(svc, ("Labels",), labels, path)

    def argv(self, value: Any, path: str) -> list[str] | None:
        if isinstance(value, str):
            try:
                return shlex.split(value)
            except ValueError as exc:
                self.error(path, f"cannot split {value!r} into words: {exc}", "close the quote, or write a list")
                return None
        return self.strings(value, path)

    def environment(self, svc: _Service, value: Any, path: str) -> None:
        env: list[str] = []
        if isinstance(value, dict):
            for name, v in value.items():
                p = _key(path, name)
                if v is None:
                    self.bare_variable(str(name), p)
                    env.append(str(name))
                elif isinstance(v, str | int | float | bool):
                    env.append(f"{name}={_scalar_text(v)}")
                else:
                    self.error(p, f"expected a string, got {describe(v)}", "write a string, number or true/false")
                    continue
                self.origins[(*svc.loc, "Env", len(env) - 1)] = (p, False)
        else:
            for i, entry in enumerate(self.strings(value, path) or []):
                if "=" not in entry:
                    self.bare_variable(entry, f"{path}[{i}]")
                self.origins[(*svc.loc, "Env", i)] = (f"{path}[{i}]", False)
                env.append(entry)
        if env:
            self.put(svc, ("Env",), env, path)

    def bare_variable(self, name: str, path: str) -> None:
        why = f"Compose takes {name} from the environment it runs in; set it here, or the container gets none"
        self.note(path, f"value not carried ({why})")

    def labels(self, value: Any, path: str) -> dict[str, str]:
        out: dict[str, str] = {}
        if isinstance(value, dict):
            for k, v in value.items():
                if v is None or isinstance(v, str | int | float | bool):
                    out[str(k)] = "" if v is None else _scalar_text(v)
                else:
                    self.error(_key(path, k), f"expected a string, got {describe(v)}", "write a string")
        else:
            for entry in self.strings(value, path) or []:
                k, _, v = entry.partition("=")
                out[k] = v
        return out

    def ports(self, svc: _Service, value: Any, path: str) -> None:
        ports: list[dict[str, Any]] = []
        for i, item in enumerate(self.sequence(value, path) or []):
            p = f"{path}[{i}]"
            if isinstance(item, dict):
                entries = self.port_long(item, p)
            elif isinstance(item, str | int) and not isinstance(item, bool):
                entries = self.port_short(str(item), p)
            else:
                self.error(p, f"expected a port, got {describe(item)}", 'write "8080:80" or a mapping with target')
                continue
            for entry in entries:
                self.origins[(*svc.loc, "Ports", len(ports))] = (p, False)
                ports.append(entry)
        if ports:
            self.put(svc, ("Ports",), ports, path)

    def port_short(self, spec: str, path: str) -> list[dict[str, Any]]:
        text, _, protocol = spec.strip().partition("/")
        if text.startswith("["):
            host_ip, sep, rest = text[1:].partition("]:")
            published, _, target = rest.rpartition(":")
            if not sep:
                self.error(path, f"invalid port {spec!r}", 'write "[::1]:8080:80"')
                return []
        else:
            parts = text.rsplit(":", 2)
            host_ip = parts[0] if len(parts) == 3 else ""
            published = parts[-2] if len(parts) >= 2 else ""
            target = parts[-1]
        return self.port_entries(
            path, spec=spec, target=target, published=published, protocol=protocol or "tcp", host_ip=host_ip
        )

    def port_long(self, spec: dict[str, Any], path: str) -> list[dict[str, Any]]:
        for key, v in spec.items():
            kp = _key(path, key)
            if key == "mode" and v == "host":
                self.drop(kp, "dabctl publishes ports on every node through its routing mesh", "mode host")
            elif key.startswith("x-"):
                self.ignore(kp)
            elif key not in ("target", "published", "protocol", "host_ip", "mode"):
                self.drop(kp, _NO_EQUIVALENT)
        target, published, protocol = spec.get("target"), spec.get("published"), spec.get("protocol", "tcp")
        if target is None:
            self.error(path, "port has no target", "add target: the port the container listens on")
            return []
        if not isinstance(protocol, str):
            self.error(_key(path, "protocol"), f"expected tcp or udp, got {describe(protocol)}", "write tcp or udp")
            return []
        host_ip = spec.get("host_ip") or ""
        published_text = "" if published is None else str(published)
        return self.port_entries(
            path,
            spec=repr(spec),
            target=str(target),
            published=published_text,
            protocol=protocol,
            host_ip=str(host_ip),
        )

    def port_entries(
        self, path: str, *, spec: str, target: str, published: str, protocol: str, host_ip: str
    ) -> list[dict[str, Any]]:
        targets = _port_range(target)
        publish = _port_range(published) if published else []
        if targets is None or publish is None:
            self.error(path, f"invalid port {spec}", 'write "80", "8080:80", "8080-8081:80-81" or "80/udp"')
            return []
        if host_ip and host_ip not in ("0.0.0.0", "::"):
            self.note(
                path,
                f"host IP {host_ip} not carried (the port is published on every address of every node; "
                "to keep it private, remove the published port and reach it over a stack network)",
            )
        if publish and len(publish) != len(targets):
            self.error(
                path,
                f"published ports {published} do not pair with container ports {target}",
                'give one published port per container port, e.g. "8080-8081:80-81"',
            )
            return []
        out: list[dict[str, Any]] = []
        for n, port in enumerate(targets):
            entry: dict[str, Any] = {"Protocol": protocol, "Port": port}
            if publish:
                entry["PublishedPort"] = publish[n]
            out.append(entry)
        return out

    def service_networks(self, svc: _Service, value: Any, path: str) -> None:
        names: list[tuple[str, str]] = []
        if isinstance(value, dict):
            for name, cfg in value.items():
                p = _key(path, name)
                for key in self.mapping(cfg, p) or {}:
                    if key.startswith("x-"):
                        self.ignore(_key(p, key))
                    else:
                        self.drop(_key(p, key), _SERVICE_NETWORK_DROP_REASONS.get(key, _NO_EQUIVALENT))
                names.append((name, p))
        else:
            names = [(n, f"{path}[{i}]") for i, n in enumerate(self.strings(value, path) or [])]
        out: list[str] = []
        for name, p in names:
            real = self.network_names.get(name, name)
            if self.name(real, p, "network name"):
                self.origins[(*svc.loc, "Networks", len(out))] = (p, False)
                out.append(real)
        if out:
            self.put(svc, ("Networks",), out, path)

    def volumes(self, svc: _Service, value: Any, path: str) -> None:
        for i, item in enumerate(self.sequence(value, path) or []):
            p = f"{path}[{i}]"
            if isinstance(item, str):
                mount = self.volume_short(item, p)
            elif isinstance(item, dict):
                mount = self.volume_long(item, p)
            else:
                self.error(p, f"expected a volume, got {describe(item)}", 'write "data:/data" or a mapping with type')
                continue
            if mount is not None:
                self.mount(svc, mount, p)

    def mount(self, svc: _Service, mount: dict[str, Any], path: str) -> None:
        mounts = svc.out.setdefault("Mounts", [])
        self.origins[(*svc.loc, "Mounts", len(mounts))] = (path, False)
        mounts.append(mount)

    def volume_source(self, source: str, path: str) -> dict[str, Any] | None:
        """Mount fields for a source: an absolute host path binds, a name is a volume, a relative path is lost."""
        if source.startswith("/"):
            return {"Type": "bind", "Source": source}
        if "$" in source:
            self.drop(path, f"host path {source} needs interpolation, which dabctl does not perform; {_RESOLVE_FIRST}")
            return None
        if source.startswith((".", "~")) or "/" in source:
            self.drop(
                path,
                f"host path {source} is relative to where Compose runs, which dabctl cannot resolve on each node; "
                "use an absolute host path",
            )
            return None
        return {"Type": "volume", "Source": self.volume_names.get(source, source)}

    def volume_short(self, spec: str, path: str) -> dict[str, Any] | None:
        parts = spec.split(":")
        if len(parts) == 1:
            source, target, mode = "", parts[0], ""
        elif len(parts) == 2 and not parts[1].startswith("/"):
            # "/data:ro" is an anonymous volume with a mode, not a source and a target.
            source, target, mode = "", parts[0], parts[1]
        elif len(parts) in (2, 3):
            source, target, mode = parts[0], parts[1], parts[2] if len(parts) == 3 else ""
        else:
            source, target, mode = "", "", ""
        if not target:
            self.error(path, f"invalid volume {spec!r}", 'write "name:/path", "/host/path:/path" or "name:/path:ro"')
            return None
        mount: dict[str, Any] = {"Type": "volume"}
        if source:
            found = self.volume_source(source, path)
            if found is None:
                return None
            mount = found
        mount["Target"] = target
        for option in mode.split(",") if mode else []:
            if option == "ro":
                mount["ReadOnly"] = True
            elif option not in ("rw", ""):
                why = _VOLUME_OPTION_REASONS.get(option, "the bundle's mount has no options besides read-only")
                self.drop(path, why, f"option {option}")
        return mount

    def volume_long(self, spec: dict[str, Any], path: str) -> dict[str, Any] | None:
        kind = spec.get("type")
        if kind not in ("volume", "bind", "tmpfs"):
            if kind is None:
                self.error(path, "volume has no type", "add type: volume, bind or tmpfs")
            else:
                self.drop(path, "bundles mount volumes, binds and tmpfs only", f"type {kind}")
            return None
        mount: dict[str, Any] = {"Type": kind}
        for key, v in spec.items():
            kp = _key(path, key)
            if key == "source" and v is not None:
                source = self.text(v, kp)
                if source is None:
                    return None
                found = self.volume_source(source, path)
                if found is None:
                    return None
                if found["Type"] != kind:
                    # The type says what the user meant; the source form only disambiguates the short syntax.
                    found = {"Type": kind, "Source": found["Source"] if kind == "volume" else source}
                mount.update(found)
            elif key in ("target", "read_only"):
                mount[to_pascal(key)] = v
            elif key.startswith("x-"):
                self.ignore(kp)
            elif key != "type":
                self.drop(kp, "the bundle's mount has no options besides read-only")
        return mount

    def tmpfs(self, svc: _Service, value: Any, path: str) -> None:
        items = [value] if isinstance(value, str) else self.strings(value, path) or []
        for i, item in enumerate(items):
            p = path if isinstance(value, str) else f"{path}[{i}]"
            target, _, options = item.partition(":")
            if options:
                self.drop(p, "the bundle's tmpfs mount has no options", f"options {options}")
            self.mount(svc, {"Type": "tmpfs", "Target": target}, p)

    def healthcheck(self, svc: _Service, value: Any, path: str) -> None:
        spec = self.mapping(value, path)
        if spec is None:
            return
        disabled = spec.get("disable") is True
        out: dict[str, Any] = {}
        for key, v in spec.items():
            kp = _key(path, key)
            if key == "disable" and not isinstance(v, bool):
                self.error(kp, f"expected true or false, got {describe(v)}", "write true or false")
            elif key.startswith("x-") or key == "disable":
                self.ignore(kp)
            elif disabled:
                self.drop(kp, "the healthcheck is disabled")
            elif key == "test":
                test = [v] if isinstance(v, str) else self.strings(v, kp)
                if test is not None:
                    # A string test runs in a shell, exactly as Compose's does.
                    out["Test"] = ["CMD-SHELL", v] if isinstance(v, str) else test
            elif key in ("interval", "timeout", "start_period", "retries"):
                out[to_pascal(key)] = v
            else:
                self.drop(kp, _NO_EQUIVALENT)
        if disabled:
            out = {"Test": ["NONE"]}
        elif "Test" not in out:
            if out:
                self.drop(path, "it sets no test, and a bundle's healthcheck replaces the image's whole; add test")
            return
        self.put(svc, ("Healthcheck",), out, path, mirrors=True)

    def pull_policy(self, svc: _Service, value: Any, path: str) -> None:
        if isinstance(value, str) and value in _PULL:
            self.put(svc, ("PullPolicy",), _PULL[value], path)
        elif value == "build":
            self.drop(path, f"{_BUILD}; dabctl pulls it when missing")
        elif isinstance(value, str) and (value in ("daily", "weekly") or value.startswith("every_")):
            self.drop(path, "dabctl pulls only when it creates a container; use always to pull every time")
        else:
            self.error(path, f"{value!r} is not a pull policy", "use always, never, missing or if_not_present")

    def deploy(self, svc: _Service, value: Any, path: str) -> None:
        spec = self.mapping(value, path)
        if spec is None:
            return
        self.origins[(*svc.loc, "Deploy")] = (path, True)
        deploy: dict[str, Any] = {}
        for key, v in spec.items():
            kp = _key(path, key)
            if key in ("mode", "replicas"):
                deploy[to_pascal(key)] = v
            elif key in ("update_config", "rollback_config"):
                deploy[to_pascal(key)] = self.carry(v, kp, _UPDATE_KEYS)
            elif key == "restart_policy":
                deploy["RestartPolicy"] = self.carry(v, kp, ("condition", "delay", "max_attempts", "window"))
            elif key == "placement":
                deploy["Placement"] = self.carry(v, kp, ("constraints", "max_replicas_per_node"))
            elif key == "resources":
                deploy["Resources"] = self.resources(v, kp)
            elif key.startswith("x-"):
                self.ignore(kp)
            else:
                self.drop(kp, _DEPLOY_DROP_REASONS.get(key, _NO_EQUIVALENT))
        # restart, scale, cpus and mem_* may already have filled parts of Deploy that deploy leaves unset.
        _merge(svc.out.setdefault("Deploy", {}), deploy)

    def carry(self, value: Any, path: str, keys: tuple[str, ...]) -> dict[str, Any]:
        """The listed keys under their bundle names, values as written; the rest reported."""
        out: dict[str, Any] = {}
        for key, v in (self.mapping(value, path) or {}).items():
            kp = _key(path, key)
            if key in keys:
                out[to_pascal(key)] = v
            elif key.startswith("x-"):
                self.ignore(kp)
            else:
                self.drop(kp, _DEPLOY_DROP_REASONS.get(key, _NO_EQUIVALENT))
        return out

    def resources(self, value: Any, path: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, v in (self.mapping(value, path) or {}).items():
            kp = _key(path, key)
            if key in ("limits", "reservations"):
                spec = self.carry(v, kp, ("cpus", "memory"))
                if "Cpus" in spec:
                    spec["Cpus"] = _cpus_text(spec["Cpus"])
                if "Memory" in spec:
                    spec["Memory"] = _memory_text(spec["Memory"])
                out[to_pascal(key)] = spec
            elif key.startswith("x-"):
                self.ignore(kp)
            else:
                self.drop(kp, _NO_EQUIVALENT)
        return out

    def swarm_equivalent(self, svc: _Service, key: str, value: Any, path: str) -> None:
        """Compose's single-host spellings of deploy settings; deploy wins when both are set, as in Swarm."""
        compose_keys, loc = _SWARM_EQUIVALENTS[key]
        if svc.sets(*compose_keys):
            self.drop(path, f"{'.'.join(compose_keys)} is set and takes precedence")
        elif key == "restart":
            self.restart(svc, value, path)
        elif key == "cpus":
            self.put(svc, loc, _cpus_text(value), path)
        elif key == "scale":
            self.put(svc, loc, value, path)
        else:
            self.put(svc, loc, _memory_text(value), path)

    def restart(self, svc: _Service, value: Any, path: str) -> None:
        policy, _, attempts = value.partition(":") if isinstance(value, str) else ("", "", "")
        if policy not in _RESTART or (attempts and (policy != "on-failure" or not attempts.isdigit())):
            self.error(path, f"{value!r} is not a restart policy", 'use "no", always, on-failure[:N] or unless-stopped')
            return
        self.put(svc, ("Deploy", "RestartPolicy", "Condition"), _RESTART[policy], path)
        if attempts:
            self.put(svc, ("Deploy", "RestartPolicy", "MaxAttempts"), int(attempts), path)
