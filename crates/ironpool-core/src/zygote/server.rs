//! The zygote's event loop: fork on request, reap, report exits, and make
//! sure nothing a worker started outlives it.
//!
//! Process trees. Each worker leads a process group of its own, which its
//! descendants join unless they leave it. The zygote is a child subreaper,
//! so a descendant orphaned by a worker's death (one that left the group
//! with `setsid`, too) is reparented to the zygote instead of PID 1. When a
//! worker exits, the zygote SIGKILLs its group while the worker is still an
//! unreaped zombie (so the group's id cannot have been reused), then kills
//! and reaps every child that is not one of its workers (the adopted
//! orphans), and only then reports the exit. When the caller dies (a pidfd
//! on it becomes readable) or closes the master channel, the zygote does
//! the same for every worker before it exits.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use crate::ipc::{Channel, Kind, Message, Recv};
use crate::platform::{self, Doorbell, Pidfd, Poller};
use crate::reactor::Source;

/// How long one sweep waits for a SIGKILLed process to exit before moving
/// on (one stuck in uninterruptible sleep is reaped by a later sweep).
const KILL_WAIT: Duration = Duration::from_millis(500);
/// How long the loop waits for a fork request or an exit between two steps
/// of a warm request; under a steady stream of them, a step still runs
/// this often.
const WARM_STEP: Duration = Duration::from_millis(5);
/// How long warm steps wait, once they found every CPU busy, before
/// looking again.
const BUSY_RECHECK: Duration = Duration::from_millis(50);
/// Sweeps of adopted orphans per worker exit (each round takes the children
/// the previous round's victims left behind).
const SWEEP_ROUNDS: usize = 64;

/// How `serve` returned.
pub enum Served {
    /// The parent closed the master channel: the zygote should exit.
    Exit,
    /// We are a freshly forked worker; everything of the zygote is closed.
    Child(ForkedChild),
}

/// What the template did with a warm request.
pub struct Warmed {
    /// The answer for whoever asked (what was imported, what was skipped).
    pub report: Vec<u8>,
    /// The imports left the template with threads: it must fork no more
    /// workers, so it exits (and is started again, cold, when next needed).
    pub threaded: bool,
}

/// What the template process does for the loop: fork itself, and import
/// modules between forks (the Python binding runs both in the interpreter).
pub trait Host {
    /// Forks the calling process; the child's pid in the parent, 0 in the child.
    fn fork(&mut self) -> io::Result<i32>;
    /// One short step of the warm request `request` (see `Kind::Warm`;
    /// `first`: its first step): `Some` when the request is done.
    fn warm(&mut self, request: &[u8], first: bool) -> Option<Warmed>;
    /// A child of the template that is not a worker and must outlive the
    /// sweeps for workers' orphans: the warm-up's probe, while it runs.
    fn helper_pid(&mut self) -> Option<i32> {
        None
    }
}

/// What a forked worker starts with: its channel to the pool supervisor,
/// and the doorbell it rings when the supervisor muted that channel (see
/// `Kind::Batch`). stdout and stderr already point at the pool's capture pipes.
pub struct ForkedChild {
    pub channel: Channel,
    pub doorbell: Option<Doorbell>,
}

struct State {
    poller: Poller,
    master: Channel,
    /// Pools' sessions by number.
    sessions: HashMap<u64, Channel>,
    /// Workers by pid, with the number of the session that asked for each.
    children: HashMap<i32, (Pidfd, u64)>,
    next_session: u64,
    /// Warm requests (session, body) not yet done, the first one under
    /// way if `warm_begun`. A step runs only when no fork request or exit
    /// waits, so an import delays a fork by at most one step.
    warm_queue: VecDeque<(u64, Vec<u8>)>,
    warm_begun: bool,
    /// A worker exited since the warm-up was asked for: its replacement
    /// (recycling, a crash, a pool closing and the next one starting) is
    /// what the imports are for, so they no longer wait for idle CPUs.
    warm_wanted: bool,
    /// Warm steps found every CPU busy; they look again at this time.
    busy_until: Option<Instant>,
}

