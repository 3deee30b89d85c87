//! The benchmark (issues 5 and 14): this proxy side by side with direct access and with
//! Dovecot used as the same kind of gateway, in one run, on the same backend and the same
//! data.
//!
//! Not part of the test suite: the one test here is `#[ignore]`d and asserts nothing about
//! time. Run it with `sudo ./tests/bench/run` (the LAN bench: everything on 127.0.0.1,
//! writes `tests/bench/RESULTS.md`) or `sudo ./tests/bench/wan` (the WAN bench: the backend
//! behind a latency relay, writes `tests/bench/RESULTS-wan.md`); both build in release mode
//! and start the servers (the harness in `tests/common`).
//!
//! Columns, each reached by the same client code (`client.rs`):
//! - **direct**: the backend Dovecot's own POP3S and Postfix's own submission (both
//!   implicit TLS). This is the floor on a LAN.
//! - **Dovecot gateway**: a second Dovecot (`common::gateway`) whose POP3 reads the backend
//!   with imapc and whose submission relays to Postfix; plain text from the client.
//! - **proxy**: `legacy-mail-proxy`, spawned for every connection with the socket on
//!   stdin/stdout (`common::Inetd`, as inetd does); plain text from the client.
//! - **proxy (before)**: only with `LMP_BENCH_BASELINE=/path/to/an/older/binary`, that
//!   binary with the same options, so before/after figures come from one run.
//!
//! So every path encrypts exactly once: the direct client talks TLS to the server, while a
//! legacy client talks plain text on the LAN (loopback here) to a gateway that talks
//! implicit TLS to the backend, verified against the test CA. Both gateways log in with the
//! client's own user and password.
//!
//! The WAN bench (`LMP_BENCH_LATENCIES`, one-way delays in ms, e.g. `0,15,40`) puts a
//! `common::LatencyRelay` on every path between a column and the backend: between the
//! direct client and Dovecot/Postfix, and between each gateway (on the client's side of
//! the link, as on a customer's LAN) and Dovecot/Postfix. Each column has relays of its
//! own, so every run also reports the link's round trips that column cost. Each latency
//! is a pass over the workloads, in the order given; the relays' delay changes between
//! passes. Because a direct 2,000-message download costs one round trip per message
//! (60 s at 30 ms RTT), passes at a latency other than 0 run `LMP_BENCH_WAN_REPS` (default
//! 3) timed runs, `download` and `smtp-small` run once and only up to 20 ms, `connect` has
//! 20 sessions instead of 300 (100 in the WAN bench's 0 ms pass), and "proxy (before)" runs
//! only at 0 ms. The WAN bench's script sets 5 timed runs at 0 ms.
//!
//! Method: one untimed warm-up per column and workload in the first pass (it fills
//! Dovecot's caches and the gateway's imapc index), then the timed runs, the columns in a
//! rotating order so none always runs first. The figure is the median. Peak RSS is
//! `VmHWM` of the process serving the session, read just before QUIT (that read is not
//! timed). SMTP runs wait, untimed, until Postfix has delivered every message into the
//! backend, then the messages are expunged, so one run's deliveries never overlap the next.
//!
//! Environment: `LMP_BENCH_SCALE` (default 1) scales message counts and sizes for quick
//! trials, `LMP_BENCH_REPS` (timed runs without latency, default 11), `LMP_BENCH_WAN_REPS`,
//! `LMP_BENCH_LATENCIES`, `LMP_BENCH_BASELINE`, `LMP_BENCH_ONLY` (comma-separated workload
//! names), `LMP_BENCH_RESULTS` (file for the Markdown results), and `LMP_BENCH_WRAP`: a
//! command prefix for every proxy process, for profiling, e.g.
//! `valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p` or
//! `perf record -e cpu-clock -g -o /tmp/perf.$$ --` (peak RSS is then not sampled).

#[path = "../common/mod.rs"]
mod common;

mod client;
mod corpus;
mod report;

use client::{Endpoint, Pop3, Smtp, Tls};
use common::{Gateway, Inetd, LatencyRelay, LinkStats, User, postfix, proxy_bin, servers};
use report::{ALL_COLUMNS, Column, Outcome, Sample};
use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const CONNECT: &str = "connect";
const DOWNLOAD: &str = "download";
const OUTLOOK: &str = "outlook";
const BIG: &str = "big-message";
const MAILBOX: &str = "big-mailbox";
const SMTP_SMALL: &str = "smtp-small";
const SMTP_LARGE: &str = "smtp-large";
const WORKLOADS: [&str; 7] = [
    CONNECT, DOWNLOAD, OUTLOOK, BIG, MAILBOX, SMTP_SMALL, SMTP_LARGE,
];

/// Workloads of a minute or more per run across a link (one round trip per message): run
/// once per latency, and only up to [`LONG_MAX_MS`].
const LONG: [&str; 2] = [DOWNLOAD, SMTP_SMALL];
const LONG_MAX_MS: u64 = 20;

