//! The Kubernetes manifests of `deploy/kubernetes`: every kustomization renders (`kubectl
//! kustomize`); what it renders passes the Kubernetes schemas (`kubernetes-validate --strict`,
//! for the oldest and the newest Kubernetes we support); KEDA's resources, which those schemas
//! do not know, have the fields KEDA requires and point at what exists; the settings agree with
//! each other; the pods meet the restricted Pod Security Standard; and the config files the
//! ConfigMap carries run a job on the real binaries, which answer the probes' paths.
//!
//! The tools come from `deploy/setup.sh tools` (kubernetes-validate in `./.venv`; kubectl from
//! the PATH, or from the venv where the machine has none).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use rota_common::config::parse_duration;
use rota_tests::wire::{Job, Status};
use rota_tests::{System, event_of, free_addrs, probe_until, tool, within};
use serde_json::{Value, json};

/// The Kubernetes versions whose schemas the manifests must pass: the oldest we support (the
/// StatefulSet's PVC retention policy and the PDB's unhealthy-pod eviction policy are on by
/// default from 1.27) and the newest the pinned kubernetes-validate carries.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];

/// API groups of custom resources, which the schemas do not cover: checked for shape here.
const CUSTOM_GROUPS: [&str; 2] = ["keda.sh", "rabbitmq.com"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests package sits in the repository")
        .to_owned()
}

fn kubernetes_dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}

/// One kustomization directory and what `kubectl kustomize` made of it.
struct Rendered {
    /// Relative to deploy/kubernetes, e.g. `overlays/dev`.
    name: String,
    docs: Vec<Value>,
}

impl Rendered {
    fn of_kind<'a>(&'a self, kind: &str) -> impl Iterator<Item = &'a Value> + use<'a> {
        let kind = kind.to_owned();
        self.docs.iter().filter(move |d| d["kind"] == kind.as_str())
    }

    fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.of_kind(kind).find(|d| d["metadata"]["name"] == name)
    }

    /// The one resource of `kind` whose name is `name` or, for generated ones, `name-<hash>`.
    fn generated(&self, kind: &str, name: &str) -> &Value {
        let prefix = format!("{name}-");
        self.of_kind(kind)
            .find(|d| {
                let n = d["metadata"]["name"].as_str().unwrap_or_default();
                n == name || n.starts_with(&prefix)
            })
            .unwrap_or_else(|| panic!("{}: no {kind} {name}", self.name))
    }

    fn statefulset(&self, name: &str) -> &Value {
        self.find("StatefulSet", name)
            .unwrap_or_else(|| panic!("{}: no StatefulSet {name}", self.name))
    }
}

/// Every directory under deploy/kubernetes with a kustomization.yaml, and its kind
/// (`Kustomization` or `Component`).
fn kustomizations() -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, found: &mut Vec<(PathBuf, String)>) {
        let file = dir.join("kustomization.yaml");
        if file.exists() {
            let text = std::fs::read_to_string(&file).expect("readable kustomization");
            let k: Value = serde_yaml_ng::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not YAML: {e}", file.display()));
            let kind = k["kind"].as_str().unwrap_or("Kustomization").to_owned();
            found.push((dir.to_owned(), kind));
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("readable folder")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        entries.sort();
        for sub in entries {
            walk(&sub, found);
        }
    }
    let mut found = Vec::new();
    walk(&kubernetes_dir(), &mut found);
    found
}

fn render(dir: &Path) -> Rendered {
    let out = Command::new(tool("kubectl"))
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl runs");
    let name = dir
        .strip_prefix(kubernetes_dir())
        .expect("under deploy/kubernetes")
        .display()
        .to_string();
    assert!(
        out.status.success(),
        "kubectl kustomize {name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 YAML");
    let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("kustomize renders valid YAML"))
        .filter(|d: &Value| !d.is_null())
        .collect();
    assert!(!docs.is_empty(), "{name} renders nothing");
    Rendered { name, docs }
}

