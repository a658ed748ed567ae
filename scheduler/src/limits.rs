//! Rate and concurrency limits (`scheduler limit`), enforced in one place: the scheduler
//! publishes a job that a limit applies to only when the limit allows, and holds it
//! `throttled` meanwhile, in a queue of its limit's value (each customer has its own), first
//! come first out. Everything lives in the store and changes in the transactions that change
//! the jobs' states:
//!
//! - `limits`: the scope → its [`Limit`];
//! - `limit_waiting`: scope + value + the job's creation time + its uuid → its uuid, for a
//!   throttled job: ordered by when the jobs came, wherever a job waits (a job released by
//!   one limit and held by another takes its place by age in that one's queue, never
//!   behind jobs that came after it);
//! - `limit_running`: scope + value + uuid → () for each job published under a concurrency
//!   limit and not yet over, taken as it is queued and given back as its state becomes final
//!   or it waits for a retry: keyed by uuid, so a job counts once whatever comes twice, and
//!   the count after a crash is what the store holds;
//! - `limit_windows`: scope + value → the times (ms) of the latest admissions under its rate:
//!   a sliding window, so that no interval anywhere holds more than the rate allows (a token
//!   bucket would let twice as many through across the refill of a full bucket).

use chrono::{DateTime, Utc};
use fjall::Readable;
use rota_common::wire::{JobId, JobRecord, Limit, LimitInfo, LimitScope, LimitUsage, Rate};

use crate::store::{Keyspace, WriteTx};

/// The keyspaces of the limits (see the module's doc).
pub struct Spaces<'a> {
    pub limits: &'a Keyspace,
    pub waiting: &'a Keyspace,
    pub running: &'a Keyspace,
    pub windows: &'a Keyspace,
}

/// What the gate decided for a job about to be published.
#[derive(Debug, PartialEq)]
pub enum Gate {
    /// Its limits allow it (and count it): publish it.
    Open,
    /// Held `throttled` for the reason given; a rate allows it again at `retry_at`.
    Held {
        reason: String,
        retry_at: Option<DateTime<Utc>>,
    },
}

/// The key of a scope in the `limits` keyspace.
pub fn scope_key(scope: &LimitScope) -> Vec<u8> {
    let (tag, name) = match scope {
        LimitScope::WorkType(t) => (b'w', t),
        LimitScope::Label(k) => (b'l', k),
    };
    let mut k = vec![tag];
    k.extend_from_slice(name.as_bytes());
    k
}

/// The prefix of the keys of one value of a scope: each part with its length before it.
fn prefix(scope: &LimitScope, value: &str) -> Vec<u8> {
    let mut k = Vec::new();
    for part in [scope_key(scope), value.as_bytes().to_vec()] {
        k.extend_from_slice(&(part.len() as u16).to_be_bytes());
        k.extend_from_slice(&part);
    }
    k
}

/// The entry of `record` in the queue with prefix `p`: by its creation time, then uuid.
fn entry(p: &[u8], record: &JobRecord) -> Vec<u8> {
    let mut k = p.to_vec();
    let nanos = record.created_at.timestamp_nanos_opt().unwrap_or_default();
    k.extend_from_slice(&nanos.max(0).to_be_bytes());
    k.extend_from_slice(record.uuid.as_bytes());
    k
}

/// The scope and the value that a key starts with, and the length of that prefix.
fn split(key: &[u8]) -> Option<(LimitScope, String, usize)> {
    let mut at = 0;
    let mut part = || {
        let len = u16::from_be_bytes(key.get(at..at + 2)?.try_into().ok()?) as usize;
        let bytes = key.get(at + 2..at + 2 + len)?;
        at += 2 + len;
        Some(bytes.to_vec())
    };
    let scope = part()?;
    let value = String::from_utf8(part()?).ok()?;
    let name = String::from_utf8(scope.get(1..)?.to_vec()).ok()?;
    let scope = match scope.first()? {
        b'w' => LimitScope::WorkType(name),
        b'l' => LimitScope::Label(name),
        _ => return None,
    };
    Some((scope, value, at))
}

