//! The worker's loop: receive with the interpreter detached, run the task
//! (or each task of a batch) through the Python handler, send each result.

use std::time::{Duration, Instant};

use ironpool_core::ipc::channel::RecvError;
use ironpool_core::ipc::{Channel, Kind, Message, RETRYABLE, Recv};
use ironpool_core::platform::Doorbell;
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::buffers;
use crate::errors::Error;
use crate::zygote::WorkerChannel;

/// How long a worker that has answered polls for its next task before it
/// sleeps: a caller waiting on one result at a time sends the next within
/// microseconds, and waking a sleeping process costs more than that (on a
/// virtual machine, an idle CPU is woken through the hypervisor).
const IDLE_SPIN: Duration = Duration::from_micros(50);

/// Serves tasks until the pool says Shutdown or goes away. `handler` has
/// `init(parts)`, `register(function_id, payload)`, `run(task_id, function_id, flags,
/// parts) -> (status, parts)` (0 returned, 1 raised, 2 raised one of the
/// pool's `retry_on` types) and a `threshold` attribute (segment size).
#[pyfunction]
pub fn worker_main(
    py: Python<'_>,
    channel: &WorkerChannel,
    handler: Bound<'_, PyAny>,
) -> PyResult<()> {
    let mut chan = channel
        .chan
        .lock()
        .map_err(|_| Error::Engine("worker channel poisoned".into()))?
        .take()
        .ok_or_else(|| Error::Engine("worker channel already in use".into()))?;
    let mut bell = Announcer {
        doorbell: channel
            .doorbell
            .lock()
            .map_err(|_| Error::Engine("worker channel poisoned".into()))?
            .take(),
        muted: false,
        unannounced: false,
    };
    let mut threshold: usize = handler.getattr("threshold")?.extract()?;
    // Non-blocking, so that it can poll for the next task before sleeping.
    chan.set_nonblocking(true)
        .map_err(|e| Error::io("could not set up the pool's channel", e))?;
    loop {
        let got = py.detach(|| {
            if bell.owes_ring() {
                match chan.recv() {
                    Ok(Recv::WouldBlock) => bell.out_of_tasks(),
                    other => return other,
                }
            }
            // After a quiet batch (a map's), the next top-up follows the
            // pool reading the batch's results: on a machine whose CPUs
            // the map keeps busy, spinning for it only takes a CPU from
            // the caller and the supervisor (10% of map(chunksize=1)).
            chan.recv_spinning(if bell.muted {
                Duration::ZERO
            } else {
                IDLE_SPIN
            })
        });
        let msg = match got {
            Ok(Recv::Message(m)) => m,
            Ok(Recv::Closed) | Ok(Recv::WouldBlock) => return Ok(()),
            Err(RecvError::Io(e)) => {
                return Err(Error::io("could not read from the pool", e).into());
            }
            Err(RecvError::Frame(e)) => {
                return Err(Error::Protocol(format!("bad frame from the pool: {e}")).into());
            }
        };
        let reply: Option<Message> = match msg.kind {
            Kind::Init => {
                let parts = buffers::decode(py, &msg, false)?;
                let failed = handler.call_method1("init", (parts,))?;
                threshold = handler.getattr("threshold")?.extract()?;
                if failed.is_none() {
                    Some(Message::new(Kind::Ready, 0, 0))
                } else {
                    let parts = failed.cast_into::<PyList>()?;
                    let m = buffers::encode(py, Kind::InitFailed, 0, 0, &parts, usize::MAX)?;
                    bell.send(py, &chan, &m)?;
                    return Ok(());
                }
            }
            Kind::Register => {
                let id = msg.id;
                let payload = Bound::new(py, buffers::RegisteredPayload::new(msg))?;
                handler.call_method1("register", (id, payload))?;
                None
            }
            Kind::Task => Some(run_task(py, &handler, &msg, threshold)?),
            Kind::Batch => {
                let tasks = msg
                    .unbatch()
                    .map_err(|e| Error::Protocol(format!("bad batch from the pool: {e}")))?;
                // Each result goes out as soon as it exists, so a crash
                // loses no finished one. A quiet batch (`ring_every` > 0)
                // finds the channel muted: ring after every `ring_every`
                // results and after the last (see `supervisor::quiet`).
                let ring_every = msg.id;
                bell.muted |= ring_every > 0;
                for (done, task) in (1..).zip(&tasks) {
                    let m = run_task(py, &handler, task, threshold)?;
                    bell.send(py, &chan, &m)?;
                    if ring_every > 0 && (done % ring_every == 0 || done == tasks.len() as u64) {
                        bell.ring();
                    }
                }
                None
            }
            Kind::Forget => {
                handler.call_method1("forget", (msg.id,))?;
                None
            }
            Kind::Shutdown => return Ok(()),
            other => {
                return Err(Error::Protocol(format!("unexpected {other:?} from the pool")).into());
            }
        };
        if let Some(m) = reply {
            bell.send(py, &chan, &m)?;
        }
    }
}

/// The worker's side of a muted channel: its doorbell, and whether what it
/// sent since the last ring may be sitting unread.
struct Announcer {
    doorbell: Option<Doorbell>,
    /// A quiet batch came since the worker last ran out of tasks: the pool
    /// may have its channel muted still.
    muted: bool,
    unannounced: bool,
}

impl Announcer {
    /// Sends `m`. A full socket may be one the pool muted and does not read
    /// yet: ring before waiting for room.
    fn send(&mut self, py: Python<'_>, chan: &Channel, m: &Message) -> PyResult<()> {
        py.detach(|| {
            if !chan.send(m)? {
                if self.muted {
                    self.ring();
                }
                chan.send_blocking(m)?;
            }
            self.unannounced = true;
            Ok::<_, std::io::Error>(())
        })
        .map_err(|e| Error::io("could not reach the pool", e).into())
    }

    fn ring(&mut self) {
        if let Some(bell) = &self.doorbell {
            bell.ring();
        }
        self.unannounced = false;
    }

    /// What went out since the last ring may sit unread in a muted channel.
    fn owes_ring(&self) -> bool {
        self.muted && self.unannounced
    }

    /// Nothing left to run: what went out since the last ring must not
    /// wait for the pool's quiet poll.
    fn out_of_tasks(&mut self) {
        self.ring();
        self.muted = false;
    }
}

/// Runs one task through the handler and frames its outcome.
fn run_task(
    py: Python<'_>,
    handler: &Bound<'_, PyAny>,
    msg: &Message,
    threshold: usize,
) -> PyResult<Message> {
    let start = Instant::now();
    let parts = buffers::decode(py, msg, false)?;
    let (status, out): (u8, Bound<'_, PyList>) = handler
        .call_method1(
            pyo3::intern!(py, "run"),
            (msg.id, msg.aux, msg.flags, parts),
        )?
        .extract()?;
    let elapsed = start.elapsed().as_nanos() as u64;
    let kind = if status == 0 {
        Kind::Returned
    } else {
        Kind::Raised
    };
    let mut m = buffers::encode(py, kind, msg.id, elapsed, &out, threshold)?;
    // Whether to run it again is the engine's call (its budget).
    if status == 2 {
        m.flags = RETRYABLE;
    }
    Ok(m)
}
