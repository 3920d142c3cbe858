//! Frame header: 24 bytes, little-endian, then the body.
//!
//! ```text
//! 0      4     5      6       8        16       24
//! | magic | kind | flags | rsvd | id u64 | aux u64 | body ...
//! ```
//! The decoder never panics and never trusts a length it did not check:
//! a frame that fails to decode is a protocol error that kills the sender.

use std::io;
use std::os::fd::OwnedFd;

pub const MAGIC: u32 = 0x4c4f_5049; // "IPOL"
pub const HEADER_LEN: usize = 24;
/// The largest frame on the wire. Larger payload parts travel in segments.
pub const MAX_FRAME: usize = 64 * 1024;
/// What precedes each task's body inside a [`Kind::Batch`] frame.
pub const BATCH_ENTRY_HEADER: usize = HEADER_LEN + 4;

/// `Raised` flag: the exception is one of the pool's `retry_on` types, so
/// the engine may run the task again. (Task flags are the worker's: bit 0
/// marks a `map` chunk, whose exceptions travel inside a `Returned`.)
pub const RETRYABLE: u8 = 1;

/// `Task` flag: the task is a `map` chunk (`CHUNK` in `ironpool/_worker.py`).
/// The engine reads it for one thing: a batch of chunks is quiet
/// (`supervisor/quiet.rs`), since a map takes its results in bursts.
pub const MAP_CHUNK: u8 = 1;

/// Message kinds. Direction in brackets: P = pool supervisor, W = worker,
/// Z = zygote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// [P→W] per-pool set-up: sys.path, cwd, initializer.
    Init = 1,
    /// [W→P] set-up done; tasks may follow.
    Ready = 2,
    /// [W→P] set-up failed; body is the pickled error.
    InitFailed = 3,
    /// [P→W] a function the following tasks refer to by `aux`.
    Register = 4,
    /// [P→W] run task `id` with function `aux`.
    Task = 5,
    /// [W→P] task `id` returned; `aux` = nanoseconds spent.
    Returned = 6,
    /// [W→P] task `id` raised; `aux` = nanoseconds spent.
    Raised = 7,
    /// [P→Z] fork a worker; fds: its doorbell (optional), channel, stdout,
    /// stderr. `id` = request.
    Fork = 8,
    /// [Z→P] forked request `id` as pid `aux`; fd: its pidfd.
    Forked = 9,
    /// [Z→P] pid `id` exited; `aux` = encoded status.
    Exited = 10,
    /// [P→Z] a new pool session; fd: the session socket.
    Session = 11,
    /// [Z→P] a fork failed; body = error text.
    ForkFailed = 12,
    /// [P→W] finish and exit.
    Shutdown = 13,
    /// [P→W] drop registered object `id` (a released shared object).
    Forget = 14,
    /// [W→P] a `logging` record made in the worker; body is its pickled
    /// state. Sent whatever the worker is doing (set-up, a task, idle).
    Log = 15,
    /// [P→Z] import modules in the template between forks; body = the
    /// request (module names, see `ironpool/_zygote.py` and `_template.py`).
    Warm = 16,
    /// [Z→P] the warm request is done; body = what was imported or skipped.
    Warmed = 17,
    /// [P→W] several tasks in one frame, run in order; `aux` = how many,
    /// `id` = ring the doorbell after every `id` results and the last (0:
    /// never; see `supervisor/quiet.rs`), body = each task's frame header,
    /// its body length (u32) and its body.
    /// Never carries descriptors: a task with segments travels alone.
    Batch = 18,
    /// [Z→P] the template is about to kill its workers and exit (a warm-up
    /// import left it with threads): what they run was not their doing.
    Retiring = 19,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        use Kind::*;
        Some(match v {
            1 => Init,
            2 => Ready,
            3 => InitFailed,
            4 => Register,
            5 => Task,
            6 => Returned,
            7 => Raised,
            8 => Fork,
            9 => Forked,
            10 => Exited,
            11 => Session,
            12 => ForkFailed,
            13 => Shutdown,
            14 => Forget,
            15 => Log,
            16 => Warm,
            17 => Warmed,
            18 => Batch,
            19 => Retiring,
            _ => return None,
        })
    }
}

