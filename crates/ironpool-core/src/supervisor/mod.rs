//! The pool supervisor: one Rust thread per pool that owns the workers.
//!
//! Callers talk to it through [`Pool`]: they change the engine state under
//! its mutex (submitting sends straight to a free worker), and an eventfd
//! wakes the thread when its next deadline changed. Finished tasks come back
//! through a completion queue that a caller drains in batches. The thread
//! never touches Python, so the GIL can never delay crash detection,
//! timeouts or kills.

mod dispatch;
mod event_loop;
mod lifecycle;
mod output;
mod quiet;
mod registry;
mod scheduler;
mod stats;
mod timers;
mod worker;

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::ipc::Message;
use crate::platform::{Poller, Waker};
use crate::reactor::Source;
use crate::task::{Completion, ObjectId, Task, TaskId};

use crate::zygote::Zygote;
use event_loop::Engine;

pub use scheduler::ChunkSizer;

/// Pool settings, validated by the caller.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Number of worker processes.
    pub workers: usize,
    /// Tasks sent to a worker ahead of the one it runs (hides round trips;
    /// anything not yet sent stays cancellable).
    pub prefetch: usize,
    /// Default per-task time limit.
    pub task_timeout: Option<Duration>,
    /// Replace a worker after this many tasks.
    pub max_tasks_per_worker: Option<u64>,
    /// Replace a worker whose resident memory passes this after a task.
    pub max_memory: Option<u64>,
    /// Kill a worker whose memory passes `max_memory * hard_memory_factor`
    /// while it runs a task.
    pub hard_memory_factor: f64,
    /// Give up restarting after this many consecutive start failures.
    pub max_start_failures: u32,
    /// Lines of worker stderr kept for crash reports.
    pub stderr_tail_lines: usize,
    /// Copy worker stdout/stderr to ours.
    pub forward_output: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            workers: crate::platform::default_workers(),
            prefetch: 1,
            task_timeout: None,
            max_tasks_per_worker: None,
            max_memory: None,
            hard_memory_factor: 1.5,
            max_start_failures: 3,
            stderr_tail_lines: 20,
            forward_output: true,
        }
    }
}

/// Per-worker figures for `Pool::stats`.
#[derive(Debug, Clone, Default)]
pub struct WorkerStats {
    pub slot: usize,
    pub pid: i32,
    pub tasks_done: u64,
    pub busy: bool,
    pub rss: u64,
    pub restarts: u64,
    pub last_exit: String,
    pub busy_ns: u64,
}

/// Pool-wide task figures for `Pool::counts`, kept by the engine as tasks
/// come and go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskCounts {
    /// Tasks submitted (a `map` chunk is one task of several items).
    pub submitted: u64,
    /// Waiting for a worker (not yet sent to one).
    pub queued: u64,
    /// Sent to a worker and not finished (prefetched ones included).
    pub running: u64,
    /// Finished with a value returned (a chunk whose item raised too).
    pub returned: u64,
    /// Finished otherwise: raised, crashed, timed out, or never started.
    pub failed: u64,
    /// Runs started again after a crash, a timeout or a `retry_on` raise.
    pub retried: u64,
    /// Items in the finished tasks.
    pub items_done: u64,
    /// Run time of the finished tasks, summed.
    pub task_ns: u64,
}

#[derive(Default)]
struct Done {
    queue: VecDeque<Completion>,
    /// Workers' `Kind::Log` messages not yet taken ([`Pool::take_logs`]).
    logs: Vec<Message>,
    finished: bool,
    /// Callers inside [`Pool::wait_driving`]: while there is one, it takes
    /// every completion, and [`Pool::wait_completions`] leaves them to it
    /// (handing a result to another thread costs a wake-up and a GIL hop).
    drivers: usize,
    /// Threads asleep on `done_cv` ([`Pool::wait_completions`], the results
    /// thread): a notification with none costs a futex syscall for nothing.
    sleepers: usize,
    /// Callers of [`Pool::wait_driving`] that stopped spinning, asleep on
    /// `driving_cv`: the only ones a kick concerns, and while any caller
    /// drives, the only ones a completion concerns (waking the results
    /// thread then cost a context switch per task, to find nothing to do).
    driving_sleepers: usize,
}

