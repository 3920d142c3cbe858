//! How a task ended, as Python sees it: frozen classes built from the core's
//! `Completion`, `Outcome` and `Attempt`, one class per way a task ends.
//! They convert and describe; what an outcome means is `ironpool`'s to say.

use std::time::Duration;

use ironpool_core::ipc::{Kind, Message};
use ironpool_core::task::{self, Attempt, Crash, ExitStatus, KillReason};
use pyo3::IntoPyObjectExt;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString};

use crate::buffers;

/// Why a worker was lost, for `Crashed`, `TimedOut` and `StartFailed`.
#[pyclass(frozen, get_all, module = "ironpool._core")]
pub struct CrashReport {
    pid: i32,
    exitcode: Option<i32>,
    signal: Option<i32>,
    stderr_tail: String,
    protocol_error: Option<String>,
    /// "timeout", "memory", "protocol" or "shutdown": the pool killed it.
    killed_by: Option<&'static str>,
    /// Seconds, when killed for a timeout.
    limit: Option<f64>,
    /// Bytes seen and the ceiling, when killed for memory.
    rss: Option<u64>,
    memory_limit: Option<u64>,
    /// True when the kernel's OOM killer ended it (its memory cgroup counted
    /// the kill), False when the kernel counted none; None where it keeps
    /// no count.
    oom_killed: Option<bool>,
}

impl CrashReport {
    fn new(c: &Crash) -> Self {
        let (exitcode, signal) = match c.status {
            Some(ExitStatus::Code(code)) => (Some(code), None),
            Some(ExitStatus::Signal(s)) => (None, Some(s)),
            None => (None, None),
        };
        let (mut limit, mut rss, mut memory_limit) = (None, None, None);
        let killed_by = c.killed_by_pool.map(|k| match k {
            KillReason::Timeout { limit: l } => {
                limit = Some(l.as_secs_f64());
                "timeout"
            }
            KillReason::Memory { rss: r, limit: l } => {
                (rss, memory_limit) = (Some(r), Some(l));
                "memory"
            }
            KillReason::Protocol => "protocol",
            KillReason::Shutdown => "shutdown",
        });
        Self {
            pid: c.pid,
            exitcode,
            signal,
            stderr_tail: c.stderr_tail.clone(),
            protocol_error: c.protocol_error.clone(),
            killed_by,
            limit,
            rss,
            memory_limit,
            oom_killed: c.oom_killed,
        }
    }

    /// The report of a task killed for running past `limit`.
    fn timed_out(limit: Duration, c: &Crash) -> Self {
        Self {
            killed_by: Some("timeout"),
            limit: Some(limit.as_secs_f64()),
            ..Self::new(c)
        }
    }
}

fn repr_of<'py>(py: Python<'py>, v: impl IntoPyObject<'py>) -> PyResult<String> {
    Ok(v.into_bound_py_any(py)?.repr()?.to_string())
}

/// `<N parts, M bytes>`: parts may be large buffers, never printed.
fn parts_repr(py: Python<'_>, parts: &Py<PyList>) -> PyResult<String> {
    let parts = parts.bind(py);
    let mut bytes = 0;
    for p in parts.iter() {
        bytes += p.len()?;
    }
    Ok(format!("<{} parts, {bytes} bytes>", parts.len()))
}

#[pymethods]
impl CrashReport {
    #[classattr]
    fn __match_args__() -> (&'static str, &'static str, &'static str) {
        ("pid", "exitcode", "signal")
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let mut s = format!(
            "CrashReport(pid={}, exitcode={}, signal={}, killed_by={}",
            self.pid,
            repr_of(py, self.exitcode)?,
            repr_of(py, self.signal)?,
            repr_of(py, self.killed_by)?,
        );
        if let Some(l) = self.limit {
            s += &format!(", limit={}", repr_of(py, l)?);
        }
        for (name, v) in [("rss", self.rss), ("memory_limit", self.memory_limit)] {
            if let Some(v) = v {
                s += &format!(", {name}={v}");
            }
        }
        if let Some(o) = self.oom_killed {
            s += &format!(", oom_killed={}", if o { "True" } else { "False" });
        }
        if let Some(e) = &self.protocol_error {
            s += &format!(", protocol_error={}", PyString::new(py, e).repr()?);
        }
        // The tail can run to many lines: its size is enough here.
        s += &format!(
            ", stderr_tail=<{} chars>)",
            self.stderr_tail.chars().count()
        );
        Ok(s)
    }
}

/// The function returned; `parts` is the pickled value.
#[pyclass(frozen, get_all, module = "ironpool._core")]
pub struct Returned {
    parts: Py<PyList>,
}

#[pymethods]
impl Returned {
    #[classattr]
    fn __match_args__() -> (&'static str,) {
        ("parts",)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!("Returned({})", parts_repr(py, &self.parts)?))
    }
}

/// The function raised; `parts` is the pickled exception.
#[pyclass(frozen, get_all, module = "ironpool._core")]
pub struct Raised {
    parts: Py<PyList>,
}

