//! The QEMU backend against real QEMU processes (no mocks).
//!
//! Most tests never boot a guest: they use a stand-in kernel (a bzImage header
//! whose entry is `jmp $`), which QEMU loads and can run forever, so lifecycle,
//! QMP, adoption and cleanup are tested without the guest artifacts.
//! `real_guest_boots_to_hello` needs ~/.cache/hearth/current/{vmlinux,initramfs.cpio.gz}
//! and skips with a notice when they are absent.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hearth_vmm::{
    destroy, is_alive, probe_accel, Accel, QemuVm, QemuVmm, Vm, VmConfig, VmExit, VmRecord, Vmm,
    VmmError,
};
use serde_json::Value;

mod common;
use common::{pid_exists, KillOnPanic};

struct Fixture {
    tmp: tempfile::TempDir,
    kernel: PathBuf,
    initrd: PathBuf,
    rootfs: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::Builder::new()
            .prefix("vmm")
            .tempdir_in("/tmp")
            .unwrap();
        let kernel = tmp.path().join("fake-bzImage");
        std::fs::write(&kernel, spinning_bzimage()).unwrap();
        let initrd = tmp.path().join("initrd.gz");
        std::fs::write(
            &initrd,
            b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00",
        )
        .unwrap();
        let rootfs = tmp.path().join("base.ext4");
        make_ext4(&rootfs);
        Fixture {
            tmp,
            kernel,
            initrd,
            rootfs,
        }
    }

    fn config(&self, id: &str) -> VmConfig {
        VmConfig {
            id: id.to_string(),
            dir: self.tmp.path().join(id),
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            rootfs: self.rootfs.clone(),
            cpus: 1,
            memory_mib: 128,
            hostname: id.to_string(),
            extra_cmdline: vec![],
            accel: Accel::Tcg,
            net: None,
            memory: hearth_vmm::GuestMemory::Anonymous,
            ram_kib: None,
        }
    }
}

