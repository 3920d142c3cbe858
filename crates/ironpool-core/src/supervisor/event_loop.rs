//! The engine state of one pool and the supervisor thread's poll loop over
//! the zygote session, every worker's channel and output pipes, and the
//! nearest deadline.
//!
//! The state sits behind one mutex. The supervisor thread drives it when
//! descriptors become ready or a deadline passes; a caller thread drives it
//! directly to submit (the task goes to an idle worker's socket without a
//! thread hop) and, while it waits for a result, may poll the same
//! descriptors itself (see `Pool::pump`).

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::output::Capture;
use super::scheduler::Pending;
use super::worker::{Outgoing, State, Work, Worker};
use super::{PoolConfig, Shared, WorkerStats, lock};
use crate::ipc::{Channel, Kind, Message, Recv};
use crate::platform::{self, Pidfd, Ready};
use crate::reactor::Source;
use crate::task::{Completion, Crash, ExitStatus, Failure, FnId, KillReason, Outcome, Task};
use crate::zygote::{Session, decode_status};

/// A worker that closed its channel but was not reported dead by then is killed.
const EXIT_GRACE: Duration = Duration::from_secs(2);
const MEMORY_POLL: Duration = Duration::from_millis(20);
/// A task is queued behind a running one only if tasks of its kind take
/// less than this on average...
const PREFETCH_BELOW_NS: f64 = 2_000_000.0;
/// ...and the running one began less than this ago.
const PREFETCH_WINDOW: Duration = Duration::from_millis(5);

pub(super) struct Engine {
    cfg: PoolConfig,
    shared: Arc<Shared>,
    session: Option<Session>,
    workers: HashMap<u64, Worker>,
    pid_to_key: HashMap<i32, u64>,
    next_key: u64,
    pending: Pending,
    fns: HashMap<FnId, Message>,
    /// Registered objects released while tasks that need them are queued
    /// or running: forgotten once the last of those tasks is done.
    releasing: HashSet<FnId>,
    init: Message,
    shutting_down: bool,
    /// `terminate` was called: queued work is dropped, not run.
    terminated: bool,
    start_failures: u32,
    /// Set while the workers of a template that died are written off: their
    /// deaths are not start failures of this pool.
    losing_template: bool,
    broken: Option<(Option<Vec<u8>>, Crash)>,
    respawn_at: Option<Instant>,
    last_memory_poll: Instant,
    restarts: Vec<u64>,
    last_exit: Vec<String>,
    done: Vec<Completion>,
    stats_dirty: bool,
    /// When the supervisor thread wakes on its own (None: only on events).
    sleep_until: Option<Instant>,
}

impl Engine {
    pub fn new(
        cfg: PoolConfig,
        init: Message,
        session: Session,
        shared: Arc<Shared>,
    ) -> io::Result<Self> {
        session.set_nonblocking(true)?;
        let poller = &shared.poller;
        shared.waker.register(poller, Source::Waker.token())?;
        poller.add(&session, Source::Session.token(), false)?;
        lock(&shared.sizer).set_workers(cfg.workers);
        let slots = cfg.workers;
        Ok(Self {
            cfg,
            shared,
            session: Some(session),
            workers: HashMap::new(),
            pid_to_key: HashMap::new(),
            next_key: 1,
            pending: Pending::default(),
            fns: HashMap::new(),
            releasing: HashSet::new(),
            init,
            shutting_down: false,
            terminated: false,
            start_failures: 0,
            losing_template: false,
            broken: None,
            respawn_at: None,
            last_memory_poll: Instant::now(),
            restarts: vec![0; slots],
            last_exit: vec![String::new(); slots],
            done: Vec::new(),
            stats_dirty: true,
            sleep_until: None,
        })
    }

