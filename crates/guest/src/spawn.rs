//! Starts an exec request's process the way `vfork` does: `clone(CLONE_VM |
//! CLONE_VFORK)` on a stack of its own, so the agent's page tables are not copied
//! and its memory takes no copy-on-write faults afterwards (under TCG each of
//! those runs kernel code translated afresh in a restored VM). The child shares
//! the agent's memory until `execve`, so it only makes raw syscalls on data
//! prepared here: no allocation, no locks, nothing of libc's that touches shared
//! state. A setup step or `execve` that fails sends its errno back over a
//! close-on-exec pipe and the child exits 127; the caller sees that errno.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_long, c_void, CString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::user::Identity;

/// Stack of the child between `clone` and `execve`; it runs a few syscalls.
const CHILD_STACK: usize = 64 * 1024;

/// What to run and how, prepared before the child exists.
pub struct Plan<'a> {
    /// Path of the program inside `root`.
    pub program: &'a str,
    pub argv: &'a [String],
    /// `KEY=VALUE` entries; the last of a key wins, entries without `=` are skipped.
    pub env: &'a [String],
    pub root: &'a str,
    /// Working directory inside `root`.
    pub workdir: &'a str,
    pub ident: &'a Identity,
    /// A pipe for stdin, or /dev/null.
    pub stdin: bool,
}

/// A started process: its pid and the agent's ends of its pipes.
pub struct Spawned {
    pub pid: u32,
    pub stdin: Option<File>,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Everything the child reads, by raw pointer, between `clone` and `execve`.
struct Child {
    program: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    root: *const c_char,
    workdir: *const c_char,
    groups: *const libc::gid_t,
    ngroups: usize,
    gid: libc::gid_t,
    uid: libc::uid_t,
    /// Sources of the child's fds 0, 1 and 2, none of them below 3.
    stdio: [RawFd; 3],
    /// Write end of the error pipe (close-on-exec).
    report: RawFd,
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "nul byte found in provided data",
        )
    })
}

fn cvt(rc: c_int) -> io::Result<c_int> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into `fds`, which lives across the call.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both fds were just created by pipe2 and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `fd` itself, or a close-on-exec copy of it at 3 or above, so that the
/// child's `dup2` onto 0, 1 and 2 never overwrites a source it still needs.
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC takes an int, no pointers; `fd` is open.
    let copy = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) })?;
    // SAFETY: `copy` was just created by fcntl and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

fn dev_null() -> io::Result<OwnedFd> {
    let f = std::fs::OpenOptions::new().read(true).open("/dev/null")?;
    Ok(OwnedFd::from(f))
}

/// A NULL-terminated pointer array over `strings` (which must outlive it).
fn pointers(strings: &[CString]) -> Vec<*const c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// Starts `plan`'s process. On `Err` no process is left behind (a child that
/// failed before `execve` has been reaped), so the caller must hold whatever
/// keeps other reapers away (the session table) across this call.
pub fn spawn(plan: &Plan<'_>) -> io::Result<Spawned> {
    let program = cstring(plan.program)?;
    let argv = plan
        .argv
        .iter()
        .map(|a| cstring(a))
        .collect::<io::Result<Vec<_>>>()?;
    // why: as std's Command::env does: one value per key, sorted by key.
    let env: BTreeMap<&str, &str> = plan.env.iter().filter_map(|e| e.split_once('=')).collect();
    let envp = env
        .iter()
        .map(|(k, v)| cstring(&format!("{k}={v}")))
        .collect::<io::Result<Vec<_>>>()?;
    let root = cstring(plan.root)?;
    let workdir = cstring(plan.workdir)?;
    let argv_ptrs = pointers(&argv);
    let envp_ptrs = pointers(&envp);

    let (stdin_child, stdin_ours) = match plan.stdin {
        true => {
            let (r, w) = pipe()?;
            (r, Some(w))
        }
        false => (dev_null()?, None),
    };
    let (stdout_ours, stdout_child) = pipe()?;
    let (stderr_ours, stderr_child) = pipe()?;
    let stdio = [
        above_stdio(stdin_child)?,
        above_stdio(stdout_child)?,
        above_stdio(stderr_child)?,
    ];
    let (report_read, report_write) = pipe()?;

    let child = Child {
        program: program.as_ptr(),
        argv: argv_ptrs.as_ptr(),
        envp: envp_ptrs.as_ptr(),
        root: root.as_ptr(),
        workdir: workdir.as_ptr(),
        groups: plan.ident.groups.as_ptr(),
        ngroups: plan.ident.groups.len(),
        gid: plan.ident.gid,
        uid: plan.ident.uid,
        stdio: [
            stdio[0].as_raw_fd(),
            stdio[1].as_raw_fd(),
            stdio[2].as_raw_fd(),
        ],
        report: report_write.as_raw_fd(),
    };
    let mut stack: Vec<u8> = Vec::with_capacity(CHILD_STACK);
    // why: the stack grows down; x86-64 wants it 16-byte aligned at the call.
    let top = (stack.as_mut_ptr() as usize + CHILD_STACK) & !15;

    let pid = {
        // why: no signal handler may run in the child while it shares our memory;
        // it starts with everything blocked and sets its own mask before execve.
        let _blocked = BlockSignals::all()?;
        // SAFETY: CLONE_VFORK suspends this thread until the child has called
        // execve or exited, so `child`, the strings it points to and `stack` outlive
        // the child's use of them; the child runs only `child_main` on `stack`.
        unsafe {
            libc::clone(
                child_main,
                top as *mut c_void,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                std::ptr::addr_of!(child) as *mut c_void,
            )
        }
    };
    let pid = cvt(pid)?;
    drop(report_write);
    drop(stdio);

    let mut errno = [0u8; 4];
    let mut report = File::from(report_read);
    let mut got = 0;
    while got < errno.len() {
        match report.read(&mut errno[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if got == 0 {
        return Ok(Spawned {
            pid: pid as u32,
            stdin: stdin_ours.map(File::from),
            stdout: stdout_ours,
            stderr: stderr_ours,
        });
    }
    let mut status = 0;
    // SAFETY: `status` is a valid c_int across the call; the child is ours and has exited.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break;
        }
    }
    if got < errno.len() {
        return Err(io::Error::other("the child's error report was cut short"));
    }
    Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)))
}