/// Which sleepers to wake: callers driving, and the others.
#[derive(Clone, Copy)]
struct Wake {
    drivers: bool,
    others: bool,
}

impl Done {
    /// The count of sleepers of one kind: callers driving, or the others.
    fn sleepers_mut(&mut self, driving: bool) -> &mut usize {
        if driving {
            &mut self.driving_sleepers
        } else {
            &mut self.sleepers
        }
    }

    /// Who a completion just queued concerns.
    fn wake_for_completion(&self) -> Wake {
        Wake {
            drivers: self.driving_sleepers > 0,
            others: self.drivers == 0 && self.sleepers > 0,
        }
    }
}

impl Hub {
    fn wake(&self, wake: Wake) {
        if wake.drivers {
            self.driving_cv.notify_all();
        }
        if wake.others {
            self.done_cv.notify_all();
        }
    }
}

/// Counts a caller as driving while it lives.
struct Driving<'a>(&'a Hub);

impl<'a> Driving<'a> {
    fn new(hub: &'a Hub) -> Self {
        lock(&hub.done).drivers += 1;
        Driving(hub)
    }
}

impl Drop for Driving<'_> {
    fn drop(&mut self) {
        let mut done = lock(&self.0.done);
        done.drivers -= 1;
        // What arrived after this caller's last look goes to the others.
        let left = !(done.queue.is_empty() && done.logs.is_empty());
        let wake = done.wake_for_completion();
        drop(done);
        if left {
            self.0.wake(wake);
        }
    }
}

/// A caller polling the workers' channels itself: while any does, the
/// channels do not wake the supervisor thread, which would otherwise be
/// woken by every answer the caller is about to read (a thread wake-up per
/// round trip). The last one to stop unmutes them; if they hold unread
/// messages by then, that wakes the supervisor thread at once.
///
/// `EPOLL_CTL_MOD` of a registered descriptor allocates nothing; it fails
/// only once the pool's pollers are closed (teardown), when nothing is left
/// to wake. So its errors are ignored.
struct Spinning<'a>(&'a Hub);

impl<'a> Spinning<'a> {
    fn new(hub: &'a Hub) -> Self {
        let mut n = lock(&hub.spinners);
        if *n == 0 {
            let _ = hub
                .poller
                .mute_poller(&hub.channels, Source::Channels.token(), true);
        }
        *n += 1;
        Spinning(hub)
    }
}

impl Drop for Spinning<'_> {
    fn drop(&mut self) {
        let mut n = lock(&self.0.spinners);
        *n -= 1;
        if *n == 0 {
            let _ = self
                .0
                .poller
                .mute_poller(&self.0.channels, Source::Channels.token(), false);
        }
    }
}

/// What callers and the supervisor thread reach without the engine lock: the
/// poller and its waker, the completion queue, the published stats and the
/// chunk sizer.
struct Hub {
    /// What the supervisor thread sleeps on: its waker, its template
    /// session, the workers' output pipes and `channels`.
    poller: Poller,
    /// The workers' channels, nested in `poller` so that a caller polling
    /// them itself can mute them there (see [`Spinning`]).
    channels: Poller,
    /// How many callers are polling `channels` in [`Pool::wait_driving`].
    spinners: Mutex<usize>,
    waker: Waker,
    done: Mutex<Done>,
    done_cv: Condvar,
    driving_cv: Condvar,
    /// Bumped by [`Pool::kick`]; wakes callers blocked in [`Pool::wait_driving`].
    generation: AtomicU64,
    sizer: Mutex<ChunkSizer>,
    /// Tasks submitted while another thread held the engine (the
    /// supervisor thread, handling results): the caller leaves them here
    /// rather than sleep on the lock, and whoever takes the engine next
    /// queues them first ([`lock_engine`]), so the order of submission holds.
    inbox: Mutex<Vec<Task>>,
    /// Whether `inbox` may hold tasks (set and cleared under its lock): the
    /// engine's every taker checks it, without locking the inbox.
    inbox_full: AtomicBool,
    /// Tasks that went through the inbox, ever ([`Pool::inboxed`]).
    inboxed: AtomicU64,
}

