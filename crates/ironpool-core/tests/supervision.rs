//! The supervisor against real worker processes (the fake zygote): results,
//! crashes and respawn, timeouts, protocol errors, recycling, retries,
//! start failures, large payloads and shutdown.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use ironpool_core::ipc::Kind;
use ironpool_core::ipc::payload::{self, DEFAULT_SEGMENT_THRESHOLD};
use ironpool_core::supervisor::Pool;
use ironpool_core::task::{Attempt, ExitStatus, KillReason, Outcome, Task};
use ironpool_core::zygote::Zygote;

fn crash_of(c: &ironpool_core::task::Completion) -> &ironpool_core::task::Crash {
    match &c.outcome {
        Outcome::Crashed(crash) => crash,
        other => panic!("task {} did not crash: {other:?}", c.task_id),
    }
}

fn total_restarts(pool: &Pool) -> u64 {
    pool.stats().iter().map(|s| s.restarts).sum()
}

#[test]
fn every_task_gets_its_own_result() {
    let z = zygote();
    let pool = start(&z, config(2));
    let n = 300u64;
    for id in 0..n {
        pool.submit(task(id, format!("echo {id}").as_bytes()));
    }
    let got = collect(&pool, n as usize);
    for id in 0..n {
        assert_eq!(returned(&got[&id]), format!("echo {id}").as_bytes());
    }
    let stats = pool.stats();
    assert_eq!(stats.len(), 2);
    assert_eq!(stats.iter().map(|s| s.tasks_done).sum::<u64>(), n);
    assert!(stats.iter().all(|s| s.pid > 0 && s.restarts == 0));
    assert!(shutdown(pool).is_empty());
    assert!(wait_no_children(z.pid(), Duration::from_secs(5)).is_empty());
}

#[test]
fn functions_are_sent_to_each_worker_once() {
    let z = zygote();
    let pool = start(&z, config(2));
    let body = payload::encode(Kind::Register, 7, 0, &[b"f7"], DEFAULT_SEGMENT_THRESHOLD)
        .expect("payload");
    pool.register_object(7, body);
    for id in 0..40 {
        pool.submit(task_fn(id, 7, b"fn"));
    }
    let got = collect(&pool, 40);
    for c in got.values() {
        assert_eq!(returned(c), b"f7#1");
    }
    shutdown(pool);
}

#[test]
fn an_object_released_while_tasks_need_it_is_forgotten_after_them() {
    let z = zygote();
    let pool = start(&z, config(1));
    let body = payload::encode(Kind::Register, 9, 0, &[b"obj9"], DEFAULT_SEGMENT_THRESHOLD)
        .expect("payload");
    pool.register_object(9, body);
    pool.submit(task_fn(1, 9, b"sleep:200"));
    pool.submit(task_fn(2, 9, b"fn")); // queued behind the first
    pool.unregister(9);
    let got = collect(&pool, 2);
    assert_eq!(
        returned(&got[&2]),
        b"obj9#1",
        "released before its queued task ran"
    );
    // Both are done: now it is forgotten here and in the worker.
    pool.submit(task_fn(3, 9, b"fn"));
    let got = collect(&pool, 1);
    assert_eq!(returned(&got[&3]), b"unregistered");
    shutdown(pool);
}

#[test]
fn wait_driving_delivers_results_to_the_calling_thread() {
    let z = zygote();
    let pool = start(&z, config(1));
    for id in 0..20u64 {
        let gen_ = pool.generation();
        pool.submit(task(id, b"ping"));
        let end = Instant::now() + DEADLINE;
        let mut mine = Vec::new();
        while mine.is_empty() {
            assert!(Instant::now() < end, "no result for {id}");
            let got = pool
                .wait_driving(
                    gen_,
                    Duration::from_millis(5),
                    Some(Duration::from_millis(200)),
                )
                .expect("pool running");
            mine.extend(got);
        }
        assert_eq!(mine.len(), 1);
        assert_eq!(mine[0].task_id, id);
        assert_eq!(returned(&mine[0]), b"ping");
    }
    shutdown(pool);
}

