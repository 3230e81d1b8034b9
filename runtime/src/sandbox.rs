//! Task sandboxes: a private directory per task holding `stdout`, `stderr` (rotated by size)
//! and the task's files; safe reads that refuse any path outside the sandbox.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SandboxError {
    #[error("path {0:?} is outside the sandbox: use a relative path without '..'")]
    Outside(String),
    #[error("no file {0:?} in the sandbox")]
    NotFound(String),
    #[error("{0}")]
    Io(String),
}

/// Resolves `rel` inside `root`, refusing absolute paths, `..`, and symlinks that lead out.
pub fn resolve(root: &Path, rel: &str) -> Result<PathBuf, SandboxError> {
    let p = Path::new(rel);
    if rel.is_empty() || p.is_absolute() || rel.len() > 1024 {
        return Err(SandboxError::Outside(rel.to_string()));
    }
    if p.components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(SandboxError::Outside(rel.to_string()));
    }
    let root = root
        .canonicalize()
        .map_err(|e| SandboxError::Io(e.to_string()))?;
    let full = root.join(p);
    let real = full
        .canonicalize()
        .map_err(|_| SandboxError::NotFound(rel.to_string()))?;
    if !real.starts_with(&root) {
        return Err(SandboxError::Outside(rel.to_string()));
    }
    Ok(real)
}

/// Reads up to `length` bytes at `offset` of a sandbox file; returns the bytes and file size.
pub fn read_range(
    root: &Path,
    rel: &str,
    offset: u64,
    length: u64,
) -> Result<(Vec<u8>, u64), SandboxError> {
    let path = resolve(root, rel)?;
    let mut f = std::fs::File::open(&path).map_err(|e| SandboxError::Io(e.to_string()))?;
    let size = f
        .metadata()
        .map_err(|e| SandboxError::Io(e.to_string()))?
        .len();
    if !f.metadata().map(|m| m.is_file()).unwrap_or(false) {
        return Err(SandboxError::NotFound(rel.to_string()));
    }
    f.seek(SeekFrom::Start(offset.min(size)))
        .map_err(|e| SandboxError::Io(e.to_string()))?;
    let mut buf = Vec::new();
    f.take(length.min(16 << 20))
        .read_to_end(&mut buf)
        .map_err(|e| SandboxError::Io(e.to_string()))?;
    Ok((buf, size))
}

/// One entry of a sandbox listing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    pub path: String,
    pub size: u64,
    pub dir: bool,
}

/// Lists a sandbox directory (`rel` = "." for the top).
pub fn list(root: &Path, rel: &str) -> Result<Vec<Entry>, SandboxError> {
    let dir = resolve(root, rel)?;
    let rootc = root
        .canonicalize()
        .map_err(|e| SandboxError::Io(e.to_string()))?;
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).map_err(|e| SandboxError::Io(e.to_string()))? {
        let e = e.map_err(|e| SandboxError::Io(e.to_string()))?;
        let md = match e.path().symlink_metadata() {
            Ok(m) => m,
            Err(_) => continue,
        };
        let path = e
            .path()
            .strip_prefix(&rootc)
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        out.push(Entry {
            path,
            size: md.len(),
            dir: md.is_dir(),
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Disk used under `dir`, in bytes (like Mesos' `disk/du`); symlinks are not followed.
pub fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            if md.is_dir() {
                stack.push(e.path());
            } else {
                total += md.len();
            }
        }
    }
    total
}

/// A writer that keeps `path` below `max` bytes by renaming it to `path.1` when full.
pub struct RotatingFile {
    path: PathBuf,
    max: u64,
    file: std::fs::File,
    written: u64,
}

impl RotatingFile {
    pub fn open(path: &Path, max: u64) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let written = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            max: max.max(1024),
            file,
            written,
        })
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written + buf.len() as u64 > self.max && self.written > 0 {
            let mut rotated = self.path.clone().into_os_string();
            rotated.push(".1");
            std::fs::rename(&self.path, &rotated)?;
            self.file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.written = 0;
        }
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traversal_is_refused() {
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("sb");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("stdout"), "hello").unwrap();
        std::fs::write(outer.path().join("secret"), "no").unwrap();
        std::os::unix::fs::symlink(outer.path().join("secret"), root.join("link-out")).unwrap();
        std::os::unix::fs::symlink(root.join("stdout"), root.join("link-in")).unwrap();
        let r = |p: &str| match read_range(&root, p, 0, 100) {
            Ok((b, _)) => String::from_utf8(b).unwrap(),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(r("stdout"), "hello");
        assert_eq!(r("./stdout"), "hello");
        assert_eq!(r("link-in"), "hello");
        assert_eq!(
            r("../secret"),
            "error: path \"../secret\" is outside the sandbox: use a relative path without '..'"
        );
        assert_eq!(r("sub/../../secret"), "error: path \"sub/../../secret\" is outside the sandbox: use a relative path without '..'");
        assert!(r("/etc/passwd").starts_with("error: path \"/etc/passwd\" is outside"));
        assert!(r("link-out").starts_with("error: path \"link-out\" is outside"));
        assert_eq!(r("missing"), "error: no file \"missing\" in the sandbox");
        assert!(r("sub").starts_with("error:"));
        assert_eq!(
            read_range(&root, "stdout", 2, 2).unwrap(),
            (b"ll".to_vec(), 5)
        );
    }

    #[test]
    fn rotation_keeps_files_small() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("stdout");
        let mut f = RotatingFile::open(&p, 1024).unwrap();
        for _ in 0..30 {
            f.write_all(&[b'x'; 100]).unwrap();
        }
        assert!(std::fs::metadata(&p).unwrap().len() <= 1024);
        assert!(std::fs::metadata(d.path().join("stdout.1")).unwrap().len() <= 1024);
        assert!(disk_usage(d.path()) >= 2000);
    }
}
