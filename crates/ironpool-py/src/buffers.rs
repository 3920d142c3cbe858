//! Payload parts between Python and frames: encoding buffers into a message
//! (small inline, large in a memfd segment) and exposing received segment
//! parts to Python as zero-copy buffers.

use std::ffi::c_int;
use std::sync::{Arc, Mutex};

use crate::errors::Error;
use ironpool_core::ipc::payload::{self, Mappings, Part};
use ironpool_core::ipc::{Kind, Message};
use ironpool_core::shm::Mapping;
use ironpool_core::shm::digest::Digest;
use pyo3::buffer::PyUntypedBuffer;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyList, PyTuple};

/// A view of part of a shared segment. numpy arrays, pandas blocks and Arrow
/// buffers rebuilt by pickle keep this object alive through the buffer
/// protocol; the segment is unmapped when the last of them is gone. There is
/// no `close()`, so `BufferError: ... exported buffers` cannot happen.
#[pyclass(frozen, module = "ironpool._core")]
pub struct SegmentView {
    map: Arc<Mapping>,
    offset: usize,
    len: usize,
    /// Exported read-only (objects shared by many tasks must not be changed
    /// by one of them).
    readonly: bool,
}

#[pymethods]
impl SegmentView {
    /// # Safety
    /// Called by the interpreter with a valid `view` to fill.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let this = slf.get();
        // SAFETY: offset + len was checked against the mapping when it was
        // decoded; the mapping lives as long as `slf`, which the view holds
        // (PyBuffer_FillInfo stores a new reference in view->obj). The
        // mapping is private copy-on-write, so writes never reach the segment.
        let rc = unsafe {
            let buf = this.map.as_ptr().add(this.offset).cast();
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                buf,
                this.len as ffi::Py_ssize_t,
                c_int::from(this.readonly),
                flags,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(PyErr::take(slf.py())
                .unwrap_or_else(|| Error::Buffer("buffer export failed").into()))
        }
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}

    fn __len__(&self) -> usize {
        self.len
    }

    fn __repr__(&self) -> String {
        format!("<ironpool SegmentView of {} bytes>", self.len)
    }
}

/// Python buffers held open, so their memory stays put, with the address
/// and length of each (plain numbers, which can cross into a detached
/// closure).
struct Pinned {
    _views: Vec<PyUntypedBuffer>,
    spans: Vec<(usize, usize)>,
}

/// Pins each part's memory for as long as the returned value lives.
fn pin_parts(parts: &Bound<'_, PyList>) -> PyResult<Pinned> {
    let mut views = Vec::with_capacity(parts.len());
    for (i, p) in parts.iter().enumerate() {
        let view = PyUntypedBuffer::get(&p)?;
        if !view.is_c_contiguous() {
            return Err(Error::Value(format!("payload part {i} is not contiguous")).into());
        }
        views.push(view);
    }
    let spans = views
        .iter()
        .map(|v| (v.buf_ptr() as usize, v.len_bytes()))
        .collect();
    Ok(Pinned {
        _views: views,
        spans,
    })
}

/// The parts' bytes as slices.
///
/// # Safety
/// The views the spans came from must stay alive while the slices are used.
unsafe fn slices_of(spans: &[(usize, usize)]) -> Vec<&[u8]> {
    spans
        .iter()
        .map(|&(ptr, len)| {
            if len == 0 {
                &[][..]
            } else {
                // SAFETY: the caller keeps the exporting views alive; the
                // bytes are only read. Another thread mutating the object
                // meanwhile can tear the read, exactly as it would tear a
                // pickle.
                unsafe { std::slice::from_raw_parts(ptr as *const u8, len) }
            }
        })
        .collect()
}

/// Copies above this run with the interpreter detached; below it, a GIL
/// hand-off would cost more than the work.
const DETACH_BYTES: usize = 32 * 1024;

/// Builds a frame from Python buffer-like parts. The copy into the segment
/// runs with the interpreter detached.
pub fn encode(
    py: Python<'_>,
    kind: Kind,
    id: u64,
    aux: u64,
    parts: &Bound<'_, PyList>,
    threshold: usize,
) -> PyResult<Message> {
    Ok(encode_digested(py, kind, id, aux, parts, threshold, false)?.0)
}

/// [`encode`]; with `digested`, also the digest of the bytes sent (see
/// [`digest`]), taken in the same pass as the copy, or `None` if they
/// changed while being sent, so that no digest can vouch for them.
pub fn encode_digested(
    py: Python<'_>,
    kind: Kind,
    id: u64,
    aux: u64,
    parts: &Bound<'_, PyList>,
    threshold: usize,
    digested: bool,
) -> PyResult<(Message, Option<u128>)> {
    let built = over_parts(py, parts, threshold, |slices| {
        let mut d = digested.then(Digest::new);
        payload::encode_digested(kind, id, aux, slices, threshold, d.as_mut())
            .map(|m| (m, d.and_then(|d| d.finish())))
    })?;
    Ok(built.map_err(|e| Error::io("could not build message", e))?)
}

