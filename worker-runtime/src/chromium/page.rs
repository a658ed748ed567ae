//! One page of a job: loading it, waiting until it says it is ready, and printing it as a PDF
//! or a PNG. Every page has `window.rotaReady(value)`, defined before the page's own scripts
//! run; a page calls it when its content is complete.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chromiumoxide::cdp::browser_protocol::emulation::SetDeviceMetricsOverrideParams;
use chromiumoxide::cdp::browser_protocol::fetch::{
    self, ContinueRequestParams, EventRequestPaused, FailRequestParams, RequestPattern,
};
use chromiumoxide::cdp::browser_protocol::network::{ErrorReason, ResourceType};
use chromiumoxide::cdp::browser_protocol::page::{
    AddScriptToEvaluateOnNewDocumentParams, CaptureScreenshotFormat, PrintToPdfParams,
};
use chromiumoxide::cdp::js_protocol::runtime::EvaluateParams;
use chromiumoxide::error::CdpError;
use chromiumoxide::page::ScreenshotParams;
use futures::StreamExt;
use serde_json::Value;

use super::ANSWER_TIMEOUT;
use super::policy::Policy;

/// Defines `window.rotaReady` in every document before its scripts run. The promise it
/// resolves is what [`Page::wait_ready`] awaits.
const READY_SCRIPT: &str = r#"(() => {
  if (window.__rotaReady) return;
  let resolve;
  const ready = new Promise((r) => { resolve = r; });
  Object.defineProperty(window, "__rotaReady", { value: ready });
  window.rotaReady = (value) => resolve(value === undefined ? null : value);
})();"#;

/// How long one wait for the page may last in one DevTools command; longer waits are made of
/// several (chromiumoxide drops a command after 30 s).
const WAIT_SLICE: Duration = Duration::from_secs(20);

/// When a page counts as ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ready {
    /// Once it has loaded (its `load` event).
    Load,
    /// Once it calls `window.rotaReady(value)`.
    Signal,
    /// Once this JavaScript expression is truthy (checked every 50 ms).
    Expression(String),
}

/// Why a page did not get ready.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    /// The deadline passed; the text says what was awaited.
    #[error("{0} in time")]
    InTime(String),
    /// Waiting itself failed (a syntax error in the expression, the page went away, …).
    #[error(transparent)]
    Failed(anyhow::Error),
}

/// A page of a job; closed when the job ends.
pub struct Page {
    inner: chromiumoxide::Page,
    policy: Arc<Policy>,
    /// The requests the policy refused so far.
    refused: Refused,
}

/// The requests a page's policy refused: the URL, why, and whether it was the page's own
/// document (its main frame's navigation, a redirect of it included).
type Refused = Arc<Mutex<Vec<(String, String, bool)>>>;

