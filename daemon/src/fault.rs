//! Deliberate failures at named points, to test the failure paths that real faults
//! reach only by luck: a disk that fills mid-upload, a process killed between two
//! steps of a commit, a chunk lost or duplicated on the wire.
//!
//! Inactive unless a fault is registered — by a test in-process ([`inject`]) or for a
//! child process through `NBACKUP_FAULTS` — and then one relaxed atomic load per check.
//! Every fault has a *scope* (a storage directory, an `agent/backup` pair, …) and only
//! fires for checks within it, so tests running in parallel in one process do not
//! disturb each other.
//!
//! `NBACKUP_FAULTS` holds `point@scope=action[+skip][*times]` rules separated by `;`,
//! e.g. `commit:after-rename@/srv/backups=abort` or `chunk-write@/srv=errno28+3`.
//!
//! | point | where | actions |
//! |---|---|---|
//! | `chunk-write` | server, before writing a chunk (scope: storage dir) | `errnoN`, `delayMS` |
//! | `commit:before-intent`, `commit:before-rename`, `commit:after-rename`, `commit:manifest`, `commit:after-manifest`, `commit:log`, `rotate:after-delete` | server commit steps (scope: storage dir) | `abort`, `errnoN`, `delayMS` |
//! | `commit:verify` | server, before reading back each chunk at commit (scope: storage dir) | `errnoN`, `delayMS` |
//! | `rename-noreplace`, `link` | the final rename, and the probe at start (scope: the file renamed) | `errnoN` |
//! | `statvfs` | server, free-space checks (scope: storage dir) | `errnoN`, `delayMS` |
//! | `producer:panic` | agent archive thread, at start (scope: `agent/backup`) | `abort` (panics the thread) |
//! | `commit:answer` | server, before sending `Committed` (scope: storage dir) | `drop` |
//! | `send-chunk` | agent, before sending a chunk (scope: `agent/backup`) | `drop`, `duplicate` |

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

/// What happens at a fault point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The operation fails with this `errno`.
    Errno(i32),
    /// The process dies on the spot, like `kill -9`.
    Abort,
    /// The message is silently not sent.
    Drop,
    /// The message is sent twice.
    Duplicate,
    /// The operation takes this long first (a slow or frozen disk); blocking.
    Delay(std::time::Duration),
}

#[derive(Debug, Clone)]
struct Rule {
    id: u64,
    point: String,
    scope: String,
    action: Action,
    skip: u32,
    times: u32,
}

static ACTIVE: AtomicBool = AtomicBool::new(false);
static RULES: Mutex<Vec<Rule>> = Mutex::new(Vec::new());
static ENV: OnceLock<()> = OnceLock::new();

fn rules() -> std::sync::MutexGuard<'static, Vec<Rule>> {
    RULES.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn next_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Removes its fault when dropped.
#[must_use = "the fault is removed when this guard is dropped"]
pub struct Guard(u64);

impl Drop for Guard {
    fn drop(&mut self) {
        rules().retain(|r| r.id != self.0);
    }
}

/// Registers a fault: after `skip` passing checks of `point` within `scope`, the next
/// `times` checks get `action`.
pub fn inject(point: &str, scope: impl Into<String>, action: Action, skip: u32, times: u32) -> Guard {
    let id = next_id();
    rules().push(Rule { id, point: point.into(), scope: scope.into(), action, skip, times });
    ACTIVE.store(true, Ordering::Release);
    Guard(id)
}

fn load_env() {
    ENV.get_or_init(|| {
        let Ok(spec) = std::env::var("NBACKUP_FAULTS") else { return };
        for rule in spec.split(';').filter(|r| !r.trim().is_empty()) {
            match parse_rule(rule.trim()) {
                Some(r) => {
                    tracing::warn!(rule, "fault injection active");
                    rules().push(r);
                    ACTIVE.store(true, Ordering::Release);
                }
                None => tracing::error!(rule, "ignoring malformed NBACKUP_FAULTS rule"),
            }
        }
    });
}

fn parse_rule(s: &str) -> Option<Rule> {
    let (target, action) = s.split_once('=')?;
    let (point, scope) = target.split_once('@')?;
    let (action, times) = match action.split_once('*') {
        Some((a, t)) => (a, t.parse().ok()?),
        None => (action, u32::MAX),
    };
    let (action, skip) = match action.split_once('+') {
        Some((a, n)) => (a, n.parse().ok()?),
        None => (action, 0),
    };
    let action = match action {
        "abort" => Action::Abort,
        "drop" => Action::Drop,
        "duplicate" => Action::Duplicate,
        a if a.starts_with("delay") => Action::Delay(std::time::Duration::from_millis(a[5..].parse().ok()?)),
        a => Action::Errno(a.strip_prefix("errno")?.parse().ok()?),
    };
    Some(Rule { id: next_id(), point: point.into(), scope: scope.into(), action, skip, times })
}

/// The action due at `point` for `scope`, if any (counting this check).
pub fn hit(point: &str, scope: &str) -> Option<Action> {
    load_env();
    if !ACTIVE.load(Ordering::Acquire) {
        return None;
    }
    let mut rules = rules();
    let rule = rules.iter_mut().find(|r| r.point == point && scope.starts_with(&r.scope) && r.times > 0)?;
    if rule.skip > 0 {
        rule.skip -= 1;
        return None;
    }
    rule.times -= 1;
    let action = rule.action;
    drop(rules);
    tracing::warn!(point, scope, ?action, "injected fault");
    Some(action)
}

/// For I/O points: an injected errno becomes an error, a delay blocks the calling
/// thread, `abort` kills the process.
pub fn io(point: &str, scope: &str) -> std::io::Result<()> {
    match hit(point, scope) {
        Some(Action::Errno(e)) => Err(std::io::Error::from_raw_os_error(e)),
        Some(Action::Abort) => std::process::abort(),
        Some(Action::Delay(d)) => {
            std::thread::sleep(d);
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_fire_after_skip_for_their_times_within_scope() {
        let _g = inject("t:point", "/scope/a", Action::Errno(28), 1, 2);
        assert_eq!(hit("t:point", "/scope/b"), None, "other scope");
        assert_eq!(hit("t:point", "/scope/a/x"), None, "skipped once");
        assert_eq!(hit("t:point", "/scope/a/x"), Some(Action::Errno(28)));
        assert_eq!(io("t:point", "/scope/a").map_err(|e| e.raw_os_error()), Err(Some(28)));
        assert_eq!(hit("t:point", "/scope/a"), None, "used up");
    }

    #[test]
    fn guard_removes_its_fault() {
        let g = inject("t:guard", "s", Action::Drop, 0, 5);
        drop(g);
        assert_eq!(hit("t:guard", "s"), None);
    }

    #[test]
    fn parses_env_rules() {
        let r = parse_rule("commit:after-rename@/srv=abort").expect("rule");
        assert_eq!(
            (r.point.as_str(), r.scope.as_str(), r.action, r.skip),
            ("commit:after-rename", "/srv", Action::Abort, 0)
        );
        let r = parse_rule("chunk-write@/x=errno5+3*1").expect("rule");
        assert_eq!((r.action, r.skip, r.times), (Action::Errno(5), 3, 1));
        let r = parse_rule("commit:verify@/x=delay1500*2").expect("rule");
        assert_eq!((r.action, r.times), (Action::Delay(std::time::Duration::from_millis(1500)), 2));
        assert!(parse_rule("nonsense").is_none());
        assert!(parse_rule("p@s=explode").is_none());
    }
}
