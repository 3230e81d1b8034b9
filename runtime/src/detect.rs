//! Detecting an agent's resources from the host when `--resources` is not given.

use cairn_kernel::model::{AgentResources, PortRange, Resources};
use std::path::Path;

/// The default range of ports an agent offers, as Mesos does.
pub const DEFAULT_PORTS: PortRange = PortRange {
    begin: 31000,
    end: 32000,
};

/// Reads cpus, memory (MemTotal) and free disk under `data_dir` from the host.
// statvfs field widths differ between platforms, so the casts are not always no-ops.
#[allow(clippy::unnecessary_cast)]
pub fn detect(data_dir: &Path) -> AgentResources {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| mem_total_mib(&s))
        .unwrap_or(0);
    let disk = nix::sys::statvfs::statvfs(data_dir)
        .map(|s| s.blocks_available() as u64 * s.fragment_size() as u64 / (1024 * 1024))
        .unwrap_or(0);
    AgentResources {
        unreserved: Resources {
            cpus,
            mem,
            disk,
            ports: vec![DEFAULT_PORTS],
        },
        reserved: Default::default(),
    }
}

/// Parses MemTotal (kB) out of /proc/meminfo, in MiB.
pub fn mem_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo() {
        assert_eq!(
            mem_total_mib("MemTotal:       24576000 kB\nMemFree: 1 kB\n"),
            Some(24000)
        );
        assert_eq!(mem_total_mib("nothing"), None);
    }

    #[test]
    fn detects_something_real() {
        let r = detect(Path::new("/"));
        assert!(r.unreserved.cpus >= 1.0);
        assert!(r.unreserved.mem > 0);
    }
}
