//! One worker as the supervisor sees it: its descriptors, what is queued
//! for its socket, and the one [`State`] it is in, which holds the tasks it
//! has been sent.

use std::collections::VecDeque;

use crate::id_hash::IdSet;
use std::time::{Duration, Instant};

use super::output::Capture;
use crate::ipc::frame::{BATCH_ENTRY_HEADER, HEADER_LEN, MAX_FRAME};
use crate::ipc::{Channel, Kind, Message};
use crate::platform::{self, Doorbell, OomCounter, Pidfd};
use crate::reactor::WorkerKey;
use crate::task::{KillReason, ObjectId, Task, TaskId};

/// The task a worker is running (it runs tasks in the order sent).
pub struct Running {
    pub task: Task,
    /// When the worker was handed it, or finished the task before it.
    pub started: Instant,
}

/// What a worker holds: the task it runs and those queued behind it.
pub struct Work {
    pub running: Running,
    pub queued: VecDeque<Task>,
}

impl From<Running> for Work {
    fn from(running: Running) -> Self {
        Work {
            running,
            queued: VecDeque::new(),
        }
    }
}

pub enum State {
    /// Forked (or being forked), running its set-up.
    Starting,
    /// Set up, with no task.
    Idle,
    /// Running a task, maybe with more queued behind it (prefetch).
    Busy(Work),
    /// Runs its last task, then is told to exit (recycling).
    Retiring { running: Running },
    /// Told to exit; waiting for the zygote to report that it did.
    Exiting { since: Instant },
    /// Set-up failed: the worker said why (`error`, it exits by itself) or
    /// its channel closed. Still counts as starting, so its replacement
    /// waits for the start-failure back-off whichever news comes first.
    StartFailed {
        since: Instant,
        error: Option<Message>,
    },
    /// Its channel closed after set-up; the exit report settles `work`.
    ChannelClosed { since: Instant, work: Option<Work> },
}

impl State {
    /// Set up and open: may be sent tasks.
    pub fn takes_tasks(&self) -> bool {
        matches!(self, State::Idle | State::Busy(_))
    }

    /// Its set-up has not succeeded (yet).
    pub fn is_starting(&self) -> bool {
        matches!(self, State::Starting | State::StartFailed { .. })
    }

    /// Since when nothing more is read from it and it should be exiting.
    pub fn closing_since(&self) -> Option<Instant> {
        match self {
            State::Exiting { since }
            | State::StartFailed { since, .. }
            | State::ChannelClosed { since, .. } => Some(*since),
            _ => None,
        }
    }

    pub fn running(&self) -> Option<&Running> {
        match self {
            State::Busy(w) | State::ChannelClosed { work: Some(w), .. } => Some(&w.running),
            State::Retiring { running } => Some(running),
            _ => None,
        }
    }

    /// Every task it has been sent and not finished, in order.
    pub fn tasks(&self) -> impl Iterator<Item = &Task> {
        let (running, queued) = match self {
            State::Busy(w) | State::ChannelClosed { work: Some(w), .. } => {
                (Some(&w.running.task), Some(&w.queued))
            }
            State::Retiring { running } => (Some(&running.task), None),
            _ => (None, None),
        };
        running.into_iter().chain(queued.into_iter().flatten())
    }

    pub fn in_flight(&self) -> usize {
        match self {
            State::Busy(w) | State::ChannelClosed { work: Some(w), .. } => 1 + w.queued.len(),
            State::Retiring { .. } => 1,
            _ => 0,
        }
    }

    /// Hands it a task (it starts now if it was idle). True if it started;
    /// the task back if this worker takes none.
    // The refusal is a cold path (the scheduler only picks workers that take
    // tasks): boxing the task for it would cost every send an allocation.
    #[allow(clippy::result_large_err)]
    pub fn push(&mut self, task: Task, now: Instant) -> Result<bool, Task> {
        match self {
            State::Idle => {
                let running = Running { task, started: now };
                *self = State::Busy(Work {
                    running,
                    queued: VecDeque::new(),
                });
                Ok(true)
            }
            State::Busy(w) => {
                w.queued.push_back(task);
                Ok(false)
            }
            _ => Err(task),
        }
    }

    /// The channel closed (or failed): nothing more is read or written.
    fn close(&mut self, now: Instant) {
        let since = now;
        *self = match std::mem::replace(self, State::Idle) {
            State::Starting => State::StartFailed { since, error: None },
            State::StartFailed { error, .. } => State::StartFailed { since, error },
            State::Idle | State::Exiting { .. } => State::ChannelClosed { since, work: None },
            State::Busy(work) => State::ChannelClosed {
                since,
                work: Some(work),
            },
            State::Retiring { running } => State::ChannelClosed {
                since,
                work: Some(running.into()),
            },
            State::ChannelClosed { work, .. } => State::ChannelClosed { since, work },
        };
    }
}

/// Something queued for the worker's socket.
pub enum Outgoing {
    Owned(Message),
    /// The payloads of in-flight tasks, in the order sent, gathered from
    /// where they are held (no copy): one task's own frame, or one
    /// [`Kind::Batch`] frame of several.
    Tasks(TaskFrame),
}

/// In-flight tasks that go out as one frame.
pub struct TaskFrame {
    pub ids: Vec<TaskId>,
    /// Frame bytes so far, to stay within [`MAX_FRAME`].
    bytes: usize,
    /// False once it holds a task with descriptors, which travels alone.
    batchable: bool,
}

