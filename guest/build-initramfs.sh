#!/usr/bin/env bash
# Builds hearth-guest (static musl) and packs it as /init into a gzip newc initramfs
# with /dev/console and the mountpoints it needs.
#
# Output: ~/.cache/hearth/initramfs/<hash>/initramfs.cpio.gz, <hash> = sha256 of the
# stripped binary and the packer. The last line on stdout is the path;
# ~/.cache/hearth/current/initramfs.cpio.gz links to it.
#
# Env: HEARTH_CACHE (default ~/.cache/hearth), CARGO_TARGET_DIR (cargo's default if unset).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cache="${HEARTH_CACHE:-$HOME/.cache/hearth}"
target=x86_64-unknown-linux-musl
start=$SECONDS
log() { printf '[initramfs %3ds] %s\n' "$((SECONDS - start))" "$*" >&2; }

log "phase: cargo build -p hearth-guest --release --target $target"
(cd "$repo" && cargo build --release -p hearth-guest --target "$target" >&2)
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
bin="$target_dir/$target/release/hearth-guest"
[[ -x "$bin" ]] || { log "ERROR: $bin was not built"; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/hearth-initramfs.XXXXXX")"
trap 'rm -rf "$work"' EXIT
strip -o "$work/init" "$bin"

hash="$(cat "$work/init" "$here/newc.py" | sha256sum | cut -c1-16)"
out_dir="$cache/initramfs/$hash"
out="$out_dir/initramfs.cpio.gz"
if [[ -s "$out" ]]; then
    log "cached: $out"
else
    log "phase: pack ($(du -h "$work/init" | cut -f1) init)"
    mkdir -p "$work/out"
    python3 "$here/newc.py" "$work/out/initramfs.cpio.gz" \
        dir:/dev:0755 char:/dev/console:0600:5:1 \
        dir:/proc:0555 dir:/sys:0555 dir:/sysroot:0755 \
        file:/init:0755:"$work/init"
    mkdir -p "$cache/initramfs"
    # why: rename of a directory is atomic, so a concurrent reader sees all or nothing.
    mv -T "$work/out" "$out_dir" 2>/dev/null || [[ -s "$out" ]]
fi
mkdir -p "$cache/current"
ln -sfn "$out" "$cache/current/initramfs.cpio.gz.tmp.$$"
mv -T "$cache/current/initramfs.cpio.gz.tmp.$$" "$cache/current/initramfs.cpio.gz"
log "done"
echo "$out"
