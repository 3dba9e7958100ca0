#!/usr/bin/env python3
"""Bare QEMU restore of a Hearth snapshot directory, driven by nothing but QMP
and the guest protocol. This is the floor under Hearth's warm start on this stack.

Usage: bare-restore.py SNAPSHOT_DIR KERNEL INITRD RUNS [ping|workload|workload-net]
  (prints a JSON list of ms)
  ping (default): QEMU process start -> the guest agent's Pong.
  workload: QEMU process start -> the first output byte of busybox `echo ready`,
    after the same guest messages a Hearth restore sends, written together as
    Hearth queues them: `Restored` (fresh seed, clock, hostname, sandbox id, no
    network: eth0 down, as `--network none`) and the exec. The same guest work
    as a Hearth start, none of Hearth's host side.
  workload-net: as workload, but the `Restored` gives a network (address, MAC,
    routes; no tap behind the NIC), as a networked start.
"""
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time


def connect(path, proc, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{path} did not accept (qemu exit {proc.poll()})")
            time.sleep(0.001)


class Qmp:
    def __init__(self, sock):
        self.f = sock.makefile("rw")
        json.loads(self.f.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(f"{name}: {r['error']}")

    def wait_migration(self):
        while True:
            r = json.loads(self.f.readline())
            if r.get("event") == "MIGRATION":
                st = r["data"]["status"]
                if st == "completed":
                    return
                if st in ("failed", "cancelled"):
                    raise RuntimeError(f"migration {st}")


def frame(kind, payload=b"{}", fid=0):
    return struct.pack("<IBI", 5 + len(payload), kind, fid) + payload


# Frame kinds (crates/proto/src/lib.rs).
EXEC, STDOUT, ERROR, PING, PONG, RESTORED = 2, 4, 10, 12, 13, 14

# The network a `workload-net` restore is given (no tap behind it).
NET = {"ip": "10.200.0.5", "prefix": 32, "gateway": "10.200.0.1",
       "mac": "02:68:0a:c8:00:05", "dns": ["10.200.0.1"]}


def workload_frames(net):
    """`Restored` then the exec of `echo ready` (session 3), as one write."""
    restored = {"seed": list(os.urandom(64)), "unix_ms": int(time.time() * 1000),
                "hostname": "bare", "sandbox_id": "bare", "net_given": True}
    if net:
        restored["net"] = NET
    req = {"argv": ["echo", "ready"], "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
           "workdir": "", "user": "", "stdin": False}
    return (frame(RESTORED, json.dumps(restored).encode())
            + frame(EXEC, json.dumps(req).encode(), 3))


def read_frame(sock):
    def exact(n):
        b = b""
        while len(b) < n:
            chunk = sock.recv(n - len(b))
            if not chunk:
                raise RuntimeError("agent channel closed")
            b += chunk
        return b
    (length,) = struct.unpack("<I", exact(4))
    body = exact(length)
    return body[0], body[5:]


def restore_once(snap, manifest, nic, kernel, initrd, mode):
    work = tempfile.mkdtemp(prefix="bare-restore-")
    try:
        shutil.copy(os.path.join(snap, "disk.qcow2"), os.path.join(work, "root.qcow2"))
        qmp_path, agent_path = os.path.join(work, "qmp.sock"), os.path.join(work, "agent.sock")
        # The RAM block as long as the saved one (TCG snapshots carry a pad).
        kib = manifest["memory_mib"] * 1024 + manifest.get("ram_pad_kib", 0)
        if manifest["ram"] == "file":
            ram = f"memory-backend-file,id=ram,size={kib}K,mem-path={snap}/ram,share=off"
        else:
            ram = f"memory-backend-ram,id=ram,size={kib}K"
        accel = manifest["accel"]
        argv = [
            "qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,acpi=off",
            "-accel", accel, "-cpu", "host" if accel == "kvm" else "max",
            "-m", f"{kib}K", "-smp", str(manifest["cpus"]),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-S",
            "-kernel", kernel, "-initrd", initrd,
            "-append", "console=ttyS0 quiet reboot=t panic=-1 hearth.hostname=bare",
            "-serial", f"file:{work}/console.log",
            "-drive", f"id=root,file={work}/root.qcow2,format=qcow2,if=none",
            "-device", "virtio-blk-device,drive=root",
            "-device", "virtio-serial-device,max_ports=2",
            "-chardev", f"socket,id=agent,path={agent_path},server=on,wait=off",
            "-device", "virtserialport,chardev=agent,name=hearth.agent",
            "-qmp", f"unix:{qmp_path},server=on,wait=off",
        ]
        if nic:
            # A networked template's device, on hub 0 with no tap (as a warm-pool VM).
            argv += ["-netdev", "hubport,id=net0,hubid=0",
                     "-device", "virtio-net-device,netdev=net0,mac=02:68:00:00:00:00"]
        argv += [
            "-object", ram, "-machine", "memory-backend=ram",
            "-incoming", "defer",
        ]
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            qmp = Qmp(connect(qmp_path, proc))
            agent = connect(agent_path, proc)
            qmp.cmd("migrate-set-capabilities", {"capabilities": [
                {"capability": "x-ignore-shared", "state": True},
                {"capability": "events", "state": True}]})
            qmp.cmd("migrate-incoming", {"uri": f"exec:cat '{snap}/state'"})
            qmp.wait_migration()
            qmp.cmd("cont")
            if mode == "ping":
                agent.sendall(frame(PING))
                while read_frame(agent)[0] != PONG:
                    pass
            else:
                agent.sendall(workload_frames(mode == "workload-net"))
                while True:
                    kind, payload = read_frame(agent)
                    if kind == STDOUT:
                        break
                    if kind == ERROR:
                        raise RuntimeError(f"the guest refused the exec: {payload!r}")
            return (time.monotonic() - t0) * 1000.0
        finally:
            proc.kill()
            proc.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    snap, kernel, initrd, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    mode = sys.argv[5] if len(sys.argv) > 5 else "ping"
    if mode not in ("ping", "workload", "workload-net"):
        sys.exit(f"unknown mode {mode!r}: ping, workload or workload-net")
    with open(os.path.join(snap, "manifest.json")) as f:
        manifest = json.load(f)
    nic = False
    meta = os.path.join(snap, "template.json")
    if os.path.exists(meta):
        with open(meta) as f:
            nic = json.load(f).get("nic", False)
    print(json.dumps([restore_once(snap, manifest, nic, kernel, initrd, mode)
                      for _ in range(runs)]))


if __name__ == "__main__":
    main()
