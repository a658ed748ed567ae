//! Which URLs a pool's Chromium may load: the pool's configuration says, never the payload.
//! Every request of a page (the page itself, its redirects, its frames and subresources) is
//! checked through request interception (the DevTools `Fetch` domain, see
//! [`super::Page::goto`]); a URL a Work asks for is checked before Chromium is asked to load
//! it.
//!
//! Allowed: the schemes of `--chromium-allow-scheme` (http and https by default) to the hosts
//! of `--chromium-allow-host` (none by default: a pool names the hosts it renders). Refused
//! whatever the pool lists: `file:`, `data:` and every other scheme, link-local addresses
//! (169.254.0.0/16, fe80::/10) and the cloud metadata endpoints (fd00:ec2::254,
//! metadata.google.internal), the unspecified address, and the ports of RabbitMQ (the
//! broker's own, its management, clustering and plugin ports, and those of
//! `--chromium-deny-port`). Loopback (127.0.0.0/8, ::1, localhost) only when listed by name
//! or address: `*` does not cover it.
//!
//! A host is checked as written in the URL (after WHATWG normalisation, so
//! `http://2852039166/` is 169.254.169.254): a name that resolves to a refused address is
//! only refused if the name is not listed. List names, not `*`, where that matters.

use std::net::Ipv6Addr;

use url::{Host, Url};

use super::ChromiumArgs;

/// RabbitMQ's ports: epmd, AMQP (and over TLS), management (and over TLS), Prometheus,
/// clustering, STOMP, MQTT and their Web variants, streams.
pub const BROKER_PORTS: &[u16] = &[
    4369, 5671, 5672, 15671, 15672, 15674, 15675, 15692, 25672, 61613, 61614, 1883, 8883, 5551,
    5552,
];

/// The schemes a pool may allow.
const SCHEMES: &[&str] = &["http", "https", "ws", "wss"];

/// Names that always mean the cloud metadata service.
const METADATA_NAMES: &[&str] = &["metadata.google.internal", "metadata.goog", "metadata"];

/// The checked form of a pool's `--chromium-allow-*` and `--chromium-deny-port` settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    schemes: Vec<String>,
    hosts: Vec<Allowed>,
    deny_ports: Vec<u16>,
}

/// One entry of `--chromium-allow-host`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Allowed {
    /// `*`: any host but loopback and the refused ones.
    Any,
    /// `*.example.com`: the subdomains of a domain.
    Under(String),
    /// A name or an address, exactly.
    Exactly(Host),
}

impl Policy {
    /// The policy of `settings`; the error says which setting is wrong and how to write it.
    pub fn new(settings: &ChromiumArgs) -> anyhow::Result<Policy> {
        let mut schemes = Vec::new();
        for scheme in &settings.chromium_allow_schemes {
            let scheme = scheme.to_ascii_lowercase();
            if !SCHEMES.contains(&scheme.as_str()) {
                anyhow::bail!(
                    "--chromium-allow-scheme {scheme:?}: a pool's Chromium may only be allowed {} \
                     (file:, data: and the others are never allowed)",
                    SCHEMES.join(", ")
                );
            }
            schemes.push(scheme);
        }
        let hosts = settings
            .chromium_allow_hosts
            .iter()
            .map(|h| parse_allowed(h))
            .collect::<anyhow::Result<_>>()?;
        let mut deny_ports = BROKER_PORTS.to_vec();
        deny_ports.extend(&settings.chromium_deny_ports);
        Ok(Policy {
            schemes,
            hosts,
            deny_ports,
        })
    }

