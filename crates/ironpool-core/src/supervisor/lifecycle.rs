//! Where workers are spawned, and how they end: fork requests and the
//! template's replies, recycling, exits and what they settle, a lost
//! template, and the back-off (then giving up) when workers fail to start.

use std::collections::HashMap;
use std::io;
use std::time::{Duration, Instant};

use super::event_loop::Engine;
use super::output::Capture;
use super::worker::{Outgoing, State, Work, Worker};
use crate::ipc::{Channel, Kind, Message, Recv};
use crate::platform::{self, Doorbell, OomCounter, Pidfd};
use crate::reactor::{Source, WorkerKey};
use crate::task::{Attempt, Crash, ExitStatus, KillReason, Outcome};
use crate::zygote::decode_status;

/// Consecutive start failures, and when the next worker may be forked.
#[derive(Debug, Default)]
pub(super) struct Backoff {
    failures: u32,
    respawn_at: Option<Instant>,
}

impl Backoff {
    /// A worker finished its set-up: failures are counted afresh.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Counts a failed start. True once `max` in a row have failed (give
    /// up); otherwise the next fork waits 40 ms, doubling up to 1.28 s.
    pub fn failed(&mut self, max: u32, now: Instant) -> bool {
        self.failures += 1;
        if self.failures >= max {
            return true;
        }
        self.respawn_at = Some(now + Duration::from_millis(20 << self.failures.min(6)));
        false
    }

    /// True once forking may resume (the wait, if any, is then over).
    pub fn may_fork(&mut self, now: Instant) -> bool {
        match self.respawn_at {
            Some(at) if now < at => false,
            _ => {
                self.respawn_at = None;
                true
            }
        }
    }

    pub fn respawn_at(&self) -> Option<Instant> {
        self.respawn_at
    }
}

/// The OOM kills the kernel counted per memory cgroup, and how many of them
/// are already charged to a dead worker, so that one kill explains at most
/// one death. (The kernel counts per cgroup: a kill of another process in
/// it, followed by a SIGKILL from outside, would be taken for the OOM
/// killer's. The kernel gives nothing finer.)
#[derive(Debug, Default)]
pub(super) struct OomLedger {
    charged: HashMap<OomCounter, u64>,
}

impl OomLedger {
    /// A worker of this cgroup started: kills counted before are not its.
    pub fn watch(&mut self, counter: &OomCounter) {
        if !self.charged.contains_key(counter) {
            if let Some(n) = counter.kills() {
                self.charged.insert(counter.clone(), n);
            }
        }
    }

    /// A worker of this cgroup died of a SIGKILL the pool did not send:
    /// whether a kill the kernel counted, not yet charged, explains it.
    /// None if the count cannot be read.
    pub fn charge(&mut self, counter: &OomCounter) -> Option<bool> {
        let now = counter.kills()?;
        let charged = self.charged.entry(counter.clone()).or_insert(now);
        Some(charge_kill(charged, now))
    }
}

/// One death against the kernel's count `now`, of which `charged` are
/// explained already.
fn charge_kill(charged: &mut u64, now: u64) -> bool {
    if now > *charged {
        *charged += 1;
        true
    } else {
        false
    }
}

impl Engine {
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