impl Page {
    pub(super) async fn blank(
        browser: &chromiumoxide::Browser,
        policy: Arc<Policy>,
    ) -> anyhow::Result<Page> {
        let inner = tokio::time::timeout(ANSWER_TIMEOUT * 2, browser.new_page("about:blank"))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "Chromium did not open a page within {:?}",
                    ANSWER_TIMEOUT * 2
                )
            })?
            .context("Chromium cannot open a page")?;
        inner
            .execute(AddScriptToEvaluateOnNewDocumentParams::new(READY_SCRIPT))
            .await
            .context("cannot install window.rotaReady in the page")?;
        let refused = Refused::default();
        intercept(&inner, policy.clone(), refused.clone())
            .await
            .context("cannot intercept the page's requests (Fetch.enable)")?;
        Ok(Page {
            inner,
            policy,
            refused,
        })
    }

    /// The chromiumoxide page, for Work that drives Chromium further (clicks, forms, …).
    pub fn cdp(&self) -> &chromiumoxide::Page {
        &self.inner
    }

    /// Loads `url` and waits for its `load` event (at most `limit`). A URL that cannot be
    /// reached, or answers with an HTTP error, is an error that says so.
    ///
    /// The URL, its redirects and the page's resources are checked against the pool's
    /// policy (see [`super::policy`]): a refused URL, or a redirect of the page to one, is an
    /// error that says why; a refused resource is left out (see [`Page::refused`]).
    pub async fn goto(&self, url: &str, limit: Duration) -> anyhow::Result<()> {
        if let Some(why) = self.policy.refusal(url) {
            bail!("refused to load {url}: {why}");
        }
        let loaded = tokio::time::timeout(limit, self.inner.goto(url)).await;
        if let Some((to, why, _)) = self.refused_documents().into_iter().next() {
            bail!("refused to load {url}: it led to {to}, and {why}");
        }
        match loaded {
            Err(_) => bail!(
                "{url} did not finish loading within {} s",
                limit.as_secs_f64()
            ),
            Ok(Err(CdpError::ChromeMessage(reason))) => bail!(
                "cannot load {url}: {reason} (is it up, and reachable from where Chromium runs?)"
            ),
            Ok(Err(e)) => bail!("cannot load {url}: {e}"),
            Ok(Ok(_)) => {}
        }
        // The main document's HTTP status (0 for non-HTTP URLs such as data: and file:).
        let status = self
            .evaluate("performance.getEntriesByType('navigation')[0]?.responseStatus ?? 0")
            .await
            .ok()
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        if status >= 400 {
            bail!("{url} answered with HTTP status {status}");
        }
        Ok(())
    }

    /// The resources of the page the policy refused so far, as `URL: why`.
    pub fn refused(&self) -> Vec<String> {
        self.refused
            .lock()
            .map(|r| {
                r.iter()
                    .map(|(url, why, _)| format!("{url}: {why}"))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn refused_documents(&self) -> Vec<(String, String, bool)> {
        self.refused
            .lock()
            .map(|r| {
                r.iter()
                    .filter(|(_, _, document)| *document)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until the page is ready (see [`Ready`]), at most until `deadline`. Returns the
    /// value the page passed to `rotaReady` (or the expression's value when not just `true`).
    pub async fn wait_ready(&self, ready: &Ready, deadline: Instant) -> Result<Value, NotReady> {
        let (promise, what) = match ready {
            Ready::Load => return Ok(Value::Null),
            Ready::Signal => (
                "window.__rotaReady".to_owned(),
                "the page did not call window.rotaReady()".to_owned(),
            ),
            Ready::Expression(expr) => (
                // One poller per page, however many times it is awaited.
                format!(
                    r#"window.__rotaReadyExpression ??= new Promise((resolve) => {{
  const check = () => {{
    let value;
    try {{ value = ({expr}); }} catch (e) {{ value = undefined; }}
    if (value) resolve(value === true ? null : value); else setTimeout(check, 50);
  }};
  check();
}})"#
                ),
                format!("the ready expression {expr:?} did not become true"),
            ),
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(NotReady::InTime(what));
            }
            match tokio::time::timeout(left.min(WAIT_SLICE), self.evaluate(&promise)).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) => {
                    return Err(NotReady::Failed(e.context(match ready {
                        Ready::Expression(_) => "the ready expression cannot be evaluated",
                        _ => "cannot wait for window.rotaReady()",
                    })));
                }
                Err(_) => {}
            }
        }
    }

    /// Evaluates a JavaScript expression in the page, awaiting it if it is a promise.
    pub async fn evaluate(&self, expression: &str) -> anyhow::Result<Value> {
        let params = EvaluateParams::builder()
            .expression(expression)
            .await_promise(true)
            .return_by_value(true)
            .build()
            .map_err(anyhow::Error::msg)?;
        match self.inner.evaluate_expression(params).await {
            Ok(result) => Ok(result.value().cloned().unwrap_or(Value::Null)),
            Err(CdpError::JavascriptException(details)) => {
                let message = details
                    .exception
                    .as_ref()
                    .and_then(|e| e.description.clone())
                    .unwrap_or_else(|| details.text.clone());
                bail!("JavaScript error: {message}")
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The page's title (empty if it has none).
    pub async fn title(&self) -> anyhow::Result<String> {
        Ok(self.inner.get_title().await?.unwrap_or_default())
    }

    /// The page printed as a PDF.
    pub async fn pdf(&self, options: &PdfOptions) -> anyhow::Result<Vec<u8>> {
        let (width, height) = options.paper;
        let params = PrintToPdfParams {
            landscape: Some(options.landscape),
            print_background: Some(options.print_background),
            paper_width: Some(width),
            paper_height: Some(height),
            margin_top: Some(options.margins[0]),
            margin_right: Some(options.margins[1]),
            margin_bottom: Some(options.margins[2]),
            margin_left: Some(options.margins[3]),
            ..PrintToPdfParams::default()
        };
        self.inner
            .pdf(params)
            .await
            .context("Chromium cannot print the page")
    }

    /// The page as a PNG of `width` × `height` CSS pixels (or the whole page's height).
    pub async fn screenshot(&self, options: &ScreenshotOptions) -> anyhow::Result<Vec<u8>> {
        self.inner
            .execute(SetDeviceMetricsOverrideParams::new(
                i64::from(options.width),
                i64::from(options.height),
                1.0,
                false,
            ))
            .await
            .context("cannot set the viewport size")?;
        let params = ScreenshotParams::builder()
            .format(CaptureScreenshotFormat::Png)
            .full_page(options.full_page)
            .build();
        self.inner
            .screenshot(params)
            .await
            .context("Chromium cannot take the screenshot")
    }
}

/// Pauses every request of `page` (the DevTools `Fetch` domain) and lets it go on only if
/// `policy` allows its URL; a refused one fails as blocked and is noted in `refused`. Redirects
/// are paused too, each hop with its own URL. Requests the page's `Fetch` domain does not see
/// are not checked: WebSockets, and those of the page's workers and of out-of-process frames
/// (which `FLAGS` keep in the page's process).
async fn intercept(
    page: &chromiumoxide::Page,
    policy: Arc<Policy>,
    refused: Refused,
) -> anyhow::Result<()> {
    let mut paused = page.event_listener::<EventRequestPaused>().await?;
    let pattern = RequestPattern::builder().url_pattern("*").build();
    page.execute(fetch::EnableParams::builder().pattern(pattern).build())
        .await?;
    let main_frame = page.mainframe().await?;
    let page = page.clone();
    tokio::spawn(async move {
        while let Some(event) = paused.next().await {
            let id = event.request_id.clone();
            let page = page.clone();
            match policy.refusal(&event.request.url) {
                None => {
                    tokio::spawn(async move { page.execute(ContinueRequestParams::new(id)).await });
                }
                Some(why) => {
                    let document = event.resource_type == ResourceType::Document
                        && main_frame.as_ref() == Some(&event.frame_id);
                    if let Ok(mut r) = refused.lock() {
                        r.push((event.request.url.clone(), why, document));
                    }
                    let fail = FailRequestParams::new(id, ErrorReason::BlockedByClient);
                    tokio::spawn(async move { page.execute(fail).await });
                }
            }
        }
    });
    Ok(())
}

/// How to print a page (sizes in inches).
#[derive(Debug, Clone, PartialEq)]
pub struct PdfOptions {
    /// Paper width and height, portrait.
    pub paper: (f64, f64),
    pub landscape: bool,
    /// Top, right, bottom, left.
    pub margins: [f64; 4],
    pub print_background: bool,
}

/// How to photograph a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScreenshotOptions {
    pub width: u32,
    pub height: u32,
    /// The whole page, however long, rather than the viewport.
    pub full_page: bool,
}