#[test]
fn logging_records_sent_before_a_crash_are_all_delivered_before_it() {
    let z = zygote();
    let pool = start(&z, config(1));
    let n = 2000;
    pool.submit(task(1, format!("log:{n}").as_bytes()));
    let mut logs = Vec::new();
    let crashed = loop {
        let batch = pool
            .wait_completions(Some(Duration::from_secs(20)))
            .expect("pool running");
        // Taken after the wait, as the binding does: every record the
        // worker sent before dying is here by the time its crash is.
        logs.extend(pool.take_logs());
        if let Some(c) = batch.into_iter().next() {
            break c;
        }
    };
    assert_eq!(crash_of(&crashed).status, Some(ExitStatus::Signal(11)));
    let mut texts: Vec<String> = logs
        .iter()
        .map(|m| String::from_utf8(parts(m).remove(0)).expect("utf-8"))
        .collect();
    assert_eq!(texts.len(), n);
    texts.sort_by_key(|t| t[7..].parse::<usize>().expect("a number"));
    assert_eq!(
        texts,
        (0..n).map(|i| format!("record {i}")).collect::<Vec<_>>()
    );
    shutdown(pool);
}

#[test]
fn raised_is_a_result_not_a_crash() {
    let z = zygote();
    let pool = start(&z, config(1));
    pool.submit(task(1, b"raise"));
    pool.submit(task(2, b"after"));
    let got = collect(&pool, 2);
    match &got[&1].outcome {
        Outcome::Raised(m) => assert_eq!(parts(m)[0], b"raised"),
        other => panic!("{other:?}"),
    }
    assert_eq!(returned(&got[&2]), b"after");
    assert_eq!(total_restarts(&pool), 0);
    shutdown(pool);
}

#[test]
fn a_crash_fails_only_its_task_and_the_worker_is_replaced() {
    let z = zygote();
    let pool = start(&z, config(2));
    // Wait for both workers, to compare pids afterwards.
    pool.submit(task(1000, b"warm"));
    collect(&pool, 1);
    let before: HashSet<i32> = pool.stats().iter().map(|s| s.pid).collect();
    let n = 60u64;
    for id in 0..n {
        let cmd = match id {
            10 => b"stderr:last words of worker".to_vec(),
            20 => b"exit:7".to_vec(),
            30 => b"abort".to_vec(),
            40 => b"crash".to_vec(),
            _ => format!("ok {id}").into_bytes(),
        };
        pool.submit(task(id, &cmd));
    }
    let got = collect(&pool, n as usize);
    let c10 = crash_of(&got[&10]);
    assert_eq!(c10.status, Some(ExitStatus::Signal(libc::SIGSEGV)));
    assert!(
        c10.stderr_tail.contains("last words of worker"),
        "stderr tail: {:?}",
        c10.stderr_tail
    );
    assert_eq!(c10.killed_by_pool, None);
    assert!(c10.protocol_error.is_none());
    assert!(c10.pid > 0);
    assert_eq!(crash_of(&got[&20]).status, Some(ExitStatus::Code(7)));
    assert_eq!(
        crash_of(&got[&30]).status,
        Some(ExitStatus::Signal(libc::SIGABRT))
    );
    assert_eq!(
        crash_of(&got[&40]).status,
        Some(ExitStatus::Signal(libc::SIGSEGV))
    );
    for id in (0..n).filter(|id| ![10, 20, 30, 40].contains(id)) {
        assert_eq!(returned(&got[&id]), format!("ok {id}").as_bytes());
    }
    assert_eq!(total_restarts(&pool), 4);
    // The pool is still whole: two workers, and the dead pids are gone.
    pool.submit(task(2000, b"still alive"));
    assert_eq!(returned(&collect(&pool, 1)[&2000]), b"still alive");
    let stats = pool.stats();
    assert_eq!(stats.len(), 2);
    let crashed: HashSet<i32> = [10, 20, 30, 40]
        .iter()
        .map(|id| crash_of(&got[id]).pid)
        .collect();
    assert_eq!(crashed.len(), 4, "each crash was a different process");
    for s in &stats {
        assert!(!crashed.contains(&s.pid));
    }
    assert!(stats.iter().any(|s| !before.contains(&s.pid)));
    assert!(
        stats
            .iter()
            .all(|s| !s.last_exit.is_empty() || s.restarts == 0)
    );
    shutdown(pool);
}

