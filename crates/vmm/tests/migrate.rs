//! Live migration between two real QEMU processes on this host: the guest
//! agent answers on the target after the switch-over, and a migration into a
//! stream nobody reads gives up with the source still running.
//! Needs ~/.cache/hearth/current/{vmlinux,initramfs.cpio.gz}; skips without them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hearth_proto::{read_frame_async, write_frame_async, Empty, Frame, Kind};
use hearth_vmm::{
    Accel, MigrationParams, MigrationProgress, MigrationState, QemuVm, QemuVmm, Vm, VmConfig,
    VmmError,
};
use serde_json::Value;

mod common;
use common::KillOnPanic;

fn artifacts() -> Option<(PathBuf, PathBuf)> {
    let cur = Path::new(&std::env::var_os("HOME")?).join(".cache/hearth/current");
    let (k, i) = (cur.join("vmlinux"), cur.join("initramfs.cpio.gz"));
    (k.is_file() && i.is_file()).then_some((k, i))
}

fn config(tmp: &Path, id: &str, kernel: &Path, initrd: &Path, rootfs: &Path) -> VmConfig {
    VmConfig {
        id: id.into(),
        dir: tmp.join(id),
        kernel: kernel.into(),
        initrd: initrd.into(),
        rootfs: rootfs.into(),
        cpus: 1,
        memory_mib: 128,
        hostname: "mig".into(),
        extra_cmdline: vec![],
        accel: Accel::Tcg,
        net: None,
        memory: hearth_vmm::GuestMemory::SharedFile,
        ram_kib: None,
    }
}

fn ext4(path: &Path) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let st = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

async fn booted_source(cfg: &VmConfig) -> QemuVm {
    let vm = QemuVmm::new().unwrap().create_qemu(cfg).await.unwrap();
    let _guard = KillOnPanic(vm.pid());
    let mut agent = vm.connect_agent().await.unwrap();
    vm.start().await.unwrap();
    let hello = tokio::time::timeout(Duration::from_secs(60), read_frame_async(&mut agent))
        .await
        .expect("hello within 60s")
        .unwrap()
        .unwrap();
    assert_eq!(hello.kind, Kind::Hello);
    vm
}