/// Every kustomization that can be built on its own (components are built inside overlays).
fn renders() -> &'static [Rendered] {
    static RENDERS: OnceLock<Vec<Rendered>> = OnceLock::new();
    RENDERS.get_or_init(|| {
        kustomizations()
            .into_iter()
            .filter(|(_, kind)| kind != "Component")
            .map(|(dir, _)| render(&dir))
            .collect()
    })
}

fn rendered(name: &str) -> &'static Rendered {
    renders()
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no kustomization {name}"))
}

fn is_custom(doc: &Value) -> bool {
    let api = doc["apiVersion"].as_str().unwrap_or_default();
    CUSTOM_GROUPS
        .iter()
        .any(|g| api.starts_with(&format!("{g}/")))
}

/// Runs kubernetes-validate (strict: unknown fields are errors) on `docs` for each supported
/// Kubernetes version; returns what it reported, empty when everything passed.
fn schema_problems(docs: &[&Value], dir: &Path) -> Vec<String> {
    let file = dir.join("manifests.yaml");
    let text: Vec<String> = docs
        .iter()
        .map(|d| serde_json::to_string(d).expect("serializes"))
        .collect();
    std::fs::write(&file, text.join("\n---\n")).expect("writes the manifests");
    let mut problems = Vec::new();
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(tool("kubernetes-validate"))
            .args(["--strict", "--quiet", "-k", version])
            .arg(&file)
            .output()
            .expect("kubernetes-validate runs");
        // --quiet prints only failures and warnings; "no schema for this kind" is a warning,
        // and a built-in kind without a schema is a mistake too.
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() || !report.trim().is_empty() {
            problems.push(format!("Kubernetes {version}:\n{}", report.trim()));
        }
    }
    problems
}

#[test]
fn every_kustomization_renders_and_passes_the_kubernetes_schemas() {
    let tmp = tempfile::tempdir().expect("temp dir");
    assert!(
        renders().iter().any(|r| r.name == "overlays/dev") && renders().len() >= 2,
        "expected the base and the dev overlay at least"
    );
    for r in renders() {
        let builtin: Vec<&Value> = r.docs.iter().filter(|d| !is_custom(d)).collect();
        let problems = schema_problems(&builtin, tmp.path());
        assert!(
            problems.is_empty(),
            "{} does not pass the Kubernetes schemas:\n{}",
            r.name,
            problems.join("\n")
        );
    }
}

#[test]
fn the_schema_check_catches_a_misspelled_field() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut agent = rendered("base").statefulset("pool-agent").clone();
    agent["spec"]["template"]["spec"]["terminationGracePeriod"] = json!(150);
    let problems = schema_problems(&[&agent], tmp.path());
    assert_eq!(problems.len(), KUBERNETES_VERSIONS.len(), "{problems:?}");
    assert!(
        problems[0].contains("terminationGracePeriod"),
        "{problems:?}"
    );
}

#[test]
fn every_component_is_used_by_an_overlay() {
    let all = kustomizations();
    let mut used = BTreeSet::new();
    for (dir, _) in &all {
        let text = std::fs::read_to_string(dir.join("kustomization.yaml")).expect("readable");
        let k: Value = serde_yaml_ng::from_str(&text).expect("YAML");
        for c in k["components"].as_array().into_iter().flatten() {
            let path = dir.join(c.as_str().expect("a path"));
            used.insert(path.canonicalize().expect("the component exists"));
        }
    }
    for (dir, kind) in &all {
        if kind == "Component" {
            assert!(
                used.contains(&dir.canonicalize().expect("exists")),
                "{} is in no overlay, so nothing renders or validates it",
                dir.display()
            );
        }
    }
}

