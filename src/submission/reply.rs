//! The EHLO reply read into the extensions the client uses (RFC 5321 §4.1.1.1: the EHLO
//! keywords, one per line after the first). Replies themselves, and their reader, are
//! [`crate::smtp_wire`]'s, shared with the SMTP front end and STARTTLS.

pub use crate::smtp_wire::Reply;

/// What the server's EHLO reply offers (RFC 5321 §4.1.1.1), read once per EHLO.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// RFC 2920: commands may be sent in groups.
    pub pipelining: bool,
    /// RFC 3030: BDAT instead of DATA.
    pub chunking: bool,
    /// RFC 1870: the server's message size limit (`None`: no SIZE; `Some(0)`: no limit).
    pub size: Option<u64>,
    /// RFC 6152.
    pub eight_bit_mime: bool,
    /// RFC 6531.
    pub smtputf8: bool,
    /// RFC 3207.
    pub starttls: bool,
    /// RFC 2034.
    pub enhanced_status_codes: bool,
    /// RFC 4954 AUTH mechanisms, upper case (also from the old `AUTH=` form).
    pub auth: Vec<String>,
}

impl Extensions {
    /// Reads the EHLO reply's lines after the first (which is the server's name).
    pub fn parse(reply: &Reply) -> Extensions {
        let mut offered = Extensions::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            let keyword = keyword.to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => offered.pipelining = true,
                "CHUNKING" => offered.chunking = true,
                "SIZE" => {
                    offered.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0))
                }
                "8BITMIME" => offered.eight_bit_mime = true,
                "SMTPUTF8" => offered.smtputf8 = true,
                "STARTTLS" => offered.starttls = true,
                "ENHANCEDSTATUSCODES" => offered.enhanced_status_codes = true,
                _ => {}
            }
            let mechanisms = match keyword.strip_prefix("AUTH=") {
                Some(first) => Some(std::iter::once(first.to_string())),
                None if keyword == "AUTH" => Some(std::iter::once(String::new())),
                None => None,
            };
            if let Some(first) = mechanisms {
                let all = first
                    .chain(words.map(str::to_ascii_uppercase))
                    .filter(|m| !m.is_empty());
                for mechanism in all {
                    if !offered.auth.contains(&mechanism) {
                        offered.auth.push(mechanism);
                    }
                }
            }
        }
        offered
    }

    /// Whether AUTH `mechanism` (upper case) is offered.
    pub fn offers_auth(&self, mechanism: &str) -> bool {
        self.auth.iter().any(|m| m == mechanism)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp_wire::read_lines as read;

    #[test]
    fn ehlo_keywords_are_read_once() {
        let reply = read(&[
            "250-smtp.example.com at your service",
            "250-SIZE 35882577",
            "250-8BITMIME",
            "250-AUTH LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH",
            "250-AUTH=login",
            "250-ENHANCEDSTATUSCODES",
            "250-pipelining",
            "250-CHUNKING",
            "250 SMTPUTF8",
        ])
        .unwrap()
        .remove(0);
        let offered = Extensions::parse(&reply);
        assert!(offered.pipelining && offered.chunking && offered.eight_bit_mime);
        assert!(offered.smtputf8 && offered.enhanced_status_codes && !offered.starttls);
        assert_eq!(offered.size, Some(35882577));
        assert_eq!(
            offered.auth,
            [
                "LOGIN",
                "PLAIN",
                "XOAUTH2",
                "PLAIN-CLIENTTOKEN",
                "OAUTHBEARER",
                "XOAUTH"
            ]
        );
        let bare = read(&["250-mx", "250 STARTTLS"]).unwrap().remove(0);
        let offered = Extensions::parse(&bare);
        assert!(offered.starttls && !offered.pipelining && !offered.chunking);
        assert_eq!(offered.size, None);
        // The first line is the server's name, never a keyword.
        let named = read(&["250 PIPELINING"]).unwrap().remove(0);
        assert_eq!(Extensions::parse(&named), Extensions::default());
    }
}
