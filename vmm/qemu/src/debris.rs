//! What a run leaves on disk if it is killed: run directories named with their owner
//! process (pid and start time), and the removal, at the next start, of those whose
//! owner is gone (and of RAM files older versions left in `/dev/shm`).

use std::fs;
use std::path::{Path, PathBuf};

/// Prefix of every run directory (`ornament-<pid>-<start>-<random>`).
pub const RUN_DIR_PREFIX: &str = "ornament-";
/// Prefix of the RAM files older versions kept in `/dev/shm` (`ornament-ram-<pid>-...`).
pub const LEGACY_RAM_PREFIX: &str = "ornament-ram-";

/// A process as named on disk: its pid and its start time (clock ticks after boot,
/// field 22 of `/proc/PID/stat`), which tells a live owner from a reused pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Process id.
    pub pid: u32,
    /// Start time in clock ticks after boot (0 when `/proc` could not say).
    pub start: u64,
}

impl Owner {
    /// This process.
    pub fn me() -> Self {
        let pid = std::process::id();
        Self {
            pid,
            start: start_time(pid).unwrap_or(0),
        }
    }

    /// The name prefix of a run directory of this owner (`ornament-<pid>-<start>-`).
    pub fn run_dir_prefix(&self) -> String {
        format!("{RUN_DIR_PREFIX}{}-{}-", self.pid, self.start)
    }

    /// The owner named by a run directory's name, if it is one of ours.
    pub fn from_run_dir_name(name: &str) -> Option<Self> {
        let rest = name.strip_prefix(RUN_DIR_PREFIX)?;
        let mut parts = rest.splitn(3, '-');
        let pid = parts.next()?.parse().ok()?;
        let start = parts.next()?.parse().ok()?;
        parts.next().filter(|r| !r.is_empty())?;
        Some(Self { pid, start })
    }

    /// Is this process still running? A pid that now belongs to a process started at
    /// another time is not. When `/proc` cannot tell, the owner counts as alive.
    pub fn is_alive(&self) -> bool {
        match fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            Ok(stat) => match parse_start_time(&stat) {
                Some(start) => self.start == 0 || start == self.start,
                None => true,
            },
            Err(e) => e.kind() != std::io::ErrorKind::NotFound,
        }
    }
}

/// Field 22 of `/proc/PID/stat`.
fn start_time(pid: u32) -> Option<u64> {
    parse_start_time(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The start time in a `/proc/PID/stat` line. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted after its last `)`.
fn parse_start_time(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name; field 22 is the 20th.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// The effective uid of this process (the owner of `/proc/self`).
fn my_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// Remove the run directories in `base` whose owner is gone and that belong to this
/// user. Returns what was removed. Directories of live processes, of other users, and
/// anything else in `base` are left alone.
pub fn sweep_run_dirs(base: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let Some(uid) = my_uid() else {
        return Vec::new();
    };
    let Ok(entries) = fs::read_dir(base) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        let Some(owner) = name.to_str().and_then(Owner::from_run_dir_name) else {
            continue;
        };
        // symlink_metadata: a link named like a run directory is not followed.
        let ours = fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir() && m.uid() == uid);
        if !ours || owner.is_alive() {
            continue;
        }
        match fs::remove_dir_all(&path) {
            Ok(()) => {
                tracing::info!(dir = %path.display(), pid = owner.pid, "removed the run directory of a dead ornament");
                removed.push(path);
            }
            Err(e) => {
                tracing::warn!(dir = %path.display(), error = %e, "cannot remove the run directory of a dead ornament")
            }
        }
    }
    removed
}

/// Remove `ornament-ram-<pid>-*` files in `shm` (older versions named the RAM file in
/// `/dev/shm`) whose pid no longer runs, if they belong to this user.
pub fn sweep_legacy_ram_files(shm: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let Some(uid) = my_uid() else {
        return Vec::new();
    };
    let Ok(entries) = fs::read_dir(shm) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(LEGACY_RAM_PREFIX))
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let path = e.path();
        let ours = fs::symlink_metadata(&path).is_ok_and(|m| m.is_file() && m.uid() == uid);
        // These names carry no start time: only a pid that runs nothing is dead.
        if !ours || (Owner { pid, start: 0 }).is_alive() {
            continue;
        }
        if fs::remove_file(&path).is_ok() {
            tracing::info!(file = %path.display(), pid, "removed the RAM file of a dead ornament");
            removed.push(path);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_start_time_skips_odd_command_names() {
        let stat =
            "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987_654));
        assert_eq!(parse_start_time("4242 (x) S 1"), None);
        assert_eq!(parse_start_time("no parenthesis"), None);
    }

    #[test]
    fn names_round_trip() {
        let me = Owner::me();
        assert_eq!(me.pid, std::process::id());
        assert_ne!(me.start, 0, "/proc/self/stat has a start time");
        assert!(me.is_alive());
        let name = format!("{}Ab3xYz", me.run_dir_prefix());
        assert_eq!(Owner::from_run_dir_name(&name), Some(me));
        assert_eq!(Owner::from_run_dir_name("ornament-abcdef"), None);
        assert_eq!(Owner::from_run_dir_name("ornament-12-34-"), None);
        assert_eq!(Owner::from_run_dir_name("other-12-34-x"), None);
        // The same pid started at another time is another process.
        let reused = Owner {
            pid: me.pid,
            start: me.start + 1,
        };
        assert!(!reused.is_alive());
    }

    #[test]
    fn only_dead_owners_directories_are_swept() {
        let base = tempfile::tempdir().expect("tmp");
        let mine = base
            .path()
            .join(format!("{}mine", Owner::me().run_dir_prefix()));
        fs::create_dir(&mine).expect("mkdir");
        // pid_max is at most 2^22: this pid runs nothing.
        let dead = Owner {
            pid: 4_194_305,
            start: 1,
        };
        let dead_dir = base.path().join(format!("{}old", dead.run_dir_prefix()));
        fs::create_dir(&dead_dir).expect("mkdir");
        fs::write(dead_dir.join("initramfs"), b"x").expect("write");
        let live_dir = base
            .path()
            .join(format!("{}live", Owner::me().run_dir_prefix()));
        fs::create_dir(&live_dir).expect("mkdir");
        let unrelated = base.path().join("ornament-abcdef");
        fs::create_dir(&unrelated).expect("mkdir");
        let dead_file = base.path().join(format!("{}file", dead.run_dir_prefix()));
        fs::write(&dead_file, b"not a directory").expect("write");
        assert_eq!(sweep_run_dirs(base.path()), vec![dead_dir.clone()]);
        assert!(!dead_dir.exists());
        assert!(mine.is_dir() && live_dir.is_dir() && unrelated.is_dir());
        assert!(dead_file.is_file());
    }

    #[test]
    fn legacy_ram_files_of_dead_pids_are_swept() {
        let shm = tempfile::tempdir().expect("tmp");
        let dead = shm
            .path()
            .join(format!("{LEGACY_RAM_PREFIX}4194305-ornament-x"));
        let live = shm.path().join(format!(
            "{LEGACY_RAM_PREFIX}{}-ornament-y",
            std::process::id()
        ));
        let other = shm.path().join("something-else");
        for f in [&dead, &live, &other] {
            fs::write(f, b"ram").expect("write");
        }
        assert_eq!(sweep_legacy_ram_files(shm.path()), vec![dead.clone()]);
        assert!(!dead.exists() && live.exists() && other.exists());
    }
}
