//! The folder of each Work on the scheduler's side: `<data>/scheduler/work/<uuid>/attempt-N/`
//! holds `result.json` (the whole result) and `logs.txt` (its log lines, one per line), for
//! people and for tools that collect files.

use std::path::Path;

use anyhow::Context;
use rota_common::wire::JobResult;

/// Writes the files of one run (again, if they exist: the content is the same result).
pub async fn write(job_dir: &Path, result: &JobResult) -> anyhow::Result<()> {
    let dir = job_dir.join(format!("attempt-{}", result.attempt));
    tokio::fs::create_dir_all(&dir)
        .await
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let json = serde_json::to_vec_pretty(result)?;
    tokio::fs::write(dir.join("result.json"), json).await?;
    let mut logs = String::new();
    for line in &result.logs {
        logs.push_str(&line.to_string());
        logs.push('\n');
    }
    tokio::fs::write(dir.join("logs.txt"), logs).await?;
    Ok(())
}

/// Whether the files of this run exist.
pub fn exists(job_dir: &Path, attempt: u32) -> bool {
    job_dir
        .join(format!("attempt-{attempt}"))
        .join("result.json")
        .exists()
}
