//! A payload is a list of byte parts: part 0 is the in-band pickle stream,
//! the others are out-of-band buffers (pickle protocol 5). Small parts ride
//! inline in the frame; large ones are written once into a memfd segment
//! whose descriptor travels with the frame, or, when they already lie in a
//! memfd block (see [`crate::shm::blocks`]), travel as that block's sealed
//! descriptor with no copy at all.
//!
//! Body layout: `u32 n_parts, u32 0`, then per part `u32 where (0 inline,
//! 1 segment), u32 descriptor index, u64 offset, u64 len`, then the inline
//! bytes.

use std::ops::Range;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::channel::MAX_FDS;
use super::frame::{FrameError, HEADER_LEN, Kind, MAX_FRAME, Message};
use crate::shm::digest::Digest;
use crate::shm::{Mapping, SegmentWriter, align_up, blocks};

const ENTRY: usize = 24;
const INLINE: u32 = 0;
const SEGMENT: u32 = 1;

/// Parts below this size stay inline unless the frame is full.
pub const DEFAULT_SEGMENT_THRESHOLD: usize = 64 * 1024;

/// Where a decoded part lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// A range of the message body.
    Inline(Range<usize>),
    /// A range of the mapping of descriptor `fd` (an index into the
    /// message's descriptors).
    Segment { fd: usize, range: Range<usize> },
}

/// Builds a message carrying `parts`. Parts of `threshold` bytes or more,
/// and any part that would overflow the frame, are lent from their memfd
/// block if they lie in one, else copied into one shared segment.
pub fn encode(
    kind: Kind,
    id: u64,
    aux: u64,
    parts: &[&[u8]],
    threshold: usize,
) -> std::io::Result<Message> {
    encode_digested(kind, id, aux, parts, threshold, None)
}

/// Bytes copied at a time through the bounce buffer of [`encode_digested`]:
/// small enough to stay in cache between the copy, the digest and the write.
const DIGEST_CHUNK: usize = 256 * 1024;

