//! One worker slot as the supervisor sees it.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::output::Capture;
use crate::ipc::{Channel, Message};
use crate::platform::{self, Pidfd};
use crate::task::{FnId, KillReason, Task};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Forked (or being forked), running its set-up.
    Starting,
    /// Takes tasks.
    Ready,
    /// Finishes what it has, then is told to exit (recycling, shutdown).
    Retiring,
    /// Its channel is closed; waiting for the zygote to report its exit.
    Dead,
}

/// Something queued for the worker's socket.
pub enum Outgoing {
    Owned(Message),
    /// The payload of the in-flight task with this id (sent without a copy).
    Task(u64),
}

pub struct InFlight {
    pub task: Task,
    /// When the worker began it (it runs tasks in the order sent).
    pub started: Option<Instant>,
}

pub struct Worker {
    pub key: u64,
    pub slot: usize,
    pub pid: Option<i32>,
    pub pidfd: Option<Pidfd>,
    pub chan: Channel,
    pub outbox: VecDeque<Outgoing>,
    pub wants_write: bool,
    pub stdout: Capture,
    pub stderr: Capture,
    pub state: State,
    pub in_flight: VecDeque<InFlight>,
    pub fns: HashSet<FnId>,
    pub tasks_done: u64,
    pub busy_ns: u64,
    pub kill_reason: Option<KillReason>,
    pub protocol_error: Option<String>,
    pub init_error: Option<Message>,
    pub closed_at: Option<Instant>,
}

impl Worker {
    pub fn running(&self) -> Option<&InFlight> {
        self.in_flight.front().filter(|f| f.started.is_some())
    }

    /// The deadline of the running task, if it has a time limit.
    pub fn deadline(&self, default: Option<Duration>) -> Option<(Instant, Duration)> {
        let f = self.running()?;
        let limit = f.task.timeout.or(default)?;
        Some((f.started? + limit, limit))
    }

    /// SIGKILLs the worker and its process group, for when its template is
    /// gone and cannot. Best effort: the worker may have been reaped by
    /// PID 1 already, and its group id is safe to signal only while some
    /// member (one of its descendants) still holds it.
    pub fn kill_tree(&self) {
        if let Some(p) = &self.pidfd {
            let _ = p.kill();
            let _ = platform::kill_process_group(p.pid());
        }
    }

    pub fn kill(&mut self, reason: KillReason) {
        if self.kill_reason.is_none() {
            self.kill_reason = Some(reason);
        }
        if let Some(p) = &self.pidfd {
            let _ = p.kill();
        }
    }
}
