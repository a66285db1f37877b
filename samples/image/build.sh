#!/usr/bin/env bash
# Build the sample image dabctl/sample:1 from Debian's busybox-static: no registry is needed.
# Usage: bash samples/image/build.sh [--force]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
image="${DABCTL_SAMPLE_IMAGE:-dabctl/sample:1}"
if [ "${1:-}" != "--force" ] && docker image inspect "$image" >/dev/null 2>&1; then
    exit 0
fi
busybox=/bin/busybox
[ -x "$busybox" ] || { echo "busybox-static is not installed (apt-get install busybox-static)" >&2; exit 1; }
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,etc,tmp,www}
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
install -m 0755 "$here/serve" "$root/bin/serve"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
chmod 1777 "$root/tmp"
tar -C "$root" -c . | docker import \
    --change 'CMD ["/bin/serve"]' \
    --change 'ENV PATH=/bin' \
    --change 'EXPOSE 8080' \
    --change 'LABEL org.opencontainers.image.title=dabctl-sample' \
    - "$image" >/dev/null
echo "built $image" >&2
