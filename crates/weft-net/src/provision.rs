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

use weft_core::NodeId;

use crate::config::{write_toml, ConfigError, ConsortiumConfig, Fingerprint, KitFiles, Member, NodeKit, Roster};

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
    #[error("consortium.toml: {0}")]
    Setting(#[from] crate::config::SettingError),
    #[error("a consortium needs at least one node")]
    NoNodes,
    #[error(
        "the consortium in {0} has already started: its roster is committed in the ledger's genesis, and \
         changing membership mid-run is not supported yet; admit nodes before the first `weft coordinator serve`"
    )]
    Started(PathBuf),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ProvisionError + '_ {
    move |source| ProvisionError::Io { path: path.to_owned(), source }
}

/// Writes a file readable by its owner only (private keys).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ProvisionError> {
    weft_durable::write_private(path, bytes).map_err(io(path))
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
    SigningKey::generate().map_err(|e| ProvisionError::Random(e.to_string()))
}

/// A client certificate for `common_name` and `public_key`, issued by the consortium CA in
/// `dir` (`ca.key`; the CA's subject is rebuilt from the consortium's name). Returns the
/// certificate PEM and its fingerprint.
pub fn issue_client_certificate(
    dir: &Path,
    name: &str,
    common_name: &str,
    public_key: &impl rcgen::PublicKeyData,
) -> Result<(String, Fingerprint), ProvisionError> {
    let ca_key_path = dir.join("ca.key");
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?)?;
    let issuer = Issuer::new(ca_params(name)?, ca_key);
    let cert =
        leaf_params(common_name, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)?.signed_by(public_key, &issuer)?;
    Ok((cert.pem(), Fingerprint::of(cert.der())))
}

/// Creates the consortium in `dir` (which must not exist) for `nodes` (id, language).
pub fn init(dir: &Path, config: &ConsortiumConfig, nodes: &[(NodeId, String)]) -> Result<Roster, ProvisionError> {
    if dir.exists() {
        return Err(ProvisionError::Exists(dir.to_owned()));
    }
    config.validate()?;
    if nodes.is_empty() {
        return Err(ProvisionError::NoNodes);
    }
    for (i, (id, language)) in nodes.iter().enumerate() {
        if nodes[..i].iter().any(|(other, _)| other == id) {
            return Err(ProvisionError::NodeId(id.to_string(), "listed twice".into()));
        }
        if language.trim().is_empty() {
            return Err(ProvisionError::NodeId(id.to_string(), "no language".into()));
        }
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
        let kit = dir.join("nodes").join(id.as_str());
        std::fs::create_dir_all(&kit).map_err(io(&kit))?;
        let key = KeyPair::generate()?;
        let cert =
            leaf_params(id.as_str(), Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)?.signed_by(&key, &issuer)?;
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
            base: kit_base(dir, config, &kit)?,
            trainer: None,
        };
        write_toml(&kit.join(KitFiles::CONFIG), &node)?;
        roster.node.push(Member {
            id: id.clone(),
            language: language.clone(),
            certificate: Fingerprint::of(cert.der()),
            signing_key: signing.public(),
        });
    }
    write_toml(&dir.join("roster.toml"), &roster)?;
    write_toml(&dir.join("consortium.toml"), config)?;
    Ok(roster)
}

/// Files of a pretrained base a node needs beside the weights the coordinator sends it.
const BASE_FILES: [&str; 2] = ["config.json", "tokenizer.json"];

/// For a consortium on a pretrained base: copies the base's `config.json` and `tokenizer.json`
/// into `kit/base/` and returns that directory as the kit names it.
fn kit_base(dir: &Path, config: &ConsortiumConfig, kit: &Path) -> Result<Option<PathBuf>, ProvisionError> {
    let Some(base) = &config.base else { return Ok(None) };
    let from = base.dir_in(dir);
    let to = kit.join("base");
    std::fs::create_dir_all(&to).map_err(io(&to))?;
    for file in BASE_FILES {
        let source = from.join(file);
        let bytes = std::fs::read(&source).map_err(io(&source))?;
        write_public(&to.join(file), &bytes)?;
    }
    Ok(Some(PathBuf::from("base")))
}

