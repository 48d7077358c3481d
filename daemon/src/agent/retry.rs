//! The agent's one retry policy (`retry.*`), and how errors are classified for it.
//!
//! Every layer that can fail and try again — opening a session, re-joining a lost
//! stream, starting a fresh session — draws from one [`RetryBudget`] per run:
//! `retry.max_attempts` failures *in a row*, whatever layer they happened in, with
//! exponential backoff between them. Any progress (an acknowledged chunk) refills
//! it. So `max_attempts: 5` means five attempts, not five to the power of the number
//! of nested loops.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nbackup_protocol::config::Retry;

/// What a failure means for the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Trying the same again later may work: the network, a busy or restarting server.
    Transient,
    /// The session is lost (the server forgot it, or rejected the archive); only a new
    /// one, reading the sources again, can finish.
    FreshSession,
    /// Nobody but an operator can fix it: refused identity, unknown storage, bad
    /// certificate, unreadable sources, cancelled.
    Permanent,
}

/// Failures in a row, shared by every layer of one run.
#[derive(Debug)]
pub struct RetryBudget {
    policy: Retry,
    failures: AtomicU32,
    attempts: AtomicU32,
}

impl RetryBudget {
    pub fn new(policy: Retry) -> Self {
        RetryBudget { policy, failures: AtomicU32::new(0), attempts: AtomicU32::new(1) }
    }

    /// Records a failure. Returns how long to wait before the next try, or `None`
    /// when `max_attempts` tries in a row have failed.
    pub fn failed(&self) -> Option<Duration> {
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.policy.max_attempts {
            return None;
        }
        self.attempts.fetch_add(1, Ordering::Relaxed);
        Some(self.policy.delay(n))
    }

    /// Something got through: the budget is whole again.
    pub fn progressed(&self) {
        self.failures.store(0, Ordering::Release);
    }

    /// Tries so far, the first included.
    pub fn attempts(&self) -> u32 {
        self.attempts.load(Ordering::Relaxed)
    }

    pub fn policy(&self) -> &Retry {
        &self.policy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max: u32) -> Retry {
        Retry {
            max_attempts: max,
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(40),
            attempt_timeout: Duration::from_secs(60),
        }
    }

    #[test]
    fn max_attempts_is_tries_in_a_row_with_backoff() {
        let b = RetryBudget::new(policy(4));
        assert_eq!(b.failed(), Some(Duration::from_millis(10)));
        assert_eq!(b.failed(), Some(Duration::from_millis(20)));
        assert_eq!(b.failed(), Some(Duration::from_millis(40)));
        assert_eq!(b.attempts(), 4);
        assert_eq!(b.failed(), None, "the fourth failure in a row ends the run");
    }

    #[test]
    fn progress_refills_the_budget_and_layers_share_it() {
        let b = RetryBudget::new(policy(2));
        assert!(b.failed().is_some(), "a stream lost its connection");
        b.progressed();
        assert!(b.failed().is_some(), "the budget was refilled by progress");
        assert_eq!(b.failed(), None, "a second layer failing now does not get a budget of its own");
    }

    #[test]
    fn one_attempt_means_no_retry() {
        assert_eq!(RetryBudget::new(policy(1)).failed(), None);
    }
}
