//! Chromium for Work, for real: each way Chromium can live (a local process, a container of
//! its own, the endpoint of a Chromium already running, beside the runtime in a `docker`
//! worker's container) renders a page that writes its text with JavaScript only after a
//! delay; the PDF's text (pdftotext) proves that Rota waited for the page. Also: pages that
//! never get ready or do not answer, a Chromium killed between jobs, a screenshot's size, and
//! that nothing (process, profile folder, container) is left behind.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rota_tests::{Proc, System, alive, bin, containers, within};
use serde_json::{Value, json};

/// The text the report page writes 700 ms after it has loaded.
const LATE_TEXT: &str = "Revenue grew by 42 percent";

/// Serves the test pages on every address of this host (Chromium in a container reaches them
/// through its Docker network's gateway) for as long as the test binary runs; returns the
/// port. `/report` calls `rotaReady({"rows": 3})` once its text is there; `/plain` only sets
/// `window.reportDone`; `/never` never gets ready; `/leaky` loads an image from the cloud
/// metadata address; `/redirect?to=URL` sends the browser to URL.
fn serve_pages() -> u16 {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("0.0.0.0:0").expect("a free port");
    let port = listener.local_addr().expect("an address").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(&stream);
                let mut head = String::new();
                let _ = reader.read_line(&mut head);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let (status, body) = match path.as_str() {
                    "/report" => ("200 OK", page(LATE_TEXT, "window.rotaReady({rows: 3});")),
                    "/plain" => ("200 OK", page(LATE_TEXT, "window.reportDone = true;")),
                    "/never" => ("200 OK", page("never ready", "")),
                    "/leaky" => (
                        "200 OK",
                        page(
                            LATE_TEXT,
                            "document.body.append(Object.assign(new Image(), {src: 'http://169.254.169.254/latest/meta-data/'})); \
                             setTimeout(() => window.rotaReady(), 300);",
                        ),
                    ),
                    p if p.starts_with("/redirect?to=") => {
                        let to = &p["/redirect?to=".len()..];
                        let _ = write!(
                            &stream,
                            "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        );
                        return;
                    }
                    _ => ("404 Not Found", "no such page".to_owned()),
                };
                let _ = write!(
                    &stream,
                    "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    port
}

/// A page whose content is written by JavaScript 700 ms after loading, then runs `then`.
fn page(text: &str, then: &str) -> String {
    format!(
        r#"<!doctype html><html><head><title>Test report</title></head><body><h1>Report</h1>
<p id="out">loading</p><script>
setTimeout(() => {{ document.getElementById("out").textContent = "{text}"; {then} }}, 700);
</script></body></html>"#
    )
}

fn port() -> u16 {
    static PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *PORT.get_or_init(serve_pages)
}

/// The pages' URL from this host's loopback.
fn pages() -> String {
    format!("http://127.0.0.1:{}", port())
}

/// The pages' URL from the Docker network `network` (made if missing): its gateway, this
/// host's address there.
fn pages_from_network(network: &str) -> (String, String) {
    let inspect = || {
        std::process::Command::new("docker")
            .args(["network", "inspect", network, "--format"])
            .arg("{{range .IPAM.Config}}{{.Gateway}}{{end}}")
            .output()
            .expect("docker runs")
    };
    let mut out = inspect();
    if !out.status.success() {
        // Another test may make it at the same time; either way it is there after.
        let _ = std::process::Command::new("docker")
            .args(["network", "create", network])
            .output();
        out = inspect();
    }
    let gateway = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        !gateway.is_empty(),
        "the Docker network {network} has a gateway"
    );
    (format!("http://{gateway}:{}", port()), gateway)
}

/// Submits a job of `work_type` and waits for its record.
async fn submit(sys: &System, work_type: &str, payload: Value) -> Value {
    let payload = payload.to_string();
    sys.submit_wait(&["--type", work_type, "--payload", &payload])
        .await
        .1
}

/// Renders `/report` to `out/<name>.pdf`, waiting for `rotaReady`; asserts it succeeded and
/// that the PDF holds the text written after the delay. Returns the job's output.
async fn report_pdf(sys: &System, name: &str) -> Value {
    report_pdf_from(sys, &pages(), name).await
}

/// [`report_pdf`] of the pages at `base`.
async fn report_pdf_from(sys: &System, base: &str, name: &str) -> Value {
    let record = submit(
        sys,
        "chromium.pdf",
        json!({"url": format!("{base}/report"), "output": format!("out/{name}.pdf"),
               "wait_for_ready": true}),
    )
    .await;
    assert_eq!(record["state"], "succeeded", "{record:#}");
    let output = record["attempts"][0]["output"].clone();
    assert_eq!(output["ready"], json!({"rows": 3}), "rotaReady's value");
    assert_eq!(output["title"], "Test report");
    let file = PathBuf::from(output["file"].as_str().expect("a file"));
    assert_eq!(
        output["bytes"].as_u64(),
        std::fs::metadata(&file).ok().map(|m| m.len())
    );
    let text = pdf_text(&file);
    assert!(text.contains(LATE_TEXT), "the PDF says: {text}");
    output
}

fn pdf_text(file: &Path) -> String {
    let out = std::process::Command::new("pdftotext")
        .arg(file)
        .arg("-")
        .output()
        .expect("pdftotext runs (apt-get install poppler-utils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A folder for the `out` alias that any user may write (docker workers are not root).
fn out_folder(sys: &System) -> (PathBuf, String) {
    use std::os::unix::fs::PermissionsExt;
    let dir = sys.dir.path().join("out");
    std::fs::create_dir_all(&dir).expect("folder");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let alias = format!("out={}", dir.display());
    (dir, alias)
}

/// The folder for the agent's Chromium profiles, so the test can see them.
fn profiles(sys: &System) -> String {
    sys.dir.path().join("profiles").display().to_string()
}

/// The main processes (not helpers) of the Chromiums whose profiles are under `root`.
fn browsers_under(root: &str) -> Vec<u32> {
    processes_with(&format!("--user-data-dir={root}"))
        .into_iter()
        .filter(|(_, cmdline)| !cmdline.contains("--type="))
        .map(|(pid, _)| pid)
        .collect()
}

/// Live processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            (cmdline.contains(needle) && alive(pid)).then_some((pid, cmdline))
        })
        .collect()
}