    /// Forks workers until every slot has one that will take tasks, unless
    /// nothing is left to run, the pool is broken, or a back-off runs.
    pub fn fill_workers(&mut self) {
        // While shutting down, workers are still started for queued work
        // (tasks submitted just before `shutdown`, or re-queued by a crash).
        let nothing_to_do = self.shutting_down && (self.terminated || self.pending.is_empty());
        if nothing_to_do || self.broken.is_some() || self.session.is_none() {
            return;
        }
        if !self.backoff.may_fork(Instant::now()) {
            return;
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
        let doorbell = Doorbell::new()?;
        let key = self.next_key;
        self.next_key += 1;
        // The doorbell goes first: the template takes the others from the end.
        let fds = vec![
            doorbell.try_clone()?.into_fd(),
            theirs.into_fd(),
            out_w,
            err_w,
        ];
        let fork = Message::new(Kind::Fork, key, 0).with_fds(fds);
        session.send_blocking(&fork)?;
        self.hub
            .channels
            .add(&ours, Source::Channel(key).token(), false)?;
        let poller = &self.hub.poller;
        poller.add(&out_r, Source::Stdout(key).token(), false)?;
        poller.add(&err_r, Source::Stderr(key).token(), false)?;
        // Last: the worker holds a copy, so a registration left by a failed
        // step above would outlive this function.
        self.hub
            .channels
            .add(&doorbell, Source::Doorbell(key).token(), false)?;
        let forward = self.cfg.forward_output;
        let keep = self.cfg.stderr_tail_lines;
        let mut w = Worker {
            key,
            slot,
            pid: None,
            pidfd: None,
            chan: ours,
            doorbell,
            quiet_until: None,
            outbox: Default::default(),
            wants_write: false,
            stdout: Capture::new(out_r, false, 0, forward),
            stderr: Capture::new(err_r, true, keep, forward),
            state: State::Starting,
            objects: Default::default(),
            tasks_done: 0,
            busy_ns: 0,
            kill_reason: None,
            protocol_error: None,
            oom: None,
        };
        w.outbox.push_back(Outgoing::Owned(self.init.try_clone()?));
        self.workers.insert(key, w);
        self.flush(key);
        Ok(())
    }

    /// The template's replies: a forked worker's pid, a failed fork, an exit.
    pub(super) fn on_session(&mut self) {
        loop {
            let Some(session) = self.session.as_mut() else {
                return;
            };
            match session.recv() {
                Ok(Recv::Message(mut m)) => match m.kind {
                    Kind::Forked => {
                        let pid = m.aux as i32;
                        let pidfd = m.fds.pop().map(|fd| Pidfd::from_fd(fd, pid));
                        let oom = OomCounter::of(pid);
                        if let Some(c) = &oom {
                            self.oom.watch(c);
                        }
                        match self.workers.get_mut(&m.id) {
                            Some(w) => {
                                w.pid = Some(pid);
                                w.pidfd = pidfd;
                                w.oom = oom;
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
                    Kind::Retiring => self.template_retiring = true,
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
    /// (PR_SET_PDEATHSIG): tasks they were running fail as crashed (or, if
    /// the template retired on purpose, run again), the rest go back to the
    /// queue, and the template is started again.
    fn on_template_lost(&mut self) {
        let Some(old) = self.session.take() else {
            return;
        };
        self.hub.poller.delete(&old);
        self.losing_template = true;
        let keys: Vec<WorkerKey> = self.workers.keys().copied().collect();
        for key in keys {
            if let Some(w) = self.workers.get(&key) {
                // Nobody will sweep their trees now that the template is
                // gone: do it from here, best effort.
                w.kill_tree();
            }
            self.on_exit(key, None);
        }
        self.losing_template = false;
        self.template_retiring = false;
        if self.shutting_down && (self.terminated || self.pending.is_empty()) {
            return; // nothing left to run: finish without a template
        }
        match old.reopen().and_then(|s| {
            s.set_nonblocking(true)?;
            self.hub.poller.add(&s, Source::Session.token(), false)?;
            Ok(s)
        }) {
            Ok(s) => self.session = Some(s),
            Err(e) => self.mark_broken(
                None,
                &format!("the template process died and could not be started again: {e}"),
            ),
        }
    }

    /// Recycling between tasks: by task count and by private memory.
    pub(super) fn maybe_retire(&mut self, key: WorkerKey) {
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

    /// Settles a worker that is gone: its running task fails (or is retried),
    /// the ones queued behind it go back to the queue, and a death during
    /// set-up counts towards giving up.
    fn on_exit(&mut self, key: WorkerKey, status: Option<ExitStatus>) {
        // The exit report can overtake the worker's last messages: read what
        // it sent before it died, so a result that arrived is not taken for
        // a crash of the task (and the crash is charged to the right task).
        self.on_channel(key);
        let Some(mut w) = self.workers.remove(&key) else {
            return;
        };
        // Others may hold these open (the worker's children its doorbell, a
        // forked copy of the caller its channel): unregister them by hand, or
        // a ring or a hang-up would wake the loop for good.
        self.hub.channels.delete(&w.doorbell);
        self.hub.channels.delete(&w.chan);
        if let Some(pid) = w.pid {
            self.pid_to_key.remove(&pid);
        }
        w.stdout.drain();
        // The OOM killer sends SIGKILL; the kernel counts the kill in the
        // worker's memory cgroup before sending it.
        let oom_killed = match status {
            Some(ExitStatus::Signal(s))
                if s == platform::OOM_KILL_SIGNAL && w.kill_reason.is_none() =>
            {
                w.oom.as_ref().and_then(|c| self.oom.charge(c))
            }
            Some(_) => Some(false),
            None => None,
        };
        let crash = Crash {
            pid: w.pid.unwrap_or(0),
            status,
            killed_by_pool: w.kill_reason,
            stderr_tail: w.stderr.tail(),
            protocol_error: w.protocol_error.take(),
            oom_killed,
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
        if let Some(work) = work {
            // Tasks the worker had not begun go back to the front, in order,
            // behind the one it ran if that is retried.
            for task in work.queued.into_iter().rev() {
                self.pending.push_front(task);
            }
            let attempt = match w.kill_reason {
                Some(KillReason::Timeout { limit }) => Some(Attempt::TimedOut {
                    limit,
                    crash: crash.clone(),
                }),
                // Killed with its retiring template, not by its task.
                None if self.template_retiring => None,
                _ => Some(Attempt::Crashed(crash.clone())),
            };
            match attempt {
                Some(attempt) => self.fail(work.running.task, attempt, Duration::ZERO),
                None => self.pending.push_front(work.running.task),
            }
        }
        if let Some(s) = self.last_exit.get_mut(w.slot) {
            if self.template_retiring {
                *s = "stopped: its template retired (a warm-up import started threads)".into();
            } else if !by_policy {
                *s = describe_exit(&crash);
            }
        }
        if !self.shutting_down {
            if let Some(r) = self.restarts.get_mut(w.slot) {
                *r += 1;
            }
        }
        if !ran_ok && !self.shutting_down && !self.losing_template {
            let error = start_error.map(|m| m.body);
            if self
                .backoff
                .failed(self.cfg.max_start_failures, Instant::now())
            {
                self.broken = Some((error, crash));
                self.fail_pending_start();
            }
        }
    }

    /// No worker can start: fail what is queued, and all that comes later.
    fn mark_broken(&mut self, error: Option<Vec<u8>>, why: &str) {
        if self.broken.is_none() {
            let crash = Crash {
                pid: 0,
                status: None,
                killed_by_pool: None,
                stderr_tail: String::new(),
                protocol_error: Some(why.to_string()),
                oom_killed: None,
            };
            self.broken = Some((error, crash));
        }
        self.fail_pending_start();
    }

    pub(super) fn fail_pending_start(&mut self) {
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
        (None, Some(ExitStatus::Signal(s))) if c.oom_killed == Some(true) => {
            format!("killed by the kernel's OOM killer (signal {s})")
        }
        (None, Some(ExitStatus::Signal(s))) => format!("killed by signal {s}"),
        (None, None) => "lost".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_counted_kill_explains_one_death() {
        let mut charged = 3;
        assert!(!charge_kill(&mut charged, 3), "no kill counted since");
        assert!(charge_kill(&mut charged, 5));
        assert!(charge_kill(&mut charged, 5), "two kills, two deaths");
        assert!(
            !charge_kill(&mut charged, 5),
            "a third death is not the OOM killer's"
        );
        assert_eq!(charged, 5);
    }

    #[test]
    fn the_ledger_over_this_process_cgroup_counter() {
        // The real counter of our own cgroup: no OOM kill happens during
        // this test, so a death now is not charged to the OOM killer.
        let Some(counter) = OomCounter::of(platform::current_pid()) else {
            return; // the kernel keeps no count here (tested in platform)
        };
        let mut ledger = OomLedger::default();
        ledger.watch(&counter);
        assert_eq!(ledger.charge(&counter), Some(false));
    }

    #[test]
    fn start_failures_back_off_doubling_then_give_up() {
        let now = Instant::now();
        let mut b = Backoff::default();
        assert!(b.may_fork(now));
        let mut waits = Vec::new();
        for _ in 0..7 {
            assert!(!b.failed(10, now));
            let at = b.respawn_at().expect("a wait");
            waits.push(at - now);
            assert!(!b.may_fork(at - Duration::from_millis(1)));
            assert!(b.may_fork(at));
            assert_eq!(b.respawn_at(), None);
        }
        let ms: Vec<u128> = waits.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [40, 80, 160, 320, 640, 1280, 1280]);
        assert!(b.failed(8, now), "the eighth failure in a row gives up");
        b.reset();
        assert!(!b.failed(2, now), "a success starts the count afresh");
        assert!(b.failed(2, now));
    }
}
