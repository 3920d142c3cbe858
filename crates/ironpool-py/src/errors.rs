//! The one place binding errors become Python exceptions: every fallible
//! call in this crate returns [`Error`], and `From<Error> for PyErr` picks
//! the Python type. ironpool's own classes live in `ironpool/errors.py` so
//! they can inherit stdlib types; they are imported when first raised.

use pyo3::exceptions::{PyBufferError, PyNotImplementedError, PyOSError, PyValueError};
use pyo3::{PyErr, Python};

pyo3::import_exception!(ironpool.errors, EngineError);
pyo3::import_exception!(ironpool.errors, ProtocolError);
pyo3::import_exception!(ironpool.errors, WorkerStartError);

#[derive(Debug)]
pub enum Error {
    /// A system call failed (socket, segment, pipe): `OSError` with its
    /// errno, so Python picks the subclass (`BrokenPipeError`, ...).
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    /// The template process could not start: `WorkerStartError`.
    Start(std::io::Error),
    /// The peer sent what is not a valid frame, payload or message here:
    /// `ProtocolError`.
    Protocol(String),
    /// The binding's own state broke (a poisoned lock, a channel taken
    /// twice): `EngineError`.
    Engine(String),
    /// Python code the binding called refused (numpy's allocator hook):
    /// `EngineError`, with that error as its cause.
    Refused { what: &'static str, cause: PyErr },
    /// This environment lacks what a feature needs: `NotImplementedError`.
    Unsupported(&'static str),
    /// An argument out of range: `ValueError`.
    Value(String),
    /// A buffer could not be exported: `BufferError`.
    Buffer(&'static str),
}

impl Error {
    pub fn io(what: &'static str, source: std::io::Error) -> Self {
        Self::Io { what, source }
    }
}

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match e {
            Error::Io { what, source } => match source.raw_os_error() {
                // OSError(errno, text): errno and the subclass are Python's.
                Some(errno) => {
                    let text = source.to_string();
                    let text = text
                        .strip_suffix(&format!(" (os error {errno})"))
                        .unwrap_or(&text);
                    PyOSError::new_err((errno, format!("{what}: {text}")))
                }
                // No errno (a closed peer, a failure the other side reported):
                // the subclass follows the error's kind.
                None => PyErr::from(std::io::Error::new(
                    source.kind(),
                    format!("{what}: {source}"),
                )),
            },
            Error::Start(source) => WorkerStartError::new_err(source.to_string()),
            Error::Protocol(msg) => ProtocolError::new_err(msg),
            Error::Engine(msg) => EngineError::new_err(msg),
            Error::Refused { what, cause } => Python::attach(|py| {
                let err = EngineError::new_err(format!("{what}: {cause}"));
                err.set_cause(py, Some(cause));
                err
            }),
            Error::Unsupported(msg) => PyNotImplementedError::new_err(msg),
            Error::Value(msg) => PyValueError::new_err(msg),
            Error::Buffer(msg) => PyBufferError::new_err(msg),
        }
    }
}
