//! Writing buffers into a new memfd segment, then sealing it read-only.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;

use crate::platform;

/// Offsets of buffers are aligned like Arrow's and SIMD loads like.
pub const ALIGN: u64 = 64;

pub fn align_up(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

/// Lays buffers out at aligned offsets, then writes them with one copy each.
pub struct SegmentWriter {
    file: File,
    len: u64,
}

impl SegmentWriter {
    pub fn new(total_len: u64) -> io::Result<Self> {
        let fd = platform::new_segment("ironpool")?;
        let file = File::from(fd);
        file.set_len(total_len)?;
        Ok(Self {
            file,
            len: total_len,
        })
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if offset + data.len() as u64 > self.len {
            return Err(io::Error::other("segment write out of bounds"));
        }
        self.file.write_all_at(data, offset)
    }

    /// Seals the segment so that no one can change it, and hands back its fd.
    pub fn finish(self) -> io::Result<OwnedFd> {
        let fd = OwnedFd::from(self.file);
        platform::seal_readonly(std::os::fd::AsFd::as_fd(&fd))?;
        Ok(fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::Mapping;

    #[test]
    fn write_seal_map_private() {
        let w = SegmentWriter::new(4096).unwrap();
        w.write_at(64, b"hello").unwrap();
        assert!(w.write_at(4095, b"xx").is_err());
        let fd = w.finish().unwrap();
        let m = Mapping::private(&fd, 4096).unwrap();
        // SAFETY: within the 4096-byte mapping.
        let got = unsafe { std::slice::from_raw_parts(m.as_ptr().add(64), 5) };
        assert_eq!(got, b"hello");
        // Copy-on-write: our write is private, the segment is unchanged.
        // SAFETY: within the mapping, which is writable (private).
        unsafe { *m.as_ptr().add(64) = b'J' };
        let m2 = Mapping::private(&fd, 4096).unwrap();
        // SAFETY: within the mapping.
        assert_eq!(unsafe { *m2.as_ptr().add(64) }, b'h');
        // Sealed: the file can no longer be written or resized.
        let f = File::from(fd);
        assert!(f.write_all_at(b"x", 0).is_err());
        assert!(f.set_len(10).is_err());
    }
}