async fn status(vm: &QemuVm) -> String {
    let v = vm.qmp().execute("query-status", Value::Null).await.unwrap();
    v["status"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn migrated_guest_answers_ping_on_the_target() {
    let Some((kernel, initrd)) = artifacts() else {
        // why: CI (scripts/test) sets HEARTH_TEST_STRICT: a missing capability fails there.
        assert!(
            std::env::var_os("HEARTH_TEST_STRICT").is_none(),
            "this test cannot run here and HEARTH_TEST_STRICT forbids skipping it"
        );
        println!("SKIPPED: guest artifacts absent (run scripts/setup)");
        return;
    };
    let tmp = tempfile::Builder::new()
        .prefix("mig")
        .tempdir_in("/tmp")
        .unwrap();
    let rootfs = tmp.path().join("base.ext4");
    ext4(&rootfs);
    let src_cfg = config(tmp.path(), "src", &kernel, &initrd, &rootfs);
    let dst_cfg = config(tmp.path(), "dst", &kernel, &initrd, &rootfs);
    let src = booted_source(&src_cfg).await;
    let _src_guard = KillOnPanic(src.pid());
    let incoming = tmp.path().join("in.sock");
    let dst = QemuVmm::new()
        .unwrap()
        .create_incoming_qemu(&dst_cfg, &incoming)
        .await
        .unwrap();
    let _dst_guard = KillOnPanic(dst.pid());

    let (tx, _rx) = tokio::sync::watch::channel(MigrationProgress::default());
    let done = src
        .migrate_out(&incoming, &MigrationParams::default(), &tx, None)
        .await
        .unwrap();
    println!("migration: {done:?}");
    assert_eq!(done.state, MigrationState::Completed);
    assert!(done.downtime_ms.is_some());
    // why: `migrate_out` answers as soon as QEMU says `completed` (issue 7),
    // when the run state may still be `finish-migrate` a moment; paused either way.
    let st = status(&src).await;
    assert!(st == "postmigrate" || st == "finish-migrate", "{st}");

    dst.wait_incoming(Duration::from_secs(30)).await.unwrap();
    dst.start().await.unwrap();
    let mut agent = dst.connect_agent().await.unwrap();
    write_frame_async(&mut agent, &Frame::json(Kind::Ping, 0, &Empty {}))
        .await
        .unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(30), read_frame_async(&mut agent))
        .await
        .expect("pong within 30s")
        .unwrap()
        .unwrap();
    assert_eq!(pong.kind, Kind::Pong);

    src.kill().await.unwrap();
    dst.kill().await.unwrap();
    let _ = src.wait().await;
    let _ = dst.wait().await;
}

#[tokio::test]
async fn migration_that_cannot_converge_gives_up_and_the_source_runs_on() {
    let Some((kernel, initrd)) = artifacts() else {
        // why: CI (scripts/test) sets HEARTH_TEST_STRICT: a missing capability fails there.
        assert!(
            std::env::var_os("HEARTH_TEST_STRICT").is_none(),
            "this test cannot run here and HEARTH_TEST_STRICT forbids skipping it"
        );
        println!("SKIPPED: guest artifacts absent (run scripts/setup)");
        return;
    };
    let tmp = tempfile::Builder::new()
        .prefix("mig")
        .tempdir_in("/tmp")
        .unwrap();
    let rootfs = tmp.path().join("base.ext4");
    ext4(&rootfs);
    let src_cfg = config(tmp.path(), "src", &kernel, &initrd, &rootfs);
    let dst_cfg = config(tmp.path(), "dst", &kernel, &initrd, &rootfs);
    let src = booted_source(&src_cfg).await;
    let _src_guard = KillOnPanic(src.pid());
    let incoming = tmp.path().join("in.sock");
    let dst = QemuVmm::new()
        .unwrap()
        .create_incoming_qemu(&dst_cfg, &incoming)
        .await
        .unwrap();
    let _dst_guard = KillOnPanic(dst.pid());
    // 1 MiB/s cannot move 128 MiB within the 2 s bound.
    let params = MigrationParams {
        max_bandwidth: 1 << 20,
        give_up_after: Duration::from_secs(2),
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::watch::channel(MigrationProgress::default());
    let err = src
        .migrate_out(&incoming, &params, &tx, None)
        .await
        .unwrap_err();
    assert!(matches!(err, VmmError::MigrationFailed { .. }), "{err}");
    assert!(
        err.to_string().contains("did not finish within 2s"),
        "{err}"
    );
    assert_eq!(rx.borrow().state, MigrationState::Failed);
    assert_eq!(status(&src).await, "running");

    src.kill().await.unwrap();
    dst.kill().await.unwrap();
    let _ = src.wait().await;
    let _ = dst.wait().await;
}

/// Issue 7: `migrate_out` no longer waits for the source to leave
/// `finish-migrate`; a resume right after it (a refused hand-over) waits for
/// that itself, so the guest runs again and stays running (a `cont` in
/// `finish-migrate` would be undone by QEMU's move to `postmigrate`).
#[tokio::test]
async fn a_source_resumed_right_after_its_migration_completed_runs_again() {
    let Some((kernel, initrd)) = artifacts() else {
        // why: CI (scripts/test) sets HEARTH_TEST_STRICT: a missing capability fails there.
        assert!(
            std::env::var_os("HEARTH_TEST_STRICT").is_none(),
            "this test cannot run here and HEARTH_TEST_STRICT forbids skipping it"
        );
        println!("SKIPPED: guest artifacts absent (run scripts/setup)");
        return;
    };
    let tmp = tempfile::Builder::new()
        .prefix("mig")
        .tempdir_in("/tmp")
        .unwrap();
    let rootfs = tmp.path().join("base.ext4");
    ext4(&rootfs);
    let src_cfg = config(tmp.path(), "src", &kernel, &initrd, &rootfs);
    let dst_cfg = config(tmp.path(), "dst", &kernel, &initrd, &rootfs);
    let src = booted_source(&src_cfg).await;
    let _src_guard = KillOnPanic(src.pid());
    let incoming = tmp.path().join("in.sock");
    let dst = QemuVmm::new()
        .unwrap()
        .create_incoming_qemu(&dst_cfg, &incoming)
        .await
        .unwrap();
    let _dst_guard = KillOnPanic(dst.pid());
    let (tx, _rx) = tokio::sync::watch::channel(MigrationProgress::default());
    let done = src
        .migrate_out(&incoming, &MigrationParams::default(), &tx, None)
        .await
        .unwrap();
    assert_eq!(done.state, MigrationState::Completed);
    src.resume().await.unwrap();
    assert_eq!(status(&src).await, "running");
    let mut agent = src.connect_agent().await.unwrap();
    write_frame_async(&mut agent, &Frame::json(Kind::Ping, 0, &Empty {}))
        .await
        .unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(30), read_frame_async(&mut agent))
        .await
        .expect("pong from the resumed source within 30s")
        .unwrap()
        .unwrap();
    assert_eq!(pong.kind, Kind::Pong);
    assert_eq!(status(&src).await, "running");

    src.kill().await.unwrap();
    dst.kill().await.unwrap();
    let _ = src.wait().await;
    let _ = dst.wait().await;
}
