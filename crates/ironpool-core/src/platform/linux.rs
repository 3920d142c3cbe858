//! Linux: pidfd, waitid(P_PIDFD), PR_SET_PDEATHSIG, memfd, cgroup v2 quotas.

use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::RwLock;
use std::time::Duration;

use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};

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
        let mut fds = [rustix::event::PollFd::new(
            &self.fd,
            rustix::event::PollFlags::IN,
        )];
        let ts = rustix::time::Timespec {
            tv_sec: limit.as_secs() as i64,
            tv_nsec: limit.subsec_nanos() as i64,
        };
        loop {
            match rustix::event::poll(&mut fds, Some(&ts)) {
                Ok(n) => return n > 0,
                Err(rustix::io::Errno::INTR) => continue,
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

/// Workers to start by default: the CPUs this process may run on, further
/// capped by a cgroup v2 `cpu.max` quota (containers with `--cpus`).
pub fn default_workers() -> usize {
    let affinity = rustix::thread::sched_getaffinity(None)
        .map(|set| set.count() as usize)
        .unwrap_or(0);
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpus = if affinity > 0 { affinity } else { online };
    let quota = cgroup_cpu_quota().unwrap_or(usize::MAX);
    cpus.min(quota).max(1)
}

/// `ceil(quota / period)` from this process's cgroup v2 `cpu.max`, if limited.
pub fn cgroup_cpu_quota() -> Option<usize> {
    let cgroup = fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    // Walk from our cgroup up to the root: the tightest limit wins.
    let mut best: Option<usize> = None;
    let mut path = std::path::PathBuf::from(format!("/sys/fs/cgroup{rel}"));
    loop {
        if let Ok(text) = fs::read_to_string(path.join("cpu.max")) {
            if let Some(n) = parse_cpu_max(&text) {
                best = Some(best.map_or(n, |b| b.min(n)));
            }
        }
        if !path.pop() || !path.starts_with("/sys/fs/cgroup") {
            break;
        }
    }
    best
}

/// Parses `"<quota> <period>"`; `"max ..."` means unlimited.
pub fn parse_cpu_max(text: &str) -> Option<usize> {
    let mut parts = text.split_whitespace();
    let quota: f64 = parts.next()?.parse().ok()?;
    let period: f64 = parts.next()?.parse().ok()?;
    if quota <= 0.0 || period <= 0.0 {
        return None;
    }
    Some(((quota / period).ceil() as usize).max(1))
}

/// Private resident memory of `pid` in bytes (resident minus file-backed and
/// shared pages, so mapped input segments do not count), from
/// `/proc/<pid>/statm`: one short read, cheap enough to do after every task.
pub fn resident_bytes(pid: i32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let mut fields = text.split_whitespace().skip(1);
    let resident: u64 = fields.next()?.parse().ok()?;
    let shared: u64 = fields.next()?.parse().ok()?;
    Some(resident.saturating_sub(shared) * rustix::param::page_size() as u64)
}

/// An anonymous, sealable shared-memory file. Never a path in /dev/shm, so
/// nothing is left behind when any holder is SIGKILLed.
pub fn memfd(name: &str) -> io::Result<OwnedFd> {
    use rustix::fs::MemfdFlags;
    let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    match rustix::fs::memfd_create(name, flags | MemfdFlags::NOEXEC_SEAL) {
        Ok(fd) => Ok(fd),
        // Kernels before 6.3 do not know MFD_NOEXEC_SEAL.
        Err(rustix::io::Errno::INVAL) => Ok(rustix::fs::memfd_create(name, flags)?),
        Err(e) => Err(e.into()),
    }
}

/// Forbids any further change of size or content.
pub fn seal_readonly(fd: BorrowedFd<'_>) -> io::Result<()> {
    use rustix::fs::SealFlags;
    rustix::fs::fcntl_add_seals(
        fd,
        SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL,
    )?;
    Ok(())
}

/// Whether no page of `[addr, addr + len)` was written since the range was
/// mapped privately from a file: no page is anonymous (copied on write) or
/// swapped out. Reads `/proc/self/pagemap`, whose flag bits need no privilege.
pub fn pages_unmodified(addr: usize, len: usize) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE_PAGE: u64 = 1 << 61;
    if len == 0 {
        return Ok(true);
    }
    let page = rustix::param::page_size();
    let first = addr / page;
    let last = (addr + len - 1) / page;
    // Opened per call: a descriptor kept across fork would read the parent.
    let map = fs::File::open("/proc/self/pagemap")?;
    let mut buf = vec![0u8; 8 * 8192];
    let mut at = first;
    while at <= last {
        let n = (last + 1 - at).min(8192);
        let bytes = &mut buf[..8 * n];
        map.read_exact_at(bytes, (at * 8) as u64)?;
        for entry in bytes.chunks_exact(8) {
            let mut e = [0u8; 8];
            e.copy_from_slice(entry);
            let e = u64::from_le_bytes(e);
            if e & SWAPPED != 0 || (e & PRESENT != 0 && e & FILE_PAGE == 0) {
                return Ok(false);
            }
        }
        at += n;
    }
    Ok(true)
}

/// Number of memfds this process holds open (tests and leak checks).
pub fn open_memfds() -> usize {
    let Ok(dir) = fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("/memfd:ironpool"))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_max_parsing() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(2));
        assert_eq!(parse_cpu_max("50000 100000"), Some(1));
        assert_eq!(parse_cpu_max("garbage"), None);
    }

    #[test]
    fn default_workers_is_positive_and_bounded() {
        let n = default_workers();
        assert!(n >= 1);
        assert!(n <= std::thread::available_parallelism().map_or(1, |n| n.get()));
    }

    #[test]
    fn own_rss_is_readable() {
        assert!(resident_bytes(current_pid()).unwrap() > 0);
    }
}

