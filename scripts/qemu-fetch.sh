#!/bin/sh
# Fetches QEMU (Debian's qemu-system-x86 and the libraries and firmware it needs) into a
# private folder without installing anything: `apt-get install qemu-system-x86` would
# remove a preinstalled `qemu-utils`, so the package set that
# `apt-get install --simulate --no-install-recommends qemu-system-x86` names is fetched
# with `apt-get download` and unpacked with `dpkg-deb -x` into `$DIR/root`.
#
# With `--linux` it also fetches the Linux anchor of `examples/qemu_balloon`: the Debian
# kernel that `linux-image-amd64` depends on (vmlinuz + modules) and `busybox-static`.
#
# Usage: scripts/qemu-fetch.sh [--linux] [--env]
#   DIR is $HVMEM_QEMU_DIR, else target/qemu of this repository (where the runner looks).
#   Idempotent: a second run with the same package versions downloads nothing.
#   Writes $DIR/env.sh (source it) and prints it; `--env` prints only that file's lines.
#   Needs apt-get and dpkg-deb (any Debian bookworm); no root unless the package lists
#   are missing (then run `apt-get update` once).
set -eu

linux=0
env_only=0
for arg in "$@"; do
    case "$arg" in
    --linux) linux=1 ;;
    --env) env_only=1 ;;
    -h | --help)
        sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "qemu-fetch: unknown argument '$arg' (try --help)" >&2
        exit 2
        ;;
    esac
done

for tool in apt-get apt-cache dpkg-deb; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "qemu-fetch: '$tool' not found: this script needs a Debian-based system" >&2
        exit 1
    fi
done

repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${HVMEM_QEMU_DIR:-$repo/target/qemu}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
log() { [ "$env_only" = 1 ] || echo "qemu-fetch: $*" >&2; }

# fetch NAME PKG=VER... : download the packages (unless the stamp already lists exactly
# them) and unpack them into $dir/NAME.
fetch() {
    name=$1
    shift
    want=$(printf '%s\n' "$@" | sort)
    stamp="$dir/$name.stamp"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -d "$dir/$name" ]; then
        log "$name: up to date ($# packages)"
        return 0
    fi
    debs="$dir/debs-$name"
    rm -rf "$debs" "$dir/$name.tmp"
    mkdir -p "$debs" "$dir/$name.tmp"
    log "$name: downloading $# packages"
    if ! (cd "$debs" && apt-get download -q "$@" >&2); then
        echo "qemu-fetch: apt-get download failed (stale package lists? run 'apt-get update')" >&2
        exit 1
    fi
    for deb in "$debs"/*.deb; do
        dpkg-deb -x "$deb" "$dir/$name.tmp"
    done
    rm -rf "$dir/$name"
    mv "$dir/$name.tmp" "$dir/$name"
    printf '%s\n' "$want" >"$stamp"
    log "$name: unpacked into $dir/$name"
}

# The packages apt would install, as name=version (what `apt-get download` takes).
# When qemu-system-x86 is already installed the set is empty: fetch the QEMU packages
# themselves (their libraries are then installed already).
set_of() {
    apt-get install --simulate --no-install-recommends "$@" 2>/dev/null |
        awk '/^Inst /{ v=$3; gsub(/[()]/, "", v); print $2 "=" v }'
}
candidate() {
    apt-cache policy "$1" | awk '/Candidate:/{ print $2 }'
}

qemu_pkgs=$(set_of qemu-system-x86)
if [ -z "$qemu_pkgs" ]; then
    for p in qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu; do
        qemu_pkgs="$qemu_pkgs $p=$(candidate "$p")"
    done
fi
# shellcheck disable=SC2086 # word splitting of the package list is intended
fetch root $qemu_pkgs

qemu="$dir/root/usr/bin/qemu-system-x86_64"
if [ ! -x "$qemu" ]; then
    echo "qemu-fetch: $qemu missing after unpacking" >&2
    exit 1
fi
libs=$(find "$dir/root" -name '*.so*' -printf '%h\n' | sort -u | tr '\n' ':')

if [ "$linux" = 1 ]; then
    kernel=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-6/{ print $2; exit }')
    if [ -z "$kernel" ]; then
        echo "qemu-fetch: linux-image-amd64 names no linux-image-6.* package" >&2
        exit 1
    fi
    fetch linux "$kernel=$(candidate "$kernel")" "busybox-static=$(candidate busybox-static)"
fi

{
    echo "HVMEM_QEMU='$qemu'"
    echo "HVMEM_QEMU_LD_LIBRARY_PATH='$libs'"
    echo "HVMEM_QEMU_FIRMWARE='$dir/root/usr/share/qemu'"
    if [ -d "$dir/linux" ]; then
        echo "HVMEM_LINUX_ROOT='$dir/linux'"
    fi
    echo "export HVMEM_QEMU HVMEM_QEMU_LD_LIBRARY_PATH HVMEM_QEMU_FIRMWARE"
    echo "# run: LD_LIBRARY_PATH=\"\$HVMEM_QEMU_LD_LIBRARY_PATH\" \"\$HVMEM_QEMU\" -L \"\$HVMEM_QEMU_FIRMWARE\" ..."
} >"$dir/env.sh"
if [ "$env_only" = 1 ]; then
    cat "$dir/env.sh"
else
    log "env written to $dir/env.sh:"
    cat "$dir/env.sh"
    log "$(LD_LIBRARY_PATH="$libs" "$qemu" --version | head -n 1)"
fi