/// Sessions of the `connect` workload: in the LAN bench, in the WAN bench's 0 ms pass (a
/// third, for its time budget), and with latency.
const CONNECT_SESSIONS: usize = 300;
const CONNECT_SESSIONS_WAN_0: usize = 100;
const CONNECT_SESSIONS_WAN: usize = 20;

/// Messages the Outlook-style check downloads: the newest ones.
const OUTLOOK_NEWEST: u64 = 20;

struct Settings {
    scale: f64,
    reps: usize,
    wan_reps: usize,
    /// One-way delays in ms; empty: the LAN bench, without relays.
    latencies: Vec<u64>,
    baseline: Option<PathBuf>,
    only: Vec<String>,
    results: Option<PathBuf>,
}

impl Settings {
    fn from_env() -> Settings {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let count = |name: &str, default: usize| {
            var(name).map_or(default, |v| {
                v.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| panic!("{name} must be a positive whole number"))
            })
        };
        let scale = var("LMP_BENCH_SCALE").map_or(1.0, |v| {
            v.parse::<f64>()
                .ok()
                .filter(|s| *s > 0.0)
                .expect("LMP_BENCH_SCALE must be a positive number")
        });
        let only: Vec<String> = var("LMP_BENCH_ONLY")
            .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
            .unwrap_or_default();
        for name in &only {
            assert!(
                WORKLOADS.contains(&name.as_str()),
                "LMP_BENCH_ONLY: unknown workload {name}; known: {}",
                WORKLOADS.join(", ")
            );
        }
        let latencies = var("LMP_BENCH_LATENCIES")
            .map(|v| {
                v.split(',')
                    .map(|ms| {
                        ms.trim().parse::<u64>().unwrap_or_else(|_| {
                            panic!("LMP_BENCH_LATENCIES: {ms:?} is not a whole number of ms")
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let baseline = var("LMP_BENCH_BASELINE").map(PathBuf::from);
        if let Some(path) = &baseline {
            assert!(
                path.is_file(),
                "LMP_BENCH_BASELINE: {} is not a file",
                path.display()
            );
        }
        Settings {
            scale,
            reps: count("LMP_BENCH_REPS", 11),
            wan_reps: count("LMP_BENCH_WAN_REPS", 3),
            latencies,
            baseline,
            only,
            results: var("LMP_BENCH_RESULTS").map(PathBuf::from),
        }
    }

    /// `full` scaled, at least 1.
    fn n(&self, full: usize) -> usize {
        ((full as f64 * self.scale).round() as usize).max(1)
    }

    fn wants(&self, workload: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|w| w == workload)
    }

    fn wan(&self) -> bool {
        !self.latencies.is_empty()
    }
}

/// One pass over the workloads: at one latency, or the LAN bench's only pass.
#[derive(Clone, Copy)]
struct Pass {
    latency_ms: Option<u64>,
    /// The first pass warms every column and workload up, untimed.
    first: bool,
}

impl Pass {
    fn across_a_link(self) -> bool {
        self.latency_ms.is_some_and(|ms| ms > 0)
    }
}

#[test]
#[ignore = "benchmark, minutes long: run ./tests/bench/run or ./tests/bench/wan"]
fn benchmark() {
    let settings = Settings::from_env();
    let load_before = loadavg();
    let started = Instant::now();
    let mut bench = Bench::new(settings);
    bench.run();
    let outcomes = std::mem::take(&mut bench.outcomes);
    let text = results(&bench.settings, &outcomes, &load_before, started.elapsed());
    println!("\n{text}");
    if let Some(path) = &bench.settings.results {
        fs::write(path, &text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        println!("results written to {}", path.display());
    }
}

/// How one column reaches the backend: where its client connects for POP3 and for
/// submission, the relays on its side of the link, and the processes serving it.
struct Route {
    pop3: Endpoint,
    smtp: Endpoint,
    relays: Vec<LatencyRelay>,
    /// The proxy's per-connection listeners (proxy columns only), for their logs.
    inetds: Vec<Inetd>,
    /// The gateway Dovecot (its column only).
    gateway: Option<Gateway>,
    /// The serving process's name in /proc (proxy columns only): at most 15 bytes of its
    /// program's file name.
    comm: String,
}

impl Route {
    fn link(&self) -> Option<LinkStats> {
        (!self.relays.is_empty()).then(|| {
            self.relays
                .iter()
                .map(LatencyRelay::stats)
                .fold(LinkStats::default(), |sum, s| sum + s)
        })
    }
}

struct Bench {
    settings: Settings,
    tls: native_tls::TlsConnector,
    outcomes: Vec<Outcome>,
    routes: Vec<Option<Route>>,
    pass: Pass,
    /// Mailboxes, seeded on first use and shared by the passes, with their size in octets.
    users: Vec<(&'static str, User, usize)>,
}

/// A session failed: the benchmark stops with the reason.
fn fail(workload: &str, column: Column, error: String) -> ! {
    panic!(
        "{workload} via {}: {error}\n(server logs: LMP_TEST_KEEP=1 keeps {})",
        column.label(),
        servers().dir.display()
    )
}

/// A plain-text endpoint on 127.0.0.1 (the gateways' side of the LAN).
fn plain(port: u16) -> Endpoint {
    Endpoint {
        port,
        tls: Tls::None,
    }
}

impl Bench {
    fn new(settings: Settings) -> Bench {
        let s = servers();
        let p = postfix();
        let wan = settings.wan();
        // The backend port itself, or a relay in front of it.
        let link = |relays: &mut Vec<LatencyRelay>, port: u16| {
            if !wan {
                return port;
            }
            let relay = LatencyRelay::start(port, Duration::ZERO);
            let port = relay.port();
            relays.push(relay);
            port
        };
        let mut routes: Vec<Option<Route>> = Vec::new();
        for c in ALL_COLUMNS {
            let mut relays = Vec::new();
            let imap_port = link(&mut relays, s.imaps_port);
            let submissions_port = link(&mut relays, p.submissions_port);
            let route = match c {
                Column::Direct => {
                    // The direct client speaks POP3S, not IMAP: its relay goes there.
                    relays.clear();
                    let pop3s_port = link(&mut relays, s.pop3s_port);
                    let submissions_port = link(&mut relays, p.submissions_port);
                    Some(Route {
                        pop3: Endpoint {
                            port: pop3s_port,
                            tls: Tls::Implicit,
                        },
                        smtp: Endpoint {
                            port: submissions_port,
                            tls: Tls::Implicit,
                        },
                        relays,
                        inetds: Vec::new(),
                        gateway: None,
                        comm: String::new(),
                    })
                }
                Column::Dovecot => {
                    let g = Gateway::start_via("bench-gateway", imap_port, submissions_port);
                    Some(Route {
                        pop3: plain(g.pop3_port),
                        smtp: plain(g.submission_port),
                        relays,
                        inetds: Vec::new(),
                        gateway: Some(g),
                        comm: String::new(),
                    })
                }
                Column::Proxy | Column::Baseline => {
                    let program = match c {
                        Column::Baseline => match &settings.baseline {
                            Some(path) => path.display().to_string(),
                            None => continue,
                        },
                        _ => proxy_bin().to_string(),
                    };
                    let pop3 = spawn_per_connection(&program, &pop3_args(imap_port));
                    let smtp = spawn_per_connection(&program, &smtp_args(submissions_port));
                    Some(Route {
                        pop3: plain(pop3.port),
                        smtp: plain(smtp.port),
                        relays,
                        inetds: vec![pop3, smtp],
                        gateway: None,
                        comm: program_comm(&program),
                    })
                }
            };
            routes.push(route);
        }
        routes.resize_with(ALL_COLUMNS.len(), || None);
        Bench {
            tls: client::connector(&s.ca_file),
            settings,
            outcomes: Vec::new(),
            routes,
            pass: Pass {
                latency_ms: None,
                first: true,
            },
            users: Vec::new(),
        }
    }

    fn run(&mut self) {
        let passes: Vec<Option<u64>> = if self.settings.wan() {
            self.settings.latencies.iter().copied().map(Some).collect()
        } else {
            vec![None]
        };
        for (i, latency_ms) in passes.into_iter().enumerate() {
            self.pass = Pass {
                latency_ms,
                first: i == 0,
            };
            let one_way = Duration::from_millis(latency_ms.unwrap_or(0));
            for route in self.routes.iter().flatten() {
                for relay in &route.relays {
                    relay.set_delay(one_way);
                }
            }
            if let Some(ms) = latency_ms {
                eprintln!("=== {ms} ms one way ===");
            }
            self.pop3_workloads();
            self.smtp_workloads();
        }
    }

    /// Whether this pass runs `workload`.
    fn runs(&self, workload: &str) -> bool {
        let too_long =
            LONG.contains(&workload) && self.pass.latency_ms.is_some_and(|ms| ms > LONG_MAX_MS);
        self.settings.wants(workload) && !too_long
    }

    /// Timed runs per column of `workload` in this pass.
    fn reps(&self, workload: &str) -> usize {
        match self.pass.across_a_link() {
            false => self.settings.reps,
            true if LONG.contains(&workload) => 1,
            true => self.settings.wan_reps,
        }
    }

    /// The columns of this pass: "proxy (before)" only without latency.
    fn columns(&self) -> Vec<Column> {
        ALL_COLUMNS
            .into_iter()
            .filter(|c| self.routes[c.index()].is_some())
            .filter(|&c| c != Column::Baseline || !self.pass.across_a_link())
            .collect()
    }

    fn route(&self, c: Column) -> &Route {
        self.routes[c.index()]
            .as_ref()
            .expect("a route for every column of the pass")
    }

    /// The account `key` and the octets seeded into it, by `seed` the first time it is
    /// asked for.
    fn user(
        &mut self,
        key: &'static str,
        fill: impl FnOnce(&mut dyn FnMut(&[u8])),
    ) -> (User, usize) {
        if let Some((_, user, octets)) = self.users.iter().find(|(k, _, _)| *k == key) {
            return (user.clone(), *octets);
        }
        let mut octets = 0;
        let user = seed(key, |each| {
            fill(&mut |m| {
                octets += m.len();
                each(m)
            })
        });
        self.users.push((key, user.clone(), octets));
        (user, octets)
    }

    /// Warm-up in the first pass, then the pass's timed runs of `f` per column, the
    /// columns in rotating order. Each run's link figures come from the column's relays.
    fn measure(
        &mut self,
        name: &'static str,
        what: String,
        (sessions, messages): (usize, usize),
        rss_limit_kib: Option<u64>,
        mut f: impl FnMut(&Route, Column, bool) -> client::Result<Sample>,
    ) {
        let label = match self.pass.latency_ms {
            Some(ms) => format!("{name} @ {ms} ms"),
            None => name.to_string(),
        };
        eprintln!("[{label}] {what}");
        let columns = self.columns();
        if self.pass.first {
            for &c in &columns {
                let t = Instant::now();
                f(self.route(c), c, true).unwrap_or_else(|e| fail(name, c, e));
                eprintln!(
                    "[{label}] {} warm-up: {:.3} s",
                    c.label(),
                    t.elapsed().as_secs_f64()
                );
            }
        }
        let reps = self.reps(name);
        let mut samples: [Vec<Sample>; 4] = Default::default();
        for rep in 0..reps {
            for k in 0..columns.len() {
                let c = columns[(rep + k) % columns.len()];
                let route = self.route(c);
                let before = route.link();
                let mut sample = f(route, c, false).unwrap_or_else(|e| fail(name, c, e));
                sample.link = before.zip(route.link()).map(|(b, a)| a.since(&b));
                eprintln!(
                    "[{label}] {} run {}/{reps}: {:.3} s{}{}",
                    c.label(),
                    rep + 1,
                    sample.secs,
                    sample
                        .rss_kib
                        .map_or(String::new(), |k| format!(", peak RSS {k} KiB")),
                    sample.link.map_or(String::new(), |l| format!(
                        ", {} round trips, {} connections",
                        l.round_trips(),
                        l.connections
                    ))
                );
                samples[c.index()].push(sample);
            }
        }
        self.outcomes.push(Outcome {
            name,
            what,
            sessions,
            messages,
            latency_ms: self.pass.latency_ms,
            samples,
            rss_limit_kib,
        });
    }

    fn pop3_workloads(&mut self) {
        if self.runs(CONNECT) {
            let (user, _) = self.user(CONNECT, |each| {
                let mut rng = corpus::Rng::new(7);
                for i in 0..10 {
                    let size = rng.range(2 << 10, 5 << 10);
                    each(&corpus::text(&mut rng, &format!("connect-{i}"), size));
                }
            });
            let n = self.settings.n(match self.pass.latency_ms {
                None => CONNECT_SESSIONS,
                Some(0) => CONNECT_SESSIONS_WAN_0,
                Some(_) => CONNECT_SESSIONS_WAN,
            });
            let what = format!(
                "{n} sessions one after the other, each: connect, USER/PASS, STAT, QUIT \
                 (mailbox of 10 messages); time per session"
            );
            let tls = self.tls.clone();
            self.measure(CONNECT, what, (n, 0), None, |route, _, warmup| {
                let sessions = if warmup { n.min(10) } else { n };
                let start = Instant::now();
                let mut untimed = Duration::ZERO;
                for _ in 0..sessions {
                    let mut p = Pop3::connect(&route.pop3, &tls)?;
                    p.login(&user.name, &user.password)?;
                    p.stat()?;
                    p.quit()?;
                    let wait = Instant::now();
                    wait_for_exit(route);
                    untimed += wait.elapsed();
                }
                Ok(Sample {
                    secs: (start.elapsed() - untimed).as_secs_f64(),
                    rss_kib: None,
                    link: None,
                })
            });
            self.check_logs();
        }

        if self.runs(DOWNLOAD) || self.runs(OUTLOOK) {
            let n = self.settings.n(2000);
            let (user, total) = self.user(DOWNLOAD, |each| corpus::mixed(n, each));
            let tls = self.tls.clone();
            if self.runs(DOWNLOAD) {
                let what = format!(
                    "one session: USER/PASS, STAT, RETR of each of {n} messages of mixed \
                     sizes ({:.1} MB in all: 1 KiB–1 MiB, text and base64 attachments), QUIT",
                    total as f64 / 1e6
                );
                self.measure(DOWNLOAD, what, (1, 0), None, |route, c, _| {
                    retrieve(&route.pop3, &tls, &user, route, c, Newest::All)
                });
                self.check_logs();
            }
            if self.runs(OUTLOOK) {
                let what = format!(
                    "Outlook-style check, one session: USER/PASS, STAT, UIDL, RETR of the \
                     {OUTLOOK_NEWEST} newest of the {n} messages of `{DOWNLOAD}`, QUIT"
                );
                self.measure(OUTLOOK, what, (1, 0), None, |route, c, _| {
                    retrieve(
                        &route.pop3,
                        &tls,
                        &user,
                        route,
                        c,
                        Newest::Last(OUTLOOK_NEWEST),
                    )
                });
                self.check_logs();
            }
        }

        if self.runs(BIG) {
            let size = self.settings.n(50 << 20);
            let (user, _) = self.user(BIG, |each| {
                each(&corpus::attachment(&mut corpus::Rng::new(3), "big", size))
            });
            let what = format!(
                "one session: USER/PASS, STAT, RETR of one {:.1} MiB message (base64 \
                 attachment), QUIT; with the peak RSS of the serving process",
                size as f64 / (1 << 20) as f64
            );
            let tls = self.tls.clone();
            self.measure(BIG, what, (1, 0), Some(16 << 10), |route, c, _| {
                retrieve(&route.pop3, &tls, &user, route, c, Newest::All)
            });
            self.check_logs();
        }

        if self.runs(MAILBOX) {
            let n = self.settings.n(20_000);
            let (user, _) = self.user(MAILBOX, |each| {
                let mut rng = corpus::Rng::new(11);
                for i in 0..n {
                    let size = rng.range(1 << 10, 3 << 10);
                    each(&corpus::text(&mut rng, &format!("many-{i}"), size));
                }
            });
            let what = format!(
                "one session: USER/PASS, STAT, LIST, UIDL, QUIT on a mailbox of {n} messages"
            );
            let tls = self.tls.clone();
            self.measure(MAILBOX, what, (1, 0), None, |route, c, _| {
                let start = Instant::now();
                let mut p = Pop3::connect(&route.pop3, &tls)?;
                p.login(&user.name, &user.password)?;
                let (count, _) = p.stat()?;
                for command in ["LIST", "UIDL"] {
                    let body = p.multiline(command)?;
                    if body.lines != count || count != n as u64 {
                        return Err(format!(
                            "{command} listed {} messages, STAT {count}, seeded {n}",
                            body.lines
                        ));
                    }
                }
                finish(p, route, c, start)
            });
            self.check_logs();
        }
    }

    fn smtp_workloads(&mut self) {
        let workloads = [
            (SMTP_SMALL, self.settings.n(500), 10 << 10),
            // 10,000,000 octets: Postfix's default message_size_limit is 10,240,000.
            (SMTP_LARGE, self.settings.n(10), self.settings.n(10_000_000)),
        ];
        if !workloads.iter().any(|(name, _, _)| self.runs(name)) {
            return;
        }
        let (sender, _) = self.user("sender", |_| ());
        let (recipient, _) = self.user("recipient", |_| ());
        for (name, count, size) in workloads {
            if !self.runs(name) {
                continue;
            }
            let mut rng = corpus::Rng::new(5);
            let messages: Vec<Vec<u8>> = (0..count)
                .map(|i| corpus::dot_stuffed(&corpus::text(&mut rng, &format!("{name}-{i}"), size)))
                .collect();
            let octets = messages[0].len() as f64;
            let what = format!(
                "one session: EHLO, AUTH PLAIN, then {count} × (MAIL, RCPT, DATA) of {} text \
                 messages, QUIT; timed until the last message is accepted (delivery into the \
                 backend is awaited untimed afterwards)",
                if octets >= 1e6 {
                    format!("{:.1} MB", octets / 1e6)
                } else {
                    format!("{:.1} kB", octets / 1e3)
                }
            );
            let tls = self.tls.clone();
            let (sender, recipient) = (&sender, &recipient);
            self.measure(name, what, (1, count), None, |route, c, _| {
                let start = Instant::now();
                let mut smtp = Smtp::connect(&route.smtp, &tls)?;
                smtp.ehlo_auth(&sender.name, &sender.password)?;
                for m in &messages {
                    smtp.send(&sender.email, &recipient.email, m)?;
                }
                let probe = Instant::now();
                let rss_kib = serving_rss(route, c);
                let probe_time = probe.elapsed();
                smtp.quit()?;
                let secs = (start.elapsed() - probe_time).as_secs_f64();
                drain(recipient, messages.len());
                Ok(Sample {
                    secs,
                    rss_kib,
                    link: None,
                })
            });
            self.check_logs();
        }
    }

    /// Reaps the proxy processes spawned so far and fails on a crash in their logs.
    fn check_logs(&self) {
        for inetd in self.routes.iter().flatten().flat_map(|r| &r.inetds) {
            let logs = inetd.logs();
            assert!(
                !logs.contains("panicked"),
                "a proxy process panicked:\n{logs}"
            );
        }
    }
}

/// The name /proc gives a process running `program`: its file name, cut to 15 bytes.
fn program_comm(program: &str) -> String {
    let name = std::path::Path::new(program)
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into_owned());
    name.bytes().take(15).map(char::from).collect()
}

/// Options of the proxy's `pop3` command, its backend IMAP (implicit TLS) on `imap_port`.
fn pop3_args(imap_port: u16) -> Vec<String> {
    let s = servers();
    let locks = s.dir.join("bench-locks");
    [
        "--log",
        "stderr",
        "pop3",
        "--imap-host",
        s.tls_host,
        "--imap-tls",
        "implicit",
        "--imap-port",
        &imap_port.to_string(),
        "--ca-file",
        &s.ca_file.display().to_string(),
        "--lock-dir",
        &locks.display().to_string(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

/// Options of the proxy's `smtp` command, its backend submission (implicit TLS) on `port`.
fn smtp_args(port: u16) -> Vec<String> {
    let s = servers();
    [
        "--log",
        "stderr",
        "smtp",
        "--smtp-host",
        s.tls_host,
        "--smtp-tls",
        "implicit",
        "--smtp-port",
        &port.to_string(),
        "--ca-file",
        &s.ca_file.display().to_string(),
        "--client-auth",
        "passthrough",
        "--hostname",
        "proxy.bench.test",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

/// `program` (a proxy binary) with `args`, spawned for every connection like inetd would,
/// under the `LMP_BENCH_WRAP` prefix if one is set.
fn spawn_per_connection(program: &str, args: &[String]) -> Inetd {
    match std::env::var("LMP_BENCH_WRAP") {
        Ok(wrap) if !wrap.trim().is_empty() => {
            let mut wrapped = vec![
                "-c".to_string(),
                format!("exec {wrap} \"$@\""),
                "lmp-bench-wrap".to_string(),
                program.to_string(),
            ];
            wrapped.extend_from_slice(args);
            Inetd::start("bash", &wrapped, &[])
        }
        _ => Inetd::start(program, args, &[]),
    }
}

/// For a proxy column: polls until the process that served the last session has exited.
///
/// The proxy answers QUIT before it logs out of the backend and releases its mailbox lock
/// (when the process exits), so a client that logs in again at once can meet its own
/// previous session's lock (`-ERR [IN-USE]`): seen at 0 ms through the relays on a loaded
/// machine. The `connect` workload waits for that, untimed, between sessions.
fn wait_for_exit(route: &Route) {
    if route.comm.is_empty() {
        return;
    }
    let me = std::process::id();
    let deadline = Instant::now() + Duration::from_secs(30);
    let live = || {
        fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                let pid = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok());
                pid.and_then(proc_stat)
                    .is_some_and(|(comm, state, ppid, _)| {
                        state != 'Z' && ppid == me && comm == route.comm
                    })
            })
    };
    while live() {
        assert!(
            Instant::now() < deadline,
            "a proxy process still runs 30 s after its QUIT"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Which messages a download session retrieves.
#[derive(Clone, Copy)]
enum Newest {
    All,
    /// The last n, after a UIDL (the Outlook-style check).
    Last(u64),
}

/// USER/PASS, STAT, (UIDL,) RETR of the chosen messages in order, QUIT. Checks that every
/// column delivers exactly the octets that LIST announced.
fn retrieve(
    ep: &Endpoint,
    tls: &native_tls::TlsConnector,
    user: &User,
    route: &Route,
    c: Column,
    which: Newest,
) -> client::Result<Sample> {
    let start = Instant::now();
    let mut p = Pop3::connect(ep, tls)?;
    p.login(&user.name, &user.password)?;
    let (count, octets) = p.stat()?;
    let first = match which {
        Newest::All => 1,
        Newest::Last(n) => {
            let uidl = p.multiline("UIDL")?;
            if uidl.lines != count {
                return Err(format!("UIDL listed {} messages, STAT {count}", uidl.lines));
            }
            count.saturating_sub(n) + 1
        }
    };
    let mut got = 0;
    for i in first..=count {
        got += p.multiline(&format!("RETR {i}"))?.octets;
    }
    if first == 1 && got != octets {
        return Err(format!("RETR gave {got} octets, STAT promised {octets}"));
    }
    finish(p, route, c, start)
}

/// Samples the serving process's peak RSS, sends QUIT, and returns the time since `start`
/// without the sampling.
fn finish(p: Pop3, route: &Route, c: Column, start: Instant) -> client::Result<Sample> {
    let probe = Instant::now();
    let rss_kib = serving_rss(route, c);
    let probe_time = probe.elapsed();
    p.quit()?;
    Ok(Sample {
        secs: (start.elapsed() - probe_time).as_secs_f64(),
        rss_kib,
        link: None,
    })
}

/// A new account whose INBOX holds the messages `fill` produces, written straight into the
/// Maildir and then indexed once.
///
/// The files are named the way Dovecot's own delivery names them, with `,S=<size>,W=<virtual
/// size>` (Maildir++), so Dovecot never has to read a file to learn its size, as on a real
/// server. (`User::seed` leaves the sizes out; Dovecot then caches them only as its adaptive
/// cache decisions allow, and STAT/LIST on 20,000 messages took 0.05 s in one run and 0.25 s
/// in the next, for direct access and the proxy alike.) Every message here has CRLF line
/// endings, so both sizes are the file's length.
fn seed(prefix: &str, fill: impl FnOnce(&mut dyn FnMut(&[u8]))) -> User {
    use std::os::unix::fs::{PermissionsExt, chown};
    let s = servers();
    let user = s.new_user(prefix);
    let t = Instant::now();
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut count = 0u64;
    fill(&mut |m: &[u8]| {
        assert!(
            !m.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'),
            "bench messages must use CRLF"
        );
        // Dovecot assigns UIDs to new files in the order of the time stamp in their names.
        let name = format!(
            "{}.M{}P{}Q{count}.bench,S={size},W={size}",
            base + count / 1_000_000,
            count % 1_000_000,
            std::process::id(),
            size = m.len()
        );
        let tmp = user.maildir.join("tmp").join(&name);
        fs::write(&tmp, m).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
        chown(&tmp, Some(s.mail_uid), Some(s.mail_gid)).expect("chown message");
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).expect("chmod message");
        fs::rename(&tmp, user.maildir.join("new").join(&name)).expect("rename message");
        count += 1;
    });
    user.resync();
    eprintln!(
        "seeded {count} messages for {} in {:.1} s",
        user.name,
        t.elapsed().as_secs_f64()
    );
    user
}

/// Waits until Postfix has delivered `n` messages to `user`, then expunges them.
fn drain(user: &User, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while user.maildir_count() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} messages delivered to {} after 10 minutes:\n{}",
            user.maildir_count(),
            user.name,
            postfix().logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = servers().doveadm(&["expunge", "-u", &user.name, "mailbox", "INBOX", "all"]);
    assert!(
        out.status.success(),
        "doveadm expunge: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One line of /proc/PID/stat: (comm, state, ppid, pgrp).
fn proc_stat(pid: u32) -> Option<(String, char, u32, u32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_string();
    let mut f = stat[close + 1..].split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    Some((comm, state, ppid, pgrp))
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Peak RSS of the live process serving a gateway column's session: the proxy (a child of
/// this process, by its program's name) or the gateway Dovecot's `pop3`/`submission`
/// process (one per session). Direct access is not measured: its serving processes are
/// the backend's own.
fn serving_rss(route: &Route, c: Column) -> Option<u64> {
    let me = std::process::id();
    let gateway_pgrp = route.gateway.as_ref().map_or(0, Gateway::pid);
    let pids = fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok());
    pids.filter(|&pid| {
        let Some((comm, state, ppid, pgrp)) = proc_stat(pid) else {
            return false;
        };
        state != 'Z'
            && match c {
                Column::Direct => false,
                Column::Proxy | Column::Baseline => ppid == me && route.comm == comm,
                Column::Dovecot => pgrp == gateway_pgrp && (comm == "pop3" || comm == "submission"),
            }
    })
    .filter_map(vm_hwm_kib)
    .max()
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// First line of a command's output, or "?".
fn output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines().next().map(|l| l.trim().to_string())
        })
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| "?".into())
}

fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("?".into(), |m| m.trim().to_string());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / (1 << 20) as f64);
    let os = fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map_or("?".into(), |v| v.trim_matches('"').to_string());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} vCPUs ({model}), {mem_gib:.0} GiB RAM, {os}, Linux {}; a shared virtual \
         machine, so expect noise",
        kernel.trim()
    )
}

fn results(
    settings: &Settings,
    outcomes: &[Outcome],
    load_before: &str,
    elapsed: Duration,
) -> String {
    let commit = output("git", &["rev-parse", "--short", "HEAD"]);
    // `output` gives "?" for no output: a clean tree.
    let dirty = output("git", &["status", "--porcelain", "--", "src", "Cargo.toml"]) != "?";
    let date = output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let dovecot = output("dovecot", &["--version"]);
    let postfix = output("postconf", &["-d", "-h", "mail_version"]);
    let dirty = if dirty {
        ", with uncommitted changes"
    } else {
        ""
    };
    let baseline = settings.baseline.as_ref().map_or(String::new(), |path| {
        format!(
            "\n- proxy (before): `{}` ({})",
            path.display(),
            output(&path.display().to_string(), &["--version"])
        )
    });
    let mut text = if settings.wan() {
        format!(
            "# WAN benchmark results (issue 14)\n\n\
             Written by `sudo ./tests/bench/wan` ({date}, commit {commit}{dirty}). The backend \
             is behind a latency relay (tests/common/latency.rs) on every path: the client \
             and both gateways sit on the LAN, the servers one way {} ms away. Medians; \
             timed runs per column: {} without latency, {} with latency, except `{DOWNLOAD}` \
             and `{SMTP_SMALL}` (one run, and only up to {LONG_MAX_MS} ms one way: a direct \
             run costs over a minute at 15 ms); one untimed warm-up per column in the first \
             pass. `{CONNECT}` has {} sessions per run at 0 ms, {} with latency; its times \
             and round trips are per session. \
             \"RT\": the link's round trips in a run, counted at the relays (see below). \
             \"proxy (before)\", if present, runs without latency only.\n\n\
             - Machine: {}\n\
             - Servers: Dovecot {dovecot}, Postfix {postfix}; the proxy built with \
             `cargo test --release`{baseline}\n\
             - Scale: {}; whole run {:.1} min; load average before {load_before}, after {}\n\n\
             ## Targets (issue 14, ratios of medians at 15 ms one way = 30 ms RTT)\n\n",
            settings
                .latencies
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            settings.reps,
            settings.wan_reps,
            settings.n(CONNECT_SESSIONS_WAN_0),
            settings.n(CONNECT_SESSIONS_WAN),
            machine(),
            settings.scale,
            elapsed.as_secs_f64() / 60.0,
            loadavg(),
        )
    } else {
        format!(
            "# Benchmark results\n\n\
             Written by `sudo ./tests/bench/run` ({date}, commit {commit}{dirty}). \
             Medians of {} runs per column after one warm-up; times per session for \
             `{CONNECT}`, else per run. ✓/✗: the issue's targets (within 1.3× of direct, at or \
             below the Dovecot gateway, peak RSS under 16 MiB on the big message).\n\n\
             - Machine: {}\n\
             - Servers: Dovecot {dovecot}, Postfix {postfix}; the proxy built with \
             `cargo test --release`{baseline}\n\
             - Scale: {}; whole run {:.1} min; load average before {load_before}, after {}\n\n\
             ## Summary\n\n",
            settings.reps,
            machine(),
            settings.scale,
            elapsed.as_secs_f64() / 60.0,
            loadavg(),
        )
    };
    if settings.wan() {
        text.push_str(&report::wan_targets(outcomes));
        text.push_str("\n## Summary: time · link round trips (medians)\n\n");
        text.push_str(&report::wan_tables(outcomes, &settings.latencies));
    } else {
        text.push_str(&report::table(outcomes));
        text.push_str("\n### Ratios within each round\n\n");
        text.push_str(&report::rounds(outcomes));
    }
    text.push_str(
        "\n## Set-up\n\n\
         - **direct**: the backend Dovecot's own POP3S and Postfix's own submission \
         (both implicit TLS, port-995/465 style).\n\
         - **Dovecot gateway**: a second Dovecot 2.3 with `mail_location = imapc:~/imapc`, \
         `passdb imap`, `imapc_features = rfc822.size fetch-headers` and \
         `submission_relay_*` (tests/common/gateway.rs).\n\
         - **proxy**: `legacy-mail-proxy pop3|smtp`, one process per connection with the \
         socket on stdin/stdout (tests/common/inetd.rs), logging at info level to a file, \
         with its default options otherwise; **proxy (before)** the same with an older \
         binary.\n\
         - Each path encrypts once: the client↔gateway leg is plain TCP on 127.0.0.1 for both \
         gateways, and both use implicit TLS (verified) to the backend's IMAP and \
         submission ports; the direct client uses TLS itself. Both gateways log in to the \
         backend with the client's own credentials.\n\
         - One client program for all columns (tests/bench/client.rs): sequential commands, \
         no pipelining, 64 KiB buffered reads; it checks that RETR returns the octets STAT \
         announced and that LIST and UIDL list every message.\n\
         - Peak RSS: `VmHWM` of the process serving the session (the proxy, or the gateway \
         Dovecot's `pop3`/`submission` process), read just before QUIT.\n",
    );
    if settings.wan() {
        text.push_str(
            "- The link: `LatencyRelay` (tests/common/latency.rs) between each column and \
             the backend, one relay per column and backend port: the direct client's \
             connections to POP3S and submissions, and every backend connection of the \
             gateways (the Dovecot gateway's imapc, its `passdb imap` login check and its \
             submission relay; the proxy's IMAP and submission). Each byte is delayed by \
             the one-way time in each direction, with no bandwidth limit; the TCP handshake \
             costs 1.5 round trips before the server accepts. The relay acknowledges what \
             it reads at once (TCP_QUICKACK), so no delayed-ACK timer of its own holds a \
             sender; what it cannot show is a sender with Nagle's algorithm on waiting for \
             the far end's ACK to cross the link (Postfix's reply to a message sent in one \
             flight with MAIL and RCPT, over 4 KiB: up to one more round trip per message \
             across a real link).\n\
             - Round trips (RT): the relays count one-way legs, 3 per connection for the \
             handshake, then one each time data turns the conversation round while nothing \
             is on the link; RT = legs ÷ 2, summed over the column's connections in the \
             run. A sequential POP3 RETR costs 1 RT; SMTP costs 4 per message without \
             PIPELINING (MAIL, RCPT, DATA, the text), 2 with it, 1 with BDAT, which is the \
             floor. Commands pipelined while an answer is still on the link add none.\n",
        );
    }
    text.push_str("\n## Workloads\n\n");
    text.push_str(&report::workloads(outcomes));
    text.push_str("\n## Every run\n\n");
    text.push_str(&report::samples(outcomes));
    text
}