/// Serves fork requests until the parent goes away. `host.fork` forks the
/// calling process (the Python binding calls `os.fork` so the
/// interpreter's fork hooks run); `host.warm` imports modules when nothing
/// else is waiting.
pub fn serve(master: OwnedFd, host: &mut dyn Host) -> io::Result<Served> {
    let master = Channel::from_fd(master);
    master.send_blocking(&Message::new(Kind::Ready, 0, 0))?;
    let poller = Poller::new()?;
    poller.add(&master, Source::Master.token(), false)?;
    // Orphaned descendants of workers come to us, not to PID 1. Without it
    // (never on Linux >= 3.4) worker groups are still swept.
    let _ = platform::become_child_subreaper();
    // Watch the caller itself (a process, where PR_SET_PDEATHSIG watches a
    // thread), then disarm the death signal, which would kill us before we
    // could sweep the workers' trees. It stays armed until the watch is set.
    let Some(parent) = Pidfd::of_parent()? else {
        return Ok(Served::Exit);
    };
    poller.add(&parent, Source::Parent.token(), false)?;
    platform::stop_dying_with_parent()?;
    let mut st = State {
        poller,
        master,
        sessions: HashMap::new(),
        children: HashMap::new(),
        next_session: 1,
        warm_queue: VecDeque::new(),
        warm_begun: false,
        warm_wanted: false,
        busy_until: None,
    };
    let me = platform::current_pid();
    let mut last_step = Instant::now();
    loop {
        let idle_wait = if st.warm_queue.is_empty() {
            None
        } else {
            Some(WARM_STEP)
        };
        let events = st.poller.wait(idle_wait)?;
        if events.is_empty() {
            last_step = Instant::now();
            if may_warm(&mut st) && warm_step(&mut st, host) {
                return Ok(Served::Exit);
            }
            continue;
        }
        for ev in events {
            match Source::from_token(ev.token) {
                Some(Source::Master) => match st.master.recv_blocking() {
                    Ok(Recv::Message(mut m)) if m.kind == Kind::Session && m.fds.len() == 1 => {
                        let Some(fd) = m.fds.pop() else { continue };
                        let session = Channel::from_fd(fd);
                        let n = st.next_session;
                        st.next_session += 1;
                        st.poller
                            .add(&session, Source::PoolSession(n).token(), false)?;
                        st.sessions.insert(n, session);
                    }
                    Ok(Recv::Message(_)) => {}
                    Ok(Recv::Closed) | Err(_) => {
                        sweep_everything(&mut st);
                        return Ok(Served::Exit);
                    }
                    Ok(Recv::WouldBlock) => {}
                },
                Some(Source::Parent) => {
                    sweep_everything(&mut st);
                    return Ok(Served::Exit);
                }
                Some(Source::PoolSession(n)) => {
                    let Some(session) = st.sessions.get_mut(&n) else {
                        continue;
                    };
                    match session.recv() {
                        Ok(Recv::Message(m))
                            if m.kind == Kind::Fork && matches!(m.fds.len(), 3 | 4) =>
                        {
                            if let Some(child) = fork_one(&mut st, n, m, host, me)? {
                                return Ok(Served::Child(child));
                            }
                        }
                        // Answered, so the pool's slot does not wait for it forever.
                        Ok(Recv::Message(m)) if m.kind == Kind::Fork => {
                            let why = format!(
                                "a fork request needs 3 or 4 descriptors, not {}",
                                m.fds.len()
                            );
                            let failed =
                                Message::new(Kind::ForkFailed, m.id, 0).with_body(why.into_bytes());
                            let _ = session.send_blocking(&failed);
                        }
                        Ok(Recv::Message(m)) if m.kind == Kind::Warm => {
                            st.warm_queue.push_back((n, m.body));
                        }
                        Ok(Recv::Message(_)) | Ok(Recv::WouldBlock) => {}
                        Ok(Recv::Closed) | Err(_) => {
                            if let Some(s) = st.sessions.remove(&n) {
                                st.poller.delete(&s);
                            }
                        }
                    }
                }
                Some(Source::Child(pid)) => {
                    let Some((pidfd, _)) = st.children.get(&pid) else {
                        continue;
                    };
                    if !pidfd.has_exited() {
                        continue;
                    }
                    // The worker is a zombie: its pid, hence its group id,
                    // is still taken. Kill the group before reaping.
                    let _ = platform::kill_process_group(pid);
                    let Ok(Some(status)) = pidfd.try_reap() else {
                        continue;
                    };
                    if let Some((pidfd, session)) = st.children.remove(&pid) {
                        st.poller.delete(&pidfd);
                        st.warm_wanted = !st.warm_queue.is_empty();
                        // Its orphans were reparented to us before its exit
                        // became visible: kill and reap them before saying
                        // it is gone, so its tree is gone when the pool hears.
                        sweep_orphans(&st.children, host.helper_pid());
                        if let Some(s) = st.sessions.get(&session) {
                            let msg = Message::new(
                                Kind::Exited,
                                pid as u64,
                                super::encode_status(status),
                            );
                            let _ = s.send_blocking(&msg);
                        }
                    }
                }
                // The supervisor's sources are never registered here.
                _ => {}
            }
        }
        // Forks come first, but a steady stream of them (workers recycled
        // every few ms) must not starve the warm-up that makes them cheap.
        if !st.warm_queue.is_empty() && last_step.elapsed() >= WARM_STEP {
            last_step = Instant::now();
            if may_warm(&mut st) && warm_step(&mut st, host) {
                return Ok(Served::Exit);
            }
        }
    }
}

/// Whether a warm step may run now. The imports pay off only for workers
/// forked later, so while every CPU is busy (a pool's workers computing,
/// which the trial and real imports would slow) they wait, unless workers
/// are exiting, whose replacements want them now.
fn may_warm(st: &mut State) -> bool {
    if st.warm_wanted {
        return true;
    }
    let now = Instant::now();
    if st.busy_until.is_some_and(|t| now < t) {
        return false;
    }
    let busy = platform::cpus_all_busy();
    st.busy_until = busy.then(|| now + BUSY_RECHECK);
    !busy
}

