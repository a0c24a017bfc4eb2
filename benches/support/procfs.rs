//! `/proc` (Linux only): CPU time of a process and of the whole machine,
//! resident memory, the CPU model and the machine's memory.

/// USER_HZ: 100 on every Linux architecture the benches run on.
pub const CLK_TCK: f64 = 100.0;

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// User plus system CPU seconds of a process, from /proc/<pid>/stat.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command: state is field 3; utime, stime are 14, 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / CLK_TCK)
}

/// The CPU time of one process, read again at each call.
pub struct ProcCpu {
    pid: u32,
}

impl ProcCpu {
    pub fn new(pid: u32) -> Self {
        ProcCpu { pid }
    }

    pub fn seconds(&self) -> Option<f64> {
        cpu_seconds(self.pid)
    }

    pub fn since(&self, start: Option<f64>) -> Option<f64> {
        Some(self.seconds()? - start?)
    }
}

/// Busy CPU seconds of the whole machine, summed over CPUs, from /proc/stat.
pub fn busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<f64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal …: busy is all but idle and iowait.
    let busy = f.get(..8)?.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum::<f64>();
    Some(busy / CLK_TCK)
}

/// A `kB` field of /proc/<pid>/status (VmRSS, VmHWM).
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.trim().strip_suffix("kB")?.trim().parse().ok())
}

pub fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// `MemTotal` of /proc/meminfo, in GiB (0 when unreadable).
pub fn mem_total_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0)
}
