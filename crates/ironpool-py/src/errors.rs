//! The one place engine errors become Python exceptions. The exception
//! classes live in `ironpool/errors.py` so they can inherit stdlib types.

use pyo3::PyErr;
use pyo3::exceptions::PyRuntimeError;

/// An infrastructure failure (socket, segment, spawn) as a Python error.
pub fn engine_error(msg: String) -> PyErr {
    PyRuntimeError::new_err(format!("ironpool engine: {msg}"))
}

pub fn io_error(what: &str, e: std::io::Error) -> PyErr {
    PyErr::from(std::io::Error::new(e.kind(), format!("{what}: {e}")))
}

/// The template process or a worker could not start.
pub fn start_error(msg: String) -> PyErr {
    pyo3::exceptions::PyOSError::new_err(msg)
}
