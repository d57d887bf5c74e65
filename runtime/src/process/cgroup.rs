//! `memory_limit`: each instance runs in a memory cgroup of its own, made
//! beside the daemon's (cgroups v2) or below it (v1, where the memory
//! controller has a hierarchy of its own), with the limit as `memory.max`
//! or `memory.limit_in_bytes`. The kernel kills a process that goes over
//! it; the restart policy then applies, and the daemon log says why it
//! died. A process joins its group between fork and exec, before it drops
//! privileges, so it never runs a line outside it.

use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Version {
    V1,
    V2,
}

/// An instance's cgroup; it is removed when dropped (once empty).
#[derive(Debug)]
pub struct Group {
    dir: PathBuf,
    version: Version,
    /// The group's OOM kills when its current process started.
    kills_before: u64,
}

impl Drop for Group {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

impl Group {
    /// The group named `name` (made if missing) with `limit` bytes, ready
    /// for a new process.
    pub fn prepare(name: &str, limit: u64) -> Result<Group, String> {
        let (base, version) = where_groups_go()?;
        let dir = base.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot make cgroup {}: {e}", dir.display())),
        }
        let mut group = Group {
            dir,
            version,
            kills_before: 0,
        };
        group.renew(limit)?;
        Ok(group)
    }

    /// Sets the limit again, for a new process of the instance.
    pub fn renew(&mut self, limit: u64) -> Result<(), String> {
        let file = match self.version {
            Version::V1 => "memory.limit_in_bytes",
            Version::V2 => "memory.max",
        };
        std::fs::write(self.dir.join(file), limit.to_string())
            .map_err(|e| format!("cannot set {}/{file}: {e}", self.dir.display()))?;
        self.kills_before = self.kills();
        Ok(())
    }

    /// The file a process writes `0` to, to join the group.
    pub fn procs(&self) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .write(true)
            .open(self.dir.join("cgroup.procs"))
    }

    /// Whether the kernel killed a process of the group for its memory
    /// since `prepare`.
    pub fn killed_for_memory(&self) -> bool {
        self.kills() > self.kills_before
    }

    fn kills(&self) -> u64 {
        let file = match self.version {
            Version::V1 => "memory.oom_control",
            Version::V2 => "memory.events",
        };
        std::fs::read_to_string(self.dir.join(file))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

/// Where instance groups are made: v2 (one hierarchy, `0::PATH` in
/// `/proc/self/cgroup`): beside the daemon's group, whose parent hands out
/// the memory controller (a group with processes cannot have children
/// that use it), or below the root, which may; v1: below the daemon's
/// group in the memory hierarchy.
fn where_groups_go() -> Result<(PathBuf, Version), String> {
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let v1 = own.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let controllers = fields.nth(1)?;
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then(|| fields.next())?
    });
    if let Some(path) = v1 {
        let dir = Path::new(ROOT)
            .join("memory")
            .join(path.trim_start_matches('/'));
        if dir.is_dir() {
            return Ok((dir, Version::V1));
        }
    }
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("no memory cgroup controller (neither cgroups v2 nor a v1 memory hierarchy)")?;
    let own_dir = Path::new(ROOT).join(path.trim_start_matches('/'));
    let controllers =
        |dir: &Path| std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    if !controllers(&own_dir)
        .split_whitespace()
        .any(|c| c == "memory")
    {
        return Err(format!(
            "the memory controller is not enabled for {}",
            own_dir.display()
        ));
    }
    if own_dir == Path::new(ROOT) {
        let control = own_dir.join("cgroup.subtree_control");
        std::fs::write(&control, "+memory")
            .map_err(|e| format!("cannot enable memory in {}: {e}", control.display()))?;
        return Ok((own_dir, Version::V2));
    }
    let parent = own_dir.parent().unwrap_or(Path::new(ROOT)).to_path_buf();
    Ok((parent, Version::V2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kills_are_read_from_either_version_s_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("memory.events"),
            "low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\n",
        )
        .unwrap();
        let group = |version| {
            std::mem::ManuallyDrop::new(Group {
                dir: dir.path().to_path_buf(),
                version,
                kills_before: 1,
            })
        };
        assert_eq!(group(Version::V1).kills(), 3);
        assert_eq!(group(Version::V2).kills(), 2);
        assert!(group(Version::V2).killed_for_memory());
    }
}
