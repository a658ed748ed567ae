//! Headless Chromium for Work, over the DevTools protocol (chromiumoxide). Each worker owns a
//! [`Chromium`]: its browser, started on first use wherever the settings say it lives
//! ([`Mode`]: a local process, a container of its own, or an endpoint already running),
//! reused for the worker's later jobs, and started again when it has died or stopped
//! answering. A Work asks its context for a [`Browser`] and opens [`Page`]s in it; the pages a
//! job opened are closed when it ends, and the browser's cookies cleared (not those of a
//! browser given by URL, which others may share). Pages live in the browser's default
//! context: a fresh context per job would cost a new renderer process, about 250 ms a page
//! here.
//!
//! Pages get `window.rotaReady(value)`: a page calls it when its content is complete
//! (see [`Ready`]). What pages may load is the pool's [`policy`], checked on every request. The built-in works `chromium.pdf` and `chromium.screenshot` are in
//! [`works`].

mod docker;
mod local;
mod page;
pub mod policy;
mod settings;
pub mod works;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chromiumoxide::cdp::browser_protocol::target::CloseTargetParams;
use chromiumoxide::error::CdpError;
use chromiumoxide::handler::HandlerConfig;
use futures::StreamExt;
use tokio::task::JoinHandle;

use docker::DockerChromium;
pub use docker::host_address;
use local::LocalChromium;
pub use page::{NotReady, Page, PdfOptions, Ready, ScreenshotOptions};
use policy::Policy;
pub use settings::{ChromiumArgs, Mode};

/// How long a browser may take to answer a health check or a housekeeping command before it
/// is taken for hung.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// A worker's browser slot: empty until a Work first asks for a browser.
pub struct Chromium {
    settings: ChromiumArgs,
    /// What its pages may load, or why the settings give no policy.
    policy: Result<Arc<Policy>, String>,
    running: tokio::sync::Mutex<Option<Arc<Running>>>,
    /// The pages opened by the job in hand, closed when it ends.
    job_pages: JobPages,
}

/// The pages a job opened, with the browser each is in.
type JobPages = Arc<std::sync::Mutex<Vec<(Arc<Running>, chromiumoxide::Page)>>>;

impl std::fmt::Debug for Chromium {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chromium")
            .field("mode", &self.settings.chromium_mode)
            .finish()
    }
}

/// A browser that is connected, and what to end when it is no longer wanted.
struct Running {
    browser: chromiumoxide::Browser,
    /// Drives the DevTools connection; it ends when the connection does.
    handler: JoinHandle<()>,
    host: tokio::sync::Mutex<Host>,
}

/// Where a running browser lives.
enum Host {
    Local(LocalChromium),
    Docker(DockerChromium),
    /// Someone else's: never closed by us (closing a connected browser would end it).
    Endpoint,
}

impl Chromium {
    pub fn new(settings: ChromiumArgs) -> Self {
        Self {
            policy: Policy::new(&settings)
                .map(Arc::new)
                .map_err(|e| format!("{e:#}")),
            settings,
            running: tokio::sync::Mutex::new(None),
            job_pages: JobPages::default(),
        }
    }

    pub fn settings(&self) -> &ChromiumArgs {
        &self.settings
    }

    /// A browser for the job in hand: the worker's running one if it still answers, else a
    /// new one. Pages opened through it are closed when the job ends ([`Chromium::end_job`]).
    pub async fn browser(&self) -> anyhow::Result<Browser> {
        let policy = self.policy.clone().map_err(anyhow::Error::msg)?;
        let running = {
            let mut slot = self.running.lock().await;
            let alive = match slot.as_ref() {
                Some(r) => r.answers().await,
                None => false,
            };
            if !alive {
                if let Some(dead) = slot.take() {
                    tracing::warn!(
                        mode = self.settings.chromium_mode.as_str(),
                        "the worker's Chromium stopped answering; starting a new one"
                    );
                    dead.stop().await;
                }
                *slot = Some(Arc::new(self.start().await?));
            }
            slot.clone().context("a browser was just started")?
        };
        Ok(Browser {
            running,
            pages: self.job_pages.clone(),
            policy,
        })
    }

    /// Closes the pages of the job that just ended and clears the cookies it left. Called by
    /// [`crate::run`] whatever the outcome.
    pub async fn end_job(&self) {
        let pages = self
            .job_pages
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default();
        let Some(running) = pages.first().map(|(r, _)| r.clone()) else {
            return;
        };
        for (running, page) in &pages {
            let close = CloseTargetParams::new(page.target_id().clone());
            let closed = tokio::time::timeout(ANSWER_TIMEOUT, running.browser.execute(close)).await;
            if !matches!(closed, Ok(Ok(_))) {
                // The next job's health check decides whether the browser must be replaced.
                tracing::warn!("could not close a job's page in Chromium");
            }
        }
        if !matches!(&*running.host.lock().await, Host::Endpoint) {
            let _ = tokio::time::timeout(ANSWER_TIMEOUT, running.browser.clear_cookies()).await;
        }
    }

