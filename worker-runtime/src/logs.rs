//! The capped buffer of a Work's log lines: a Work that logs without end costs a bounded
//! amount of memory, and the result says how much was dropped.

use chrono::Utc;
use rota_common::wire::{Level, LogLine};

/// Keeps the first `max_lines` lines (each cut to `max_line_bytes`) and counts the rest.
#[derive(Debug, Clone)]
pub struct LogBuffer {
    lines: Vec<LogLine>,
    dropped: u64,
    max_lines: usize,
    max_line_bytes: usize,
}

impl Default for LogBuffer {
    fn default() -> Self {
        Self::new(10_000, 8 * 1024)
    }
}

impl LogBuffer {
    pub fn new(max_lines: usize, max_line_bytes: usize) -> Self {
        Self {
            lines: Vec::new(),
            dropped: 0,
            max_lines,
            max_line_bytes,
        }
    }

    pub fn push(&mut self, mut line: LogLine) {
        if self.lines.len() >= self.max_lines {
            self.dropped += 1;
            return;
        }
        if line.message.len() > self.max_line_bytes {
            let mut cut = self.max_line_bytes;
            while !line.message.is_char_boundary(cut) {
                cut -= 1;
            }
            line.message.truncate(cut);
            line.message.push_str(" […]");
        }
        self.lines.push(line);
    }

    /// The lines kept and the count of those dropped; when some were dropped, a last line
    /// says so (the truncation mark).
    pub fn finish(mut self) -> (Vec<LogLine>, u64) {
        if self.dropped > 0 {
            self.lines.push(LogLine {
                time: Utc::now(),
                level: Level::Warn,
                message: format!(
                    "[rota] {} more log lines dropped (limit {} lines)",
                    self.dropped, self.max_lines
                ),
            });
        }
        (self.lines, self.dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(msg: &str) -> LogLine {
        LogLine {
            time: Utc::now(),
            level: Level::Info,
            message: msg.into(),
        }
    }

    #[test]
    fn caps_lines_and_marks_the_cut() {
        let mut buf = LogBuffer::new(3, 5);
        for i in 0..10 {
            buf.push(line(&format!("line {i}")));
        }
        let (lines, dropped) = buf.finish();
        assert_eq!(dropped, 7);
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0].message, "line  […]");
        assert!(lines[3].message.contains("7 more log lines dropped"));
    }
}
