//! Persistent volumes on an agent. Each volume's data lives in `<data dir>/volumes/<id>/`,
//! outside every sandbox, so it survives the task's exit, its restarts, an agent restart and
//! sandbox garbage collection. A launch bind-mounts it at its path in the sandbox (native and
//! OCI, inside the task's own mount namespace) or preopens it there (Wasm).
//!
//! Size: the agent measures each mounted volume with the sandbox walk (`disk_usage`,
//! apparent file sizes, never following links) every `DISK_EVERY` monitor ticks (1 s) and
//! kills the task with reason `volume_limit` once it holds more than `size_mb`. A task can
//! so overshoot its quota by what it writes within about a second.
//!
//! Only the masters destroy volumes: the agent polls which of its volumes are being
//! destroyed (`volume_loop`), deletes their data once no task of its own mounts them, and
//! reports them; volumes the cluster does not know are left alone (logged), never guessed at.

use crate::sandbox;
use cairn_kernel::model::{TaskFile, TaskVolume};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// A volume id is a directory name: `<service>.<pod>.<volume>.<incarnation>`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 200
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The agent's volumes directory.
#[derive(Clone, Debug)]
pub struct VolumeStore {
    root: PathBuf,
}

impl VolumeStore {
    /// Opens (creating, readable by root only) `<data_dir>/volumes`.
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let root = data_dir.join("volumes");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)?;
        Ok(Self { root })
    }

    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// The volume's directory, created empty on first use and kept as it is after.
    pub fn prepare(&self, v: &TaskVolume) -> std::io::Result<PathBuf> {
        if !valid_id(&v.id) {
            return Err(std::io::Error::other(format!("bad volume id {:?}", v.id)));
        }
        let dir = self.dir(&v.id);
        match std::fs::DirBuilder::new().mode(0o755).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        Ok(dir)
    }

    /// Bytes held by the volume.
    pub fn usage(&self, id: &str) -> u64 {
        sandbox::disk_usage(&self.dir(id))
    }

    /// Ids of the volumes on this agent.
    pub fn list(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| valid_id(n))
            .collect();
        ids.sort();
        ids
    }

    /// Deletes a volume's data (links inside are removed, never followed).
    pub fn destroy(&self, id: &str) -> std::io::Result<()> {
        if !valid_id(id) {
            return Err(std::io::Error::other(format!("bad volume id {id:?}")));
        }
        match std::fs::remove_dir_all(self.dir(id)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
}

/// Where a config file lands: in the volume whose path holds it, else in the sandbox.
fn file_target<'a>(
    sandbox: &'a Path,
    mounts: &'a [(TaskVolume, PathBuf)],
    path: &'a str,
) -> (&'a Path, &'a str) {
    for (v, dir) in mounts {
        if let Some(rest) = path
            .strip_prefix(v.path.as_str())
            .and_then(|r| r.strip_prefix('/'))
        {
            return (dir, rest);
        }
    }
    (sandbox, path)
}

/// Makes the mount points of `mounts` in a fresh sandbox and writes `files` (into the
/// sandbox, or into a volume's directory for a path inside the volume), through no symlink:
/// a volume's contents are the task's, so a planted link fails the launch instead of
/// redirecting the agent's write.
pub fn prepare_sandbox(
    sandbox: &Path,
    mounts: &[(TaskVolume, PathBuf)],
    files: &[TaskFile],
) -> Result<(), String> {
    let root = sandbox::open_dir(sandbox).map_err(|e| format!("sandbox: {e}"))?;
    for (v, _) in mounts {
        sandbox::mkdirs_beneath(&root, Path::new(&v.path))
            .map_err(|e| format!("mount point {:?} of volume {}: {e}", v.path, v.id))?;
    }
    for f in files {
        let (dir, rel) = file_target(sandbox, mounts, &f.path);
        sandbox::write_beneath(dir, Path::new(rel), f.content.as_bytes())
            .map_err(|e| format!("writing config file {:?}: {e}", f.path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(id: &str, path: &str) -> TaskVolume {
        TaskVolume {
            id: id.into(),
            path: path.into(),
            size_mb: 1,
        }
    }

    #[test]
    fn files_land_in_the_volume_that_holds_their_path() {
        let d = tempfile::tempdir().unwrap();
        let store = VolumeStore::open(d.path()).unwrap();
        let sb = d.path().join("sb");
        std::fs::create_dir(&sb).unwrap();
        let v = vol("db.node-0.data.0", "data");
        let dir = store.prepare(&v).unwrap();
        std::fs::write(dir.join("kept"), "old").unwrap();
        let files = [
            TaskFile {
                path: "data/conf/db.conf".into(),
                content: "in volume".into(),
            },
            TaskFile {
                path: "etc/app.conf".into(),
                content: "in sandbox".into(),
            },
        ];
        prepare_sandbox(&sb, &[(v.clone(), dir.clone())], &files).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("conf/db.conf")).unwrap(),
            "in volume"
        );
        assert_eq!(
            std::fs::read_to_string(sb.join("etc/app.conf")).unwrap(),
            "in sandbox"
        );
        assert!(sb.join("data").is_dir(), "mount point made");
        // Prepared again (a restart): the data stays.
        assert_eq!(store.prepare(&v).unwrap(), dir);
        assert_eq!(std::fs::read_to_string(dir.join("kept")).unwrap(), "old");
        assert_eq!(store.list(), vec!["db.node-0.data.0".to_string()]);
        assert!(store.usage(&v.id) >= 3 + 9);
        store.destroy(&v.id).unwrap();
        assert!(!dir.exists());
        store.destroy(&v.id).unwrap();
    }

    #[test]
    fn a_planted_link_in_a_volume_fails_the_write() {
        let d = tempfile::tempdir().unwrap();
        let store = VolumeStore::open(d.path()).unwrap();
        let sb = d.path().join("sb");
        std::fs::create_dir(&sb).unwrap();
        let v = vol("db.node-0.data.0", "data");
        let dir = store.prepare(&v).unwrap();
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("conf")).unwrap();
        let files = [TaskFile {
            path: "data/conf/x".into(),
            content: "x".into(),
        }];
        let e = prepare_sandbox(&sb, &[(v, dir)], &files).unwrap_err();
        assert!(e.contains("data/conf/x"), "{e}");
        assert!(!outside.join("x").exists());
    }

    #[test]
    fn ids_are_plain_names() {
        for ok in ["db.node-0.data.0", "a"] {
            assert!(valid_id(ok), "{ok}");
        }
        for bad in ["", ".", "..", "../x", "a/b", ".hidden", &"x".repeat(201)] {
            assert!(!valid_id(bad), "{bad}");
        }
    }
}
