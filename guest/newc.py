#!/usr/bin/env python3
"""Writes a gzip-compressed newc cpio archive (an initramfs) without needing root
for device nodes. Reproducible: fixed mtimes and ownership.

usage: newc.py OUT.cpio.gz ENTRY...
  dir:PATH:MODE            a directory
  file:PATH:MODE:SOURCE    a regular file with SOURCE's contents
  char:PATH:MODE:MAJ:MIN   a character device node
"""
import gzip
import stat
import sys


def header(ino, mode, nlink, size, rmaj, rmin, name):
    fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rmaj, rmin, len(name) + 1, 0]
    return b"070701" + b"".join(b"%08X" % f for f in fields)


def pad(n):
    return b"\0" * ((4 - n % 4) % 4)


def main(out, entries):
    chunks = []
    for ino, spec in enumerate(entries, start=1):
        kind, path, mode, *rest = spec.split(":")
        name = path.lstrip("/").encode()
        mode = int(mode, 8)
        data, rmaj, rmin, nlink = b"", 0, 0, 1
        if kind == "dir":
            mode |= stat.S_IFDIR
            nlink = 2
        elif kind == "file":
            mode |= stat.S_IFREG
            with open(rest[0], "rb") as f:
                data = f.read()
        elif kind == "char":
            mode |= stat.S_IFCHR
            rmaj, rmin = int(rest[0]), int(rest[1])
        else:
            sys.exit(f"newc.py: unknown entry kind {kind!r} in {spec!r}")
        h = header(ino, mode, nlink, len(data), rmaj, rmin, name) + name + b"\0"
        chunks += [h, pad(len(h)), data, pad(len(data))]
    trailer = header(0, 0, 1, 0, 0, 0, b"TRAILER!!!") + b"TRAILER!!!\0"
    chunks += [trailer, pad(len(trailer))]
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(b"".join(chunks))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