#[test]
fn tasks_queued_behind_a_crash_are_not_lost() {
    let z = zygote();
    let mut cfg = config(1);
    cfg.prefetch = 3;
    let pool = start(&z, cfg);
    pool.submit(task(0, b"sleep:50"));
    pool.submit(task(1, b"crash"));
    for id in 2..10 {
        pool.submit(task(id, b"fine"));
    }
    let got = collect(&pool, 10);
    crash_of(&got[&1]);
    assert_eq!(returned(&got[&0]), b"sleep:50");
    for id in 2..10 {
        assert_eq!(returned(&got[&id]), b"fine");
    }
    shutdown(pool);
}

#[test]
fn pool_timeout_kills_a_hung_task_in_bounded_time() {
    let z = zygote();
    let mut cfg = config(2);
    cfg.task_timeout = Some(Duration::from_millis(300));
    let pool = start(&z, cfg);
    let t0 = Instant::now();
    pool.submit(task(1, b"hang"));
    for id in 2..12 {
        pool.submit(task(id, b"quick"));
    }
    let got = collect(&pool, 11);
    match &got[&1].outcome {
        Outcome::TimedOut { limit, crash } => {
            assert_eq!(*limit, Duration::from_millis(300));
            assert_eq!(
                crash.killed_by_pool,
                Some(KillReason::Timeout {
                    limit: Duration::from_millis(300)
                })
            );
            assert_eq!(crash.status, Some(ExitStatus::Signal(libc::SIGKILL)));
        }
        other => panic!("{other:?}"),
    }
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(3), "timeout took {took:?}");
    for id in 2..12 {
        assert_eq!(returned(&got[&id]), b"quick");
    }
    assert!(pool.stats().iter().any(|s| s.last_exit.contains("timeout")));
    shutdown(pool);
}

#[test]
fn per_task_timeout_overrides_the_pool() {
    let z = zygote();
    let mut cfg = config(1);
    cfg.task_timeout = Some(Duration::from_secs(30));
    let pool = start(&z, cfg);
    let mut t = task(1, b"hang");
    t.timeout = Some(Duration::from_millis(200));
    let t0 = Instant::now();
    pool.submit(t);
    // Tasks under the pool's limit are unaffected.
    pool.submit(task(2, b"sleep:100"));
    let got = collect(&pool, 2);
    assert!(matches!(
        got[&1].outcome,
        Outcome::TimedOut { limit, .. } if limit == Duration::from_millis(200)
    ));
    assert_eq!(returned(&got[&2]), b"sleep:100");
    assert!(t0.elapsed() < Duration::from_secs(3));
    shutdown(pool);
}

#[test]
fn garbage_from_a_worker_kills_it_not_the_pool() {
    let z = zygote();
    let pool = start(&z, config(2));
    pool.submit(task(1, b"garbage"));
    pool.submit(task(2, b"wrongid"));
    for id in 3..20 {
        pool.submit(task(id, b"fine"));
    }
    let got = collect(&pool, 19);
    for id in [1, 2] {
        let c = crash_of(&got[&id]);
        assert_eq!(c.killed_by_pool, Some(KillReason::Protocol), "task {id}");
        assert!(c.protocol_error.is_some(), "task {id}");
        assert_eq!(c.status, Some(ExitStatus::Signal(libc::SIGKILL)));
    }
    assert!(
        crash_of(&got[&1])
            .protocol_error
            .as_deref()
            .is_some_and(|e| e.contains("frame") || e.contains("magic")),
        "{:?}",
        crash_of(&got[&1]).protocol_error
    );
    for id in 3..20 {
        assert_eq!(returned(&got[&id]), b"fine");
    }
    shutdown(pool);
}

#[test]
fn recycling_by_task_count_loses_and_duplicates_nothing() {
    let z = zygote();
    let mut cfg = config(2);
    cfg.max_tasks_per_worker = Some(3);
    cfg.prefetch = 2;
    let pool = start(&z, cfg);
    let n = 45u64;
    for id in 0..n {
        pool.submit(task(id, b"pid"));
    }
    let got = collect(&pool, n as usize);
    let mut per_pid: HashMap<String, usize> = HashMap::new();
    for c in got.values() {
        *per_pid
            .entry(String::from_utf8(returned(c)).expect("pid"))
            .or_default() += 1;
    }
    assert!(per_pid.values().all(|&k| k <= 3), "{per_pid:?}");
    assert!(per_pid.len() >= 15, "{per_pid:?}");
    assert!(
        pool.stats()
            .iter()
            .any(|s| s.last_exit.contains("recycled"))
    );
    shutdown(pool);
    assert!(wait_no_children(z.pid(), Duration::from_secs(5)).is_empty());
}