/// A bzImage header QEMU accepts (boot protocol 2.15, initrd allowed) whose
/// real-mode and 32-bit entry points are `jmp $`: a guest that spins forever.
fn spinning_bzimage() -> Vec<u8> {
    let mut b = vec![0u8; 16 * 1024];
    b[0x1f1] = 1; // setup_sects
    b[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
    b[0x200..0x202].copy_from_slice(&[0xeb, 0xfe]);
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    b[0x211] = 1; // loadflags: LOADED_HIGH
    b[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
    b[1024..1026].copy_from_slice(&[0xeb, 0xfe]);
    b
}

fn make_ext4(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(64 << 20).unwrap();
    let st = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(path)
        .status()
        .expect("mkfs.ext4 (e2fsprogs) is needed by these tests");
    assert!(st.success());
}

fn vmm() -> QemuVmm {
    QemuVmm::new().expect("qemu-system-x86 and qemu-utils are installed (scripts/setup)")
}

async fn status(vm: &QemuVm) -> String {
    let v = vm.qmp().execute("query-status", Value::Null).await.unwrap();
    v["status"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn paused_vm_answers_qmp_and_records_itself() {
    let fx = Fixture::new();
    let cfg = fx.config("rec");
    let t0 = Instant::now();
    let vm = vmm().create_qemu(&cfg).await.unwrap();
    let _guard = KillOnPanic(vm.pid());
    let t = vm.timings().unwrap();
    println!(
        "create: {:?} total (qemu-img overlay {:?}, QEMU spawn -> QMP ready {:?})",
        t0.elapsed(),
        t.overlay,
        t.spawn_to_qmp
    );

    assert_eq!(status(&vm).await, "prelaunch");
    assert!(is_alive(&cfg.dir));
    let rec = VmRecord::load(&cfg.dir).unwrap();
    assert_eq!(rec.id, "rec");
    assert_eq!(rec.pid, vm.pid());
    assert_eq!(rec.backend, "qemu");
    assert_eq!(rec.accel, Accel::Tcg);
    assert_eq!(rec.agent_socket, cfg.dir.join("agent.sock"));
    assert!(rec.argv.iter().any(|a| a == "-S"));
    for f in [
        "root.qcow2",
        "qmp.sock",
        "agent.sock",
        "qemu.log",
        "vm.json",
    ] {
        assert!(cfg.dir.join(f).exists(), "{f} missing");
    }
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(cfg.dir.join("root.qcow2"))
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(
        info["backing-filename"].as_str().map(PathBuf::from),
        Some(fx.rootfs.canonicalize().unwrap())
    );

    // Own session: the VM does not die with our process group.
    // SAFETY: getsid(2) on a pid only reads.
    let sid = unsafe { libc::getsid(vm.pid() as i32) };
    assert_eq!(sid, vm.pid() as i32);

    let _agent = vm.connect_agent().await.unwrap();
    assert_eq!(
        vm.shutdown(Duration::from_secs(5)).await.unwrap(),
        VmExit::Exited(0)
    );
    destroy(&cfg.dir).unwrap();
}

#[tokio::test]
async fn pause_and_resume_wait_for_qemu_events() {
    let fx = Fixture::new();
    let cfg = fx.config("pr");
    let vm = vmm().create_qemu(&cfg).await.unwrap();
    let _guard = KillOnPanic(vm.pid());

    vm.pause().await.unwrap(); // not running yet: left as is
    assert_eq!(status(&vm).await, "prelaunch");
    vm.start().await.unwrap();
    assert_eq!(status(&vm).await, "running");
    vm.pause().await.unwrap();
    assert_eq!(status(&vm).await, "paused");
    vm.pause().await.unwrap();
    vm.resume().await.unwrap();
    assert_eq!(status(&vm).await, "running");
    vm.resume().await.unwrap();

    assert_eq!(
        vm.shutdown(Duration::from_secs(5)).await.unwrap(),
        VmExit::Exited(0)
    );
    destroy(&cfg.dir).unwrap();
}

#[tokio::test]
async fn killed_vm_is_reported_by_wait_and_qmp_errors_name_the_exit() {
    let fx = Fixture::new();
    let cfg = fx.config("kill");
    let vm: Box<dyn Vm> = vmm().create(&cfg).await.unwrap();
    let _guard = KillOnPanic(vm.pid());
    let pid = vm.pid();
    vm.start().await.unwrap();
    vm.kill().await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(10), vm.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit, VmExit::Signaled(libc::SIGKILL));
    assert!(!pid_exists(pid));
    assert!(!is_alive(&cfg.dir));
    let err = vm.pause().await.unwrap_err();
    assert!(matches!(err, VmmError::QemuExited { .. }), "{err}");
    vm.kill().await.unwrap(); // already gone: not an error
    destroy(&cfg.dir).unwrap();
}

#[tokio::test]
async fn vm_is_adopted_after_the_handle_is_dropped() {
    let fx = Fixture::new();
    let cfg = fx.config("adopt");
    let backend = vmm();
    let vm = backend.create_qemu(&cfg).await.unwrap();
    let _guard = KillOnPanic(vm.pid());
    let pid = vm.pid();
    vm.start().await.unwrap();
    drop(vm); // the "daemon restart"
    assert!(pid_exists(pid), "dropping the handle must not end the VM");

    let vm = backend.adopt_qemu(&cfg.dir).await.unwrap();
    let _guard = KillOnPanic(vm.pid());
    assert_eq!(vm.pid(), pid);
    assert_eq!(vm.id(), "adopt");
    assert_eq!(status(&vm).await, "running");
    vm.pause().await.unwrap();
    assert_eq!(status(&vm).await, "paused");
    vm.resume().await.unwrap();

    vm.kill().await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(10), vm.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit, VmExit::Gone);
    assert!(!is_alive(&cfg.dir));
    let err = backend.adopt(&cfg.dir).await.err().unwrap();
    assert!(matches!(err, VmmError::VmGone { .. }), "{err}");
    destroy(&cfg.dir).unwrap();
}

#[tokio::test]
async fn recycled_pid_is_not_adopted() {
    let fx = Fixture::new();
    let cfg = fx.config("reuse");
    let backend = vmm();
    let vm = backend.create_qemu(&cfg).await.unwrap();
    let _guard = KillOnPanic(vm.pid());

    let mut rec = VmRecord::load(&cfg.dir).unwrap();
    let real = rec.clone();
    rec.pid_start_time += 1;
    rec.store(&cfg.dir).unwrap();
    assert!(!is_alive(&cfg.dir));
    let err = backend.adopt(&cfg.dir).await.err().unwrap();
    assert!(
        matches!(err, VmmError::VmGone { ref reason, .. } if reason.contains("another process")),
        "{err}"
    );
    // and destroy must not take the live process for dead files only because the record says so
    real.store(&cfg.dir).unwrap();
    assert!(matches!(
        destroy(&cfg.dir),
        Err(VmmError::StillRunning { .. })
    ));

    vm.shutdown(Duration::from_secs(5)).await.unwrap();
    destroy(&cfg.dir).unwrap();
}

#[tokio::test]
async fn destroy_leaves_nothing_behind() {
    let fx = Fixture::new();
    let cfg = fx.config("gone");
    let vm = vmm().create_qemu(&cfg).await.unwrap();
    let _guard = KillOnPanic(vm.pid());
    let pid = vm.pid();
    let err = destroy(&cfg.dir).unwrap_err();
    assert!(matches!(err, VmmError::StillRunning { .. }), "{err}");

    vm.shutdown(Duration::from_secs(5)).await.unwrap();
    destroy(&cfg.dir).unwrap();
    assert!(!cfg.dir.exists());
    assert!(!pid_exists(pid));
    destroy(&cfg.dir).unwrap(); // idempotent
}

#[tokio::test]
async fn invalid_cpus_and_memory_are_rejected_before_anything_is_created() {
    let fx = Fixture::new();
    let backend = vmm();
    let cfg = VmConfig {
        cpus: 0,
        ..fx.config("cpu0")
    };
    let err = backend.create(&cfg).await.err().unwrap();
    assert!(
        matches!(err, VmmError::InvalidCpus { cpus: 0, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("1..="), "{err}");
    assert!(!cfg.dir.exists());

    let cfg = VmConfig {
        memory_mib: 32,
        ..fx.config("mem32")
    };
    let err = backend.create(&cfg).await.err().unwrap();
    assert!(
        matches!(err, VmmError::InvalidMemory { mib: 32, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("64.."), "{err}");

    let cfg = VmConfig {
        memory_mib: u32::MAX,
        ..fx.config("memmax")
    };
    assert!(matches!(
        backend.create(&cfg).await,
        Err(VmmError::InvalidMemory { .. })
    ));
    assert!(!cfg.dir.exists());
}

#[tokio::test]
async fn missing_binaries_say_how_to_install_them() {
    let err = QemuVmm::with_binaries(
        Path::new("/nonexistent/qemu-system-x86_64"),
        Path::new("qemu-img"),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("apt-get install qemu-system-x86"),
        "{err}"
    );
    let err = QemuVmm::with_binaries(
        Path::new("qemu-system-x86_64"),
        Path::new("no-such-qemu-img"),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("apt-get install qemu-utils"),
        "{err}"
    );
}

#[tokio::test]
async fn missing_kernel_is_named_in_the_error() {
    let fx = Fixture::new();
    let cfg = VmConfig {
        kernel: fx.tmp.path().join("nope"),
        ..fx.config("nok")
    };
    let err = vmm().create(&cfg).await.err().unwrap();
    assert!(
        matches!(err, VmmError::MissingArtifact { what: "kernel", .. }),
        "{err}"
    );
}

#[tokio::test]
async fn overlay_failure_carries_qemu_img_stderr() {
    let fx = Fixture::new();
    let cfg = fx.config("ovl");
    std::fs::create_dir_all(cfg.dir.join("root.qcow2")).unwrap();
    let err = vmm().create(&cfg).await.err().unwrap();
    assert!(
        matches!(err, VmmError::Overlay { ref stderr, .. } if !stderr.is_empty()),
        "{err}"
    );
    println!("{err}");
}

#[tokio::test]
async fn qemu_that_exits_at_once_is_reported_with_its_log_and_cleaned_up() {
    let fx = Fixture::new();
    let not_a_kernel = fx.tmp.path().join("zeros");
    std::fs::write(&not_a_kernel, vec![0u8; 4096]).unwrap();
    let cfg = VmConfig {
        kernel: not_a_kernel,
        ..fx.config("bad")
    };
    let err = vmm().create(&cfg).await.err().unwrap();
    assert!(matches!(err, VmmError::QemuExited { .. }), "{err}");
    assert!(err.to_string().contains("linux kernel too old"), "{err}");
    assert!(
        !cfg.dir.exists(),
        "a failed create must leave nothing behind"
    );
}

#[tokio::test]
async fn accel_probe_gives_up_on_kvm_within_its_timeout() {
    let fx = Fixture::new();
    let (kernel, initrd) = real_artifacts().unwrap_or((fx.kernel.clone(), fx.initrd.clone()));
    let qemu = vmm().qemu_binary().to_path_buf();
    let t0 = Instant::now();
    let report = probe_accel(&qemu, &kernel, &initrd, Duration::from_secs(4)).await;
    let took = t0.elapsed();
    println!("probe: {report:?} in {took:?}");
    assert!(took < Duration::from_secs(7), "probe took {took:?}");
    if report.accel == Accel::Tcg {
        assert!(
            report.reason.contains("NOT hardware isolation"),
            "{}",
            report.reason
        );
    }
}

fn real_artifacts() -> Option<(PathBuf, PathBuf)> {
    let home = std::env::var_os("HOME")?;
    let cur = Path::new(&home).join(".cache/hearth/current");
    let (k, i) = (cur.join("vmlinux"), cur.join("initramfs.cpio.gz"));
    (k.is_file() && i.is_file()).then_some((k, i))
}

#[tokio::test]
async fn real_guest_boots_to_hello() {
    let Some((kernel, initrd)) = real_artifacts() else {
        // why: CI (scripts/test) sets HEARTH_TEST_STRICT: a missing capability fails there.
        assert!(
            std::env::var_os("HEARTH_TEST_STRICT").is_none(),
            "this test cannot run here and HEARTH_TEST_STRICT forbids skipping it"
        );
        println!("SKIPPED real_guest_boots_to_hello: ~/.cache/hearth/current/{{vmlinux,initramfs.cpio.gz}} absent (run scripts/setup)");
        return;
    };
    let fx = Fixture::new();
    let cfg = VmConfig {
        kernel,
        initrd,
        memory_mib: 256,
        ..fx.config("boot")
    };
    let t0 = Instant::now();
    let vm = vmm().create_qemu(&cfg).await.unwrap();
    let _guard = KillOnPanic(vm.pid());
    let qmp_ready = t0.elapsed();
    let mut agent = vm.connect_agent().await.unwrap();
    vm.start().await.unwrap();
    let frame = tokio::time::timeout(
        Duration::from_secs(60),
        hearth_proto::read_frame_async(&mut agent),
    )
    .await;
    let hello = match frame {
        Ok(Ok(Some(f))) if f.kind == hearth_proto::Kind::Hello => {
            f.parse::<hearth_proto::Hello>().unwrap()
        }
        other => {
            let console = hearth_vmm::log_tail(&vm.console_log(), 3000);
            let _ = vm.shutdown(Duration::from_secs(2)).await;
            panic!("no Hello from the guest ({other:?}); console.log ends with:\n{console}");
        }
    };
    println!(
        "boot: create() -> QMP ready {:?} (QEMU spawn -> QMP {:?}), create() -> Hello {:?} (guest {} on kernel {})",
        qmp_ready,
        vm.timings().map(|t| t.spawn_to_qmp).unwrap_or_default(),
        t0.elapsed(),
        hello.agent_version,
        hello.kernel_release
    );
    assert_eq!(hello.protocol_version, hearth_proto::PROTOCOL_VERSION);
    vm.shutdown(Duration::from_secs(5)).await.unwrap();
    destroy(&cfg.dir).unwrap();
}