/// [`encode`], also feeding every part into `digest` (as
/// [`crate::shm::digest::digest`] would). Parts bound for the segment are
/// copied a chunk at a time into a buffer that is digested and then written,
/// so the digest is exactly that of the bytes the segment holds, even if
/// another thread writes into a part meanwhile (a send-once cache must
/// never believe a copy equals bytes it does not hold); the part itself is
/// read from memory once.
pub fn encode_digested(
    kind: Kind,
    id: u64,
    aux: u64,
    parts: &[&[u8]],
    threshold: usize,
    mut digest: Option<&mut Digest>,
) -> std::io::Result<Message> {
    let table_len = 8 + ENTRY * parts.len();
    if HEADER_LEN + table_len > MAX_FRAME {
        return Err(std::io::Error::other(format!(
            "{} out-of-band buffers do not fit one frame",
            parts.len()
        )));
    }
    let mut room = MAX_FRAME - HEADER_LEN - table_len;
    // Where each part goes, with its offset there.
    enum To {
        Inline,
        Copy,
        Lent(u32),
    }
    let mut entries = Vec::with_capacity(parts.len());
    let mut lent: Vec<OwnedFd> = Vec::new();
    let mut inline_len = 0u64;
    let mut seg_len = 0u64;
    for p in parts {
        let len = p.len();
        if len < threshold && len <= room {
            room -= len;
            entries.push((To::Inline, inline_len));
            inline_len += len as u64;
        } else if let Some((fd, off)) = (lent.len() + 1 < MAX_FDS)
            .then(|| blocks::lend(p.as_ptr(), len))
            .flatten()
        {
            entries.push((To::Lent(lent.len() as u32), off));
            lent.push(fd);
        } else {
            let off = align_up(seg_len);
            entries.push((To::Copy, off));
            seg_len = off + len as u64;
        }
    }
    // The copy segment, if any, is descriptor 0; lent blocks follow it.
    let copies = entries.iter().any(|e| matches!(e.0, To::Copy));
    let first_lent = u32::from(copies);
    let mut body = Vec::with_capacity(table_len + inline_len as usize);
    body.extend_from_slice(&(parts.len() as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    for (p, (to, off)) in parts.iter().zip(&entries) {
        let (loc, fd) = match to {
            To::Inline => (INLINE, 0),
            To::Copy => (SEGMENT, 0),
            To::Lent(i) => (SEGMENT, first_lent + i),
        };
        body.extend_from_slice(&loc.to_le_bytes());
        body.extend_from_slice(&fd.to_le_bytes());
        body.extend_from_slice(&off.to_le_bytes());
        body.extend_from_slice(&(p.len() as u64).to_le_bytes());
    }
    let writer = if copies {
        Some(SegmentWriter::new(seg_len.max(1))?)
    } else {
        None
    };
    let mut bounce = Vec::new();
    for (p, (to, off)) in parts.iter().zip(&entries) {
        match (to, &writer, digest.as_deref_mut()) {
            (To::Inline, _, d) => {
                let at = body.len();
                body.extend_from_slice(p);
                if let Some(d) = d {
                    d.begin_part(p.len());
                    d.update(&body[at..]);
                }
            }
            (To::Copy, Some(w), None) => w.write_at(*off, p)?,
            (To::Copy, Some(w), Some(d)) => {
                d.begin_part(p.len());
                for (i, chunk) in p.chunks(DIGEST_CHUNK).enumerate() {
                    bounce.clear();
                    bounce.extend_from_slice(chunk);
                    d.update(&bounce);
                    w.write_at(*off + (i * DIGEST_CHUNK) as u64, &bounce)?;
                }
            }
            // A lent part is not copied: the bytes sent are its sealed
            // block's. They are the bytes digested if no page of the part
            // was written (copied on write) by the end of the digest.
            (_, _, Some(d)) => {
                d.begin_part(p.len());
                d.update(p);
                if !crate::platform::pages_unmodified(p.as_ptr() as usize, p.len()).unwrap_or(false)
                {
                    d.void();
                }
            }
            _ => {}
        }
    }
    let mut fds: Vec<OwnedFd> = Vec::with_capacity(lent.len() + 1);
    if let Some(w) = writer {
        fds.push(w.finish()?);
    }
    fds.extend(lent);
    Ok(Message::new(kind, id, aux).with_body(body).with_fds(fds))
}

/// The mappings of a message's descriptors, by index; `None` for one no
/// part refers to.
pub type Mappings = Vec<Option<Arc<Mapping>>>;

/// Checks the part table of a received payload against the body and the
/// sizes of its segments, and maps each segment a part refers to. Never
/// trusts a length unchecked.
pub fn decode(msg: &Message) -> Result<(Vec<Part>, Mappings), FrameError> {
    let body = &msg.body;
    let read = |at: usize, n: usize| -> Result<u64, FrameError> {
        let bytes = body
            .get(at..at + n)
            .ok_or(FrameError::BadPayload("table past end"))?;
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(bytes);
        Ok(u64::from_le_bytes(b))
    };
    let n = read(0, 4)? as usize;
    let table_end = n
        .checked_mul(ENTRY)
        .and_then(|t| t.checked_add(8))
        .filter(|&t| t <= body.len())
        .ok_or(FrameError::BadPayload("part count too large"))?;
    let mut seg_lens = Vec::with_capacity(msg.fds.len());
    for fd in &msg.fds {
        // Only a segment sealed against shrinking is mapped: one its sender
        // could still truncate would make reads fault (SIGBUS) after every
        // length here was checked.
        let sealed = crate::platform::is_sealed_against_shrinking(fd)
            .map_err(|_| FrameError::BadPayload("segment is not a sealed memfd"))?;
        if !sealed {
            return Err(FrameError::BadPayload("segment is not sealed"));
        }
        let len = crate::platform::segment_len(fd)
            .map_err(|_| FrameError::BadPayload("segment fstat"))?;
        seg_lens.push(len);
    }
    let mut used = vec![false; msg.fds.len()];
    let mut parts = Vec::with_capacity(n);
    let mut inline_at = table_end as u64;
    for i in 0..n {
        let at = 8 + i * ENTRY;
        let loc = read(at, 4)? as u32;
        let fd = read(at + 4, 4)? as usize;
        let off = read(at + 8, 8)?;
        let len = read(at + 16, 8)?;
        match loc {
            INLINE => {
                let end = inline_at
                    .checked_add(len)
                    .filter(|&e| e <= body.len() as u64)
                    .ok_or(FrameError::BadPayload("inline part past end"))?;
                parts.push(Part::Inline(inline_at as usize..end as usize));
                inline_at = end;
            }
            SEGMENT => {
                let limit = *seg_lens
                    .get(fd)
                    .ok_or(FrameError::BadPayload("segment part without segment"))?;
                let end = off
                    .checked_add(len)
                    .filter(|&e| e <= limit)
                    .ok_or(FrameError::BadPayload("segment part past end"))?;
                used[fd] = true;
                parts.push(Part::Segment {
                    fd,
                    range: off as usize..end as usize,
                });
            }
            _ => return Err(FrameError::BadPayload("unknown part location")),
        }
    }
    let mut mappings = Vec::with_capacity(msg.fds.len());
    for ((fd, len), used) in msg.fds.iter().zip(seg_lens).zip(used) {
        mappings.push(if used {
            Some(
                Mapping::private_lendable(fd, len as usize)
                    .map(Arc::new)
                    .map_err(|_| FrameError::BadPayload("segment mmap"))?,
            )
        } else {
            None
        });
    }
    Ok((parts, mappings))
}

/// The bytes of a decoded part: `maps` are the mappings that [`decode`]
/// returned with it. `None` if the part does not lie in them.
pub fn part_bytes<'a>(
    msg: &'a Message,
    maps: &'a [Option<Arc<Mapping>>],
    part: &Part,
) -> Option<&'a [u8]> {
    match part {
        Part::Inline(r) => msg.body.get(r.clone()),
        Part::Segment { fd, range } => {
            let m = maps.get(*fd)?.as_ref()?;
            if range.start > range.end || range.end > m.len() {
                return None;
            }
            // SAFETY: the range was just checked against the mapping, which
            // lives as long as the borrow of `maps`.
            Some(unsafe { std::slice::from_raw_parts(m.as_ptr().add(range.start), range.len()) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<'a>(msg: &'a Message, maps: &'a [Option<Arc<Mapping>>], part: &Part) -> &'a [u8] {
        part_bytes(msg, maps, part).unwrap()
    }

    #[test]
    fn small_parts_inline_large_in_segment() {
        let big = vec![7u8; 100_000];
        let msg = encode(Kind::Returned, 1, 0, &[b"head", &big, b""], 64 * 1024).unwrap();
        assert_eq!(msg.fds.len(), 1);
        let (parts, map) = decode(&msg).unwrap();
        assert!(matches!(parts[0], Part::Inline(_)));
        assert!(matches!(parts[1], Part::Segment { fd: 0, .. }));
        assert_eq!(bytes_of(&msg, &map, &parts[0]), b"head");
        assert_eq!(bytes_of(&msg, &map, &parts[1]), &big[..]);
        assert_eq!(bytes_of(&msg, &map, &parts[2]), b"");
    }

    #[test]
    fn digest_taken_while_copying_equals_the_digest_of_the_parts() {
        let big: Vec<u8> = (0..3 * DIGEST_CHUNK + 17)
            .map(|i| (i % 251) as u8)
            .collect();
        let parts: [&[u8]; 3] = [b"head", &big, b"tail"];
        let mut d = Digest::new();
        let msg = encode_digested(Kind::Register, 1, 0, &parts, 64 * 1024, Some(&mut d)).unwrap();
        assert_eq!(d.finish(), Some(crate::shm::digest::digest(&parts)));
        let (decoded, map) = decode(&msg).unwrap();
        assert_eq!(bytes_of(&msg, &map, &decoded[1]), &big[..]);
    }

    #[test]
    fn parts_in_blocks_are_lent_not_copied() {
        let _turn = blocks::TEST_TURN.lock().unwrap_or_else(|e| e.into_inner());
        let n = 1 << 20;
        let block = blocks::alloc(n).unwrap();
        // SAFETY: `block` is a live allocation of n bytes, freed below.
        let lent = unsafe {
            std::ptr::write_bytes(block, 3, n);
            std::slice::from_raw_parts(block, n)
        };
        let copied = vec![4u8; 100_000];
        let msg = encode(Kind::Task, 1, 0, &[b"head", &copied, lent], 64 * 1024).unwrap();
        assert_eq!(msg.fds.len(), 2, "one copy segment, one lent block");
        let (parts, maps) = decode(&msg).unwrap();
        assert!(matches!(parts[1], Part::Segment { fd: 0, .. }));
        assert!(matches!(parts[2], Part::Segment { fd: 1, .. }));
        assert_eq!(bytes_of(&msg, &maps, &parts[2]), lent);
        assert_eq!(bytes_of(&msg, &maps, &parts[1]), &copied[..]);
        // Only lent parts: the block is descriptor 0.
        let msg = encode(Kind::Task, 1, 0, &[b"head", lent], 64 * 1024).unwrap();
        assert_eq!(msg.fds.len(), 1);
        let (parts, maps) = decode(&msg).unwrap();
        assert_eq!(bytes_of(&msg, &maps, &parts[1]), lent);
        assert!(blocks::free(block));
    }

    #[test]
    fn many_medium_parts_overflow_to_segment() {
        let p = vec![1u8; 30_000];
        let msg = encode(Kind::Task, 1, 0, &[&p, &p, &p], 64 * 1024).unwrap();
        assert!(msg.body.len() + HEADER_LEN <= MAX_FRAME);
        let (parts, map) = decode(&msg).unwrap();
        for part in &parts {
            assert_eq!(bytes_of(&msg, &map, part), &p[..]);
        }
    }

    #[test]
    fn corrupt_tables_are_rejected() {
        let msg = encode(Kind::Task, 1, 0, &[b"abc"], 64).unwrap();
        for cut in 0..msg.body.len() {
            let mut m = Message::new(Kind::Task, 1, 0).with_body(msg.body[..cut].to_vec());
            m.flags = 0;
            assert!(decode(&m).is_err() || cut >= msg.body.len());
        }
        let mut bad = Message::new(Kind::Task, 1, 0).with_body(msg.body.clone());
        bad.body[8] = 1; // claims a segment, none attached
        assert!(decode(&bad).is_err());
        let mut huge = Message::new(Kind::Task, 1, 0).with_body(msg.body.clone());
        huge.body[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge).is_err());
    }
}
