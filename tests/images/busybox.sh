#!/bin/sh
# Builds a small OCI image-layout archive from Debian's busybox-static with umoci and skopeo,
# in two layers: the second deletes a file of the first (so the archive carries a whiteout).
# Usage: tests/images/busybox.sh OUT.tar [BUNDLE_DIR]
# With BUNDLE_DIR, also leaves an OCI runtime bundle there (for `runc run`/`crun run`).
set -eu
out=$(realpath "$1")
bundle_out=${2:-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
umoci init --layout layout
umoci new --image layout:bb
umoci unpack --image layout:bb bundle
root=bundle/rootfs
mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/root"
cp /bin/busybox "$root/bin/busybox"
for a in $(/bin/busybox --list); do
  [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"
done
echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"
echo "from layer one" >"$root/etc/doomed"
umoci repack --image layout:bb bundle
umoci unpack --image layout:bb bundle2
rm bundle2/rootfs/etc/doomed
echo "from layer two" >bundle2/rootfs/etc/motd
umoci repack --image layout:bb bundle2
umoci config --image layout:bb \
  --config.env PATH=/bin --config.workingdir / \
  --config.cmd /bin/sh --config.cmd -c --config.cmd "echo hello from busybox"
rm -f "$out"
skopeo copy --quiet oci:layout:bb "oci-archive:$out:busybox:latest"
if [ -n "$bundle_out" ]; then
  rm -rf "$bundle_out"
  umoci unpack --image layout:bb "$bundle_out"
fi
