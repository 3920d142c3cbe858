//! The engine state of one pool and the supervisor thread's poll loop over
//! the zygote session, every worker's channel and output pipes, and the
//! nearest deadline. This module owns the state and routes events; each
//! concern lives beside it: `lifecycle` (spawning, exits, start back-off),
//! `scheduler` and `dispatch` (which task goes where, and sending it),
//! `registry` (registered objects), `timers` (limits, deadlines) and
//! `stats` (what callers see). Worker messages and task completion are here.
//!
//! The state sits behind one mutex. The supervisor thread drives it when
//! descriptors become ready or a deadline passes; a caller thread drives it
//! directly to submit (the task goes to an idle worker's socket without a
//! thread hop) and, while it waits for a result, may poll the same
//! descriptors itself (see `Pool::wait_driving`).

use crate::id_hash::IdMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::lifecycle::{Backoff, OomLedger};
use super::registry::Registry;
use super::scheduler::Pending;
use super::worker::{State, Worker};
use super::{Hub, PoolConfig, TaskCounts, lock};
use crate::ipc::{Kind, Message, RETRYABLE, Recv};
use crate::platform::Ready;
use crate::reactor::{Source, WorkerKey};
use crate::task::{Attempt, Completion, Crash, KillReason, ObjectId, Outcome, Task};
use crate::zygote::Session;

/// The state of one pool. Fields are shared with the sibling modules that
/// implement each concern on it.
pub(super) struct Engine {
    pub(super) cfg: PoolConfig,
    pub(super) hub: Arc<Hub>,
    pub(super) session: Option<Session>,
    pub(super) workers: IdMap<WorkerKey, Worker>,
    pub(super) pid_to_key: IdMap<i32, WorkerKey>,
    pub(super) next_key: WorkerKey,
    pub(super) pending: Pending,
    pub(super) registry: Registry,
    /// Sent to each worker first.
    pub(super) init: Message,
    pub(super) shutting_down: bool,
    /// `terminate` was called: queued work is dropped, not run.
    pub(super) terminated: bool,
    pub(super) backoff: Backoff,
    pub(super) oom: OomLedger,
    /// Set while the workers of a template that died are written off: their
    /// deaths are not start failures of this pool.
    pub(super) losing_template: bool,
    /// The template said it is retiring (`Kind::Retiring`): the workers it
    /// kills next were not killed by their tasks, which run again.
    pub(super) template_retiring: bool,
    /// Why no worker can start (then every task fails with it).
    pub(super) broken: Option<(Option<Vec<u8>>, Crash)>,
    pub(super) last_memory_poll: Instant,
    pub(super) restarts: Vec<u64>,
    pub(super) last_exit: Vec<String>,
    pub(super) done: Vec<Completion>,
    /// Running totals for `counts` (queued and running are read off the state).
    pub(super) totals: TaskCounts,
    /// Workers' logging records, in the order they arrived, until published.
    pub(super) logs: Vec<Message>,
    /// When the supervisor thread wakes on its own (None: only on events).
    pub(super) sleep_until: Option<Instant>,
}

impl Engine {
    pub fn new(
        cfg: PoolConfig,
        init: Message,
        session: Session,
        hub: Arc<Hub>,
    ) -> io::Result<Self> {
        session.set_nonblocking(true)?;
        let poller = &hub.poller;
        hub.waker.register(poller, Source::Waker.token())?;
        poller.add(&session, Source::Session.token(), false)?;
        poller.add_poller(&hub.channels, Source::Channels.token())?;
        lock(&hub.sizer).set_workers(cfg.workers);
        let slots = cfg.workers;
        Ok(Self {
            cfg,
            hub,
            session: Some(session),
            workers: IdMap::default(),
            pid_to_key: IdMap::default(),
            next_key: 1,
            pending: Pending::default(),
            registry: Registry::default(),
            init,
            shutting_down: false,
            terminated: false,
            backoff: Backoff::default(),
            oom: OomLedger::default(),
            losing_template: false,
            template_retiring: false,
            broken: None,
            last_memory_poll: Instant::now(),
            restarts: vec![0; slots],
            last_exit: vec![String::new(); slots],
            done: Vec::new(),
            totals: TaskCounts::default(),
            logs: Vec::new(),
            sleep_until: None,
        })
    }

