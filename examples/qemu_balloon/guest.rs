//! The hvmem guest: building it, and its serial protocol.
//!
//! Protocol lines start with `HVMEM `: `HVMEM READY key=value...` once at boot, exactly one
//! `HVMEM OK <cmd> key=value...` or `HVMEM ERR <cmd> <reason>` per command line, and
//! `HVMEM EVENT <kind> key=value...` for the idle loop's background work (balloon,
//! free page hints). Anything else the guest prints is kept only for failure reports.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::qemu::Vm;

/// The `key=value` words of a protocol line.
#[derive(Clone, Debug, Default)]
pub(crate) struct Fields {
    pub(crate) line: String,
    map: HashMap<String, String>,
}

impl Fields {
    pub(crate) fn parse(line: &str) -> Fields {
        let map = line
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Fields {
            line: line.to_string(),
            map,
        }
    }

    /// A numeric field (decimal, or hex with `0x`).
    pub(crate) fn num(&self, key: &str) -> Result<u64, String> {
        let v = self
            .map
            .get(key)
            .ok_or_else(|| format!("no '{key}=' in '{}'", self.line))?;
        let parsed = match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => v.parse(),
        };
        parsed.map_err(|e| format!("'{key}={v}' in '{}': {e}", self.line))
    }
}

/// A booted guest on a running QEMU.
pub(crate) struct Guest {
    pub(crate) vm: Vm,
    pub(crate) ready: Fields,
    events: VecDeque<Fields>,
}

impl Guest {
    /// Waits for `HVMEM READY`.
    pub(crate) fn boot(mut vm: Vm, timeout: Duration) -> Result<Guest, String> {
        let line = vm.wait_line("HVMEM READY", timeout, |l| l.starts_with("HVMEM READY"))?;
        Ok(Guest {
            vm,
            ready: Fields::parse(&line),
            events: VecDeque::new(),
        })
    }

    fn take(&mut self, line: String) -> Option<String> {
        if let Some(rest) = line.strip_prefix("HVMEM EVENT ") {
            self.events.push_back(Fields::parse(rest));
            None
        } else {
            Some(line)
        }
    }

    /// Sends `cmd` and returns the fields of its `HVMEM OK` reply; `HVMEM ERR` or a timeout
    /// is an error with the last serial lines.
    pub(crate) fn cmd(&mut self, cmd: &str, timeout: Duration) -> Result<Fields, String> {
        self.vm.send(cmd)?;
        let deadline = Instant::now() + timeout;
        let word = cmd
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        loop {
            let Some(line) = self.vm.line_until(deadline)? else {
                return Err(self.vm.fail(&format!(
                    "timed out after {:.0} s waiting for the reply to '{cmd}'",
                    timeout.as_secs_f64()
                )));
            };
            let Some(line) = self.take(line) else {
                continue;
            };
            if let Some(rest) = line.strip_prefix("HVMEM OK ") {
                if rest.split_whitespace().next() != Some(word.as_str()) {
                    return Err(self.vm.fail(&format!("'{cmd}' got the reply '{line}'")));
                }
                return Ok(Fields::parse(rest));
            }
            if line.starts_with("HVMEM ERR ") {
                return Err(self.vm.fail(&format!("'{cmd}' failed: {line}")));
            }
        }
    }

    /// The next `HVMEM EVENT <kind>` satisfying `want` (events already read first).
    pub(crate) fn event(
        &mut self,
        kind: &str,
        timeout: Duration,
        mut want: impl FnMut(&Fields) -> bool,
    ) -> Result<Fields, String> {
        let is = |f: &Fields, want: &mut dyn FnMut(&Fields) -> bool| {
            f.line.split_whitespace().next() == Some(kind) && want(f)
        };
        if let Some(i) = self.events.iter().position(|f| is(f, &mut want)) {
            if let Some(f) = self.events.remove(i) {
                return Ok(f);
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            let Some(line) = self.vm.line_until(deadline)? else {
                return Err(self.vm.fail(&format!(
                    "timed out after {:.0} s waiting for HVMEM EVENT {kind}",
                    timeout.as_secs_f64()
                )));
            };
            if let Some(rest) = line.strip_prefix("HVMEM EVENT ") {
                let f = Fields::parse(rest);
                if is(&f, &mut want) {
                    return Ok(f);
                }
                self.events.push_back(f);
            }
        }
    }

    /// Reads what the guest printed so far without waiting (queues its events).
    pub(crate) fn drain(&mut self) -> Result<(), String> {
        while let Some(line) = self.vm.line_until(Instant::now())? {
            self.take(line);
        }
        Ok(())
    }

    /// Every queued event of `kind` (removed from the queue).
    pub(crate) fn take_events(&mut self, kind: &str) -> Vec<Fields> {
        let (mine, rest): (Vec<Fields>, Vec<Fields>) = self
            .events
            .drain(..)
            .partition(|f| f.line.split_whitespace().next() == Some(kind));
        self.events = rest.into();
        mine
    }
}

/// Why the guest cannot be built here (`None`: nightly with `rust-src` is installed).
pub(crate) fn toolchain_missing() -> Option<String> {
    let out = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .stderr(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let sysroot = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
            let src = sysroot.join("lib/rustlib/src/rust/library/core");
            if src.is_dir() {
                None
            } else {
                Some("the nightly toolchain has no rust-src component".into())
            }
        }
        _ => Some("no nightly toolchain (rustup toolchain install nightly)".into()),
    }
}

/// Builds the guest in `dir` (a cargo workspace with the `hvmem-guest` package) and
/// returns the path of its ELF.
pub(crate) fn build(dir: &Path) -> Result<PathBuf, String> {
    if !dir.join("Cargo.toml").is_file() {
        return Err(format!(
            "no guest workspace at {} (HVMEM_GUEST_DIR overrides)",
            dir.display()
        ));
    }
    let start = Instant::now();
    let mut cmd = Command::new("cargo");
    cmd.current_dir(dir)
        .args(["+nightly", "build", "--release", "-p", "hvmem-guest"])
        .args([
            "-Zbuild-std=core,alloc",
            "-Zbuild-std-features=compiler-builtins-mem",
        ])
        .args(["--target", "x86_64-unknown-none"])
        .args(["--message-format=json-render-diagnostics"])
        // What `cargo run` of this runner exported must not steer the nested build.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .stderr(Stdio::inherit());
    let out = cmd.output().map_err(|e| format!("cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "guest build failed in {} ({})",
            dir.display(),
            out.status
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "hvmem-guest" {
            if let Some(exe) = msg["executable"].as_str() {
                eprintln!(
                    "guest built in {:.1} s: {exe}",
                    start.elapsed().as_secs_f64()
                );
                return Ok(PathBuf::from(exe));
            }
        }
    }
    Err("guest build produced no hvmem-guest executable".into())
}
