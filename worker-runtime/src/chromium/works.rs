//! The built-in Chromium works: `chromium.pdf` renders a page to a PDF, `chromium.screenshot`
//! to a PNG, each once the page is ready, into a file named through a path alias. Which URLs
//! they may load and which ready conditions they may name is the pool's configuration (see
//! [`super::policy`] and `--chromium-ready`); a payload never carries JavaScript. Their
//! output: the file's alias path and real path, its size, the page's title, and the value
//! the page passed to `rotaReady`.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ChromiumArgs, NotReady, PdfOptions, Ready, ScreenshotOptions};
use crate::{Access, Context, Registry, Work};

pub fn register(r: &mut Registry) {
    r.register("chromium.pdf", Pdf)
        .register("chromium.screenshot", Screenshot);
}

/// What both works share: which page, when it is ready, where the file goes.
#[derive(Debug, Deserialize)]
struct Target {
    /// The page to render.
    url: String,
    /// Where the file goes, through an alias: `demodata/report.pdf`.
    output: String,
    /// Wait until the page calls `window.rotaReady(value)`.
    #[serde(default)]
    wait_for_ready: bool,
    /// Wait until the pool's ready condition of this name holds (`--chromium-ready`).
    ready: Option<String>,
    /// Version 1 payloads carried JavaScript here; refused, never run.
    ready_expression: Option<Value>,
    /// How long loading the page and waiting for it to be ready may take.
    #[serde(default = "default_timeout_s")]
    timeout_s: f64,
}

fn default_timeout_s() -> f64 {
    30.0
}

impl Target {
    /// When the page counts as ready: the signal, a condition of the pool's, or its load.
    fn ready(&self, settings: &ChromiumArgs) -> anyhow::Result<Ready> {
        if self.ready_expression.is_some() {
            bail!(
                "ready_expression is no longer accepted: a payload never carries JavaScript. \
                 Define the condition in the pool's configuration (--chromium-ready \
                 NAME=EXPRESSION) and name it in the payload: \"ready\": \"NAME\""
            );
        }
        Ok(match (&self.ready, self.wait_for_ready) {
            (Some(_), true) => bail!("give either wait_for_ready or ready, not both"),
            (Some(name), false) => Ready::Expression(settings.ready_expression(name)?.to_owned()),
            (None, true) => Ready::Signal,
            (None, false) => Ready::Load,
        })
    }

    /// Opens the page, waits until it is ready, renders it as `render` says, and writes the
    /// bytes to the output file.
    async fn render(&self, ctx: &Context, render: Render) -> anyhow::Result<Value> {
        let chromium = ctx.chromium().context(
            "this worker has no Chromium (it runs Work without a browser); run chromium.* on a pool that has one",
        )?;
        let ready = self.ready(chromium.settings())?;
        let file = ctx.resolve(&self.output)?;
        if !(self.timeout_s > 0.0 && self.timeout_s.is_finite()) {
            bail!("timeout_s must be a positive number of seconds");
        }
        let limit = Duration::from_secs_f64(self.timeout_s);
        let deadline = Instant::now() + limit;
        let browser = ctx.browser().await?;
        ctx.info(format!("opening {}", self.url));
        let page = browser.open(&self.url, limit).await?;
        ctx.progress(Some(0.3), Some("loaded"));
        let value = match page.wait_ready(&ready, deadline).await {
            Ok(value) => value,
            Err(NotReady::InTime(what)) => bail!(
                "{what} within timeout_s = {} s: the page never got ready",
                self.timeout_s
            ),
            Err(NotReady::Failed(e)) => return Err(e),
        };
        ctx.progress(Some(0.6), Some("ready"));
        for refused in page.refused() {
            ctx.warn(format!("a resource of the page was refused: {refused}"));
        }
        let title = page.title().await?;
        let bytes = match &render {
            Render::Pdf(options) => page.pdf(options).await?,
            Render::Png(options) => page.screenshot(options).await?,
        };
        let mut out = ctx.create_file(&self.output, Access::Create)?;
        std::io::Write::write_all(&mut out, &bytes)
            .with_context(|| format!("cannot write {}", file.display()))?;
        ctx.info(format!("wrote {} bytes to {}", bytes.len(), self.output));
        Ok(json!({
            "path": self.output,
            "file": file,
            "bytes": bytes.len(),
            "title": title,
            "ready": value,
        }))
    }
}

/// What to make of a ready page.
enum Render {
    Pdf(PdfOptions),
    Png(ScreenshotOptions),
}

/// `chromium.pdf`: the page as a PDF.
struct Pdf;

