//! `legacy-mail-proxy queue …`: deliver what is due (`run`, for a systemd timer or cron),
//! look at the queue (`list`, `--json` for scripts), and act on one message (`flush`,
//! `remove`, `hold`, `release`). Every action takes the `smtp` subcommand's options (the
//! same environment file works), so `run` sends each message through the same backend.

use super::QueueMode;
use super::deliver::{self, Outcome, Policy};
use super::store::{Envelope, Queue, now_secs, valid_id};
use crate::smtp::ClientAuthMode;
use anyhow::{Context, bail};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// The queue options of `smtp`, and so of every `queue` action.
#[derive(Debug, Clone, clap::Args)]
pub struct QueueOptions {
    /// Store-and-forward: answer 250 only once the message is durable in this directory,
    /// then deliver it, retrying with `queue run` for up to --queue-lifetime. Shared by
    /// every instance. Without it, 250 means the backend accepted the message.
    #[arg(long, env = "LMP_QUEUE_DIR", value_name = "DIR")]
    pub queue_dir: Option<PathBuf>,

    /// Most bytes of messages the queue may hold; beyond it new messages get `452 4.3.1`.
    /// [default: no limit but the disk's]
    #[arg(long, env = "LMP_QUEUE_MAX_SIZE", value_name = "BYTES")]
    pub queue_max_size: Option<u64>,

    /// How long a message is retried before it is bounced: seconds, or a number with s, m,
    /// h or d.
    #[arg(
        long,
        env = "LMP_QUEUE_LIFETIME",
        default_value = "5d",
        value_name = "TIME",
        value_parser = lifetime
    )]
    pub queue_lifetime: Duration,

    /// Send delivery-status notifications (bounces) here instead of to each message's
    /// envelope sender (devices' senders often have no mailbox).
    #[arg(long, env = "LMP_QUEUE_BOUNCE_TO", value_name = "ADDRESS")]
    pub queue_bounce_to: Option<String>,
}

impl QueueOptions {
    /// The queue and its policy, when --queue-dir is given.
    pub fn settings(&self, hostname: &str) -> Option<QueueMode> {
        let dir = self.queue_dir.clone()?;
        Some(QueueMode {
            queue: Queue::new(dir, self.queue_max_size),
            policy: Policy {
                lifetime: self.queue_lifetime,
                bounce_to: self.queue_bounce_to.clone(),
                hostname: hostname.to_string(),
            },
        })
    }
}

