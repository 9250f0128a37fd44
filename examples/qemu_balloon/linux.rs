//! The anchor: the same free-and-report workload in a Linux guest (Debian's 6.1 kernel,
//! `CONFIG_PAGE_REPORTING=y`, `virtio_balloon` as a module) under the same QEMU and device.
//!
//! The initramfs is built at run time: busybox from `busybox-static`, the virtio modules
//! the balloon needs (`virtio_mmio`, `virtio_balloon` and what their `depends=` modinfo
//! names, in dependency order — the package ships no `modules.dep`), and `workload.c`
//! compiled with `gcc -static`. Linux reports free memory of order >= 9 (pageblock order)
//! about 2 s after frees accumulate (`page_reporting_delay`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::qemu::{QemuBin, TempDir, Vm, VmConfig};
use crate::rss::{self, MIB};
use crate::table::ReportRow;

/// Where `scripts/qemu-fetch.sh --linux` unpacked the kernel and busybox.
pub(crate) fn root(repo: &Path) -> PathBuf {
    if let Some(root) = std::env::var_os("HVMEM_LINUX_ROOT") {
        return PathBuf::from(root);
    }
    std::env::var_os("HVMEM_QEMU_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("target/qemu"))
        .join("linux")
}

/// A newc ("070701") cpio archive, the format the kernel unpacks as an initramfs.
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn new() -> Cpio {
        Cpio {
            out: Vec::new(),
            ino: 1,
        }
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.ino += 1;
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, exec: bool, data: &[u8]) {
        self.entry(name, if exec { 0o100755 } else { 0o100644 }, (0, 0), data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

/// Every `<name>.ko` under `dir`, by module name (`-` and `_` are the same to modprobe).
fn find_modules(dir: &Path, out: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            find_modules(&path, out);
        } else if let Some(stem) = path.file_name().and_then(|n| n.to_str()) {
            if let Some(name) = stem.strip_suffix(".ko") {
                out.push((name.replace('-', "_"), path.clone()));
            }
        }
    }
}

/// The `depends=` field of a module's `.modinfo` section.
fn depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    let Some(at) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &ko[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect()
}

/// `wanted` and their dependencies, dependencies first: (name, contents).
fn modules(root: &Path, wanted: &[&str]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut all = Vec::new();
    find_modules(&root.join("lib/modules"), &mut all);
    let mut order: Vec<(String, Vec<u8>)> = Vec::new();
    fn visit(
        name: &str,
        all: &[(String, PathBuf)],
        order: &mut Vec<(String, Vec<u8>)>,
        depth: usize,
    ) -> Result<(), String> {
        if order.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        if depth > 16 {
            return Err(format!("module dependency loop at {name}"));
        }
        let path = all
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p)
            .ok_or_else(|| format!("module {name}.ko not found in the kernel package"))?;
        let ko = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for dep in depends(&ko) {
            visit(&dep, all, order, depth + 1)?;
        }
        order.push((name.to_string(), ko));
        Ok(())
    }
    for name in wanted {
        visit(name, &all, &mut order, 0)?;
    }
    Ok(order)
}

/// Compiles the workload and builds the initramfs into `dir`; returns (kernel, initrd).
fn prepare(repo: &Path, root: &Path, dir: &Path, mib: u64) -> Result<(PathBuf, PathBuf), String> {
    let boot = root.join("boot");
    let kernel = fs::read_dir(&boot)
        .map_err(|e| {
            format!(
                "{}: {e} (run scripts/qemu-fetch.sh --linux, or set HVMEM_LINUX_ROOT)",
                boot.display()
            )
        })?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| format!("no vmlinuz-* in {}", boot.display()))?;
    let busybox_path = root.join("bin/busybox");
    let busybox =
        fs::read(&busybox_path).map_err(|e| format!("{}: {e}", busybox_path.display()))?;

    let src = repo.join("examples/qemu_balloon/workload.c");
    let exe = dir.join("workload");
    let out = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .map_err(|e| format!("gcc: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "gcc -static {} failed: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let workload = fs::read(&exe).map_err(|e| format!("{}: {e}", exe.display()))?;

    let mods = modules(root, &["virtio_mmio", "virtio_balloon"])?;
    let mut init = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n",
    );
    for (name, _) in &mods {
        init.push_str(&format!(
            "insmod /lib/modules/{name}.ko || echo 'HVMEM-LINUX insmod {name} failed'\n"
        ));
    }
    init.push_str(&format!(
        "for d in /sys/bus/virtio/devices/*; do\n\
         \x20 [ \"$(cat $d/device)\" = 0x0005 ] && echo \"HVMEM-LINUX balloon features=$(cat $d/features)\"\n\
         done\n\
         echo HVMEM-LINUX READY\n\
         exec /workload {mib}\n"
    ));

    let mut cpio = Cpio::new();
    for d in ["bin", "dev", "proc", "sys", "lib", "lib/modules"] {
        cpio.dir(d);
    }
    cpio.entry("dev/console", 0o020600, (5, 1), &[]);
    cpio.file("bin/busybox", true, &busybox);
    cpio.file("init", true, init.as_bytes());
    cpio.file("workload", true, &workload);
    for (name, ko) in &mods {
        cpio.file(&format!("lib/modules/{name}.ko"), false, ko);
    }
    let initrd = dir.join("initrd.cpio");
    fs::write(&initrd, cpio.finish()).map_err(|e| format!("{}: {e}", initrd.display()))?;
    Ok((kernel, initrd))
}

