#!/bin/sh
# Ad-hoc launcher for the guest (a development aid; the real runner is examples/qemu_balloon).
# Usage: QEMU_ROOT=... guest/run-qemu.sh [extra qemu args]; commands on stdin.
set -eu
root=${QEMU_ROOT:-/work/qemu-cache/root}
here=$(cd "$(dirname "$0")" && pwd)
LD_LIBRARY_PATH=$(find "$root" -name '*.so*' -printf '%h\n' | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH
exec "$root/usr/bin/qemu-system-x86_64" -L "$root/usr/share/qemu" -M microvm -accel tcg \
  -m "${MEM:-256M}" -smp 1 -nodefaults -no-user-config -display none -serial stdio \
  -global virtio-mmio.force-legacy=false -object iothread,id=io0 \
  -device virtio-balloon-device,free-page-reporting=on,free-page-hint=${FPH:-on},iothread=io0 \
  -kernel "$here/target/x86_64-unknown-none/release/hvmem-guest" "$@"
