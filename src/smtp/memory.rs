//! An in-memory [`Relay`] for transcript tests: it records what a backend would have seen
//! and answers the way Postfix does (`250 2.1.0 Ok`, `550 5.1.1 … User unknown`), and it
//! can fail on cue the ways a real backend does: refuse or oddly answer DATA, lose the
//! connection at a given exchange, close with `421`, fail while the message is sent.
//!
//! Replies are judged with [`check`] like the real relay's, and a refusal of DATA is
//! followed by RSET, so the core meets the same contract from both.

use super::relay::{Relay, RelayError, RelayResult, Stage, check};
use super::reply::Reply;
use std::io::Read;

/// A message the backend accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub from: String,
    pub to: Vec<String>,
    pub data: Vec<u8>,
}

#[derive(Debug, Default)]
pub struct MemoryRelay {
    /// Each backend exchange in order: `CONNECT`, `AUTH user`, `MAIL FROM:<a>`,
    /// `RCPT TO:<b>`, `DATA`, `MESSAGE <len>`, `NOOP`, `RSET`, `QUIT`, and `DROPPED`
    /// where the connection was lost.
    pub log: Vec<String>,
    pub delivered: Vec<Delivery>,
    /// Recipients refused with `550 5.1.1`.
    pub unknown: Vec<String>,
    /// Replies for particular recipients (`421 4.4.2 …` closes the connection).
    pub rcpt_replies: Vec<(String, Reply)>,
    /// Every connection attempt fails.
    pub down: bool,
    /// The configured login is refused (`535`).
    pub login_refused: bool,
    /// The connection is cut while the relay logs in.
    pub login_cut: bool,
    /// The relay's OAuth2 account gives no accepted token.
    pub oauth2_failed: bool,
    /// Accounts for passthrough logins.
    pub accounts: Vec<(String, String)>,
    /// Overrides the reply to the next DATA command (`354` by default).
    pub data_command_reply: Option<Reply>,
    /// Overrides the reply to the final dot.
    pub data_reply: Option<Reply>,
    /// Overrides the reply to the next final dot only (a later DSN goes through).
    pub data_reply_once: Option<Reply>,
    /// Sending the message after `354` fails with this error.
    pub data_error: Option<RelayError>,
    /// The connection is lost at the first exchange whose log entry starts with this
    /// (`RCPT`, `DATA`, `NOOP`…): that call fails with `Unavailable`.
    pub drop_at: Option<String>,
    connected: bool,
    open: Option<Delivery>,
}

impl MemoryRelay {
    fn connect(&mut self) -> Result<(), RelayError> {
        if self.connected {
            return Ok(());
        }
        if self.down {
            return Err(RelayError::Unavailable("connection refused".into()));
        }
        if self.login_cut {
            return Err(RelayError::Lost(
                "logging in: Connection error: connection reset".into(),
            ));
        }
        if self.oauth2_failed {
            return Err(RelayError::OAuth2(
                "oauth2 account work: OAuth2 authorization lost: invalid_grant".into(),
            ));
        }
        if self.login_refused {
            return Err(RelayError::LoginRefused(
                "535 5.7.8 Error: authentication failed".into(),
            ));
        }
        self.log.push("CONNECT".into());
        self.connected = true;
        Ok(())
    }

    /// Logs an exchange; fails if the connection is (or gets) lost here.
    fn exchange(&mut self, entry: String) -> Result<(), RelayError> {
        if !self.connected {
            return Err(RelayError::Unavailable("no backend connection".into()));
        }
        let drop_here = self
            .drop_at
            .as_ref()
            .is_some_and(|at| entry.starts_with(at.as_str()));
        self.log.push(entry);
        if drop_here {
            self.drop_at = None;
            self.lose_connection();
            return Err(RelayError::Lost("connection lost".into()));
        }
        Ok(())
    }

    fn lose_connection(&mut self) {
        self.log.push("DROPPED".into());
        self.connected = false;
        self.open = None;
    }

    /// Judges `reply` like the real relay: 421 closes, a reply that does not fit drops.
    fn judge(&mut self, stage: Stage, reply: Reply) -> RelayResult {
        if reply.code == 421 {
            self.lose_connection();
        }
        let checked = check(stage, reply);
        if checked.is_err() && self.connected {
            self.lose_connection();
        }
        checked
    }