    /// Ends the browser (the worker is replaced or stops): the local process and its profile
    /// folder, or the container, are removed; an endpoint given by URL is only disconnected.
    pub async fn shutdown(&self) {
        self.end_job().await;
        if let Some(running) = self.running.lock().await.take() {
            running.stop().await;
        }
    }

    async fn start(&self) -> anyhow::Result<Running> {
        let s = &self.settings;
        let (host, url) = match s.chromium_mode {
            Mode::Local => {
                let (local, url) = LocalChromium::start(s).await?;
                (Host::Local(local), url)
            }
            Mode::Docker => {
                let (container, url) = DockerChromium::start(s).await?;
                (Host::Docker(container), url)
            }
            Mode::Url => {
                s.check()?;
                (Host::Endpoint, s.chromium_url.clone().unwrap_or_default())
            }
        };
        let config = HandlerConfig {
            // Pages keep Chromium's own window size unless a Work sets one.
            viewport: None,
            ..HandlerConfig::default()
        };
        let connected = tokio::time::timeout(
            s.chromium_start_timeout,
            chromiumoxide::Browser::connect_with_config(url.clone(), config),
        )
        .await
        .map_err(|_| anyhow::anyhow!("timed out"))
        .and_then(|r| r.map_err(anyhow::Error::from));
        let (browser, mut handler) = match connected {
            Ok(pair) => pair,
            Err(e) => {
                let running_host = tokio::sync::Mutex::new(host);
                stop_host(&running_host).await;
                anyhow::bail!(
                    "cannot connect to Chromium's DevTools endpoint {url}: {e:#}{}",
                    if s.chromium_mode == Mode::Url {
                        "; is Chromium running there with --remote-debugging-port, and is --chromium-url (ROTA_CHROMIUM_URL) right?"
                    } else {
                        ""
                    }
                );
            }
        };
        let handler = tokio::spawn(async move {
            while let Some(event) = handler.next().await {
                match event {
                    Ok(()) => {}
                    Err(CdpError::Ws(e)) => {
                        tracing::debug!(error = %e, "the DevTools connection ended");
                        break;
                    }
                    Err(e) => tracing::debug!(error = %e, "DevTools"),
                }
            }
        });
        tracing::info!(
            mode = s.chromium_mode.as_str(),
            endpoint = %url,
            "Chromium started"
        );
        Ok(Running {
            browser,
            handler,
            host: tokio::sync::Mutex::new(host),
        })
    }
}

impl Running {
    /// Whether the browser is there and answers a command in time.
    async fn answers(&self) -> bool {
        if self.handler.is_finished() {
            return false;
        }
        if let Host::Local(local) = &mut *self.host.lock().await
            && local.exited()
        {
            return false;
        }
        matches!(
            tokio::time::timeout(ANSWER_TIMEOUT, self.browser.version()).await,
            Ok(Ok(_))
        )
    }

    async fn stop(&self) {
        if let Host::Local(_) = &*self.host.lock().await {
            // Ask first: Chromium then ends its helper processes itself.
            let _ = tokio::time::timeout(
                ANSWER_TIMEOUT,
                self.browser
                    .execute(chromiumoxide::cdp::browser_protocol::browser::CloseParams::default()),
            )
            .await;
        }
        self.handler.abort();
        stop_host(&self.host).await;
    }
}

async fn stop_host(host: &tokio::sync::Mutex<Host>) {
    match &mut *host.lock().await {
        Host::Local(local) => local.stop().await,
        Host::Docker(container) => container.remove().await,
        Host::Endpoint => {}
    }
}

/// The browser as one job sees it: pages opened here belong to the job and are closed when
/// it ends.
pub struct Browser {
    running: Arc<Running>,
    pages: JobPages,
    policy: Arc<Policy>,
}

impl Browser {
    /// Opens `url` in a new page and waits until it has loaded (at most `limit`), if the
    /// pool's policy allows it (see [`Page::goto`]). The page has `window.rotaReady`; wait
    /// for it with [`Page::wait_ready`].
    pub async fn open(&self, url: &str, limit: Duration) -> anyhow::Result<Page> {
        let page = self.new_page().await?;
        page.goto(url, limit).await?;
        Ok(page)
    }

    /// A new, empty page (`about:blank`) with `window.rotaReady`, whose requests the pool's
    /// policy checks.
    pub async fn new_page(&self) -> anyhow::Result<Page> {
        let page = Page::blank(&self.running.browser, self.policy.clone()).await?;
        if let Ok(mut pages) = self.pages.lock() {
            pages.push((self.running.clone(), page.cdp().clone()));
        }
        Ok(page)
    }
}