    /// Handles ready descriptors, then advances timers, workers and dispatch.
    pub fn handle(&mut self, events: &[Ready]) {
        for ev in events {
            match Source::from_token(ev.token) {
                Some(Source::Waker) => self.shared.waker.drain(),
                Some(Source::Session) => self.on_session(),
                Some(Source::Channel(key)) => {
                    if ev.writable {
                        self.flush(key);
                    }
                    if ev.readable {
                        self.on_channel(key);
                    }
                }
                Some(Source::Stdout(key)) => self.pump_output(key, false),
                Some(Source::Stderr(key)) => self.pump_output(key, true),
                // The zygote's sources are never registered here.
                _ => {}
            }
        }
        self.tick();
    }

    pub fn tick(&mut self) {
        self.check_timers();
        self.fill_workers();
        self.dispatch();
        self.finish_shutdown();
    }

    pub fn is_finished(&self) -> bool {
        // Queued work still runs after `shutdown` (or fails as StartFailed
        // if no worker can start): it is never dropped without an outcome.
        self.shutting_down
            && self.workers.is_empty()
            && (self.terminated || self.pending.is_empty())
    }

    // ---- commands from callers -------------------------------------------

    /// Queues a task and sends it at once if a worker is free.
    pub fn submit(&mut self, task: Task) {
        if let Some((error, crash)) = &self.broken {
            let outcome = Outcome::StartFailed {
                error: error.clone(),
                crash: crash.clone(),
            };
            self.complete(task, outcome, Duration::ZERO);
            return;
        }
        self.pending.push_back(task);
        self.dispatch();
    }

    pub fn register_fn(&mut self, id: FnId, body: Message) {
        self.fns.insert(id, body);
    }

    /// Forgets a registered object, once no queued or running task needs
    /// it; workers holding it are told to drop it.
    pub fn unregister(&mut self, id: FnId) {
        if self.needed(id) {
            self.releasing.insert(id);
        } else {
            self.forget(id);
        }
    }

    fn needed(&self, id: FnId) -> bool {
        let needs = |t: &Task| t.fn_id == id || t.needs.contains(&id);
        self.pending.iter().any(needs) || self.workers.values().any(|w| w.state.tasks().any(needs))
    }

    /// Forgets the released objects no task needs any more.
    fn forget_released(&mut self) {
        if self.releasing.is_empty() {
            return;
        }
        let done: Vec<FnId> = self
            .releasing
            .iter()
            .copied()
            .filter(|&id| !self.needed(id))
            .collect();
        for id in done {
            self.releasing.remove(&id);
            self.forget(id);
        }
    }

    fn forget(&mut self, id: FnId) {
        self.fns.remove(&id);
        let keys: Vec<u64> = self.workers.keys().copied().collect();
        for key in keys {
            if let Some(w) = self.workers.get_mut(&key) {
                if w.fns.remove(&id) && w.state.closing_since().is_none() {
                    w.outbox
                        .push_back(Outgoing::Owned(Message::new(Kind::Forget, id, 0)));
                    self.flush(key);
                }
            }
        }
    }

    pub fn cancel(&mut self, id: u64) -> bool {
        let withdrawn = self.pending.cancel(id);
        if withdrawn {
            self.forget_released();
        }
        withdrawn
    }

    /// True while the task is with a worker (running or next in its queue).
    pub fn is_dispatched(&self, id: u64) -> bool {
        self.workers
            .values()
            .any(|w| w.state.tasks().any(|t| t.id == id))
    }

    pub fn cancel_pending(&mut self) -> Vec<u64> {
        let withdrawn = self.pending.drain_all();
        self.forget_released();
        withdrawn
    }

    pub fn shutdown(&mut self) {
        self.shutting_down = true;
        self.finish_shutdown();
    }

    pub fn terminate(&mut self) {
        self.shutting_down = true;
        self.terminated = true;
        drop(self.pending.take_all());
        for w in self.workers.values_mut() {
            w.kill(KillReason::Shutdown);
        }
    }

    /// Completions produced so far, taken by the caller that drove the engine.
    pub fn take_done(&mut self) -> Vec<Completion> {
        std::mem::take(&mut self.done)
    }

    // ---- worker lifecycle --------------------------------------------------

