//! Plain-text tables (Markdown pipes, so they paste into BENCHMARKS.md as they are).

use std::time::Duration;

use crate::rss::{mib, mib_signed};

pub(crate) struct Table {
    title: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(title: &str, header: &[&str]) -> Table {
        Table {
            title: title.to_string(),
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(crate) fn print(&self) {
        let mut width: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, c) in row.iter().enumerate() {
                if let Some(w) = width.get_mut(i) {
                    *w = (*w).max(c.chars().count());
                }
            }
        }
        let line = |cells: &[String]| {
            let mut s = String::from("|");
            for (i, c) in cells.iter().enumerate() {
                let w = width.get(i).copied().unwrap_or(0);
                s.push_str(&format!(" {c:>w$} |"));
            }
            s
        };
        println!("\n{}\n", self.title);
        println!("{}", line(&self.header));
        let rule: Vec<String> = width.iter().map(|&w| "-".repeat(w)).collect();
        println!("{}", line(&rule).replace(" -", "--").replace("- ", "--"));
        for row in &self.rows {
            println!("{}", line(row));
        }
        println!();
    }
}

pub(crate) fn ms(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{:.0} ms", d.as_secs_f64() * 1e3),
        None => "—".into(),
    }
}

/// One row of the free page reporting table: hvmem's guest, or Linux's as the reference.
pub(crate) struct ReportRow {
    pub(crate) guest: String,
    pub(crate) freed: u64,
    pub(crate) reported: Option<u64>,
    pub(crate) rss_drop: i64,
    /// From the free (the `free` reply, Linux's "freed" marker) to 90% of the RSS drop.
    pub(crate) free_to_drop: Option<Duration>,
    /// From the `report` reply to the RSS drop (hvmem only).
    pub(crate) reply_to_drop: Option<Duration>,
}

pub(crate) fn report_table(rows: &[ReportRow]) -> Table {
    let mut t = Table::new(
        "Free page reporting (order >= 9): QEMU RSS returned",
        &[
            "guest",
            "freed",
            "reported",
            "RSS drop",
            "drop/reported",
            "free→drop",
            "report reply→drop",
        ],
    );
    for r in rows {
        let base = r.reported.unwrap_or(r.freed);
        let ratio = if base > 0 {
            format!(
                "{:.1}%{}",
                100.0 * r.rss_drop as f64 / base as f64,
                if r.reported.is_none() {
                    " of freed"
                } else {
                    ""
                }
            )
        } else {
            "—".into()
        };
        t.row(vec![
            r.guest.clone(),
            mib(r.freed),
            r.reported.map(mib).unwrap_or_else(|| "—".into()),
            mib_signed(r.rss_drop),
            ratio,
            ms(r.free_to_drop),
            ms(r.reply_to_drop),
        ]);
    }
    t
}
