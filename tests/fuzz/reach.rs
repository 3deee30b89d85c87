//! How deep the inputs got: counts of states the oracles saw (logins, messages sent,
//! relayed…), printed at the end so a run shows it did more than bounce off the parsers.

use std::cell::RefCell;
use std::collections::BTreeMap;

thread_local! {
    static COUNTS: RefCell<BTreeMap<&'static str, u64>> = const { RefCell::new(BTreeMap::new()) };
}

pub fn hit(what: &'static str) {
    COUNTS.with(|c| *c.borrow_mut().entry(what).or_default() += 1);
}

pub fn counts() -> Vec<(&'static str, u64)> {
    COUNTS.with(|c| c.borrow().iter().map(|(k, v)| (*k, *v)).collect())
}

/// Forgets what the self-check reached, so the report counts only the run.
pub fn reset() {
    COUNTS.with(|c| c.borrow_mut().clear());
}
