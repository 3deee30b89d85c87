//! An in-memory [`Relay`] for transcript tests: it records what a backend would have seen
//! and answers the way Postfix does (`250 2.1.0 Ok`, `550 5.1.1 … User unknown`).

use super::relay::{Relay, RelayError, RelayResult};
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
    /// `RCPT TO:<b>`, `DATA <len>`, `RSET`, `QUIT`.
    pub log: Vec<String>,
    pub delivered: Vec<Delivery>,
    /// Recipients refused with `550 5.1.1`.
    pub unknown: Vec<String>,
    /// Every connection attempt fails.
    pub down: bool,
    /// The configured login is refused.
    pub login_refused: bool,
    /// Accounts for passthrough logins.
    pub accounts: Vec<(String, String)>,
    /// Overrides the reply to the final dot.
    pub data_reply: Option<Reply>,
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
        if self.login_refused {
            return Err(RelayError::LoginRefused(
                "535 5.7.8 Error: authentication failed".into(),
            ));
        }
        self.log.push("CONNECT".into());
        self.connected = true;
        Ok(())
    }

    fn ok(code: u16, text: &str) -> RelayResult {
        Ok(Reply::from_backend(code, &[text]))
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
            Self::ok(235, "2.7.0 Authentication successful")
        } else {
            Self::ok(535, "5.7.8 Error: authentication failed")
        }
    }

    fn mail(&mut self, from: &str) -> RelayResult {
        self.connect()?;
        self.log.push(format!("MAIL FROM:<{from}>"));
        self.open = Some(Delivery {
            from: from.to_string(),
            to: Vec::new(),
            data: Vec::new(),
        });
        Self::ok(250, "2.1.0 Ok")
    }

    fn rcpt(&mut self, to: &str) -> RelayResult {
        self.log.push(format!("RCPT TO:<{to}>"));
        if self.unknown.iter().any(|u| u.eq_ignore_ascii_case(to)) {
            return Self::ok(
                550,
                &format!("5.1.1 <{to}>: Recipient address rejected: User unknown"),
            );
        }
        match &mut self.open {
            Some(open) => {
                open.to.push(to.to_string());
                Self::ok(250, "2.1.5 Ok")
            }
            None => Self::ok(503, "5.5.1 Error: need MAIL command"),
        }
    }

    fn data(&mut self, message: &mut dyn Read, len: u64) -> RelayResult {
        let mut data = Vec::new();
        message
            .read_to_end(&mut data)
            .map_err(|e| RelayError::Local(e.to_string()))?;
        assert_eq!(data.len() as u64, len, "length announced to the relay");
        self.log.push(format!("DATA {len}"));
        let open = self.open.take();
        if let Some(reply) = self.data_reply.clone() {
            return Ok(reply);
        }
        match open {
            Some(mut delivery) if !delivery.to.is_empty() => {
                delivery.data = data;
                self.delivered.push(delivery);
                Self::ok(
                    250,
                    &format!("2.0.0 Ok: queued as Q{}", self.delivered.len()),
                )
            }
            _ => Self::ok(554, "5.5.1 Error: no valid recipients"),
        }
    }

    fn reset(&mut self) {
        if self.open.take().is_some() {
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
