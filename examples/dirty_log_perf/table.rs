//! The tables: ours side by side, KVM's figures in the last column.

use std::time::Duration;

use crate::RunResult;

/// KVM's figures at each vCPU count (N, Y), seconds: Matlack, "[00/23] Extend Eager Page
/// Splitting to the shadow MMU", 2022-02-03 — `dirty_log_perf_test`, tdp_mmu=N, 1 GiB per
/// vCPU backed by 1 GiB HugeTLB, on Google's hardware.
pub(crate) type KvmRow = (usize, f64, f64);
pub(crate) const KVM_ITER1_DIRTY: &[KvmRow] = &[
    (2, 0.310786549, 0.058731929),
    (4, 0.419165587, 0.059615316),
    (8, 1.061233860, 0.060945457),
    (16, 2.852955595, 0.067069980),
    (32, 7.032750509, 0.078623606),
    (64, 16.501287504, 0.083914116),
];
pub(crate) const KVM_ENABLE: &[KvmRow] = &[
    (2, 0.001581619, 0.025699730),
    (4, 0.003138664, 0.051510208),
    (8, 0.006247177, 0.102960379),
    (16, 0.012603892, 0.206949435),
    (32, 0.026428036, 0.435855597),
    (64, 0.103826796, 1.199686530),
];
pub(crate) const KVM_ITER1_CLEAR: &[KvmRow] = &[
    (2, 0.001544730, 0.055327916),
    (4, 0.003145920, 0.111887354),
    (8, 0.006306964, 0.223920530),
    (16, 0.012681628, 0.447849488),
    (32, 0.026827560, 0.943874520),
    (64, 0.090461490, 2.664388025),
];
pub(crate) const KVM_ITER2_CLEAR: &[KvmRow] = &[
    (2, 0.015613726, 0.015771982),
    (4, 0.031456620, 0.031911594),
    (8, 0.063341572, 0.063837403),
    (16, 0.128409332, 0.127484064),
    (32, 0.255635696, 0.268837996),
    (64, 0.695572818, 0.700420727),
];

pub(crate) fn kvm(rows: &[KvmRow], vcpus: usize) -> Option<(f64, f64)> {
    rows.iter().find(|r| r.0 == vcpus).map(|&(_, n, y)| (n, y))
}

pub(crate) fn secs(d: Duration) -> String {
    format!("{:.9}s", d.as_secs_f64())
}

pub(crate) fn ratio(n: f64, y: f64) -> String {
    if y > 0.0 {
        format!("{:.2}", n / y)
    } else {
        "—".into()
    }
}

pub(crate) struct Table {
    pub(crate) rows: Vec<[String; 5]>,
}

impl Table {
    pub(crate) fn new() -> Self {
        Self { rows: Vec::new() }
    }

    pub(crate) fn time(
        &mut self,
        label: &str,
        n: Duration,
        y: Duration,
        kvm_ref: Option<(f64, f64)>,
    ) {
        let k = match kvm_ref {
            Some((kn, ky)) => format!("{kn:.9}s / {ky:.9}s = {}", ratio(kn, ky)),
            None => "—".into(),
        };
        self.rows.push([
            label.into(),
            secs(n),
            secs(y),
            ratio(n.as_secs_f64(), y.as_secs_f64()),
            k,
        ]);
    }

    pub(crate) fn count(&mut self, label: &str, n: u64, y: u64) {
        self.rows.push([
            label.into(),
            n.to_string(),
            y.to_string(),
            ratio(n as f64, y as f64),
            "—".into(),
        ]);
    }

    pub(crate) fn print(&self, title: &str) {
        println!("\n{title}\n");
        let head = [
            "",
            "eager_page_split=N",
            "eager_page_split=Y",
            "N/Y",
            "KVM's, 2022, their hardware: N / Y = N/Y",
        ];
        let mut w = head.map(|h| h.chars().count());
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |cells: [&str; 5]| {
            let mut s = String::from("|");
            for (i, c) in cells.iter().enumerate() {
                let pad = w[i] - c.chars().count();
                if i == 0 {
                    s += &format!(" {c}{} |", " ".repeat(pad));
                } else {
                    s += &format!(" {}{c} |", " ".repeat(pad));
                }
            }
            println!("{s}");
        };
        line(head);
        let mut sep = String::from("|");
        for (i, &n) in w.iter().enumerate() {
            sep += &if i == 0 {
                format!(" {} |", "-".repeat(n))
            } else {
                format!(" {}: |", "-".repeat(n - 1))
            };
        }
        println!("{sep}");
        for r in &self.rows {
            line([&r[0], &r[1], &r[2], &r[3], &r[4]]);
        }
    }
}

pub(crate) fn dirty_rows(
    t: &mut Table,
    n: &RunResult,
    y: &RunResult,
    vcpus: usize,
    with_kvm: bool,
) {
    for (i, (a, b)) in n.iterations.iter().zip(&y.iterations).enumerate() {
        let kvm_ref = (with_kvm && i == 0)
            .then(|| kvm(KVM_ITER1_DIRTY, vcpus))
            .flatten();
        t.time(
            &format!("Iteration {} dirty memory time", i + 1),
            a.dirty,
            b.dirty,
            kvm_ref,
        );
    }
    exit_rows(t, n, y);
}

/// Exits counted by the vCPUs, and how many of them the slow path (MMU write lock) handled.
pub(crate) fn exit_rows(t: &mut Table, n: &RunResult, y: &RunResult) {
    for (i, (a, b)) in n.iterations.iter().zip(&y.iterations).enumerate() {
        t.count(
            &format!("Iteration {} vCPU exits (counted)", i + 1),
            a.exits,
            b.exits,
        );
        t.count(
            &format!("Iteration {} exits to the slow path (write lock)", i + 1),
            a.stats.slow_faults,
            b.stats.slow_faults,
        );
    }
}
