//! The fuzz command (issue 9, part 7): generated and mutated inputs for the POP3 and SMTP
//! command parsers, the POP3 and SMTP session cores, the SMTP DATA decoder, and the IMAP
//! and SMTP reply readers, each checked by an oracle of its own, on stable Rust.
//!
//! Not part of the test suite: `cargo test --all-targets` only builds it. Run it with
//! `tests/fuzz/run [COUNT] [SEED]`, which builds it in release mode. Everything follows
//! from the seed printed at the start, so a run can be repeated exactly; an input that
//! fails is also written to `target/fuzz-failures/` and can be replayed with
//! `--replay TARGET FILE`.
//!
//! Each input is generated (a valid transcript, response or command from the target's
//! generator) and, four times in five, mutated: bit flips, special bytes (CR, LF, NUL,
//! 0xFF…), deleted, duplicated and spliced chunks, dictionary words, overlong runs, edge
//! numbers, repeated lines, changed line ends. A panic is caught per input, counted, and the
//! run goes on; the exit status is 1 when anything failed.

mod imap;
mod mutate;
mod pop3;
mod reach;
mod smtp;
mod wire;

use mutate::{Rng, mutate};
use std::cell::RefCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One thing to fuzz.
struct Target {
    name: &'static str,
    /// Inputs of this target per round of the schedule: cheap targets get more.
    share: usize,
    generate: fn(&mut Rng) -> Vec<u8>,
    dictionary: &'static [&'static [u8]],
    /// Runs one input; `Err` says which property failed.
    run: fn(&[u8]) -> Result<(), String>,
}

const TARGETS: &[Target] = &[
    Target {
        name: "pop3-command",
        share: 2,
        generate: pop3::generate_command,
        dictionary: pop3::DICTIONARY,
        run: pop3::run_command,
    },
    Target {
        name: "pop3-session",
        share: 3,
        generate: pop3::generate_session,
        dictionary: pop3::DICTIONARY,
        run: pop3::run_session,
    },
    Target {
        name: "smtp-command",
        share: 2,
        generate: smtp::generate_command,
        dictionary: smtp::DICTIONARY,
        run: smtp::run_command,
    },
    Target {
        name: "smtp-session",
        share: 3,
        generate: smtp::generate_session,
        dictionary: smtp::DICTIONARY,
        run: smtp::run_session,
    },
    Target {
        name: "smtp-data",
        share: 2,
        generate: smtp::generate_data,
        dictionary: smtp::DATA_DICTIONARY,
        run: smtp::run_data,
    },
    Target {
        name: "smtp-reply",
        share: 1,
        generate: smtp::generate_replies,
        dictionary: smtp::REPLY_DICTIONARY,
        run: smtp::run_replies,
    },
    Target {
        name: "smtp-starttls",
        share: 1,
        generate: smtp::generate_starttls,
        dictionary: smtp::REPLY_DICTIONARY,
        run: smtp::run_starttls,
    },
    Target {
        name: "imap-wire",
        share: 2,
        generate: imap::generate_responses,
        dictionary: imap::DICTIONARY,
        run: imap::run_responses,
    },
    Target {
        name: "imap-listing",
        share: 1,
        generate: imap::generate_listing,
        dictionary: imap::DICTIONARY,
        run: imap::run_listing,
    },
    Target {
        name: "imap-body",
        share: 2,
        generate: imap::generate_body,
        dictionary: imap::DICTIONARY,
        run: imap::run_body,
    },
];

/// Generated inputs kept per target as material to splice from.
const POOL: usize = 32;
/// Failing inputs written per target; the rest are only counted.
const FILES_PER_TARGET: usize = 10;
/// Kinds of failure past the per-target files that still get a file each.
const MAX_KINDS: usize = 200;
/// An input running this long is reported as a hang.
const STUCK: Duration = Duration::from_secs(60);

struct Options {
    count: u64,
    seed: u64,
    only: Option<String>,
    replay: Option<(String, PathBuf)>,
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: fuzz [--count N] [--seed S] [--only TARGET] | --replay TARGET FILE\n\
         targets: {}",
        TARGETS.iter().map(|t| t.name).collect::<Vec<_>>().join(" ")
    );
    ExitCode::from(2)
}

