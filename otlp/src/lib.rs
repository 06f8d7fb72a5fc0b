//! `--otlp URL`: ornament's events leave as OpenTelemetry log records over OTLP/HTTP
//! with protobuf bodies, to a collector (or anything that speaks OTLP: Elastic, Grafana
//! Alloy, Vector), so they go down the pipelines people already run.
//!
//! ```text
//! event ─► OtlpExport (an ornament, behind the session's consumer queue)
//!        ─► log record (attributes: the event's ECS fields, see [`record`])
//!        ─► the SDK's batch processor (bounded queue, its own thread)
//!        ─► the OTLP/HTTP exporter (the crate's retries) ─► collector
//! ```
//!
//! Nothing is lost silently: every record handed to the SDK is counted, every record a
//! collector accepted is counted, and [`ExportReport`] says how many never arrived and
//! why. Emitting never blocks: a slow collector fills the SDK's queue, and what overflows
//! is part of that count.

mod export;
pub mod record;

pub use export::{ExportReport, ExportStats, OtlpExport};

use std::time::Duration;

/// The OTLP/HTTP path of the logs signal, added to a URL that names none.
pub const LOGS_PATH: &str = "/v1/logs";

/// Records the SDK's batch processor holds at most, by default; beyond them records are
/// dropped (and counted as not delivered).
pub const DEFAULT_QUEUE: usize = 1 << 16;

/// How long one export (with its retries) may take, by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the exporter could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// The URL is not one ornament can send to.
    #[error("--otlp {url}: {why}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// The SDK refused the configuration.
    #[error("--otlp {url}: cannot build the OTLP exporter: {source}")]
    Build {
        /// The endpoint.
        url: String,
        /// The SDK's error.
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// Where and how to export.
#[derive(Debug, Clone)]
pub struct OtlpConfig {
    /// The full logs endpoint ([`endpoint`] makes one from what the user typed).
    pub endpoint: String,
    /// Records queued in the SDK at most.
    pub queue: usize,
    /// Time for one export, retries included.
    pub timeout: Duration,
}

impl OtlpConfig {
    /// The defaults for `url` (checked, see [`endpoint`]).
    pub fn new(url: &str) -> Result<Self, OtlpError> {
        Ok(Self {
            endpoint: endpoint(url)?,
            queue: DEFAULT_QUEUE,
            timeout: DEFAULT_TIMEOUT,
        })
    }
}

/// The logs endpoint for `url`: `http://HOST:PORT` or `http://HOST:PORT/` gets
/// [`LOGS_PATH`] (as OTLP's `OTEL_EXPORTER_OTLP_ENDPOINT` does); a URL with a path is
/// used as it is. Only `http` is taken: ornament's client has no TLS, so an `https`
/// collector is reached through a local collector (an agent on the host) that forwards.
pub fn endpoint(url: &str) -> Result<String, OtlpError> {
    let bad = |why: &str| OtlpError::Url {
        url: url.to_owned(),
        why: why.to_owned(),
    };
    let rest = match url.split_once("://") {
        Some(("http", rest)) => rest,
        Some(("https", _)) => return Err(bad(
            "https is not supported (ornament's OTLP client has no TLS): send to a collector on this host over http, and let it forward",
        )),
        Some((scheme, _)) => {
            return Err(bad(&format!(
                "scheme {scheme:?} is not OTLP/HTTP: give http://HOST:PORT (a collector's OTLP/HTTP port, usually 4318)"
            )))
        }
        None => {
            return Err(bad(
                "not a URL: give http://HOST:PORT (a collector's OTLP/HTTP port, usually 4318)",
            ))
        }
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.is_empty() {
        return Err(bad("no host in the URL"));
    }
    if authority.contains('@') {
        return Err(bad(
            "credentials in the URL are not supported (they would be logged)",
        ));
    }
    if rest.contains(['?', '#']) || rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("a query, fragment or blank in the URL"));
    }
    let path = match path {
        "" | "/" => LOGS_PATH,
        p => p,
    };
    // A port, if any, after the host (an IPv6 host is bracketed).
    let host_end = authority.rfind(']').map_or(0, |i| i + 1);
    if let Some((_, port)) = authority[host_end..].rsplit_once(':') {
        if port.parse::<u16>().is_err() {
            return Err(bad(&format!(
                "port {port:?} is not a number from 0 to 65535"
            )));
        }
    }
    Ok(format!("http://{authority}{path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_get_the_logs_path_only_when_they_name_none() {
        assert_eq!(
            endpoint("http://127.0.0.1:4318").expect("ok"),
            "http://127.0.0.1:4318/v1/logs"
        );
        assert_eq!(
            endpoint("http://collector:4318/").expect("ok"),
            "http://collector:4318/v1/logs"
        );
        assert_eq!(
            endpoint("http://[::1]:4318/otlp/v1/logs").expect("ok"),
            "http://[::1]:4318/otlp/v1/logs"
        );
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (url, says) in [
            ("https://c:4318", "https is not supported"),
            ("grpc://c:4317", "scheme \"grpc\""),
            ("c:4318", "not a URL"),
            ("http:///v1/logs", "no host"),
            ("http://u:p@c:4318", "credentials"),
            ("http://c:4318/x?y=1", "query"),
            ("http://c:99999999", "port \"99999999\""),
        ] {
            let e = endpoint(url).expect_err(url).to_string();
            assert!(e.starts_with(&format!("--otlp {url}: ")), "{e}");
            assert!(e.contains(says), "{url}: {e}");
        }
    }
}
