//! Medians, ratios and the Markdown results tables: the LAN table (no latency relay) and,
//! for the WAN bench, one table per latency with the link's round trips, and the issue's
//! targets.

use crate::common::LinkStats;
use std::fmt::Write as _;

/// The ways a client reaches the mailbox, in table order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Column {
    /// The backend's own POP3S and Postfix's own submission (implicit TLS).
    Direct,
    /// The second Dovecot: imapc POP3 and submission relay.
    Dovecot,
    /// legacy-mail-proxy, spawned per connection.
    Proxy,
    /// An older legacy-mail-proxy binary (`LMP_BENCH_BASELINE`), spawned the same way.
    Baseline,
}

/// Every column, in table order.
pub const ALL_COLUMNS: [Column; 4] = [
    Column::Direct,
    Column::Dovecot,
    Column::Proxy,
    Column::Baseline,
];

impl Column {
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn label(self) -> &'static str {
        match self {
            Column::Direct => "direct",
            Column::Dovecot => "Dovecot gateway",
            Column::Proxy => "proxy",
            Column::Baseline => "proxy (before)",
        }
    }
}

/// One timed run.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub secs: f64,
    /// Peak RSS (VmHWM) of the gateway process that served the session, if sampled.
    pub rss_kib: Option<u64>,
    /// What crossed the column's latency relays during the run (WAN bench only).
    pub link: Option<LinkStats>,
}

/// Everything measured for one workload.
pub struct Outcome {
    pub name: &'static str,
    /// What exactly ran, with the real sizes.
    pub what: String,
    /// Sessions per run: times are shown per session when more than one.
    pub sessions: usize,
    /// Messages sent per run (SMTP), for round trips per message; 0 otherwise.
    pub messages: usize,
    /// One-way delay of the relays in ms; `None`: the LAN bench, without relays.
    pub latency_ms: Option<u64>,
    pub samples: [Vec<Sample>; 4],
    /// The RSS limit for this workload, in KiB.
    pub rss_limit_kib: Option<u64>,
}

pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl Outcome {
    fn secs(&self, c: Column) -> Vec<f64> {
        self.samples[c.index()].iter().map(|s| s.secs).collect()
    }

    pub fn median(&self, c: Column) -> f64 {
        median(&self.secs(c))
    }

    pub fn peak_rss(&self, c: Column) -> Option<u64> {
        self.samples[c.index()]
            .iter()
            .filter_map(|s| s.rss_kib)
            .max()
    }

    /// A time for display: per session in ms for many sessions, else in s.
    fn time(&self, secs: f64) -> String {
        if self.sessions > 1 {
            format!("{:.1} ms", secs * 1000.0 / self.sessions as f64)
        } else {
            format!("{secs:.2} s")
        }
    }

    pub fn ratio(&self, other: Column) -> f64 {
        self.median(Column::Proxy) / self.median(other)
    }
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("–".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

fn mark(ok: bool) -> &'static str {
    if ok { "✓" } else { "✗" }
}

/// The summary table (medians), one row per workload.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut t = String::new();
    t.push_str(
        "| workload | direct | Dovecot gateway | proxy | proxy ÷ direct (≤ 1.3) | \
         proxy ÷ Dovecot (≤ 1.0) | proxy peak RSS | Dovecot gateway peak RSS |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for o in outcomes {
        let direct = o.ratio(Column::Direct);
        let dovecot = o.ratio(Column::Dovecot);
        let rss = o.peak_rss(Column::Proxy);
        let rss_mark = match (o.rss_limit_kib, rss) {
            (Some(limit), Some(kib)) => format!(" {} (< {} MiB)", mark(kib < limit), limit / 1024),
            _ => String::new(),
        };
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {:.2} {} | {:.2} {} | {}{} | {} |",
            o.name,
            o.time(o.median(Column::Direct)),
            o.time(o.median(Column::Dovecot)),
            o.time(o.median(Column::Proxy)),
            direct,
            mark(direct <= 1.3),
            dovecot,
            mark(dovecot <= 1.0),
            mib(rss),
            rss_mark,
            mib(o.peak_rss(Column::Dovecot)),
        );
    }
    t
}

/// The proxy's ratio within each round (sample `i` of every column comes from round `i`,
/// run back to back): the spread shows how much of a ratio of medians is the machine's
/// noise. The targets are judged on the ratio of medians, in [`table`].
pub fn rounds(outcomes: &[Outcome]) -> String {
    let mut t = String::from(
        "| workload | proxy ÷ direct: median (min–max) | proxy ÷ Dovecot: median (min–max) |\n\
         |---|---|---|\n",
    );
    for o in outcomes {
        let spread = |other: Column| {
            let ratios: Vec<f64> = o
                .secs(Column::Proxy)
                .iter()
                .zip(o.secs(other))
                .map(|(proxy, other)| proxy / other)
                .collect();
            let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
            let max = ratios.iter().copied().fold(0.0, f64::max);
            format!("{:.2} ({min:.2}–{max:.2})", median(&ratios))
        };
        let _ = writeln!(
            t,
            "| {} | {} | {} |",
            o.name,
            spread(Column::Direct),
            spread(Column::Dovecot)
        );
    }
    t
}

