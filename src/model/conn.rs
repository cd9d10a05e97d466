//! What is known of the client connection a request came in on.

use std::net::SocketAddr;

#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

impl ConnInfo {
    /// The scheme the client used (`X-Forwarded-Proto`).
    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }
}