/// `90`, `90s`, `30m`, `12h`, `5d`.
pub fn lifetime(value: &str) -> Result<Duration, String> {
    let (number, unit) = match value.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => value.split_at(i),
        None => (value, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => {
            return Err(format!(
                "{value:?}: use seconds or a number with s, m, h or d"
            ));
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{value:?} is not a duration"))
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Deliver every message that is due, then exit (run by the timer or cron).
    Run(Common),
    /// Show the queue: id, age, size, attempts, next attempt, sender, recipients, error.
    List(ListArgs),
    /// Deliver now, ignoring the backoff: every message, or the one named.
    Flush(FlushArgs),
    /// Take a message out of the queue without delivering it.
    Remove(IdArgs),
    /// Keep a message queued but do not try it until released.
    Hold(IdArgs),
    /// Let a held message be tried again, at the next run.
    Release(IdArgs),
}

#[derive(Debug, clap::Args)]
pub struct Common {
    #[command(flatten)]
    pub smtp: Box<crate::smtp::Args>,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// One JSON array of envelopes, for scripts.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, clap::Args)]
pub struct FlushArgs {
    /// The queue id; without it, every message.
    pub id: Option<String>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, clap::Args)]
pub struct IdArgs {
    /// The queue id (from `queue list` or the `250` reply).
    pub id: String,
    #[command(flatten)]
    pub common: Common,
}

impl Args {
    pub fn backend(&self) -> &crate::options::BackendOptions {
        &self.common().smtp.backend
    }

    fn common(&self) -> &Common {
        match &self.action {
            Action::Run(common) => common,
            Action::List(a) => &a.common,
            Action::Flush(a) => &a.common,
            Action::Remove(a) | Action::Hold(a) | Action::Release(a) => &a.common,
        }
    }
}

pub fn run(args: Args) -> ExitCode {
    let result = match args.action {
        Action::Run(common) => deliver_due(common, None),
        Action::Flush(a) => deliver_due(a.common, Some(a.id)),
        Action::List(a) => list(a),
        Action::Remove(a) => change(a, "removed", |queue, locked| queue.remove(locked)),
        Action::Hold(a) => change(a, "held", |queue, mut locked| {
            locked.envelope.held = true;
            queue.update(&locked)
        }),
        Action::Release(a) => change(a, "released", |queue, mut locked| {
            locked.envelope.held = false;
            locked.envelope.next_attempt = now_secs();
            queue.update(&locked)
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            log::error!("queue: {e:#}");
            eprintln!("legacy-mail-proxy queue: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn queue_of(common: &Common) -> anyhow::Result<Queue> {
    let dir = common
        .smtp
        .queue
        .queue_dir
        .clone()
        .context("no queue: set --queue-dir (or LMP_QUEUE_DIR)")?;
    Ok(Queue::new(dir, common.smtp.queue.queue_max_size))
}

/// Counts for the run's closing log line.
#[derive(Debug, Default)]
struct Tally {
    delivered: u32,
    deferred: u32,
    bounced: u32,
    busy: u32,
    held: u32,
    /// Due, but not tried: the backend was unreachable earlier in this run.
    waiting: u32,
    failed: u32,
}

/// `queue run` (`only: None`, due messages) and `queue flush [ID]` (`only: Some`, due or
/// not). Held messages are never tried; locked ones are being delivered by another process
/// and are left to it.
fn deliver_due(common: Common, only: Option<Option<String>>) -> anyhow::Result<ExitCode> {
    let flush = only.is_some();
    let only = only.flatten();
    if let Some(id) = &only {
        anyhow::ensure!(valid_id(id), "{id:?} is not a queue id");
    }
    let mut smtp = common.smtp;
    // A run serves no client: only the backend half of the smtp settings matters, so
    // the client's login settings (--client-user and its password) need not be given.
    // Passthrough stays, to be refused with its reason (no stored credentials).
    if smtp.client_auth != Some(ClientAuthMode::Passthrough) {
        smtp.client_auth = Some(ClientAuthMode::None);
    }
    let settings = crate::smtp::settings(*smtp, "queue-run")?;
    let Some(QueueMode { queue, policy }) = settings.config.queue else {
        bail!("no queue: set --queue-dir (or LMP_QUEUE_DIR)");
    };
    queue
        .create_dirs()
        .with_context(|| format!("queue directory {}", queue.dir.display()))?;
    match queue.clean() {
        Ok(0) => {}
        Ok(n) => {
            log::info!("queue run: removed {n} leftover file(s) of crashes and old tombstones")
        }
        Err(e) => log::warn!("queue run: cleaning {}: {e}", queue.dir.display()),
    }
    let ids = queue
        .ids()
        .with_context(|| format!("cannot read the queue directory {}", queue.dir.display()))?;
    // The same relay as the smtp sessions: with --accounts, each message goes out through
    // the account it was accepted for, its DSN too (deliver.rs, Relay::route_to).
    let mut relay = crate::smtp::relay_for(
        settings.backend,
        settings.routing,
        crate::smtp::Warm::AtFirstUse,
    );
    let mut tally = Tally::default();
    let now = now_secs();
    // Backends found unreachable in this run, by account (`None`: the command-line one).
    let mut unreachable: Vec<Option<String>> = Vec::new();
    for id in ids {
        if only.as_ref().is_some_and(|o| *o != id) {
            continue;
        }
        let envelope = match queue.envelope(&id) {
            Ok(envelope) => envelope,
            // Delivered by another process since the directory was read.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                log::error!("queue {id}: unreadable envelope: {e}");
                tally.failed += 1;
                continue;
            }
        };
        if envelope.held {
            tally.held += 1;
            continue;
        }
        if !flush && envelope.next_attempt > now {
            continue;
        }
        if unreachable.contains(&envelope.account) {
            // Left due for the next run rather than each waiting out --connect-timeout.
            tally.waiting += 1;
            continue;
        }
        let locked = match queue.lock(&id) {
            Ok(Some(locked)) => locked,
            Ok(None) => {
                tally.busy += 1;
                continue;
            }
            Err(e) => {
                log::error!("queue {id}: cannot lock: {e}");
                tally.failed += 1;
                continue;
            }
        };
        if queue.has_tombstone(&id) {
            log::warn!(
                "queue {id}: leftover of a message the backend already accepted (a crash \
                 before its removal): removed, not sent again"
            );
            queue.remove_tombstoned(locked)?;
            continue;
        }
        let account = locked.envelope.account.clone();
        match deliver::attempt(&queue, relay.as_mut(), locked, &policy, false) {
            Ok(Outcome::Delivered) => tally.delivered += 1,
            Ok(Outcome::Deferred(_)) => tally.deferred += 1,
            Ok(Outcome::Unreachable(error)) => {
                tally.deferred += 1;
                log::warn!(
                    "queue run: backend{} unreachable ({error}); its other due messages \
                     wait for the next run",
                    account
                        .as_deref()
                        .map(|a| format!(" of account [{a}]"))
                        .unwrap_or_default()
                );
                unreachable.push(account);
            }
            Ok(Outcome::Bounced) => tally.bounced += 1,
            Err(e) => {
                log::error!("queue {id}: {e}");
                tally.failed += 1;
            }
        }
    }
    relay.quit();
    log::info!(
        "queue run: delivered={} deferred={} bounced={} busy={} held={} waiting={} errors={}",
        tally.delivered,
        tally.deferred,
        tally.bounced,
        tally.busy,
        tally.held,
        tally.waiting,
        tally.failed
    );
    Ok(if tally.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let queue = queue_of(&args.common)?;
    let ids = queue
        .ids()
        .with_context(|| format!("cannot read the queue directory {}", queue.dir.display()))?;
    let envelopes: Vec<Envelope> = ids
        .iter()
        .filter_map(|id| queue.envelope(id).ok())
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&envelopes)?);
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", table(&envelopes, now_secs()));
    Ok(ExitCode::SUCCESS)
}

/// The terminal listing: one line per message, the error on a second, indented line.
pub fn table(envelopes: &[Envelope], now: u64) -> String {
    let mut out = format!(
        "{:<24} {:>6} {:>9} {:>5} {:>7}  {}\n",
        "ID", "AGE", "SIZE", "TRIES", "NEXT", "FROM -> TO"
    );
    for e in envelopes {
        let next = if e.held {
            "held".to_string()
        } else if e.next_attempt <= now {
            "due".to_string()
        } else {
            span(e.next_attempt - now)
        };
        out.push_str(&format!(
            "{:<24} {:>6} {:>9} {:>5} {:>7}  <{}> -> {}\n",
            e.id,
            span(now.saturating_sub(e.created)),
            e.size,
            e.attempts,
            next,
            e.from,
            e.to.iter()
                .map(|t| format!("<{t}>"))
                .collect::<Vec<_>>()
                .join(" ")
        ));
        if let Some(error) = &e.last_error {
            let error: String = error.chars().take(120).collect();
            out.push_str(&format!("    {error}\n"));
        }
    }
    out.push_str(&format!("{} message(s)\n", envelopes.len()));
    out
}

/// `45s`, `12m`, `3h`, `2d`.
fn span(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

fn change(
    args: IdArgs,
    done: &str,
    act: impl FnOnce(&Queue, super::Locked) -> std::io::Result<()>,
) -> anyhow::Result<ExitCode> {
    let queue = queue_of(&args.common)?;
    let id = &args.id;
    anyhow::ensure!(valid_id(id), "{id:?} is not a queue id");
    let locked = queue
        .lock(id)?
        .with_context(|| format!("{id} is not queued, or is being delivered right now"))?;
    act(&queue, locked)?;
    log::info!("queue {id}: {done} by the admin");
    println!("{id}: {done}");
    Ok(ExitCode::SUCCESS)
}