/// Runs one step of the first warm request, answering its session when it
/// is done. True if the template must stop (its imports started threads):
/// its workers are then gone, and the report goes out after they are, so
/// a caller that reads it cannot hand a task to one of them unawares.
fn warm_step(st: &mut State, host: &mut dyn Host) -> bool {
    let Some((session, request)) = st.warm_queue.front() else {
        return false;
    };
    let first = !std::mem::replace(&mut st.warm_begun, true);
    let Some(done) = host.warm(request, first) else {
        return false;
    };
    let session = *session;
    if done.threaded {
        // Pools hear it before their workers die, on the channel that
        // reports the deaths: they run those workers' tasks again.
        for s in st.sessions.values() {
            let _ = s.send_blocking(&Message::new(Kind::Retiring, 0, 0));
        }
        sweep_everything(st);
    }
    if let Some(s) = st.sessions.get(&session) {
        let _ = s.send_blocking(&Message::new(Kind::Warmed, 0, 0).with_body(done.report));
    }
    st.warm_queue.pop_front();
    st.warm_begun = false;
    st.warm_wanted &= !st.warm_queue.is_empty();
    done.threaded
}

fn fork_one(
    st: &mut State,
    session: u64,
    mut req: Message,
    host: &mut dyn Host,
    zygote_pid: i32,
) -> io::Result<Option<ForkedChild>> {
    let (Some(err), Some(out), Some(chan)) = (req.fds.pop(), req.fds.pop(), req.fds.pop()) else {
        return Ok(None);
    };
    let reply = |st: &State, msg: Message| {
        if let Some(s) = st.sessions.get(&session) {
            let _ = s.send_blocking(&msg);
        }
    };
    match host.fork() {
        Ok(0) => {
            // The worker. Our copies of the zygote's descriptors close when `st`
            // drops on return; only the channel and the redirected stdio stay.
            if !platform::die_with_parent(zygote_pid) {
                std::process::exit(70);
            }
            // A group of its own, so its tree can be killed with it. On
            // failure it stays in ours, and sweeping its group finds nothing.
            let _ = platform::start_own_process_group();
            platform::redirect_stdio(&out, &err)?;
            Ok(Some(ForkedChild {
                channel: Channel::from_fd(chan),
                doorbell: req.fds.pop().map(Doorbell::from_fd),
            }))
        }
        Ok(pid) => {
            platform::put_in_own_process_group(pid);
            // Open the pidfd before anyone can reap: the pid cannot be reused yet.
            match Pidfd::open(pid) {
                Ok(pidfd) => {
                    let copy = platform::duplicate_fd(&pidfd)?;
                    st.poller.add(&pidfd, Source::Child(pid).token(), false)?;
                    st.children.insert(pid, (pidfd, session));
                    reply(
                        st,
                        Message::new(Kind::Forked, req.id, pid as u64).with_fds(vec![copy]),
                    );
                }
                Err(e) => reply(
                    st,
                    Message::new(Kind::ForkFailed, req.id, 0).with_body(e.to_string().into_bytes()),
                ),
            }
            Ok(None)
        }
        Err(e) => {
            reply(
                st,
                Message::new(Kind::ForkFailed, req.id, 0).with_body(e.to_string().into_bytes()),
            );
            Ok(None)
        }
    }
}

/// Kills and reaps every child that is not one of our workers: orphans of
/// workers' trees, adopted because we are a subreaper. Each is our child and
/// unreaped, so its pid (and a group it leads) is safe to signal.
fn sweep_orphans(workers: &HashMap<i32, (Pidfd, u64)>, helper: Option<i32>) {
    for _ in 0..SWEEP_ROUNDS {
        let orphans: Vec<Pidfd> = platform::own_children()
            .into_iter()
            .filter(|pid| !workers.contains_key(pid) && Some(*pid) != helper)
            .filter_map(|pid| Pidfd::open(pid).ok())
            .collect();
        if orphans.is_empty() {
            return;
        }
        for o in &orphans {
            let _ = platform::kill_process_group(o.pid());
            let _ = o.kill();
        }
        for o in &orphans {
            o.wait_exited(KILL_WAIT);
            let _ = o.try_reap();
        }
    }
}

/// The caller is gone (or closed the master channel): kill every worker
/// with its tree, and reap them all, before the zygote exits.
fn sweep_everything(st: &mut State) {
    for (&pid, (pidfd, _)) in &st.children {
        let _ = pidfd.kill();
        // Unreaped (we have not waited for it): its group id is safe.
        let _ = platform::kill_process_group(pid);
    }
    for (&pid, (pidfd, _)) in &st.children {
        pidfd.wait_exited(KILL_WAIT);
        // Members that joined the group after the first sweep.
        let _ = platform::kill_process_group(pid);
        let _ = pidfd.try_reap();
    }
    st.children.clear();
    sweep_orphans(&st.children, None);
}

/// Tells the parent that start-up failed (a preload did not import).
pub fn report_failure(master: OwnedFd, text: &str) -> io::Result<()> {
    let master = Channel::from_fd(master);
    master.send_blocking(&Message::new(Kind::InitFailed, 0, 0).with_body(text.as_bytes().to_vec()))
}