    /// Why Chromium may not load `url`, or `None` when it may.
    pub fn refusal(&self, url: &str) -> Option<String> {
        if url == "about:blank" {
            return None;
        }
        let Ok(parsed) = Url::parse(url) else {
            return Some("it is not a URL".into());
        };
        let scheme = parsed.scheme();
        if !self.schemes.iter().any(|s| s == scheme) {
            return Some(match scheme {
                "http" | "https" | "ws" | "wss" => format!(
                    "its scheme {scheme}: is not allowed in this pool (--chromium-allow-scheme)"
                ),
                _ => format!("{scheme}: URLs are never loaded"),
            });
        }
        let Some(host) = parsed.host().map(|h| h.to_owned()) else {
            return Some("it names no host".into());
        };
        let host = unmapped(host);
        if let Some(why) = never(&host) {
            return Some(format!("{host} is {why}, never loaded"));
        }
        if let Some(port) = parsed.port_or_known_default()
            && self.deny_ports.contains(&port)
        {
            return Some(format!(
                "port {port} is one of the broker's (RabbitMQ's ports and --chromium-deny-port), never loaded"
            ));
        }
        if self.hosts.is_empty() {
            return Some(
                "this pool's Chromium may load no host: list the ones it may load with \
                 --chromium-allow-host (ROTA_CHROMIUM_ALLOW_HOSTS), e.g. --chromium-allow-host reports.example.com"
                    .into(),
            );
        }
        let listed = self.hosts.iter().any(|allowed| match allowed {
            Allowed::Exactly(h) => *h == host,
            Allowed::Under(domain) => matches!(&host, Host::Domain(name)
                if name.strip_suffix(domain.as_str()).is_some_and(|sub| sub.ends_with('.'))),
            Allowed::Any => !loopback(&host),
        });
        if listed {
            return None;
        }
        Some(if loopback(&host) {
            format!(
                "{host} is loopback, loaded only when --chromium-allow-host names it (e.g. --chromium-allow-host {host})"
            )
        } else {
            format!(
                "{host} is not among the hosts of --chromium-allow-host (ROTA_CHROMIUM_ALLOW_HOSTS)"
            )
        })
    }
}

fn parse_allowed(entry: &str) -> anyhow::Result<Allowed> {
    let entry = entry.trim();
    if entry == "*" {
        return Ok(Allowed::Any);
    }
    if let Some(domain) = entry.strip_prefix("*.") {
        return match Host::parse(domain) {
            Ok(Host::Domain(d)) => Ok(Allowed::Under(d)),
            _ => anyhow::bail!(
                "--chromium-allow-host {entry:?}: write *.example.com, a name or an address"
            ),
        };
    }
    let bracketed = if entry.contains(':') && !entry.starts_with('[') {
        format!("[{entry}]")
    } else {
        entry.to_owned()
    };
    let host = Host::parse(&bracketed)
        .map_err(|e| anyhow::anyhow!("--chromium-allow-host {entry:?} is not a host name or an address ({e}); give hosts without scheme or port, e.g. reports.example.com, *.example.com, 10.0.0.5"))?;
    let host = unmapped(host);
    if let Some(why) = never(&host) {
        anyhow::bail!("--chromium-allow-host {entry}: {host} is {why}, which Chromium never loads");
    }
    Ok(Allowed::Exactly(host))
}

/// An IPv4 address written as IPv6 (`::ffff:a.b.c.d`), as IPv4.
fn unmapped(host: Host) -> Host {
    match host {
        Host::Ipv6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => Host::Ipv4(v4),
            None => Host::Ipv6(v6),
        },
        other => other,
    }
}

/// Why `host` is never loaded, if it is not.
fn never(host: &Host) -> Option<&'static str> {
    const EC2_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
    match host {
        Host::Domain(name) => METADATA_NAMES
            .contains(&name.trim_end_matches('.'))
            .then_some("a cloud metadata service"),
        Host::Ipv4(v4) if v4.is_link_local() => Some("link-local (cloud metadata lives there)"),
        Host::Ipv4(v4) if v4.is_unspecified() || v4.is_broadcast() => Some("not a host"),
        Host::Ipv6(v6) if *v6 == EC2_V6 => Some("a cloud metadata service"),
        Host::Ipv6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => Some("link-local"),
        Host::Ipv6(v6) if v6.is_unspecified() => Some("not a host"),
        _ => None,
    }
}

