//! Finding QEMU, starting it, its serial port (`-serial stdio` on pipes) and its QMP socket.
//!
//! A [`Vm`] owns the QEMU process and a private temporary folder (QMP socket, QEMU's
//! stderr); dropping it kills QEMU, reaps it and removes the folder, so every exit path of
//! the runner — an error, a failed claim, a panic unwinding — leaves nothing behind.

use std::collections::VecDeque;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use crate::qmp::Qmp;

/// How many serial lines a failure prints.
const TAIL: usize = 20;

/// A QEMU binary and what it needs to run from an unpacked package tree.
#[derive(Clone, Debug)]
pub(crate) struct QemuBin {
    pub(crate) path: PathBuf,
    /// `LD_LIBRARY_PATH` for a binary unpacked by `scripts/qemu-fetch.sh`.
    pub(crate) ld_path: Option<String>,
    /// The `-L` firmware folder of such a tree.
    pub(crate) firmware: Option<PathBuf>,
}

impl QemuBin {
    /// `$HVMEM_QEMU` (a binary; with `$HVMEM_QEMU_LD_LIBRARY_PATH`, `$HVMEM_QEMU_FIRMWARE`), else
    /// the tree `scripts/qemu-fetch.sh` unpacked into `${HVMEM_QEMU_DIR:-<repo>/target/qemu}`,
    /// else `qemu-system-x86_64` on `PATH`. `Err` says why none was found.
    pub(crate) fn find(repo: &Path) -> Result<QemuBin, String> {
        if let Some(path) = std::env::var_os("HVMEM_QEMU") {
            let path = PathBuf::from(path);
            if !path.is_file() {
                return Err(format!("HVMEM_QEMU={} is not a file", path.display()));
            }
            return Ok(QemuBin {
                path,
                ld_path: std::env::var("HVMEM_QEMU_LD_LIBRARY_PATH").ok(),
                firmware: std::env::var_os("HVMEM_QEMU_FIRMWARE").map(PathBuf::from),
            });
        }
        let dir = std::env::var_os("HVMEM_QEMU_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo.join("target/qemu"));
        let root = dir.join("root");
        let path = root.join("usr/bin/qemu-system-x86_64");
        if path.is_file() {
            let mut dirs = Vec::new();
            lib_dirs(&root, &mut dirs);
            dirs.sort();
            dirs.dedup();
            let mut ld: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            if let Ok(old) = std::env::var("LD_LIBRARY_PATH") {
                ld.push(old);
            }
            return Ok(QemuBin {
                path,
                ld_path: Some(ld.join(":")),
                firmware: Some(root.join("usr/share/qemu")),
            });
        }
        let on_path = std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("qemu-system-x86_64"))
                .find(|p| p.is_file())
        });
        match on_path {
            Some(path) => Ok(QemuBin {
                path,
                ld_path: None,
                firmware: None,
            }),
            None => Err(format!(
                "QEMU not found (no {}, no qemu-system-x86_64 on PATH; run scripts/qemu-fetch.sh)",
                path.display()
            )),
        }
    }

    pub(crate) fn command(&self) -> Command {
        let mut cmd = Command::new(&self.path);
        if let Some(ld) = &self.ld_path {
            cmd.env("LD_LIBRARY_PATH", ld);
        }
        if let Some(fw) = &self.firmware {
            cmd.arg("-L").arg(fw);
        }
        cmd
    }

    /// The first line of `--version`.
    pub(crate) fn version(&self) -> Result<String, String> {
        let out = self
            .command()
            .arg("--version")
            .output()
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} --version failed: {}",
                self.path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string())
    }
}

/// QEMU gets SIGKILL when the runner dies, even by a signal no destructor sees (a CI
/// timeout's SIGTERM, Ctrl-C).
#[allow(unsafe_code)]
fn kill_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and calls only prctl(2),
    // which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Every folder under `dir` that holds a shared library.
fn lib_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(ft) = entry.file_type() else { continue };
        if ft.is_dir() {
            lib_dirs(&path, out);
        } else if entry.file_name().to_string_lossy().contains(".so") {
            out.push(dir.to_path_buf());
        }
    }
}

