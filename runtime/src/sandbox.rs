//! Task sandboxes: a private directory per task holding `stdout`, `stderr` (rotated by size)
//! and the task's files. Every host-side open inside a sandbox goes through a directory file
//! descriptor with `openat2(RESOLVE_BENEATH)` (and `RESOLVE_NO_SYMLINKS` where the agent or
//! the supervisor writes), so nothing a task puts there (a symlink, a FIFO, a device node)
//! leads a privileged open out of it or blocks it.

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SandboxError {
    #[error("path {0:?} is outside the sandbox: use a relative path without '..'")]
    Outside(String),
    #[error("no file {0:?} in the sandbox")]
    NotFound(String),
    #[error("{0:?} is not a regular file")]
    NotRegular(String),
    #[error("{0}")]
    Io(String),
}

/// Opens the directory `dir` (a path the agent made, not one a task controls).
pub fn open_dir(dir: &Path) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens `rel` beneath the directory `dir`, never outside it: `..` and absolute symlinks
/// that would leave it fail (`EXDEV`), and with `no_symlinks` any symlink on the way fails
/// (`ELOOP`). On kernels without `openat2` (before 5.6) each component is opened with
/// `O_NOFOLLOW` instead, which refuses every symlink.
pub fn open_beneath(
    dir: impl AsFd,
    rel: &Path,
    flags: OFlags,
    mode: u32,
    no_symlinks: bool,
) -> std::io::Result<OwnedFd> {
    let flags = flags | OFlags::CLOEXEC | OFlags::NOCTTY;
    let mode = Mode::from_raw_mode(mode);
    let mut resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
    if no_symlinks {
        resolve |= ResolveFlags::NO_SYMLINKS;
    }
    // openat2 answers EAGAIN when a concurrent rename may have raced a `..` lookup.
    for _ in 0..32 {
        match rustix::fs::openat2(dir.as_fd(), rel, flags, mode, resolve) {
            Err(rustix::io::Errno::AGAIN) => continue,
            Err(rustix::io::Errno::NOSYS) => return open_nofollow_walk(dir, rel, flags, mode),
            r => return Ok(r?),
        }
    }
    Err(std::io::Error::from(rustix::io::Errno::AGAIN))
}

/// `open_beneath` without `openat2`: component by component, each with `O_NOFOLLOW`.
fn open_nofollow_walk(
    dir: impl AsFd,
    rel: &Path,
    flags: OFlags,
    mode: Mode,
) -> std::io::Result<OwnedFd> {
    let parts: Vec<_> = rel
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect();
    if parts.iter().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(rustix::io::Errno::XDEV.into());
    }
    let Some((last, walk)) = parts.split_last() else {
        return Ok(rustix::fs::openat(dir, ".", flags, mode)?);
    };
    let mut cur: Option<OwnedFd> = None;
    for c in walk {
        let next = {
            let at = match &cur {
                Some(fd) => fd.as_fd(),
                None => dir.as_fd(),
            };
            rustix::fs::openat(
                at,
                c.as_os_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?
        };
        cur = Some(next);
    }
    let at = match &cur {
        Some(fd) => fd.as_fd(),
        None => dir.as_fd(),
    };
    Ok(rustix::fs::openat(
        at,
        last.as_os_str(),
        flags | OFlags::NOFOLLOW,
        mode,
    )?)
}

/// Opens `name` in `dir` for appending (creating it), refusing symlinks and anything but a
/// regular file (`O_NONBLOCK`: a FIFO put there by the task cannot block the open).
pub fn open_append(dir: impl AsFd, name: &Path) -> std::io::Result<std::fs::File> {
    let fd = open_beneath(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::APPEND | OFlags::NONBLOCK,
        0o644,
        true,
    )?;
    regular(fd)
}

