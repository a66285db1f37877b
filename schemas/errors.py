"""The root of every error dabctl raises on purpose, and what a retry can do about it.

A *retryable* error is about the world right now: an engine, a state log, a repository or an agent that does
not answer. The agent retries it with backoff; it clears by itself. A *terminal* error needs a person: an
invalid bundle, a bad setting, a refused prune. The agent reports it and waits for a change (a commit, a
restart with other settings) instead of retrying. The CLI exits 1 on either. Callers decide by type
(`isinstance(exc, DabctlError)`, then `exc.retryable`), never by the message.

The root lives here, below every other layer, so that bundles, reconcilers and agent all derive from it:

    DabctlError                 schemas.errors               root: `retryable` says which
    ├── InvalidBundles          bundles.errors               terminal   a bundle file is invalid
    ├── SourceError             bundles.errors               retryable  the repository cannot be reached or read
    │   └── PackRefused         agent.sources.packguard      terminal   an object over git_max_object_bytes, or no pack
    ├── BalancerUnavailable     reconcilers.loadbalancer     terminal   no ruleset here (tool, privilege, kernel)
    ├── ConfigError             agent.config                 terminal   the agent configuration is invalid
    ├── SourceConfigError       agent.sources.source         terminal   the source settings cannot be used
    ├── VerificationRefused     agent.sources.verify         terminal   a revision is not signed as verify requires
    ├── VerifyKeyError          agent.sources.verify         terminal   a file in verify.keys cannot be used
    ├── EngineError             agent.drivers.docker_engine  retryable  the Docker engine is unreachable or refused
    │   └── ImageUnavailable    agent.drivers.docker_engine  retryable  an image is missing and cannot be pulled
    ├── NftError                agent.drivers.nftables       terminal   nft refused a command
    ├── IpvsError               agent.drivers.ipvs           terminal   the kernel refused an IPVS change
    ├── StateLogError           agent.state.log              retryable  the state log cannot do what was asked
    │   ├── Unavailable         agent.state.log              retryable  no endpoint answers
    │   ├── Compacted           agent.state.log              retryable  watch history is gone: read afresh
    │   ├── LeaseNotFound       agent.state.log              retryable  the lease lapsed: take a new one
    │   ├── StateLocked         agent.state.log              terminal   another process holds the state
    │   ├── ReadOnly            agent.state.log              terminal   the state was opened for reading
    │   ├── PermissionDenied    agent.state.etcd             terminal   etcd auth: this node's user may not do that
    │   ├── EtcdRefused         agent.state.etcd             retryable  etcd refused a call; `refusal` says why
    │   └── MemberChangeRefused agent.state.etcdcluster      terminal   etcd refused adding/promoting/removing a member
    ├── MembershipError         agent.state.membership       terminal   cluster.json or node-id cannot be used
    ├── InvalidToken            schemas.join                 terminal   a string that is not a join token
    ├── JoinRefused             agent.api.join               terminal   a manager refused a join (or is unreachable)
    ├── ClusterSetupError       agent.node.join              terminal   cluster init / join / join-token cannot run
    ├── EtcdMemberError         agent.node.etcdmember        terminal   this node's etcd member cannot start or stop
    ├── BackupError             agent.pki.seal               terminal   a cluster backup is foreign, damaged or locked
    ├── CertificateRefused      agent.pki.ca                 terminal   a certificate or CSR the cluster does not accept
    ├── ContentMissing          agent.state.records          terminal   a record's content chunks are not all there
    ├── Held                    agent.state.holder           terminal   another process holds a lock file
    ├── PrivateFileRefused      agent.private                terminal   a state dir or secret file others could read
    ├── AgentUnreachable        agent.api.client             retryable  the agent holding the state is silent
    ├── AgentRefused            agent.api.client             terminal   the agent answered and refused the call
    ├── ControlDenied           agent.api.client             terminal   this user may not use the control socket
    ├── ControlRefused          agent.node.loop              terminal   the agent will not run a call as asked
    │   └── UnknownStack        agent.node.loop              terminal   a call names a stack the node does not know
    ├── PassNotRun              agent.node.loop              retryable  a control call's pass could not run
    ├── NotAManager             agent.node.control           terminal   a changing command on a cluster worker
    ├── NoLeader                agent.node.control           retryable  no manager leads the cluster now
    ├── EmptySourceRefused      agent.node.engine            terminal   pruning every stack needs --allow-empty
    ├── PolicyRefused           agent.node.admission         terminal   a container was refused at create/start
    ├── UntrustedPath           agent.node.hostpaths         terminal   a bind source passes an untrusted symlink
    ├── RollbackError           agent.node.rollback          terminal   no such revision to roll back to
    ├── NodeConflict            agent.state.nodes            terminal   a live node of another id holds the name
    ├── NodeNotFound            agent.state.nodes            terminal   no node (or several) match a name or id
    ├── NotJoined               agent.node.membership        terminal   this node id has no spec in the cluster
    ├── DeliveryFailed          agent.notify.sinks           retryable  a notification sink did not take an event
    │   └── DeliveryRefused     agent.notify.sinks           terminal   the sink refused it for good (4xx)
    └── UserError               agent.cli.options            terminal   a command line that cannot work
"""

from __future__ import annotations

from typing import ClassVar


class DabctlError(Exception):
    """An error dabctl raises on purpose; its message is one line saying what, where and how to fix it."""

    retryable: ClassVar[bool] = False
