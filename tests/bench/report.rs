//! Medians, ratios and the Markdown results table.

use std::fmt::Write as _;

/// The three ways a client reaches the mailbox, in table order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Column {
    /// The backend's own POP3 (STLS) and Postfix's own submission (implicit TLS).
    Direct,
    /// The second Dovecot: imapc POP3 and submission relay.
    Dovecot,
    /// legacy-mail-proxy, spawned per connection.
    Proxy,
}

pub const COLUMNS: [Column; 3] = [Column::Direct, Column::Dovecot, Column::Proxy];

impl Column {
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn label(self) -> &'static str {
        match self {
            Column::Direct => "direct",
            Column::Dovecot => "Dovecot gateway",
            Column::Proxy => "proxy",
        }
    }
}

/// One timed run.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub secs: f64,
    /// Peak RSS (VmHWM) of the gateway process that served the session, if sampled.
    pub rss_kib: Option<u64>,
}

/// Everything measured for one workload.
pub struct Outcome {
    pub name: &'static str,
    /// What exactly ran, with the real sizes.
    pub what: String,
    /// Sessions per run: times are shown per session when more than one.
    pub sessions: usize,
    pub samples: [Vec<Sample>; 3],
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

/// Every sample, so the spread behind each median is visible.
pub fn samples(outcomes: &[Outcome]) -> String {
    let mut t = String::from(
        "| workload | column | seconds per run, in run order | min–max |\n|---|---|---|---|\n",
    );
    for o in outcomes {
        for c in super::report::COLUMNS {
            let secs = o.secs(c);
            let runs: Vec<String> = secs.iter().map(|s| format!("{s:.3}")).collect();
            let min = secs.iter().copied().fold(f64::INFINITY, f64::min);
            let max = secs.iter().copied().fold(0.0, f64::max);
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} – {} |",
                o.name,
                c.label(),
                runs.join(", "),
                o.time(min),
                o.time(max)
            );
        }
    }
    t
}

/// What each workload did.
pub fn workloads(outcomes: &[Outcome]) -> String {
    let mut t = String::new();
    for o in outcomes {
        let _ = writeln!(t, "- **{}**: {}", o.name, o.what);
    }
    t
}
