//! Errors of the agent library. Each variant names the object it is about and what went wrong,
//! so a log line is enough to find the culprit.

use std::path::PathBuf;

/// Result alias of the agent library.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything the library code can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A map operation failed (kernel error, map full, ...).
    #[error("map {map}: {op} of {key} failed: {reason}")]
    Map {
        /// Map name, e.g. `NP_SVC_V1`.
        map: &'static str,
        /// Operation, e.g. `insert`, `delete`.
        op: &'static str,
        /// The key, rendered for humans.
        key: String,
        /// What the kernel or the map layer said.
        reason: String,
    },
    /// No contiguous region of the Maglev array is large enough for a service's table.
    #[error("{service}: no free region of {size} Maglev slots (array of {total} slots)")]
    MaglevFull {
        /// The service port, e.g. `default/web:http/TCP`.
        service: String,
        /// Slots needed.
        size: u32,
        /// Size of the whole Maglev array.
        total: u32,
    },
    /// Every backend id is in use.
    #[error("no free backend id for {backend} (limit {max})")]
    BackendIdsExhausted {
        /// The backend, e.g. `10.0.0.1:8080`.
        backend: String,
        /// Largest id the backend map can hold.
        max: u32,
    },
    /// Every service id is in use.
    #[error("no free service id for {service}")]
    ServiceIdsExhausted {
        /// The service port.
        service: String,
    },
    /// Reading a file or directory failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A value from configuration or an object could not be parsed.
    #[error("invalid {what} {input:?}: {reason}")]
    Parse {
        /// What was expected, e.g. `IPv4 CIDR`.
        what: &'static str,
        /// The offending text.
        input: String,
        /// Why it was rejected.
        reason: String,
    },
    /// Programming one service port failed; the other services were still programmed.
    #[error("{service}: {source}")]
    Service {
        /// The service port, e.g. `default/web:http/TCP`.
        service: String,
        /// What failed.
        #[source]
        source: Box<Error>,
    },
    /// A kernel operation of the datapath failed (load, verifier, attach, map access).
    #[error("datapath: {0}")]
    Kernel(String),
    /// Programming one frontend of a service failed.
    #[error("frontend {frontend}: {source}")]
    Frontend {
        /// The frontend, e.g. `nodePort 30080/TCP`.
        frontend: String,
        /// What failed.
        #[source]
        source: Box<Error>,
    },
    /// An NP_SRCRANGE entry could not be written or deleted.
    #[error("{service} (service id {svc_id}): loadBalancerSourceRanges entry {range}: {source}")]
    SourceRange {
        /// The service port, e.g. `default/web:http/TCP`.
        service: String,
        svc_id: u32,
        range: String,
        #[source]
        source: Box<Error>,
    },
    /// A backend a service needs could not be programmed (reported on its own as well).
    #[error("backend {backend} is not programmed")]
    BackendUnavailable {
        /// The backend, e.g. `10.0.0.1:8080`.
        backend: String,
    },
}