/// Stops `agent` with SIGTERM (it ends its workers and their browsers on the way out).
async fn stop(agent: &mut Proc) {
    let status = agent.terminate().await.expect("the agent stops");
    assert!(status.success(), "{}", agent.output());
}

/// Waits (at most 15 s) until no Chromium of `root` runs (helpers included: they die
/// asynchronously) and its profile folders are gone; says what is left if they never are.
async fn nothing_left_under(root: &str) {
    let left = || {
        let running = processes_with(&format!("--user-data-dir={root}"));
        let folders: Vec<_> = std::fs::read_dir(root)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        (running, folders)
    };
    let polled = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let (running, folders) = left();
            if running.is_empty() && folders.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if polled.is_err() {
        let (running, folders) = left();
        panic!(
            "left behind 15 s after the agent stopped: Chromium processes {running:?}, profile folders {folders:?}"
        );
    }
}

/// The folders of the process-singleton sockets of the browsers whose profiles are under
/// `root`: Chromium makes each under the temporary folder and links it from the profile.
fn singleton_folders(root: &str) -> Vec<PathBuf> {
    let Ok(profiles) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    profiles
        .flatten()
        .filter_map(|p| std::fs::read_link(p.path().join("SingletonSocket")).ok())
        .filter_map(|socket| socket.parent().map(Path::to_path_buf))
        .collect()
}

