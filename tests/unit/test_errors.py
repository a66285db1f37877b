"""One error root: every exception dabctl defines derives from DabctlError and says whether a retry can help
(tests/unit/test_loop_outcomes.py shows the agent's loop deciding by it)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from collections.abc import Iterator

import pytest

import agent
import bundles
import reconcilers
import schemas
from agent.api.client import AgentRefused, AgentUnreachable, ControlDenied
from agent.api.join import JoinRefused
from agent.cli.options import UserError
from agent.config import ConfigError
from agent.drivers.docker_engine import EngineError, ImageUnavailable
from agent.drivers.ipvs import IpvsError
from agent.drivers.nftables import NftError
from agent.node.engine import EmptySourceRefused
from agent.node.join import ClusterSetupError
from agent.node.loop import ControlRefused, PassNotRun, UnknownStack
from agent.node.membership import NotJoined
from agent.node.rollback import RollbackError
from agent.private import PrivateFileRefused
from agent.sources.packguard import PackRefused
from agent.sources.source import SourceConfigError
from agent.state.etcd import EtcdRefused, PermissionDenied
from agent.state.holder import Held
from agent.state.log import Compacted, LeaseNotFound, ReadOnly, StateLocked, StateLogError, Unavailable
from agent.state.membership import MembershipError
from agent.state.nodes import NodeConflict, NodeNotFound
from bundles.errors import InvalidBundles, SourceError
from reconcilers.loadbalancer import BalancerUnavailable
from schemas.errors import DabctlError
from schemas.join import InvalidToken

RETRYABLE: dict[type[DabctlError], bool] = {
    InvalidBundles: False,
    SourceError: True,
    PackRefused: False,
    BalancerUnavailable: False,
    ConfigError: False,
    SourceConfigError: False,
    EngineError: True,
    ImageUnavailable: True,
    NftError: False,
    IpvsError: False,
    StateLogError: True,
    Unavailable: True,
    Compacted: True,
    LeaseNotFound: True,
    StateLocked: False,
    ReadOnly: False,
    AgentUnreachable: True,
    EmptySourceRefused: False,
    RollbackError: False,
    UserError: False,
    Held: False,
    PrivateFileRefused: False,
    AgentRefused: False,
    ControlRefused: False,
    ControlDenied: False,
    UnknownStack: False,
    PassNotRun: True,
    PermissionDenied: False,
    EtcdRefused: True,
    MembershipError: False,
    InvalidToken: False,
    JoinRefused: False,
    ClusterSetupError: False,
    NodeConflict: False,
    NodeNotFound: False,
    NotJoined: False,
}


@pytest.mark.parametrize(("cls", "retryable"), list(RETRYABLE.items()), ids=[c.__name__ for c in RETRYABLE])
def test_each_error_derives_from_the_root_and_says_whether_to_retry(cls: type[DabctlError], retryable: bool) -> None:
    assert issubclass(cls, DabctlError)
    assert cls.retryable is retryable


def _defined_exceptions() -> Iterator[type[BaseException]]:
    for package in (schemas, bundles, reconcilers, agent):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            module = importlib.import_module(info.name)
            for _, obj in inspect.getmembers(module, inspect.isclass):
                if issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                    yield obj


def test_every_exception_defined_here_derives_from_the_root() -> None:
    """Private ones (`_DuplicateKey`, `_OverLimit`) are signals caught in their own module: they never leave it."""
    found = {c for c in _defined_exceptions() if not c.__name__.startswith("_")}
    assert len(found) >= len(RETRYABLE), "the walk missed exception classes"
    assert {c.__name__ for c in found if not issubclass(c, DabctlError)} == set()


def test_the_tree_in_the_docstring_names_every_public_error() -> None:
    import schemas.errors

    doc = schemas.errors.__doc__ or ""
    drawn = dict(re.findall(r"[├└]── (\w+)\s+\S+\s+(retryable|terminal)", doc))
    public = {c for c in _defined_exceptions() if not c.__name__.startswith("_") and c is not DabctlError}
    assert set(drawn) == {c.__name__ for c in public}
    assert {c.__name__: c.retryable for c in public} == {name: kind == "retryable" for name, kind in drawn.items()}
