//! What packing buffers into one segment saves, and what reusing segments
//! (an arena) could save, measured on the real kernel objects:
//!
//!     cargo run --release -p ironpool-core --example segment_costs
//!
//! 1. A message with N buffers of S bytes: `payload::encode` (all in one
//!    segment, as ironpool sends them) against one segment per buffer.
//! 2. Writing S bytes into a fresh memfd against rewriting a memfd whose
//!    pages already exist (the most a pool of reused segments could save;
//!    reuse needs the receiver to have dropped every view first).
//!
//! Medians of 9 rounds; run on a quiet machine for absolute figures.

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use ironpool_core::ipc::Kind;
use ironpool_core::ipc::payload;
use ironpool_core::shm::SegmentWriter;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time(mut f: impl FnMut()) -> Duration {
    median(
        (0..9)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect(),
    )
}

fn main() -> std::io::Result<()> {
    println!("1. one message, N buffers of S bytes: one segment for all vs one segment each");
    for (n, size) in [(64usize, 64 * 1024usize), (16, 1 << 20), (4, 16 << 20)] {
        let bufs: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; size]).collect();
        let parts: Vec<&[u8]> = bufs.iter().map(|b| b.as_slice()).collect();
        let packed = time(|| {
            let msg = payload::encode(Kind::Task, 1, 0, &parts, 64 * 1024).expect("encode");
            drop(msg);
        });
        let each = time(|| {
            for p in &parts {
                let w = SegmentWriter::new(p.len() as u64).expect("memfd");
                w.write_at(0, p).expect("write");
                drop(w.finish().expect("seal"));
            }
        });
        println!(
            "   {n:3} x {:>6} KiB: packed {:>9.3?}  one each {:>9.3?}  ({:.2}x)",
            size / 1024,
            packed,
            each,
            each.as_secs_f64() / packed.as_secs_f64()
        );
    }
    println!("2. S bytes into a fresh memfd vs into a reused one (pages already there)");
    for size in [1usize << 20, 16 << 20, 256 << 20] {
        let data = vec![7u8; size];
        let fresh = time(|| {
            let w = SegmentWriter::new(size as u64).expect("memfd");
            w.write_at(0, &data).expect("write");
            drop(w.finish().expect("seal"));
        });
        let fd = ironpool_core::platform::new_segment("ironpool-arena")?;
        let file = std::fs::File::from(fd);
        file.set_len(size as u64)?;
        file.write_all_at(&data, 0)?;
        let reused = time(|| file.write_all_at(&data, 0).expect("rewrite"));
        println!(
            "   {:>6} KiB: fresh {:>9.3?}  reused {:>9.3?}  (could save {:.0}%)",
            size / 1024,
            fresh,
            reused,
            100.0 * (1.0 - reused.as_secs_f64() / fresh.as_secs_f64())
        );
    }
    Ok(())
}
