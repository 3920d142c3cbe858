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

/// What a map lane sends for a chunk of `items` (see [`pickle_chunk`]), or
/// None where `pickle` must write it; for tests.
#[pyfunction]
pub fn lane_pickle<'py>(
    py: Python<'py>,
    items: &Bound<'py, PyList>,
    threshold: usize,
) -> Option<Bound<'py, PyBytes>> {
    let items: Vec<_> = items.iter().collect();
    pickle_chunk(&items, threshold).map(|b| PyBytes::new(py, &b))
}

/// Pickle opcodes the chunk writer emits (any protocol-2+ unpickler reads them).
mod op {
    pub const PROTO: u8 = 0x80;
    pub const STOP: u8 = b'.';
    pub const NONE: u8 = b'N';
    pub const TRUE: u8 = 0x88;
    pub const FALSE: u8 = 0x89;
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const BININT: u8 = b'J';
    pub const LONG1: u8 = 0x8a;
    pub const BINFLOAT: u8 = b'G';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE: u8 = b'X';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const BINBYTES: u8 = b'B';
    pub const EMPTY_LIST: u8 = b']';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const MARK: u8 = b'(';
    pub const APPENDS: u8 = b'e';
    pub const TUPLE: u8 = b't';
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
}

/// The pickle of a map chunk's list of `items` (what `pickle.dumps` of the
/// list would unpickle to), written without the pickler's per-call set-up,
/// which costs more than a tiny chunk's items; `None` if an item is not
/// plain (see [`plain_items`]) or is an `int` beyond 64 bits, a `str` with
/// lone surrogates or a size beyond 4 GiB, which `pickle` itself must write.
pub fn pickle_chunk(items: &[Bound<'_, PyAny>], threshold: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(8 + items.len() * 6);
    out.extend_from_slice(&[op::PROTO, 5, op::EMPTY_LIST, op::MARK]);
    for item in items {
        if let Ok(t) = item.cast_exact::<PyTuple>() {
            write_tuple(&mut out, t, threshold)?;
        } else {
            write_atom(&mut out, item)?;
        }
    }
    out.extend_from_slice(&[op::APPENDS, op::STOP]);
    Some(out)
}

fn write_tuple(out: &mut Vec<u8>, t: &Bound<'_, PyTuple>, threshold: usize) -> Option<()> {
    let n = t.len();
    if n == 0 {
        out.push(op::EMPTY_TUPLE);
        return Some(());
    }
    if n > 3 {
        out.push(op::MARK);
    }
    for v in t.iter() {
        match v.cast_exact::<PyBytes>() {
            Ok(b) if b.as_bytes().len() < threshold => {
                write_sized(out, b.as_bytes(), op::SHORT_BINBYTES, op::BINBYTES)?
            }
            Ok(_) => return None,
            Err(_) => write_atom(out, &v)?,
        }
    }
    out.push(match n {
        1 => op::TUPLE1,
        2 => op::TUPLE2,
        3 => op::TUPLE3,
        _ => op::TUPLE,
    });
    Some(())
}

fn write_atom(out: &mut Vec<u8>, v: &Bound<'_, PyAny>) -> Option<()> {
    if v.is_exact_instance_of::<PyInt>() {
        write_int(out, v.extract::<i64>().ok()?);
    } else if let Ok(s) = v.cast_exact::<PyString>() {
        write_sized(
            out,
            s.to_str().ok()?.as_bytes(),
            op::SHORT_BINUNICODE,
            op::BINUNICODE,
        )?;
    } else if let Ok(f) = v.cast_exact::<PyFloat>() {
        out.push(op::BINFLOAT);
        out.extend_from_slice(&f.value().to_be_bytes());
    } else if v.is_none() {
        out.push(op::NONE);
    } else if let Ok(b) = v.cast_exact::<PyBool>() {
        out.push(if b.is_true() { op::TRUE } else { op::FALSE });
    } else {
        return None;
    }
    Some(())
}

fn write_int(out: &mut Vec<u8>, v: i64) {
    if let Ok(b) = u8::try_from(v) {
        out.extend_from_slice(&[op::BININT1, b]);
    } else if let Ok(w) = u16::try_from(v) {
        out.push(op::BININT2);
        out.extend_from_slice(&w.to_le_bytes());
    } else if let Ok(w) = i32::try_from(v) {
        out.push(op::BININT);
        out.extend_from_slice(&w.to_le_bytes());
    } else {
        // Little-endian two's complement, as short as keeps the sign.
        let bytes = v.to_le_bytes();
        let mut n = bytes.len();
        while n > 1 {
            let (last, prev) = (bytes[n - 1], bytes[n - 2]);
            if (last == 0 && prev & 0x80 == 0) || (last == 0xff && prev & 0x80 != 0) {
                n -= 1;
            } else {
                break;
            }
        }
        out.extend_from_slice(&[op::LONG1, n as u8]);
        out.extend_from_slice(&bytes[..n]);
    }
}

fn write_sized(out: &mut Vec<u8>, data: &[u8], short: u8, long: u8) -> Option<()> {
    if let Ok(n) = u8::try_from(data.len()) {
        out.extend_from_slice(&[short, n]);
    } else {
        out.push(long);
        out.extend_from_slice(&u32::try_from(data.len()).ok()?.to_le_bytes());
    }
    out.extend_from_slice(data);
    Some(())
}
