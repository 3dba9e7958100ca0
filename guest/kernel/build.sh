#!/usr/bin/env bash
# Builds Hearth's guest kernel (uncompressed vmlinux with PVH entry) from Debian's
# linux-source-6.1 and guest/kernel/config.fragment.
#
# Output: ~/.cache/hearth/kernel/<hash>/vmlinux, <hash> = sha256 over the fragment,
# this script and the source package version. A cached build is reused. The last
# line on stdout is the vmlinux path; ~/.cache/hearth/current/vmlinux links to it.
#
# Env: HEARTH_CACHE (default ~/.cache/hearth), JOBS (default nproc),
#      KERNEL_SRC_TAR (default /usr/src/linux-source-6.1.tar.xz).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fragment="$here/config.fragment"
cache="${HEARTH_CACHE:-$HOME/.cache/hearth}"
src_tar="${KERNEL_SRC_TAR:-/usr/src/linux-source-6.1.tar.xz}"
jobs="${JOBS:-$(nproc)}"
start=$SECONDS

log() { printf '[kernel %4ds] %s\n' "$((SECONDS - start))" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ -r "$src_tar" ]] || die "kernel source $src_tar not found (apt-get install linux-source-6.1)"
src_version="$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null)" \
    || die "package linux-source-6.1 is not installed"

hash="$( { cat "$fragment"; cat "${BASH_SOURCE[0]}"; printf '%s' "$src_version"; } | sha256sum | cut -c1-16)"
out_dir="$cache/kernel/$hash"
out="$out_dir/vmlinux"

link_current() {
    mkdir -p "$cache/current"
    ln -sfn "$out" "$cache/current/vmlinux.tmp.$$"
    mv -T "$cache/current/vmlinux.tmp.$$" "$cache/current/vmlinux"
}

if [[ -s "$out" ]]; then
    log "cached: $out"
    link_current
    echo "$out"
    exit 0
fi

mkdir -p "$cache/kernel"
work="$(mktemp -d "$cache/kernel/build.$hash.XXXXXX")"
build_log="$work/build.log"
cleanup() { [[ -n "${keep_work:-}" ]] || rm -rf "$work"; }
trap cleanup EXIT
fail() {
    keep_work=1
    log "FAILED in phase: $1 (log: $build_log)"
    tail -n 40 "$build_log" >&2 || true
    exit 1
}
run() { # phase, command...
    local phase="$1"; shift
    log "phase: $phase"
    # A heartbeat with the newest log line, so a 10-minute compile is visibly alive.
    # why: stdout to /dev/null so its lingering `sleep` cannot hold a `| tail -n1` open.
    ( while sleep 60; do log "  ... $phase: $(tail -n1 "$build_log")"; done ) >/dev/null &
    local heartbeat=$!
    local rc=0
    "$@" >>"$build_log" 2>&1 || rc=$?
    kill "$heartbeat" 2>/dev/null; wait "$heartbeat" 2>/dev/null || true
    [[ $rc -eq 0 ]] || fail "$phase"
}

log "building kernel $src_version, config hash $hash, $jobs jobs, in $work"
run extract tar -C "$work" -xf "$src_tar"
ksrc="$work/linux-source-6.1"
kmake() { make -C "$ksrc" ARCH=x86_64 "$@"; }

run tinyconfig kmake tinyconfig
run merge-fragment bash -c "cd '$ksrc' && ARCH=x86_64 scripts/kconfig/merge_config.sh -m .config '$fragment'"
run olddefconfig kmake olddefconfig

log "phase: verify-config"
missing=0
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*)
            grep -qxF "$line" "$ksrc/.config" || {
                log "option not in final .config: $line (got: $(grep -E "^(# )?${line%%=*}[= ]" "$ksrc/.config" || echo absent))"
                missing=1
            } ;;
        "# CONFIG_"*" is not set")
            opt="${line#\# }"; opt="${opt%% *}"
            if grep -qE "^$opt=" "$ksrc/.config"; then
                log "option should be off: $(grep -E "^$opt=" "$ksrc/.config")"
                missing=1
            fi ;;
    esac
done <"$fragment"
[[ $missing -eq 0 ]] || { keep_work=1; die "kernel config does not match config.fragment (kept $ksrc/.config)"; }

run "vmlinux (make -j$jobs, the long part)" kmake -j"$jobs" vmlinux
run strip strip -o "$work/vmlinux" "$ksrc/vmlinux"
cp "$ksrc/.config" "$work/config"
cp "$build_log" "$work/vmlinux.build.log"

mkdir -p "$out_dir.tmp.$$"
mv "$work/vmlinux" "$work/config" "$work/vmlinux.build.log" "$out_dir.tmp.$$/"
# why: rename of a directory is atomic, so a concurrent reader sees all or nothing.
mv -T "$out_dir.tmp.$$" "$out_dir" 2>/dev/null || { rm -rf "$out_dir.tmp.$$"; [[ -s "$out" ]] || die "could not move build to $out_dir"; }
link_current
log "done: $(du -h "$out" | cut -f1) in $((SECONDS - start)) s"
echo "$out"
