//! One delivery attempt of a queued message, and what follows from it: the message is
//! delivered (tombstone, then removal), deferred (the next attempt after a backoff of 1,
//! 5, 15, 30 minutes, then hourly), or, refused for good or past its lifetime, bounced
//! with an RFC 3464 DSN to its sender (never to the null sender).
//!
//! Used by the `smtp` process right after it answered the client, and by `queue run`.
//! Each step logs one line with the queue id, so `grep ID` tells a message's story.

use super::dsn;
use super::store::{Failure, Locked, Queue, now_secs};
use crate::smtp::relay::{Relay, RelayError};
use crate::smtp::reply::Reply;
use std::io::{self, Read};
use std::time::{Duration, SystemTime};

/// What `queue run` and the immediate attempt share.
#[derive(Debug, Clone)]
pub struct Policy {
    /// After this long in the queue a message is bounced instead of tried again.
    pub lifetime: Duration,
    /// DSNs go here instead of to the envelope sender.
    pub bounce_to: Option<String>,
    /// Our name in the DSN.
    pub hostname: String,
}

/// Default --queue-lifetime: five days, like Postfix's maximal_queue_lifetime.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(5 * 24 * 3600);

/// What became of the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every recipient accepted (or the rest bounced); the message left the queue.
    Delivered,
    /// Still queued; tried again at `next_attempt`.
    Deferred(String),
    /// Deferred because no connection to the backend could be made at all: trying the
    /// other messages now would only wait for the same failure.
    Unreachable(String),
    /// A DSN went out (or none was due: null sender) and the message left the queue.
    Bounced,
}

/// The wait before the next attempt after `attempts` failed ones.
pub fn backoff(attempts: u32) -> Duration {
    let minutes = match attempts {
        0 | 1 => 1,
        2 => 5,
        3 => 15,
        4 => 30,
        _ => 60,
    };
    Duration::from_secs(minutes * 60)
}

/// Tries `locked` once through `relay`. `open` says that MAIL and RCPT for exactly the
/// envelope's recipients were already accepted by the backend on this connection (the
/// `smtp` process, right after its client's final dot): only DATA is left to send.
pub fn attempt(
    queue: &Queue,
    relay: &mut dyn Relay,
    mut locked: Locked,
    policy: &Policy,
    open: bool,
) -> io::Result<Outcome> {
    let id = locked.id().to_string();
    let mut unreachable = false;
    if !locked.envelope.to.is_empty() {
        locked.envelope.attempts += 1;
        log::info!(
            "queue {id}: attempt {} from=<{}> to={}",
            locked.envelope.attempts,
            locked.envelope.from,
            locked.envelope.to.len()
        );
        let error = send(queue, relay, &mut locked, open, &mut unreachable)?;
        if let Some(error) = error {
            locked.envelope.last_error = Some(error);
        }
    }
    let envelope = &mut locked.envelope;
    if !envelope.to.is_empty() {
        let age = now_secs().saturating_sub(envelope.created);
        let error = envelope
            .last_error
            .clone()
            .unwrap_or_else(|| "not delivered".into());
        if age < policy.lifetime.as_secs() {
            let wait = backoff(envelope.attempts);
            envelope.next_attempt = now_secs() + wait.as_secs();
            log::warn!(
                "queue {id}: deferred (attempt {}, next in {} min): {error}",
                envelope.attempts,
                wait.as_secs() / 60
            );
            queue.update(&locked)?;
            return Ok(if unreachable {
                Outcome::Unreachable(error)
            } else {
                Outcome::Deferred(error)
            });
        }
        log::warn!(
            "queue {id}: lifetime of {} h over after {} attempts: {error}",
            policy.lifetime.as_secs() / 3600,
            envelope.attempts
        );
        let reason = format!("delivery time expired; last error: {error}");
        for recipient in std::mem::take(&mut envelope.to) {
            envelope.failed.push(Failure {
                recipient,
                reply: reason.clone(),
            });
        }
    }
    if locked.envelope.failed.is_empty() {
        log::info!("queue {id}: delivered");
        finish(queue, locked)?;
        return Ok(Outcome::Delivered);
    }
    bounce(queue, relay, locked, policy)
}

