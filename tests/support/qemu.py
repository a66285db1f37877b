"""A qemu guest running a stock Debian kernel (one with IPVS), for tests this host's kernel cannot run.

    kernel = find_kernel()                        # None: not provisioned (bash .ci/setup does it)
    guest = Guest(kernel, workdir)
    result = guest.run(["/bin/sh", "-c", "..."], cwd=repo, timeout=120)   # boot, run, power off

The guest mounts this host's root read-only over 9p (`hostfs`) and chroots into it, so it runs the project's own
venv and the host's `nft`, `ip` and `ipvsadm` against its own kernel. Inside the chroot `/proc`, `/sys`, `/dev`,
`/tmp` and `/run` are the guest's own (the last two tmpfs) and `/tmp/out` is a writable 9p share of
`workdir/out`, where the command leaves what the host should read (a JUnit report, say). The kernel comes from
the Debian package extracted by `.ci/setup` into /var/cache/dabctl-guest/<version> (this machine's own kernel has no IPVS): qemu runs it
under software emulation (`-accel tcg`; KVM is not available here), so boot takes seconds, not minutes.
"""

from __future__ import annotations

import lzma
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CACHE", "MODULES", "Guest", "GuestResult", "Kernel", "find_kernel", "missing"]

CACHE = Path("/var/cache/dabctl-guest")
QEMU = "qemu-system-x86_64"
# qemu's minimal firmware: it boots a -kernel image with less emulated work than SeaBIOS.
QBOOT = Path("/usr/share/qemu/qboot.rom")
BUSYBOX = "/bin/busybox"
# Loaded in this order, each with the dependencies `modprobe --show-depends` lists first. IPVS with its round-robin
# scheduler, veth for backends in network namespaces, virtio + 9p for the host's root, and what dabctl's nft
# table uses (marks and ct marks in filter/route chains, masquerade).
MODULES = (
    "ip_vs",
    "ip_vs_rr",
    "veth",
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "nf_tables",
    "nft_ct",
    "nft_fib_ipv4",
    "nft_chain_nat",
    "nft_masq",
    "nft_nat",
    "nft_numgen",
    "nft_compat",
    "xt_connmark",
    "xt_comment",
)


@dataclass(frozen=True)
class Kernel:
    """An extracted Debian kernel package: `root` holds boot/vmlinuz-<version> and lib/modules/<version>."""

    root: Path
    version: str

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.version


def find_kernel(cache: Path = CACHE) -> Kernel | None:
    """The newest kernel `.ci/setup` extracted under `cache` (with its modules.dep), or None."""
    found = []
    for root in sorted(cache.glob("*")) if cache.is_dir() else []:
        for modules in (root / "lib" / "modules").glob("*"):
            kernel = Kernel(root, modules.name)
            if kernel.vmlinuz.is_file() and (modules / "modules.dep").is_file():
                found.append(kernel)
    return max(
        found,
        key=lambda k: [int(p) if p.isdigit() else 0 for p in k.version.replace("-", ".").split(".")],
        default=None,
    )


def missing(cache: Path = CACHE) -> str | None:
    """Why a guest cannot boot here (one line naming the fix), or None when it can."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found: install qemu-system-x86 (bash .ci/setup does)"
    if not Path(BUSYBOX).is_file():
        return f"{BUSYBOX} not found: install busybox-static (bash .ci/setup does)"
    if shutil.which("modprobe") is None:
        return "modprobe not found: install kmod (bash .ci/setup does)"
    if find_kernel(cache) is None:
        return f"no Debian kernel extracted under {cache}: run bash .ci/setup"
    return None


def module_files(kernel: Kernel, names: tuple[str, ...] = MODULES) -> list[Path]:
    """The module files to insmod for `names`, dependencies first, each once."""
    done = subprocess.run(
        ["modprobe", "-d", str(kernel.root), "-S", kernel.version, "-a", "--show-depends", *names],
        capture_output=True,
        text=True,
        check=True,
    )
    files: list[Path] = []
    for line in done.stdout.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "insmod" and Path(words[1]) not in files:
            files.append(Path(words[1]))
    return files


INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in /modules/*.ko; do insmod "$m" 2>/dev/null || echo "dabctl-guest: insmod $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostfs /host || echo "dabctl-guest: no hostfs"
for d in proc sys dev; do mount --bind /$d /host/$d; done
mount -t tmpfs tmp /host/tmp
mount -t tmpfs run /host/run
# The host's root once more, without the tmpfs over /tmp and /run: a project cloned under /tmp is reached there.
mkdir -p /host/run/hostroot && mount --bind /host /host/run/hostroot
mkdir -p /host/tmp/out
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out /host/tmp/out || echo "dabctl-guest: no out share"
ip link set lo up
echo "dabctl-guest: booted in $(cut -d' ' -f1 /proc/uptime)s"
chroot /host /bin/sh /tmp/out/run.sh
echo "dabctl-guest: exit $?"
sync
poweroff -f
"""