#[pymethods]
impl Raised {
    #[classattr]
    fn __match_args__() -> (&'static str,) {
        ("parts",)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!("Raised({})", parts_repr(py, &self.parts)?))
    }
}

/// The worker died or broke the protocol.
#[pyclass(frozen, get_all, module = "ironpool._core")]
pub struct Crashed {
    crash: Py<CrashReport>,
}

#[pymethods]
impl Crashed {
    #[classattr]
    fn __match_args__() -> (&'static str,) {
        ("crash",)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!("Crashed({})", self.crash.get().__repr__(py)?))
    }
}

/// The worker was killed for running past `limit` seconds.
#[pyclass(frozen, get_all, module = "ironpool._core")]
pub struct TimedOut {
    limit: f64,
    crash: Py<CrashReport>,
}

#[pymethods]
impl TimedOut {
    #[classattr]
    fn __match_args__() -> (&'static str, &'static str) {
        ("limit", "crash")
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "TimedOut(limit={}, crash={})",
            repr_of(py, self.limit)?,
            self.crash.get().__repr__(py)?
        ))
    }
}

/// No worker could start. `parts` is the initializer's pickled exception,
/// or None (the template or every worker died during set-up).
#[pyclass(frozen, get_all, module = "ironpool._core")]
pub struct StartFailed {
    parts: Option<Py<PyList>>,
    crash: Py<CrashReport>,
}

#[pymethods]
impl StartFailed {
    #[classattr]
    fn __match_args__() -> (&'static str, &'static str) {
        ("parts", "crash")
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let parts = match &self.parts {
            Some(p) => parts_repr(py, p)?,
            None => "None".into(),
        };
        Ok(format!(
            "StartFailed(parts={parts}, crash={})",
            self.crash.get().__repr__(py)?
        ))
    }
}

/// A finished task: its outcome, the worker time of its last attempt in
/// seconds, and its earlier attempts (`Crashed`, `TimedOut` or `Raised`),
/// oldest first.
#[pyclass(frozen, get_all, module = "ironpool._core")]
pub struct Completion {
    task_id: u64,
    outcome: Py<PyAny>,
    elapsed: f64,
    attempts: Py<PyList>,
}

#[pymethods]
impl Completion {
    #[classattr]
    fn __match_args__() -> (&'static str, &'static str, &'static str, &'static str) {
        ("task_id", "outcome", "elapsed", "attempts")
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "Completion(task_id={}, outcome={}, elapsed={}, attempts={})",
            self.task_id,
            self.outcome.bind(py).repr()?,
            repr_of(py, self.elapsed)?,
            self.attempts.bind(py).repr()?
        ))
    }
}

fn report(py: Python<'_>, r: CrashReport) -> PyResult<Py<CrashReport>> {
    Py::new(py, r)
}

fn payload(py: Python<'_>, m: &Message) -> PyResult<Py<PyList>> {
    Ok(buffers::decode(py, m, false)?.unbind())
}

fn outcome(py: Python<'_>, o: task::Outcome) -> PyResult<Py<PyAny>> {
    use task::Outcome as O;
    Ok(match o {
        O::Returned(m) => Py::new(
            py,
            Returned {
                parts: payload(py, &m)?,
            },
        )?
        .into_any(),
        O::Raised(m) => Py::new(
            py,
            Raised {
                parts: payload(py, &m)?,
            },
        )?
        .into_any(),
        O::Crashed(c) => Py::new(
            py,
            Crashed {
                crash: report(py, CrashReport::new(&c))?,
            },
        )?
        .into_any(),
        O::TimedOut { limit, crash } => Py::new(
            py,
            TimedOut {
                limit: limit.as_secs_f64(),
                crash: report(py, CrashReport::timed_out(limit, &crash))?,
            },
        )?
        .into_any(),
        O::StartFailed { error, crash } => {
            let parts = match error {
                Some(body) => Some(payload(
                    py,
                    &Message::new(Kind::InitFailed, 0, 0).with_body(body),
                )?),
                None => None,
            };
            Py::new(
                py,
                StartFailed {
                    parts,
                    crash: report(py, CrashReport::new(&crash))?,
                },
            )?
            .into_any()
        }
    })
}

fn attempt(py: Python<'_>, a: Attempt) -> PyResult<Py<PyAny>> {
    outcome(py, a.into())
}

pub fn completion(py: Python<'_>, c: task::Completion) -> PyResult<Py<Completion>> {
    let attempts = c
        .attempts
        .into_iter()
        .map(|a| attempt(py, a))
        .collect::<PyResult<Vec<_>>>()?;
    Py::new(
        py,
        Completion {
            task_id: c.task_id,
            outcome: outcome(py, c.outcome)?,
            elapsed: c.elapsed.as_secs_f64(),
            attempts: PyList::new(py, attempts)?.unbind(),
        },
    )
}

/// A batch for Python; `None` stays `None` (the pool has finished).
pub fn completions(
    py: Python<'_>,
    batch: Option<Vec<task::Completion>>,
) -> PyResult<Option<Vec<Py<Completion>>>> {
    batch
        .map(|b| b.into_iter().map(|c| completion(py, c)).collect())
        .transpose()
}
