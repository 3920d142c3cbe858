//! Whether the kernel's out-of-memory killer ended a process: the OOM kill
//! counter of its memory cgroup (cgroup v2 `memory.events`, v1
//! `memory.oom_control`), where the kernel keeps one. The kernel counts a
//! kill there before it sends the SIGKILL, so the count is up to date by
//! the time anyone sees the death.

use std::fs;
use std::path::{Path, PathBuf};

/// The signal the OOM killer sends.
pub const OOM_KILL_SIGNAL: i32 = rustix::process::Signal::KILL.as_raw();

/// The OOM kill counter of one memory cgroup. It counts kills of any
/// process in that cgroup (in v2, and below it), not of one process.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OomCounter {
    file: PathBuf,
}

impl OomCounter {
    /// The counter of the memory cgroup `pid` is in, if the kernel keeps
    /// one for it: None without a memory controller, or in the root cgroup
    /// of a v2-only system (it has no `memory.events`).
    pub fn of(pid: i32) -> Option<Self> {
        let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
        counter_file(&cgroups, &mounts, Path::exists).map(|file| Self { file })
    }

    /// Kills counted so far, or None if the file cannot be read any more
    /// (the cgroup was removed).
    pub fn kills(&self) -> Option<u64> {
        oom_kills(&fs::read_to_string(&self.file).ok()?)
    }

    pub fn file(&self) -> &Path {
        &self.file
    }
}

/// Which file counts the kills of the cgroup in `cgroups` (a
/// `/proc/PID/cgroup`), given the mounts in `mountinfo`: v2's
/// `memory.events` if it `exists`, else v1's `memory.oom_control`.
fn counter_file(cgroups: &str, mountinfo: &str, exists: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    let mut v2 = None;
    let mut v1 = None;
    for line in cgroups.lines() {
        // hierarchy-id:controllers:path
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if controllers.is_empty() {
            v2 = mount_dir(mountinfo, "cgroup2", None, path).map(|d| d.join("memory.events"));
        } else if controllers.split(',').any(|c| c == "memory") {
            v1 = mount_dir(mountinfo, "cgroup", Some("memory"), path)
                .map(|d| d.join("memory.oom_control"));
        }
    }
    [v2, v1].into_iter().flatten().find(|f| exists(f))
}

/// Where cgroup `path` of a hierarchy of `fstype` (with controller
/// `option`, for v1) is mounted.
fn mount_dir(mountinfo: &str, fstype: &str, option: Option<&str>, path: &str) -> Option<PathBuf> {
    for line in mountinfo.lines() {
        // id parent major:minor root mount-point options [optional...] - fstype source super-options
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut after = right.split(' ');
        if after.next() != Some(fstype) {
            continue;
        }
        let super_options = after.nth(1).unwrap_or("");
        if option.is_some_and(|o| !super_options.split(',').any(|s| s == o)) {
            continue;
        }
        let mut before = left.split(' ');
        let (Some(root), Some(point)) = (before.nth(3), before.next()) else {
            continue;
        };
        // The mount shows the hierarchy from `root` down; a cgroup outside
        // it is not visible here.
        let rel = if root == "/" {
            Some(path)
        } else {
            path.strip_prefix(root)
                .filter(|r| r.is_empty() || r.starts_with('/'))
        };
        if let Some(rel) = rel {
            return Some(PathBuf::from(unescape(point)).join(rel.trim_start_matches('/')));
        }
    }
    None
}

/// mountinfo writes spaces, tabs, newlines and backslashes as `\ooo`.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The `oom_kill N` line of `memory.events` or `memory.oom_control`.
fn oom_kills(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_v1_memory_when_v2_has_no_memory_events() {
        let cgroups = "4:memory:/box/7\n1:cpu:/\n0::/\n";
        let file = counter_file(cgroups, HYBRID, |p| p.ends_with("memory.oom_control"));
        assert_eq!(
            file,
            Some(PathBuf::from(
                "/sys/fs/cgroup/memory/box/7/memory.oom_control"
            ))
        );
    }

    #[test]
    fn prefers_v2_and_follows_a_mount_root() {
        let mounts = "29 23 0:26 /user.slice /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let cgroups = "0::/user.slice/app.scope\n";
        assert_eq!(
            counter_file(cgroups, mounts, |_| true),
            Some(PathBuf::from("/sys/fs/cgroup/app.scope/memory.events"))
        );
        assert_eq!(counter_file("0::/other\n", mounts, |_| true), None);
        assert_eq!(counter_file(cgroups, mounts, |_| false), None);
        assert_eq!(counter_file("", mounts, |_| true), None);
    }

    #[test]
    fn mount_points_are_unescaped() {
        let mounts = "1 0 0:1 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            counter_file("0::/a\n", mounts, |_| true),
            Some(PathBuf::from("/mnt/my cgroups/a/memory.events"))
        );
    }

    #[test]
    fn reads_the_kill_count_of_either_format() {
        let v2 = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n";
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n";
        assert_eq!(oom_kills(v2), Some(2));
        assert_eq!(oom_kills(v1), Some(5));
        assert_eq!(oom_kills("oom 1\n"), None);
    }

    #[test]
    fn the_real_counter_of_this_process() {
        let ours = fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
        let v1_memory = ours.lines().any(|l| {
            l.split(':')
                .nth(1)
                .is_some_and(|c| c.split(',').any(|c| c == "memory"))
        });
        let counter = OomCounter::of(std::process::id() as i32);
        if v1_memory {
            assert!(
                counter.is_some(),
                "a v1 memory cgroup always has memory.oom_control"
            );
        }
        if let Some(counter) = counter {
            let kills = counter.kills().expect("a readable oom_kill count");
            assert!(counter.kills().expect("still readable") >= kills);
            let name = counter.file().file_name().and_then(|n| n.to_str());
            assert!(matches!(name, Some("memory.events" | "memory.oom_control")));
        }
    }
}
