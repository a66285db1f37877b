"""`dabctl cluster init | join | join-token | leave`: make a cluster, join one, print or rotate its join tokens,
leave it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from agent.cli.options import UserError, config_option, load, seconds
from agent.node.join import InitOptions, init_cluster, join_cluster, join_token, leave_cluster
from agent.private import read_secret_file
from agent.state.backends import open_log
from schemas.config import ClusterMembership


@click.group()
def cluster() -> None:
    """Make a cluster of nodes, join one, and manage its join tokens.

    A cluster shares one etcd: without --etcd, `cluster init` runs it on the first manager (an etcd member with
    TLS, under <state_dir>/etcd/) and every manager that joins adds its own member (3 managers: 3 voting members).
    `cluster init` on the first node (a manager) turns etcd's authentication on for the cluster's prefix and
    prints the join commands; `cluster join` on each other node admits it (as a worker
    or a manager, by its token) and gives it an etcd user that may write only its own keys. Restart the agent
    afterwards: it then runs as a cluster node.

    `cluster init` also makes the cluster's certificate authority; every node that joins gets a certificate
    naming its id and role (its key is made on the node and never leaves it), and the cluster listener (port
    9421) serves mutual TLS with it. A join token pins the CA's digest: a joining node refuses a cluster whose CA
    does not match it, before it sends anything.
    """


def _state_dir_option(f: Any) -> Any:
    return click.option("--state-dir", default=None, help="State directory [default: /var/lib/dabctl].")(f)


def _print_joins(member: ClusterMembership, worker: str | None, manager: str | None) -> None:
    address = member.managers[0] if member.managers else "MANAGER:9421"
    if worker:
        click.echo("To add a worker to this cluster, run on it:\n")
        click.echo(f"    dabctl cluster join --token {worker} {address}\n")
    if manager:
        click.echo("To add a manager to this cluster, run on it:\n")
        click.echo(f"    dabctl cluster join --token {manager} {address}\n")


@cluster.command()
@config_option
@_state_dir_option
@click.option("--node-name", default=None, help="This node's name [default: the host name].")
@click.option(
    "--etcd",
    "etcd",
    default=None,
    help="An existing etcd for the cluster: etcd://host:2379[,host:2379] [default: state if etcd://, else this "
    "node runs the cluster's etcd member].",
)
@click.option("--etcd-prefix", default=None, help="Key prefix of the cluster in etcd [default: etcd_prefix, /dabctl].")
@click.option("--lease-ttl", type=click.IntRange(2, 300), default=None, help="Seconds a silent node stays up.")
@click.option("--advertise-address", default=None, help="Address other nodes reach this one at [default: route].")
@click.option(
    "--etcd-root-password-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="etcd's root password (0600): needed when etcd already has auth on; else made and kept by managers.",
)
@click.option(
    "--from-state",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Move this single-node install's state (DIR/state.db) into the cluster: no container is recreated.",
)
@click.option(
    "--cert-expiry",
    "certificate_days",
    type=click.IntRange(1, 3650),
    default=None,
    help="Days a node certificate issued at join is valid [default: 90]; renewed at 2/3 of its life.",
)
def init(config_path: Path | None, **opts: Any) -> None:
    """Make a cluster with this node as its first manager.

    Writes the cluster record (its id and the join tokens' digests) and this node's record (a manager) under the
    etcd prefix, turns etcd's authentication on (creating its root user unless --etcd-root-password-file names
    one), makes the cluster CA (ECDSA P-256, 20 years) and this node's key and certificate under
    <state_dir>/pki/ (keys 0600, never in the state log), writes <state_dir>/cluster.json and
    cluster-secrets.json (0600), and prints the join commands (their tokens pin the CA's digest).

    Without --etcd (and no `state: etcd://...` in the config) this node runs the cluster's etcd: etcd-server's
    /usr/bin/etcd with its data under <state_dir>/etcd/, client port 2379 and peer port 2380 on the advertise
    address, TLS with client certificates on both from this node's certificate of the cluster CA
    (<state_dir>/pki/; every node's agent uses its own certificate as its etcd client certificate). It runs in
    its own process group: stopping or restarting the agent leaves it running; the agent re-adopts it at start.
    `dabctl cluster leave` stops it.

    With --from-state DIR (stop the agent first; containers keep running) the single-node state moves into
    etcd — owner id, stacks, history, assignments, ports, tasks, rollouts, pins — so that the agent, restarted as
    a cluster node, adopts every container. DIR/state.db stays as it was, unused.
    """
    from_state = opts.pop("from_state")
    cfg = load(config_path, state_dir=opts["state_dir"], node_name=opts["node_name"], etcd_prefix=opts["etcd_prefix"])
    state = opts["etcd"] or (cfg.state if cfg.state.startswith("etcd://") else None)
    if state is not None and not state.startswith("etcd://"):
        raise UserError(f"--etcd {state}: expected etcd://host:2379[,host:2379]")
    password = None
    if opts["etcd_root_password_file"]:
        password = read_secret_file(opts["etcd_root_password_file"], "--etcd-root-password-file")
    result = init_cluster(
        cfg,
        InitOptions(
            state=state,
            prefix=cfg.etcd_prefix,
            advertise_address=opts["advertise_address"],
            lease_ttl=opts["lease_ttl"],
            root_password=password,
            from_state=from_state,
            certificate_days=opts["certificate_days"],
        ),
    )
    member = result.membership
    click.echo(f"Cluster {member.cluster_id} created; this node ({member.node_id}) is its first manager.")
    if from_state is not None:
        moved = ", ".join(f"{n} {kind}" for kind, n in sorted(result.moved.items())) or "nothing"
        click.echo(f"Moved from {from_state}: {moved}.")
    click.echo(
        "Restart the agent to run as a cluster node (its cluster listener serves TLS with this node's certificate).\n"
    )
    _print_joins(member, result.secrets.worker_token, result.secrets.manager_token)


@cluster.command()
@config_option
@_state_dir_option
@click.option("--node-name", default=None, help="This node's name [default: the host name].")
@click.option("--token", required=True, help="A join token from `dabctl cluster join-token` (its role is the token's).")
@click.option("--advertise-address", default=None, help="Address other nodes reach this one at.")
@click.argument("manager")
def join(config_path: Path | None, token: str, manager: str, **opts: Any) -> None:
    """Join the cluster of the manager at MANAGER (host:port of its cluster listener, port 9421 by default).

    First fetches the manager's CA certificate and checks it against the token's CA digest: a mismatch refuses
    the cluster before anything is sent. Then makes this node's key (it never leaves the node) and sends a CSR
    with the token and this node's name and id (made once, kept in <state_dir>/node-id) over TLS; the manager
    checks the token, refuses a name that a live node of another id holds, records this node with the token's
    role, signs its certificate and issues it an etcd user. A new manager then fetches the cluster's secrets and
    CA key over mutual TLS. Written: <state_dir>/cluster.json and <state_dir>/pki/ (0600). Restart the agent.

    A manager joining a cluster whose etcd dabctl runs starts its etcd member here (TLS with the certificate it
    was just issued): added as a learner by the manager it joins through, promoted to a voting member once it has
    caught up (join returns then).
    """
    cfg = load(config_path, state_dir=opts["state_dir"], node_name=opts["node_name"])
    if ":" not in manager:
        manager = f"{manager}:9421"
    response = join_cluster(cfg, token, manager, opts["advertise_address"])
    click.echo(f"This node joined cluster {response.cluster_id} as a {response.role} (node id {response.node_id}).")
    click.echo("Restart the agent to run as a cluster node.")


@cluster.command("join-token")
@config_option
@_state_dir_option
@click.option("--rotate", is_flag=True, help="Make a new token: the old one admits no more nodes.")
@click.option("-q", "--quiet", is_flag=True, help="Print the token only.")
@click.argument("role", type=click.Choice(["worker", "manager"]))
def join_token_command(config_path: Path | None, role: str, rotate: bool, quiet: bool, **opts: Any) -> None:
    """Print (or --rotate) the token that admits a node as ROLE (worker or manager). Managers only."""
    from agent.state.membership import membership

    cfg = load(config_path, state_dir=opts["state_dir"])
    member = membership(cfg.state_path)
    if member is None:
        raise UserError("this node is not in a cluster: run it on a manager (or `dabctl cluster init` first)")
    log = open_log(cfg, writer=False)
    try:
        token = join_token(cfg, log, "manager" if role == "manager" else "worker", rotate)
    finally:
        log.close()
    if quiet:
        click.echo(token)
        return
    if rotate:
        click.echo(f"The {role} join token was rotated; the old one admits no more nodes.\n")
    _print_joins(member, token if role == "worker" else None, token if role == "manager" else None)


def _no_agent(cfg: Any) -> None:
    from agent.state.holder import AGENT_LOCK, HolderLock

    holder = HolderLock.holder_of(cfg.state_path / AGENT_LOCK)
    if holder is not None:
        raise UserError(f"an agent runs on {cfg.state_path} ({holder.get('api', '?')}): stop it first")


@cluster.command()
@config_option
@_state_dir_option
@click.option(
    "--force",
    is_flag=True,
    help="Do not ask the cluster's etcd (this node was removed, or the cluster was recovered without it): only "
    "stop this node's member and delete its files.",
)
def leave(config_path: Path | None, force: bool, **opts: Any) -> None:
    """Leave the cluster: stop the agent first. A manager that runs an etcd member removes it from the cluster's
    etcd (refused, with the reason, when the members left would lose quorum), stops it and deletes its data;
    cluster.json and cluster-secrets.json are removed (node-id stays: joining again is the same node). The
    node's record stays in the cluster until `dabctl node rm` on a manager. Containers keep running."""
    cfg = load(config_path, state_dir=opts["state_dir"])
    _no_agent(cfg)
    ran = leave_cluster(cfg, force=force)
    click.echo("This node left its cluster" + (" and stopped its etcd member." if ran else "."))


def _passphrase(path: str) -> bytes:
    text = read_secret_file(path, "--passphrase-file")
    if len(text) < 12:
        raise UserError(f"--passphrase-file {path}: the passphrase has {len(text)} characters; use at least 12")
    return text.encode()


_PASSPHRASE = click.option(
    "--passphrase-file",
    required=True,
    type=click.Path(dir_okay=False),
    help="File (0600) holding the passphrase the backup is encrypted with (at least 12 characters).",
)


@cluster.command()
@config_option
@_state_dir_option
@_PASSPHRASE
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def backup(config_path: Path | None, passphrase_file: str, file: Path, **opts: Any) -> None:
    """Write a backup of the cluster to FILE (0600), on a manager: etcd's snapshot (every record of the cluster)
    and this manager's node-id, cluster.json, cluster-secrets.json and pki/, encrypted with AES-256-GCM under a
    key made from the passphrase (scrypt). Keep the passphrase apart from the file: both make a manager."""
    from agent.node.recovery import backup_cluster

    cfg = load(config_path, state_dir=opts["state_dir"])
    result = backup_cluster(cfg, file, _passphrase(passphrase_file))
    click.echo(
        f"Backed up cluster {result.cluster_id} to {file}: etcd snapshot {result.snapshot_bytes} bytes, "
        f"{result.files} files."
    )


_HOLD = click.option(
    "--hold",
    default="10m",
    show_default=True,
    metavar="DURATION",
    help="For this long the leader keeps the slots of down nodes where they are, so nodes that rejoin as "
    "themselves (their node-id kept) find their containers theirs; nodes away longer then lose their slots to "
    "the others (`dabctl node rm` releases one sooner). 0s: move them at once.",
)


def _hold(value: str) -> timedelta:
    return timedelta(seconds=seconds("--hold", value))


@cluster.command()
@config_option
@_state_dir_option
@_HOLD
def recover(config_path: Path | None, hold: str, **opts: Any) -> None:
    """Recover a cluster that lost quorum from this manager (stop its agent first): its etcd member restarts with
    --force-new-cluster, keeping its data and dropping every other member, so the cluster goes on with this one
    voting member. Then on every other manager that comes back: `dabctl cluster leave --force` and join again
    with a manager token. Containers keep running throughout, and for --hold no slot moves off a down node."""
    from agent.node.recovery import recover_cluster

    cfg = load(config_path, state_dir=opts["state_dir"])
    _no_agent(cfg)
    state = recover_cluster(cfg, _hold(hold))
    click.echo(f"The cluster's etcd now has one member, this node ({state}). Start the agent, then rejoin managers.")


@cluster.command()
@config_option
@_state_dir_option
@_PASSPHRASE
@click.option("--advertise-address", default=None, help="Address other nodes reach this one at [default: route].")
@_HOLD
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def restore(config_path: Path | None, passphrase_file: str, file: Path, hold: str, **opts: Any) -> None:
    """Restore a cluster from a backup FILE onto this node (in no cluster, agent stopped), when no manager's etcd
    member survived: the node becomes the backed-up manager (its node-id, cluster.json, cluster-secrets.json)
    with a one-member etcd made from the snapshot. Other managers then leave (--force) and join again."""
    from agent.node.recovery import restore_cluster

    cfg = load(config_path, state_dir=opts["state_dir"])
    _no_agent(cfg)
    member = restore_cluster(cfg, file, _passphrase(passphrase_file), opts["advertise_address"], _hold(hold))
    click.echo(f"Restored cluster {member.cluster_id} on this node ({member.node_id}, etcd {member.state}).")