/// Readiness of one registered descriptor.
#[derive(Debug, Clone, Copy)]
pub struct Ready {
    pub token: u64,
    pub readable: bool,
    pub writable: bool,
}

/// Level-triggered readiness over many descriptors (epoll). Closable, so a
/// finished pool gives its descriptor back while its handle lives on.
#[derive(Debug)]
pub struct Poller {
    ep: RwLock<Option<OwnedFd>>,
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "poller closed")
}

impl Poller {
    pub fn new() -> io::Result<Self> {
        use rustix::event::epoll;
        Ok(Self {
            ep: RwLock::new(Some(epoll::create(epoll::CreateFlags::CLOEXEC)?)),
        })
    }

    fn flags(write: bool) -> rustix::event::epoll::EventFlags {
        use rustix::event::epoll::EventFlags;
        if write {
            EventFlags::IN | EventFlags::OUT
        } else {
            EventFlags::IN
        }
    }

    fn with<T>(&self, f: impl FnOnce(&OwnedFd) -> io::Result<T>) -> io::Result<T> {
        let guard = self.ep.read().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().map_or_else(|| Err(closed()), f)
    }

    pub fn add(&self, fd: impl AsFd, token: u64, write: bool) -> io::Result<()> {
        use rustix::event::epoll;
        self.with(|ep| {
            epoll::add(ep, fd, epoll::EventData::new_u64(token), Self::flags(write))?;
            Ok(())
        })
    }

    pub fn modify(&self, fd: impl AsFd, token: u64, write: bool) -> io::Result<()> {
        use rustix::event::epoll;
        self.with(|ep| {
            epoll::modify(ep, fd, epoll::EventData::new_u64(token), Self::flags(write))?;
            Ok(())
        })
    }

    pub fn delete(&self, fd: impl AsFd) {
        let _ = self.with(|ep| Ok(rustix::event::epoll::delete(ep, fd)?));
    }

    /// Closes the epoll descriptor; later waits return no events at once.
    pub fn close(&self) {
        self.ep.write().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Waits up to `timeout` (forever if `None`); EINTR counts as no events.
    pub fn wait(&self, timeout: Option<std::time::Duration>) -> io::Result<Vec<Ready>> {
        use rustix::event::epoll::{self, EventFlags};
        let ts = timeout.map(|d| rustix::time::Timespec {
            tv_sec: d.as_secs() as i64,
            tv_nsec: d.subsec_nanos() as i64,
        });
        let mut events = Vec::with_capacity(64);
        let guard = self.ep.read().unwrap_or_else(|p| p.into_inner());
        let Some(ep) = guard.as_ref() else {
            return Ok(Vec::new());
        };
        match epoll::wait(ep, rustix::buffer::spare_capacity(&mut events), ts.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        drop(guard);
        Ok(events
            .iter()
            .map(|e| {
                let flags = e.flags;
                let data = e.data;
                let hup = flags.intersects(EventFlags::HUP | EventFlags::ERR | EventFlags::RDHUP);
                Ready {
                    token: data.u64(),
                    readable: flags.contains(EventFlags::IN) || hup,
                    writable: flags.contains(EventFlags::OUT) || hup,
                }
            })
            .collect())
    }
}

/// Wakes a thread blocked in [`Poller::wait`] (eventfd). Closable like the
/// poller; waking a closed one does nothing.
#[derive(Debug)]
pub struct Waker {
    fd: RwLock<Option<OwnedFd>>,
}

impl Waker {
    pub fn new() -> io::Result<Self> {
        use rustix::event::EventfdFlags;
        let fd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Self {
            fd: RwLock::new(Some(fd)),
        })
    }

    fn with(&self, f: impl FnOnce(&OwnedFd)) {
        if let Some(fd) = self.fd.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            f(fd);
        }
    }

    pub fn wake(&self) {
        self.with(|fd| {
            let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
        });
    }

    pub fn drain(&self) {
        self.with(|fd| {
            let mut b = [0u8; 8];
            let _ = rustix::io::read(fd, &mut b);
        });
    }

    /// Registers this waker with `poller` under `token`.
    pub fn register(&self, poller: &Poller, token: u64) -> io::Result<()> {
        let guard = self.fd.read().unwrap_or_else(|p| p.into_inner());
        let fd = guard.as_ref().ok_or_else(closed)?;
        poller.add(fd, token, false)
    }

    pub fn close(&self) {
        self.fd.write().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// A pipe whose read end is non-blocking (worker stdout/stderr capture).
pub fn output_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    rustix::io::ioctl_fionbio(&r, true)?;
    Ok((r, w))
}

/// Points this process's stdout and stderr at the given descriptors.
pub fn redirect_stdio(out: impl AsFd, err: impl AsFd) -> io::Result<()> {
    rustix::stdio::dup2_stdout(out)?;
    rustix::stdio::dup2_stderr(err)?;
    Ok(())
}