/// A private temporary folder, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    /// `hvmem-<tag>-<our pid>-<n>` in the system's temporary folder; folders left by
    /// runs killed before their destructors ran (their pid is gone) are removed first.
    pub(crate) fn new(tag: &str) -> Result<TempDir, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let prefix = format!("hvmem-{tag}-");
        if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let pid = name
                    .strip_prefix(&prefix)
                    .and_then(|rest| rest.split('-').next())
                    .and_then(|pid| pid.parse::<u32>().ok());
                if let Some(pid) = pid {
                    if !Path::new(&format!("/proc/{pid}")).exists() {
                        let _ = fs::remove_dir_all(entry.path());
                    }
                }
            }
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("hvmem-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(TempDir(path))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// What to boot.
pub(crate) struct VmConfig {
    pub(crate) mem_mib: u64,
    pub(crate) kernel: PathBuf,
    pub(crate) initrd: Option<PathBuf>,
    pub(crate) append: Option<String>,
    pub(crate) free_page_hint: bool,
}

/// A running QEMU: serial lines in, commands out, QMP, killed on drop.
pub(crate) struct Vm {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    tail: VecDeque<String>,
    echo: bool,
    pub(crate) qmp: Qmp,
    pub(crate) pid: u32,
    dir: TempDir,
}

impl Vm {
    /// The QEMU command line of the plan: `-M microvm`, TCG, one vCPU, virtio-mmio in
    /// version 2, the balloon with free page reporting and (optionally) free page hinting
    /// on an iothread, the serial port on stdio, QMP on a Unix socket.
    pub(crate) fn start(bin: &QemuBin, cfg: &VmConfig) -> Result<Vm, String> {
        let dir = TempDir::new("qemu")?;
        let sock = dir.path().join("qmp.sock");
        let stderr = fs::File::create(dir.path().join("stderr"))
            .map_err(|e| format!("qemu stderr file: {e}"))?;
        let mut cmd = bin.command();
        cmd.args(["-M", "microvm", "-accel", "tcg", "-smp", "1"])
            .arg("-m")
            .arg(format!("{}M", cfg.mem_mib))
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-serial", "stdio", "-no-reboot"])
            .args(["-global", "virtio-mmio.force-legacy=false"])
            .args(["-object", "iothread,id=io0", "-device"])
            .arg(format!(
                "virtio-balloon-device,free-page-reporting=on,free-page-hint={},iothread=io0",
                if cfg.free_page_hint { "on" } else { "off" }
            ))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .arg("-kernel")
            .arg(&cfg.kernel);
        if let Some(initrd) = &cfg.initrd {
            cmd.arg("-initrd").arg(initrd);
        }
        if let Some(append) = &cfg.append {
            cmd.arg("-append").arg(append);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        kill_with_parent(&mut cmd);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.path.display()))?;
        let pid = child.id();
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err("qemu: no stdio pipes".into());
        };
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        let line = line.trim_end_matches(['\r', '\n']).to_string();
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        // The socket exists once QEMU has parsed its options; retry until then.
        let deadline = Instant::now() + Duration::from_secs(20);
        let qmp = loop {
            match Qmp::connect(&sock) {
                Ok(q) => break q,
                Err(e) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        let err = fs::read_to_string(dir.path().join("stderr")).unwrap_or_default();
                        return Err(format!("qemu exited at start ({status}): {}", err.trim()));
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(format!("qmp: {e}"));
                    }
                    thread::sleep(Duration::from_millis(50));
                }
            }
        };
        Ok(Vm {
            child,
            stdin,
            lines,
            tail: VecDeque::new(),
            echo: std::env::var_os("HVMEM_VERBOSE").is_some(),
            qmp,
            pid,
            dir,
        })
    }

    /// Writes one line to the guest's serial input.
    pub(crate) fn send(&mut self, line: &str) -> Result<(), String> {
        if self.echo {
            eprintln!("  >> {line}");
        }
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| self.stdin.flush())
            .map_err(|e| self.fail(&format!("serial write '{line}': {e}")))
    }

    /// The next serial line, or `None` once `deadline` passed; `Err` when QEMU is gone.
    pub(crate) fn line_until(&mut self, deadline: Instant) -> Result<Option<String>, String> {
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(wait) {
            Ok(line) => {
                if self.echo {
                    eprintln!("  << {line}");
                }
                if self.tail.len() == TAIL {
                    self.tail.pop_front();
                }
                self.tail.push_back(line.clone());
                Ok(Some(line))
            }
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                Err(self.fail(&format!("qemu exited ({status})")))
            }
        }
    }

    /// Reads lines until one satisfies `want`; on timeout the error names `what`.
    pub(crate) fn wait_line(
        &mut self,
        what: &str,
        timeout: Duration,
        mut want: impl FnMut(&str) -> bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.line_until(deadline)? {
                Some(line) if want(&line) => return Ok(line),
                Some(_) => {}
                None => {
                    return Err(self.fail(&format!(
                        "timed out after {:.0} s waiting for {what}",
                        timeout.as_secs_f64()
                    )));
                }
            }
        }
    }

    /// `msg`, the last serial lines and QEMU's stderr: what a failure prints.
    pub(crate) fn fail(&self, msg: &str) -> String {
        let mut s = format!("{msg}\n  last {} serial lines:", self.tail.len());
        for line in &self.tail {
            s.push_str("\n  | ");
            s.push_str(line);
        }
        let err = fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default();
        if !err.trim().is_empty() {
            s.push_str("\n  qemu stderr: ");
            s.push_str(err.trim());
        }
        s
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