#[test]
fn production_runs_a_three_node_rabbitmq_cluster_with_quorum_queues() {
    let prod = rendered("overlays/production");
    let cluster = prod
        .find("RabbitmqCluster", "rabbitmq")
        .expect("a RabbitmqCluster named rabbitmq");
    assert_eq!(cluster["spec"]["replicas"], 3, "{}", describe(cluster));
    let conf = text_at(cluster, &["spec", "rabbitmq", "additionalConfig"]).expect("its config");
    let dev =
        rendered("overlays/dev").generated("ConfigMap", "rabbitmq-config")["data"]["10-rota.conf"]
            .as_str()
            .expect("10-rota.conf");
    let timeout = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("consumer_timeout"))
            .map(str::to_owned)
    };
    assert_eq!(
        timeout(conf.trim_start()),
        timeout(dev),
        "the same consumer_timeout as the dev RabbitMQ"
    );
    assert!(
        conf.contains("deprecated_features.permit.global_qos = false"),
        "{conf}"
    );
    assert!(
        prod.find("StatefulSet", "rabbitmq").is_none(),
        "not the dev RabbitMQ too"
    );
    for name in ["scheduler", "pool-agent"] {
        let container = &prod.statefulset(name)["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            env(container, "ROTA_QUEUE_TYPE")["value"],
            "quorum",
            "{name}"
        );
    }
}

/// The value of `doc` at a path of keys, e.g. `["spec", "scaleTargetRef", "name"]`, as a
/// non-empty string.
fn text_at<'a>(doc: &'a Value, path: &[&str]) -> Result<&'a str, String> {
    let mut v = doc;
    for key in path {
        v = &v[*key];
    }
    v.as_str()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| format!("{} has no {}", describe(doc), path.join(".")))
}

