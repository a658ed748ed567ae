//! `amqps://`: a RabbitMQ 4 node of this test's own (from the `rota-rabbitmq4` image, see
//! `deploy/rabbitmq/rabbitmq4.sh`) that listens only over TLS, with a certificate of a CA made
//! at test time with `openssl`. The whole pipeline runs over it, each part as its role's
//! user; a client given another CA is refused with an error that says what to do. The node
//! also takes client certificates of its CA as logins (EXTERNAL, the user is the certificate's
//! common name): an agent logs in with one and no password, and a certificate of another CA is
//! refused.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rota_common::names::QueueType;
use rota_common::roles::UserRole;
use rota_tests::{System, test_user, within};

/// A TLS-only RabbitMQ node in a container, removed when dropped.
struct TlsBroker {
    container: String,
    dir: tempfile::TempDir,
    port: u16,
}

/// Runs `openssl ARGS` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (deploy/setup.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes CA `name` (name.pem, name.key) in `dir`.
fn make_ca(dir: &Path, name: &str) {
    let (pem, key, subject) = (
        format!("{name}.pem"),
        format!("{name}.key"),
        format!("/CN=rota test {name}"),
    );
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", &key, "-out",
            &pem, "-subj", &subject,
        ],
    );
}

/// Makes a key (`name.key`) and a certificate (`name.pem`) for `subject`, signed by CA `ca`,
/// with the extensions of `ext` (a file in `dir`).
fn sign(dir: &Path, name: &str, subject: &str, ca: &str, ext: &str) {
    let (pem, key, csr) = (
        format!("{name}.pem"),
        format!("{name}.key"),
        format!("{name}.csr"),
    );
    openssl(
        dir,
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", subject,
        ],
    );
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext,
            "-out",
            &pem,
        ],
    );
}

/// Whether nothing listens on `port` (on every address, as a node on the host's network).
fn free(port: u16) -> bool {
    std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
}

/// A port `p` with `p` and `p + 10000` free (the management API's, by the harness's rule),
/// and not given to another node of this process (which may not listen yet), and two more
/// free ports.
fn ports() -> (u16, u16, u16) {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().expect("not poisoned");
    let any = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    };
    let start = 20000 + (std::process::id() % 9000) as u16;
    let port = (start..29999)
        .chain(20000..start)
        .find(|p| !given.contains(p) && free(*p) && free(p + 10000))
        .expect("a free pair of ports");
    given.push(port);
    (port, any(), any())
}

