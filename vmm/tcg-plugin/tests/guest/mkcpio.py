#!/usr/bin/env python3
"""Write a newc initramfs: /init (the given static binary), /dev, /dev/console, /proc."""
import sys

def entry(out, ino, name, mode, data=b"", rdev=(0, 0)):
    nb = name.encode() + b"\0"
    hdr = "070701" + "".join("%08x" % v for v in (
        ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0))
    out += hdr.encode() + nb
    out += b"\0" * ((4 - len(out) % 4) % 4)
    out += data
    out += b"\0" * ((4 - len(out) % 4) % 4)

def main():
    init, dest = sys.argv[1], sys.argv[2]
    out = bytearray()
    entry(out, 1, "dev", 0o040755)
    entry(out, 2, "dev/console", 0o020600, rdev=(5, 1))
    entry(out, 3, "proc", 0o040755)
    entry(out, 4, "init", 0o100755, open(init, "rb").read())
    entry(out, 5, "TRAILER!!!", 0)
    open(dest, "wb").write(out)

main()
