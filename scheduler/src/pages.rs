//! Replies in pages: every RPC reply stays under a byte budget (`--rpc-reply-budget`), since
//! one oversized reply would break the channel it shares with receipts. `list` and `logs`
//! answer a page at a time with a cursor for the next; what alone would not fit (a record's
//! large outputs, one huge log line) is cut with a mark that says where the whole is kept.

use std::path::Path;

use chrono::Utc;
use rota_common::wire::{JobRecord, Level, LogLine};
use serde_json::Value;

/// The default `--rpc-reply-budget`: well under RabbitMQ's message size limits.
pub const DEFAULT_REPLY_BUDGET: usize = 512 * 1024;

/// Room kept in a reply for what surrounds a page's content (tags, uuid, cursor).
const ENVELOPE: usize = 4 * 1024;

/// How many bytes of content a page holds under a reply budget.
pub fn content_budget(budget: usize) -> usize {
    budget.saturating_sub(ENVELOPE).max(1024)
}

/// A cursor that this scheduler did not give.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a cursor this scheduler gave: ask again without one, from the first page")]
pub struct BadCursor(String);

/// The cursor of a page of `list`: the position (a by-time key) to continue before.
pub fn list_cursor(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn parse_list_cursor(cursor: &str) -> Result<Vec<u8>, BadCursor> {
    let bad = || BadCursor(cursor.to_owned());
    if !cursor.len().is_multiple_of(2) || cursor.len() > 128 {
        return Err(bad());
    }
    (0..cursor.len())
        .step_by(2)
        .map(|i| {
            cursor
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(bad)
        })
        .collect()
}

/// The cursor of a page of `logs`: the attempt and line the next page starts at.
pub fn logs_cursor((attempt, line): (u32, usize)) -> String {
    format!("{attempt}.{line}")
}

pub fn parse_logs_cursor(cursor: &str) -> Result<(u32, usize), BadCursor> {
    let bad = || BadCursor(cursor.to_owned());
    let (attempt, line) = cursor.split_once('.').ok_or_else(bad)?;
    Ok((
        attempt.parse().map_err(|_| bad())?,
        line.parse().map_err(|_| bad())?,
    ))
}

/// The record, made to fit `budget` bytes of JSON: when it is larger, the outputs of its
/// attempts and of the jobs it waited for (its `inputs`), and its job's payload, are replaced
/// by a note of where they are kept.
pub fn fit_record(mut record: JobRecord, budget: usize) -> JobRecord {
    let size = |r: &JobRecord| serde_json::to_vec(r).map_or(usize::MAX, |v| v.len());
    if size(&record) <= budget {
        return record;
    }
    let dir = Path::new(&record.dir).to_owned();
    for a in &mut record.attempts {
        let bytes = serde_json::to_vec(&a.output).map_or(0, |v| v.len());
        if bytes > 256 {
            let file = dir
                .join(format!("attempt-{}", a.attempt))
                .join("result.json");
            a.output = Value::String(format!(
                "[rota: an output of {bytes} bytes, left out to keep the reply small; it is in {}]",
                file.display()
            ));
        }
    }
    // The outcomes of the jobs it waited for: each is in that job's own record.
    for input in &mut record.job.inputs {
        let bytes = serde_json::to_vec(&input.output).map_or(0, |v| v.len());
        if bytes > 256 {
            input.output = Value::String(format!(
                "[rota: an output of {bytes} bytes, left out to keep the reply small; `scheduler status {}` shows it]",
                input.uuid
            ));
        }
    }
    let bytes = serde_json::to_vec(&record.job.payload).map_or(0, |v| v.len());
    if size(&record) > budget && bytes > 256 {
        record.job.payload = Value::String(format!(
            "[rota: a payload of {bytes} bytes, left out to keep the reply small; the result files in {} hold it]",
            dir.display()
        ));
    }
    record
}

/// The last line of a first page of logs for a client that does not follow pages.
pub fn more_logs_line(uuid: impl std::fmt::Display, budget: usize, dir: &Path) -> LogLine {
    LogLine {
        time: Utc::now(),
        level: Level::Warn,
        message: format!(
            "[rota: the log goes on, past what one reply holds ({budget} bytes): \
             `scheduler logs {uuid}` prints every line, and {}/attempt-N/logs.txt holds them]",
            dir.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_refused() {
        let key = [0u8, 1, 0xab, 0xff];
        assert_eq!(
            parse_list_cursor(&list_cursor(&key)).expect("ours"),
            key.to_vec()
        );
        assert_eq!(
            parse_logs_cursor(&logs_cursor((3, 1500))).expect("ours"),
            (3, 1500)
        );
        for bad in ["xyz", "0", "é1", &"00".repeat(100)] {
            assert!(parse_list_cursor(bad).is_err(), "{bad}");
        }
        for bad in ["", "1", "1.x", "-1.2", "4294967296.0"] {
            assert!(parse_logs_cursor(bad).is_err(), "{bad}");
        }
    }
}
