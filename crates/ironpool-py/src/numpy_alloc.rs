//! numpy's data allocator backed by memfd blocks (`ironpool_core::shm::blocks`):
//! arrays of at least [`MIN_BLOCK`] bytes made while it is installed can be
//! sent to another process without a copy. Smaller ones, and any block the
//! registry declines, come from the C allocator.
//!
//! numpy keeps the handler in a context variable and remembers, per array,
//! which handler made it, so installing and restoring it never mixes up
//! whose memory an array owns.

use std::ffi::{CStr, c_void};
use std::sync::OnceLock;

use crate::errors::Error;
use ironpool_core::platform;
use ironpool_core::shm::blocks;
use pyo3::buffer::PyUntypedBuffer;
use pyo3::prelude::*;
use pyo3::types::PyCapsule;

/// Below this, a memfd costs more than the copy it would save.
pub const MIN_BLOCK: usize = 1 << 20;

/// numpy's `PyDataMemAllocator` (version 1).
#[repr(C)]
struct Allocator {
    ctx: *mut c_void,
    malloc: unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void,
    calloc: unsafe extern "C" fn(*mut c_void, usize, usize) -> *mut c_void,
    realloc: unsafe extern "C" fn(*mut c_void, *mut c_void, usize) -> *mut c_void,
    free: unsafe extern "C" fn(*mut c_void, *mut c_void, usize),
}

/// numpy's `PyDataMem_Handler`.
#[repr(C)]
struct Handler {
    name: [u8; 127],
    version: u8,
    allocator: Allocator,
}

// SAFETY: the handler is immutable; `ctx` is a null pointer never used.
unsafe impl Sync for Handler {}

const fn handler_name() -> [u8; 127] {
    let text = b"ironpool_shared_memory";
    let mut name = [0u8; 127];
    let mut i = 0;
    while i < text.len() {
        name[i] = text[i];
        i += 1;
    }
    name
}

static HANDLER: Handler = Handler {
    name: handler_name(),
    version: 1,
    allocator: Allocator {
        ctx: std::ptr::null_mut(),
        malloc: np_malloc,
        calloc: np_calloc,
        realloc: np_realloc,
        free: np_free,
    },
};

unsafe extern "C" fn np_malloc(_ctx: *mut c_void, size: usize) -> *mut c_void {
    if size >= MIN_BLOCK
        && let Some(p) = blocks::alloc(size)
    {
        return p.cast();
    }
    platform::c_malloc(size)
}

unsafe extern "C" fn np_calloc(_ctx: *mut c_void, n: usize, elsize: usize) -> *mut c_void {
    if let Some(size) = n.checked_mul(elsize)
        && size >= MIN_BLOCK
        && let Some(p) = blocks::alloc(size)
    {
        // A new memfd reads as zeros.
        return p.cast();
    }
    platform::c_calloc(n, elsize)
}

unsafe extern "C" fn np_realloc(ctx: *mut c_void, ptr: *mut c_void, size: usize) -> *mut c_void {
    let Some(old_len) = blocks::block_len(ptr.cast()) else {
        // SAFETY: `ptr` is null or came from the C allocator (not a block).
        return unsafe { platform::c_realloc(ptr, size) };
    };
    // SAFETY: allocating; the copy below stays within both allocations.
    unsafe {
        let new = np_malloc(ctx, size.max(1));
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), new.cast::<u8>(), old_len.min(size));
            blocks::free(ptr.cast());
        }
        new
    }
}

unsafe extern "C" fn np_free(_ctx: *mut c_void, ptr: *mut c_void, _size: usize) {
    if !blocks::free(ptr.cast()) {
        // SAFETY: not a block, so the C allocator made it (or it is null).
        unsafe { platform::c_free(ptr) }
    }
}

const CAPSULE_NAME: &CStr = c"mem_handler";

/// The handler as numpy wants it: a capsule named "mem_handler".
#[pyfunction]
pub fn shared_memory_handler(py: Python<'_>) -> PyResult<Py<PyCapsule>> {
    blocks::init();
    static CAPSULE: OnceLock<Py<PyCapsule>> = OnceLock::new();
    if let Some(c) = CAPSULE.get() {
        return Ok(c.clone_ref(py));
    }
    let ptr = std::ptr::NonNull::from(&HANDLER).cast::<c_void>();
    // SAFETY: HANDLER is a static, valid for the life of the process; the
    // capsule has no destructor.
    let capsule = unsafe { PyCapsule::new_with_pointer(py, ptr, CAPSULE_NAME)? };
    let capsule = capsule.unbind();
    Ok(CAPSULE.get_or_init(|| capsule).clone_ref(py))
}

/// numpy's C API table (the `_ARRAY_API` capsule of its `multiarray`
/// module), if numpy is new enough (1.22) to have allocator hooks.
fn numpy_api<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyCapsule>> {
    let multiarray = py
        .import("numpy._core.multiarray")
        .or_else(|_| py.import("numpy.core.multiarray"))?;
    if !multiarray.hasattr("get_handler_name")? {
        return Err(
            Error::Unsupported("numpy is older than 1.22 and has no allocator hooks").into(),
        );
    }
    Ok(multiarray.getattr("_ARRAY_API")?.cast_into::<PyCapsule>()?)
}

/// Calls numpy's `PyDataMem_SetHandler` (slot 304 of its C API table) with
/// `handler` in the current context; None restores numpy's default.
/// Returns the handler it replaced.
#[pyfunction]
pub fn set_numpy_handler(
    py: Python<'_>,
    handler: Option<&Bound<'_, PyAny>>,
) -> PyResult<Py<PyAny>> {
    const SET_HANDLER: usize = 304;
    type SetHandler = unsafe extern "C" fn(*mut pyo3::ffi::PyObject) -> *mut pyo3::ffi::PyObject;
    let api = numpy_api(py)?;
    let table = api.pointer_checked(None)?.as_ptr().cast::<*const c_void>();
    // SAFETY: `api` is numpy's own `_ARRAY_API` capsule, a table of function
    // pointers whose slot 304 is PyDataMem_SetHandler since numpy 1.22
    // (checked above). The slot is stable: numpy never renumbers its C API.
    let previous = unsafe {
        let f: SetHandler =
            std::mem::transmute::<*const c_void, SetHandler>(*table.add(SET_HANDLER));
        let arg = handler.map_or(std::ptr::null_mut(), |h| h.as_ptr());
        f(arg)
    };
    // SAFETY: a new reference, or null with an exception set.
    unsafe { Bound::from_owned_ptr_or_err(py, previous) }
        .map(Bound::unbind)
        .map_err(|cause| {
            Error::Refused {
                what: "numpy refused the allocator",
                cause,
            }
            .into()
        })
}

/// Blocks alive and buffers lent without a copy, in this process.
/// Whether `obj`'s buffer lies in shared memory that sending lends without a
/// copy (an array made inside `shared_memory()`, or received from another
/// process). False for objects without a contiguous buffer.
#[pyfunction]
pub fn in_shared_memory(obj: &Bound<'_, PyAny>) -> bool {
    PyUntypedBuffer::get(obj)
        .is_ok_and(|view| blocks::contains(view.buf_ptr().cast(), view.len_bytes()))
}

#[pyfunction]
pub fn shared_memory_stats() -> (usize, usize) {
    (blocks::live_blocks(), blocks::lent_count())
}