fn parse_options() -> Option<Options> {
    let mut options = Options {
        count: 10_000_000,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        only: None,
        replay: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--count" => options.count = args.next()?.replace('_', "").parse().ok()?,
            "--seed" => options.seed = args.next()?.parse().ok()?,
            "--only" => options.only = Some(args.next()?),
            "--replay" => options.replay = Some((args.next()?, args.next()?.into())),
            _ => return None,
        }
    }
    Some(options)
}

thread_local! {
    /// The message of the last panic on this thread, filled by the hook.
    static LAST_PANIC: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Runs one input, turning a panic into a failure.
fn run_one(target: &Target, input: &[u8]) -> Result<(), String> {
    match catch_unwind(AssertUnwindSafe(|| (target.run)(input))) {
        Ok(result) => result,
        Err(_) => Err(format!(
            "panic: {}",
            LAST_PANIC.with(|p| p.borrow().clone())
        )),
    }
}

#[derive(Default, Clone)]
struct Tally {
    inputs: u64,
    violations: u64,
    panics: u64,
    files: usize,
    time: Duration,
}

fn main() -> ExitCode {
    let Some(options) = parse_options() else {
        return usage();
    };
    // Quiet: a caught panic is reported once, with its input, not by the default hook.
    std::panic::set_hook(Box::new(|info| {
        LAST_PANIC.with(|p| *p.borrow_mut() = info.to_string());
    }));
    if let Err(why) = self_check() {
        eprintln!("oracle self-check failed: {why}");
        return ExitCode::FAILURE;
    }
    reach::reset();
    if let Some((name, file)) = &options.replay {
        return replay(name, file);
    }
    let targets: Vec<&Target> = TARGETS
        .iter()
        .filter(|t| options.only.as_deref().is_none_or(|o| o == t.name))
        .collect();
    if targets.is_empty() {
        return usage();
    }
    let failures = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
    println!(
        "fuzz: seed {} count {} targets {}",
        options.seed,
        options.count,
        targets.iter().map(|t| t.name).collect::<Vec<_>>().join(",")
    );
    let schedule: Vec<usize> = targets
        .iter()
        .enumerate()
        .flat_map(|(i, t)| std::iter::repeat_n(i, t.share))
        .collect();
    let mut tallies = vec![Tally::default(); targets.len()];
    let mut pools: Vec<Vec<Vec<u8>>> = vec![Vec::new(); targets.len()];
    let progress = Arc::new(AtomicU64::new(0));
    let current = Arc::new(Mutex::new((String::new(), Vec::new())));
    watchdog(progress.clone(), current.clone(), failures.clone());
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut rng = Rng::new(options.seed);
    let mut kinds = std::collections::HashSet::new();
    for n in 0..options.count {
        let index = schedule[(n % schedule.len() as u64) as usize];
        let target = targets[index];
        let pool = &mut pools[index];
        let mut input = (target.generate)(&mut rng);
        if pool.len() < POOL {
            pool.push(input.clone());
        } else {
            pool[rng.below(POOL)] = input.clone();
        }
        if !rng.one_in(5) {
            mutate(&mut rng, &mut input, target.dictionary, pool);
        }
        if let Ok(mut slot) = current.lock() {
            slot.0 = target.name.to_string();
            slot.1.clone_from(&input);
        }
        let t0 = Instant::now();
        let result = run_one(target, &input);
        let tally = &mut tallies[index];
        tally.time += t0.elapsed();
        tally.inputs += 1;
        progress.store(n + 1, Ordering::Relaxed);
        if let Err(why) = result {
            if why.starts_with("panic: ") {
                tally.panics += 1;
            } else {
                tally.violations += 1;
            }
            let new_kind = kinds.insert((target.name, kind(&why)));
            if tally.files < FILES_PER_TARGET || (new_kind && kinds.len() <= MAX_KINDS) {
                tally.files += 1;
                let path = failures.join(format!("{}-{}-{n}.bin", target.name, options.seed));
                let saved = save(&path, &input);
                println!("FAIL {} input {n}: {why}\n  input: {saved}", target.name);
            }
        }
        if last_report.elapsed() >= Duration::from_secs(30) {
            last_report = Instant::now();
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "fuzz: {} inputs in {:.0} s ({:.0}/s)",
                n + 1,
                secs,
                (n + 1) as f64 / secs
            );
        }
    }
    report(&targets, &tallies, started.elapsed(), options.seed)
}