/// Runs `work` over the bytes of `parts`, with the interpreter detached if
/// a part reaches `threshold` or all of them exceed [`DETACH_BYTES`].
fn over_parts<R: Send>(
    py: Python<'_>,
    parts: &Bound<'_, PyList>,
    threshold: usize,
    work: impl FnOnce(&[&[u8]]) -> R + Send,
) -> PyResult<R> {
    let pinned = pin_parts(parts)?;
    let spans = &pinned.spans;
    let large = spans.iter().any(|&(_, len)| len >= threshold)
        || spans.iter().map(|s| s.1).sum::<usize>() > DETACH_BYTES;
    let run = || {
        // SAFETY: `pinned` outlives this closure.
        let slices = unsafe { slices_of(spans) };
        work(&slices)
    };
    let out = if large { py.detach(run) } else { run() };
    drop(pinned);
    Ok(out)
}

/// A 128-bit digest of the bytes of `parts` (a payload from `dumps`), as 16
/// bytes: send-once reuses an automatically shared object only while its
/// digest is unchanged.
#[pyfunction]
pub fn digest<'py>(py: Python<'py>, parts: &Bound<'py, PyList>) -> PyResult<Bound<'py, PyBytes>> {
    let d = over_parts(py, parts, usize::MAX, ironpool_core::shm::digest::digest)?;
    Ok(PyBytes::new(py, &d.to_le_bytes()))
}

/// Turns a received payload into a list of parts: `bytes` for inline parts,
/// [`SegmentView`] views for parts in the segment (read-only if `readonly`).
pub fn decode<'py>(py: Python<'py>, msg: &Message, readonly: bool) -> PyResult<Bound<'py, PyList>> {
    let (parts, mappings) = map_payload(msg)?;
    views(py, msg, &parts, &mappings, readonly)
}

fn map_payload(msg: &Message) -> PyResult<(Vec<Part>, Mappings)> {
    Ok(payload::decode(msg).map_err(|e| Error::Protocol(format!("corrupt payload: {e}")))?)
}

/// The parts of `msg` as Python objects over `mappings`.
fn views<'py>(
    py: Python<'py>,
    msg: &Message,
    parts: &[Part],
    mappings: &Mappings,
    readonly: bool,
) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for part in parts {
        match part {
            Part::Inline(r) => list.append(PyBytes::new(py, &msg.body[r.clone()]))?,
            Part::Segment { fd, range } => {
                let map = mappings
                    .get(*fd)
                    .cloned()
                    .flatten()
                    .ok_or_else(|| Error::Protocol("segment part without segment".into()))?;
                list.append(Bound::new(
                    py,
                    SegmentView {
                        map,
                        offset: range.start,
                        len: range.len(),
                        readonly,
                    },
                )?)?
            }
        }
    }
    Ok(list)
}

/// A payload a worker keeps for many tasks: a function, or an object shared
/// with `pool.share()` or sent once automatically. It holds the message
/// itself, segment descriptors included, so that each task can have either
/// the one shared read-only view or fresh private mappings of its own.
#[pyclass(frozen, module = "ironpool._core")]
pub struct RegisteredPayload {
    msg: Message,
    shared: PyOnceLock<Py<PyTuple>>,
    /// The private mappings the last task got, kept to be handed out again.
    private: Mutex<Option<(Vec<Part>, Mappings)>>,
}

impl RegisteredPayload {
    pub fn new(msg: Message) -> Self {
        Self {
            msg,
            shared: PyOnceLock::new(),
            private: Mutex::new(None),
        }
    }
}

/// Whether private mappings can serve another task as if fresh: nothing
/// but the payload refers to them any more (no object of an earlier task
/// can write into them), and no page of them was ever written (each page is
/// still the segment's own, none a copy-on-write copy).
fn pristine(mappings: &Mappings) -> bool {
    mappings.iter().flatten().all(|m| {
        Arc::strong_count(m) == 1
            && ironpool_core::platform::pages_unmodified(m.as_ptr() as usize, m.len())
                .unwrap_or(false)
    })
}

#[pymethods]
impl RegisteredPayload {
    /// The parts over one read-only mapping per segment, made at first use
    /// and the same for every task: nothing is mapped or faulted in again.
    fn readonly_parts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let parts = self.shared.get_or_try_init(py, || {
            decode(py, &self.msg, true).map(|list| list.to_tuple().unbind())
        })?;
        Ok(parts.bind(py).clone())
    }

    /// The parts over private mappings of the same segments: writable, and
    /// what a task writes stays in its own copy-on-write pages. The last
    /// task's mappings are reused when they are pristine, which spares
    /// faulting the pages in again; otherwise they are made anew.
    fn private_parts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let mut last = self
            .private
            .lock()
            .map_err(|_| Error::Engine("registered payload poisoned".into()))?;
        let reuse = last.as_ref().is_some_and(|(_, maps)| pristine(maps));
        if !reuse {
            *last = None; // unmapped now unless an earlier task's objects hold it
            *last = Some(map_payload(&self.msg)?);
        }
        let (parts, maps) = last
            .as_ref()
            .ok_or_else(|| Error::Engine("no mappings".into()))?;
        views(py, &self.msg, parts, maps, false)
    }
}