/// The width and height of a PNG, from its header.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let be =
        |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    (be(16), be(20))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_chromium_renders_once_the_page_is_ready_and_leaves_nothing_behind() {
    let sys = System::new().await;
    let (out, alias) = out_folder(&sys);
    let root = profiles(&sys);
    let _scheduler = sys.scheduler();
    let mut agent = sys.agent(
        "local-chromium",
        &[
            "--worker-location",
            "process",
            "--pool-max-size",
            "1",
            "--alias",
            &alias,
            "--chromium-mode",
            "local",
            "--chromium-profile-root",
            &root,
            "--chromium-allow-host",
            "127.0.0.1",
            "--chromium-ready",
            "done=window.reportDone === true",
        ],
    );
    report_pdf(&sys, "signal").await;

    // The same, with a condition of the pool's instead of the signal.
    let record = submit(
        &sys,
        "chromium.pdf",
        json!({"url": format!("{}/plain", pages()), "output": "out/expression.pdf",
               "ready": "done", "paper": "Letter", "landscape": true}),
    )
    .await;
    assert_eq!(record["state"], "succeeded", "{record:#}");
    assert!(pdf_text(&out.join("expression.pdf")).contains(LATE_TEXT));

    let record = submit(
        &sys,
        "chromium.screenshot",
        json!({"url": format!("{}/report", pages()), "output": "out/shot.png",
               "wait_for_ready": true, "width": 640, "height": 360}),
    )
    .await;
    assert_eq!(record["state"], "succeeded", "{record:#}");
    let png = std::fs::read(out.join("shot.png")).expect("the PNG was written");
    assert_eq!(png_size(&png), (640, 360));

    assert_eq!(
        browsers_under(&root).len(),
        1,
        "one browser served the worker's three jobs"
    );
    let singletons = singleton_folders(&root);
    assert_eq!(singletons.len(), 1, "the browser's singleton folder");
    stop(&mut agent).await;
    nothing_left_under(&root).await;
    // Chromium removes it only when it exits by itself; the worker kills it.
    let left: Vec<_> = singletons.iter().filter(|f| f.exists()).collect();
    assert!(left.is_empty(), "left in the temporary folder: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_that_never_gets_ready_or_does_not_answer_fails_and_the_browser_serves_the_next_job()
{
    let sys = System::new().await;
    let (_, alias) = out_folder(&sys);
    let root = profiles(&sys);
    let _scheduler = sys.scheduler();
    let mut agent = sys.agent(
        "failing-pages",
        &[
            "--worker-location",
            "thread",
            "--pool-max-size",
            "1",
            "--alias",
            &alias,
            "--chromium-profile-root",
            &root,
            "--chromium-allow-host",
            "127.0.0.1",
        ],
    );
    report_pdf(&sys, "first").await;
    let browser = browsers_under(&root);
    assert_eq!(browser.len(), 1);
    // A thread worker's Work runs in the agent, but its browser does not get the agent's
    // environment.
    let environ = std::fs::read(format!("/proc/{}/environ", browser[0])).expect("readable");
    let environ = String::from_utf8_lossy(&environ);
    assert!(environ.contains("PATH="), "{environ}");
    assert!(!environ.contains("ROTA_AMQP_URL"), "{environ}");

    let record = submit(
        &sys,
        "chromium.pdf",
        json!({"url": format!("{}/never", pages()), "output": "out/never.pdf",
               "wait_for_ready": true, "timeout_s": 5}),
    )
    .await;
    assert_eq!(record["state"], "failed");
    let error = record["attempts"][0]["error"]["message"]
        .as_str()
        .expect("an error");
    assert!(
        error.contains("did not call window.rotaReady()") && error.contains("timeout_s = 5"),
        "{error}"
    );

    // A port that nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let url = format!("http://127.0.0.1:{closed}/report");
    let record = submit(
        &sys,
        "chromium.pdf",
        json!({"url": url, "output": "out/refused.pdf"}),
    )
    .await;
    assert_eq!(record["state"], "failed");
    let error = record["attempts"][0]["error"]["message"]
        .as_str()
        .expect("an error");
    assert!(
        error.contains(&format!("cannot load {url}")) && error.contains("ERR_CONNECTION_REFUSED"),
        "{error}"
    );

    report_pdf(&sys, "after").await;
    assert_eq!(
        browsers_under(&root),
        browser,
        "the same browser served every job"
    );
    stop(&mut agent).await;
    nothing_left_under(&root).await;
}

/// The error of a `chromium.pdf` job of `payload` that must fail.
async fn refused(sys: &System, payload: Value) -> String {
    let record = submit(sys, "chromium.pdf", payload).await;
    assert_eq!(record["state"], "failed", "{record:#}");
    record["attempts"][0]["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pools_policy_refuses_local_files_metadata_the_broker_and_redirects_out_of_it() {
    let sys = System::new().await;
    let (out, alias) = out_folder(&sys);
    let root = profiles(&sys);
    let _scheduler = sys.scheduler();
    let mut agent = sys.agent(
        "policy",
        &[
            "--worker-location",
            "process",
            "--pool-max-size",
            "1",
            "--alias",
            &alias,
            "--chromium-profile-root",
            &root,
            "--chromium-allow-host",
            "127.0.0.1",
        ],
    );
    let pdf = |url: String| json!({"url": url, "output": "out/refused.pdf"});
    for (url, why) in [
        ("file:///etc/passwd", "file: URLs are never loaded"),
        ("data:text/html,<h1>hi</h1>", "data: URLs are never loaded"),
        (
            "http://169.254.169.254/latest/meta-data/",
            "169.254.169.254 is link-local",
        ),
        ("http://[fd00:ec2::254]/", "a cloud metadata service"),
        (
            "http://metadata.google.internal/",
            "a cloud metadata service",
        ),
        (
            "http://127.0.0.1:15672/api/whoami",
            "port 15672 is one of the broker's",
        ),
        ("http://localhost:5672/", "port 5672 is one of the broker's"),
        (
            "https://example.com/",
            "not among the hosts of --chromium-allow-host",
        ),
    ] {
        let error = refused(&sys, pdf(url.into())).await;
        assert!(
            error.contains(&format!("refused to load {url}")) && error.contains(why),
            "{url}: {error}"
        );
    }
    // A page of an allowed host that sends the browser elsewhere: the same server, under a
    // name the pool does not list.
    let elsewhere = format!("http://localhost:{}/report", port());
    let url = format!("{}/redirect?to={elsewhere}", pages());
    let error = refused(&sys, pdf(url)).await;
    assert!(
        error.contains(&format!("it led to {elsewhere}"))
            && error.contains("localhost is loopback"),
        "{error}"
    );
    let error = refused(
        &sys,
        pdf(format!("{}/redirect?to=http://169.254.169.254/", pages())),
    )
    .await;
    assert!(error.contains("link-local"), "{error}");
    assert!(!out.join("refused.pdf").exists());

    // JavaScript from a payload, as version 1 producers sent it: refused, never run.
    let error = refused(
        &sys,
        json!({"url": format!("{}/plain", pages()), "output": "out/v1.pdf",
               "ready_expression": "window.reportDone === true"}),
    )
    .await;
    assert!(
        error.contains("ready_expression is no longer accepted"),
        "{error}"
    );

    // A resource the page asks for out of the policy is left out; the page still renders.
    let record = submit(
        &sys,
        "chromium.pdf",
        json!({"url": format!("{}/leaky", pages()), "output": "out/leaky.pdf", "wait_for_ready": true}),
    )
    .await;
    assert_eq!(record["state"], "succeeded", "{record:#}");
    let uuid = record["uuid"].as_str().expect("a uuid");
    let logs = String::from_utf8_lossy(&sys.cli(&["logs", uuid]).await.stdout).into_owned();
    assert!(
        logs.contains(
            "refused: http://169.254.169.254/latest/meta-data/: 169.254.169.254 is link-local"
        ),
        "{logs}"
    );
    report_pdf(&sys, "allowed").await;
    stop(&mut agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chromium_killed_between_jobs_is_replaced_for_the_next_job() {
    let sys = System::new().await;
    let (_, alias) = out_folder(&sys);
    let root = profiles(&sys);
    let _scheduler = sys.scheduler();
    let mut agent = sys.agent(
        "killed-chromium",
        &[
            "--worker-location",
            "local",
            "--pool-max-size",
            "1",
            "--alias",
            &alias,
            "--chromium-profile-root",
            &root,
            "--chromium-allow-host",
            "127.0.0.1",
        ],
    );
    report_pdf(&sys, "before").await;
    let first = browsers_under(&root);
    assert_eq!(first.len(), 1);
    // Once SIGKILL is sent, that browser never answers again.
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &first[0].to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());

    report_pdf(&sys, "after").await;
    let second = browsers_under(&root);
    assert_eq!(second.len(), 1, "one browser again: {second:?}");
    assert_ne!(second, first, "a new browser");
    stop(&mut agent).await;
    nothing_left_under(&root).await;
}

/// The Chromium image, built once per test binary (reused while its inputs are unchanged).
async fn chromium_image(worker: bool) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/images/chromium/build.sh");
    let mut cmd = tokio::process::Command::new(script);
    if worker {
        cmd.arg("--worker").arg(bin("worker-runtime"));
    }
    let out = cmd.output().await.expect("the image build script runs");
    assert!(
        out.status.success(),
        "cannot build the Chromium image (is a Docker engine running? deploy/setup.sh starts one): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// One build at a time: both images share the base image.
static IMAGES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The Chromium containers that the process `owner` started.
fn chromium_containers_of(owner: u32) -> Vec<String> {
    let out = std::process::Command::new("docker")
        .args(["ps", "-a", "--format", "{{.Names}}", "--filter"])
        .arg(format!("label=rota.owner-pid={owner}"))
        .args(["--filter", "label=rota.role=chromium"])
        .output()
        .expect("docker runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_in_a_container_of_its_own_renders_and_is_removed_with_its_worker() {
    let image = {
        let _one = IMAGES.lock().await;
        chromium_image(false).await
    };
    let sys = System::new().await;
    let (_, alias) = out_folder(&sys);
    let (base, gateway) = pages_from_network("rota-chromium");
    let _scheduler = sys.scheduler();
    // The debugging set-up: scheduler, pool and Work in one process each, Chromium in Docker,
    // on its own Docker network (not the host's), where this host is the gateway.
    let mut agent = sys.agent(
        "docker-chromium",
        &[
            "--worker-location",
            "local",
            "--pool-max-size",
            "1",
            "--alias",
            &alias,
            "--chromium-mode",
            "docker",
            "--chromium-image",
            &image,
            "--chromium-allow-host",
            &gateway,
        ],
    );
    report_pdf_from(&sys, &base, "first").await;
    report_pdf_from(&sys, &base, "second").await;
    let pid = agent.pid();
    assert_eq!(
        chromium_containers_of(pid).len(),
        1,
        "one container served both jobs"
    );
    stop(&mut agent).await;
    assert_eq!(chromium_containers_of(pid), Vec::<String>::new(), "removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_already_running_is_used_through_its_url_and_left_running() {
    let sys = System::new().await;
    let (_, alias) = out_folder(&sys);
    let profile = sys.dir.path().join("own-chromium");
    let mut chromium = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        // Its singleton socket's folder in the test's folder, which goes with it: killed,
        // Chromium leaves that folder behind.
        .env("TMPDIR", sys.dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("chromium starts (deploy/setup.sh installs it)");
    // Chromium says where its DevTools listen on stderr, and goes on writing there: keep
    // reading it, or a closed pipe ends it.
    let (tx, endpoint) = tokio::sync::oneshot::channel();
    let stderr = chromium.stderr.take().expect("stderr");
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let mut tx = Some(tx);
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(ws) = line.split("DevTools listening on ").nth(1) {
                // ws://127.0.0.1:PORT/devtools/browser/… → http://127.0.0.1:PORT
                let host = ws.trim().trim_start_matches("ws://");
                let port = host.split('/').next().unwrap_or_default();
                if let Some(tx) = tx.take() {
                    let _ = tx.send(format!("http://{port}"));
                }
            }
        }
    });
    let endpoint = within(
        Duration::from_secs(30),
        "Chromium's DevTools endpoint",
        endpoint,
    )
    .await
    .expect("Chromium said where it listens");
    let _scheduler = sys.scheduler();
    let mut agent = sys.agent(
        "url-chromium",
        &[
            "--worker-location",
            "process",
            "--alias",
            &alias,
            "--chromium-mode",
            "url",
            "--chromium-url",
            &endpoint,
            "--chromium-allow-host",
            "127.0.0.1",
        ],
    );
    report_pdf(&sys, "remote").await;
    report_pdf(&sys, "remote-again").await;
    let open = page_targets(&endpoint);
    assert!(
        !open.iter().any(|url| url.starts_with(&pages())),
        "the jobs' pages were closed: {open:?}"
    );
    stop(&mut agent).await;
    let pid = chromium.id().expect("a pid");
    assert!(
        alive(pid),
        "the agent leaves a Chromium it did not start alone"
    );
    let _ = chromium.kill().await;
}

/// The URLs of the pages open in the Chromium at `endpoint` (`http://host:port`), from its
/// /json/list.
fn page_targets(endpoint: &str) -> Vec<String> {
    use std::io::{Read, Write};
    let host = endpoint.trim_start_matches("http://");
    let get = || -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect(host)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(stream, "GET /json/list HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    };
    // DevTools' HTTP server now and then drops a connection while the browser is busy: ask
    // again for a while, as a probe would.
    let mut last = None;
    let mut response = None;
    for _ in 0..50 {
        match get() {
            Ok(r) => {
                response = Some(r);
                break;
            }
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let response =
        response.unwrap_or_else(|| panic!("DevTools does not answer /json/list: {last:?}"));
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("[]");
    let targets: Vec<Value> = serde_json::from_str(body).expect("a JSON list");
    targets
        .iter()
        .filter(|t| t["type"] == "page")
        .map(|t| t["url"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_beside_the_runtime_in_a_docker_workers_container() {
    let image = {
        let _one = IMAGES.lock().await;
        chromium_image(true).await
    };
    let sys = System::new().await;
    let (_, alias) = out_folder(&sys);
    // The worker's container (and Chromium in it) reaches the test's pages through a Docker
    // network, not the host's: DevTools stays on the container's loopback.
    let (base, gateway) = pages_from_network("rota-test-pages");
    let _scheduler = sys.scheduler();
    let mut agent = sys.agent(
        "worker-with-chromium",
        &[
            "--worker-location",
            "docker",
            "--docker-image",
            &image,
            "--docker-network",
            "rota-test-pages",
            "--chromium-allow-host",
            &gateway,
            // Chromium needs more than the defaults.
            "--docker-memory-mib",
            "1024",
            "--docker-pids-limit",
            "1024",
            "--docker-tmp-mib",
            "256",
            "--pool-max-size",
            "1",
            "--alias",
            &alias,
            "--chromium-mode",
            "local",
        ],
    );
    let output = report_pdf_from(&sys, &base, "in-worker").await;
    assert!(
        output["file"]
            .as_str()
            .expect("a path")
            .ends_with("in-worker.pdf")
    );
    stop(&mut agent).await;
    assert_eq!(containers(sys.names.namespace()), Vec::new(), "removed");
}