/// One frame with the descriptors that travelled with it.
#[derive(Debug)]
pub struct Message {
    pub kind: Kind,
    pub flags: u8,
    pub id: u64,
    pub aux: u64,
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Message {
    pub fn new(kind: Kind, id: u64, aux: u64) -> Self {
        Self {
            kind,
            flags: 0,
            id,
            aux,
            body: Vec::new(),
            fds: Vec::new(),
        }
    }

    pub fn with_body(mut self, body: Vec<u8>) -> Self {
        self.body = body;
        self
    }

    pub fn with_fds(mut self, fds: Vec<OwnedFd>) -> Self {
        self.fds = fds;
        self
    }

    /// A copy with duplicated descriptors (the same segments, shared).
    pub fn try_clone(&self) -> std::io::Result<Self> {
        let fds = self
            .fds
            .iter()
            .map(crate::platform::duplicate_fd)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            kind: self.kind,
            flags: self.flags,
            id: self.id,
            aux: self.aux,
            body: self.body.clone(),
            fds,
        })
    }

    pub fn header(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4] = self.kind as u8;
        h[5] = self.flags;
        h[8..16].copy_from_slice(&self.id.to_le_bytes());
        h[16..24].copy_from_slice(&self.aux.to_le_bytes());
        h
    }

    /// Parses a received frame; `fds` are the descriptors that came with it.
    pub fn decode(frame: &[u8], fds: Vec<OwnedFd>) -> Result<Self, FrameError> {
        if frame.len() < HEADER_LEN {
            return Err(FrameError::Short(frame.len()));
        }
        let (header, body) = frame.split_at(HEADER_LEN);
        Self::decode_split(header, body, fds)
    }

    /// How this task is written inside a [`Kind::Batch`] frame, before its body.
    pub fn batch_entry_header(&self) -> io::Result<[u8; BATCH_ENTRY_HEADER]> {
        let len = u32::try_from(self.body.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "task body too large"))?;
        let mut h = [0u8; BATCH_ENTRY_HEADER];
        h[..HEADER_LEN].copy_from_slice(&self.header());
        h[HEADER_LEN..].copy_from_slice(&len.to_le_bytes());
        Ok(h)
    }

    /// The tasks of a [`Kind::Batch`] frame, in order.
    pub fn unbatch(&self) -> Result<Vec<Message>, FrameError> {
        if !self.fds.is_empty() {
            return Err(FrameError::BadBatch("a batch carries no descriptors"));
        }
        let mut tasks = Vec::with_capacity(usize::try_from(self.aux).unwrap_or(0).min(256));
        let mut rest = self.body.as_slice();
        while !rest.is_empty() {
            if rest.len() < BATCH_ENTRY_HEADER {
                return Err(FrameError::BadBatch("entry shorter than its header"));
            }
            let (header, tail) = rest.split_at(HEADER_LEN);
            let (len, tail) = tail.split_at(4);
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            if len > tail.len() {
                return Err(FrameError::BadBatch("entry longer than the frame"));
            }
            let (body, tail) = tail.split_at(len);
            let task = Self::decode_split(header, body, Vec::new())?;
            if task.kind != Kind::Task {
                return Err(FrameError::BadBatch("only tasks travel in a batch"));
            }
            tasks.push(task);
            rest = tail;
        }
        if tasks.len() as u64 != self.aux {
            return Err(FrameError::BadBatch("task count does not match"));
        }
        Ok(tasks)
    }

    fn decode_split(header: &[u8], body: &[u8], fds: Vec<OwnedFd>) -> Result<Self, FrameError> {
        let frame = header;
        let word = |r: std::ops::Range<usize>| {
            let mut b = [0u8; 8];
            b[..r.len()].copy_from_slice(&frame[r]);
            u64::from_le_bytes(b)
        };
        let magic = word(0..4) as u32;
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let kind = Kind::from_u8(frame[4]).ok_or(FrameError::UnknownKind(frame[4]))?;
        Ok(Self {
            kind,
            flags: frame[5],
            id: word(8..16),
            aux: word(16..24),
            body: body.to_vec(),
            fds,
        })
    }
}

/// Why bytes from a peer are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is shorter than the {HEADER_LEN}-byte header")]
    Short(usize),
    #[error("bad magic 0x{0:08x}")]
    BadMagic(u32),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("frame larger than {MAX_FRAME} bytes was truncated")]
    Truncated,
    #[error("payload table is inconsistent: {0}")]
    BadPayload(&'static str),
    #[error("batch frame is inconsistent: {0}")]
    BadBatch(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let m = Message::new(Kind::Task, 7, u64::MAX).with_body(b"abc".to_vec());
        let mut wire = m.header().to_vec();
        wire.extend_from_slice(&m.body);
        let d = Message::decode(&wire, Vec::new()).unwrap();
        assert_eq!(
            (d.kind, d.id, d.aux, d.body.as_slice()),
            (Kind::Task, 7, u64::MAX, &b"abc"[..])
        );
    }

    fn batch_of(tasks: &[Message]) -> Message {
        let mut body = Vec::new();
        for t in tasks {
            body.extend_from_slice(&t.batch_entry_header().unwrap());
            body.extend_from_slice(&t.body);
        }
        Message::new(Kind::Batch, 0, tasks.len() as u64).with_body(body)
    }

    #[test]
    fn a_batch_splits_into_its_tasks_in_order() {
        let tasks = [
            Message::new(Kind::Task, 1, 9).with_body(b"one".to_vec()),
            Message::new(Kind::Task, 2, 9),
            Message::new(Kind::Task, 3, 8).with_body(vec![7; 1000]),
        ];
        let got = batch_of(&tasks).unbatch().unwrap();
        let ids: Vec<(u64, u64, usize)> = got.iter().map(|m| (m.id, m.aux, m.body.len())).collect();
        assert_eq!(ids, [(1, 9, 3), (2, 9, 0), (3, 8, 1000)]);
        assert_eq!(got[0].body, b"one");
    }

    #[test]
    fn a_bad_batch_is_an_error_not_a_panic() {
        let tasks = [Message::new(Kind::Task, 1, 9).with_body(b"one".to_vec())];
        let good = batch_of(&tasks);
        let mut cut = batch_of(&tasks);
        cut.body.truncate(good.body.len() - 1);
        let mut short = batch_of(&tasks);
        short.body.truncate(5);
        let mut miscounted = batch_of(&tasks);
        miscounted.aux = 2;
        let not_a_task = batch_of(&[Message::new(Kind::Shutdown, 0, 0)]);
        for bad in [cut, short, miscounted, not_a_task] {
            assert!(matches!(bad.unbatch(), Err(FrameError::BadBatch(_))));
        }
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(
            Message::decode(b"short", vec![]).unwrap_err(),
            FrameError::Short(5)
        );
        let mut wire = Message::new(Kind::Task, 1, 2).header();
        wire[0] ^= 1;
        assert!(matches!(
            Message::decode(&wire, vec![]),
            Err(FrameError::BadMagic(_))
        ));
        let mut wire = Message::new(Kind::Task, 1, 2).header();
        wire[4] = 200;
        assert_eq!(
            Message::decode(&wire, vec![]).unwrap_err(),
            FrameError::UnknownKind(200)
        );
    }
}
