//! Starting the zygote from a thread that lives as long as the process.
//!
//! PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so
//! the zygote must not be spawned from a caller's thread (which may be a
//! short-lived worker thread). A process-wide keeper thread does the spawns.
//!
//! A template that dies (OOM killer, `kill -9`) is started again from the
//! same command, by whichever pool or caller notices first
//! ([`Session::reopen`], [`Zygote::session`], [`Zygote::ensure_running`]);
//! the others find the new one running and just open a session on it.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

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

/// How long a session's end may precede the template's exit becoming
/// visible on its pidfd (the kernel closes descriptors first).
const DEATH_CONFIRM: Duration = Duration::from_secs(1);
/// How long a SIGKILLed template may take to exit before we stop waiting.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// What starts a template again: the program, arguments, environment
/// changes and directory of the command it was first started with.
#[derive(Debug)]
struct Recipe {
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, Option<OsString>)>,
    cwd: Option<PathBuf>,
}

impl Recipe {
    fn of(cmd: &Command) -> Self {
        Self {
            program: cmd.get_program().to_owned(),
            args: cmd.get_args().map(|a| a.to_owned()).collect(),
            envs: cmd
                .get_envs()
                .map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned())))
                .collect(),
            cwd: cmd.get_current_dir().map(|d| d.to_owned()),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        for (k, v) in &self.envs {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        if let Some(d) = &self.cwd {
            cmd.current_dir(d);
        }
        // A template has no business reading the caller's terminal.
        cmd.stdin(Stdio::null());
        cmd
    }
}

/// One template process: started from the recipe, replaced when it dies.
#[derive(Debug)]
struct Running {
    pid: i32,
    pidfd: Pidfd,
    master: Channel,
    /// 0 for the first process of a template, then 1, 2, ... per restart.
    generation: u64,
}

impl Running {
    /// Starts the recipe's command on the keeper thread and waits for `Ready`.
    fn launch(recipe: &Recipe, generation: u64) -> io::Result<Self> {
        let mut cmd = recipe.command();
        on_keeper(move || -> io::Result<Running> {
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
                    platform::set_inheritable(fd)?;
                    // Armed until the template watches us through a pidfd.
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
            let mut running = Running {
                pid,
                pidfd,
                master: ours,
                generation,
            };
            running.wait_ready(parent)?;
            Ok(running)
        })?
    }

    /// The zygote says `Ready` once its imports are done, or `InitFailed`
    /// with the error text if one of them failed.
    fn wait_ready(&mut self, owner: i32) -> io::Result<()> {
        if !platform::wait_readable(&self.master, Some(Duration::from_secs(120)))? {
            self.kill(owner);
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "template process did not start within 120 s",
            ));
        }
        let failure = match self.master.recv_blocking() {
            Ok(Recv::Message(m)) if m.kind == Kind::Ready => return Ok(()),
            Ok(Recv::Message(m)) if m.kind == Kind::InitFailed => {
                String::from_utf8_lossy(&m.body).into_owned()
            }
            Ok(_) => "template process exited during start-up".to_string(),
            Err(e) => format!("template process sent garbage during start-up: {e}"),
        };
        self.kill(owner);
        Err(io::Error::other(failure))
    }

    /// SIGKILLs it and, in the process that started it, reaps it.
    fn kill(&self, owner: i32) {
        let _ = self.pidfd.kill();
        if platform::current_pid() == owner {
            self.pidfd.wait_exited(KILL_WAIT);
            let _ = self.pidfd.try_reap();
        }
    }

    /// Asks it to exit (closing the master channel makes it sweep its
    /// workers and exit), killing it after a grace period, and reaps it.
    fn close(&self, owner: i32) {
        if platform::current_pid() != owner {
            return;
        }
        let _ = platform::shutdown(&self.master);
        if !self.pidfd.wait_exited(Duration::from_secs(2)) {
            let _ = self.pidfd.kill();
        }
        self.kill(owner);
    }

    fn open_session(&self) -> io::Result<(Channel, u64)> {
        let (ours, theirs) = Channel::pair()?;
        let msg = Message::new(Kind::Session, 0, 0).with_fds(vec![theirs.into_fd()]);
        self.master.send_blocking(&msg)?;
        Ok((ours, self.generation))
    }
}

/// A template shared by the `Zygote` handle and every pool session on it.
#[derive(Debug)]
struct Template {
    recipe: Recipe,
    running: Mutex<Running>,
    /// The process that spawned the zygote; only it may reap or restart it.
    owner: i32,
}

impl Template {
    fn running(&self) -> MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the (dead) running process with a fresh one.
    fn restart(&self, running: &mut Running) -> io::Result<()> {
        if platform::current_pid() != self.owner {
            return Err(io::Error::other(
                "the template process belongs to another process",
            ));
        }
        let fresh = Running::launch(&self.recipe, running.generation + 1)?;
        let old = std::mem::replace(running, fresh);
        old.kill(self.owner);
        Ok(())
    }

