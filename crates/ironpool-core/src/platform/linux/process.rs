//! Processes: handles that cannot outlive their pid (pidfd, `waitid(P_PIDFD)`),
//! dying with the parent (PR_SET_PDEATHSIG), adopting orphans
//! (PR_SET_CHILD_SUBREAPER), process groups, fork hooks and `/proc` scans
//! for children.

use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};

use super::poll::wait_readable;
use crate::task::ExitStatus;

/// A process handle that cannot be confused with a recycled pid.
#[derive(Debug)]
pub struct Pidfd {
    fd: OwnedFd,
    pid: i32,
}

impl Pidfd {
    /// Opens a handle on `pid`. Race-free only while the caller is the parent
    /// and has not reaped the child yet (a zombie keeps its pid).
    pub fn open(pid: i32) -> io::Result<Self> {
        let raw = Pid::from_raw(pid).ok_or_else(|| io::Error::other("pid 0"))?;
        let fd = rustix::process::pidfd_open(raw, PidfdFlags::empty())?;
        Ok(Self { fd, pid })
    }

    /// Adopts a pidfd received from another process (the zygote).
    pub fn from_fd(fd: OwnedFd, pid: i32) -> Self {
        Self { fd, pid }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends SIGKILL. ESRCH (already gone) is not an error.
    pub fn kill(&self) -> io::Result<()> {
        match rustix::process::pidfd_send_signal(&self.fd, Signal::KILL) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// A handle on this process's parent, or `None` if the parent is already
    /// gone. Race-free: the handle is kept only if the parent is still ours
    /// after it was opened (a dead parent's pid changes `getppid`).
    pub fn of_parent() -> io::Result<Option<Self>> {
        let Some(ppid) = rustix::process::getppid() else {
            return Ok(None);
        };
        let fd = match rustix::process::pidfd_open(ppid, PidfdFlags::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::SRCH) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if rustix::process::getppid() != Some(ppid) {
            return Ok(None);
        }
        Ok(Some(Self {
            fd,
            pid: ppid.as_raw_nonzero().get(),
        }))
    }

    /// True once the process has exited (it may still await reaping).
    pub fn has_exited(&self) -> bool {
        self.wait_exited(Duration::ZERO)
    }

    /// Waits up to `limit` for the process to exit; true if it did.
    pub fn wait_exited(&self, limit: Duration) -> bool {
        loop {
            match wait_readable(&self.fd, Some(limit)) {
                Ok(exited) => return exited,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // A pidfd that cannot be polled: treat the process as gone
                // rather than wait on it forever.
                Err(_) => return true,
            }
        }
    }

    /// Reaps the child if it has exited. Only valid for our own children.
    pub fn try_reap(&self) -> io::Result<Option<ExitStatus>> {
        let status = rustix::process::waitid(
            WaitId::PidFd(self.fd.as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
        )?;
        Ok(status.and_then(|s| {
            if let Some(code) = s.exit_status() {
                Some(ExitStatus::Code(code))
            } else {
                s.terminating_signal().map(ExitStatus::Signal)
            }
        }))
    }
}

impl AsFd for Pidfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Called in a freshly forked child: die with SIGKILL when the forking thread
/// of `expected_parent` goes away. Returns false if the parent is already gone
/// (the race PR_SET_PDEATHSIG cannot close by itself).
pub fn die_with_parent(expected_parent: i32) -> bool {
    if rustix::process::set_parent_process_death_signal(Some(Signal::KILL)).is_err() {
        return false;
    }
    rustix::process::getppid().map(|p| p.as_raw_nonzero().get()) == Some(expected_parent)
}

/// Called in a process that has armed `die_with_parent` and now watches its
/// parent another way (a pidfd): it may outlive the parent long enough to
/// clean up after it.
pub fn stop_dying_with_parent() -> io::Result<()> {
    rustix::process::set_parent_process_death_signal(None)?;
    Ok(())
}

/// Makes this process the reaper of its orphaned descendants
/// (PR_SET_CHILD_SUBREAPER): a process whose parent dies is reparented to
/// the nearest such ancestor instead of to PID 1. Not inherited over fork.
pub fn become_child_subreaper() -> io::Result<()> {
    rustix::process::set_child_subreaper(rustix::process::Pid::from_raw(current_pid()))?;
    Ok(())
}

/// Called in a freshly forked child: starts a process group of its own
/// (pgid = its pid), which its descendants join unless they leave it.
pub fn start_own_process_group() -> io::Result<()> {
    rustix::process::setpgid(None, None)?;
    Ok(())
}

/// The parent's half of [`start_own_process_group`], closing the race in
/// which the parent signals the group before the child has created it.
/// Errors (the child already exited, or did it itself) are of no interest.
pub fn put_in_own_process_group(pid: i32) {
    if let Some(p) = Pid::from_raw(pid) {
        let _ = rustix::process::setpgid(Some(p), Some(p));
    }
}

/// SIGKILLs every process in the process group `pgid`. No such group
/// (already empty) is not an error. Only race-free while something holds
/// the pid `pgid` (a live or unreaped leader, or any member of the group).
pub fn kill_process_group(pgid: i32) -> io::Result<()> {
    let Some(p) = Pid::from_raw(pgid) else {
        return Ok(());
    };
    match rustix::process::kill_process_group(p, Signal::KILL) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Pids of this process's children, live or unreaped, adopted ones
/// included (`/proc/self/task/*/children`; a scan of `/proc` if the kernel
/// has no such file).
pub fn own_children() -> Vec<i32> {
    let mut out = Vec::new();
    let mut found_file = false;
    if let Ok(tasks) = fs::read_dir("/proc/self/task") {
        for task in tasks.filter_map(Result::ok) {
            if let Ok(text) = fs::read_to_string(task.path().join("children")) {
                found_file = true;
                out.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok()),
                );
            }
        }
    }
    if !found_file {
        let me = current_pid();
        if let Ok(dir) = fs::read_dir("/proc") {
            for e in dir.filter_map(Result::ok) {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                if parent_of(pid) == Some(me) {
                    out.push(pid);
                }
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The parent pid of `pid`, from `/proc/<pid>/stat`.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command: state, ppid, ...
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

pub fn current_pid() -> i32 {
    rustix::process::getpid().as_raw_nonzero().get()
}

/// Registers handlers that `fork()` runs in the forking thread: `prepare`
/// just before, `in_parent` and `in_child` just after, on each side.
///
/// # Safety
///
/// The handlers run inside `fork()`. In the child of a multithreaded process
/// they may only do what is safe there: no allocation, and no lock another
/// thread may hold (except one that `prepare` itself took).
pub unsafe fn run_around_fork(
    prepare: extern "C" fn(),
    in_parent: extern "C" fn(),
    in_child: extern "C" fn(),
) -> io::Result<()> {
    // SAFETY: the caller vouches for the handlers (see above); registering
    // them is itself thread-safe.
    let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(in_parent), Some(in_child)) };
    match rc {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Test support: forks the calling process as it is (fork handlers run, no
/// interpreter hooks), runs `child` in the child and leaves it at once
/// without unwinding; the parent waits for the child to exit.
///
/// # Safety
///
/// `child` runs in the child of a multithreaded process: it may only do
/// what is safe there (plain memory access; no allocation, no locks).
#[cfg(test)]
pub(crate) unsafe fn run_in_forked_child(child: impl FnOnce()) -> io::Result<()> {
    // SAFETY: the child only runs `child` (see above) and `_exit`s.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        child();
        // SAFETY: leaves the child without running the test harness.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child, into a local.
    if unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