/// Sends the message to the pending recipients. Moves accepted ones out of `to` and
/// refused ones to `failed`; returns the error that leaves the rest pending.
/// `unreachable` is set when no connection to the backend could be made at all.
fn send(
    queue: &Queue,
    relay: &mut dyn Relay,
    locked: &mut Locked,
    open: bool,
    unreachable: &mut bool,
) -> io::Result<Option<String>> {
    let id = locked.id().to_string();
    let mut accepted = Vec::new();
    let mut pending = Vec::new();
    let mut error = None;
    if open {
        accepted = std::mem::take(&mut locked.envelope.to);
    } else {
        // Through the account it was accepted for, whatever the accounts file now says
        // of its sender.
        relay.route_to(locked.envelope.account.as_deref());
        match relay.mail(&locked.envelope.from) {
            Ok(reply) if reply.is_positive() => {}
            Ok(reply) if reply.is_transient() => return Ok(Some(reply.summary())),
            Ok(reply) => {
                relay.reset();
                refuse_all(locked, &reply.summary());
                return Ok(None);
            }
            Err(e) => {
                *unreachable = matches!(e, RelayError::Unavailable(_));
                return Ok(Some(describe(&e)));
            }
        }
        let mut recipients = std::mem::take(&mut locked.envelope.to).into_iter();
        for recipient in recipients.by_ref() {
            match relay.rcpt(&recipient) {
                Ok(reply) if reply.is_positive() => accepted.push(recipient),
                Ok(reply) if reply.is_transient() => {
                    log::warn!("queue {id}: <{recipient}> deferred: {}", reply.summary());
                    error = Some(reply.summary());
                    pending.push(recipient);
                    if reply.code == 421 {
                        break;
                    }
                }
                Ok(reply) => {
                    log::warn!("queue {id}: <{recipient}> refused: {}", reply.summary());
                    locked.envelope.failed.push(Failure {
                        recipient,
                        reply: reply.summary(),
                    });
                }
                Err(e) => {
                    error = Some(describe(&e));
                    pending.push(recipient);
                    break;
                }
            }
        }
        pending.extend(recipients);
        locked.envelope.to = pending.clone();
        if accepted.is_empty() {
            relay.reset();
            return Ok(error);
        }
    }
    let (file, len) = locked.message()?;
    let mut reader = CrashAfterFirstRead {
        inner: file,
        first: true,
    };
    match relay.data(&mut reader, len) {
        Ok(reply) if reply.is_positive() => {
            super::crash_point("upstream-accepted");
            log::info!(
                "queue {id}: accepted for {} recipient(s): {}",
                accepted.len(),
                reply.summary()
            );
            // Recorded at once: from now on a leftover is never sent again.
            let done = pending.is_empty();
            locked.envelope.to = pending;
            if done {
                queue.tombstone(&id)?;
            } else {
                queue.update(locked)?;
            }
            Ok(error)
        }
        Ok(reply) if reply.is_transient() => {
            locked.envelope.to = accepted.into_iter().chain(pending).collect();
            Ok(Some(reply.summary()))
        }
        Ok(reply) => {
            log::warn!("queue {id}: message refused: {}", reply.summary());
            for recipient in accepted {
                locked.envelope.failed.push(Failure {
                    recipient,
                    reply: reply.summary(),
                });
            }
            locked.envelope.to = pending;
            Ok(error)
        }
        Err(e) => {
            locked.envelope.to = accepted.into_iter().chain(pending).collect();
            Ok(Some(describe(&e)))
        }
    }
}

fn refuse_all(locked: &mut Locked, reply: &str) {
    for recipient in std::mem::take(&mut locked.envelope.to) {
        locked.envelope.failed.push(Failure {
            recipient,
            reply: reply.to_string(),
        });
    }
}

fn describe(e: &RelayError) -> String {
    e.to_string()
}

/// Tombstone, then removal: a crash in between leaves a leftover `queue run` recognises.
fn finish(queue: &Queue, locked: Locked) -> io::Result<()> {
    queue.tombstone(locked.id())?;
    super::crash_point("before-removal");
    queue.remove_tombstoned(locked)
}