/// Every sample, so the spread behind each median is visible; with the link's round
/// trips per run in the WAN bench.
pub fn samples(outcomes: &[Outcome]) -> String {
    let wan = outcomes.iter().any(|o| o.latency_ms.is_some());
    let mut t = String::from(if wan {
        "| workload | one way | column | seconds per run, in run order | min–max | link round trips per run |\n\
         |---|---:|---|---|---|---|\n"
    } else {
        "| workload | column | seconds per run, in run order | min–max |\n|---|---|---|---|\n"
    });
    for o in outcomes {
        for c in ALL_COLUMNS {
            let secs = o.secs(c);
            if secs.is_empty() {
                continue;
            }
            let runs: Vec<String> = secs.iter().map(|s| format!("{s:.3}")).collect();
            let min = secs.iter().copied().fold(f64::INFINITY, f64::min);
            let max = secs.iter().copied().fold(0.0, f64::max);
            let latency = o
                .latency_ms
                .map_or(String::new(), |ms| format!(" {ms} ms |"));
            let _ = write!(
                t,
                "| {} |{latency} {} | {} | {} – {} |",
                o.name,
                c.label(),
                runs.join(", "),
                o.time(min),
                o.time(max)
            );
            if wan {
                let trips: Vec<String> = o.samples[c.index()]
                    .iter()
                    .map(|s| {
                        s.link
                            .map_or("–".into(), |l| format!("{}", l.round_trips()))
                    })
                    .collect();
                let _ = write!(t, " {} |", trips.join(", "));
            }
            t.push('\n');
        }
    }
    t
}

/// What each workload did.
pub fn workloads(outcomes: &[Outcome]) -> String {
    let mut t = String::new();
    let mut seen: Vec<(&str, &str)> = Vec::new();
    for o in outcomes {
        // The WAN bench runs a workload once per latency, mostly with the same description.
        if seen.contains(&(o.name, o.what.as_str())) {
            continue;
        }
        seen.push((o.name, o.what.as_str()));
        let _ = writeln!(t, "- **{}**: {}", o.name, o.what);
    }
    t
}

impl Outcome {
    /// Median of the runs' link round trips, `None` without relays or runs.
    pub fn round_trips(&self, c: Column) -> Option<f64> {
        let trips: Vec<f64> = self.samples[c.index()]
            .iter()
            .filter_map(|s| s.link.map(|l| l.round_trips()))
            .collect();
        (!trips.is_empty()).then(|| median(&trips))
    }

    fn has(&self, c: Column) -> bool {
        !self.samples[c.index()].is_empty()
    }

    /// `self`'s median time for `over` divided by that for `under`, if both ran.
    fn speedup(&self, over: Column, under: Column) -> Option<f64> {
        (self.has(over) && self.has(under)).then(|| self.median(over) / self.median(under))
    }

    /// "time · round trips" for one cell of a WAN table: per session when the run has
    /// many, with round trips per message for SMTP.
    fn wan_cell(&self, c: Column) -> String {
        if !self.has(c) {
            return "–".into();
        }
        let time = self.time(self.median(c));
        let Some(trips) = self.round_trips(c) else {
            return time;
        };
        if self.sessions > 1 {
            format!("{time} · {:.1} RT", trips / self.sessions as f64)
        } else if self.messages > 0 {
            format!(
                "{time} · {trips} RT ({:.2}/msg)",
                trips / self.messages as f64
            )
        } else {
            format!("{time} · {trips} RT")
        }
    }
}

fn ratio(r: Option<f64>) -> String {
    r.map_or("–".into(), |r| format!("{r:.2}"))
}

