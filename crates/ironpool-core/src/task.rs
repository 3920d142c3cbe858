//! What a task is to the engine, and the single outcome each task ends with.

use std::time::Duration;

use crate::ipc::Message;

/// Identifies a task; chosen by the caller, unique within a pool.
pub type TaskId = u64;
/// Identifies a registered object (a function, or an argument sent once):
/// its payload goes to each worker once and stays until forgotten.
pub type ObjectId = u64;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

/// A unit of work as the engine sees it: opaque bytes (and segments) for the
/// worker, plus the limits that apply to it.
#[derive(Debug)]
pub struct Task {
    pub id: TaskId,
    pub function_id: ObjectId,
    /// Encoded payload (see [`crate::ipc::payload`]); forwarded untouched.
    pub payload: Message,
    /// Per-task limit; `None` falls back to the pool's.
    pub timeout: Option<Duration>,
    /// Registered objects (shared arguments) the task refers to besides its
    /// function; each is sent to a worker once, before its first such task.
    pub needs: Vec<ObjectId>,
    /// Items in the task (a `map` chunk carries several; chunk sizing uses it).
    pub items: u32,
    /// Re-runs left, one budget for crashes, timeouts and retryable raises.
    pub retries_left: u32,
    /// Earlier attempts that ended badly, oldest first.
    pub attempts: Vec<Attempt>,
}

/// Why the engine killed a worker, if it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillReason {
    Timeout { limit: Duration },
    Memory { rss: u64, limit: u64 },
    Protocol,
    Shutdown,
}

/// A worker died while running a task.
#[derive(Debug, Clone)]
pub struct Crash {
    pub pid: i32,
    pub status: Option<ExitStatus>,
    pub killed_by_pool: Option<KillReason>,
    /// The last lines the worker wrote to stderr (faulthandler dumps land here).
    pub stderr_tail: String,
    /// Set when the worker sent something that is not a valid frame.
    pub protocol_error: Option<String>,
    /// Whether the kernel's OOM killer ended it, as its memory cgroup's
    /// count of OOM kills tells; None where the kernel keeps no count (or
    /// the worker's end is unknown).
    pub oom_killed: Option<bool>,
}

/// An attempt that ended badly: retried while the task's budget lasts, and
/// otherwise its final [`Outcome`] (see `From<Attempt> for Outcome`).
#[derive(Debug)]
pub enum Attempt {
    /// The worker died or broke the protocol.
    Crashed(Crash),
    /// The worker was killed for running past `limit`.
    TimedOut { limit: Duration, crash: Crash },
    /// The function raised an exception the pool retries (`retry_on`);
    /// payload is the pickled exception, kept so the caller can describe it.
    Raised(Message),
}

/// The one outcome every task ends with.
#[derive(Debug)]
pub enum Outcome {
    /// The function returned; payload is the pickled value.
    Returned(Message),
    /// The function raised; payload is the pickled exception.
    Raised(Message),
    /// The worker died or broke the protocol.
    Crashed(Crash),
    /// The worker was killed for running past `limit`.
    TimedOut { limit: Duration, crash: Crash },
    /// No worker could start (the initializer failed, or workers died during
    /// set-up too often). `error` is the pickled exception payload, if any.
    StartFailed {
        error: Option<Vec<u8>>,
        crash: Crash,
    },
}

impl From<Attempt> for Outcome {
    fn from(a: Attempt) -> Self {
        match a {
            Attempt::Crashed(crash) => Outcome::Crashed(crash),
            Attempt::TimedOut { limit, crash } => Outcome::TimedOut { limit, crash },
            Attempt::Raised(m) => Outcome::Raised(m),
        }
    }
}

impl Task {
    /// A task of one item with no limits of its own.
    pub fn new(id: TaskId, function_id: ObjectId, payload: Message) -> Self {
        Self {
            id,
            function_id,
            payload,
            timeout: None,
            needs: Vec::new(),
            items: 1,
            retries_left: 0,
            attempts: Vec::new(),
        }
    }
}

/// A finished task, ready to hand back to the caller.
#[derive(Debug)]
pub struct Completion {
    pub task_id: TaskId,
    pub outcome: Outcome,
    /// Time the worker spent on the task.
    pub elapsed: Duration,
    /// Earlier failed attempts (when retries were allowed), oldest first.
    pub attempts: Vec<Attempt>,
}
