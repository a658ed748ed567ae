//! The Dockerfiles of `deploy/images`, checked without a registry (none is reachable here to
//! pull `rust` or `debian` from): hadolint finds nothing in them, each image runs as a numeric
//! non-root user with an exec-form entrypoint, each builds binaries the workspace has, and each
//! image the Kubernetes manifests name has its Dockerfile.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests package sits in the repository")
        .to_owned()
}

/// deploy/images/<name>/Dockerfile, by name.
fn dockerfiles() -> Vec<(String, PathBuf)> {
    let mut found: Vec<(String, PathBuf)> = std::fs::read_dir(repo().join("deploy/images"))
        .expect("deploy/images")
        .flatten()
        .map(|e| e.path().join("Dockerfile"))
        .filter(|p| p.exists())
        .map(|p| {
            let name = p
                .parent()
                .and_then(Path::file_name)
                .expect("a folder")
                .to_string_lossy()
                .into_owned();
            (name, p)
        })
        .collect();
    found.sort();
    assert!(
        found.len() >= 3,
        "expected the scheduler, pool-agent and worker Dockerfiles"
    );
    found
}

/// The instructions of a Dockerfile, continuation lines joined, comments dropped.
fn instructions(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).expect("readable Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

#[test]
fn hadolint_finds_nothing_in_the_dockerfiles() {
    let hadolint = rota_tests::tool("hadolint");
    for (name, path) in dockerfiles() {
        let out = Command::new(&hadolint)
            .arg(&path)
            .output()
            .expect("hadolint runs");
        assert!(
            out.status.success(),
            "hadolint on the {name} Dockerfile:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_image_runs_as_a_numeric_non_root_user_without_a_shell() {
    for (name, path) in dockerfiles() {
        let all = instructions(&path);
        // The runtime stage: everything after the last FROM.
        let last_from = all
            .iter()
            .rposition(|i| i.starts_with("FROM "))
            .expect("a FROM");
        let runtime = &all[last_from..];
        let user = runtime
            .iter()
            .rev()
            .find_map(|i| i.strip_prefix("USER "))
            .unwrap_or_else(|| panic!("{name}: the image sets no USER, so it runs as root"));
        let ids: Vec<u32> = user
            .split(':')
            .map(|id| {
                id.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}: USER {user} is not numeric (uid:gid), so Kubernetes' runAsNonRoot cannot check it"))
            })
            .collect();
        assert!(ids.iter().all(|&id| id != 0), "{name}: USER {user} is root");
        let entrypoint = runtime
            .iter()
            .find_map(|i| i.strip_prefix("ENTRYPOINT "))
            .unwrap_or_else(|| panic!("{name}: no ENTRYPOINT"));
        assert!(
            entrypoint.trim().starts_with('['),
            "{name}: ENTRYPOINT {entrypoint} is in shell form, which needs a shell at run time"
        );
    }
}

#[test]
fn every_image_builds_binaries_of_the_workspace() {
    for (name, path) in dockerfiles() {
        let all = instructions(&path).join(" ");
        let bins: Vec<&str> = all
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "--bin")
            .map(|w| w[1].trim_matches('"'))
            .collect();
        assert!(!bins.is_empty(), "{name}: builds no --bin");
        for bin in bins {
            // A build argument (the worker image's RUNTIME_BIN) names its default in an ARG.
            let bin = match bin.strip_prefix("${").and_then(|b| b.strip_suffix('}')) {
                Some(arg) => all
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{arg}=")))
                    .unwrap_or_else(|| panic!("{name}: ARG {arg} has no default"))
                    .to_owned(),
                None => bin.to_owned(),
            };
            // Panics with a clear message when the workspace has no such binary.
            rota_tests::bin(&bin);
        }
    }
}

#[test]
fn every_image_the_kubernetes_manifests_name_has_a_dockerfile() {
    let text = std::fs::read_to_string(repo().join("deploy/kubernetes/base/kustomization.yaml"))
        .expect("the base kustomization");
    let k: serde_json::Value = serde_yaml_ng::from_str(&text).expect("YAML");
    let images = k["images"].as_array().expect("an images list");
    assert!(!images.is_empty());
    for image in images {
        let name = image["name"].as_str().expect("a name");
        let folder = name.strip_prefix("rota/").expect("rota/<image>");
        let dockerfile = repo().join("deploy/images").join(folder).join("Dockerfile");
        assert!(
            dockerfile.exists(),
            "{name} has no Dockerfile at {}",
            dockerfile.display()
        );
    }
}
