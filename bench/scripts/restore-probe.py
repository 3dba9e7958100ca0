#!/usr/bin/env python3
"""Where a restored guest spends its time, without Hearth's host side: restores
a Hearth template or snapshot directory with bare QEMU (as bare-restore.py
does), then times each guest step as its own round trip on the agent channel:
the first `Restored` (or a `Ping` with PROBE=ping), the same message again,
the first `exec` of busybox `echo` to its first output byte, and a second one.
A step's first run in a fresh QEMU pays TCG's translation of its guest code
(kernel and agent); the repeat does not, so the difference is that cost.

Usage: restore-probe.py SNAPSHOT_DIR KERNEL INITRD RUNS
  PROBE=none (default): Restored with no network (eth0 taken down)
  PROBE=net:  Restored with a network (eth0 reconfigured; no tap behind it)
  PROBE=ping: Ping instead of Restored (the exec then runs unrestored)
  VARIANT=nonet,noseed,nohost: leave those parts out of the Restored
  (noseed makes the guest refuse the execs: it could not reseed)
Prints the medians, ms: cont (process start -> VM resumed), first message,
second message, first exec, second exec. The snapshot's disk.qcow2 must find
its backing file.
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

NET = {"ip":"10.200.0.5","prefix":32,"gateway":"10.200.0.1","mac":"02:68:0a:c8:00:05","dns":["10.200.0.1"]}
def restored(net):
    v = os.environ.get("VARIANT", "")
    m = {"seed": [] if "noseed" in v else list(os.urandom(64)), "unix_ms": int(time.time()*1000), "hostname": "" if "nohost" in v else "probe", "sandbox_id": "probe", "net_given": "nonet" not in v}
    if net: m["net"] = NET
    return frame(14, json.dumps(m).encode())
def timed(agent, data, want):
    t = time.monotonic()
    agent.sendall(data)
    while True:
        k, p = read_frame(agent)
        if k == want: break
        if k == 10: raise RuntimeError(p)
    return (time.monotonic()-t)*1000.0
SID=[2]
def exe():
    SID[0]+=1
    req={"argv":["echo","ready"],"env":["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],"workdir":"","user":"","stdin":False}
    return frame(2, json.dumps(req).encode(), SID[0])



def restore_once(snap, manifest, nic, kernel, initrd):
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
            tc = (time.monotonic() - t0) * 1000.0
            mode = os.environ.get("PROBE", "none")
            r = [tc]
            if mode == "ping":
                r.append(timed(agent, frame(12), 13))
            else:
                r.append(timed(agent, restored(mode == "net"), 15))
                r.append(timed(agent, restored(mode == "net"), 15))
            r.append(timed(agent, exe(), 4))
            r.append(timed(agent, exe(), 4))
            return r
        finally:
            proc.kill()
            proc.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    snap, kernel, initrd, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with open(os.path.join(snap, "manifest.json")) as f:
        manifest = json.load(f)
    nic = False
    meta = os.path.join(snap, "template.json")
    if os.path.exists(meta):
        with open(meta) as f:
            nic = json.load(f).get("nic", False)
    rs=[restore_once(snap, manifest, nic, kernel, initrd) for _ in range(runs)]
    import statistics
    cols=list(zip(*rs))
    print(os.environ.get("PROBE","none"), " ".join(f"{statistics.median(c):.1f}" for c in cols))


if __name__ == "__main__":
    main()