/// Opens `rel` beneath `dir` for reading, through no symlink, refusing anything but a
/// regular file of at most `max` bytes; returns its contents.
pub fn read_capped(dir: impl AsFd, rel: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let fd = open_beneath(dir, rel, OFlags::RDONLY | OFlags::NONBLOCK, 0, true)?;
    let f = regular(fd)?;
    let len = f.metadata()?.len();
    if len > max {
        return Err(std::io::Error::other(format!(
            "{} is larger than {max} bytes",
            rel.display()
        )));
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(std::io::Error::other(format!(
            "{} is larger than {max} bytes",
            rel.display()
        )));
    }
    Ok(buf)
}

/// The fd as a `File` if it is a regular file.
fn regular(fd: OwnedFd) -> std::io::Result<std::fs::File> {
    let st = rustix::fs::fstat(&fd)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(std::fs::File::from(fd))
}

/// Writes `data` to `dir/name` atomically (a temp file renamed over it) through no symlink:
/// a task that replaces `dir`'s entries with symlinks cannot redirect the write.
pub fn write_atomic_in(dir: impl AsFd, name: &str, data: &[u8]) -> std::io::Result<()> {
    let tmp = format!("{name}.tmp");
    let _ = rustix::fs::unlinkat(dir.as_fd(), tmp.as_str(), AtFlags::empty());
    let fd = open_beneath(
        dir.as_fd(),
        Path::new(&tmp),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NONBLOCK,
        0o644,
        true,
    )?;
    let mut f = std::fs::File::from(fd);
    f.write_all(data)?;
    f.sync_all()?;
    Ok(rustix::fs::renameat(
        dir.as_fd(),
        tmp.as_str(),
        dir.as_fd(),
        name,
    )?)
}

/// Creates the directories of `rel` beneath `dir` (mode `0o755`) and opens the last one,
/// through no symlink: a task's planted link in the way fails the call instead of leading
/// the agent's writes elsewhere.
pub fn mkdirs_beneath(dir: impl AsFd, rel: &Path) -> std::io::Result<OwnedFd> {
    let mut cur = rustix::fs::openat(
        dir.as_fd(),
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for c in rel.components() {
        let Component::Normal(name) = c else {
            if matches!(c, Component::CurDir) {
                continue;
            }
            return Err(rustix::io::Errno::XDEV.into());
        };
        match rustix::fs::mkdirat(&cur, name, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        cur = open_beneath(
            &cur,
            Path::new(name),
            OFlags::RDONLY | OFlags::DIRECTORY,
            0,
            true,
        )?;
    }
    Ok(cur)
}

/// Writes `data` to `rel` beneath `root` (creating its directories), through no symlink.
pub fn write_beneath(root: &Path, rel: &Path, data: &[u8]) -> std::io::Result<()> {
    let root = open_dir(root)?;
    let name = rel
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| std::io::Error::other("no file name"))?;
    let parent = match rel.parent() {
        Some(p) if !p.as_os_str().is_empty() => mkdirs_beneath(&root, p)?,
        _ => root,
    };
    write_atomic_in(&parent, name, data)
}

/// Opens the subdirectory `rel` of `root` through no symlink.
pub fn open_subdir(root: &Path, rel: &str) -> std::io::Result<OwnedFd> {
    let d = open_dir(root)?;
    open_beneath(
        &d,
        Path::new(rel),
        OFlags::RDONLY | OFlags::DIRECTORY,
        0,
        true,
    )
}

/// Checks a path a client gave: relative, without `..`, not too long.
fn check_rel(rel: &str) -> Result<&Path, SandboxError> {
    let p = Path::new(rel);
    if rel.is_empty() || p.is_absolute() || rel.len() > 1024 || rel.contains('\0') {
        return Err(SandboxError::Outside(rel.to_string()));
    }
    if p.components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(SandboxError::Outside(rel.to_string()));
    }
    Ok(p)
}

