//! The pool supervisor: one Rust thread per pool that owns the workers.
//!
//! Callers talk to it through [`Pool`]: commands go into an inbox and an
//! eventfd wakes the thread; finished tasks come back through a completion
//! queue that a caller drains in batches. The thread itself never touches
//! Python, so the GIL can never delay crash detection, timeouts or kills.

mod event_loop;
mod output;
mod scheduler;
mod worker;

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::ipc::Message;
use crate::platform::Waker;
use crate::task::{Completion, FnId, Task, TaskId};
use crate::zygote::Zygote;

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

enum Command {
    Submit(Task),
    RegisterFn(FnId, Message),
    Cancel(TaskId),
    CancelPending(mpsc::Sender<Vec<TaskId>>),
    Shutdown,
    Terminate,
}

#[derive(Default)]
struct Done {
    queue: VecDeque<Completion>,
    finished: bool,
}

struct Shared {
    inbox: Mutex<Vec<Command>>,
    waker: Waker,
    done: Mutex<Done>,
    done_cv: Condvar,
    stats: Mutex<Vec<WorkerStats>>,
    sizer: Mutex<ChunkSizer>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Handle on a running pool. Dropping it shuts the pool down.
pub struct Pool {
    shared: Arc<Shared>,
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
        let shared = Arc::new(Shared {
            inbox: Mutex::new(Vec::new()),
            waker: Waker::new()?,
            done: Mutex::new(Done::default()),
            done_cv: Condvar::new(),
            stats: Mutex::new(Vec::new()),
            sizer: Mutex::new(ChunkSizer::default()),
        });
        let sup = event_loop::Supervisor::new(config, init, session, shared.clone())?;
        let thread = std::thread::Builder::new()
            .name("ironpool-supervisor".into())
            .spawn(move || sup.run())?;
        Ok(Pool {
            shared,
            thread: Mutex::new(Some(thread)),
            owner: crate::platform::current_pid(),
        })
    }

    fn send(&self, cmd: Command) {
        lock(&self.shared.inbox).push(cmd);
        self.shared.waker.wake();
    }

    /// Queues a task. Its completion arrives through [`Pool::wait_completions`].
    pub fn submit(&self, task: Task) {
        self.send(Command::Submit(task));
    }

    /// Queues many tasks with one wake-up.
    pub fn submit_many(&self, tasks: impl IntoIterator<Item = Task>) {
        lock(&self.shared.inbox).extend(tasks.into_iter().map(Command::Submit));
        self.shared.waker.wake();
    }

    /// Makes a function known; tasks refer to it by `id`.
    pub fn register_fn(&self, id: FnId, body: Message) {
        self.send(Command::RegisterFn(id, body));
    }

    /// Drops a task that has not been sent to a worker yet. A task already
    /// running still finishes; its completion is still delivered.
    pub fn cancel(&self, id: TaskId) {
        self.send(Command::Cancel(id));
    }

    /// Drops every task not yet sent to a worker and returns their ids.
    pub fn cancel_pending(&self) -> Vec<TaskId> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::CancelPending(tx));
        rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default()
    }

    /// Finishes queued work, then stops the workers. Returns at once.
    pub fn shutdown(&self) {
        self.send(Command::Shutdown);
    }

    /// Drops queued work and kills every worker now. Tasks that were running
    /// complete as crashed (killed by the pool).
    pub fn terminate(&self) {
        self.send(Command::Terminate);
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

    /// Takes all available completions, waiting up to `timeout` for the
    /// first. `None` means the pool has finished and nothing more will come.
    pub fn wait_completions(&self, timeout: Option<Duration>) -> Option<Vec<Completion>> {
        if crate::platform::current_pid() != self.owner {
            return None;
        }
        let mut done = lock(&self.shared.done);
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        while done.queue.is_empty() && !done.finished {
            match deadline {
                None => {
                    done = self
                        .shared
                        .done_cv
                        .wait(done)
                        .unwrap_or_else(|p| p.into_inner())
                }
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        return Some(Vec::new());
                    }
                    done = self
                        .shared
                        .done_cv
                        .wait_timeout(done, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        if done.queue.is_empty() {
            return None;
        }
        Some(done.queue.drain(..).collect())
    }

    pub fn stats(&self) -> Vec<WorkerStats> {
        let mut stats = lock(&self.shared.stats).clone();
        for s in &mut stats {
            s.rss = crate::platform::resident_bytes(s.pid).unwrap_or(0);
        }
        stats
    }

    /// How many items of `fn_id` to put in the next `map` chunk.
    pub fn chunk_size(&self, fn_id: FnId, remaining_hint: Option<usize>) -> usize {
        lock(&self.shared.sizer).next(fn_id, remaining_hint)
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