/// Sends the DSN for `failed` and takes the message out of the queue. A DSN the backend
/// defers keeps the message queued (with no recipient left) so the next run sends it.
fn bounce(
    queue: &Queue,
    relay: &mut dyn Relay,
    mut locked: Locked,
    policy: &Policy,
) -> io::Result<Outcome> {
    let id = locked.id().to_string();
    let envelope = &locked.envelope;
    let to = match (&policy.bounce_to, envelope.from.as_str()) {
        (Some(to), _) => to.clone(),
        // RFC 3461 §6.2 / RFC 5321 §6.1: never a DSN for a DSN.
        (None, "") => {
            log::warn!("queue {id}: bounced; no DSN for the null sender");
            finish(queue, locked)?;
            return Ok(Outcome::Bounced);
        }
        (None, from) => from.to_string(),
    };
    let head = {
        let (file, _) = locked.message()?;
        let mut head = Vec::new();
        file.take(dsn::HEADERS_MAX as u64).read_to_end(&mut head)?;
        head
    };
    let report = dsn::build(&locked.envelope, &head, &policy.hostname, SystemTime::now());
    // The null sender has no account of its own: the DSN goes the message's way.
    relay.route_to(locked.envelope.account.as_deref());
    let result = send_dsn(relay, &to, &report);
    match result {
        Ok(reply) => {
            log::warn!(
                "queue {id}: bounced: DSN for {} recipient(s) sent to <{to}>: {}",
                locked.envelope.failed.len(),
                reply.summary()
            );
            finish(queue, locked)?;
            Ok(Outcome::Bounced)
        }
        Err(Refusal::Permanent(reply)) => {
            log::error!("queue {id}: bounced; the DSN to <{to}> was refused too, dropped: {reply}");
            finish(queue, locked)?;
            Ok(Outcome::Bounced)
        }
        Err(Refusal::Transient(error)) => {
            let envelope = &mut locked.envelope;
            let wait = backoff(envelope.attempts.max(1));
            envelope.next_attempt = now_secs() + wait.as_secs();
            envelope.last_error = Some(format!("DSN to <{to}> deferred: {error}"));
            log::warn!("queue {id}: DSN to <{to}> deferred, tried again later: {error}");
            queue.update(&locked)?;
            Ok(Outcome::Deferred(error))
        }
    }
}

enum Refusal {
    Permanent(String),
    Transient(String),
}

/// MAIL FROM:<> (RFC 3464 §2: a DSN has the null sender), RCPT, DATA.
fn send_dsn(relay: &mut dyn Relay, to: &str, report: &[u8]) -> Result<Reply, Refusal> {
    let reply = relay.mail("");
    judge(relay, reply)?;
    let reply = relay.rcpt(to);
    judge(relay, reply)?;
    let reply = relay.data(&mut &report[..], report.len() as u64);
    judge(relay, reply)
}

fn judge(relay: &mut dyn Relay, result: Result<Reply, RelayError>) -> Result<Reply, Refusal> {
    match result {
        Ok(reply) if reply.is_positive() => Ok(reply),
        Ok(reply) => {
            relay.reset();
            if reply.is_transient() {
                Err(Refusal::Transient(reply.summary()))
            } else {
                Err(Refusal::Permanent(reply.summary()))
            }
        }
        Err(e) => Err(Refusal::Transient(describe(&e))),
    }
}

/// Reads through to the message, with the `upstream-data` crash point at the second read:
/// the relay is then inside its transfer, and the backend has no end of data. The first
/// read gives one byte, so that a second read comes even for a small message, which the
/// relay otherwise reads whole at once.
struct CrashAfterFirstRead<'a> {
    inner: &'a mut std::fs::File,
    first: bool,
}

impl Read for CrashAfterFirstRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.first {
            super::crash_point("upstream-data");
            return self.inner.read(buf);
        }
        self.first = false;
        let one = buf.len().min(1);
        self.inner.read(&mut buf[..one])
    }
}