fn id_from(bytes: &[u8]) -> Option<JobId> {
    uuid::Uuid::from_slice(bytes).ok().map(JobId)
}

/// Every limit, read in `tx`.
pub fn all(tx: &impl Readable, s: &Spaces) -> anyhow::Result<Vec<Limit>> {
    tx.iter(s.limits)
        .map(|item| Ok(serde_json::from_slice(&item.value()?)?))
        .collect()
}

/// Whether a rate that admitted at the times `times` (ms, oldest first) admits one more at
/// `now`: None if it does, else when it will (the oldest of the last `count` plus the
/// interval). No window of `interval_ms` then holds more than `count` admissions.
pub fn rate_allows(times: &[i64], rate: Rate, now: i64) -> Option<i64> {
    let interval = i64::try_from(rate.interval_ms).unwrap_or(i64::MAX);
    let recent = times
        .iter()
        .filter(|t| now.saturating_sub(**t) < interval)
        .count();
    let count = rate.count as usize;
    (recent >= count).then(|| times[times.len() - count].saturating_add(interval))
}

/// `times` with `now` added, keeping only the last `count` of those within the interval.
fn admitted_at(times: &[i64], rate: Rate, now: i64) -> Vec<i64> {
    let interval = i64::try_from(rate.interval_ms).unwrap_or(i64::MAX);
    let mut kept: Vec<i64> = times
        .iter()
        .copied()
        .filter(|t| now.saturating_sub(*t) < interval)
        .collect();
    kept.push(now);
    let extra = kept.len().saturating_sub(rate.count as usize);
    kept.drain(..extra);
    kept
}

fn read_times(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks_exact(8)
        .map(|c| i64::from_be_bytes(c.try_into().unwrap_or_default()))
        .collect()
}

fn write_times(times: &[i64]) -> Vec<u8> {
    times.iter().flat_map(|t| t.to_be_bytes()).collect()
}

/// How many keys of `keyspace` start with `prefix`.
fn count(tx: &WriteTx, keyspace: &Keyspace, prefix: &[u8]) -> usize {
    tx.prefix(keyspace, prefix).count()
}

/// Decides whether `record`, about to be published, may be: every limit that applies to it
/// must have room, and no older job of the same value may wait. `waiting_at` is its
/// entry in a waiting queue, when it waits in one. Open: the limits count it (a concurrency
/// slot, a time in the rate's window) and its entry goes. Held: it waits in the queue of the
/// first limit that holds it, in its place by age.
pub fn gate(
    tx: &mut WriteTx,
    s: &Spaces,
    limits: &[Limit],
    record: &JobRecord,
    waiting_at: Option<&[u8]>,
    now: DateTime<Utc>,
) -> anyhow::Result<Gate> {
    let now_ms = now.timestamp_millis();
    let mut applying = Vec::new();
    for limit in limits {
        let Some(value) = limit.scope.value_of(&record.job) else {
            continue;
        };
        let p = prefix(&limit.scope, value);
        let named = limit.scope.with_value(value);
        let first = tx
            .prefix(s.waiting, &p)
            .next()
            .map(|item| item.key())
            .transpose()?;
        let mut held = None;
        if let Some(max) = limit.concurrency {
            let running = count(tx, s.running, &p);
            if running >= max as usize {
                held = Some((
                    format!("waiting for concurrency limit {named} ({running} running)"),
                    None,
                ));
            }
        }
        let times = match tx.get(s.windows, &p)? {
            Some(bytes) => read_times(&bytes),
            None => Vec::new(),
        };
        if held.is_none()
            && let Some(rate) = limit.rate
            && let Some(at) = rate_allows(&times, rate, now_ms)
        {
            held = Some((
                format!("waiting for rate limit {named} {rate}"),
                DateTime::from_timestamp_millis(at),
            ));
        }
        // An older job waits for this value: it goes first.
        let ahead = first.is_some_and(|k| *k < *entry(&p, record));
        if held.is_none() && ahead {
            held = Some((
                format!("waiting behind earlier jobs of limit {named}"),
                None,
            ));
        }
        if let Some((reason, retry_at)) = held {
            let mine = entry(&p, record);
            if waiting_at != Some(mine.as_slice()) {
                if let Some(old) = waiting_at {
                    tx.remove(s.waiting, old);
                }
                tx.insert(s.waiting, mine, record.uuid.as_bytes().as_slice());
            }
            return Ok(Gate::Held { reason, retry_at });
        }
        applying.push((limit, p, times));
    }
    if let Some(old) = waiting_at {
        tx.remove(s.waiting, old);
    }
    for (limit, p, times) in applying {
        if limit.concurrency.is_some() {
            let mut key = p.clone();
            key.extend_from_slice(record.uuid.as_bytes());
            tx.insert(s.running, key, [0u8; 0]);
        }
        if let Some(rate) = limit.rate {
            tx.insert(
                s.windows,
                p,
                write_times(&admitted_at(&times, rate, now_ms)),
            );
        }
    }
    Ok(Gate::Open)
}

