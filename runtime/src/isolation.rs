//! What a native or OCI task may do, applied by its PID 1 after the mounts and before the
//! command starts (the command and everything it starts inherit it): the capability set of
//! Docker's default (14 capabilities, `DEFAULT_CAPS`), `no_new_privs`, a seccomp filter that
//! refuses the syscalls that reach past a container (`DENIED_SYSCALLS`, EPERM), and the
//! kernel files runc masks or makes read-only (`MASKED`, `READ_ONLY`).
//!
//! Not here yet: a user namespace per task (root inside, nobody outside) — until then a
//! native task, which sees the host's filesystem, is still root on it, minus these
//! capabilities and syscalls.

use anyhow::{anyhow, Context, Result};
use caps::{CapSet, Capability};
use nix::mount::{mount, MsFlags};
use std::path::Path;

/// Docker's and runc's default capability set (`CapEff` 00000000a80425fb).
pub const DEFAULT_CAPS: [Capability; 14] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_KILL,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETPCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_NET_RAW,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_MKNOD,
    Capability::CAP_AUDIT_WRITE,
    Capability::CAP_SETFCAP,
];

/// Files hidden behind /dev/null and directories behind an empty read-only tmpfs (runc's
/// masked paths).
pub const MASKED: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Made read-only (runc's read-only paths).
pub const READ_ONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Syscalls a task gets EPERM for: kernel modules and kexec, mounts and namespaces, keys,
/// BPF and perf, tracing other processes, the clock, swap, reboot, raw handles.
pub const DENIED_SYSCALLS: &[i64] = &[
    nix::libc::SYS_acct,
    nix::libc::SYS_add_key,
    nix::libc::SYS_bpf,
    nix::libc::SYS_clock_adjtime,
    nix::libc::SYS_clock_settime,
    nix::libc::SYS_delete_module,
    nix::libc::SYS_finit_module,
    nix::libc::SYS_init_module,
    nix::libc::SYS_kexec_file_load,
    nix::libc::SYS_kexec_load,
    nix::libc::SYS_keyctl,
    nix::libc::SYS_mount,
    nix::libc::SYS_name_to_handle_at,
    nix::libc::SYS_open_by_handle_at,
    nix::libc::SYS_perf_event_open,
    nix::libc::SYS_pivot_root,
    nix::libc::SYS_ptrace,
    nix::libc::SYS_quotactl,
    nix::libc::SYS_reboot,
    nix::libc::SYS_request_key,
    nix::libc::SYS_setdomainname,
    nix::libc::SYS_sethostname,
    nix::libc::SYS_setns,
    nix::libc::SYS_settimeofday,
    nix::libc::SYS_swapoff,
    nix::libc::SYS_swapon,
    nix::libc::SYS_syslog,
    nix::libc::SYS_umount2,
    nix::libc::SYS_unshare,
    nix::libc::SYS_userfaultfd,
    nix::libc::SYS_vhangup,
    nix::libc::SYS_adjtimex,
    nix::libc::SYS_lookup_dcookie,
];

/// Hides and write-protects kernel files in the task's (already private) mount namespace.
/// Paths missing on this kernel or in this image are skipped.
pub fn mask_kernel_files() -> Result<()> {
    for p in MASKED {
        let path = Path::new(p);
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            continue;
        };
        if meta.is_dir() {
            mount(
                Some("tmpfs"),
                path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("size=0"),
            )
            .map_err(|e| anyhow!("masking {p}: {e}"))?;
        } else {
            mount(
                Some("/dev/null"),
                path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| anyhow!("masking {p}: {e}"))?;
        }
    }
    for p in READ_ONLY {
        let path = Path::new(p);
        if std::fs::symlink_metadata(path).is_err() {
            continue;
        }
        read_only(path).with_context(|| format!("making {p} read-only"))?;
    }
    Ok(())
}

/// Binds `path` onto itself and remounts that bind read-only.
fn read_only(path: &Path) -> Result<()> {
    mount(
        Some(path),
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )?;
    mount(
        None::<&str>,
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )?;
    Ok(())
}

/// Drops every capability outside `DEFAULT_CAPS` from the bounding set (so no exec can get
/// it back), sets the effective, permitted and inheritable sets to `DEFAULT_CAPS` and clears
/// the ambient set.
pub fn drop_capabilities() -> Result<()> {
    let keep: caps::CapsHashSet = DEFAULT_CAPS.iter().copied().collect();
    for c in caps::all() {
        if !keep.contains(&c) {
            caps::drop(None, CapSet::Bounding, c)
                .map_err(|e| anyhow!("dropping {c} from the bounding set: {e}"))?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(|e| anyhow!("clearing ambient caps: {e}"))?;
    for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable] {
        caps::set(None, set, &keep).map_err(|e| anyhow!("setting {set:?}: {e}"))?;
    }
    Ok(())
}

/// `no_new_privs` (no setuid binary or file capability raises privileges again), then the
/// seccomp filter (`no_new_privs` is what lets an unprivileged filter be installed).
pub fn restrict_syscalls() -> Result<()> {
    nix::sys::prctl::set_no_new_privs().map_err(|e| anyhow!("no_new_privs: {e}"))?;
    let rules = DENIED_SYSCALLS.iter().map(|s| (*s, vec![])).collect();
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| anyhow!("seccomp on {}: {e:?}", std::env::consts::ARCH))?;
    let filter = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(nix::libc::EPERM as u32),
        arch,
    )
    .map_err(|e| anyhow!("seccomp filter: {e}"))?;
    let prog: seccompiler::BpfProgram = filter
        .try_into()
        .map_err(|e| anyhow!("seccomp program: {e:?}"))?;
    seccompiler::apply_filter(&prog).map_err(|e| anyhow!("installing seccomp: {e}"))?;
    Ok(())
}

/// All of it, in order: masks (needs mount), capabilities, then no_new_privs and seccomp
/// (which refuses mount from then on).
pub fn apply() -> Result<()> {
    mask_kernel_files()?;
    drop_capabilities()?;
    restrict_syscalls()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_capabilities_are_dockers() {
        let mask: u64 = DEFAULT_CAPS.iter().map(|c| 1u64 << c.index()).sum();
        assert_eq!(format!("{mask:016x}"), "00000000a80425fb");
    }

    #[test]
    fn the_filter_builds_for_this_machine() {
        let rules = DENIED_SYSCALLS.iter().map(|s| (*s, vec![])).collect();
        let f = seccompiler::SeccompFilter::new(
            rules,
            seccompiler::SeccompAction::Allow,
            seccompiler::SeccompAction::Errno(1),
            std::env::consts::ARCH.try_into().unwrap(),
        )
        .unwrap();
        let prog: seccompiler::BpfProgram = f.try_into().unwrap();
        assert!(!prog.is_empty());
    }
}
