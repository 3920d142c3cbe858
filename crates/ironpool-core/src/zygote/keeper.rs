//! Starting the zygote from a thread that lives as long as the process.
//!
//! PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so
//! the zygote must not be spawned from a caller's thread (which may be a
//! short-lived worker thread). A process-wide keeper thread does the spawns.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use crate::ipc::{Channel, Kind, Message, Recv};
use crate::platform::{self, Pidfd};

type Job = Box<dyn FnOnce() + Send>;

/// The keeper of the current process: (pid that started it, its job queue).
type Keeper = Option<(i32, mpsc::Sender<Job>)>;

static KEEPER: OnceLock<Mutex<Keeper>> = OnceLock::new();

/// Runs `job` on the keeper thread and waits for its answer.
fn on_keeper<T: Send + 'static>(job: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
    let me = platform::current_pid();
    let slot = KEEPER.get_or_init(|| Mutex::new(None));
    let sender = {
        let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            // A forked copy of this process has no keeper thread: start one.
            Some((pid, tx)) if *pid == me => tx.clone(),
            _ => {
                let (tx, rx) = mpsc::channel::<Job>();
                std::thread::Builder::new()
                    .name("ironpool-keeper".into())
                    .spawn(move || {
                        for job in rx {
                            job();
                        }
                    })?;
                *guard = Some((me, tx.clone()));
                tx
            }
        }
    };
    let (reply_tx, reply_rx) = mpsc::channel();
    sender
        .send(Box::new(move || {
            let _ = reply_tx.send(job());
        }))
        .map_err(|_| io::Error::other("ironpool keeper thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("ironpool keeper thread is gone"))
}

/// A running zygote. Dropping it closes our end of its master channel; the
/// zygote exits when every copy of that end is closed (or with this process).
#[derive(Debug)]
pub struct Zygote {
    pid: i32,
    pidfd: Pidfd,
    master: Mutex<Channel>,
    /// The process that spawned the zygote; only it may reap it.
    owner: i32,
}

impl Zygote {
    /// Starts `cmd` as a zygote. The child finds its master channel in the
    /// `IRONPOOL_ZYGOTE_FD` environment variable.
    pub fn spawn(mut cmd: Command) -> io::Result<Self> {
        on_keeper(move || -> io::Result<Zygote> {
            let (ours, theirs) = Channel::pair()?;
            let theirs: OwnedFd = theirs.into_fd();
            let raw = theirs.as_raw_fd();
            let parent = platform::current_pid();
            cmd.env("IRONPOOL_ZYGOTE_FD", raw.to_string());
            // SAFETY: the closure runs between fork and exec and makes only
            // raw, allocation-free syscalls (fcntl, prctl, getppid, _exit).
            unsafe {
                cmd.pre_exec(move || {
                    // `raw` stays open in the child until exec (covered by the
                    // SAFETY note above).
                    let fd = std::os::fd::BorrowedFd::borrow_raw(raw);
                    rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
                    if !platform::die_with_parent(parent) {
                        return Err(io::Error::other("parent exited during spawn"));
                    }
                    Ok(())
                });
            }
            // The child only execs: no need to seal memfd blocks for it.
            let child = crate::shm::blocks::spawning(|| cmd.spawn())?;
            drop(theirs);
            let pid = child.id() as i32;
            // The keeper owns reaping through the pidfd; std's Child would not.
            let pidfd = Pidfd::open(pid)?;
            std::mem::forget(child);
            let mut zygote = Zygote {
                pid,
                pidfd,
                master: Mutex::new(ours),
                owner: parent,
            };
            zygote.wait_ready()?;
            Ok(zygote)
        })?
    }

    /// The zygote says `Ready` once its imports are done, or `InitFailed`
    /// with the error text if one of them failed.
    fn wait_ready(&mut self) -> io::Result<()> {
        let master = self.master.get_mut().unwrap_or_else(|p| p.into_inner());
        let mut fds = [rustix::event::PollFd::new(
            &*master,
            rustix::event::PollFlags::IN,
        )];
        let limit = rustix::time::Timespec {
            tv_sec: 120,
            tv_nsec: 0,
        };
        if rustix::event::poll(&mut fds, Some(&limit))? == 0 {
            self.kill();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "template process did not start within 120 s",
            ));
        }
        let master = self.master.get_mut().unwrap_or_else(|p| p.into_inner());
        let failure = match master.recv_blocking() {
            Ok(Recv::Message(m)) if m.kind == Kind::Ready => return Ok(()),
            Ok(Recv::Message(m)) if m.kind == Kind::InitFailed => {
                String::from_utf8_lossy(&m.body).into_owned()
            }
            Ok(_) => "template process exited during start-up".to_string(),
            Err(e) => format!("template process sent garbage during start-up: {e}"),
        };
        self.kill();
        Err(io::Error::other(failure))
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// True while the zygote process runs.
    pub fn is_alive(&self) -> bool {
        let mut fds = [rustix::event::PollFd::new(
            &self.pidfd,
            rustix::event::PollFlags::IN,
        )];
        !matches!(rustix::event::poll(&mut fds, Some(&rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 })), Ok(n) if n > 0)
    }

    /// Opens a private channel over which one pool asks for forks and hears
    /// of exits.
    pub fn session(&self) -> io::Result<Channel> {
        let (ours, theirs) = Channel::pair()?;
        let msg = Message::new(Kind::Session, 0, 0).with_fds(vec![theirs.into_fd()]);
        let master = self.master.lock().unwrap_or_else(|p| p.into_inner());
        master.send_blocking(&msg)?;
        Ok(ours)
    }

    /// Stops the zygote now (tests, and `ironpool` shutting down a preload set).
    pub fn kill(&self) {
        let _ = self.pidfd.kill();
        let _ = self.reap();
    }

    fn reap(&self) -> io::Result<()> {
        if platform::current_pid() != self.owner {
            return Ok(());
        }
        let mut fds = [rustix::event::PollFd::new(
            &self.pidfd,
            rustix::event::PollFlags::IN,
        )];
        let _ = rustix::event::poll(&mut fds, None);
        self.pidfd.try_reap().map(|_| ())
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        // Closing the master makes the zygote exit; reap it so no zombie stays.
        if platform::current_pid() == self.owner {
            let master = self.master.get_mut().unwrap_or_else(|p| p.into_inner());
            let _ = rustix::net::shutdown(&*master, rustix::net::Shutdown::Both);
            let mut fds = [rustix::event::PollFd::new(
                &self.pidfd,
                rustix::event::PollFlags::IN,
            )];
            let limit = rustix::time::Timespec {
                tv_sec: 2,
                tv_nsec: 0,
            };
            if !matches!(rustix::event::poll(&mut fds, Some(&limit)), Ok(n) if n > 0) {
                let _ = self.pidfd.kill();
            }
            let _ = self.reap();
        }
    }
}