/// Gives back the concurrency slots of `record`, whose state became final or which waits for
/// a retry (a slot it does not hold is no matter).
pub fn give_back(
    tx: &mut WriteTx,
    s: &Spaces,
    limits: &[Limit],
    record: &JobRecord,
) -> anyhow::Result<()> {
    for limit in limits.iter().filter(|l| l.concurrency.is_some()) {
        if let Some(value) = limit.scope.value_of(&record.job) {
            let mut key = prefix(&limit.scope, value);
            key.extend_from_slice(record.uuid.as_bytes());
            tx.remove(s.running, key);
        }
    }
    Ok(())
}

/// Takes a throttled job out of its waiting queue (it ends without running).
pub fn forget(
    tx: &mut WriteTx,
    s: &Spaces,
    limits: &[Limit],
    record: &JobRecord,
) -> anyhow::Result<()> {
    for limit in limits {
        if let Some(value) = limit.scope.value_of(&record.job) {
            tx.remove(s.waiting, entry(&prefix(&limit.scope, value), record));
        }
    }
    Ok(())
}

/// The first job waiting in a queue.
pub struct Head {
    /// Its entry.
    pub key: Vec<u8>,
    /// The prefix of its queue (a scope and a value).
    pub queue: Vec<u8>,
    /// None when the entry is unreadable.
    pub uuid: Option<JobId>,
}

/// The first waiting job of the first queue after `after` (the key of a queue's last
/// possible entry, see [`queue_end`]).
pub fn next_head(tx: &WriteTx, s: &Spaces, after: Option<&[u8]>) -> anyhow::Result<Option<Head>> {
    use std::ops::Bound;
    let from = match after {
        Some(k) => Bound::Excluded(k.to_vec()),
        None => Bound::Unbounded,
    };
    let Some(item) = tx
        .range(s.waiting, (from, Bound::<Vec<u8>>::Unbounded))
        .next()
    else {
        return Ok(None);
    };
    let (key, uuid) = item.into_inner()?;
    let end = split(&key).map_or(key.len(), |(_, _, end)| end);
    Ok(Some(Head {
        key: key.to_vec(),
        queue: key[..end].to_vec(),
        uuid: id_from(&uuid),
    }))
}

/// The key after every entry of the queue with prefix `p`.
pub fn queue_end(p: &[u8]) -> Vec<u8> {
    let mut k = p.to_vec();
    k.extend_from_slice(&[0xff; 24]);
    k
}

/// Forgets what the limits that `old` had and `new` has not counted: the slots of a
/// concurrency cleared, the window of a rate cleared (a limit set again starts afresh).
pub fn cleared(
    tx: &mut WriteTx,
    s: &Spaces,
    old: &Limit,
    new: Option<&Limit>,
) -> anyhow::Result<()> {
    let mut p = Vec::new();
    let key = scope_key(&old.scope);
    p.extend_from_slice(&(key.len() as u16).to_be_bytes());
    p.extend_from_slice(&key);
    let mut gone = Vec::new();
    if old.concurrency.is_some() && new.is_none_or(|n| n.concurrency.is_none()) {
        for item in tx.prefix(s.running, &p) {
            gone.push((s.running, item.key()?));
        }
    }
    if old.rate.is_some() && new.is_none_or(|n| n.rate.is_none()) {
        for item in tx.prefix(s.windows, &p) {
            gone.push((s.windows, item.key()?));
        }
    }
    for (keyspace, key) in gone {
        tx.remove(keyspace, key);
    }
    Ok(())
}