/// The WAN bench's tables: one per latency, medians of time and of the link's round trips
/// (measured at the relays between each column and the backend), and the speed-ups.
pub fn wan_tables(outcomes: &[Outcome], latencies: &[u64]) -> String {
    let mut t = String::new();
    for &ms in latencies {
        let at: Vec<&Outcome> = outcomes
            .iter()
            .filter(|o| o.latency_ms == Some(ms))
            .collect();
        if at.is_empty() {
            continue;
        }
        let columns: Vec<Column> = ALL_COLUMNS
            .into_iter()
            .filter(|&c| at.iter().any(|o| o.has(c)))
            .collect();
        let _ = writeln!(t, "### {ms} ms one way ({} ms round trip)\n", 2 * ms);
        t.push_str("| workload | runs |");
        for c in &columns {
            let _ = write!(t, " {} |", c.label());
        }
        t.push_str(" direct ÷ proxy | Dovecot ÷ proxy |");
        if columns.contains(&Column::Baseline) {
            t.push_str(" proxy ÷ before |");
        }
        t.push_str(" proxy peak RSS |\n|---|---:|");
        t.push_str(&"---:|".repeat(columns.len() + 3));
        if columns.contains(&Column::Baseline) {
            t.push_str("---:|");
        }
        t.push('\n');
        for o in at {
            let _ = write!(
                t,
                "| {} | {} |",
                o.name,
                o.samples[Column::Proxy.index()].len()
            );
            for &c in &columns {
                let _ = write!(t, " {} |", o.wan_cell(c));
            }
            let _ = write!(
                t,
                " {} | {} |",
                ratio(o.speedup(Column::Direct, Column::Proxy)),
                ratio(o.speedup(Column::Dovecot, Column::Proxy))
            );
            if columns.contains(&Column::Baseline) {
                let _ = write!(
                    t,
                    " {} |",
                    ratio(o.speedup(Column::Proxy, Column::Baseline))
                );
            }
            let _ = writeln!(t, " {} |", mib(o.peak_rss(Column::Proxy)));
        }
        t.push('\n');
    }
    t
}

/// The targets (issue 14), each with what this run measured: met (✓), not met
/// (✗), or not measured in this run.
pub fn wan_targets(outcomes: &[Outcome]) -> String {
    const AT: u64 = 15;
    let find = |name: &str, ms: u64| {
        outcomes
            .iter()
            .find(|o| o.name == name && o.latency_ms == Some(ms))
    };
    let not_measured = "not measured in this run".to_string();
    let mut lines = Vec::new();
    let speedup = |name: &str, over: Column, at_least: f64| {
        find(name, AT)
            .and_then(|o| o.speedup(over, Column::Proxy))
            .map_or(not_measured.clone(), |r| {
                format!("{r:.2}× {}", mark(r >= at_least))
            })
    };
    lines.push(format!(
        "download of 2,000 messages at {AT} ms: proxy ≥ 5× faster than direct: {}; ≥ 3× \
         faster than the Dovecot gateway: {}",
        speedup("download", Column::Direct, 5.0),
        speedup("download", Column::Dovecot, 3.0)
    ));
    lines.push(format!(
        "connect/login/STAT/QUIT at {AT} ms: proxy no slower than direct (proxy ÷ direct ≤ \
         1.00): {}",
        find("connect", AT)
            .and_then(|o| o.speedup(Column::Proxy, Column::Direct))
            .map_or(not_measured.clone(), |r| format!(
                "{r:.2} {}",
                mark(r <= 1.0)
            ))
    ));
    lines.push(format!(
        "Outlook-style check at {AT} ms: proxy ≥ 3× faster than direct: {}",
        speedup("outlook", Column::Direct, 3.0)
    ));
    lines.push(format!(
        "SMTP 500 × 10 KB at {AT} ms: ≤ 2 link round trips per message through the proxy: {}",
        find("smtp-small", AT)
            .and_then(|o| Some(o.round_trips(Column::Proxy)? / o.messages as f64))
            .map_or(not_measured.clone(), |r| format!(
                "{r:.2} {}",
                mark(r <= 2.0)
            ))
    ));
    let rss: Vec<u64> = outcomes
        .iter()
        .filter(|o| o.name == "big-message")
        .filter_map(|o| o.peak_rss(Column::Proxy))
        .collect();
    lines.push(format!(
        "peak RSS of the proxy on the 50 MB message < 16 MiB (every latency): {}",
        rss.iter().max().map_or(not_measured.clone(), |&k| format!(
            "{} {}",
            mib(Some(k)),
            mark(k < 16 << 10)
        ))
    ));
    let at_zero: Vec<String> = outcomes
        .iter()
        .filter(|o| o.latency_ms == Some(0))
        .filter_map(|o| {
            let r = o.speedup(Column::Proxy, Column::Baseline)?;
            // Within 5 %: as close as this machine's noise lets a median tell.
            let verdict = if r <= 1.0 {
                "✓"
            } else if r <= 1.05 {
                "≈ (within 5 %)"
            } else {
                "✗"
            };
            Some(format!("{} {r:.2} {verdict}", o.name))
        })
        .collect();
    lines.push(format!(
        "no workload at 0 ms slower than before (proxy ÷ proxy (before) ≤ 1.00): {}",
        if at_zero.is_empty() {
            "not measured in this run (LMP_BENCH_BASELINE or LMP_BENCH_BASELINE_REV gives the \
             \"proxy (before)\" column)"
                .to_string()
        } else {
            at_zero.join("; ")
        }
    ));
    let mut t = String::new();
    for line in lines {
        let _ = writeln!(t, "- {line}");
    }
    t
}