fn open_err(e: std::io::Error, rel: &str) -> SandboxError {
    match rustix::io::Errno::from_io_error(&e) {
        Some(rustix::io::Errno::XDEV | rustix::io::Errno::LOOP) => {
            SandboxError::Outside(rel.to_string())
        }
        Some(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => {
            SandboxError::NotFound(rel.to_string())
        }
        _ => SandboxError::Io(e.to_string()),
    }
}

/// Opens `rel` inside `root` for reading: absolute paths and `..` are refused, and symlinks
/// are followed only while they stay inside (`RESOLVE_BENEATH`: absolute targets and `..`
/// out fail), in the kernel, so nothing can be swapped between a check and the open.
fn open_in(root: &Path, rel: &str, flags: OFlags) -> Result<OwnedFd, SandboxError> {
    let p = check_rel(rel)?;
    let dir = open_dir(root).map_err(|e| SandboxError::Io(e.to_string()))?;
    open_beneath(&dir, p, flags | OFlags::RDONLY | OFlags::NONBLOCK, 0, false)
        .map_err(|e| open_err(e, rel))
}

/// Reads up to `length` bytes at `offset` of a sandbox file; returns the bytes and file size.
/// Only regular files are read (a FIFO or device node is refused without blocking).
pub fn read_range(
    root: &Path,
    rel: &str,
    offset: u64,
    length: u64,
) -> Result<(Vec<u8>, u64), SandboxError> {
    let fd = open_in(root, rel, OFlags::empty())?;
    let st = rustix::fs::fstat(&fd).map_err(|e| SandboxError::Io(e.to_string()))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(SandboxError::NotRegular(rel.to_string()));
    }
    let mut f = std::fs::File::from(fd);
    let size = st.st_size.max(0) as u64;
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

/// Lists a sandbox directory (`rel` = "." for the top); entries are not followed.
pub fn list(root: &Path, rel: &str) -> Result<Vec<Entry>, SandboxError> {
    let fd = open_in(root, rel, OFlags::DIRECTORY)?;
    let prefix: Vec<String> = Path::new(rel)
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    let dir = rustix::fs::Dir::read_from(&fd).map_err(|e| SandboxError::Io(e.to_string()))?;
    for e in dir {
        let e = e.map_err(|e| SandboxError::Io(e.to_string()))?;
        let name = e.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        let Ok(st) = rustix::fs::statat(&fd, name, AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        let mut path = prefix.clone();
        path.push(name.to_string_lossy().into_owned());
        out.push(Entry {
            path: path.join("/"),
            size: st.st_size.max(0) as u64,
            dir: FileType::from_raw_mode(st.st_mode) == FileType::Directory,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Directories deeper than this are not counted by `disk_usage`.
const MAX_DEPTH: usize = 256;

/// Disk used under `dir`, in bytes (like Mesos' `disk/du`). Walks directory file descriptors
/// and never follows a symlink, so a directory swapped for a link while it is walked is not
/// entered.
pub fn disk_usage(dir: &Path) -> u64 {
    fn walk(fd: &OwnedFd, depth: usize) -> u64 {
        let Ok(d) = rustix::fs::Dir::read_from(fd) else {
            return 0;
        };
        let mut total = 0;
        for e in d.flatten() {
            let name = e.file_name();
            if name.to_bytes() == b"." || name.to_bytes() == b".." {
                continue;
            }
            let Ok(st) = rustix::fs::statat(fd, name, AtFlags::SYMLINK_NOFOLLOW) else {
                continue;
            };
            if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                if depth < MAX_DEPTH {
                    if let Ok(sub) = rustix::fs::openat(
                        fd,
                        name,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    ) {
                        total += walk(&sub, depth + 1);
                    }
                }
            } else {
                total += st.st_size.max(0) as u64;
            }
        }
        total
    }
    match open_dir(dir) {
        Ok(fd) => walk(&fd, 0),
        Err(_) => 0,
    }
}

/// A writer that keeps `dir/name` below `max` bytes by renaming it to `name.1` when full.
/// Renames and reopens go through the directory's file descriptor without following
/// symlinks, so a task cannot redirect its logs to a host file.
pub struct RotatingFile {
    dir: OwnedFd,
    name: PathBuf,
    max: u64,
    file: Option<std::fs::File>,
    written: u64,
}

impl RotatingFile {
    pub fn open(dir: &Path, name: &str, max: u64) -> std::io::Result<Self> {
        let dir = open_dir(dir)?;
        let file = open_append(&dir, Path::new(name))?;
        let written = file.metadata()?.len();
        Ok(Self {
            dir,
            name: PathBuf::from(name),
            max: max.max(1024),
            file: Some(file),
            written,
        })
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let full = self.written + buf.len() as u64 > self.max && self.written > 0;
        if full || self.file.is_none() {
            let mut rotated = self.name.clone().into_os_string();
            rotated.push(".1");
            self.file = None;
            let _ = rustix::fs::renameat(
                &self.dir,
                self.name.as_path(),
                &self.dir,
                rotated.as_os_str(),
            );
            self.file = Some(open_append(&self.dir, &self.name)?);
            self.written = 0;
        }
        let n = self.file.as_mut().expect("opened").write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
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
        std::os::unix::fs::symlink("../secret", root.join("link-up")).unwrap();
        std::os::unix::fs::symlink("stdout", root.join("link-in")).unwrap();
        std::os::unix::fs::symlink(root.join("stdout"), root.join("link-abs")).unwrap();
        std::os::unix::fs::symlink("..", root.join("sub/up")).unwrap();
        std::os::unix::fs::symlink("../..", root.join("sub/upup")).unwrap();
        let r = |p: &str| match read_range(&root, p, 0, 100) {
            Ok((b, _)) => String::from_utf8(b).unwrap(),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(r("stdout"), "hello");
        assert_eq!(r("./stdout"), "hello");
        assert_eq!(r("link-in"), "hello");
        assert_eq!(r("sub/up/stdout"), "hello");
        assert_eq!(
            r("../secret"),
            "error: path \"../secret\" is outside the sandbox: use a relative path without '..'"
        );
        assert_eq!(r("sub/../../secret"), "error: path \"sub/../../secret\" is outside the sandbox: use a relative path without '..'");
        assert!(r("/etc/passwd").starts_with("error: path \"/etc/passwd\" is outside"));
        assert!(r("link-out").starts_with("error: path \"link-out\" is outside"));
        assert!(r("link-up").starts_with("error: path \"link-up\" is outside"));
        assert!(r("sub/upup/secret").starts_with("error: path \"sub/upup/secret\" is outside"));
        // Absolute symlinks are refused even when they point inside (the kernel resolves
        // them beneath the sandbox only as relative ones).
        assert!(r("link-abs").starts_with("error: path \"link-abs\" is outside"));
        assert_eq!(r("missing"), "error: no file \"missing\" in the sandbox");
        assert_eq!(r("sub"), "error: \"sub\" is not a regular file");
        assert_eq!(
            read_range(&root, "stdout", 2, 2).unwrap(),
            (b"ll".to_vec(), 5)
        );
        let names: Vec<String> = list(&root, ".")
            .unwrap()
            .into_iter()
            .map(|e| e.path)
            .collect();
        assert_eq!(
            names,
            ["link-abs", "link-in", "link-out", "link-up", "stdout", "sub"]
        );
        assert_eq!(list(&root, "./sub").unwrap()[0].path, "sub/up");
        assert!(matches!(
            list(&root, "link-up"),
            Err(SandboxError::Outside(_))
        ));
    }

    /// A FIFO named like a log (issue 14 hole 2) is refused at once: neither the files API
    /// nor the log writer blocks on it.
    #[test]
    fn fifos_are_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        nix::unistd::mkfifo(&d.path().join("stdout"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let root = d.path().to_path_buf();
        std::thread::spawn(move || {
            let read = read_range(&root, "stdout", 0, 10);
            let log = RotatingFile::open(&root, "stdout", 1024).map(|_| ());
            let dir = open_dir(&root).unwrap();
            let capped = read_capped(&dir, Path::new("stdout"), 10).map(|_| ());
            let _ = tx.send((read, log.is_err(), capped.is_err()));
        });
        let (read, log_err, capped_err) = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("an open of a FIFO blocked");
        assert_eq!(read, Err(SandboxError::NotRegular("stdout".into())));
        assert!(log_err && capped_err);
    }

    /// Issue 14 hole 2: log rotation reopened `stdout` by name and followed a symlink the
    /// task put there; a temp file named like the supervisor's `exit.tmp` was followed too.
    #[test]
    fn host_writes_never_follow_symlinks_out() {
        let outer = tempfile::tempdir().unwrap();
        let sb = outer.path().join("sb");
        std::fs::create_dir_all(&sb).unwrap();
        let victim = outer.path().join("victim");
        std::fs::write(&victim, "host file\n").unwrap();
        let mut f = RotatingFile::open(&sb, "stdout", 1024).unwrap();
        f.write_all(&[b'x'; 1000]).unwrap();
        // The task swaps its log for a symlink to a host file, then fills the log.
        std::fs::remove_file(sb.join("stdout")).unwrap();
        std::os::unix::fs::symlink(&victim, sb.join("stdout")).unwrap();
        for _ in 0..5 {
            let _ = f.write_all(&[b'y'; 500]);
        }
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "host file\n");
        // A log that is a symlink from the start is refused too.
        std::os::unix::fs::symlink(&victim, sb.join("evil")).unwrap();
        assert!(RotatingFile::open(&sb, "evil", 1024).is_err());
        // Atomic writes: a planted `exit.tmp` symlink, or a symlinked directory, is not used.
        std::os::unix::fs::symlink(&victim, sb.join("exit.tmp")).unwrap();
        let dir = open_dir(&sb).unwrap();
        write_atomic_in(&dir, "exit", b"{}").unwrap();
        assert_eq!(std::fs::read_to_string(sb.join("exit")).unwrap(), "{}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "host file\n");
        std::os::unix::fs::symlink(outer.path(), sb.join(".cairn")).unwrap();
        assert!(open_subdir(&sb, ".cairn").is_err());
        // Reads by the agent refuse symlinks and devices.
        std::os::unix::fs::symlink("/dev/zero", sb.join("zero")).unwrap();
        assert!(read_capped(&dir, Path::new("zero"), 1 << 20).is_err());
        assert!(read_capped(&dir, Path::new("evil"), 1 << 20).is_err());
        assert_eq!(read_capped(&dir, Path::new("exit"), 2).unwrap(), b"{}");
        assert!(read_capped(&dir, Path::new("exit"), 1).is_err());
    }

    #[test]
    fn rotation_keeps_files_small() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("stdout");
        let mut f = RotatingFile::open(d.path(), "stdout", 1024).unwrap();
        for _ in 0..30 {
            f.write_all(&[b'x'; 100]).unwrap();
        }
        assert!(std::fs::metadata(&p).unwrap().len() <= 1024);
        assert!(std::fs::metadata(d.path().join("stdout.1")).unwrap().len() <= 1024);
        assert!(disk_usage(d.path()) >= 2000);
    }

    #[test]
    fn disk_usage_does_not_follow_links() {
        let outer = tempfile::tempdir().unwrap();
        let sb = outer.path().join("sb");
        std::fs::create_dir_all(sb.join("a/b")).unwrap();
        std::fs::write(sb.join("a/b/f"), [0u8; 3000]).unwrap();
        std::fs::write(outer.path().join("big"), vec![0u8; 100_000]).unwrap();
        std::os::unix::fs::symlink(outer.path(), sb.join("a/out")).unwrap();
        let du = disk_usage(&sb);
        assert!((3000..10_000).contains(&du), "{du}");
    }
}
