//! What this process may use and what a process uses: CPUs (affinity, cgroup
//! v2 `cpu.max`), descriptors (RLIMIT_NOFILE), private resident memory
//! (`/proc/<pid>/statm`).

use std::fs;

use super::pages::page_size;

/// Workers to start by default: the CPUs this process may run on, further
/// capped by a cgroup v2 `cpu.max` quota (containers with `--cpus`).
pub fn default_workers() -> usize {
    let affinity = rustix::thread::sched_getaffinity(None)
        .map(|set| set.count() as usize)
        .unwrap_or(0);
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpus = if affinity > 0 { affinity } else { online };
    let quota = cgroup_cpu_quota().unwrap_or(usize::MAX);
    cpus.min(quota).max(1)
}

/// Whether every CPU this process may use is taken by another runnable
/// thread of the machine right now (`/proc/loadavg`'s instantaneous count,
/// which includes the caller itself). False if it cannot be read.
pub fn cpus_all_busy() -> bool {
    let Ok(text) = fs::read_to_string("/proc/loadavg") else {
        return false;
    };
    runnable_in_loadavg(&text).is_some_and(|running| running > default_workers())
}

/// The `running` of `running/total`, the fourth field of `/proc/loadavg`.
fn runnable_in_loadavg(text: &str) -> Option<usize> {
    let field = text.split_whitespace().nth(3)?;
    field.split('/').next()?.parse().ok()
}

/// `ceil(quota / period)` from this process's cgroup v2 `cpu.max`, if limited.
fn cgroup_cpu_quota() -> Option<usize> {
    let cgroup = fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    // Walk from our cgroup up to the root: the tightest limit wins.
    let mut best: Option<usize> = None;
    let mut path = std::path::PathBuf::from(format!("/sys/fs/cgroup{rel}"));
    loop {
        if let Ok(text) = fs::read_to_string(path.join("cpu.max")) {
            if let Some(n) = parse_cpu_max(&text) {
                best = Some(best.map_or(n, |b| b.min(n)));
            }
        }
        if !path.pop() || !path.starts_with("/sys/fs/cgroup") {
            break;
        }
    }
    best
}

/// Parses `"<quota> <period>"`; `"max ..."` means unlimited.
fn parse_cpu_max(text: &str) -> Option<usize> {
    let mut parts = text.split_whitespace();
    let quota: f64 = parts.next()?.parse().ok()?;
    let period: f64 = parts.next()?.parse().ok()?;
    if quota <= 0.0 || period <= 0.0 {
        return None;
    }
    Some(((quota / period).ceil() as usize).max(1))
}

/// Descriptors this process may have open at once (the soft limit);
/// `u64::MAX` if unlimited.
pub fn open_files_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
}

/// Private resident memory of `pid` in bytes (resident minus file-backed and
/// shared pages, so mapped input segments do not count), from
/// `/proc/<pid>/statm`: one short read, cheap enough to do after every task.
pub fn resident_bytes(pid: i32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let mut fields = text.split_whitespace().skip(1);
    let resident: u64 = fields.next()?.parse().ok()?;
    let shared: u64 = fields.next()?.parse().ok()?;
    Some(resident.saturating_sub(shared) * page_size() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::current_pid;

    #[test]
    fn cpu_max_parsing() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(2));
        assert_eq!(parse_cpu_max("50000 100000"), Some(1));
        assert_eq!(parse_cpu_max("garbage"), None);
    }

    #[test]
    fn loadavg_parsing() {
        assert_eq!(runnable_in_loadavg("0.52 0.58 0.59 3/467 12345\n"), Some(3));
        assert_eq!(runnable_in_loadavg("0.52 0.58"), None);
        assert_eq!(runnable_in_loadavg("a b c x/y z"), None);
    }

    #[test]
    fn cpus_are_all_busy_while_a_thread_spins_on_each() {
        // One spinning thread more than there are CPUs (the test's own
        // thread reads the count while runnable too).
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spinners: Vec<_> = (0..default_workers() + 1)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        let busy = (0..100).any(|_| cpus_all_busy());
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for s in spinners {
            let _ = s.join();
        }
        assert!(busy);
    }

    #[test]
    fn default_workers_is_positive_and_bounded() {
        let n = default_workers();
        assert!(n >= 1);
        assert!(n <= std::thread::available_parallelism().map_or(1, |n| n.get()));
    }

    #[test]
    fn own_rss_is_readable() {
        assert!(resident_bytes(current_pid()).unwrap() > 0);
    }

    #[test]
    fn open_files_limit_is_positive() {
        assert!(open_files_limit() > 0);
    }
}