#[test]
fn recycling_by_memory_replaces_workers_and_leaves_none_idle() {
    let z = zygote();
    let mut cfg = config(1);
    cfg.max_memory = Some(1); // every worker is over it after a task
    cfg.hard_memory_factor = 1e12; // but never killed for it mid-task
    cfg.prefetch = 2;
    let pool = start(&z, cfg);
    let n = 12u64;
    for id in 0..n {
        pool.submit(task(id, b"pid"));
    }
    let got = collect(&pool, n as usize);
    let pids: HashSet<Vec<u8>> = got.values().map(returned).collect();
    assert!(pids.len() >= 4, "workers were recycled: {pids:?}");
    // Retired workers exit once their last task is done; none lingers.
    let end = Instant::now() + Duration::from_secs(5);
    while children_of(z.pid()).len() > 1 {
        assert!(
            Instant::now() < end,
            "idle retired workers left: {:?}",
            children_of(z.pid())
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(pool.stats().iter().any(|s| s.last_exit.contains("memory")));
    shutdown(pool);
}

#[test]
fn shutdown_right_after_start_still_runs_queued_work() {
    for workers in [1, 2] {
        let z = zygote();
        let pool = start(&z, config(workers));
        for id in 0..5 {
            pool.submit(task(id, b"queued"));
        }
        pool.shutdown();
        let got = drain_and_join(pool);
        assert_eq!(got.len(), 5, "{got:?}");
        assert!(got.iter().all(|c| returned(c) == b"queued"));
        assert!(wait_no_children(z.pid(), Duration::from_secs(5)).is_empty());
    }
}

#[test]
fn a_crash_during_shutdown_does_not_drop_queued_work() {
    let z = zygote();
    let pool = start(&z, config(1));
    pool.submit(task(100, b"warm"));
    collect(&pool, 1);
    pool.submit(task(0, b"crash"));
    let mut t = task(1, b"crash");
    t.retries_left = 1;
    pool.submit(t);
    for id in 2..6 {
        pool.submit(task(id, b"after the crash"));
    }
    pool.shutdown();
    let got = drain_and_join(pool);
    let by_id: HashMap<u64, _> = got.iter().map(|c| (c.task_id, c)).collect();
    assert_eq!(by_id.len(), 6, "{got:?}");
    assert!(wait_no_children(z.pid(), Duration::from_secs(5)).is_empty());
    crash_of(by_id[&0]);
    crash_of(by_id[&1]);
    for id in 2..6 {
        assert_eq!(returned(by_id[&id]), b"after the crash");
    }
}

#[test]
fn retries_rerun_a_crashed_task_on_a_fresh_worker() {
    let z = zygote();
    let pool = start(&z, config(1));
    let marker = std::env::temp_dir().join(format!("ironpool-retry-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let cmd = format!("crash_once:{}", marker.display());
    let mut t = task(1, cmd.as_bytes());
    t.retries_left = 1;
    pool.submit(t);
    let mut always = task(2, b"crash");
    always.retries_left = 2;
    pool.submit(always);
    let mut timed = task(3, b"hang");
    timed.retries_left = 1;
    timed.timeout = Some(Duration::from_millis(100));
    pool.submit(timed);
    let got = collect(&pool, 3);
    let _ = std::fs::remove_file(&marker);
    assert_eq!(returned(&got[&1]), cmd.as_bytes());
    assert_eq!(got[&1].attempts.len(), 1);
    assert!(matches!(got[&1].attempts[0], Attempt::Crashed(_)));
    crash_of(&got[&2]);
    assert_eq!(got[&2].attempts.len(), 2);
    assert!(matches!(got[&3].outcome, Outcome::TimedOut { .. }));
    assert_eq!(got[&3].attempts.len(), 1);
    assert!(matches!(got[&3].attempts[0], Attempt::TimedOut { .. }));
    shutdown(pool);
}

/// How many times a `script:` task ran (one byte per run).
fn runs(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

#[test]
fn retryable_raises_share_the_retry_budget_with_crashes_and_timeouts() {
    let z = zygote();
    let pool = start(&z, config(2));
    let dir = std::env::temp_dir();
    let log = |name: &str| {
        let p = dir.join(format!("ironpool-script-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    };
    let script = |id: u64, path: &std::path::Path, steps: &str, retries: u32| {
        let mut t = task(id, format!("script:{}:{steps}", path.display()).as_bytes());
        t.retries_left = retries;
        t.timeout = Some(Duration::from_millis(200));
        t
    };
    // Raised (retryable), crashed, timed out, then returned: one budget of 3.
    let mixed = log("mixed");
    pool.submit(script(1, &mixed, "rcho", 3));
    // A plain raise is final, whatever the budget.
    let plain = log("plain");
    pool.submit(script(2, &plain, "xo", 2));
    // A retryable raise once the budget is spent is the outcome.
    let spent = log("spent");
    pool.submit(script(3, &spent, "r", 1));
    let got = collect(&pool, 3);

    assert!(matches!(got[&1].outcome, Outcome::Returned(_)));
    assert_eq!(runs(&mixed), 4);
    let kinds: Vec<&str> = got[&1]
        .attempts
        .iter()
        .map(|a| match a {
            Attempt::Raised(m) => {
                assert_eq!(
                    parts(m)[0],
                    b"run 0",
                    "the raised attempt keeps its payload"
                );
                "raised"
            }
            Attempt::Crashed(_) => "crashed",
            Attempt::TimedOut { .. } => "timed out",
        })
        .collect();
    assert_eq!(kinds, ["raised", "crashed", "timed out"], "oldest first");

    match &got[&2].outcome {
        Outcome::Raised(m) => assert_eq!(parts(m)[0], b"final"),
        other => panic!("{other:?}"),
    }
    assert!(got[&2].attempts.is_empty());
    assert_eq!(runs(&plain), 1, "a plain raise is not re-run");

    match &got[&3].outcome {
        Outcome::Raised(m) => assert_eq!(parts(m)[0], b"run 1"),
        other => panic!("{other:?}"),
    }
    assert_eq!(got[&3].attempts.len(), 1);
    assert_eq!(runs(&spent), 2);
    for p in [mixed, plain, spent] {
        let _ = std::fs::remove_file(p);
    }
    shutdown(pool);
}

#[test]
fn retryable_raises_are_not_retried_once_shutting_down() {
    let z = zygote();
    let pool = start(&z, config(1));
    pool.submit(task(1, b"sleep:200"));
    let mut t = task(2, b"retryable");
    t.retries_left = 2;
    pool.submit(t);
    pool.shutdown();
    let got = drain_and_join(pool);
    let last = got
        .iter()
        .find(|c| c.task_id == 2)
        .expect("task 2 completed");
    assert!(matches!(last.outcome, Outcome::Raised(_)), "{last:?}");
    assert!(last.attempts.is_empty());
}

fn assert_start_failure_is_bounded(init_body: &[u8], expect_error: bool) {
    let name = String::from_utf8_lossy(init_body).into_owned();
    let (z, log) = zygote_with_fork_log(&name);
    let mut cfg = config(2);
    cfg.max_start_failures = 3;
    let pool = start_with_init(&z, cfg, init_body);
    for id in 0..5 {
        pool.submit(task(id, b"never runs"));
    }
    let got = collect(&pool, 5);
    for c in got.values() {
        match &c.outcome {
            Outcome::StartFailed { error, .. } => {
                assert_eq!(error.is_some(), expect_error, "{error:?}");
            }
            other => panic!("{other:?}"),
        }
    }
    // No endless respawn: the pool gave up, and later tasks fail at once.
    let end = Instant::now() + Duration::from_secs(5);
    while !children_of(z.pid()).is_empty() || !pool.stats().is_empty() {
        assert!(Instant::now() < end, "workers still there");
        std::thread::sleep(Duration::from_millis(5));
    }
    for _ in 0..30 {
        assert!(
            children_of(z.pid()).is_empty(),
            "a worker was started again"
        );
        assert!(pool.stats().is_empty());
        std::thread::sleep(Duration::from_millis(10));
    }
    pool.submit(task(99, b"late"));
    assert!(matches!(
        collect(&pool, 1)[&99].outcome,
        Outcome::StartFailed { .. }
    ));
    shutdown(pool);
    // Every failed start counts: at most the limit, plus the other slot's
    // worker that was already starting when the pool gave up.
    let made = forks(&log);
    let _ = std::fs::remove_file(&log);
    assert!((3..=4).contains(&made), "{made} workers forked");
}

#[test]
fn init_failure_ends_in_start_failed_not_endless_respawn() {
    assert_start_failure_is_bounded(b"fail", true);
}

#[test]
fn worker_dying_during_init_ends_in_start_failed() {
    assert_start_failure_is_bounded(b"exit", false);
    assert_start_failure_is_bounded(b"crash", false);
}

#[test]
fn large_payloads_travel_through_segments_both_ways() {
    let z = zygote();
    let pool = start(&z, config(2));
    let n = 3_000_000usize;
    pool.submit(task(1, format!("big:{n}").as_bytes()));
    let input: Vec<u8> = (0..1_500_000u32).map(|i| (i % 253) as u8).collect();
    let msg = payload::encode(
        Kind::Task,
        2,
        0,
        &[b"echo", &input, b"tail"],
        DEFAULT_SEGMENT_THRESHOLD,
    )
    .expect("payload");
    assert_eq!(msg.fds.len(), 1, "the big part goes to a segment");
    pool.submit(Task::new(2, 0, msg));
    let got = collect(&pool, 2);
    match &got[&1].outcome {
        Outcome::Returned(m) => {
            assert_eq!(m.fds.len(), 1, "result came in a segment");
            let p = parts(m);
            assert_eq!(p[0], b"big");
            assert_eq!(p[1].len(), n);
            assert!(p[1].iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        }
        other => panic!("{other:?}"),
    }
    match &got[&2].outcome {
        Outcome::Returned(m) => {
            let p = parts(m);
            assert_eq!(p.len(), 3);
            assert_eq!(p[0], b"echo");
            assert!(p[1] == input, "segment bytes round-trip");
            assert_eq!(p[2], b"tail");
        }
        other => panic!("{other:?}"),
    }
    drop(got);
    shutdown(pool);
}

#[test]
fn worker_output_reaches_the_tail_not_the_protocol() {
    let z = zygote();
    let pool = start(&z, config(1));
    pool.submit(task(1, b"stdout:hello from a worker"));
    pool.submit(task(2, b"stderr:then it died"));
    let got = collect(&pool, 2);
    assert_eq!(returned(&got[&1]), b"stdout:hello from a worker");
    assert!(crash_of(&got[&2]).stderr_tail.contains("then it died"));
    shutdown(pool);
}

#[test]
fn shutdown_finishes_queued_work_then_stops_every_worker() {
    let z = zygote();
    let pool = start(&z, config(2));
    for id in 0..20 {
        pool.submit(task(id, b"sleep:5"));
    }
    pool.shutdown();
    let got = drain_and_join(pool);
    let ids: HashSet<u64> = got.iter().map(|c| c.task_id).collect();
    assert_eq!(ids.len(), 20);
    assert_eq!(got.len(), 20);
    assert!(
        got.iter()
            .all(|c| matches!(c.outcome, Outcome::Returned(_)))
    );
    assert!(wait_no_children(z.pid(), Duration::from_secs(5)).is_empty());
    assert!(z.is_alive(), "the zygote outlives its pools");
}

#[test]
fn terminate_kills_running_tasks_and_drops_queued_ones() {
    let z = zygote();
    let pool = start(&z, config(2));
    pool.submit(task(100, b"warm"));
    collect(&pool, 1);
    // A function with no measured time is never queued behind a running task,
    // so each hang waits for a worker of its own, however late the second
    // worker comes up.
    for id in 0..2 {
        pool.submit(task_fn(id, 7, b"hang"));
    }
    // Let both hang for a moment, then queue more behind them.
    std::thread::sleep(Duration::from_millis(100));
    for id in 2..6 {
        pool.submit(task_fn(id, 7, b"queued"));
    }
    let t0 = Instant::now();
    pool.terminate();
    let got = drain_and_join(pool);
    assert!(t0.elapsed() < Duration::from_secs(5));
    // Only tasks that were running end (killed by the pool); the rest are
    // dropped. Which ran depends on how fast the second worker came up.
    assert!(got.iter().any(|c| c.task_id == 0), "{got:?}");
    assert!(got.len() <= 2, "{got:?}");
    for c in &got {
        assert_eq!(crash_of(c).killed_by_pool, Some(KillReason::Shutdown));
    }
    assert!(wait_no_children(z.pid(), Duration::from_secs(5)).is_empty());
}

#[test]
fn terminate_does_not_run_work_a_killed_worker_had_queued() {
    let z = zygote();
    let mut cfg = config(1);
    cfg.prefetch = 2;
    let pool = start(&z, cfg);
    pool.submit(task(100, b"warm"));
    collect(&pool, 1);
    // One running, two sent ahead of time: all hang if ever run.
    for id in 0..3 {
        pool.submit(task(id, b"hang"));
    }
    std::thread::sleep(Duration::from_millis(50));
    pool.terminate();
    let got = drain_and_join(pool);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(crash_of(&got[0]).killed_by_pool, Some(KillReason::Shutdown));
    assert!(wait_no_children(z.pid(), Duration::from_secs(5)).is_empty());
}

#[test]
fn cancelled_tasks_never_run() {
    let z = zygote();
    // Without prefetch, so that everything behind the sleep stays queued
    // here (a warm, tiny function would otherwise queue deep in the worker).
    let mut cfg = config(1);
    cfg.prefetch = 0;
    let pool = start(&z, cfg);
    pool.submit(task(100, b"warm"));
    collect(&pool, 1);
    pool.submit(task(0, b"sleep:200"));
    for id in 1..10 {
        pool.submit(task(id, b"later"));
    }
    pool.cancel(5);
    let dropped = pool.cancel_pending();
    assert!(!dropped.contains(&0));
    let got = collect(
        &pool,
        10 - dropped.len() - usize::from(!dropped.contains(&5)),
    );
    assert!(!got.contains_key(&5));
    for id in &dropped {
        assert!(!got.contains_key(id));
    }
    shutdown(pool);
}

/// Starts a pool, kills its template while task 2 hangs on a worker, and
/// checks that task 2 fails as a crash.
fn kill_template_under_a_running_task(z: &Zygote) -> TestPool {
    let pool = start(z, config(2));
    pool.submit(task(1, b"warm"));
    collect(&pool, 1);
    pool.submit(task(2, b"hang"));
    wait_dispatched(&pool, 2);
    z.kill();
    crash_of(&collect(&pool, 1)[&2]);
    pool
}

#[test]
fn a_dead_zygote_is_started_again_and_the_pool_carries_on() {
    let z = zygote();
    let first = z.pid();
    // Only the running task fails, as a crash; later work runs.
    let pool = kill_template_under_a_running_task(&z);
    pool.submit(task(3, b"after"));
    assert_eq!(returned(&collect(&pool, 1)[&3]), b"after");
    assert!(z.is_alive() && z.pid() != first, "a new template runs");
    shutdown(pool);
}

#[test]
fn a_dead_zygote_that_cannot_start_again_fails_work_instead_of_hanging() {
    let once = std::env::temp_dir().join(format!("ironpool-once-{}", std::process::id()));
    let _ = std::fs::remove_file(&once);
    let mut cmd = std::process::Command::new(FAKE);
    cmd.env("FAKE_ZYGOTE_ONCE", &once);
    let z = Zygote::spawn(cmd).expect("fake zygote starts");
    let pool = kill_template_under_a_running_task(&z);
    pool.submit(task(3, b"after"));
    match &collect(&pool, 1)[&3].outcome {
        Outcome::StartFailed { crash, .. } => {
            let why = crash.protocol_error.clone().unwrap_or_default();
            assert!(why.contains("started twice"), "{why}");
        }
        other => panic!("expected StartFailed, got {other:?}"),
    }
    shutdown(pool);
    let _ = std::fs::remove_file(&once);
}

#[test]
fn arbitrary_datagrams_from_workers_never_break_the_pool() {
    // A small seeded fuzz run end to end: each task makes its worker send
    // one arbitrary datagram (random bytes, or a mutated valid frame). The
    // task must end exactly once, in bounded time, and the pool keep working.
    let z = zygote();
    let pool = start(&z, config(2));
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let n = 40u64;
    for id in 0..n {
        let mut bytes = match id % 4 {
            0 => (0..next() % 64).map(|_| next() as u8).collect::<Vec<u8>>(),
            _ => {
                let kind =
                    [Kind::Returned, Kind::Raised, Kind::Ready, Kind::Forked][id as usize % 4];
                let m = payload::encode(kind, id, 0, &[b"x"], DEFAULT_SEGMENT_THRESHOLD)
                    .expect("payload");
                let mut w = m.header().to_vec();
                w.extend_from_slice(&m.body);
                for _ in 0..next() % 3 {
                    let at = (next() as usize) % w.len();
                    w[at] = next() as u8;
                }
                w.truncate(1 + (next() as usize) % w.len());
                w
            }
        };
        if bytes.is_empty() {
            // An empty datagram reads as EOF; covered elsewhere, and it costs
            // the exit grace period.
            bytes.push(0);
        }
        let mut cmd = b"raw:".to_vec();
        cmd.extend_from_slice(&bytes);
        let mut t = task(id, &cmd);
        // A datagram that happened to be harmless leaves the task running.
        t.timeout = Some(Duration::from_millis(500));
        pool.submit(t);
    }
    let got = collect_within(&pool, n as usize, Duration::from_secs(30));
    assert_eq!(got.len(), n as usize);
    pool.submit(task(1000, b"still fine"));
    assert_eq!(returned(&collect(&pool, 1)[&1000]), b"still fine");
    shutdown(pool);
}

#[test]
fn tasks_that_share_a_frame_keep_their_own_outcomes_and_limits() {
    shared_frames_keep_outcomes(0);
}

/// Batches of map chunks mute the worker's channel until it rings; the
/// fake worker never rings, so these results are read by the quiet poll.
#[test]
fn a_muted_channel_whose_worker_never_rings_is_still_read() {
    let z = zygote();
    let pool = start(&z, config(1));
    pool.submit_many((1000..1020).map(|id| task(id, b"warm")).collect());
    collect(&pool, 20);
    let chunk = |id: u64| {
        let mut t = task(id, format!("ok {id}").as_bytes());
        t.payload.flags = ironpool_core::ipc::MAP_CHUNK;
        t
    };
    pool.submit_many((0..200).map(chunk).collect());
    let got = collect_within(&pool, 200, Duration::from_secs(10));
    for id in 0..200 {
        assert_eq!(returned(&got[&id]), format!("ok {id}").as_bytes());
    }
    shutdown(pool);
    // With limits, crashes and hangs among them, every outcome is its own.
    shared_frames_keep_outcomes(ironpool_core::ipc::MAP_CHUNK);
}

fn shared_frames_keep_outcomes(flags: u8) {
    let z = zygote();
    let pool = start(&z, config(1));
    // Known to be tiny: what follows queues deep, topped up in batch frames.
    pool.submit_many((1000..1020).map(|id| task(id, b"warm")).collect());
    collect(&pool, 20);
    let n = 80u64;
    let tasks = (0..n)
        .map(|id| {
            let mut t = match id {
                17 => task(id, b"crash"),
                50 => task(id, b"hang"),
                _ => task(id, format!("ok {id}").as_bytes()),
            };
            t.timeout = Some(Duration::from_millis(300));
            t.payload.flags = flags;
            t
        })
        .collect();
    pool.submit_many(tasks);
    let got = collect(&pool, n as usize);
    assert_eq!(
        crash_of(&got[&17]).status,
        Some(ExitStatus::Signal(libc::SIGSEGV))
    );
    assert!(
        matches!(got[&50].outcome, Outcome::TimedOut { .. }),
        "{:?}",
        got[&50].outcome
    );
    for id in (0..n).filter(|id| ![17, 50].contains(id)) {
        assert_eq!(
            returned(&got[&id]),
            format!("ok {id}").as_bytes(),
            "task {id}"
        );
    }
    shutdown(pool);
}
