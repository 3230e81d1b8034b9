//! The per-task processes of a native task, run by re-executing the `cairn` binary (never by
//! forking a multi-threaded agent):
//!
//! - `cairn __init SPEC` — the supervisor. Unshares the mount, UTS, IPC and PID namespaces
//!   (and net with `network = "none"`), starts `__pid1`, copies its stdout/stderr into the
//!   sandbox with size rotation, forwards the agent's SIGTERM to PID 1, and outlives an
//!   agent restart. The agent signals only this process (whose pid it learnt by starting
//!   it), never a pid read from the sandbox.
//! - `cairn __pid1 SPEC` — PID 1 of the task's PID namespace. Joins the task cgroup, mounts a
//!   private /proc and /tmp, sets the hostname, starts the command, forwards signals to it,
//!   reaps zombies, and records the command's exit status in `.cairn/exit.json`. It dies
//!   with its supervisor (`PR_SET_PDEATHSIG`), and with it the whole PID namespace.
//!
//! Every file either writes in the sandbox is opened through a directory file descriptor
//! without following symlinks (`sandbox::open_beneath`): the task owns the sandbox.
//!
//! Both must run before any thread is started (`unshare(CLONE_NEWNS)` refuses a process
//! whose filesystem context is shared with other threads), so `main` dispatches them first.

use crate::sandbox::{open_subdir, write_atomic_in, RotatingFile};
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What the agent hands to `__init` (as `.cairn/init.json` in the sandbox).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InitSpec {
    pub cmd: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub sandbox: PathBuf,
    pub hostname: String,
    /// `cgroup.procs` files PID 1 writes its host pid into.
    pub cgroup_procs: Vec<PathBuf>,
    pub network_none: bool,
    pub log_max_bytes: u64,
    /// Set for OCI tasks: PID 1 pivots into an overlay of this image.
    #[serde(default)]
    pub container: Option<ContainerFs>,
    /// Volumes: (host directory, directory in the sandbox) bind-mounted before the command
    /// starts, inside PID 1's mount namespace.
    #[serde(default)]
    pub binds: Vec<(PathBuf, PathBuf)>,
    /// The task's /etc/resolv.conf (the agent's DNS), in place of the host's.
    #[serde(default)]
    pub resolv_conf: Option<String>,
}

/// The root filesystem of an OCI task.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ContainerFs {
    /// The image's read-only root filesystem (the overlay's lower dir).
    pub image_rootfs: PathBuf,
    /// Working directory inside the container.
    pub workdir: String,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// Where a container sees its sandbox.
pub const CONTAINER_SANDBOX: &str = "/mnt/sandbox";

/// How the command ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

pub fn state_dir(sandbox: &Path) -> PathBuf {
    sandbox.join(".cairn")
}

/// The `PATH` the supervisor and PID 1 run with (their environment is otherwise empty).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Signals the supervisor forwards to PID 1.
const FORWARDED: [i32; 2] = [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT];

fn read_spec(path: &Path) -> anyhow::Result<InitSpec> {
    Ok(serde_json::from_slice(&std::fs::read(path)?)?)
}

/// `cairn __init SPEC`: returns the process exit code.
pub fn supervise(spec_path: &Path) -> i32 {
    match supervise_inner(spec_path) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("cairn __init: {e:#}");
            1
        }
    }
}