fn describe(doc: &Value) -> String {
    format!(
        "{} {}",
        doc["kind"].as_str().unwrap_or("?"),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// What KEDA itself would refuse, or what would leave a ScaledObject inert: the fields its
/// CRDs require and the references between the resources.
fn keda_problems(r: &Rendered) -> Vec<String> {
    let mut problems = Vec::new();
    let mut check = |result: Result<(), String>| {
        if let Err(e) = result {
            problems.push(e);
        }
    };
    for doc in r.docs.iter().filter(|d| is_custom(d)) {
        check(match doc["kind"].as_str() {
            Some("ScaledObject") => scaled_object_problems(r, doc),
            Some("TriggerAuthentication") => trigger_authentication_problems(r, doc),
            Some("RabbitmqCluster") => rabbitmq_cluster_problems(doc),
            _ => Err(format!(
                "{} ({}) has no shape check: add one to tests/tests/kubernetes.rs",
                describe(doc),
                doc["apiVersion"]
            )),
        });
    }
    problems
}

/// What the RabbitMQ Cluster Operator needs of a `RabbitmqCluster`, and a size that keeps a
/// majority of a quorum queue's replicas through the loss of a node.
fn rabbitmq_cluster_problems(cluster: &Value) -> Result<(), String> {
    let me = describe(cluster);
    if cluster["apiVersion"] != "rabbitmq.com/v1beta1" {
        return Err(format!("{me} is not rabbitmq.com/v1beta1"));
    }
    match cluster["spec"]["replicas"].as_u64() {
        Some(n) if n >= 3 && n % 2 == 1 => Ok(()),
        other => Err(format!(
            "{me} has {other:?} replicas: 3, 5 or 7 keep a quorum through a node's loss"
        )),
    }
}

fn scaled_object_problems(r: &Rendered, so: &Value) -> Result<(), String> {
    let me = describe(so);
    text_at(so, &["metadata", "name"])?;
    let target = text_at(so, &["spec", "scaleTargetRef", "name"])?;
    let kind = so["spec"]["scaleTargetRef"]["kind"]
        .as_str()
        .unwrap_or("Deployment");
    r.find(kind, target)
        .ok_or_else(|| format!("{me} scales {kind} {target}, which is not there"))?;
    let min = so["spec"]["minReplicaCount"].as_u64().unwrap_or(0);
    let max = so["spec"]["maxReplicaCount"].as_u64().unwrap_or(100);
    if min > max {
        return Err(format!(
            "{me}: minReplicaCount {min} > maxReplicaCount {max}"
        ));
    }
    let triggers = so["spec"]["triggers"]
        .as_array()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("{me} has no triggers"))?;
    for t in triggers {
        let kind = text_at(t, &["type"])?;
        if kind != "rabbitmq" {
            return Err(format!("{me}: no shape check for trigger type {kind}"));
        }
        text_at(t, &["metadata", "queueName"])?;
        let mode = text_at(t, &["metadata", "mode"])?;
        if !["QueueLength", "MessageRate"].contains(&mode) {
            return Err(format!(
                "{me}: mode {mode} is neither QueueLength nor MessageRate"
            ));
        }
        let value = text_at(t, &["metadata", "value"])?;
        if !value.parse::<f64>().is_ok_and(|v| v > 0.0) {
            return Err(format!(
                "{me}: value {value:?} is not a positive number (in quotes)"
            ));
        }
        let protocol = t["metadata"]["protocol"].as_str().unwrap_or("auto");
        if !["amqp", "http", "auto"].contains(&protocol) {
            return Err(format!(
                "{me}: protocol {protocol} is not amqp, http or auto"
            ));
        }
        let auth = text_at(t, &["authenticationRef", "name"])?;
        let ta = r
            .find("TriggerAuthentication", auth)
            .ok_or_else(|| format!("{me} uses TriggerAuthentication {auth}, which is not there"))?;
        let has_host = ta["spec"]["secretTargetRef"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["parameter"] == "host");
        if !has_host {
            return Err(format!(
                "{} gives the rabbitmq trigger no host",
                describe(ta)
            ));
        }
    }
    Ok(())
}

fn trigger_authentication_problems(r: &Rendered, ta: &Value) -> Result<(), String> {
    let me = describe(ta);
    let refs = ta["spec"]["secretTargetRef"]
        .as_array()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| format!("{me} has no secretTargetRef"))?;
    for s in refs {
        text_at(s, &["parameter"])?;
        let secret = text_at(s, &["name"])?;
        let key = text_at(s, &["key"])?;
        // The base leaves the Secret to the operator; where a render has it, it has the key.
        if let Some(found) = r.find("Secret", secret) {
            let has = !found["stringData"][key].is_null() || !found["data"][key].is_null();
            if !has {
                return Err(format!(
                    "{me} reads key {key} of Secret {secret}, which lacks it"
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn keda_resources_have_what_keda_requires() {
    let mut checked = 0;
    for r in renders() {
        let problems = keda_problems(r);
        assert!(problems.is_empty(), "{}:\n{}", r.name, problems.join("\n"));
        checked += r.of_kind("ScaledObject").count();
    }
    assert!(
        checked > 0,
        "no ScaledObject was checked: is the keda component in an overlay?"
    );
    // And the checks bite: a ScaledObject that lost its target and its trigger's value.
    let dev = rendered("overlays/dev");
    let mut broken = dev.of_kind("ScaledObject").next().expect("one").clone();
    broken["spec"]["scaleTargetRef"]["name"] = json!("nobody");
    assert!(scaled_object_problems(dev, &broken).is_err());
    let mut broken = dev.of_kind("ScaledObject").next().expect("one").clone();
    broken["spec"]["triggers"][0]["metadata"]["value"] = json!(4);
    assert!(scaled_object_problems(dev, &broken).is_err());
}

/// A TOML file that a ConfigMap of `r` carries under `key`.
fn config_file(r: &Rendered, key: &str) -> (String, toml::Table) {
    let cm = r.generated("ConfigMap", "rota-config");
    let text = cm["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("{}: the ConfigMap has no {key}", r.name))
        .to_owned();
    let table = text
        .parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("{}: {key} is not TOML: {e}", r.name));
    (text, table)
}

fn duration_setting(table: &toml::Table, key: &str, default: &str) -> Duration {
    let text = table
        .get(key)
        .map(|v| v.as_str().expect("a duration in quotes").to_owned())
        .unwrap_or_else(|| default.to_owned());
    parse_duration(&text).expect("a valid duration")
}

/// A container's environment variable: its value, or its `valueFrom`.
fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .and_then(|vars| vars.iter().find(|v| v["name"] == name))
        .unwrap_or_else(|| panic!("container {} has no {name}", container["name"]))
}

#[test]
fn the_settings_agree_with_each_other() {
    let dev = rendered("overlays/dev");
    let (_, agent_cfg) = config_file(dev, "pool-agent.toml");

    // SIGTERM: the kubelet waits longer than the agent lets its jobs finish and ends them.
    let agent = dev.statefulset("pool-agent");
    let pod = &agent["spec"]["template"]["spec"];
    let termination = Duration::from_secs(
        pod["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("terminationGracePeriodSeconds is set"),
    );
    let grace = duration_setting(&agent_cfg, "shutdown-grace", "30s")
        + duration_setting(&agent_cfg, "kill-grace", "5s");
    assert!(
        termination > grace,
        "terminationGracePeriodSeconds ({termination:?}) must exceed shutdown-grace + kill-grace ({grace:?})"
    );
    let container = &pod["containers"][0];
    assert_eq!(
        env(container, "ROTA_AGENT_ID")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name",
        "each agent's id is its pod's name"
    );

    // KEDA watches the jobs queue the agents serve.
    let ns = agent_cfg["namespace"].as_str().expect("namespace");
    let queue = agent_cfg["queue"][0].as_str().expect("a queue");
    let so = dev.of_kind("ScaledObject").next().expect("a ScaledObject");
    assert_eq!(
        so["spec"]["triggers"][0]["metadata"]["queueName"],
        format!("{ns}.jobs.{queue}")
    );

    // The dev RabbitMQ's consumer_timeout is the one-host set-up's, and longer than any job.
    let conf_value = |text: &str| -> u64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix("consumer_timeout"))
            .and_then(|rest| rest.trim().trim_start_matches('=').trim().parse().ok())
            .expect("a consumer_timeout line")
    };
    let host_conf = std::fs::read_to_string(repo().join("deploy/rabbitmq/rabbitmq.conf"))
        .expect("deploy/rabbitmq/rabbitmq.conf");
    let dev_conf = dev.generated("ConfigMap", "rabbitmq-config")["data"]["10-rota.conf"]
        .as_str()
        .expect("10-rota.conf")
        .to_owned();
    let consumer_timeout = conf_value(&dev_conf);
    assert_eq!(consumer_timeout, conf_value(&host_conf));
    let max_job = duration_setting(&agent_cfg, "max-job-timeout", "6h");
    assert!(max_job < Duration::from_millis(consumer_timeout));

    // Probes, metrics and the HTTP address meet on one port; the config file is mounted.
    for (name, config) in [
        ("scheduler", "scheduler.toml"),
        ("pool-agent", "pool-agent.toml"),
    ] {
        let template = &dev.statefulset(name)["spec"]["template"];
        let c = &template["spec"]["containers"][0];
        let addr = env(c, "ROTA_HTTP_ADDR")["value"].as_str().expect("a value");
        let port: u64 = addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("HOST:PORT");
        let http = c["ports"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == "http"))
            .expect("a port named http");
        assert_eq!(http["containerPort"], port, "{name}");
        let annotations = &template["metadata"]["annotations"];
        assert_eq!(
            annotations["prometheus.io/port"],
            port.to_string(),
            "{name}"
        );
        assert_eq!(annotations["prometheus.io/path"], "/metrics", "{name}");
        for (probe, path) in [
            ("startupProbe", "/healthz"),
            ("livenessProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
        ] {
            assert_eq!(c[probe]["httpGet"]["path"], path, "{name} {probe}");
            assert_eq!(c[probe]["httpGet"]["port"], "http", "{name} {probe}");
        }
        let path = env(c, "ROTA_CONFIG")["value"].as_str().expect("a value");
        assert_eq!(path, format!("/etc/rota/{config}"), "{name}");
        config_file(dev, config);
    }
}

#[test]
fn every_pod_meets_the_restricted_pod_security_standard() {
    let mut pods = 0;
    for r in renders() {
        for workload in r.docs.iter().filter(|d| {
            ["StatefulSet", "Deployment", "DaemonSet", "Job"]
                .contains(&d["kind"].as_str().unwrap_or(""))
        }) {
            let me = format!("{}: {}", r.name, describe(workload));
            let pod = &workload["spec"]["template"]["spec"];
            let sc = &pod["securityContext"];
            assert_eq!(sc["runAsNonRoot"], true, "{me}");
            assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{me}");
            assert_ne!(sc["runAsUser"], 0, "{me}");
            assert!(
                pod["hostNetwork"].is_null() && pod["hostPID"].is_null(),
                "{me}"
            );
            let volumes = pod["volumes"].as_array().cloned().unwrap_or_default();
            assert!(
                volumes.iter().all(|v| v["hostPath"].is_null()),
                "{me}: no hostPath volumes (a Docker socket would give the node away)"
            );
            for c in pod["containers"].as_array().expect("containers") {
                let csc = &c["securityContext"];
                assert_eq!(csc["allowPrivilegeEscalation"], false, "{me}");
                assert_eq!(csc["capabilities"]["drop"], json!(["ALL"]), "{me}");
                assert!(csc["capabilities"]["add"].is_null(), "{me}");
                assert!(
                    csc["privileged"].is_null() || csc["privileged"] == false,
                    "{me}"
                );
                // Rota's own containers also run on a read-only root with a scratch /tmp.
                if c["image"].as_str().is_some_and(|i| i.starts_with("rota/")) {
                    assert_eq!(csc["readOnlyRootFilesystem"], true, "{me}");
                    let tmp = c["volumeMounts"]
                        .as_array()
                        .and_then(|m| m.iter().find(|m| m["mountPath"] == "/tmp"))
                        .unwrap_or_else(|| panic!("{me}: no /tmp mount"));
                    let volume = volumes
                        .iter()
                        .find(|v| v["name"] == tmp["name"])
                        .expect("the /tmp volume");
                    assert!(volume["emptyDir"].is_object(), "{me}: /tmp is an emptyDir");
                }
            }
            pods += 1;
        }
    }
    assert!(pods >= 3, "checked only {pods} pod templates");
}

/// The config files of the base's ConfigMap, as the pods get them, run the real binaries:
/// every key is a flag they know, every value one they accept, a job goes through, and the
/// paths the pods' probes and Prometheus' annotations name answer. (The harness's flags and
/// environment override the namespace and the data folder; the HTTP address is a free port.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configmap_settings_run_a_job_and_answer_the_probes() {
    let base = rendered("base");
    let sys = System::new().await;
    let mut paths = Vec::new();
    for key in ["scheduler.toml", "pool-agent.toml"] {
        let (text, _) = config_file(base, key);
        let path = sys.dir.path().join(key);
        std::fs::write(&path, text).expect("writes the config");
        paths.push(path.display().to_string());
    }
    let [sched_addr, agent_addr] = free_addrs();
    let _scheduler = sys.scheduler_with(&["--config", &paths[0], "--http-addr", &sched_addr]);
    let _agent = sys.agent(
        "pool-agent-0",
        &["--config", &paths[1], "--http-addr", &agent_addr],
    );
    sys.ready(true, &["pool-agent-0"]).await;

    for (name, addr) in [("scheduler", &sched_addr), ("pool-agent", &agent_addr)] {
        let template = &base.statefulset(name)["spec"]["template"];
        let container = &template["spec"]["containers"][0];
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            let path = container[probe]["httpGet"]["path"]
                .as_str()
                .expect("a path");
            probe_until(addr, path, 200).await;
        }
        let metrics = template["metadata"]["annotations"]["prometheus.io/path"]
            .as_str()
            .expect("a metrics path");
        let body = probe_until(addr, metrics, 200).await;
        assert!(body.contains("rota_"), "{name}'s {metrics}: {body}");
    }

    let mut events = sys.finished_events().await;
    let record = sys
        .client
        .submit(Job::new("demo.echo", json!({"from": "the ConfigMap"})))
        .await
        .expect("submitted");
    let finished = within(Duration::from_secs(60), "the job's end", async {
        event_of(&mut events, record.uuid).await
    })
    .await;
    assert_eq!(finished.status, Some(Status::Succeeded));
    let done = sys.client.status(record.uuid).await.expect("status");
    assert_eq!(done.attempts[0].output, json!({"from": "the ConfigMap"}));
    // worker-location = "process" in the file: the job ran in a worker process.
    let worker = done.attempts[0].worker.as_deref().unwrap_or_default();
    assert!(worker.starts_with("process"), "ran on {worker}");
}