impl Hub {
    /// Queues what callers left in the inbox.
    fn take_inbox(&self, e: &mut Engine) {
        if !self.inbox_full.load(Ordering::Acquire) {
            return;
        }
        let tasks = {
            let mut inbox = lock(&self.inbox);
            self.inbox_full.store(false, Ordering::Relaxed);
            std::mem::take(&mut *inbox)
        };
        if !tasks.is_empty() {
            e.submit_many(tasks);
        }
    }

    /// Leaves tasks for whoever holds the engine, and makes sure the
    /// supervisor thread looks soon (whoever holds it may be past its look).
    fn leave_in_inbox(&self, tasks: Vec<Task>) {
        self.inboxed
            .fetch_add(tasks.len() as u64, Ordering::Relaxed);
        let mut inbox = lock(&self.inbox);
        inbox.extend(tasks);
        let woken = self.inbox_full.swap(true, Ordering::Release);
        drop(inbox);
        // Already set: the wake-up written with it has not been taken yet.
        if !woken {
            self.waker.wake();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The engine, with the tasks callers left in the inbox queued: every
/// thread takes the engine through this or [`try_lock_engine`], so what it
/// sees of the queue includes them, in order.
fn lock_engine<'a>(hub: &Hub, mutex: &'a Mutex<Engine>) -> MutexGuard<'a, Engine> {
    let mut e = lock(mutex);
    hub.take_inbox(&mut e);
    e
}

/// [`lock_engine`] if no other thread holds the engine now.
fn try_lock_engine<'a>(hub: &Hub, mutex: &'a Mutex<Engine>) -> Option<MutexGuard<'a, Engine>> {
    let mut e = match mutex.try_lock() {
        Ok(e) => e,
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        Err(TryLockError::WouldBlock) => return None,
    };
    hub.take_inbox(&mut e);
    Some(e)
}

/// Handle on a running pool. Dropping it shuts the pool down.
pub struct Pool {
    hub: Arc<Hub>,
    engine: Arc<Mutex<Engine>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The process that started the supervisor thread. A forked copy of
    /// this handle must never join it: the thread does not exist there.
    owner: i32,
}

impl Pool {
    /// Starts the supervisor thread; workers are forked from `zygote` and
    /// each is sent `init` (a [`Kind::Init`](crate::ipc::Kind) message) first.
    pub fn start(zygote: &Zygote, config: PoolConfig, init: Message) -> io::Result<Pool> {
        let session = zygote.session()?;
        let hub = Arc::new(Hub {
            poller: Poller::new()?,
            channels: Poller::new()?,
            spinners: Mutex::new(0),
            waker: Waker::new()?,
            done: Mutex::new(Done::default()),
            done_cv: Condvar::new(),
            driving_cv: Condvar::new(),
            generation: AtomicU64::new(0),
            sizer: Mutex::new(ChunkSizer::default()),
            inbox: Mutex::new(Vec::new()),
            inbox_full: AtomicBool::new(false),
            inboxed: AtomicU64::new(0),
        });
        let engine = Arc::new(Mutex::new(Engine::new(config, init, session, hub.clone())?));
        // Ask for the first workers now, from the caller's thread: a request
        // the caller sends the template next (a warm request) then comes
        // after them, and the template serves forks first.
        lock_engine(&hub, &engine).fill_workers();
        let thread = {
            let (hub, engine) = (hub.clone(), engine.clone());
            std::thread::Builder::new()
                .name("ironpool-supervisor".into())
                .spawn(move || event_loop::run(hub, engine))?
        };
        Ok(Pool {
            hub,
            engine,
            thread: Mutex::new(Some(thread)),
            owner: crate::platform::current_pid(),
        })
    }

    /// Runs `f` on the engine from a caller's thread, publishes what it
    /// finished, and wakes the supervisor thread if `f` created a deadline
    /// earlier than the one it sleeps towards.
    fn drive(&self, f: impl FnOnce(&mut Engine)) {
        self.drive_locked(self.engine(), f);
    }

    /// [`Pool::drive`] on an engine already taken, with the inbox queued.
    fn drive_locked(&self, mut e: MutexGuard<'_, Engine>, f: impl FnOnce(&mut Engine)) {
        f(&mut e);
        e.publish();
        let wake = e.needs_wake();
        drop(e);
        if wake {
            self.hub.waker.wake();
        }
    }

