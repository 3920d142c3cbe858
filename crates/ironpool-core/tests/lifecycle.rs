//! Leak checks: pools and zygotes come and go, with crashes, timeouts,
//! protocol errors and segments in between, and leave no process, file
//! descriptor, memfd or mapping behind.
//!
//! The only test in its binary, so nothing else opens descriptors while it
//! counts `/proc/self/fd`.

mod common;

use std::os::fd::OwnedFd;
use std::time::Duration;

use common::*;
use ironpool_core::ipc::payload::{self, DEFAULT_SEGMENT_THRESHOLD};
use ironpool_core::ipc::{Channel, Kind, Recv};
use ironpool_core::supervisor::PoolConfig;
use ironpool_core::task::Outcome;
use ironpool_core::zygote::Zygote;
use ironpool_core::{platform, shm};

fn busy_pool(z: &Zygote, cfg: PoolConfig) -> TestPool {
    let pool = start(z, cfg);
    let body =
        payload::encode(Kind::Register, 1, 0, &[b"f"], DEFAULT_SEGMENT_THRESHOLD).expect("payload");
    pool.register_object(1, body);
    let cmds: [&[u8]; 8] = [
        b"echo",
        b"fn",
        b"crash",
        b"big:200000",
        b"garbage",
        b"hang",
        b"stderr:bye",
        b"raise",
    ];
    for (id, cmd) in cmds.iter().enumerate() {
        let mut t = task_fn(id as u64, 1, cmd);
        t.timeout = Some(Duration::from_millis(200));
        pool.submit(t);
    }
    let got = collect(&pool, cmds.len());
    assert!(matches!(got[&0].outcome, Outcome::Returned(_)));
    assert!(matches!(got[&3].outcome, Outcome::Returned(ref m) if m.fds.len() == 1));
    assert!(matches!(got[&7].outcome, Outcome::Raised(_)));
    drop(got);
    pool
}

fn assert_zygote_clean(z: Zygote) {
    let pid = z.pid();
    let left = wait_no_children(pid, Duration::from_secs(5));
    assert!(left.is_empty(), "workers left behind: {left:?}");
    drop(z);
    assert!(!process_exists(pid), "zygote {pid} left behind");
}

fn round() {
    // A zygote serving several pools in turn, each shut down properly.
    let z = zygote();
    for _ in 0..3 {
        let pool = busy_pool(&z, config(2));
        shutdown(pool);
    }
    // Terminated mid-task.
    let pool = busy_pool(&z, config(2));
    pool.submit(task(100, b"hang"));
    pool.terminate();
    drain_and_join(pool);
    // Dropped without a word: Drop shuts down and joins.
    let pool = busy_pool(&z, config(1));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(pool);
        let _ = tx.send(());
    });
    rx.recv_timeout(DEADLINE).expect("drop of a pool returns");
    assert_zygote_clean(z);

    // A zygote that dies under a pool.
    let z = zygote();
    let pool = busy_pool(&z, config(2));
    z.kill();
    shutdown(pool);
    drop(z);

    // Refused descriptors are closed, not leaked.
    let (tx, mut rx) = Channel::pair().expect("pair");
    const TOO_MANY: usize = ironpool_core::ipc::channel::MAX_FDS + 4;
    let fds: Vec<OwnedFd> = (0..TOO_MANY)
        .map(|_| rustix::pipe::pipe().expect("pipe").0)
        .collect();
    let borrowed: Vec<_> = fds.iter().map(std::os::fd::AsFd::as_fd).collect();
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(TOO_MANY))];
    let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
    assert!(control.push(rustix::net::SendAncillaryMessage::ScmRights(&borrowed)));
    let frame = ironpool_core::ipc::Message::new(Kind::Task, 1, 0).header();
    rustix::net::sendmsg(
        &tx,
        &[std::io::IoSlice::new(&frame)],
        &mut control,
        rustix::net::SendFlags::empty(),
    )
    .expect("sendmsg");
    drop(fds);
    assert!(rx.recv().is_err());
    drop(tx);
    assert!(matches!(rx.recv(), Ok(Recv::Closed)));
}

#[test]
fn pools_and_zygotes_leave_nothing_behind() {
    // Warm up once: the keeper thread, lazily opened std handles.
    round();
    let fds = open_fds();
    eprintln!("baseline: {}", fd_list());
    let me = platform::current_pid();
    for _ in 0..2 {
        round();
    }
    assert_eq!(open_fds(), fds, "file descriptors leaked: {}", fd_list());
    assert_eq!(platform::open_segments(), 0, "memfd segments leaked");
    assert_eq!(shm::live_mappings(), 0, "mappings leaked");
    let kids = wait_no_children(me, Duration::from_secs(5));
    assert!(kids.is_empty(), "child processes left: {kids:?}");
}

fn fd_list() -> String {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
    {
        let target = std::fs::read_link(e.path()).map(|p| p.display().to_string());
        out.push(format!(
            "{}->{}",
            e.file_name().to_string_lossy(),
            target.unwrap_or_default()
        ));
    }
    out.sort();
    out.join(" ")
}