fn supervise_inner(spec_path: &Path) -> anyhow::Result<()> {
    let spec = read_spec(spec_path)?;
    // Opened before the task runs, so a symlink it later puts in place of `.cairn` or the
    // logs redirects nothing.
    let dir = open_subdir(&spec.sandbox, ".cairn")
        .map_err(|e| anyhow::anyhow!("opening the sandbox's .cairn: {e}"))?;
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWPID;
    if spec.network_none {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags).map_err(|e| anyhow::anyhow!("unshare namespaces: {e}"))?;
    let mut out_file = RotatingFile::open(&spec.sandbox, "stdout", spec.log_max_bytes)?;
    let mut err_file = RotatingFile::open(&spec.sandbox, "stderr", spec.log_max_bytes)?;
    // Signals arrive on a self-pipe (no thread: after unshare(CLONE_NEWPID) this process may
    // not start one) and are forwarded to PID 1 from the poll loop.
    let (mut sig_rx, sig_tx) = std::os::unix::net::UnixStream::pair()?;
    sig_rx.set_nonblocking(true)?;
    for s in FORWARDED {
        signal_hook::low_level::pipe::register(s, sig_tx.try_clone()?)?;
    }
    drop(sig_tx);
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg("__pid1")
        .arg(spec_path)
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid1 = Pid::from_raw(child.id() as i32);
    // Both pipes (and the signal pipe) are copied from one poll loop.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let (mut out_open, mut err_open) = (true, true);
    let mut buf = [0u8; 16 * 1024];
    while out_open || err_open {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let (ready_sig, ready_out, ready_err) = {
            let mut fds = vec![PollFd::new(sig_rx.as_fd(), PollFlags::POLLIN)];
            if out_open {
                fds.push(PollFd::new(out.as_fd(), PollFlags::POLLIN));
            }
            if err_open {
                fds.push(PollFd::new(err.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => anyhow::bail!("poll: {e}"),
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            let mut it = fds.iter();
            let s = it.next().is_some_and(ready);
            let o = if out_open {
                it.next().is_some_and(ready)
            } else {
                false
            };
            let e = if err_open {
                it.next().is_some_and(ready)
            } else {
                false
            };
            (s, o, e)
        };
        if ready_sig {
            // Which signal does not matter: the agent only asks PID 1 to stop.
            let mut drain = [0u8; 64];
            while matches!(sig_rx.read(&mut drain), Ok(n) if n > 0) {}
            let _ = kill(pid1, Signal::SIGTERM);
        }
        if ready_out {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => out_open = false,
                // A task that breaks its own log (a symlink in its place) loses output, and
                // keeps running.
                Ok(n) => {
                    let _ = out_file.write_all(&buf[..n]);
                }
            }
        }
        if ready_err {
            match err.read(&mut buf) {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => {
                    let _ = err_file.write_all(&buf[..n]);
                }
            }
        }
    }
    let status = child.wait()?;
    let recorded =
        rustix::fs::statat(&dir, "exit.json", rustix::fs::AtFlags::SYMLINK_NOFOLLOW).is_ok();
    if !recorded {
        // PID 1 died without recording the command's status (e.g. SIGKILL of the cgroup).
        use std::os::unix::process::ExitStatusExt;
        let info = ExitInfo {
            code: status.code(),
            signal: status.signal(),
        };
        write_atomic_in(&dir, "exit.json", &serde_json::to_vec(&info)?)?;
    }
    Ok(())
}

/// `cairn __pid1 SPEC`: returns the process exit code.
pub fn pid1(spec_path: &Path) -> i32 {
    match pid1_inner(spec_path) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cairn __pid1: {e:#}");
            127
        }
    }
}

fn pid1_inner(spec_path: &Path) -> anyhow::Result<i32> {
    let spec = read_spec(spec_path)?;
    // PID 1 (and so its whole PID namespace) dies with the supervisor: when the agent, after
    // the grace, SIGKILLs the supervisor (the only pid it trusts), nothing of the task stays.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
        .map_err(|e| anyhow::anyhow!("PR_SET_PDEATHSIG: {e}"))?;
    // A mount namespace of PID 1's own: the private /tmp (which may shadow the sandbox's own
    // path when the data dir is under /tmp) and pivot_root (which moves every process of the
    // namespace whose root is the old root) stay out of the supervisor's view.
    unshare(CloneFlags::CLONE_NEWNS)
        .map_err(|e| anyhow::anyhow!("unshare the task's mount namespace: {e}"))?;
    // Enter the sandbox before /tmp is replaced: the working directory stays valid even if
    // its path is shadowed.
    nix::unistd::chdir(&spec.sandbox)
        .map_err(|e| anyhow::anyhow!("entering the sandbox {}: {e}", spec.sandbox.display()))?;
    // Pids written to cgroup.procs are read in the writer's PID namespace; "0" means the
    // writing process itself, in v1 and v2 alike.
    for f in &spec.cgroup_procs {
        std::fs::write(f, "0")
            .map_err(|e| anyhow::anyhow!("joining cgroup {}: {e}", f.display()))?;
    }
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| anyhow::anyhow!("making mounts private: {e}"))?;
    // Volumes first: the container's view of the sandbox (a recursive bind) carries them.
    for (from, to) in &spec.binds {
        bind(from, to)?;
    }
    let tmp = spec.sandbox.join("tmp");
    std::fs::create_dir_all(&tmp)?;
    if let Some(fs) = &spec.container {
        enter_container(&spec, fs)?;
    } else {
        mount_proc(Path::new("/proc"))?;
        // Recursive: volumes mounted under the sandbox's tmp come along.
        bind_rec(&tmp, Path::new("/tmp"))?;
        // A data dir under /tmp: the private /tmp just hid the sandbox's own path, which the
        // task knows as $CAIRN_SANDBOX (and $PWD). Mount the sandbox (PID 1's working
        // directory, with its volumes) back at that path inside the new /tmp.
        if spec.sandbox.starts_with("/tmp") {
            std::fs::create_dir_all(&spec.sandbox)?;
            mount(
                Some("."),
                &spec.sandbox,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| anyhow::anyhow!("re-mounting the sandbox at its path: {e}"))?;
        }
        // The agent's DNS in place of the host's resolv.conf, in this mount namespace only.
        // The file goes beside init.json (relative to the working directory, the sandbox,
        // whose absolute path /tmp may shadow), written before the task runs and never
        // through a link.
        if let Some(text) = &spec.resolv_conf {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let file = Path::new(".cairn/resolv.conf");
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(file)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .map_err(|e| anyhow::anyhow!("writing the task's resolv.conf: {e}"))?;
            if Path::new("/etc/resolv.conf").exists() {
                bind(file, Path::new("/etc/resolv.conf"))?;
            }
        }
    }
    nix::unistd::sethostname(&spec.hostname).map_err(|e| anyhow::anyhow!("sethostname: {e}"))?;
    // Last, as it forbids mounts: masked kernel files, Docker's capability set,
    // no_new_privs and the seccomp filter, inherited by the command and all it starts.
    crate::isolation::apply()?;

    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGQUIT,
        signal_hook::consts::SIGUSR1,
        signal_hook::consts::SIGUSR2,
    ])?;
    let mut command = Command::new(&spec.cmd);
    // The command inherits PID 1's working directory: the sandbox (native tasks).
    command
        .args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null());
    if let Some(fs) = &spec.container {
        use std::os::unix::process::CommandExt;
        command.current_dir(&fs.workdir);
        if let Some(g) = fs.gid {
            command.gid(g);
        }
        if let Some(u) = fs.uid {
            command.uid(u);
        }
    }
    let child = command.spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cairn: cannot start {:?}: {e}", spec.cmd);
            let info = ExitInfo {
                code: Some(127),
                signal: None,
            };
            write_exit(&spec, &info)?;
            return Ok(127);
        }
    };
    let main = Pid::from_raw(child.id() as i32);
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if let Ok(s) = Signal::try_from(sig) {
                let _ = kill(main, s);
            }
        }
    });
    // Reap every child (zombies of orphans included) until the command itself exits.
    let info = loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == main => {
                break ExitInfo {
                    code: Some(code),
                    signal: None,
                }
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == main => {
                break ExitInfo {
                    code: None,
                    signal: Some(sig as i32),
                }
            }
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => anyhow::bail!("waitpid: {e}"),
        }
    };
    write_exit(&spec, &info)?;
    Ok(info.code.unwrap_or(128 + info.signal.unwrap_or(0)))
}