    fn engine(&self) -> MutexGuard<'_, Engine> {
        lock_engine(&self.hub, &self.engine)
    }

    /// Queues a task and sends it to a free worker right away, from the
    /// calling thread (unless the engine is busy: see [`Pool::submit_many`]).
    /// Its completion arrives through [`Pool::wait_completions`] or
    /// [`Pool::wait_driving`].
    pub fn submit(&self, task: Task) {
        self.submit_many(vec![task]);
    }

    /// Queues several tasks under one lock and dispatches once, so that
    /// those bound for one worker can share a frame. If the supervisor
    /// thread holds the engine (handling results, which it also dispatches
    /// after), they go through the inbox instead of waiting for it: a
    /// burst of submits waited ~40 µs at each of one in twenty.
    pub fn submit_many(&self, tasks: Vec<Task>) {
        match try_lock_engine(&self.hub, &self.engine) {
            Some(e) => self.drive_locked(e, |e| e.submit_many(tasks)),
            None => self.hub.leave_in_inbox(tasks),
        }
    }

    /// Tasks that were submitted while the engine was busy and went through
    /// the inbox, since the pool started.
    pub fn inboxed(&self) -> u64 {
        self.hub.inboxed.load(Ordering::Relaxed)
    }

    /// Makes a function known; tasks refer to it by `id`.
    pub fn register_object(&self, id: ObjectId, body: Message) {
        self.drive(|e| e.register_object(id, body));
    }

    /// Forgets a registered object (a released shared argument).
    pub fn unregister(&self, id: ObjectId) {
        self.drive(|e| e.unregister(id));
    }

    /// Drops a task that has not been sent to a worker yet and returns true.
    /// A task already sent still finishes (false); its completion is still
    /// delivered.
    pub fn cancel(&self, id: TaskId) -> bool {
        self.engine().cancel(id)
    }

    /// True while the task is with a worker.
    pub fn is_dispatched(&self, id: TaskId) -> bool {
        self.engine().is_dispatched(id)
    }

    /// Drops every task not yet sent to a worker and returns their ids.
    pub fn cancel_pending(&self) -> Vec<TaskId> {
        self.engine().cancel_pending()
    }

    /// Finishes queued work, then stops the workers. Returns at once.
    pub fn shutdown(&self) {
        self.drive(|e| e.shutdown());
    }

    /// Drops queued work and kills every worker now. Tasks that were running
    /// complete as crashed (killed by the pool).
    pub fn terminate(&self) {
        self.drive(|e| e.terminate());
    }

    /// Waits until the supervisor thread has stopped every worker.
    pub fn join(&self) {
        let handle = lock(&self.thread).take();
        if let Some(t) = handle {
            if crate::platform::current_pid() == self.owner {
                let _ = t.join();
            } else {
                std::mem::forget(t);
            }
        }
    }

    /// Like `join`, giving up after `timeout`; true once the supervisor has
    /// stopped. Lets a caller look at signals between waits (Ctrl-C).
    pub fn join_within(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let finished = match lock(&self.thread).as_ref() {
                None => true,
                Some(t) => t.is_finished(),
            };
            if finished || crate::platform::current_pid() != self.owner {
                self.join();
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(2)));
        }
    }

    /// Takes all available completions, waiting up to `timeout` for the
    /// first. `None` means the pool has finished and nothing more will come.
    /// Returns early, possibly empty, when workers' logging records arrive
    /// (take them with [`Pool::take_logs`]).
    pub fn wait_completions(&self, timeout: Option<Duration>) -> Option<Vec<Completion>> {
        self.wait(timeout, None)
    }

    fn wait(&self, timeout: Option<Duration>, generation: Option<u64>) -> Option<Vec<Completion>> {
        if crate::platform::current_pid() != self.owner {
            return None;
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let kicked =
            || generation.is_some_and(|g| self.hub.generation.load(Ordering::Acquire) != g);
        let mut done = lock(&self.hub.done);
        // A waiter that is not driving leaves completions to a caller that is.
        let idle = |d: &Done| {
            (d.queue.is_empty() && d.logs.is_empty())
                || (generation.is_none() && d.drivers > 0 && !d.finished)
        };
        while idle(&done) && !done.finished && !kicked() {
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Some(Vec::new());
            }
            let driving = generation.is_some();
            let cv = if driving {
                &self.hub.driving_cv
            } else {
                &self.hub.done_cv
            };
            *done.sleepers_mut(driving) += 1;
            done = match deadline {
                None => cv.wait(done).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    cv.wait_timeout(done, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
            *done.sleepers_mut(driving) -= 1;
        }
        if done.queue.is_empty() && done.logs.is_empty() && done.finished {
            return None;
        }
        if idle(&done) {
            return Some(Vec::new()); // kicked, or timed out
        }
        Some(done.queue.drain(..).collect())
    }

    /// The logging records workers sent since the last call, in the order
    /// they arrived: those a task made come before its completion is
    /// delivered, so take them after each wait and before settling.
    pub fn take_logs(&self) -> Vec<Message> {
        std::mem::take(&mut lock(&self.hub.done).logs)
    }

    /// The current kick generation; read it before checking whether the
    /// result you want has arrived, then pass it to [`Pool::wait_driving`].
    pub fn generation(&self) -> u64 {
        self.hub.generation.load(Ordering::Acquire)
    }

    /// Tells callers blocked in [`Pool::wait_driving`] that results were delivered
    /// by another thread, so they re-check theirs.
    pub fn kick(&self) {
        let done = lock(&self.hub.done);
        self.hub.generation.fetch_add(1, Ordering::AcqRel);
        if done.driving_sleepers > 0 {
            self.hub.driving_cv.notify_all();
        }
    }

    /// Waits for completions on behalf of a caller that wants a result now.
    /// For up to `spin` it polls the workers' sockets itself (no thread hop
    /// between a worker's answer and this caller), then blocks like
    /// [`Pool::wait_completions`]. Returns early, possibly empty, when the
    /// generation moves past `generation`.
    pub fn wait_driving(
        &self,
        generation: u64,
        spin: Duration,
        timeout: Option<Duration>,
    ) -> Option<Vec<Completion>> {
        let _driving = Driving::new(&self.hub);
        let start = Instant::now();
        let deadline = timeout.map(|t| start + t);
        let spin_until = start + spin.min(timeout.unwrap_or(spin));
        let mut spinning = None;
        loop {
            {
                let mut done = lock(&self.hub.done);
                if !done.queue.is_empty() || !done.logs.is_empty() {
                    return Some(done.queue.drain(..).collect());
                }
                if done.finished {
                    return None;
                }
            }
            if self.hub.generation.load(Ordering::Acquire) != generation {
                return Some(Vec::new());
            }
            let now = Instant::now();
            if now >= spin_until {
                break;
            }
            if spinning.is_none() {
                spinning = Some(Spinning::new(&self.hub));
            }
            if let Ok(events) = self.hub.channels.wait(Some(Duration::ZERO)) {
                if !events.is_empty() {
                    let (mine, wake) = {
                        let mut e = self.engine();
                        e.on_channels(&events);
                        e.tick();
                        let mine = e.take_done();
                        e.publish();
                        (mine, e.needs_wake())
                    };
                    if wake {
                        self.hub.waker.wake();
                    }
                    if !mine.is_empty() {
                        return Some(mine);
                    }
                    continue;
                }
            }
            std::hint::spin_loop();
        }
        drop(spinning);
        let rest = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        self.wait(rest, Some(generation))
    }

    pub fn stats(&self) -> Vec<WorkerStats> {
        let mut stats = self.engine().worker_stats();
        for s in &mut stats {
            s.rss = crate::platform::resident_bytes(s.pid).unwrap_or(0);
        }
        stats
    }

    /// The pool's task figures now.
    pub fn counts(&self) -> TaskCounts {
        self.engine().counts()
    }

    /// How many items of `function_id` to put in the next `map` chunk.
    pub fn chunk_size(&self, function_id: ObjectId, remaining_hint: Option<usize>) -> usize {
        lock(&self.hub.sizer).next(function_id, remaining_hint)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if crate::platform::current_pid() == self.owner {
            self.shutdown();
        }
        self.join();
    }
}