/// The calling thread's signal mask with every signal blocked, restored on drop.
struct BlockSignals(libc::sigset_t);

impl BlockSignals {
    fn all() -> io::Result<BlockSignals> {
        // SAFETY: sigset_t is plain data; sigfillset and pthread_sigmask only
        // write the sets passed, which live across the calls.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            let rc = libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            Ok(BlockSignals(old))
        }
    }
}

impl Drop for BlockSignals {
    fn drop(&mut self) {
        // SAFETY: restores a mask pthread_sigmask returned; the set lives across the call.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// The kernel's `struct sigaction` for `rt_sigaction` (x86-64 layout).
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// A raw syscall's result: the errno on failure. Only the errno of the thread
/// that called `clone` (suspended meanwhile) is touched.
fn sys(rc: c_long) -> Result<(), c_int> {
    if rc < 0 {
        // SAFETY: __errno_location returns this thread's errno slot, always valid.
        return Err(unsafe { *libc::__errno_location() });
    }
    Ok(())
}

impl Child {
    /// The child's setup and `execve`; returns only on failure, with the errno.
    ///
    /// # Safety
    /// Every pointer in `self` must be valid (NUL-terminated strings, NULL-terminated
    /// arrays, `ngroups` gids) for the whole call.
    unsafe fn exec(&self) -> c_int {
        // why: raw syscalls only: libc's setuid/setgid/setgroups (musl) would try
        // to apply the change to every thread of the agent, whose memory we share.
        let run = || -> Result<(), c_int> {
            for (target, &fd) in self.stdio.iter().enumerate() {
                sys(libc::syscall(libc::SYS_dup2, fd, target as c_int))?;
            }
            // why: as std's Command: the agent ignores SIGPIPE, the workload must not.
            let default = KernelSigaction {
                handler: libc::SIG_DFL,
                flags: 0,
                restorer: 0,
                mask: 0,
            };
            let nothing: u64 = 0;
            sys(libc::syscall(
                libc::SYS_rt_sigaction,
                libc::SIGPIPE,
                &default as *const KernelSigaction,
                std::ptr::null::<KernelSigaction>(),
                8usize,
            ))?;
            sys(libc::syscall(libc::SYS_setsid))?;
            sys(libc::syscall(libc::SYS_chroot, self.root))?;
            sys(libc::syscall(libc::SYS_chdir, self.workdir))?;
            sys(libc::syscall(
                libc::SYS_setgroups,
                self.ngroups,
                self.groups,
            ))?;
            sys(libc::syscall(libc::SYS_setgid, self.gid))?;
            sys(libc::syscall(libc::SYS_setuid, self.uid))?;
            sys(libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                &nothing as *const u64,
                std::ptr::null::<u64>(),
                8usize,
            ))?;
            sys(libc::syscall(
                libc::SYS_execve,
                self.program,
                self.argv,
                self.envp,
            ))
        };
        match run() {
            Ok(()) => 0,
            Err(errno) => errno,
        }
    }
}

/// The child's entry point: `arg` is a `*const Child` (see `spawn`).
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `spawn` passes a pointer to a `Child` whose pointers stay valid while
    // its thread is suspended by CLONE_VFORK, i.e. for this whole function.
    let child = unsafe { &*(arg as *const Child) };
    // SAFETY: as above, `child`'s pointers are valid for the call.
    let errno = unsafe { child.exec() }.to_ne_bytes();
    // SAFETY: write and _exit are plain syscalls; `errno` lives across the write.
    unsafe {
        libc::syscall(libc::SYS_write, child.report, errno.as_ptr(), errno.len());
        libc::syscall(libc::SYS_exit, 127);
    }
    127
}
