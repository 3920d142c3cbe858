//! Which values pickle the same in any pickler and need no encoding pass:
//! atoms (exact `int`, `float`, `str`, `bool`, `None`) and, as arguments,
//! `bytes` shorter than the pool's out-of-band threshold. The checks run
//! on every submit and once per item of every chunk, in the caller and in
//! the worker, so they run here rather than as Python loops.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

/// Subclasses (an `IntEnum`, a numpy scalar) are not atoms: their pickling
/// is their own.
fn is_atom(v: &Bound<'_, PyAny>) -> bool {
    v.is_exact_instance_of::<PyInt>()
        || v.is_exact_instance_of::<PyString>()
        || v.is_exact_instance_of::<PyFloat>()
        || v.is_none()
        || v.is_exact_instance_of::<PyBool>()
}

/// An argument that needs no encoding pass: an atom, or `bytes` too short
/// to be sent out of band.
fn is_plain_argument(v: &Bound<'_, PyAny>, threshold: usize) -> bool {
    is_atom(v)
        || v.cast_exact::<PyBytes>()
            .is_ok_and(|b| b.as_bytes().len() < threshold)
}

fn is_plain_tuple(v: &Bound<'_, PyAny>, threshold: usize) -> bool {
    v.cast_exact::<PyTuple>()
        .is_ok_and(|t| t.iter().all(|x| is_plain_argument(&x, threshold)))
}

/// Whether a call's `args` (a tuple) and `kwargs` (a dict, or None) hold
/// only plain arguments.
#[pyfunction]
pub fn plain_call(args: &Bound<'_, PyAny>, kwargs: &Bound<'_, PyAny>, threshold: usize) -> bool {
    let kwargs_plain = kwargs.is_none()
        || kwargs
            .cast::<PyDict>()
            .is_ok_and(|k| k.values().iter().all(|v| is_plain_argument(&v, threshold)));
    kwargs_plain && is_plain_tuple(args, threshold)
}

/// Whether every item of a map chunk is an atom or a tuple of plain
/// arguments (a `starmap`'s).
#[pyfunction]
pub fn plain_items(items: &Bound<'_, PyList>, threshold: usize) -> bool {
    items
        .iter()
        .all(|item| is_atom(&item) || is_plain_tuple(&item, threshold))
}

/// Whether every value of a list is an atom (a chunk of tiny tasks'
/// results), with `str` values shorter than `shorter_str` if given: a
/// list of small atoms may be handed out by a plain iterator, which keeps
/// each value until the list is used up.
#[pyfunction]
#[pyo3(signature = (values, shorter_str=None))]
pub fn atoms_only(values: &Bound<'_, PyList>, shorter_str: Option<usize>) -> bool {
    values.iter().all(|v| match shorter_str {
        // Code points, without encoding the string.
        Some(limit) if v.is_exact_instance_of::<PyString>() => v.len().is_ok_and(|n| n < limit),
        _ => is_atom(&v),
    })
}
