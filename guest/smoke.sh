#!/usr/bin/env bash
# Smoke test of the boot path: builds (or reuses) the guest kernel and initramfs,
# boots QEMU per docs/boot-and-run.md (TCG) and drives hearth-guest with smoke.py.
# The first run builds the kernel (~10 min on 2 cores); later runs take seconds.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="${1:-$(mktemp -d "${TMPDIR:-/tmp}/hearth-smoke.XXXXXX")}"
vmlinux="$("$here/kernel/build.sh" | tail -n1)"
initramfs="$("$here/build-initramfs.sh" | tail -n1)"
echo "kernel: $vmlinux"
echo "initramfs: $initramfs"
echo "work dir: $work"
exec python3 "$here/smoke.py" "$vmlinux" "$initramfs" "$work"
