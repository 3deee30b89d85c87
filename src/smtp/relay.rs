//! What the SMTP core needs from the submission server it relays through.
//!
//! Each call maps to one backend exchange of RFC 5321 §3.3 (MAIL, RCPT, DATA, RSET, NOOP)
//! or RFC 4954 (AUTH), and answers with the backend's own reply, so the client sees the
//! backend's code, enhanced code and text. A call fails with [`RelayError`] only when no
//! usable backend reply exists (unreachable, TLS, timeout, lost connection, a reply that
//! does not fit the exchange) or the proxy's own login was refused; the core turns that
//! into a 4xx so the client retries.
//!
//! The real relay (`backend.rs`) speaks SMTP through `crate::submission`; an in-memory one
//! (`memory.rs`) drives the transcript tests. Both judge replies with [`check`].

use super::headers::HeaderEdits;
use super::reply::Reply;
use std::fmt;
use std::io::Read;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayError {
    /// No backend connection could be made: DNS, TCP, TLS, no greeting.
    Unavailable(String),
    /// A connection was made, then broke or stopped answering (a cut, a stall past
    /// --backend-timeout), during login or later.
    Lost(String),
    /// The backend answered something that does not fit the exchange (RFC 5321 §4.3.2),
    /// such as `250` to DATA or `354` to the final dot. Its connection has been dropped:
    /// nothing it says can be trusted any more.
    Protocol(String),
    /// The backend answered AUTH with `535` (RFC 4954 §6: credentials invalid) for the
    /// login the relay uses (--smtp-user, or in passthrough mode the client's credentials
    /// when they are used again on a new connection). Only this blames the password.
    LoginRefused(String),
    /// A local failure (reading the spooled message).
    Local(String),
    /// The proxy's OAuth2 account gave no token the backend accepted (no token to be had,
    /// or a renewed one rejected too). Never the client's fault: `454 4.7.0`, not `535`.
    /// The text is the line for the admin, naming the command to run.
    OAuth2(String),
}

impl fmt::Display for RelayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelayError::Unavailable(why) => write!(f, "backend unavailable: {why}"),
            RelayError::Lost(why) => write!(f, "backend connection lost: {why}"),
            RelayError::Protocol(why) => write!(f, "backend protocol error: {why}"),
            RelayError::LoginRefused(why) => write!(f, "backend refused the login: {why}"),
            RelayError::Local(why) => write!(f, "local error: {why}"),
            RelayError::OAuth2(why) => write!(f, "backend login failed: {why}"),
        }
    }
}

pub type RelayResult = Result<Reply, RelayError>;

/// The backend exchange a reply answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Mail,
    Rcpt,
    /// The DATA command itself (answered 354 before any message byte is sent).
    Data,
    /// The final dot after the message.
    EndOfData,
    Rset,
    Noop,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Mail => "MAIL",
            Stage::Rcpt => "RCPT",
            Stage::Data => "DATA",
            Stage::EndOfData => "end of data",
            Stage::Rset => "RSET",
            Stage::Noop => "NOOP",
        })
    }
}

/// Judges a backend reply by RFC 5321 §4.3.2: DATA must get exactly `354`, every other
/// exchange a `2yz`; MAIL, RCPT, DATA and the final dot may also be refused with `4yz` or
/// `5yz`. Anything else (`250` to DATA, `354` to the final dot, `3yz` to MAIL) means the
/// backend and the proxy disagree about where the dialogue is; passing it on could tell the
/// client a message went out when it did not, so it is a [`RelayError::Protocol`], and the
/// caller must drop the connection.
pub fn check(stage: Stage, reply: Reply) -> RelayResult {
    let expected = match stage {
        Stage::Data => reply.code == 354,
        _ => reply.is_positive(),
    };
    let refusable = matches!(
        stage,
        Stage::Mail | Stage::Rcpt | Stage::Data | Stage::EndOfData
    );
    if expected || (refusable && reply.is_refusal()) {
        Ok(reply)
    } else {
        Err(RelayError::Protocol(format!(
            "{stage} answered {}",
            reply.summary()
        )))
    }
}

pub trait Relay {
    /// `--client-auth passthrough`: logs in to the backend with the client's credentials
    /// (connecting first). The backend's reply decides (235, 535…); later transactions use
    /// these credentials.
    fn login(&mut self, user: &str, password: &str) -> RelayResult;