impl TlsBroker {
    async fn start() -> TlsBroker {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        make_ca(d, "ca");
        make_ca(d, "other-ca");
        std::fs::write(
            d.join("san.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .expect("writes");
        sign(d, "server", "/CN=localhost", "ca", "san.ext");
        // Client certificates must be X.509 v3 (rustls refuses v1 ones): with an extension.
        std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("writes");
        let agent = format!("/CN={}", test_user(UserRole::Agent));
        sign(d, "agent", &agent, "ca", "client.ext");
        sign(d, "stranger", &agent, "other-ca", "client.ext");
        let (port, epmd, dist) = ports();
        let conf = format!(
            "listeners.tcp = none\n\
             listeners.ssl.default = {port}\n\
             ssl_options.cacertfile = /etc/rota-tls/ca.pem\n\
             ssl_options.certfile = /etc/rota-tls/server.pem\n\
             ssl_options.keyfile = /etc/rota-tls/server.key\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = false\n\
             auth_mechanisms.1 = PLAIN\n\
             auth_mechanisms.2 = EXTERNAL\n\
             ssl_cert_login_from = common_name\n\
             management.tcp.port = {}\n",
            port + 10000
        );
        std::fs::write(d.join("20-tls.conf"), conf).expect("writes");
        // The image's plugins (the management API), and certificates as logins.
        std::fs::write(
            d.join("enabled_plugins"),
            "[rabbitmq_management,rabbitmq_auth_mechanism_ssl].\n",
        )
        .expect("writes");
        // The node runs as the image's rabbitmq user: it must read the files.
        for entry in std::fs::read_dir(d).expect("lists").flatten() {
            let _ = Command::new("chmod").arg("0644").arg(entry.path()).status();
        }
        let _ = Command::new("chmod").arg("0755").arg(d).status();
        let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let container = format!("rota-test-tls-{id}");
        let out = Command::new("docker")
            .args(["run", "-d", "--name", &container, "--network", "host"])
            .args(["--label", "rota.test=tls"])
            .arg("-e")
            .arg(format!("RABBITMQ_NODENAME=tls-{id}@localhost"))
            .arg("-e")
            .arg(format!("ERL_EPMD_PORT={epmd}"))
            .arg("-e")
            .arg(format!("RABBITMQ_DIST_PORT={dist}"))
            .arg("-v")
            .arg(format!("{}:/etc/rota-tls:ro", d.display()))
            .arg("-v")
            .arg(format!(
                "{}:/etc/rabbitmq/conf.d/20-tls.conf:ro",
                d.join("20-tls.conf").display()
            ))
            .arg("-v")
            .arg(format!(
                "{}:/etc/rabbitmq/enabled_plugins:ro",
                d.join("enabled_plugins").display()
            ))
            .arg("rota-rabbitmq4:latest")
            .output()
            .expect("docker runs");
        assert!(
            out.status.success(),
            "cannot start a RabbitMQ 4 node (deploy/setup.sh rabbitmq4 builds its image): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let broker = TlsBroker {
            container,
            dir,
            port,
        };
        broker.await_startup().await;
        broker
    }

    /// Waits until the node runs, its management API included (`rabbitmqctl await_startup`
    /// fails at once while the node is not up yet, then waits for its boot).
    async fn await_startup(&self) {
        within(Duration::from_secs(180), "the TLS node's start", async {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let started = tokio::process::Command::new("docker")
                    .args([
                        "exec",
                        &self.container,
                        "rabbitmqctl",
                        "-q",
                        "await_startup",
                    ])
                    .output()
                    .await
                    .is_ok_and(|o| o.status.success());
                if started && !free(self.port + 10000) {
                    return;
                }
            }
        })
        .await;
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// The node's URL as `guest` (an administrator there; from 127.0.0.1 only), trusting `ca`.
    fn url(&self, ca: &str) -> String {
        let ca = rota_common::amqp::percent_encode(&self.file(ca));
        format!(
            "amqps://guest:guest@localhost:{}/%2f?cacertfile={ca}",
            self.port
        )
    }

    /// The node's URL logging in with a client certificate (EXTERNAL) as the tests' agent
    /// user, the certificate's common name: no password.
    fn external_url(&self) -> String {
        format!(
            "amqps://{}@localhost:{}/%2f?auth_mechanism=external",
            test_user(UserRole::Agent),
            self.port
        )
    }

    /// Runs `scheduler list` at `url` with client certificate `cert` (cert.pem, cert.key),
    /// expecting it to fail: its error.
    async fn list_with_certificate(&self, sys: &System, cert: &str, url: &str) -> String {
        let out = tokio::process::Command::new(rota_tests::bin("scheduler"))
            .args(["list", "--amqp-url", url, "--amqp-ca-file"])
            .arg(self.file("ca.pem"))
            .arg("--amqp-cert-file")
            .arg(self.file(&format!("{cert}.pem")))
            .arg("--amqp-key-file")
            .arg(self.file(&format!("{cert}.key")))
            .env("ROTA_NAMESPACE", sys.names.namespace())
            .output()
            .await
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{err}");
        err
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.container])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_over_amqps_and_a_wrong_ca_is_refused() {
    let broker = TlsBroker::start().await;
    let sys = System::on(&broker.url("ca.pem"), QueueType::Auto).await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("tls1", &[]);
    sys.ready(true, &["tls1"]).await;
    let (code, record) = sys
        .submit_wait(&["--type", "demo.echo", "--payload", r#"{"over":"tls"}"#])
        .await;
    assert_eq!(code, Some(0), "{record}");
    assert_eq!(record["state"], "succeeded", "{record}");

    // Another CA, given with --amqp-ca-file: the broker's certificate is not trusted.
    let url = format!("amqps://guest:guest@localhost:{}/%2f", broker.port);
    let out = tokio::process::Command::new(rota_tests::bin("scheduler"))
        .args(["list", "--amqp-url", &url, "--amqp-ca-file"])
        .arg(broker.file("other-ca.pem"))
        .env("ROTA_NAMESPACE", sys.names.namespace())
        .output()
        .await
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("TLS certificate is not accepted") && err.contains("--amqp-ca-file"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_logs_in_with_its_certificate_and_one_of_another_ca_is_refused() {
    let broker = TlsBroker::start().await;
    let sys = System::on(&broker.url("ca.pem"), QueueType::Auto).await;
    let _scheduler = sys.scheduler();
    // The agent's certificate and key instead of a password.
    sys.owns_agent("ext1");
    let data = sys.data_dir().display().to_string();
    let log = std::fs::File::create(sys.dir.path().join("pool-agent-ext1.log")).expect("log");
    let _agent = tokio::process::Command::new(rota_tests::bin("pool-agent"))
        .args(["run", "--id", "ext1", "--data-dir", &data])
        .args(["--heartbeat-interval", "200ms"])
        .args(["--amqp-url", &broker.external_url()])
        .arg("--amqp-ca-file")
        .arg(broker.file("ca.pem"))
        .arg("--amqp-cert-file")
        .arg(broker.file("agent.pem"))
        .arg("--amqp-key-file")
        .arg(broker.file("agent.key"))
        .envs(sys.part_env(UserRole::Agent))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("starts");
    sys.ready(true, &["ext1"]).await;
    let (code, record) = sys
        .submit_wait(&[
            "--type",
            "demo.echo",
            "--payload",
            r#"{"login":"external"}"#,
        ])
        .await;
    assert_eq!(code, Some(0), "{record}");
    assert_eq!(record["state"], "succeeded", "{record}");
    let out = Command::new("docker")
        .args([
            "exec",
            &broker.container,
            "rabbitmqctl",
            "-q",
            "list_connections",
        ])
        .args(["user", "auth_mechanism"])
        .output()
        .expect("docker runs");
    let connections = String::from_utf8_lossy(&out.stdout);
    let agent = format!("{}\tEXTERNAL", test_user(UserRole::Agent));
    assert!(
        connections.lines().any(|l| l.trim() == agent),
        "no EXTERNAL login of the agent user: {connections}"
    );

    // A certificate of the same name from another CA.
    let err = broker
        .list_with_certificate(&sys, "stranger", &broker.external_url())
        .await;
    assert!(
        err.contains("refused the TLS handshake")
            && err.contains("UnknownCA")
            && err.contains("client certificate (--amqp-cert-file) must be signed by a CA"),
        "{err}"
    );
    // A URL that does not name the certificate's user, which Rota must know (the user_id).
    let url = format!(
        "amqps://localhost:{}/%2f?auth_mechanism=external",
        broker.port
    );
    let err = broker.list_with_certificate(&sys, "agent", &url).await;
    assert!(err.contains("names no user"), "{err}");
}
