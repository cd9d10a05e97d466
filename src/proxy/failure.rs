//! How an upstream failure becomes the client's answer, for both engines: a connect that
//! timed out or no response within `response_timeout` is 504, anything else 502, each with a
//! one-line reason and counted in `crier_upstream_errors_total{kind}`.

use std::error::Error as _;
use std::io;
use std::time::Duration;

use http::StatusCode;

use crate::log_limit::{held_back_note, LogLimit};
use crate::metrics::Metrics;

/// Why the upstream gave no response head.
#[derive(Debug)]
pub enum UpstreamFailure {
    /// The connect did not finish within `upstream.connect_timeout`.
    ConnectTimeout(String),
    /// The connect failed (refused, no route, no such socket).
    Unreachable(String),
    /// Connected, but no response head within `upstream.response_timeout`.
    NoAnswer(Duration),
    /// The upstream closed, reset, or sent something that is not a response.
    Failed(String),
}

impl UpstreamFailure {
    /// Classifies an error of hyper-util's client by its type, not its text: a connect error
    /// whose cause is an `io::Error` of kind `TimedOut` is a connect timeout.
    pub fn from_client(e: &hyper_util::client::legacy::Error) -> UpstreamFailure {
        let cause = innermost(e);
        if !e.is_connect() {
            return UpstreamFailure::Failed(cause);
        }
        let mut source = e.source();
        while let Some(s) = source {
            if s.downcast_ref::<io::Error>()
                .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
            {
                return UpstreamFailure::ConnectTimeout(cause);
            }
            source = s.source();
        }
        UpstreamFailure::Unreachable(cause)
    }

    /// A connect error of the fast path's own connector.
    pub fn connect(e: &io::Error) -> UpstreamFailure {
        if e.kind() == io::ErrorKind::TimedOut {
            UpstreamFailure::ConnectTimeout(e.to_string())
        } else {
            UpstreamFailure::Unreachable(e.to_string())
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamFailure::ConnectTimeout(_) | UpstreamFailure::NoAnswer(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            UpstreamFailure::Unreachable(_) | UpstreamFailure::Failed(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The one-line reason the client reads.
    pub fn reason(&self) -> String {
        match self {
            UpstreamFailure::ConnectTimeout(c) => format!("upstream connect timed out: {c}"),
            UpstreamFailure::Unreachable(c) => format!("upstream unreachable: {c}"),
            UpstreamFailure::NoAnswer(d) => {
                format!("upstream did not answer within {}", humanize(*d))
            }
            UpstreamFailure::Failed(c) => format!("upstream failed: {c}"),
        }
    }

    /// Counts it in `crier_upstream_errors_total{kind}` and logs it (one line per 10 s).
    pub fn count(&self, m: &Metrics) {
        static WARN: LogLimit = LogLimit::new(Duration::from_secs(10));
        if let Some(n) = WARN.allow() {
            tracing::warn!(
                "proxy: {} (answered {}){}",
                self.reason(),
                self.status().as_u16(),
                held_back_note(n)
            );
        }
        match self {
            UpstreamFailure::ConnectTimeout(_) | UpstreamFailure::Unreachable(_) => {
                m.upstream_errors_connect.inc()
            }
            UpstreamFailure::NoAnswer(_) => m.upstream_errors_timeout.inc(),
            UpstreamFailure::Failed(_) => m.upstream_errors_other.inc(),
        }
    }
}

/// The most specific message in an error chain (hyper-util wraps the interesting one).
fn innermost(e: &hyper_util::client::legacy::Error) -> String {
    e.source()
        .and_then(|s| s.source().or(Some(s)))
        .map(|s| s.to_string())
        .unwrap_or_else(|| e.to_string())
}

/// `15s`, `250ms`.
fn humanize(d: Duration) -> String {
    if d.as_millis() % 1000 == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}
