#!/usr/bin/env bash
# install-apptainer.sh - put Apptainer on a Debian 12 (bookworm) machine for tests and demos.
#
# Why this is not just "apt-get install apptainer":
#   * bookworm ships neither apptainer nor singularity;
#   * Debian unstable ships apptainer, but built against glibc >= 2.38 (bookworm has 2.36).
# What it does instead:
#   1. installs the helper tools apptainer calls (squashfs-tools, squashfuse, fuse2fs,
#      fuse-overlayfs, uidmap, e2fsprogs) from bookworm as normal packages;
#   2. with a PRIVATE apt state directory (the system's sources, lists and dpkg status are
#      never touched) downloads apptainer from sid and libc6 from trixie;
#   3. unpacks both with `dpkg -x`, copies apptainer's files into place and keeps the newer
#      glibc in a private directory; the two ELF binaries (apptainer, starter) get that glibc
#      as their ELF interpreter and DT_RPATH via patchelf. dpkg never learns about any of it.
#   4. applies two fixes this kind of VM needs (see the comments near the end).
# Idempotent: exits at once when a working apptainer is already installed.
# Env: APPTAINER_WORK (scratch dir, default /tmp/apptainer-apt).
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "install-apptainer: must run as root" >&2
    exit 1
fi

work=${APPTAINER_WORK:-/tmp/apptainer-apt}
libdir=/usr/lib/x86_64-linux-gnu
glibc_dir=$libdir/apptainer/glibc

apply_runtime_fixes() {
    # root's capability bounding set here lacks CAP_SYS_RESOURCE; apptainer's default
    # ("full") then fails with "Requesting capability set ... while permitted ...".
    sed -i 's/^root default capabilities = .*/root default capabilities = file/' /etc/apptainer/apptainer.conf
    # unprivileged runs mount SIF files (squashfuse) and overlay images (fuse2fs) through
    # FUSE; /dev/fuse is 0600 on these machines and the mode is lost on reboot.
    if [ -e /dev/fuse ]; then chmod 0666 /dev/fuse; fi
}

if [ -x /usr/bin/apptainer ] && apptainer version >/dev/null 2>&1; then
    apply_runtime_fixes
    echo "apptainer $(apptainer version) already installed"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    patchelf squashfs-tools squashfuse fuse2fs fuse-overlayfs uidmap e2fsprogs \
    libseccomp2 libsqlite3-0 ca-certificates >/dev/null

# A throw-away apt configuration that knows trixie and sid, using the same mirror the
# machine is already configured for (first "URIs:" line of the deb822 sources file).
mkdir -p "$work"/{lists/partial,cache/archives/partial,prefs.d,dl}
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
printf '%s\n' "deb $mirror trixie main" "deb $mirror sid main" > "$work/sources.list"
: > "$work/status"
apt_private=(
    -o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache"
    -o Dir::State::status="$work/status"
    -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts="$work/prefs.d"
)
apt-get "${apt_private[@]}" update -qq
chmod 777 "$work/dl"            # `apt-get download` runs as the _apt user
(cd "$work/dl" && rm -f ./*.deb && apt-get "${apt_private[@]}" download -qq apptainer/sid libc6/trixie)

rm -rf "$work/pkg" "$work/libc"
mkdir -p "$work/pkg" "$work/libc"
dpkg -x "$work"/dl/apptainer_*_amd64.deb "$work/pkg"
dpkg -x "$work"/dl/libc6_*_amd64.deb "$work/libc"

cp -a "$work/pkg/etc/apptainer" /etc/
cp -a "$work/pkg$libdir/apptainer" "$libdir/"
cp -a "$work/pkg/var/lib/apptainer" /var/lib/
install -m 0755 "$work/pkg/usr/bin/apptainer" /usr/bin/apptainer
ln -sf apptainer /usr/bin/singularity

# The private glibc: only the libraries the two binaries (and NSS lookups) load.
mkdir -p "$glibc_dir"
for lib in ld-linux-x86-64.so.2 libc.so.6 libm.so.6 libpthread.so.0 libdl.so.2 librt.so.1 \
           libresolv.so.2 libnss_files.so.2 libnss_dns.so.2 libnss_compat.so.2; do
    cp -a "$work/libc$libdir/$lib" "$glibc_dir/"
done
for bin in /usr/bin/apptainer "$libdir/apptainer/bin/starter"; do
    patchelf --set-interpreter "$glibc_dir/ld-linux-x86-64.so.2" "$bin"
    patchelf --remove-rpath "$bin"
    # DT_RPATH (not RUNPATH): it also applies to the binaries' own dependencies.
    patchelf --force-rpath --set-rpath "$glibc_dir" "$bin"
done

apply_runtime_fixes
echo "installed apptainer $(apptainer version)"
