//! QEMU's own memory, as the host kernel accounts it: the process's RSS from
//! `/proc/<pid>/smaps_rollup`, and the guest RAM mapping's Rss and AnonHugePages from
//! `/proc/<pid>/smaps` (the anonymous mapping closest in size to the guest's RAM).

use std::fs;
use std::time::{Duration, Instant};

pub(crate) const MIB: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Sample {
    /// The whole process, bytes.
    pub(crate) rss: u64,
    /// The guest RAM mapping's Rss and AnonHugePages, bytes, when it was found.
    pub(crate) ram: Option<(u64, u64)>,
}

impl Sample {
    pub(crate) fn thp(&self) -> Option<u64> {
        self.ram.map(|(_, thp)| thp)
    }
}

fn kb_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kb| kb * 1024)
}

/// The process's RSS, bytes.
pub(crate) fn rss(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    kb_field(&text, "Rss:").ok_or_else(|| format!("{path}: no Rss line"))
}

/// The guest RAM mapping's (Rss, AnonHugePages), bytes: the anonymous mapping (no path)
/// whose size is at least `ram_bytes` and closest to it.
pub(crate) fn ram_mapping(pid: u32, ram_bytes: u64) -> Option<(u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut best: Option<(u64, u64, u64)> = None; // (size, rss, thp)
    let mut cur: Option<(u64, bool)> = None; // (size, anonymous)
    let mut rss = 0;
    let mut finish = |cur: Option<(u64, bool)>, rss: u64, thp: u64| {
        if let Some((size, true)) = cur {
            if size >= ram_bytes && best.is_none_or(|b| size < b.0) {
                best = Some((size, rss, thp));
            }
        }
    };
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if let Some((lo, hi)) = first.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) {
                // A new mapping header: address perms offset dev inode [path].
                let anonymous = words.nth(4).is_none();
                cur = Some((hi - lo, anonymous));
                rss = 0;
                continue;
            }
        }
        if let Some(v) = kb_field(line, "Rss:") {
            rss = v;
        } else if let Some(thp) = kb_field(line, "AnonHugePages:") {
            finish(cur, rss, thp);
        }
    }
    best.map(|(_, rss, thp)| (rss, thp))
}

pub(crate) fn sample(pid: u32, ram_bytes: u64) -> Result<Sample, String> {
    Ok(Sample {
        rss: rss(pid)?,
        ram: ram_mapping(pid, ram_bytes),
    })
}

/// Polls RSS every 10 ms until `done(rss)` or `timeout`; returns the last RSS and the time
/// it took (`None` when it timed out).
pub(crate) fn wait_rss(
    pid: u32,
    timeout: Duration,
    mut done: impl FnMut(u64) -> bool,
) -> Result<(u64, Option<Duration>), String> {
    let start = Instant::now();
    loop {
        let now = rss(pid)?;
        if done(now) {
            return Ok((now, Some(start.elapsed())));
        }
        if start.elapsed() > timeout {
            return Ok((now, None));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

pub(crate) fn mib_signed(bytes: i64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}