    fn reply(code: u16, text: &str) -> Reply {
        Reply::from_backend(code, &[text])
    }
}

impl Relay for MemoryRelay {
    fn login(&mut self, user: &str, password: &str) -> RelayResult {
        if self.down {
            return Err(RelayError::Unavailable("connection refused".into()));
        }
        self.log.push(format!("AUTH {user}"));
        if self
            .accounts
            .iter()
            .any(|(u, p)| u == user && p == password)
        {
            self.connected = true;
            Ok(Self::reply(235, "2.7.0 Authentication successful"))
        } else {
            Ok(Self::reply(535, "5.7.8 Error: authentication failed"))
        }
    }

    fn mail(&mut self, from: &str) -> RelayResult {
        self.connect()?;
        self.exchange(format!("MAIL FROM:<{from}>"))?;
        if self.open.is_some() {
            // What Postfix says when a transaction was left open.
            return self.judge(
                Stage::Mail,
                Self::reply(503, "5.5.1 Error: nested MAIL command"),
            );
        }
        self.open = Some(Delivery {
            from: from.to_string(),
            to: Vec::new(),
            data: Vec::new(),
        });
        self.judge(Stage::Mail, Self::reply(250, "2.1.0 Ok"))
    }

    fn rcpt(&mut self, to: &str) -> RelayResult {
        self.exchange(format!("RCPT TO:<{to}>"))?;
        let configured = self
            .rcpt_replies
            .iter()
            .find(|(address, _)| address.eq_ignore_ascii_case(to))
            .map(|(_, reply)| reply.clone());
        let reply = if let Some(reply) = configured {
            reply
        } else if self.unknown.iter().any(|u| u.eq_ignore_ascii_case(to)) {
            Self::reply(
                550,
                &format!("5.1.1 <{to}>: Recipient address rejected: User unknown"),
            )
        } else if let Some(open) = &mut self.open {
            open.to.push(to.to_string());
            Self::reply(250, "2.1.5 Ok")
        } else {
            Self::reply(503, "5.5.1 Error: need MAIL command")
        };
        self.judge(Stage::Rcpt, reply)
    }

    fn data(&mut self, message: &mut dyn Read, len: u64) -> RelayResult {
        self.exchange("DATA".into())?;
        let reply = match (self.data_command_reply.take(), &self.open) {
            (Some(reply), _) => reply,
            (None, Some(open)) if !open.to.is_empty() => Self::reply(354, "End data"),
            _ => Self::reply(554, "5.5.1 Error: no valid recipients"),
        };
        let reply = self.judge(Stage::Data, reply)?;
        if reply.code != 354 {
            self.reset();
            return Ok(reply);
        }
        let mut data = Vec::new();
        message
            .read_to_end(&mut data)
            .map_err(|e| RelayError::Local(e.to_string()))?;
        assert_eq!(data.len() as u64, len, "length announced to the relay");
        self.exchange(format!("MESSAGE {len}"))?;
        let mut open = self.open.take().expect("a transaction is open");
        if let Some(e) = self.data_error.take() {
            self.lose_connection();
            return Err(e);
        }
        if let Some(reply) = self
            .data_reply_once
            .take()
            .or_else(|| self.data_reply.clone())
        {
            return self.judge(Stage::EndOfData, reply);
        }
        open.data = data;
        self.delivered.push(open);
        let queued = format!("2.0.0 Ok: queued as Q{}", self.delivered.len());
        self.judge(Stage::EndOfData, Self::reply(250, &queued))
    }

    fn keepalive(&mut self) -> Result<(), RelayError> {
        if self.open.is_none() {
            return Ok(());
        }
        self.exchange("NOOP".into())?;
        self.judge(Stage::Noop, Self::reply(250, "2.0.0 Ok"))
            .map(drop)
    }

    fn reset(&mut self) {
        if self.open.take().is_some() && self.connected {
            self.log.push("RSET".into());
        }
    }

    fn quit(&mut self) {
        if self.connected {
            self.log.push("QUIT".into());
            self.connected = false;
        }
        self.open = None;
    }
}