/// Records the command's exit in `.cairn/exit.json` of the sandbox as PID 1 sees it after
/// any pivot, through no symlink.
fn write_exit(spec: &InitSpec, info: &ExitInfo) -> anyhow::Result<()> {
    let sandbox = match spec.container {
        Some(_) => Path::new(CONTAINER_SANDBOX),
        // PID 1's working directory (the sandbox's own path may be shadowed).
        None => Path::new("."),
    };
    let dir = open_subdir(sandbox, ".cairn")?;
    write_atomic_in(&dir, "exit.json", &serde_json::to_vec(info)?)?;
    Ok(())
}

fn mount_proc(at: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(at)?;
    mount(
        Some("proc"),
        at,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| anyhow::anyhow!("mounting {}: {e}", at.display()))
}

fn bind_rec(from: &Path, to: &Path) -> anyhow::Result<()> {
    mount(
        Some(from),
        to,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| anyhow::anyhow!("bind-mounting {} on {}: {e}", from.display(), to.display()))
}

fn bind(from: &Path, to: &Path) -> anyhow::Result<()> {
    mount(Some(from), to, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| anyhow::anyhow!("bind-mounting {} on {}: {e}", from.display(), to.display()))
}

/// Builds an OCI task's root filesystem and pivots into it: an overlay of the image (upper
/// and work dirs in the sandbox, so writes count against the sandbox disk), a private /proc
/// for the new PID namespace, a minimal /dev, the sandbox's tmp on /tmp and the sandbox on
/// `/mnt/sandbox`. Runs in the task's fresh mount namespace, so it all vanishes with it.
fn enter_container(spec: &InitSpec, fs: &ContainerFs) -> anyhow::Result<()> {
    let st = state_dir(&spec.sandbox);
    let (upper, work, root) = (st.join("upper"), st.join("work"), st.join("rootfs"));
    for d in [&upper, &work, &root] {
        std::fs::create_dir_all(d)?;
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        fs.image_rootfs.display(),
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        &root,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(|e| anyhow::anyhow!("mounting the image overlay: {e}"))?;
    mount_proc(&root.join("proc"))?;

    let dev = root.join("dev");
    std::fs::create_dir_all(&dev)?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )
    .map_err(|e| anyhow::anyhow!("mounting /dev: {e}"))?;
    for n in ["null", "zero", "full", "random", "urandom", "tty"] {
        let host = Path::new("/dev").join(n);
        if host.exists() {
            std::fs::File::create(dev.join(n))?;
            bind(&host, &dev.join(n))?;
        }
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link))?;
    }
    std::fs::create_dir_all(dev.join("pts"))?;
    let _ = mount(
        Some("devpts"),
        &dev.join("pts"),
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    );
    std::fs::create_dir_all(dev.join("shm"))?;
    mount(
        Some("shm"),
        &dev.join("shm"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
    )
    .map_err(|e| anyhow::anyhow!("mounting /dev/shm: {e}"))?;

    std::fs::create_dir_all(root.join("tmp"))?;
    bind_rec(&spec.sandbox.join("tmp"), &root.join("tmp"))?;
    let sb = root.join(CONTAINER_SANDBOX.trim_start_matches('/'));
    std::fs::create_dir_all(&sb)?;
    // Recursive: the volumes mounted inside the sandbox come along.
    mount(
        Some(&spec.sandbox),
        &sb,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| anyhow::anyhow!("bind-mounting the sandbox on {}: {e}", sb.display()))?;
    // Name resolution through the agent's DNS, else as on the host (host network); the
    // files land in the overlay's upper.
    std::fs::create_dir_all(root.join("etc"))?;
    match &spec.resolv_conf {
        Some(text) => std::fs::write(root.join("etc/resolv.conf"), text)?,
        None => {
            if let Ok(r) = std::fs::read("/etc/resolv.conf") {
                let _ = std::fs::write(root.join("etc/resolv.conf"), r);
            }
        }
    }
    let _ = std::fs::write(root.join("etc/hostname"), format!("{}\n", spec.hostname));

    // pivot_root(".", ".") stacks the old root on the new one; detaching it leaves only the
    // container's root (runc does the same).
    nix::unistd::chdir(&root).map_err(|e| anyhow::anyhow!("chdir rootfs: {e}"))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| anyhow::anyhow!("pivot_root: {e}"))?;
    nix::mount::umount2(".", nix::mount::MntFlags::MNT_DETACH)
        .map_err(|e| anyhow::anyhow!("detaching the host root: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| anyhow::anyhow!("chdir /: {e}"))?;
    Ok(())
}