/// What a site sends the consortium to join when it makes its own keys (`weft node keygen`):
/// public material only.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembershipRequest {
    pub id: NodeId,
    pub language: String,
    /// The node's TLS public key: an uncompressed P-256 point, hex.
    pub tls_public_key: String,
    pub signing_key: weft_ledger::PublicKey,
}

/// A P-256 public key received from a site, to certify.
struct SitePublicKey(Vec<u8>);

impl rcgen::PublicKeyData for SitePublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// `weft node keygen`: the site makes its TLS and signing keys in `kit` (private, mode 0600)
/// and writes `request.toml`, the only file it sends to the consortium.
pub fn keygen(kit: &Path, id: &NodeId, language: &str) -> Result<MembershipRequest, ProvisionError> {
    if language.trim().is_empty() {
        return Err(ProvisionError::NodeId(id.to_string(), "no language".into()));
    }
    std::fs::create_dir_all(kit).map_err(io(kit))?;
    let key = KeyPair::generate()?;
    write_private(&kit.join(KitFiles::TLS_KEY), key.serialize_pem().as_bytes())?;
    let signing = signing_key()?;
    write_private(&kit.join(KitFiles::SIGNING_KEY), signing.to_hex().as_bytes())?;
    let request = MembershipRequest {
        id: id.clone(),
        language: language.to_owned(),
        tls_public_key: key.public_key_raw().iter().map(|b| format!("{b:02x}")).collect(),
        signing_key: signing.public(),
    };
    write_toml(&kit.join("request.toml"), &request)?;
    Ok(request)
}

/// `weft consortium add-node`: certifies a site's public key with the consortium CA, adds the
/// node to the roster, and writes the public half of its kit (`tls.pem`, `ca.pem`, `node.toml`)
/// under `DIR/nodes/<id>/` to send back.
pub fn add_node(dir: &Path, request: &MembershipRequest) -> Result<PathBuf, ProvisionError> {
    use crate::config::read_toml;
    let config: ConsortiumConfig = read_toml(&dir.join("consortium.toml"))?;
    // The roster is part of the configuration the ledger's genesis commits to.
    let storage = dir.join(&config.storage).join("state.sqlite");
    if storage.exists() {
        return Err(ProvisionError::Started(dir.to_owned()));
    }
    let roster_path = dir.join("roster.toml");
    let mut roster: Roster = read_toml(&roster_path)?;
    if roster.node.iter().any(|m| m.id == request.id) {
        return Err(ProvisionError::NodeId(request.id.to_string(), "already in the roster".into()));
    }
    let raw = (0..request.tls_public_key.len() / 2)
        .map(|i| u8::from_str_radix(request.tls_public_key.get(2 * i..2 * i + 2).unwrap_or("zz"), 16))
        .collect::<Result<Vec<u8>, _>>()
        .ok()
        .filter(|raw| raw.len() == 65 && raw[0] == 0x04)
        .ok_or_else(|| {
            ProvisionError::NodeId(request.id.to_string(), "tls_public_key is not an uncompressed P-256 point".into())
        })?;
    let (certificate, print) = issue_client_certificate(dir, &config.name, request.id.as_str(), &SitePublicKey(raw))?;
    let kit = dir.join("nodes").join(request.id.as_str());
    std::fs::create_dir_all(&kit).map_err(io(&kit))?;
    write_public(&kit.join(KitFiles::CERTIFICATE), certificate.as_bytes())?;
    let ca = std::fs::read(dir.join("ca.pem")).map_err(io(&dir.join("ca.pem")))?;
    write_public(&kit.join(KitFiles::CA), &ca)?;
    let node = NodeKit {
        id: request.id.clone(),
        language: request.language.clone(),
        consortium: config.name.clone(),
        address: config.address.clone(),
        server_name: config.server_name.clone(),
        base: kit_base(dir, &config, &kit)?,
        trainer: None,
    };
    write_toml(&kit.join(KitFiles::CONFIG), &node)?;
    roster.node.push(Member {
        id: request.id.clone(),
        language: request.language.clone(),
        certificate: print,
        signing_key: request.signing_key,
    });
    write_toml(&roster_path, &roster)?;
    Ok(kit)
}
