//! Which values pickle the same in any pickler and need no encoding pass:
//! atoms (exact `int`, `float`, `str`, `bool`, `None`) and tuples of atoms
//! and small `bytes`. The check runs once per item of every chunk, in the
//! caller and in the worker, so it runs here rather than as a Python loop.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyFloat, PyInt, PyList, PyString, PyTuple};

/// Subclasses (an `IntEnum`, a numpy scalar) are not atoms: their pickling
/// is their own.
fn is_atom(v: &Bound<'_, PyAny>) -> bool {
    v.is_exact_instance_of::<PyInt>()
        || v.is_exact_instance_of::<PyString>()
        || v.is_exact_instance_of::<PyFloat>()
        || v.is_none()
        || v.is_exact_instance_of::<PyBool>()
}

fn is_flat_tuple(v: &Bound<'_, PyAny>, threshold: usize) -> bool {
    let Ok(tuple) = v.cast_exact::<PyTuple>() else {
        return false;
    };
    tuple.iter().all(|x| {
        is_atom(&x)
            || x.cast_exact::<PyBytes>()
                .is_ok_and(|b| b.as_bytes().len() < threshold)
    })
}

/// Whether every item of a map chunk is an atom or a tuple of atoms and
/// `bytes` shorter than `threshold`.
#[pyfunction]
pub fn plain_items(items: &Bound<'_, PyList>, threshold: usize) -> bool {
    items
        .iter()
        .all(|item| is_atom(&item) || is_flat_tuple(&item, threshold))
}

/// Whether every value of a list is an atom (a chunk of tiny tasks' results).
#[pyfunction]
pub fn atoms_only(values: &Bound<'_, PyList>) -> bool {
    values.iter().all(|v| is_atom(&v))
}

/// Strings at least this long are not "small" for [`small_values`].
const SMALL_STR: usize = 256;

/// Whether every value of a list is a small atom: a list of them may be
/// handed out by a plain iterator, which keeps each value until the list
/// is used up (a long `str` is let go of as it is handed out instead).
#[pyfunction]
pub fn small_values(values: &Bound<'_, PyList>) -> bool {
    values.iter().all(|v| {
        if v.is_exact_instance_of::<PyString>() {
            return v.len().is_ok_and(|n| n < SMALL_STR); // code points, without encoding
        }
        is_atom(&v)
    })
}