fn loopback(host: &Host) -> bool {
    match host {
        Host::Domain(name) => {
            let name = name.trim_end_matches('.');
            name == "localhost" || name.ends_with(".localhost")
        }
        Host::Ipv4(v4) => v4.is_loopback(),
        Host::Ipv6(v6) => v6.is_loopback(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(hosts: &[&str]) -> Policy {
        let settings = ChromiumArgs {
            chromium_allow_hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            ..ChromiumArgs::default()
        };
        Policy::new(&settings).expect("a valid policy")
    }

    #[test]
    fn listed_hosts_over_http_and_https_only() {
        let p = policy(&["reports.example.com", "*.example.org", "10.0.0.5"]);
        for ok in [
            "http://reports.example.com/a",
            "https://reports.example.com:8443/a",
            "https://a.b.example.org/",
            "http://10.0.0.5/x",
            "about:blank",
        ] {
            assert_eq!(p.refusal(ok), None, "{ok}");
        }
        for (bad, why) in [
            ("file:///etc/passwd", "file: URLs are never loaded"),
            ("data:text/html,<h1>x</h1>", "data: URLs are never loaded"),
            ("javascript:alert(1)", "javascript: URLs are never loaded"),
            (
                "http://other.example.com/",
                "not among the hosts of --chromium-allow-host",
            ),
            ("https://example.org/", "not among the hosts"),
            ("http://169.254.169.254/latest/meta-data/", "link-local"),
            ("http://2852039166/", "169.254.169.254 is link-local"),
            ("http://[::ffff:169.254.169.254]/", "link-local"),
            ("http://[fd00:ec2::254]/", "cloud metadata"),
            ("http://metadata.google.internal/", "cloud metadata"),
            (
                "http://127.0.0.1:8080/",
                "loopback, loaded only when --chromium-allow-host names it",
            ),
            ("http://localhost/", "loopback"),
            (
                "http://reports.example.com:15672/",
                "port 15672 is one of the broker's",
            ),
            ("http://10.0.0.5:5672/", "port 5672"),
        ] {
            let refusal = p.refusal(bad).unwrap_or_default();
            assert!(refusal.contains(why), "{bad}: {refusal:?}");
        }
    }

    #[test]
    fn loopback_only_by_name_and_nothing_without_a_list() {
        let p = policy(&["*"]);
        assert_eq!(p.refusal("https://anything.example/"), None);
        assert!(p.refusal("http://127.0.0.1/").is_some());
        assert!(p.refusal("http://169.254.169.254/").is_some());
        let p = policy(&["127.0.0.1"]);
        assert_eq!(p.refusal("http://127.0.0.1:8080/"), None);
        assert!(p.refusal("http://127.0.0.1:5672/").is_some());
        let refusal = policy(&[])
            .refusal("https://example.com/")
            .unwrap_or_default();
        assert!(refusal.contains("--chromium-allow-host"), "{refusal}");
    }

    #[test]
    fn bad_settings_are_refused() {
        for hosts in [["169.254.169.254"], ["http://x.example"], ["*.1.2.3.4"]] {
            let settings = ChromiumArgs {
                chromium_allow_hosts: hosts.map(str::to_owned).to_vec(),
                ..ChromiumArgs::default()
            };
            assert!(Policy::new(&settings).is_err(), "{hosts:?}");
        }
        let settings = ChromiumArgs {
            chromium_allow_schemes: vec!["file".into()],
            ..ChromiumArgs::default()
        };
        assert!(Policy::new(&settings).is_err());
        assert_eq!(
            unmapped(Host::Ipv6("::ffff:127.0.0.1".parse().expect("v6"))),
            Host::<String>::Ipv4(std::net::Ipv4Addr::LOCALHOST)
        );
    }
}