/// The host's CPU clock in kHz (`cpu MHz` of `/proc/cpuinfo`), for `tsc_early_khz=`:
/// on microvm under TCG Linux has no PIT, HPET or PM timer to calibrate the TSC against
/// (QEMU's TCG TSC counts at the host's rate), and without the hint it hangs with its
/// clock stopped at 0.000000.
fn host_tsc_khz() -> u64 {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("cpu MHz"))
                .and_then(|v| {
                    v.trim_start_matches([' ', '\t', ':'])
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
        })
        .map(|mhz| (mhz * 1000.0) as u64)
        .unwrap_or(2_000_000)
}

/// Boots Linux with the workload touching `mib` MiB and measures what comes back.
pub(crate) fn run(bin: &QemuBin, repo: &Path, mem_mib: u64, mib: u64) -> Result<ReportRow, String> {
    let root = root(repo);
    let tmp = TempDir::new("linux")?;
    let (kernel, initrd) = prepare(repo, &root, tmp.path(), mib)?;
    let boot = Instant::now();
    let mut vm = Vm::start(
        bin,
        &VmConfig {
            mem_mib,
            kernel,
            initrd: Some(initrd),
            append: Some(format!(
                "console=ttyS0 rdinit=/init panic=-1 quiet loglevel=3 tsc_early_khz={}",
                host_tsc_khz()
            )),
            free_page_hint: true,
        },
    )?;
    let features = vm.wait_line("HVMEM-LINUX READY", Duration::from_secs(180), |l| {
        l.starts_with("HVMEM-LINUX balloon") || l.starts_with("HVMEM-LINUX READY")
    })?;
    if !features.starts_with("HVMEM-LINUX balloon") {
        return Err(vm.fail("Linux found no virtio-balloon device"));
    }
    // Bit 5 (VIRTIO_BALLOON_F_REPORTING) of the features string ("0110...", bit 0 first).
    if features.split('=').nth(1).and_then(|f| f.chars().nth(5)) != Some('1') {
        return Err(vm.fail(&format!(
            "Linux did not negotiate free page reporting: {features}"
        )));
    }
    vm.wait_line("HVMEM-LINUX READY", Duration::from_secs(60), |l| {
        l.starts_with("HVMEM-LINUX READY")
    })?;
    eprintln!("linux: booted in {:.1} s", boot.elapsed().as_secs_f64());
    vm.wait_line("WORKLOAD touched", Duration::from_secs(120), |l| {
        l.starts_with("WORKLOAD touched")
    })?;
    let touched = rss::rss(vm.pid)?;
    vm.wait_line("WORKLOAD freed", Duration::from_secs(60), |l| {
        l.starts_with("WORKLOAD freed")
    })?;
    let freed_at = Instant::now();
    let at_free = rss::rss(vm.pid)?;
    // Follow RSS for 12 s (Linux waits 2 s before reporting, then works in batches).
    let mut curve = Vec::new();
    while freed_at.elapsed() < Duration::from_secs(12) {
        curve.push((freed_at.elapsed(), rss::rss(vm.pid)?));
        std::thread::sleep(Duration::from_millis(10));
    }
    let low = curve.iter().map(|&(_, r)| r).min().unwrap_or(at_free);
    let dropped = at_free.saturating_sub(low);
    let goal = at_free.saturating_sub(dropped * 9 / 10);
    let time = curve.iter().find(|&&(_, r)| r <= goal).map(|&(t, _)| t);
    eprintln!(
        "linux: RSS {} at 'touched', {} at 'freed', {} 12 s later",
        rss::mib(touched),
        rss::mib(at_free),
        rss::mib(low)
    );
    drop(vm);
    Ok(ReportRow {
        guest: "Linux 6.1 (reference)".into(),
        freed: mib * MIB,
        reported: None,
        rss_drop: dropped as i64,
        free_to_drop: if dropped > 0 { time } else { None },
        reply_to_drop: None,
    })
}