/// Every limit with the jobs it holds, by value.
pub fn usage(tx: &impl Readable, s: &Spaces) -> anyhow::Result<Vec<LimitInfo>> {
    use std::collections::BTreeMap;
    let limits = all(tx, s)?;
    let mut by: BTreeMap<(LimitScope, String), LimitUsage> = BTreeMap::new();
    for (keyspace, is_running) in [(s.waiting, false), (s.running, true)] {
        for item in tx.iter(keyspace) {
            let Some((scope, value, _)) = split(&item.key()?) else {
                continue;
            };
            let usage = by.entry((scope, value.clone())).or_insert(LimitUsage {
                value,
                waiting: 0,
                running: 0,
            });
            if is_running {
                usage.running += 1;
            } else {
                usage.waiting += 1;
            }
        }
    }
    Ok(limits
        .into_iter()
        .map(|limit| {
            let values = by
                .range((limit.scope.clone(), String::new())..)
                .take_while(|((scope, _), _)| *scope == limit.scope)
                .map(|(_, usage)| usage.clone())
                .collect();
            LimitInfo { limit, values }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sliding_window_never_holds_more_than_the_rate() {
        let rate = Rate {
            count: 3,
            interval_ms: 1000,
        };
        let mut times = Vec::new();
        let mut admitted = Vec::new();
        // Asks every 50 ms for 5 s: whatever is admitted, no 1 s holds more than 3.
        for now in (0..5000).step_by(50) {
            match rate_allows(&times, rate, now) {
                None => {
                    times = admitted_at(&times, rate, now);
                    admitted.push(now);
                }
                Some(at) => assert!(at > now, "a time to come back later"),
            }
            assert!(times.len() <= 3, "only the last `count` times are kept");
        }
        for start in admitted.iter() {
            let within = admitted
                .iter()
                .filter(|t| (*start..start + 1000).contains(*t));
            assert!(within.count() <= 3, "{admitted:?}");
        }
        assert_eq!(
            &admitted[..4],
            &[0, 50, 100, 1000],
            "three at once, the fourth 1 s after the first"
        );
        assert_eq!(admitted.len(), 15, "three per second over 5 s");
    }

    #[test]
    fn a_rate_says_when_it_allows_again() {
        let rate = Rate {
            count: 2,
            interval_ms: 1000,
        };
        assert_eq!(rate_allows(&[], rate, 0), None);
        assert_eq!(rate_allows(&[100], rate, 200), None);
        assert_eq!(rate_allows(&[100, 300], rate, 400), Some(1100));
        assert_eq!(
            rate_allows(&[100, 300], rate, 1100),
            None,
            "the first left the window"
        );
    }

    #[test]
    fn keys_give_back_their_scope_and_value() {
        for scope in [
            LimitScope::WorkType("pdf.render".into()),
            LimitScope::Label("customer".into()),
        ] {
            let p = prefix(&scope, "a\0b");
            let mut key = p.clone();
            key.extend_from_slice(&[7; 24]);
            assert_eq!(split(&key), Some((scope, "a\0b".to_owned(), p.len())));
        }
    }

    #[test]
    fn rates_are_read_and_shown_as_written() {
        for (text, count, ms) in [
            ("10/1s", 10, 1000),
            ("100/1m", 100, 60_000),
            ("5/500ms", 5, 500),
            ("7/2h", 7, 7_200_000),
        ] {
            let rate: Rate = text.parse().expect("a valid rate");
            assert_eq!((rate.count, rate.interval_ms), (count, ms));
            assert_eq!(rate.to_string(), text);
        }
        for bad in ["10", "0/1s", "10/1d", "x/1s", "10/0s"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad} is refused");
        }
    }
}