#[derive(Debug, Deserialize)]
struct PdfPayload {
    #[serde(flatten)]
    target: Target,
    /// A4, A3, A5, Letter, Legal, Tabloid, or `{"width": "8in", "height": "10in"}`.
    #[serde(default)]
    paper: Paper,
    #[serde(default)]
    landscape: bool,
    /// One length for every side (`"1cm"`) or `{"top": …, "right": …, "bottom": …, "left": …}`.
    #[serde(default)]
    margin: Margin,
    #[serde(default = "yes")]
    print_background: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Paper {
    Named(String),
    Custom { width: String, height: String },
}

impl Default for Paper {
    fn default() -> Self {
        Paper::Named("A4".into())
    }
}

impl Paper {
    /// Width and height in inches, portrait.
    fn inches(&self) -> anyhow::Result<(f64, f64)> {
        Ok(match self {
            Paper::Named(name) => match name.to_ascii_lowercase().as_str() {
                "a3" => (11.69, 16.54),
                "a4" => (8.27, 11.69),
                "a5" => (5.83, 8.27),
                "letter" => (8.5, 11.0),
                "legal" => (8.5, 14.0),
                "tabloid" => (11.0, 17.0),
                _ => bail!(
                    "unknown paper {name:?}: use A3, A4, A5, Letter, Legal, Tabloid, or {{\"width\": \"8in\", \"height\": \"10in\"}}"
                ),
            },
            Paper::Custom { width, height } => (inches(width)?, inches(height)?),
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Margin {
    All(String),
    Sides {
        #[serde(default)]
        top: Option<String>,
        #[serde(default)]
        right: Option<String>,
        #[serde(default)]
        bottom: Option<String>,
        #[serde(default)]
        left: Option<String>,
    },
}

impl Default for Margin {
    fn default() -> Self {
        Margin::All("1cm".into())
    }
}

impl Margin {
    /// Top, right, bottom, left, in inches.
    fn inches(&self) -> anyhow::Result<[f64; 4]> {
        match self {
            Margin::All(all) => {
                let m = inches(all)?;
                Ok([m; 4])
            }
            Margin::Sides {
                top,
                right,
                bottom,
                left,
            } => {
                let side = |s: &Option<String>| s.as_deref().map(inches).unwrap_or(Ok(0.0));
                Ok([side(top)?, side(right)?, side(bottom)?, side(left)?])
            }
        }
    }
}

/// A CSS length (`10mm`, `1cm`, `0.5in`, `48px`, `12pt`) in inches.
fn inches(length: &str) -> anyhow::Result<f64> {
    let length = length.trim();
    let split = length
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(length.len());
    let (number, unit) = length.split_at(split);
    let per_inch = match unit {
        "in" => 1.0,
        "cm" => 2.54,
        "mm" => 25.4,
        "px" => 96.0,
        "pt" => 72.0,
        _ => bail!(
            "{length:?} is not a length: write it like \"1cm\", \"10mm\", \"0.5in\", \"48px\" or \"12pt\""
        ),
    };
    let n: f64 = number
        .trim()
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n >= 0.0)
        .with_context(|| {
            format!("{length:?} is not a length: the number is missing or negative")
        })?;
    Ok(n / per_inch)
}

#[async_trait::async_trait]
impl Work for Pdf {
    async fn execute(&self, ctx: &Context) -> anyhow::Result<Value> {
        let p: PdfPayload = ctx.payload_as()?;
        let options = PdfOptions {
            paper: p.paper.inches()?,
            landscape: p.landscape,
            margins: p.margin.inches()?,
            print_background: p.print_background,
        };
        p.target.render(ctx, Render::Pdf(options)).await
    }
}

/// `chromium.screenshot`: the page as a PNG.
struct Screenshot;

#[derive(Debug, Deserialize)]
struct ScreenshotPayload {
    #[serde(flatten)]
    target: Target,
    #[serde(default = "default_width")]
    width: u32,
    #[serde(default = "default_height")]
    height: u32,
    /// The whole page, however long, rather than the viewport.
    #[serde(default)]
    full_page: bool,
}

fn default_width() -> u32 {
    1280
}
fn default_height() -> u32 {
    800
}

#[async_trait::async_trait]
impl Work for Screenshot {
    async fn execute(&self, ctx: &Context) -> anyhow::Result<Value> {
        let p: ScreenshotPayload = ctx.payload_as()?;
        if !(1..=16_384).contains(&p.width) || !(1..=16_384).contains(&p.height) {
            bail!("width and height must be between 1 and 16384 pixels");
        }
        let options = ScreenshotOptions {
            width: p.width,
            height: p.height,
            full_page: p.full_page,
        };
        let mut out = p.target.render(ctx, Render::Png(options)).await?;
        out["width"] = json!(p.width);
        out["height"] = json!(p.height);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_papers() {
        assert!((inches("2.54cm").expect("ok") - 1.0).abs() < 1e-9);
        assert!((inches("25.4mm").expect("ok") - 1.0).abs() < 1e-9);
        assert!((inches("96px").expect("ok") - 1.0).abs() < 1e-9);
        assert!(inches("12").is_err());
        assert!(inches("-1in").is_err());
        assert!(inches("1furlong").is_err());
        assert_eq!(
            Paper::Named("letter".into()).inches().expect("ok"),
            (8.5, 11.0)
        );
        assert!(Paper::Named("B7".into()).inches().is_err());
        let m: Margin = serde_json::from_value(json!({"top": "1in"})).expect("parses");
        assert_eq!(m.inches().expect("ok"), [1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn ready_is_load_signal_or_a_condition_of_the_pool_never_javascript() {
        let t = |v: Value| serde_json::from_value::<Target>(v).expect("parses");
        let settings = ChromiumArgs {
            chromium_ready: vec!["done=window.done === true".into()],
            ..ChromiumArgs::default()
        };
        let base = json!({"url": "http://x", "output": "a/b.pdf"});
        assert_eq!(t(base.clone()).ready(&settings).expect("ok"), Ready::Load);
        let mut signal = base.clone();
        signal["wait_for_ready"] = json!(true);
        assert_eq!(
            t(signal.clone()).ready(&settings).expect("ok"),
            Ready::Signal
        );
        let mut named = base.clone();
        named["ready"] = json!("done");
        assert_eq!(
            t(named.clone()).ready(&settings).expect("ok"),
            Ready::Expression("window.done === true".into())
        );
        named["ready"] = json!("other");
        let error = t(named).ready(&settings).expect_err("unknown").to_string();
        assert!(
            error.contains("no ready condition named \"other\" (it has done)"),
            "{error}"
        );
        let mut v1 = base;
        v1["ready_expression"] = json!("fetch('http://169.254.169.254/')");
        let error = t(v1).ready(&settings).expect_err("refused").to_string();
        assert!(
            error.contains("ready_expression is no longer accepted"),
            "{error}"
        );
    }
}