    /// Handles ready descriptors, then advances timers, workers and dispatch.
    pub fn handle(&mut self, events: &[Ready]) {
        for ev in events {
            match Source::from_token(ev.token) {
                Some(Source::Waker) => self.hub.waker.drain(),
                Some(Source::Session) => self.on_session(),
                Some(Source::Channels) => {
                    if let Ok(channels) = self.hub.channels.wait(Some(Duration::ZERO)) {
                        self.on_channels(&channels);
                    }
                }
                Some(Source::Stdout(key)) => self.drain_output(key, false),
                Some(Source::Stderr(key)) => self.drain_output(key, true),
                // Channels arrive through `Source::Channels`; the zygote's
                // sources are never registered here.
                _ => {}
            }
        }
        self.tick();
    }

    /// Reads and writes the workers' channels that `events` (from the
    /// channels poller) found ready.
    pub(super) fn on_channels(&mut self, events: &[Ready]) {
        for ev in events {
            match Source::from_token(ev.token) {
                Some(Source::Channel(key)) => {
                    if ev.writable {
                        self.flush(key);
                    }
                    if ev.readable {
                        self.on_channel(key);
                    }
                }
                Some(Source::Doorbell(key)) => self.on_doorbell(key),
                _ => {}
            }
        }
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

    /// Queues tasks in order, then sends what workers may take.
    pub fn submit_many(&mut self, tasks: Vec<Task>) {
        let backlog = !self.pending.is_empty();
        for task in tasks {
            self.queue(task);
        }
        self.dispatch_submitted(backlog);
    }

    fn queue(&mut self, task: Task) {
        self.totals.submitted += 1;
        if let Some((error, crash)) = &self.broken {
            let outcome = Outcome::StartFailed {
                error: error.clone(),
                crash: crash.clone(),
            };
            self.complete(task, outcome, Duration::ZERO);
            return;
        }
        self.pending.push_back(task);
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

    // ---- what workers send ---------------------------------------------------

    /// Reads what a worker sent until its socket is drained or closes.
    pub(super) fn on_channel(&mut self, key: WorkerKey) {
        loop {
            let Some(w) = self.workers.get_mut(&key) else {
                return;
            };
            if w.state.closing_since().is_some() {
                // Nothing more is read from a closing worker. Stop watching
                // its channel once nothing is left to send: a level-triggered
                // EOF would otherwise wake the loop until its exit is reported.
                if w.outbox.is_empty() {
                    self.hub.channels.delete(&w.chan);
                    self.hub.channels.delete(&w.doorbell);
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

    pub(super) fn close_channel(&mut self, key: WorkerKey) {
        if let Some(w) = self.workers.get_mut(&key) {
            self.hub.channels.delete(&w.chan);
            self.hub.channels.delete(&w.doorbell);
            w.close(Instant::now());
        }
    }

    fn on_message(&mut self, key: WorkerKey, m: Message) {
        let Some(w) = self.workers.get_mut(&key) else {
            return;
        };
        match m.kind {
            // Read before the result that follows it on the same socket, so
            // a task's records reach the caller before its future settles.
            Kind::Log => self.logs.push(m),
            Kind::Ready if matches!(w.state, State::Starting) => {
                w.state = State::Idle;
                self.backoff.reset();
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
                w.busy_ns += m.aux;
                lock(&self.hub.sizer).record(done.task.function_id, elapsed, done.task.items);
                self.maybe_retire(key);
                if m.kind == Kind::Returned {
                    self.complete(done.task, Outcome::Returned(m), elapsed);
                } else if m.flags & RETRYABLE != 0 {
                    self.fail(done.task, Attempt::Raised(m), elapsed);
                } else {
                    self.complete(done.task, Outcome::Raised(m), elapsed);
                }
            }
            _ => {
                w.protocol_error = Some(format!("unexpected {:?} message", m.kind));
                w.kill(KillReason::Protocol);
            }
        }
    }

    // ---- how tasks end ------------------------------------------------------

    /// The one retry decision, for crashes, timeouts and retryable raises
    /// alike: re-queue the very message at the front while the budget lasts
    /// (never once shutting down: `shutdown` and `terminate` end tasks as
    /// they are); otherwise the attempt is the outcome.
    pub(super) fn fail(&mut self, mut task: Task, attempt: Attempt, elapsed: Duration) {
        if task.retries_left > 0 && !self.shutting_down {
            task.retries_left -= 1;
            task.attempts.push(attempt);
            self.totals.retried += 1;
            self.pending.push_front(task);
        } else {
            self.complete(task, attempt.into(), elapsed);
        }
    }

    pub(super) fn complete(&mut self, mut task: Task, outcome: Outcome, elapsed: Duration) {
        let totals = &mut self.totals;
        if matches!(outcome, Outcome::Returned(_)) {
            totals.returned += 1;
        } else {
            totals.failed += 1;
        }
        totals.items_done += u64::from(task.items);
        totals.task_ns += u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.done.push(Completion {
            task_id: task.id,
            outcome,
            elapsed,
            attempts: std::mem::take(&mut task.attempts),
        });
        // Only a task that needed a released object can be its last user
        // (and scanning every queued task on each completion would cost).
        let released = |id: &ObjectId| self.registry.is_releasing(*id);
        if released(&task.function_id) || task.needs.iter().any(released) {
            drop(task); // no longer queued or running
            self.forget_released();
        }
    }

    /// Forwards a worker's output (and keeps the stderr tail).
    fn drain_output(&mut self, key: WorkerKey, stderr: bool) {
        let Some(w) = self.workers.get_mut(&key) else {
            return;
        };
        let cap = if stderr { &mut w.stderr } else { &mut w.stdout };
        // At EOF `drain` closes the pipe, which also takes it out of epoll.
        cap.drain();
    }

    // ---- shutdown -----------------------------------------------------------

    /// Once shutting down with nothing queued or in flight, tells every
    /// worker to exit.
    fn finish_shutdown(&mut self) {
        if !self.shutting_down || !self.pending.is_empty() {
            return;
        }
        if self.workers.values().any(|w| w.state.in_flight() > 0) {
            return;
        }
        let keys: Vec<WorkerKey> = self.workers.keys().copied().collect();
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

    pub fn teardown(&mut self) {
        for w in self.workers.values_mut() {
            w.kill(KillReason::Shutdown);
        }
        self.publish();
        // Give back the pool's descriptors now, not when its handle goes
        // (registered objects hold segments too).
        self.workers.clear();
        self.registry.clear();
        self.session = None;
        self.hub.channels.close();
        self.hub.poller.close();
        self.hub.waker.close();
        let mut done = lock(&self.hub.done);
        done.finished = true;
        drop(done);
        self.hub.done_cv.notify_all();
        self.hub.driving_cv.notify_all();
    }
}

/// The supervisor thread: sleeps until a descriptor is ready or the nearest
/// deadline, then drives the engine. Never touches Python.
pub(super) fn run(hub: Arc<Hub>, engine: Arc<Mutex<Engine>>) {
    super::lock_engine(&hub, &engine).fill_workers();
    loop {
        let timeout = {
            let mut e = super::lock_engine(&hub, &engine);
            e.publish();
            if e.is_finished() {
                break;
            }
            let timeout = e.next_timeout();
            e.set_sleep(timeout);
            timeout
        };
        let Ok(events) = hub.poller.wait(timeout) else {
            break;
        };
        super::lock_engine(&hub, &engine).handle(&events);
    }
    // Through the inbox too: tasks left there are dropped with the rest.
    super::lock_engine(&hub, &engine).teardown();
}
