//! Pickles of plain values written and read without `pickle`: a map
//! lane's chunk of items (written in the caller, see `lanes.rs`) and a
//! chunk's `(values, None)` result of atoms (read in the caller). For a
//! chunk of one or a few items, setting up a `Pickler` or an `Unpickler`
//! costs more than the items. Both sides cover a small set of opcodes and
//! leave anything else to `pickle` (they return `None`).

use ironpool_core::id_hash::IdMap;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

use crate::plain::{MAX_DEPTH, is_atom};

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

/// The opcodes written and read here (any protocol-2+ unpickler reads them).
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
    pub const EMPTY_DICT: u8 = b'}';
    pub const SETITEM: u8 = b's';
    pub const SETITEMS: u8 = b'u';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const MARK: u8 = b'(';
    pub const APPENDS: u8 = b'e';
    pub const TUPLE: u8 = b't';
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const FRAME: u8 = 0x95;
    pub const MEMOIZE: u8 = 0x94;
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const APPEND: u8 = b'a';
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
}

/// The pickle of a map chunk's list of `items` (what `pickle.dumps` of the
/// list would unpickle to), written without the pickler's per-call set-up,
/// which costs more than a tiny chunk's items; `None` if an item is not
/// plain (atoms, `bytes` under `threshold`, and exact tuples, lists and
/// dicts of those, see [`crate::plain::plain_items`]), is nested deeper
/// than [`MAX_DEPTH`], or holds an `int` beyond 64 bits, a `str` with lone
/// surrogates or a size beyond 4 GiB, which `pickle` itself must write.
/// Tuples, lists and dicts are memoized as `pickle` does, so one that
/// appears twice (or a list or dict inside itself) is written once and
/// arrives as one object, and the pickle grows with the distinct objects,
/// not the paths to them; a tuple reached again through its own contents
/// is `pickle`'s to write (it alone keeps that one object).
pub fn pickle_chunk(items: &[Bound<'_, PyAny>], threshold: usize) -> Option<Vec<u8>> {
    let mut w = Writer {
        out: Vec::with_capacity(8 + items.len() * 6),
        memo: IdMap::default(),
        open_tuples: Vec::new(),
    };
    w.out
        .extend_from_slice(&[op::PROTO, 5, op::EMPTY_LIST, op::MARK]);
    for item in items {
        write_value(&mut w, item, threshold, 0)?;
    }
    w.out.extend_from_slice(&[op::APPENDS, op::STOP]);
    Some(w.out)
}

/// A `str` or `bytes` this long or longer is written once per chunk and
/// referred to after (pickle's memo): `starmap(f, [(text, i), ...])` sends
/// `text` once, as `pickle` would, and the worker gets one object.
const MEMO_MIN: usize = 16;

struct Writer {
    out: Vec<u8>,
    /// Memo index by object address (the items hold the objects meanwhile).
    memo: IdMap<usize, u32>,
    /// Tuples whose contents are being written, innermost last.
    open_tuples: Vec<usize>,
}

impl Writer {
    /// Writes `data` with `short`/`long`, or a reference to its earlier copy.
    fn sized(&mut self, v: &Bound<'_, PyAny>, data: &[u8], short: u8, long: u8) -> Option<()> {
        if data.len() < MEMO_MIN {
            return write_sized(&mut self.out, data, short, long);
        }
        if self.recall(v) {
            return Some(());
        }
        write_sized(&mut self.out, data, short, long)?;
        self.remember(v)
    }

    /// Writes a reference to `v` if it was memoized: true then.
    fn recall(&mut self, v: &Bound<'_, PyAny>) -> bool {
        let Some(&at) = self.memo.get(&(v.as_ptr() as usize)) else {
            return false;
        };
        match u8::try_from(at) {
            Ok(b) => self.out.extend_from_slice(&[op::BINGET, b]),
            Err(_) => {
                self.out.push(op::LONG_BINGET);
                self.out.extend_from_slice(&at.to_le_bytes());
            }
        }
        true
    }

    /// Memoizes `v`, just written.
    fn remember(&mut self, v: &Bound<'_, PyAny>) -> Option<()> {
        self.out.push(op::MEMOIZE);
        let at = u32::try_from(self.memo.len()).ok()?;
        self.memo.insert(v.as_ptr() as usize, at);
        Some(())
    }
}

fn write_value(w: &mut Writer, v: &Bound<'_, PyAny>, threshold: usize, depth: usize) -> Option<()> {
    if is_atom(v) {
        return write_atom(w, v);
    }
    if let Ok(b) = v.cast_exact::<PyBytes>() {
        let data = b.as_bytes();
        return if data.len() < threshold {
            w.sized(v, data, op::SHORT_BINBYTES, op::BINBYTES)
        } else {
            None // sent once, by the encoder
        };
    }
    if depth >= MAX_DEPTH {
        return None;
    }
    if let Ok(t) = v.cast_exact::<PyTuple>() {
        write_tuple(w, t, threshold, depth + 1)
    } else if let Ok(l) = v.cast_exact::<PyList>() {
        write_list(w, l, threshold, depth + 1)
    } else if let Ok(d) = v.cast_exact::<PyDict>() {
        write_dict(w, d, threshold, depth + 1)
    } else {
        None
    }
}

fn write_list(w: &mut Writer, l: &Bound<'_, PyList>, threshold: usize, depth: usize) -> Option<()> {
    if w.recall(l) {
        return Some(());
    }
    w.out.push(op::EMPTY_LIST);
    w.remember(l)?; // before the items: a list holding itself refers to it
    if l.is_empty() {
        return Some(());
    }
    w.out.push(op::MARK);
    for v in l.iter() {
        write_value(w, &v, threshold, depth)?;
    }
    w.out.push(op::APPENDS);
    Some(())
}

fn write_dict(w: &mut Writer, d: &Bound<'_, PyDict>, threshold: usize, depth: usize) -> Option<()> {
    if w.recall(d) {
        return Some(());
    }
    w.out.push(op::EMPTY_DICT);
    w.remember(d)?;
    if d.is_empty() {
        return Some(());
    }
    w.out.push(op::MARK);
    // No Python code runs while writing, so the dict cannot change meanwhile.
    for (k, v) in d.iter() {
        write_value(w, &k, threshold, depth)?;
        write_value(w, &v, threshold, depth)?;
    }
    w.out.push(op::SETITEMS);
    Some(())
}

fn write_tuple(
    w: &mut Writer,
    t: &Bound<'_, PyTuple>,
    threshold: usize,
    depth: usize,
) -> Option<()> {
    let n = t.len();
    if n == 0 {
        w.out.push(op::EMPTY_TUPLE);
        return Some(());
    }
    if w.recall(t) {
        return Some(());
    }
    let at = t.as_ptr() as usize;
    if w.open_tuples.contains(&at) {
        return None;
    }
    if n > 3 {
        w.out.push(op::MARK);
    }
    w.open_tuples.push(at);
    for v in t.iter() {
        write_value(w, &v, threshold, depth)?;
    }
    w.open_tuples.pop();
    w.out.push(match n {
        1 => op::TUPLE1,
        2 => op::TUPLE2,
        3 => op::TUPLE3,
        _ => op::TUPLE,
    });
    // After its contents, as pickle does: a tuple held twice (a DAG of
    // tuples) is written once and arrives as one object.
    w.remember(t)
}

fn write_atom(w: &mut Writer, v: &Bound<'_, PyAny>) -> Option<()> {
    if let Ok(s) = v.cast_exact::<PyString>() {
        return w.sized(
            v,
            s.to_str().ok()?.as_bytes(),
            op::SHORT_BINUNICODE,
            op::BINUNICODE,
        );
    }
    let out = &mut w.out;
    if v.is_exact_instance_of::<PyInt>() {
        write_int(out, v.extract::<i64>().ok()?);
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

/// `[value]` of a pickle [`read`] reads, or None; for tests.
#[pyfunction]
pub fn lane_unpickle<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Option<Bound<'py, PyList>>> {
    read(py, data).map(|v| PyList::new(py, [v])).transpose()
}

/// The value of a pickle made only of the opcodes `pickle` writes for
/// atoms, `bytes`, and lists, tuples and dicts of them (protocol 2 to 5, with frames
/// and memo), or `None` if it holds anything else or is malformed (then
/// `pickle.loads` reads it, or says what is wrong with it).
pub fn read<'py>(py: Python<'py>, data: &[u8]) -> Option<Bound<'py, PyAny>> {
    let mut r = Reader { data, at: 0 };
    // None on the stack is a MARK.
    let mut stack: Vec<Option<Bound<'py, PyAny>>> = Vec::new();
    let mut memo: Vec<Option<Bound<'py, PyAny>>> = Vec::new();
    loop {
        let code = r.byte()?;
        let value = match code {
            op::PROTO => {
                r.byte()?;
                continue;
            }
            op::FRAME => {
                r.take(8)?;
                continue;
            }
            op::STOP => return stack.pop().flatten().filter(|_| stack.is_empty()),
            op::MEMOIZE | op::BINPUT | op::LONG_BINPUT => {
                let at = match code {
                    op::MEMOIZE => memo.len(),
                    op::BINPUT => r.byte()? as usize,
                    _ => r.u32()? as usize,
                };
                if at >= memo.len() {
                    if at > memo.len() + stack.len() {
                        return None; // no pickler leaves such a gap
                    }
                    memo.resize(at + 1, None);
                }
                memo[at] = Some(stack.last()?.clone()?);
                continue;
            }
            op::BINGET => memo.get(r.byte()? as usize)?.clone()?,
            op::LONG_BINGET => memo.get(r.u32()? as usize)?.clone()?,
            op::MARK => {
                stack.push(None);
                continue;
            }
            op::EMPTY_LIST => PyList::empty(py).into_any(),
            op::APPEND => {
                let v = stack.pop()??;
                stack
                    .last()?
                    .as_ref()?
                    .cast::<PyList>()
                    .ok()?
                    .append(v)
                    .ok()?;
                continue;
            }
            op::APPENDS => {
                let items = pop_to_mark(&mut stack)?;
                let list = stack.last()?.as_ref()?.cast::<PyList>().ok()?;
                for v in items {
                    list.append(v).ok()?;
                }
                continue;
            }
            op::EMPTY_DICT => PyDict::new(py).into_any(),
            op::SETITEM => {
                let v = stack.pop()??;
                let k = stack.pop()??;
                let dict = stack.last()?.as_ref()?.cast::<PyDict>().ok()?;
                dict.set_item(k, v).ok()?; // an unhashable key: pickle says so
                continue;
            }
            op::SETITEMS => {
                let items = pop_to_mark(&mut stack)?;
                if items.len() % 2 != 0 {
                    return None;
                }
                let dict = stack.last()?.as_ref()?.cast::<PyDict>().ok()?;
                let mut pairs = items.into_iter();
                while let (Some(k), Some(v)) = (pairs.next(), pairs.next()) {
                    dict.set_item(k, v).ok()?;
                }
                continue;
            }
            op::EMPTY_TUPLE => PyTuple::empty(py).into_any(),
            op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                let n = (code - op::TUPLE1 + 1) as usize;
                let items = stack.split_off(stack.len().checked_sub(n)?);
                let items: Option<Vec<_>> = items.into_iter().collect();
                PyTuple::new(py, items?).ok()?.into_any()
            }
            op::TUPLE => PyTuple::new(py, pop_to_mark(&mut stack)?).ok()?.into_any(),
            op::NONE => py.None().into_bound(py),
            op::TRUE => PyBool::new(py, true).to_owned().into_any(),
            op::FALSE => PyBool::new(py, false).to_owned().into_any(),
            op::BININT1 => r.byte()?.into_pyobject(py).ok()?.into_any(),
            op::BININT2 => u16::from_le_bytes(r.array()?)
                .into_pyobject(py)
                .ok()?
                .into_any(),
            op::BININT => i32::from_le_bytes(r.array()?)
                .into_pyobject(py)
                .ok()?
                .into_any(),
            op::LONG1 => {
                let n = r.byte()? as usize;
                let bytes = r.take(n)?;
                if n == 0 || n > 8 {
                    return None; // 0 is BININT1's; longer ones are pickle's to read
                }
                let fill = if bytes[n - 1] & 0x80 != 0 { 0xff } else { 0 };
                let mut full = [fill; 8];
                full[..n].copy_from_slice(bytes);
                i64::from_le_bytes(full).into_pyobject(py).ok()?.into_any()
            }
            op::BINFLOAT => PyFloat::new(py, f64::from_be_bytes(r.array()?)).into_any(),
            op::SHORT_BINUNICODE | op::BINUNICODE | op::BINUNICODE8 => {
                let n = r.size(code, op::SHORT_BINUNICODE, op::BINUNICODE)?;
                // pickle writes lone surrogates ("surrogatepass"): those are its to read.
                PyString::new(py, std::str::from_utf8(r.take(n)?).ok()?).into_any()
            }
            op::SHORT_BINBYTES | op::BINBYTES | op::BINBYTES8 => {
                let n = r.size(code, op::SHORT_BINBYTES, op::BINBYTES)?;
                PyBytes::new(py, r.take(n)?).into_any()
            }
            _ => return None,
        };
        stack.push(Some(value));
    }
}

fn pop_to_mark<'py>(stack: &mut Vec<Option<Bound<'py, PyAny>>>) -> Option<Vec<Bound<'py, PyAny>>> {
    let mark = stack.iter().rposition(Option::is_none)?;
    let items = stack.split_off(mark + 1);
    stack.pop();
    items.into_iter().collect()
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let out = self.data.get(self.at..end)?;
        self.at = end;
        Some(out)
    }

    fn byte(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.array()?))
    }

    /// The length after a sized opcode: one byte (`short`), four (`long`) or eight.
    fn size(&mut self, code: u8, short: u8, long: u8) -> Option<usize> {
        match code {
            c if c == short => Some(self.byte()? as usize),
            c if c == long => Some(self.u32()? as usize),
            _ => usize::try_from(u64::from_le_bytes(self.array()?)).ok(),
        }
    }
}
