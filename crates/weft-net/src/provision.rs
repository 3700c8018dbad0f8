//! `weft consortium init`: a consortium CA, the coordinator's TLS identity, one startup kit per
//! node, the roster and the consortium config.
//!
//! ```text
//! DIR/consortium.toml   what the consortium does (edit before serving)
//! DIR/roster.toml       node id, language, certificate fingerprint, signing key
//! DIR/ca.pem, ca.key    the consortium CA (keep ca.key offline: it admits members)
//! DIR/coordinator/      tls.pem, tls.key (+ the coordinator's storage once it serves)
//! DIR/nodes/<id>/       node.toml, ca.pem, tls.pem, tls.key, signing.key: the node's kit
//! ```

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use weft_ledger::SigningKey;

use crate::config::{fingerprint, write_toml, ConfigError, ConsortiumConfig, KitFiles, Member, NodeKit, Roster};

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("{0} already exists; choose a new directory")]
    Exists(PathBuf),
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot draw a random key: {0}")]
    Random(String),
    #[error("node id '{0}': {1}")]
    NodeId(String, String),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ProvisionError + '_ {
    move |source| ProvisionError::Io { path: path.to_owned(), source }
}

/// Writes a file readable by its owner only (private keys).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ProvisionError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(io(path))?;
    file.write_all(bytes).map_err(io(path))
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<(), ProvisionError> {
    std::fs::write(path, bytes).map_err(io(path))
}

fn ca_params(name: &str) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, format!("{name} consortium CA"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

fn leaf_params(
    common_name: &str,
    names: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(names)?;
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    Ok(params)
}

fn signing_key() -> Result<SigningKey, ProvisionError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| ProvisionError::Random(e.to_string()))?;
    Ok(SigningKey::from_seed(seed))
}

/// Creates the consortium in `dir` (which must not exist) for `nodes` (id, language).
pub fn init(dir: &Path, config: &ConsortiumConfig, nodes: &[(String, String)]) -> Result<Roster, ProvisionError> {
    if dir.exists() {
        return Err(ProvisionError::Exists(dir.to_owned()));
    }
    for (id, _) in nodes {
        weft_core::NodeId::new(id.clone()).map_err(|e| ProvisionError::NodeId(id.clone(), e.to_string()))?;
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let ca_key = KeyPair::generate()?;
    let params = ca_params(&config.name)?;
    let ca_cert = params.self_signed(&ca_key)?;
    write_public(&dir.join("ca.pem"), ca_cert.pem().as_bytes())?;
    write_private(&dir.join("ca.key"), ca_key.serialize_pem().as_bytes())?;
    let issuer = Issuer::new(params, ca_key);

    let coordinator_dir = dir.join(&config.storage);
    std::fs::create_dir_all(&coordinator_dir).map_err(io(&coordinator_dir))?;
    let host = config.address.rsplit_once(':').map_or(config.address.as_str(), |(h, _)| h).to_owned();
    let mut names = vec![config.server_name.clone(), "localhost".to_owned()];
    if !names.contains(&host) {
        names.push(host);
    }
    let key = KeyPair::generate()?;
    let cert = leaf_params("weft coordinator", names, ExtendedKeyUsagePurpose::ServerAuth)?.signed_by(&key, &issuer)?;
    write_public(&coordinator_dir.join(KitFiles::CERTIFICATE), cert.pem().as_bytes())?;
    write_private(&coordinator_dir.join(KitFiles::TLS_KEY), key.serialize_pem().as_bytes())?;

    let mut roster = Roster::default();
    for (id, language) in nodes {
        let kit = dir.join("nodes").join(id);
        std::fs::create_dir_all(&kit).map_err(io(&kit))?;
        let key = KeyPair::generate()?;
        let cert = leaf_params(id, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)?.signed_by(&key, &issuer)?;
        write_public(&kit.join(KitFiles::CA), ca_cert.pem().as_bytes())?;
        write_public(&kit.join(KitFiles::CERTIFICATE), cert.pem().as_bytes())?;
        write_private(&kit.join(KitFiles::TLS_KEY), key.serialize_pem().as_bytes())?;
        let signing = signing_key()?;
        write_private(&kit.join(KitFiles::SIGNING_KEY), signing.to_hex().as_bytes())?;
        let node = NodeKit {
            id: id.clone(),
            language: language.clone(),
            consortium: config.name.clone(),
            address: config.address.clone(),
            server_name: config.server_name.clone(),
        };
        write_toml(&kit.join(KitFiles::CONFIG), &node)?;
        roster.node.push(Member {
            id: id.clone(),
            language: language.clone(),
            certificate: fingerprint(cert.der()),
            signing_key: signing.public(),
        });
    }
    write_toml(&dir.join("roster.toml"), &roster)?;
    write_toml(&dir.join("consortium.toml"), config)?;
    Ok(roster)
}