def _cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """An uncompressed newc cpio archive of (name, mode, content) entries, directories first by order."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        out += b"070701" + "".join(f"{f:08x}" for f in fields).encode() + raw
        out += b"\0" * (-(110 + len(raw)) % 4)
        out += data + b"\0" * (-len(data) % 4)
    return bytes(out)


def build_initramfs(kernel: Kernel, path: Path, names: tuple[str, ...] = MODULES) -> Path:
    """Write an initramfs with static busybox, the modules for `names` (in load order) and the init script."""
    dirs = ["bin", "dev", "proc", "sys", "host", "modules"]
    entries: list[tuple[str, int, bytes]] = [(d, 0o040755, b"") for d in dirs]
    entries.append(("bin/busybox", 0o100755, Path(BUSYBOX).read_bytes()))
    entries.append(("init", 0o100755, INIT.encode()))
    for i, ko in enumerate(module_files(kernel, names)):
        data = ko.read_bytes()
        if ko.suffix == ".xz":
            data = lzma.decompress(data)
        name = ko.name.removesuffix(".xz")
        entries.append((f"modules/{i:03d}-{name}", 0o100644, data))
    path.write_bytes(_cpio(entries))
    return path


@dataclass(frozen=True, kw_only=True)
class GuestResult:
    """What one guest run left: the command's exit status (None: it never finished), the console, the out dir."""

    returncode: int | None
    console: str
    out: Path
    boot_seconds: float | None
    seconds: float

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.console.splitlines()[-lines:])


class Guest:
    """Boots the kernel once per `run`, with the host's root over 9p; the command's output goes to `out`."""

    def __init__(self, kernel: Kernel, workdir: Path, memory_mb: int = 768) -> None:
        self.kernel = kernel
        self.workdir = workdir
        self.memory_mb = memory_mb
        self.out = workdir / "out"
        self.initramfs = workdir / "initramfs.cpio"

    def run(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> GuestResult:
        """Boot, run `argv` in `cwd` inside the chroot, power off; the guest is killed after `timeout` seconds."""
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.initramfs.exists():
            build_initramfs(self.kernel, self.initramfs)
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in (env or {}).items())
        (self.out / "run.sh").write_text(
            f"export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp\n{exports}"
            # A project under /tmp or /run is hidden by the guest's own tmpfs there: bind it back from the host's root.
            f"[ -d {shlex.quote(str(cwd))} ] || {{ mkdir -p {shlex.quote(str(cwd))} && "
            f"mount --bind {shlex.quote('/run/hostroot' + str(cwd))} {shlex.quote(str(cwd))}; }}\n"
            f"cd {shlex.quote(str(cwd))} || exit 125\n{shlex.join(argv)}\n"
            "echo $? > /tmp/out/rc\n"
        )
        (self.out / "rc").unlink(missing_ok=True)
        console = self.workdir / "console.log"
        cmd = [
            QEMU,
            "-accel",
            "tcg",
            "-m",
            str(self.memory_mb),
            "-smp",
            "1",
            "-cpu",
            "max",
            "-nographic",
            "-no-reboot",
            *(["-bios", str(QBOOT)] if QBOOT.is_file() else []),
            "-nic",
            "none",
            "-kernel",
            str(self.kernel.vmlinuz),
            "-initrd",
            str(self.initramfs),
            "-append",
            "console=ttyS0 quiet loglevel=3 panic=-1 mitigations=off",
            "-virtfs",
            "local,path=/,mount_tag=hostfs,security_model=none,readonly=on,multidevs=remap",
            "-virtfs",
            f"local,path={self.out},mount_tag=out,security_model=none",
        ]
        started = time.monotonic()
        with console.open("wb") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        seconds = time.monotonic() - started
        text = console.read_text(errors="replace")
        rc_file = self.out / "rc"
        rc = int(rc_file.read_text().strip()) if rc_file.is_file() and rc_file.read_text().strip() else None
        boot = None
        if m := re.search(r"dabctl-guest: booted in ([0-9.]+)s", text):
            boot = float(m.group(1))
        return GuestResult(returncode=rc, console=text, out=self.out, boot_seconds=boot, seconds=seconds)


if __name__ == "__main__":  # a manual check: python -m tests.support.qemu 'command'
    import sys
    import tempfile

    reason = missing()
    if reason:
        sys.exit(reason)
    found = find_kernel()
    assert found is not None
    with tempfile.TemporaryDirectory() as tmp:
        result = Guest(found, Path(tmp)).run(["/bin/sh", "-c", " ".join(sys.argv[1:]) or "true"], Path(os.getcwd()))
        print(result.console)
        print(f"rc={result.returncode} boot={result.boot_seconds}s total={result.seconds:.1f}s")
