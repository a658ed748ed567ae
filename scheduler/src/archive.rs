//! The folder of each Work on the scheduler's side: `<data>/scheduler/work/<uuid>/attempt-N/`
//! holds `result.json` (the whole result) and `logs.txt` (its log lines, one per line), for
//! people and for tools that collect files. The store holds all of it too, so by default a
//! run gets its folder only when it has something worth a file ([`JobFolders`]).

use std::path::Path;

use anyhow::Context;
use clap::ValueEnum;
use rota_common::wire::{JobResult, Level, Status};

/// Which runs get a folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum JobFolders {
    /// The runs with something worth a file: a run that did not succeed, log lines above
    /// debug (or many of them), an output or payload too large to show whole in `status`.
    Used,
    /// Every run.
    Always,
}

/// Bytes of output, payload or log text past which a run gets its folder: the replies of
/// `status` leave out outputs and payloads over 256 bytes and point to the folder instead.
const LARGE: usize = 256;

impl JobFolders {
    /// Whether the run of `result` gets a folder.
    pub fn wanted(self, result: &JobResult) -> bool {
        let large = |v: &serde_json::Value| serde_json::to_vec(v).map_or(true, |b| b.len() > LARGE);
        match self {
            JobFolders::Always => true,
            JobFolders::Used => {
                result.status != Status::Succeeded
                    || result.logs_dropped > 0
                    || result.logs.iter().any(|l| l.level > Level::Debug)
                    || result.logs.iter().map(|l| l.message.len()).sum::<usize>() > LARGE
                    || large(&result.output)
                    || large(&result.job.payload)
            }
        }
    }
}

/// Writes the files of one run (again, if they exist: the content is the same result).
pub fn write(job_dir: &Path, result: &JobResult) -> anyhow::Result<()> {
    let dir = job_dir.join(format!("attempt-{}", result.attempt));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let json = serde_json::to_vec_pretty(result)?;
    std::fs::write(dir.join("result.json"), json)?;
    let mut logs = String::new();
    for line in &result.logs {
        logs.push_str(&line.to_string());
        logs.push('\n');
    }
    std::fs::write(dir.join("logs.txt"), logs)?;
    Ok(())
}

/// Whether the files of this run exist.
pub fn exists(job_dir: &Path, attempt: u32) -> bool {
    job_dir
        .join(format!("attempt-{attempt}"))
        .join("result.json")
        .exists()
}
