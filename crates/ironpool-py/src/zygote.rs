//! The template process, from both sides: starting it (in the caller) and
//! serving fork requests (inside it).

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ironpool_core::ipc::{Channel, Kind};
use ironpool_core::platform::Doorbell;
use ironpool_core::zygote::{self, Served};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use crate::buffers;
use crate::errors::Error;

/// A running template process that pools fork their workers from.
#[pyclass(frozen, module = "ironpool._core")]
pub struct Zygote {
    pub(crate) inner: Arc<zygote::Zygote>,
}

#[pymethods]
impl Zygote {
    /// Starts `argv` as a zygote with `env` added to this process's
    /// environment, and waits until it has done its imports.
    #[staticmethod]
    fn spawn(py: Python<'_>, argv: Vec<String>, env: Vec<(String, String)>) -> PyResult<Self> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| Error::Value("argv is empty".into()))?;
        let mut cmd = Command::new(program);
        cmd.args(args).envs(env).stdin(std::process::Stdio::null());
        let inner = py
            .detach(|| zygote::Zygote::spawn(cmd))
            .map_err(Error::Start)?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    #[getter]
    fn pid(&self) -> i32 {
        self.inner.pid()
    }

    fn alive(&self) -> bool {
        self.inner.is_alive()
    }

    /// Starts the template again (same command) if it died.
    fn ensure_running(&self, py: Python<'_>) -> PyResult<()> {
        Ok(py
            .detach(|| self.inner.ensure_running())
            .map_err(Error::Start)?)
    }

    fn kill(&self) {
        self.inner.kill();
    }

    /// Asks the template to import what `request` names between forks
    /// (`ironpool._zygote` writes the request and reads the report;
    /// `ironpool._template` answers it).
    fn warm(&self, py: Python<'_>, request: Vec<u8>) -> PyResult<WarmRequest> {
        let inner = py
            .detach(|| self.inner.warm(request))
            .map_err(|e| Error::io("template process", e))?;
        Ok(WarmRequest { inner })
    }
}

/// A worker's end of its channel to the pool supervisor.
#[pyclass(frozen, module = "ironpool._core")]
pub struct WorkerChannel {
    pub(crate) chan: Mutex<Option<Channel>>,
    pub(crate) doorbell: Mutex<Option<Doorbell>>,
}

#[pymethods]
impl WorkerChannel {
    /// A sender of logging records over the same socket, usable from any
    /// thread while the worker loop owns the channel.
    fn log_sender(&self) -> PyResult<LogSender> {
        let guard = self
            .chan
            .lock()
            .map_err(|_| Error::Engine("worker channel poisoned".into()))?;
        let chan = guard
            .as_ref()
            .ok_or_else(|| Error::Engine("worker channel already in use".into()))?;
        let chan = chan
            .try_clone()
            .map_err(|e| Error::io("could not share the worker channel", e))?;
        Ok(LogSender { chan })
    }
}

/// Sends a worker's logging records to its pool (`Kind::Log` frames).
#[pyclass(frozen, module = "ironpool._core")]
pub struct LogSender {
    chan: Channel,
}

#[pymethods]
impl LogSender {
    /// Sends one record's payload `parts` (large parts in a segment, from
    /// `threshold` bytes); returns once the pool's socket holds it, so a
    /// worker that dies right after still delivers it.
    fn send(&self, py: Python<'_>, parts: &Bound<'_, PyList>, threshold: usize) -> PyResult<()> {
        let msg = buffers::encode(py, Kind::Log, 0, 0, parts, threshold)?;
        Ok(py
            .detach(|| self.chan.send_blocking(&msg))
            .map_err(|e| Error::io("could not send a logging record to the pool", e))?)
    }
}

/// The template's side of the loop: forks through `os.fork` (so the
/// interpreter's fork hooks run) and imports through `_template.warm_up`.
struct PyHost<'py> {
    fork: Bound<'py, PyAny>,
    warm_up: Bound<'py, PyAny>,
    probe_pid: Bound<'py, PyAny>,
}

impl zygote::Host for PyHost<'_> {
    fn fork(&mut self) -> std::io::Result<i32> {
        self.fork
            .call0()
            .and_then(|pid| pid.extract::<i32>())
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    fn helper_pid(&mut self) -> Option<i32> {
        self.probe_pid
            .call0()
            .and_then(|pid| pid.extract::<Option<i32>>())
            .ok()
            .flatten()
    }

    fn warm(&mut self, request: &[u8], first: bool) -> Option<zygote::Warmed> {
        let py = self.warm_up.py();
        let answer = self
            .warm_up
            .call1((PyBytes::new(py, request), first))
            .and_then(|r| r.extract::<Option<(Vec<u8>, bool)>>());
        match answer {
            Ok(done) => done.map(|(report, threaded)| zygote::Warmed { report, threaded }),
            // `warm_up` catches what imports raise; this is a bug of ours.
            Err(e) => Some(zygote::Warmed {
                report: format!("error\t\twarm_up failed: {e}\n").into_bytes(),
                threaded: false,
            }),
        }
    }
}

/// Runs inside the zygote: serves fork requests until the caller goes away
/// (returns None: exit) or returns in a freshly forked worker with its
/// channel.
#[pyfunction]
pub fn zygote_serve(py: Python<'_>, fd: i32) -> PyResult<Option<WorkerChannel>> {
    // SAFETY: `fd` is the master channel the caller passed us at exec; it is
    // owned by nobody else in this process.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut host = PyHost {
        fork: py.import("os")?.getattr("fork")?,
        warm_up: py.import("ironpool._template")?.getattr("warm_up")?,
        probe_pid: py.import("ironpool._template")?.getattr("probe_pid")?,
    };
    match zygote::serve(master, &mut host).map_err(|e| Error::io("template process", e))? {
        Served::Exit => Ok(None),
        Served::Child(child) => Ok(Some(WorkerChannel {
            chan: Mutex::new(Some(child.channel)),
            doorbell: Mutex::new(child.doorbell),
        })),
    }
}

/// A warm request sent to a template (`Zygote.warm`).
#[pyclass(frozen, module = "ironpool._core")]
pub struct WarmRequest {
    inner: zygote::WarmRequest,
}

#[pymethods]
impl WarmRequest {
    /// The template's report once it is done (None if not within `timeout`
    /// seconds; None waits as long as it takes). Raises OSError if the
    /// template went away first.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Vec<u8>>> {
        let timeout = timeout
            .map(|t| Duration::try_from_secs_f64(t.max(0.0)))
            .transpose()
            .map_err(|_| {
                Error::Value(format!(
                    "timeout must be a number of seconds, got {timeout:?}"
                ))
            })?;
        Ok(py
            .detach(|| self.inner.wait(timeout))
            .map_err(|e| Error::io("template process", e))?)
    }
}

/// Lets a process forked by the template die with it (a warm-up probe).
/// False if the template is already gone.
#[pyfunction]
pub fn die_with_parent(parent: i32) -> bool {
    ironpool_core::platform::die_with_parent(parent)
}

/// Runs inside the zygote when its imports failed: tells the caller why.
#[pyfunction]
pub fn zygote_fail(fd: i32, text: &str) -> PyResult<()> {
    // SAFETY: as in `zygote_serve`.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(zygote::report_failure(master, text).map_err(|e| Error::io("template process", e))?)
}
