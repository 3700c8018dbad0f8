//! weft over the network: the gRPC protocol (one versioned `.proto`, compiled without a system
//! `protoc`), mutual TLS with the consortium's own CA, provisioning, the coordinator's server and
//! the node's client.

pub mod announce;
pub mod client;
pub mod config;
pub mod encoding;
pub mod provision;
pub mod refusal;
pub mod secure;
pub mod server;
pub mod tls;
pub mod witness;

/// The generated protocol (proto/weft/v1/consortium.proto).
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("weft.v1");
}

/// The protocol version nodes and coordinator must share.
pub const PROTOCOL: u32 = 1;
/// Bytes per streamed chunk.
pub const CHUNK: usize = 4 << 20;
/// Largest gRPC message either side accepts (a chunk plus framing).
pub const MAX_MESSAGE: usize = 4 * CHUNK;
/// HTTP/2 flow-control window per stream, in bytes (the connection gets twice this).
pub const WINDOW: u32 = 4 << 20;
/// Largest HTTP/2 frame the coordinator accepts (the protocol's maximum is 16 MiB − 1).
pub const FRAME: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("address {0}: {1}")]
    Address(String, String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("transport: {0}")]
    Transport(String),
    #[error("the coordinator refused: {0}")]
    Refused(#[from] tonic::Status),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("key {0}: {1}")]
    Key(String, String),
    #[error("{path}: {source}")]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("consortium.toml: {0}")]
    Settings(#[from] config::SettingError),
    #[error("round_deadline_secs: a round opened now would close past what the clock can represent")]
    Deadline,
    #[error(transparent)]
    Encoding(#[from] encoding::EncodingError),
    #[error(transparent)]
    Node(#[from] weft_node::NodeError),
    #[error("the node's trainer cannot be set up: {0}")]
    Trainer(String),
    #[error(transparent)]
    Coordinator(#[from] weft_coordinator::CoordinatorError),
}
