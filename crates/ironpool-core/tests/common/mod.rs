//! Shared helpers for the integration tests: a fake zygote (the
//! `ironpool-fake-zygote` test binary), task builders, and bounded waits.
#![allow(dead_code)]

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ironpool_core::ipc::payload::{self, DEFAULT_SEGMENT_THRESHOLD};
use ironpool_core::ipc::{Kind, Message};
use ironpool_core::supervisor::{Pool, PoolConfig};
use ironpool_core::task::{Completion, Outcome, Task};
use ironpool_core::zygote::Zygote;

pub const FAKE: &str = env!("CARGO_BIN_EXE_ironpool-fake-zygote");

/// No single wait in these tests may take longer than this.
pub const DEADLINE: Duration = Duration::from_secs(20);

pub fn zygote() -> Zygote {
    Zygote::spawn(Command::new(FAKE)).expect("fake zygote starts")
}

/// A fake zygote that logs every fork to a fresh file; returns the path.
pub fn zygote_with_fork_log(name: &str) -> (Zygote, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!("ironpool-forks-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let mut cmd = Command::new(FAKE);
    cmd.env("FAKE_ZYGOTE_FORK_LOG", &path);
    (Zygote::spawn(cmd).expect("fake zygote starts"), path)
}

/// How many workers the zygote made, per its fork log.
pub fn forks(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

pub fn config(workers: usize) -> PoolConfig {
    PoolConfig {
        workers,
        forward_output: false,
        ..PoolConfig::default()
    }
}

pub fn init(body: &[u8]) -> Message {
    payload::encode(Kind::Init, 0, 0, &[body], DEFAULT_SEGMENT_THRESHOLD).expect("init payload")
}

/// A pool for a test. If the test fails while holding it, the pool is
/// terminated and leaked instead of joined, so a failure never hangs.
pub struct TestPool(Option<Arc<Pool>>);

impl std::ops::Deref for TestPool {
    type Target = Pool;
    fn deref(&self) -> &Pool {
        self.0.as_deref().expect("pool present")
    }
}

impl TestPool {
    fn take(mut self) -> Arc<Pool> {
        self.0.take().expect("pool present")
    }
}

impl Drop for TestPool {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            if std::thread::panicking() {
                p.terminate();
                std::mem::forget(p);
            }
        }
    }
}

pub fn start(z: &Zygote, cfg: PoolConfig) -> TestPool {
    start_with_init(z, cfg, b"ok")
}

pub fn start_with_init(z: &Zygote, cfg: PoolConfig, init_body: &[u8]) -> TestPool {
    TestPool(Some(Arc::new(
        Pool::start(z, cfg, init(init_body)).expect("pool starts"),
    )))
}

/// A task whose first payload part is `cmd` (see the fake worker's docs).
pub fn task(id: u64, cmd: &[u8]) -> Task {
    task_fn(id, 0, cmd)
}

pub fn task_fn(id: u64, function_id: u64, cmd: &[u8]) -> Task {
    let msg = payload::encode(
        Kind::Task,
        id,
        function_id,
        &[cmd],
        DEFAULT_SEGMENT_THRESHOLD,
    )
    .expect("task payload");
    Task::new(id, function_id, msg)
}

/// Every part of a result payload, concatenated in order.
pub fn parts(msg: &Message) -> Vec<Vec<u8>> {
    let (parts, maps) = payload::decode(msg).expect("valid payload");
    parts
        .iter()
        .map(|p| {
            payload::part_bytes(msg, &maps, p)
                .expect("part in range")
                .to_vec()
        })
        .collect()
}

/// Part 0 of a `Returned` outcome; panics with the outcome otherwise.
pub fn returned(c: &Completion) -> Vec<u8> {
    match &c.outcome {
        Outcome::Returned(m) => {
            assert_eq!(m.kind, Kind::Returned);
            assert_eq!(m.id, c.task_id, "result carries its task's id");
            parts(m).into_iter().next().unwrap_or_default()
        }
        other => panic!("task {} did not return: {other:?}", c.task_id),
    }
}

/// Collects completions until `n` have arrived, failing (not hanging) after
/// `DEADLINE`. Each task id must complete exactly once.
pub fn collect(pool: &Pool, n: usize) -> HashMap<u64, Completion> {
    collect_within(pool, n, DEADLINE)
}

pub fn collect_within(pool: &Pool, n: usize, limit: Duration) -> HashMap<u64, Completion> {
    let end = Instant::now() + limit;
    let mut got = HashMap::new();
    while got.len() < n {
        let left = end.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "only {} of {n} completions within {limit:?}: {:?}",
            got.len(),
            got.keys().collect::<Vec<_>>()
        );
        let batch = pool
            .wait_completions(Some(left.min(Duration::from_millis(200))))
            .expect("pool still running");
        for c in batch {
            let id = c.task_id;
            assert!(got.insert(id, c).is_none(), "task {id} completed twice");
        }
    }
    got
}

/// Shuts the pool down and joins it, failing after `DEADLINE`. Returns the
/// completions that arrived meanwhile.
pub fn shutdown(pool: TestPool) -> Vec<Completion> {
    pool.shutdown();
    drain_and_join(pool)
}

/// Drains completions until the pool reports it has finished, then joins.
pub fn drain_and_join(pool: TestPool) -> Vec<Completion> {
    let pool = pool.take();
    let end = Instant::now() + DEADLINE;
    let mut got = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            pool.terminate();
            std::mem::forget(pool);
            panic!("pool did not finish within {DEADLINE:?}");
        }
        match pool.wait_completions(Some(left.min(Duration::from_millis(200)))) {
            Some(batch) => got.extend(batch),
            None => break,
        }
    }
    join_within(pool, Duration::from_secs(5));
    got
}

/// Joins the supervisor thread from a helper thread, so a stuck join fails
/// the test instead of hanging it.
pub fn join_within(pool: Arc<Pool>, limit: Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        pool.join();
        // Dropped here, before saying so: the caller may count descriptors.
        drop(pool);
        let _ = tx.send(());
    });
    assert!(
        rx.recv_timeout(limit).is_ok(),
        "supervisor thread did not join within {limit:?}"
    );
}

/// Pids whose parent is `ppid` (from /proc; zombies included).
pub fn children_of(ppid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command: state, ppid, ...
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let _state = f.next();
        if f.next().and_then(|p| p.parse::<i32>().ok()) == Some(ppid) {
            out.push(pid);
        }
    }
    out
}

/// Waits (bounded) until a worker has been handed task `id`.
pub fn wait_dispatched(pool: &Pool, id: u64) {
    let end = Instant::now() + Duration::from_secs(10);
    while !pool.is_dispatched(id) {
        assert!(Instant::now() < end, "task {id} was never dispatched");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits (bounded) until `ppid` has no children left.
pub fn wait_no_children(ppid: i32, limit: Duration) -> Vec<i32> {
    let end = Instant::now() + limit;
    loop {
        let kids = children_of(ppid);
        if kids.is_empty() || Instant::now() >= end {
            return kids;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn process_exists(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}
