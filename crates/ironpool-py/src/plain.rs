//! Which values pickle the same in any pickler and need no encoding pass:
//! atoms (exact `int`, `float`, `str`, `bool`, `None`), `bytes` shorter
//! than the pool's out-of-band threshold, and exact tuples, lists and dicts
//! of those. The checks run on every submit and once per item of every
//! chunk, in the caller and in the worker, so they run here rather than as
//! Python loops.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

/// Containers nested deeper than this are the encoder's (and the lane
/// writer's `None`): `pickle` has the recursion limit to report them.
pub const MAX_DEPTH: usize = 16;
/// Elements of containers one value's check looks at before it leaves the
/// value to the encoder: a list holding itself (or one list many times)
/// would otherwise be walked once per path to it.
const BUDGET: usize = 4096;

/// Subclasses (an `IntEnum`, a numpy scalar) are not atoms: their pickling
/// is their own.
pub fn is_atom(v: &Bound<'_, PyAny>) -> bool {
    v.is_exact_instance_of::<PyInt>()
        || v.is_exact_instance_of::<PyString>()
        || v.is_exact_instance_of::<PyFloat>()
        || v.is_none()
        || v.is_exact_instance_of::<PyBool>()
}

/// A value that needs no encoding pass (see the module's doc).
fn is_plain(v: &Bound<'_, PyAny>, threshold: usize) -> bool {
    let mut budget = BUDGET;
    is_plain_within(v, threshold, 0, &mut budget)
}

fn is_plain_within(
    v: &Bound<'_, PyAny>,
    threshold: usize,
    depth: usize,
    budget: &mut usize,
) -> bool {
    if is_atom(v) {
        return true;
    }
    if let Ok(b) = v.cast_exact::<PyBytes>() {
        return b.as_bytes().len() < threshold;
    }
    if depth >= MAX_DEPTH {
        return false;
    }
    let mut spend = |n: usize| match budget.checked_sub(n) {
        Some(left) => {
            *budget = left;
            true
        }
        None => false,
    };
    let depth = depth + 1;
    if let Ok(t) = v.cast_exact::<PyTuple>() {
        spend(t.len())
            && t.iter()
                .all(|x| is_plain_within(&x, threshold, depth, budget))
    } else if let Ok(l) = v.cast_exact::<PyList>() {
        spend(l.len())
            && l.iter()
                .all(|x| is_plain_within(&x, threshold, depth, budget))
    } else if let Ok(d) = v.cast_exact::<PyDict>() {
        spend(2 * d.len())
            && d.iter().all(|(k, x)| {
                is_plain_within(&k, threshold, depth, budget)
                    && is_plain_within(&x, threshold, depth, budget)
            })
    } else {
        false
    }
}

/// Whether a call's `args` (a tuple) and `kwargs` (a dict, or None) hold
/// only plain values.
#[pyfunction]
pub fn plain_call(args: &Bound<'_, PyAny>, kwargs: &Bound<'_, PyAny>, threshold: usize) -> bool {
    let kwargs_plain = kwargs.is_none()
        || kwargs
            .cast::<PyDict>()
            .is_ok_and(|k| k.values().iter().all(|v| is_plain(&v, threshold)));
    kwargs_plain
        && args
            .cast_exact::<PyTuple>()
            .is_ok_and(|t| t.iter().all(|x| is_plain(&x, threshold)))
}

/// Whether every item of a map chunk is plain.
#[pyfunction]
pub fn plain_items(items: &Bound<'_, PyList>, threshold: usize) -> bool {
    items.iter().all(|item| is_plain(&item, threshold))
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