    /// A session on the running template, restarting it first if it died
    /// (or dies while we ask).
    fn session(self: &Arc<Self>, dead_generation: Option<u64>) -> io::Result<Session> {
        let mut running = self.running();
        let confirm = match dead_generation {
            // The caller's session ended: the template is probably dying.
            Some(g) if g == running.generation => DEATH_CONFIRM,
            _ => Duration::ZERO,
        };
        if running.pidfd.wait_exited(confirm) {
            self.restart(&mut running)?;
        }
        let (channel, generation) = match running.open_session() {
            Ok(s) => s,
            Err(e) => {
                if !running.pidfd.wait_exited(DEATH_CONFIRM) {
                    return Err(e);
                }
                self.restart(&mut running)?;
                running.open_session()?
            }
        };
        Ok(Session {
            channel,
            template: self.clone(),
            generation,
        })
    }
}

impl Drop for Template {
    fn drop(&mut self) {
        self.running().close(self.owner);
    }
}

/// A running zygote. It lives as long as this handle or any session on it;
/// then closing its master channel makes it sweep its workers and exit
/// (it also does so when this process exits). If it dies it is started
/// again from the same command when next needed.
#[derive(Debug)]
pub struct Zygote {
    template: Arc<Template>,
}

impl Zygote {
    /// Starts `cmd` as a zygote. The child finds its master channel in the
    /// `IRONPOOL_ZYGOTE_FD` environment variable. Its stdin is /dev/null.
    pub fn spawn(cmd: Command) -> io::Result<Self> {
        let recipe = Recipe::of(&cmd);
        let running = Running::launch(&recipe, 0)?;
        Ok(Zygote {
            template: Arc::new(Template {
                recipe,
                running: Mutex::new(running),
                owner: platform::current_pid(),
            }),
        })
    }

    /// The pid of the current template process.
    pub fn pid(&self) -> i32 {
        self.template.running().pid
    }

    /// True while the current template process runs (its pidfd is polled,
    /// so a death is seen as soon as the kernel has it).
    pub fn is_alive(&self) -> bool {
        !self.template.running().pidfd.has_exited()
    }

    /// Starts the template again if it died.
    pub fn ensure_running(&self) -> io::Result<()> {
        let mut running = self.template.running();
        if running.pidfd.has_exited() {
            self.template.restart(&mut running)?;
        }
        Ok(())
    }

    /// Opens a private channel over which one pool asks for forks and hears
    /// of exits (restarting the template first if it died).
    pub fn session(&self) -> io::Result<Session> {
        self.template.session(None)
    }

    /// Asks the template to import more modules between forks (`request`
    /// is the body of a `Kind::Warm` message). It answers when it has done
    /// so, on a session of its own: see [`WarmRequest::wait`].
    pub fn warm(&self, request: Vec<u8>) -> io::Result<WarmRequest> {
        let session = self.session()?;
        session.send_blocking(&Message::new(Kind::Warm, 0, 0).with_body(request))?;
        Ok(WarmRequest {
            session: Mutex::new(session),
        })
    }

    /// Stops the zygote now (tests). A later session starts it again.
    pub fn kill(&self) {
        self.template.running().kill(self.template.owner);
    }
}

/// A warm request on its way: the template's answer arrives on this session.
#[derive(Debug)]
pub struct WarmRequest {
    session: Mutex<Session>,
}

impl WarmRequest {
    /// The template's report, once it has done the imports: `None` if it
    /// has not answered within `timeout`. An error if the template went
    /// away before answering (it died, or exited because the imports left
    /// it with threads).
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<Option<Vec<u8>>> {
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if !platform::wait_readable(&*session, timeout)? {
                return Ok(None);
            }
            return match session.recv() {
                Ok(Recv::Message(m)) if m.kind == Kind::Warmed => Ok(Some(m.body)),
                // Sent to every session; the report follows.
                Ok(Recv::Message(m)) if m.kind == Kind::Retiring => continue,
                Ok(Recv::WouldBlock) => Ok(None),
                Ok(Recv::Message(m)) => Err(io::Error::other(format!(
                    "template process answered a warm request with {:?}",
                    m.kind
                ))),
                Ok(Recv::Closed) => Err(io::Error::other(
                    "template process ended before it finished the imports",
                )),
                Err(e) => Err(io::Error::other(format!(
                    "template process sent garbage: {e}"
                ))),
            };
        }
    }
}

/// One pool's channel to a template. Derefs to the [`Channel`].
#[derive(Debug)]
pub struct Session {
    channel: Channel,
    template: Arc<Template>,
    generation: u64,
}

impl Session {
    /// After this session ended (its template died): a session on the
    /// template started again, once, by whichever session asks first. If
    /// the template did not die after all, a new session on it.
    pub fn reopen(&self) -> io::Result<Session> {
        self.template.session(Some(self.generation))
    }
}

impl std::ops::Deref for Session {
    type Target = Channel;
    fn deref(&self) -> &Channel {
        &self.channel
    }
}

impl std::ops::DerefMut for Session {
    fn deref_mut(&mut self) -> &mut Channel {
        &mut self.channel
    }
}

impl AsFd for Session {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.channel.as_fd()
    }
}
