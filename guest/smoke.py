#!/usr/bin/env python3
"""Boots one Hearth guest under QEMU exactly as docs/boot-and-run.md describes and
drives hearth-guest over the protocol of crates/proto. A stand-in for the Rust host
side; run through smoke.sh, which builds the kernel and initramfs first.

usage: smoke.py VMLINUX INITRAMFS WORKDIR
"""
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time

# crates/proto/src/lib.rs
HELLO, EXEC, STARTED, STDOUT, STDERR, STDIN, EXIT, SIGNAL, CREDIT, ERROR, SHUTDOWN, PING, PONG = range(1, 14)
INITIAL_WINDOW = 1024 * 1024
PROTOCOL_VERSION = 1
TIMEOUT = float(os.environ.get("HEARTH_SMOKE_TIMEOUT", "120"))

results = []


def check(name, ok, detail=""):
    results.append((name, ok))
    print(("PASS " if ok else "FAIL ") + name + (f"  ({detail})" if detail else ""), flush=True)


class Guest:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def send(self, kind, sid, payload=b""):
        if not isinstance(payload, bytes):
            payload = json.dumps(payload).encode()
        self.sock.sendall(struct.pack("<IBI", 5 + len(payload), kind, sid) + payload)

    def _fill(self, n, deadline):
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("waiting for a frame from the guest")
            self.sock.settimeout(left)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("guest channel closed")
            self.buf += chunk

    def recv(self, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        self._fill(4, deadline)
        (length,) = struct.unpack("<I", self.buf[:4])
        self._fill(4 + length, deadline)
        kind, sid = struct.unpack("<BI", self.buf[4:9])
        payload = self.buf[9 : 4 + length]
        self.buf = self.buf[4 + length :]
        return kind, sid, payload

    def run(self, sid, argv, env=("PATH=/bin",), user="", workdir="", stdin=None, credit=True):
        """Runs argv; returns (started, stdout, stderr, exit, stats)."""
        self.send(EXEC, sid, {"argv": list(argv), "env": list(env), "workdir": workdir,
                              "user": user, "stdin": stdin is not None})
        out, err, started, max_unacked, unacked = [], [], None, 0, 0
        stdin_credit = 0
        if stdin is not None:
            self.send(STDIN, sid, stdin)
            self.send(STDIN, sid, b"")
        while True:
            kind, fid, payload = self.recv()
            if fid != sid:
                continue
            if kind == STARTED:
                started = json.loads(payload)["pid"]
            elif kind in (STDOUT, STDERR):
                (out if kind == STDOUT else err).append(payload)
                unacked += len(payload)
                max_unacked = max(max_unacked, unacked)
                if credit:
                    self.send(CREDIT, sid, {"bytes": len(payload)})
                    unacked -= len(payload)
            elif kind == CREDIT:
                stdin_credit += json.loads(payload)["bytes"]
            elif kind == EXIT:
                return started, b"".join(out), b"".join(err), json.loads(payload), {
                    "max_unacked": max_unacked, "stdin_credit": stdin_credit}
            elif kind == ERROR:
                return started, b"".join(out), b"".join(err), {"error": json.loads(payload)}, {}


def make_rootfs(work):
    root = os.path.join(work, "rootfs")
    shutil.rmtree(root, ignore_errors=True)
    for d in ["bin", "etc", "tmp", "root", "data"]:
        os.makedirs(os.path.join(root, d))
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    shutil.copy("/bin/busybox", os.path.join(root, "bin/busybox"))
    for applet in ["sh", "echo", "cat", "id", "uname", "sleep", "head", "yes", "ls", "pwd", "hostname"]:
        os.symlink("busybox", os.path.join(root, "bin", applet))
    with open(os.path.join(root, "etc/passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    with open(os.path.join(root, "etc/group"), "w") as f:
        f.write("root:x:0:\nnogroup:x:65534:\n")
    with open(os.path.join(root, "data/notes.txt"), "w") as f:
        f.write("not a program\n")
    image = os.path.join(work, "image.ext4")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", root, image, "64M"], check=True)
    overlay = os.path.join(work, "root.qcow2")
    if os.path.exists(overlay):
        os.unlink(overlay)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", image, overlay], check=True)
    return overlay


def qemu_argv(vmlinux, initramfs, work, extra_append=""):
    return [
        "qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,acpi=off",
        "-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-S",
        "-kernel", vmlinux, "-initrd", initramfs,
        "-append", f"console=ttyS0 quiet reboot=t panic=-1 hearth.hostname=smoke-1{extra_append}",
        "-serial", f"file:{work}/console.log",
        "-drive", f"id=root,file={work}/root.qcow2,format=qcow2,if=none",
        "-device", "virtio-blk-device,drive=root",
        "-device", "virtio-serial-device,max_ports=2",
        "-chardev", f"socket,id=agent,path={work}/agent.sock,server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=hearth.agent",
        "-qmp", f"unix:{work}/qmp.sock,server=on,wait=off",
    ]


def connect(path, timeout=10):
    deadline = time.monotonic() + timeout
    while True:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise TimeoutError(f"connecting to {path}")
            time.sleep(0.01)


def qmp_cont(path):
    s = connect(path)
    f = s.makefile("rwb")
    f.readline()  # greeting
    for cmd in ("qmp_capabilities", "cont"):
        f.write(json.dumps({"execute": cmd}).encode() + b"\n")
        f.flush()
        while True:
            reply = json.loads(f.readline())
            if "return" in reply or "error" in reply:
                break
        if "error" in reply:
            raise RuntimeError(f"QMP {cmd}: {reply}")
    return s


def boot(vmlinux, initramfs, work, extra_append=""):
    for name in ("agent.sock", "qmp.sock", "console.log"):
        if os.path.exists(os.path.join(work, name)):
            os.unlink(os.path.join(work, name))
    proc = subprocess.Popen(qemu_argv(vmlinux, initramfs, work, extra_append), stdin=subprocess.DEVNULL)
    agent = connect(os.path.join(work, "agent.sock"))
    t0 = time.monotonic()
    qmp = qmp_cont(os.path.join(work, "qmp.sock"))
    return proc, Guest(agent), qmp, t0


def wait_exit(proc, timeout=30):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return None


def main(vmlinux, initramfs, work):
    os.makedirs(work, exist_ok=True)
    make_rootfs(work)

    # The accelerator probe: marker on the console, then QEMU exits by itself.
    proc, _, _, t0 = boot(vmlinux, initramfs, work, " hearth.probe=1")
    rc = wait_exit(proc, 60)
    console = open(os.path.join(work, "console.log"), errors="replace").read()
    check("probe prints HEARTH-PROBE-OK and QEMU exits", rc is not None and "HEARTH-PROBE-OK" in console,
          f"{time.monotonic() - t0:.2f}s, qemu rc={rc}")

    proc, g, qmp, t0 = boot(vmlinux, initramfs, work)
    try:
        kind, sid, payload = g.recv()
        boot_s = time.monotonic() - t0
        hello = json.loads(payload) if kind == HELLO else {}
        check("Hello after cont", kind == HELLO and sid == 0 and hello.get("protocol_version") == PROTOCOL_VERSION,
              f"boot-to-Hello {boot_s:.2f}s, {hello}")

        g.send(PING, 0, {})
        kind, sid, _ = g.recv()
        check("Ping -> Pong", kind == PONG)

        started, out, err, st, _ = g.run(1, ["sh", "-c", "echo out; echo err >&2; exit 3"])
        check("stdout/stderr/exit code", started and out == b"out\n" and err == b"err\n" and st == {"code": 3, "signal": None},
              f"{out!r} {err!r} {st}")

        started, out, err, st, _ = g.run(2, ["no-such-command"])
        check("missing command exits 127", st.get("code") == 127 and b"command not found" in err, f"{err!r} {st}")

        _, _, err, st, _ = g.run(3, ["/data/notes.txt"])
        check("non-executable exits 126", st.get("code") == 126, f"{err!r} {st}")

        _, out, _, st, _ = g.run(4, ["id", "-u"], user="nobody")
        check("user nobody runs as 65534", out == b"65534\n" and st.get("code") == 0, f"{out!r} {st}")

        _, _, err, st, _ = g.run(5, ["id"], user="ghost")
        check("unknown user exits 126", st.get("code") == 126 and b"ghost" in err, f"{err!r} {st}")

        _, out, _, st, _ = g.run(6, ["sh", "-c", "pwd; hostname; echo $FOO"], env=["PATH=/bin", "FOO=bar"], workdir="/data")
        check("workdir, hostname, env", out == b"/data\nsmoke-1\nbar\n", f"{out!r}")

        _, out, _, st, stats = g.run(7, ["cat"], stdin=b"hello stdin\n")
        check("stdin round trip with credit", out == b"hello stdin\n" and st.get("code") == 0 and stats["stdin_credit"] == 12,
              f"{out!r} {st} {stats}")

        # Signal: a long sleep, killed through its process group.
        g.send(EXEC, 8, {"argv": ["sleep", "100"], "env": ["PATH=/bin"], "workdir": "", "user": "", "stdin": False})
        kind, _, _ = g.recv()
        g.send(SIGNAL, 8, {"signal": 9})
        while True:
            kind, sid, payload = g.recv()
            if sid == 8 and kind == EXIT:
                break
        check("Signal kills the process", json.loads(payload) == {"code": None, "signal": 9}, payload.decode())

        # Backpressure: without credit the guest stops at the window.
        g.send(EXEC, 9, {"argv": ["head", "-c", "3000000", "/dev/zero"], "env": ["PATH=/bin"], "workdir": "", "user": "", "stdin": False})
        got = 0
        deadline = time.monotonic() + TIMEOUT
        while got < INITIAL_WINDOW and time.monotonic() < deadline:
            kind, sid, payload = g.recv()
            if sid == 9 and kind == STDOUT:
                got += len(payload)
        stalled = True
        try:
            while True:
                kind, sid, payload = g.recv(timeout=2)
                if sid == 9 and kind == STDOUT:
                    got += len(payload)
                    stalled = False
        except TimeoutError:
            pass
        check("guest stops at the credit window", stalled and got == INITIAL_WINDOW, f"{got} bytes unacked")
        g.send(CREDIT, 9, {"bytes": got})
        total = got
        while True:
            kind, sid, payload = g.recv()
            if sid != 9:
                continue
            if kind == STDOUT:
                total += len(payload)
                g.send(CREDIT, 9, {"bytes": len(payload)})
            elif kind == EXIT:
                break
        check("output resumes after credit", total == 3000000, f"{total} bytes")

        size = 50_000_000
        t = time.monotonic()
        _, out, _, st, stats = g.run(10, ["head", "-c", str(size), "/dev/zero"])
        dt = time.monotonic() - t
        check("50 MB output arrives complete", len(out) == size and st.get("code") == 0 and stats["max_unacked"] <= INITIAL_WINDOW,
              f"{dt:.2f}s, {size / dt / 1e6:.1f} MB/s, largest frame {stats['max_unacked']}")

        # Grandchild holding stdout open: Exit still arrives (after the grace period).
        t = time.monotonic()
        _, out, _, st, _ = g.run(11, ["sh", "-c", "sleep 30 & echo parent-done"])
        check("background child does not hold Exit back", out == b"parent-done\n" and st.get("code") == 0,
              f"{time.monotonic() - t:.2f}s")

        # The host side may go away and come back (agent restart): the guest keeps serving.
        g.sock.close()
        time.sleep(0.3)
        g = Guest(connect(os.path.join(work, "agent.sock")))
        g.send(PING, 0, {})
        kind, _, _ = g.recv(timeout=30)
        check("reconnected host gets Pong", kind == PONG)

        t = time.monotonic()
        g.send(SHUTDOWN, 0, {})
        rc = wait_exit(proc, 60)
        check("Shutdown ends QEMU", rc is not None, f"{time.monotonic() - t:.2f}s, rc={rc}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        qmp.close()

    failed = [n for n, ok in results if not ok]
    print(f"{len(results) - len(failed)}/{len(results)} passed")
    if failed:
        print("console.log tail:\n" + open(os.path.join(work, "console.log"), errors="replace").read()[-3000:])
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