    /// A worker that will take more tasks. One that has been sent its last
    /// task under `max_tasks_per_worker` no longer counts, so its replacement
    /// is forked while that task runs rather than after it.
    fn has_future(&self, w: &Worker) -> bool {
        if w.state.is_starting() {
            return true;
        }
        w.state.takes_tasks()
            && self
                .cfg
                .max_tasks_per_worker
                .is_none_or(|n| w.tasks_done + (w.state.in_flight() as u64) < n)
    }

    fn active_workers(&self) -> usize {
        self.workers.values().filter(|w| self.has_future(w)).count()
    }

    pub fn fill_workers(&mut self) {
        // While shutting down, workers are still started for queued work
        // (tasks submitted just before `shutdown`, or re-queued by a crash).
        let nothing_to_do = self.shutting_down && (self.terminated || self.pending.is_empty());
        if nothing_to_do || self.broken.is_some() || self.session.is_none() {
            return;
        }
        if let Some(at) = self.respawn_at {
            if Instant::now() < at {
                return;
            }
            self.respawn_at = None;
        }
        let mut reopened = false;
        while self.active_workers() < self.cfg.workers {
            let used: Vec<usize> = self
                .workers
                .values()
                .filter(|w| self.has_future(w))
                .map(|w| w.slot)
                .collect();
            let slot = (0..self.cfg.workers)
                .find(|s| !used.contains(s))
                .unwrap_or(0);
            if let Err(e) = self.spawn_worker(slot) {
                // A template that died before its session's end was read
                // refuses the fork request: start it again, once per call.
                let session_gone = matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                );
                if session_gone && !reopened {
                    reopened = true;
                    self.on_template_lost();
                    if self.broken.is_none() && self.session.is_some() {
                        continue;
                    }
                    return;
                }
                self.mark_broken(None, &format!("could not start a worker: {e}"));
                return;
            }
        }
    }

    fn spawn_worker(&mut self, slot: usize) -> io::Result<()> {
        let session = self
            .session
            .as_ref()
            .ok_or_else(|| io::Error::other("no template process"))?;
        let (ours, theirs) = Channel::pair()?;
        ours.set_nonblocking(true)?;
        let (out_r, out_w) = platform::output_pipe()?;
        let (err_r, err_w) = platform::output_pipe()?;
        let key = self.next_key;
        self.next_key += 1;
        let fork = Message::new(Kind::Fork, key, 0).with_fds(vec![theirs.into_fd(), out_w, err_w]);
        session.send_blocking(&fork)?;
        let poller = &self.shared.poller;
        poller.add(&ours, Source::Channel(key).token(), false)?;
        poller.add(&out_r, Source::Stdout(key).token(), false)?;
        poller.add(&err_r, Source::Stderr(key).token(), false)?;
        let forward = self.cfg.forward_output;
        let keep = self.cfg.stderr_tail_lines;
        let mut w = Worker {
            key,
            slot,
            pid: None,
            pidfd: None,
            chan: ours,
            outbox: Default::default(),
            wants_write: false,
            stdout: Capture::new(out_r, false, 0, forward),
            stderr: Capture::new(err_r, true, keep, forward),
            state: State::Starting,
            fns: Default::default(),
            tasks_done: 0,
            busy_ns: 0,
            kill_reason: None,
            protocol_error: None,
        };
        w.outbox.push_back(Outgoing::Owned(self.init.try_clone()?));
        self.workers.insert(key, w);
        self.flush(key);
        self.stats_dirty = true;
        Ok(())
    }

    fn on_session(&mut self) {
        loop {
            let Some(session) = self.session.as_mut() else {
                return;
            };
            match session.recv() {
                Ok(Recv::Message(mut m)) => match m.kind {
                    Kind::Forked => {
                        let pid = m.aux as i32;
                        let pidfd = m.fds.pop().map(|fd| Pidfd::from_fd(fd, pid));
                        match self.workers.get_mut(&m.id) {
                            Some(w) => {
                                w.pid = Some(pid);
                                w.pidfd = pidfd;
                                self.pid_to_key.insert(pid, m.id);
                                // A kill requested before the pid was known.
                                if let Some(reason) = w.kill_reason {
                                    w.kill_reason = None;
                                    w.kill(reason);
                                }
                            }
                            None => {
                                if let Some(p) = pidfd {
                                    let _ = p.kill();
                                }
                            }
                        }
                        self.stats_dirty = true;
                    }
                    Kind::ForkFailed => {
                        if let Some(w) = self.workers.get_mut(&m.id) {
                            w.protocol_error =
                                Some(format!("fork failed: {}", String::from_utf8_lossy(&m.body)));
                        }
                        self.on_exit(m.id, None);
                    }
                    Kind::Exited => {
                        if let Some(key) = self.pid_to_key.remove(&(m.id as i32)) {
                            self.on_exit(key, Some(decode_status(m.aux)));
                        }
                    }
                    _ => {}
                },
                Ok(Recv::WouldBlock) => return,
                Ok(Recv::Closed) | Err(_) => {
                    self.on_template_lost();
                    return;
                }
            }
        }
    }

    /// The template died (its session ended), and its workers die with it
    /// (PR_SET_PDEATHSIG): tasks they were running fail as crashed, the
    /// rest go back to the queue, and the template is started again.
    fn on_template_lost(&mut self) {
        let Some(old) = self.session.take() else {
            return;
        };
        self.shared.poller.delete(&old);
        self.losing_template = true;
        let keys: Vec<u64> = self.workers.keys().copied().collect();
        for key in keys {
            if let Some(w) = self.workers.get(&key) {
                // Nobody will sweep their trees now that the template is
                // gone: do it from here, best effort.
                w.kill_tree();
            }
            self.on_exit(key, None);
        }
        self.losing_template = false;
        if self.shutting_down && (self.terminated || self.pending.is_empty()) {
            return; // nothing left to run: finish without a template
        }
        match old.reopen().and_then(|s| {
            s.set_nonblocking(true)?;
            self.shared.poller.add(&s, Source::Session.token(), false)?;
            Ok(s)
        }) {
            Ok(s) => self.session = Some(s),
            Err(e) => self.mark_broken(
                None,
                &format!("the template process died and could not be started again: {e}"),
            ),
        }
    }

    fn on_channel(&mut self, key: u64) {
        loop {
            let Some(w) = self.workers.get_mut(&key) else {
                return;
            };
            if w.state.closing_since().is_some() {
                // Nothing more is read from a closing worker. Stop watching
                // its channel once nothing is left to send: a level-triggered
                // EOF would otherwise wake the loop until its exit is reported.
                if w.outbox.is_empty() {
                    self.shared.poller.delete(&w.chan);
                }
                return;
            }
            match w.chan.recv() {
                Ok(Recv::Message(m)) => self.on_message(key, m),
                Ok(Recv::WouldBlock) => return,
                Ok(Recv::Closed) => {
                    self.close_channel(key);
                    return;
                }
                Err(e) => {
                    w.protocol_error = Some(e.to_string());
                    w.kill(KillReason::Protocol);
                    self.close_channel(key);
                    return;
                }
            }
        }
    }

    fn close_channel(&mut self, key: u64) {
        if let Some(w) = self.workers.get_mut(&key) {
            self.shared.poller.delete(&w.chan);
            w.close(Instant::now());
        }
    }

    fn on_message(&mut self, key: u64, m: Message) {
        let Some(w) = self.workers.get_mut(&key) else {
            return;
        };
        match m.kind {
            Kind::Ready if matches!(w.state, State::Starting) => {
                w.state = State::Idle;
                self.start_failures = 0;
                self.stats_dirty = true;
            }
            Kind::InitFailed if matches!(w.state, State::Starting) => {
                // It exits by itself. Until that is reported it still counts
                // as starting, so its replacement waits for the back-off;
                // the exit grace period bounds how long it may take.
                w.state = State::StartFailed {
                    since: Instant::now(),
                    error: Some(m),
                };
            }
            Kind::Returned | Kind::Raised => {
                let Some(done) = w.finish(m.id, Instant::now()) else {
                    w.protocol_error =
                        Some(format!("result for task {} that it was not running", m.id));
                    w.kill(KillReason::Protocol);
                    return;
                };
                let elapsed = Duration::from_nanos(m.aux);
                w.tasks_done += 1;
                self.stats_dirty = true;
                w.busy_ns += m.aux;
                lock(&self.shared.sizer).record(done.task.fn_id, elapsed, done.task.items);
                self.maybe_retire(key);
                let outcome = if m.kind == Kind::Returned {
                    Outcome::Returned(m)
                } else {
                    Outcome::Raised(m)
                };
                self.complete(done.task, outcome, elapsed);
            }
            _ => {
                w.protocol_error = Some(format!("unexpected {:?} message", m.kind));
                w.kill(KillReason::Protocol);
            }
        }
    }

    /// Recycling between tasks: by task count and by private memory.
    fn maybe_retire(&mut self, key: u64) {
        let Some(w) = self.workers.get_mut(&key) else {
            return;
        };
        if matches!(w.state, State::Exiting { .. }) {
            // A retiring worker that just finished its last task leaves now.
            self.flush(key);
            return;
        }
        if !w.state.takes_tasks() {
            return;
        }
        let by_count = self
            .cfg
            .max_tasks_per_worker
            .is_some_and(|n| w.tasks_done >= n);
        let by_memory = match (self.cfg.max_memory, w.pid) {
            (Some(limit), Some(pid)) => {
                platform::resident_bytes(pid).is_some_and(|rss| rss > limit)
            }
            _ => false,
        };
        if by_count || by_memory {
            // Tasks queued behind the last one go back to the queue untouched.
            for task in w.retire(Instant::now()).into_iter().rev() {
                self.pending.push_front(task);
            }
            let reason = if by_count {
                "recycled: task limit"
            } else {
                "recycled: memory limit"
            };
            if let Some(s) = self.last_exit.get_mut(w.slot) {
                *s = reason.to_string();
            }
            if matches!(w.state, State::Exiting { .. }) {
                self.flush(key);
            }
        }
    }

    fn on_exit(&mut self, key: u64, status: Option<ExitStatus>) {
        // The exit report can overtake the worker's last messages: read what
        // it sent before it died, so a result that arrived is not taken for
        // a crash of the task (and the crash is charged to the right task).
        self.on_channel(key);
        let Some(mut w) = self.workers.remove(&key) else {
            return;
        };
        if let Some(pid) = w.pid {
            self.pid_to_key.remove(&pid);
        }
        w.stdout.pump();
        let crash = Crash {
            pid: w.pid.unwrap_or(0),
            status,
            killed_by_pool: w.kill_reason,
            stderr_tail: w.stderr.tail(),
            protocol_error: w.protocol_error.take(),
        };
        let ran_ok = !w.state.is_starting();
        let by_policy = matches!(w.state, State::Exiting { .. });
        let (work, start_error) = match w.state {
            State::Busy(work)
            | State::ChannelClosed {
                work: Some(work), ..
            } => (Some(work), None),
            State::Retiring { running } => (Some(Work::from(running)), None),
            State::StartFailed { error, .. } => (None, error),
            _ => (None, None),
        };
        let mut running = None;
        if let Some(work) = work {
            // Tasks the worker had not begun go back to the front, in order.
            for task in work.queued.into_iter().rev() {
                self.pending.push_front(task);
            }
            running = Some(work.running);
        }
        if let Some(f) = running {
            let failure = match w.kill_reason {
                Some(KillReason::Timeout { limit }) => Failure::TimedOut {
                    limit,
                    crash: crash.clone(),
                },
                _ => Failure::Crashed(crash.clone()),
            };
            self.fail(f.task, failure);
        }
        if let Some(s) = self.last_exit.get_mut(w.slot) {
            if !by_policy {
                *s = describe_exit(&crash);
            }
        }
        if !self.shutting_down {
            if let Some(r) = self.restarts.get_mut(w.slot) {
                *r += 1;
            }
        }
        if !ran_ok && !self.shutting_down && !self.losing_template {
            self.start_failures += 1;
            let error = start_error.map(|m| m.body);
            if self.start_failures >= self.cfg.max_start_failures {
                self.broken = Some((error, crash));
                self.fail_pending_start();
            } else {
                let backoff = Duration::from_millis(20 << self.start_failures.min(6));
                self.respawn_at = Some(Instant::now() + backoff);
            }
        }
        self.stats_dirty = true;
    }

    fn mark_broken(&mut self, error: Option<Vec<u8>>, why: &str) {
        if self.broken.is_none() {
            let crash = Crash {
                pid: 0,
                status: None,
                killed_by_pool: None,
                stderr_tail: String::new(),
                protocol_error: Some(why.to_string()),
            };
            self.broken = Some((error, crash));
        }
        self.fail_pending_start();
    }

    fn fail_pending_start(&mut self) {
        let Some((error, crash)) = self.broken.clone() else {
            return;
        };
        // Workers still setting up would only fail the same way: stop them.
        for w in self.workers.values_mut() {
            if w.state.is_starting() {
                w.kill(KillReason::Shutdown);
            }
        }
        for task in self.pending.take_all() {
            let outcome = Outcome::StartFailed {
                error: error.clone(),
                crash: crash.clone(),
            };
            self.complete(task, outcome, Duration::ZERO);
        }
    }

    fn fail(&mut self, mut task: Task, failure: Failure) {
        if task.retries_left > 0 && !self.shutting_down {
            task.retries_left -= 1;
            task.attempts.push(failure);
            self.pending.push_front(task);
        } else {
            self.complete(task, Outcome::Failed(failure), Duration::ZERO);
        }
    }

    fn complete(&mut self, mut task: Task, outcome: Outcome, elapsed: Duration) {
        self.done.push(Completion {
            task_id: task.id,
            outcome,
            elapsed,
            attempts: std::mem::take(&mut task.attempts),
        });
        // Only a task that needed a released object can be its last user
        // (and scanning every queued task on each completion would cost).
        let released = |id: &FnId| self.releasing.contains(id);
        if released(&task.fn_id) || task.needs.iter().any(released) {
            drop(task); // no longer queued or running
            self.forget_released();
        }
    }

    // ---- sending ----------------------------------------------------------

    fn dispatch(&mut self) {
        self.send_pending();
        if self.cfg.max_tasks_per_worker.is_some() {
            // A worker just sent its last task: fork its successor now.
            self.fill_workers();
        }
    }

    fn send_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let depth = 1 + self.cfg.prefetch;
        let now = Instant::now();
        let shared = self.shared.clone();
        let sizer = lock(&shared.sizer);
        // Queue a task behind a running one only when that one is known to be
        // quick and has just begun: a long task must not strand work behind
        // it while another worker is free.
        // A memory limit is checked between tasks: nothing may wait behind one.
        let may_prefetch = self.cfg.max_memory.is_none();
        let quick = |w: &Worker| {
            may_prefetch
                && w.state.tasks().all(|t| {
                    sizer
                        .mean(t.fn_id)
                        .is_some_and(|ns| ns * f64::from(t.items) < PREFETCH_BELOW_NS)
                })
                && w.state
                    .running()
                    .is_none_or(|r| now.duration_since(r.started) < PREFETCH_WINDOW)
        };
        loop {
            let Some(key) = self
                .workers
                .values()
                .filter(|w| {
                    // Prefetch never sends a worker more than its task limit.
                    let sent = w.tasks_done + w.state.in_flight() as u64;
                    w.state.takes_tasks()
                        && w.state.in_flight() < depth
                        && self.cfg.max_tasks_per_worker.is_none_or(|n| sent < n)
                        && (w.state.in_flight() == 0 || quick(w))
                })
                .min_by_key(|w| (w.state.in_flight(), w.key))
                .map(|w| w.key)
            else {
                return;
            };
            let Some(task) = self.pending.pop() else {
                return;
            };
            let Some(w) = self.workers.get_mut(&key) else {
                return;
            };
            for id in std::iter::once(task.fn_id).chain(task.needs.iter().copied()) {
                if w.fns.insert(id) {
                    if let Some(f) = self.fns.get(&id).and_then(|f| f.try_clone().ok()) {
                        w.outbox.push_back(Outgoing::Owned(f));
                    }
                }
            }
            let id = task.id;
            match w.state.push(task, Instant::now()) {
                Ok(started) => self.stats_dirty |= started,
                Err(task) => {
                    self.pending.push_front(task);
                    return;
                }
            }
            w.outbox.push_back(Outgoing::Task(id));
            self.flush(key);
        }
    }

    fn flush(&mut self, key: u64) {
        let Some(w) = self.workers.get_mut(&key) else {
            return;
        };
        let mut failed = false;
        while let Some(next) = w.outbox.front() {
            let msg = match next {
                Outgoing::Owned(m) => Some(m),
                Outgoing::Task(id) => w.state.tasks().find(|t| t.id == *id).map(|t| &t.payload),
            };
            let Some(msg) = msg else {
                w.outbox.pop_front();
                continue;
            };
            match w.chan.send(msg) {
                Ok(true) => {
                    w.outbox.pop_front();
                }
                Ok(false) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        let want = !w.outbox.is_empty() && !failed;
        if want != w.wants_write {
            w.wants_write = want;
            let _ = self
                .shared
                .poller
                .modify(&w.chan, Source::Channel(key).token(), want);
        }
        if failed {
            // The worker is dying; its exit report will settle its tasks.
            self.close_channel(key);
        }
    }

    fn pump_output(&mut self, key: u64, stderr: bool) {
        let Some(w) = self.workers.get_mut(&key) else {
            return;
        };
        let cap = if stderr { &mut w.stderr } else { &mut w.stdout };
        // At EOF `pump` closes the pipe, which also takes it out of epoll.
        cap.pump();
    }

    // ---- time ------------------------------------------------------------

    pub fn next_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        self.next_deadline()
            .map(|t| t.saturating_duration_since(now))
    }

    /// Records when the supervisor thread will next wake on its own.
    pub fn set_sleep(&mut self, timeout: Option<Duration>) {
        self.sleep_until = timeout.map(|t| Instant::now() + t);
    }

    /// True when a caller's change created a deadline earlier than the
    /// supervisor thread's planned wake-up: it must be woken to re-plan.
    pub fn needs_wake(&self) -> bool {
        match (self.next_deadline(), self.sleep_until) {
            (Some(next), Some(planned)) => next < planned,
            (Some(_), None) => true,
            (None, _) => self.shutting_down,
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = self.respawn_at;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        let mut memory_watch = false;
        for w in self.workers.values() {
            if let Some((deadline, _)) = w.deadline(self.cfg.task_timeout) {
                consider(deadline);
            }
            if let Some(closed) = w.state.closing_since() {
                consider(closed + EXIT_GRACE);
            }
            if w.state.running().is_some() && self.cfg.max_memory.is_some() {
                memory_watch = true;
            }
        }
        if memory_watch {
            consider(self.last_memory_poll + MEMORY_POLL);
        }
        next
    }

    fn check_timers(&mut self) {
        let now = Instant::now();
        let hard = self
            .cfg
            .max_memory
            .map(|m| (m as f64 * self.cfg.hard_memory_factor) as u64);
        let poll_memory = hard.is_some() && now >= self.last_memory_poll + MEMORY_POLL;
        if poll_memory {
            self.last_memory_poll = now;
        }
        let default_timeout = self.cfg.task_timeout;
        for w in self.workers.values_mut() {
            if let Some((deadline, limit)) = w.deadline(default_timeout) {
                if now >= deadline {
                    w.kill(KillReason::Timeout { limit });
                }
            }
            if let Some(closed) = w.state.closing_since() {
                if now >= closed + EXIT_GRACE {
                    w.kill(KillReason::Shutdown);
                }
            }
            if let (true, Some(limit), Some(pid)) = (poll_memory, hard, w.pid) {
                if w.state.running().is_some() {
                    if let Some(rss) = platform::resident_bytes(pid) {
                        if rss > limit {
                            w.kill(KillReason::Memory { rss, limit });
                        }
                    }
                }
            }
        }
    }

    // ---- shutdown and publishing -------------------------------------------

    fn finish_shutdown(&mut self) {
        if !self.shutting_down || !self.pending.is_empty() {
            return;
        }
        if self.workers.values().any(|w| w.state.in_flight() > 0) {
            return;
        }
        let keys: Vec<u64> = self.workers.keys().copied().collect();
        for key in keys {
            if let Some(w) = self.workers.get_mut(&key) {
                if w.state.closing_since().is_none() {
                    // Idle or starting (nothing is in flight): exits now.
                    for task in w.retire(Instant::now()).into_iter().rev() {
                        self.pending.push_front(task);
                    }
                    self.flush(key);
                }
            }
        }
    }

    pub fn publish(&mut self) {
        if self.stats_dirty {
            self.stats_dirty = false;
            // A recycled worker's successor is forked while it finishes its
            // last task, so a slot may have two live workers: show the one
            // doing the slot's work (the old one while it runs, then the new).
            let rank = |w: &Worker| match w.state {
                State::Retiring { .. } => 0,
                State::Exiting { .. } => 2,
                _ => 1,
            };
            let mut live: Vec<&Worker> = self
                .workers
                .values()
                .filter(|w| !matches!(w.state, State::ChannelClosed { .. }))
                .collect();
            live.sort_by_key(|w| (w.slot, rank(w), w.pid));
            live.dedup_by_key(|w| w.slot);
            let stats: Vec<WorkerStats> = live
                .into_iter()
                .map(|w| WorkerStats {
                    slot: w.slot,
                    pid: w.pid.unwrap_or(0),
                    tasks_done: w.tasks_done,
                    busy: w.state.running().is_some(),
                    rss: 0, // read by `Pool::stats`, not on every task
                    restarts: self.restarts.get(w.slot).copied().unwrap_or(0),
                    last_exit: self.last_exit.get(w.slot).cloned().unwrap_or_default(),
                    busy_ns: w.busy_ns,
                })
                .collect();
            *lock(&self.shared.stats) = stats;
        }
        if !self.done.is_empty() {
            self.stats_dirty = true;
            let mut done = lock(&self.shared.done);
            done.queue.extend(self.done.drain(..));
            drop(done);
            self.shared.done_cv.notify_all();
        }
    }

    pub fn teardown(&mut self) {
        for w in self.workers.values_mut() {
            w.kill(KillReason::Shutdown);
        }
        self.publish();
        // Give back the pool's descriptors now, not when its handle goes
        // (registered objects hold segments too).
        self.workers.clear();
        self.fns.clear();
        self.releasing.clear();
        self.session = None;
        self.shared.poller.close();
        self.shared.waker.close();
        let mut done = lock(&self.shared.done);
        done.finished = true;
        drop(done);
        self.shared.done_cv.notify_all();
    }
}

fn describe_exit(c: &Crash) -> String {
    match (c.killed_by_pool, c.status) {
        (Some(KillReason::Timeout { limit }), _) => format!("killed: task timeout {limit:?}"),
        (Some(KillReason::Memory { rss, limit }), _) => {
            format!("killed: memory {rss} > {limit} bytes")
        }
        (Some(KillReason::Protocol), _) => "killed: protocol error".into(),
        (Some(KillReason::Shutdown), _) => "killed: did not exit".into(),
        (None, Some(ExitStatus::Code(c))) => format!("exited with code {c}"),
        (None, Some(ExitStatus::Signal(s))) => format!("killed by signal {s}"),
        (None, None) => "lost".into(),
    }
}

/// The supervisor thread: sleeps until a descriptor is ready or the nearest
/// deadline, then drives the engine. Never touches Python.
pub(super) fn run(shared: Arc<Shared>, engine: Arc<Mutex<Engine>>) {
    lock(&engine).fill_workers();
    loop {
        let timeout = {
            let mut e = lock(&engine);
            e.publish();
            if e.is_finished() {
                break;
            }
            let timeout = e.next_timeout();
            e.set_sleep(timeout);
            timeout
        };
        let Ok(events) = shared.poller.wait(timeout) else {
            break;
        };
        lock(&engine).handle(&events);
    }
    lock(&engine).teardown();
}
