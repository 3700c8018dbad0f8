//! The coordinator's TLS accept loop: mutual TLS 1.2/1.3 with the consortium CA as the only
//! trusted root for clients. Owned here rather than left to tonic so that every connection that
//! fails its handshake (a certificate from another CA, no certificate, garbage bytes) is logged
//! with its peer and reason while the coordinator keeps serving.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::NetError;

/// How long a client has to finish its handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// The server side of mutual TLS: our certificate and key, clients must chain to `ca`.
pub fn server_config(certificate: &str, key: &str, ca: &str) -> Result<Arc<ServerConfig>, NetError> {
    let tls = |what: &str, e: &dyn std::fmt::Display| NetError::Tls(format!("{what}: {e}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.map_err(|e| tls("the consortium CA", &e))?).map_err(|e| tls("the consortium CA", &e))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| tls("client verifier", &e))?;
    let chain = CertificateDer::pem_slice_iter(certificate.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls("the coordinator's certificate", &e))?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| tls("the coordinator's key", &e))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls("protocol versions", &e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| tls("the coordinator's identity", &e))?;
    // gRPC runs over HTTP/2.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts connections on `listener`, completes each handshake on its own task, and yields the
/// authenticated streams. Failures are logged and dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (send, receive) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let handed = send.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = handed.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => refused(peer, &e.to_string()),
                    Err(_) => refused(peer, "no handshake within 10 s"),
                }
            });
            if send.is_closed() {
                break;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receive)
}

fn refused(peer: SocketAddr, reason: &str) {
    tracing::warn!(code = "tls_handshake", %peer, "connection refused: {reason}");
}