impl TaskFrame {
    pub fn new(task: &Task) -> Self {
        TaskFrame {
            ids: vec![task.id],
            bytes: HEADER_LEN + BATCH_ENTRY_HEADER + task.payload.body.len(),
            batchable: task.payload.fds.is_empty(),
        }
    }

    /// Adds `task` to this frame if it fits; false if it must go in its own.
    pub fn add(&mut self, task: &Task) -> bool {
        let bytes = self.bytes + BATCH_ENTRY_HEADER + task.payload.body.len();
        if !self.batchable || !task.payload.fds.is_empty() || bytes > MAX_FRAME {
            return false;
        }
        self.ids.push(task.id);
        self.bytes = bytes;
        true
    }
}

pub struct Worker {
    pub key: WorkerKey,
    pub slot: usize,
    pub pid: Option<i32>,
    pub pidfd: Option<Pidfd>,
    pub chan: Channel,
    /// Rung by the worker while its channel is muted (see `quiet`).
    pub doorbell: Doorbell,
    /// Set while its channel is muted (its data wakes nobody; it is read
    /// when the doorbell rings): when it is read at the latest.
    pub quiet_until: Option<Instant>,
    pub outbox: VecDeque<Outgoing>,
    pub wants_write: bool,
    pub stdout: Capture,
    pub stderr: Capture,
    pub state: State,
    /// Registered objects it has been sent.
    pub objects: IdSet<ObjectId>,
    pub tasks_done: u64,
    pub busy_ns: u64,
    pub kill_reason: Option<KillReason>,
    pub protocol_error: Option<String>,
    /// Its memory cgroup's OOM kill counter, read when its pid is known.
    pub oom: Option<OomCounter>,
}

impl Worker {
    pub fn muted(&self) -> bool {
        self.quiet_until.is_some()
    }

    /// The deadline of the running task, if it has a time limit.
    pub fn deadline(&self, default: Option<Duration>) -> Option<(Instant, Duration)> {
        let r = self.state.running()?;
        let limit = r.task.timeout.or(default)?;
        Some((r.started + limit, limit))
    }

    /// Takes the task it finished, if `id` is the one it runs. The next one
    /// queued starts now; a retiring worker is told to exit.
    pub fn finish(&mut self, id: u64, now: Instant) -> Option<Running> {
        if self.state.running().is_none_or(|r| r.task.id != id) {
            return None;
        }
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Busy(mut work) => {
                if let Some(task) = work.queued.pop_front() {
                    let done = std::mem::replace(&mut work.running, Running { task, started: now });
                    self.state = State::Busy(work);
                    Some(done)
                } else {
                    Some(work.running)
                }
            }
            State::Retiring { running } => {
                self.exit_now(now);
                Some(running)
            }
            other => {
                self.state = other;
                None
            }
        }
    }

    /// Tells the worker to exit once it has finished what it runs. Returns
    /// the tasks queued behind that one, untouched, for the pending queue.
    pub fn retire(&mut self, now: Instant) -> VecDeque<Task> {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Starting | State::Idle => {
                self.exit_now(now);
                VecDeque::new()
            }
            State::Busy(work) => {
                // What is queued behind the last task goes back to the pool
                // unsent; the last task itself may still be waiting to go.
                let last = work.running.task.id;
                self.outbox.retain_mut(|o| match o {
                    Outgoing::Owned(_) => true,
                    Outgoing::Tasks(frame) => {
                        frame.ids.retain(|id| *id == last);
                        !frame.ids.is_empty()
                    }
                });
                self.state = State::Retiring {
                    running: work.running,
                };
                work.queued
            }
            other => {
                self.state = other;
                VecDeque::new()
            }
        }
    }

    fn exit_now(&mut self, now: Instant) {
        self.outbox
            .push_back(Outgoing::Owned(Message::new(Kind::Shutdown, 0, 0)));
        self.state = State::Exiting { since: now };
    }

    /// Its channel closed or failed: drops what was waiting to be written.
    pub fn close(&mut self, now: Instant) {
        self.state.close(now);
        self.outbox.clear();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: u64) -> Task {
        Task::new(id, 0, Message::new(Kind::Task, id, 0))
    }

    #[test]
    fn an_idle_worker_starts_its_first_task_and_queues_the_rest() {
        let now = Instant::now();
        let mut s = State::Idle;
        assert!(matches!(s.push(task(1), now), Ok(true)));
        assert!(matches!(s.push(task(2), now), Ok(false)));
        assert_eq!(s.running().map(|r| r.task.id), Some(1));
        assert_eq!(s.tasks().map(|t| t.id).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(s.in_flight(), 2);
        for mut other in [State::Starting, State::Exiting { since: now }] {
            assert!(other.push(task(3), now).is_err(), "takes no tasks");
        }
    }

    #[test]
    fn a_closed_channel_keeps_the_tasks_and_whether_set_up_failed() {
        let now = Instant::now();
        let mut s = State::Starting;
        s.close(now);
        assert!(s.is_starting(), "counts as a start failure");
        assert_eq!(s.closing_since(), Some(now));

        let mut s = State::Idle;
        assert!(s.push(task(1), now).is_ok());
        assert!(s.push(task(2), now).is_ok());
        s.close(now);
        assert!(!s.takes_tasks() && !s.is_starting());
        assert_eq!(s.tasks().map(|t| t.id).collect::<Vec<_>>(), [1, 2]);
        assert!(s.running().is_some(), "its time limit still applies");

        let mut s = State::Exiting { since: now };
        s.close(now);
        assert!(matches!(s, State::ChannelClosed { work: None, .. }));
    }
}