/// What kind of failure a message describes, to report each kind at least once: the
/// panic's location, or the property (the last part of the message) without numbers.
fn kind(why: &str) -> String {
    let part = match why.strip_prefix("panic: ") {
        Some(panic) => panic.lines().next().unwrap_or(panic),
        None => why.rsplit(": ").next().unwrap_or(why),
    };
    part.chars()
        .filter(|c| !c.is_ascii_digit())
        .take(60)
        .collect()
}

fn save(path: &Path, input: &[u8]) -> String {
    let written = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(path, input));
    match written {
        Ok(()) => path.display().to_string(),
        Err(e) => format!(
            "(not written to {}: {e}) {}",
            path.display(),
            wire::show(input)
        ),
    }
}

fn report(targets: &[&Target], tallies: &[Tally], elapsed: Duration, seed: u64) -> ExitCode {
    println!(
        "{:<14} {:>12} {:>10} {:>7} {:>9}",
        "target", "inputs", "violations", "panics", "seconds"
    );
    let mut total = Tally::default();
    for (target, tally) in targets.iter().zip(tallies) {
        println!(
            "{:<14} {:>12} {:>10} {:>7} {:>9.1}",
            target.name,
            tally.inputs,
            tally.violations,
            tally.panics,
            tally.time.as_secs_f64()
        );
        total.inputs += tally.inputs;
        total.violations += tally.violations;
        total.panics += tally.panics;
    }
    println!(
        "{:<14} {:>12} {:>10} {:>7} {:>9.1}",
        "total",
        total.inputs,
        total.violations,
        total.panics,
        elapsed.as_secs_f64()
    );
    let reached: Vec<String> = reach::counts()
        .iter()
        .map(|(what, n)| format!("{what} {n}"))
        .collect();
    println!("reached: {}", reached.join(", "));
    println!(
        "fuzz: seed {seed}, {} inputs in {:.1} s wall, {} violations, {} panics",
        total.inputs,
        elapsed.as_secs_f64(),
        total.violations,
        total.panics
    );
    if total.violations + total.panics > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Reports an input that runs too long, with the input, and ends the run: a hang is a
/// finding too, and waiting longer tells nothing more.
fn watchdog(progress: Arc<AtomicU64>, current: Arc<Mutex<(String, Vec<u8>)>>, dir: PathBuf) {
    std::thread::spawn(move || {
        let mut seen = u64::MAX;
        let mut since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let now = progress.load(Ordering::Relaxed);
            if now != seen {
                seen = now;
                since = Instant::now();
            } else if since.elapsed() >= STUCK {
                let (name, input) = current.lock().map(|c| c.clone()).unwrap_or_default();
                let saved = save(&dir.join(format!("{name}-stuck-{now}.bin")), &input);
                println!(
                    "STUCK {name} input {now} for {} s\n  input: {saved}",
                    STUCK.as_secs()
                );
                std::process::exit(3);
            }
        }
    });
}

fn replay(name: &str, file: &Path) -> ExitCode {
    let Some(target) = TARGETS.iter().find(|t| t.name == name) else {
        return usage();
    };
    let input = match std::fs::read(file) {
        Ok(input) => input,
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    match run_one(target, &input) {
        Ok(()) => {
            println!("{name}: ok");
            ExitCode::SUCCESS
        }
        Err(why) => {
            println!("{name}: {why}");
            ExitCode::FAILURE
        }
    }
}

/// The oracles must be able to fail: each forged transcript here breaks one property and
/// must be caught, or the run would prove nothing.
fn self_check() -> Result<(), String> {
    pop3::self_check()?;
    smtp::self_check()?;
    imap::self_check()
}