    /// Opens a transaction: connects and logs in when there is no live connection, then
    /// sends `MAIL FROM:<from>` (empty `from` is the null path). A relay may instead answer
    /// `250` itself and send MAIL with the first RCPT (pipelining); the backend's verdict on
    /// the sender is then that RCPT's reply, or the reply to the message (below).
    fn mail(&mut self, from: &str) -> RelayResult;

    /// `RCPT TO:<to>`. A rejected recipient leaves the transaction open for the others.
    /// A relay may answer a transaction's first RCPT `250` itself and send it later, with
    /// the next RCPT or with the message (`--recipient-check with-message`); the backend's
    /// refusal of it is then [`Relay::refusal_before_data`] or the reply to the message,
    /// and the message goes to no one.
    fn rcpt(&mut self, to: &str) -> RelayResult;

    /// A refusal the open transaction already has although the client was told otherwise
    /// (a recipient answered `250` here, then refused by the backend when the next RCPT
    /// went up with it): the session answers DATA with it instead of `354`, so the client
    /// sends no message that would go nowhere. Asking does not end the transaction.
    fn refusal_before_data(&self) -> Option<Reply> {
        None
    }

    /// `DATA`, then the message: `len` bytes from `message`, CRLF lines, not dot-stuffed.
    /// The reply is the backend's answer to the final dot (or its refusal of DATA itself,
    /// after which the transaction is closed at the backend too). If `message` fails to
    /// read, the backend must never get the final dot: the call fails with `Local`.
    fn data(&mut self, message: &mut dyn Read, len: u64) -> RelayResult;

    /// Keeps an open transaction's connection from hitting the backend's idle timeout
    /// while the client is slow (`NOOP`, RFC 5321 §4.1.1.9). Without an open transaction
    /// it does nothing. An error means the transaction is lost.
    fn keepalive(&mut self) -> Result<(), RelayError>;

    /// Abandons the open transaction, if any (`RSET`).
    fn reset(&mut self);

    /// Ends the backend session politely (`QUIT`).
    fn quit(&mut self);

    /// The client logged in as `user` (`--client-auth local`). A relay that routes by
    /// account (`accounts::router`) lets the user name choose the account.
    fn authenticated(&mut self, _user: &str) {}

    /// The header edits for the open transaction when they are not the session's own
    /// (an account's `replyto` or `rewritefrom`); asked once the message is complete.
    fn header_edits(&self, _session: &HeaderEdits) -> Option<HeaderEdits> {
        None
    }

    /// The accounts-file section the last MAIL chose (also when its backend could not be
    /// reached, and after a reset); `None` for the command-line backend. A queued message
    /// keeps it, so that `queue run` sends it through the same account.
    fn account(&self) -> Option<&str> {
        None
    }

    /// The next MAIL goes through `account` (`None`: the command-line backend), whatever
    /// its sender: the queue sends a queued message, and its delivery-status notification
    /// (null sender), the way the message was accepted.
    fn route_to(&mut self, _account: Option<&str>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16) -> Reply {
        Reply::from_backend(code, &["text"])
    }

    #[test]
    fn each_stage_accepts_only_its_success_or_a_refusal() {
        for (stage, good) in [
            (Stage::Mail, 250),
            (Stage::Rcpt, 251),
            (Stage::Data, 354),
            (Stage::EndOfData, 250),
            (Stage::Rset, 250),
            (Stage::Noop, 250),
        ] {
            assert!(check(stage, reply(good)).is_ok(), "{stage} {good}");
        }
        for stage in [Stage::Mail, Stage::Rcpt, Stage::Data, Stage::EndOfData] {
            for code in [421, 451, 550, 554] {
                assert!(check(stage, reply(code)).is_ok(), "{stage} {code}");
            }
        }
        for (stage, odd) in [
            (Stage::Data, 250),
            (Stage::EndOfData, 354),
            (Stage::Mail, 354),
            (Stage::Rcpt, 334),
            (Stage::Rset, 550),
            (Stage::Noop, 421),
        ] {
            assert!(
                matches!(check(stage, reply(odd)), Err(RelayError::Protocol(_))),
                "{stage} {odd}"
            );
        }
    }
}
