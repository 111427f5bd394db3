//! The cluster's public-key infrastructure: one CA per cluster, one certificate per node with
//! the DNS name `node-<id>` (see [`tandem_types::node_cert_name`]).
//!
//! Both directions are authenticated: the client checks that the server's certificate names the
//! node it meant to reach, and the server checks that the client's certificate names the node
//! id the client claims in its hello. A certificate from any other CA fails the handshake.

use std::path::Path;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tandem_types::{node_cert_name, NodeId};

/// ALPN id of Tandem's node-to-node protocol, so a Tandem port never mistakes another TLS
/// client for a peer.
pub const ALPN: &[u8] = b"tandem/1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration failed: {0}")]
    Config(String),
}

/// PEM text of a certificate and its private key.
#[derive(Clone)]
pub struct PemPair {
    pub cert_pem: String,
    pub key_pem: String,
}

fn ca_params(cluster_name: &str) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Tandem cluster CA {cluster_name}"));
    dn.push(DnType::OrganizationName, "Tandem");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

/// Makes a new cluster CA.
pub fn generate_ca(cluster_name: &str) -> Result<PemPair, TlsError> {
    let key = KeyPair::generate()?;
    let cert = ca_params(cluster_name)?.self_signed(&key)?;
    Ok(PemPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Issues a node certificate signed by the CA (`ca_key_pem` is the CA's private key; the CA's
/// name is rebuilt from `cluster_name`, as [`generate_ca`] made it).
pub fn issue_node_cert(cluster_name: &str, ca_key_pem: &str, id: NodeId) -> Result<PemPair, TlsError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let issuer = Issuer::new(ca_params(cluster_name)?, ca_key);
    let mut params = CertificateParams::new(vec![node_cert_name(id), "localhost".to_string()])?;
    params.distinguished_name.push(DnType::CommonName, node_cert_name(id));
    params.subject_alt_names.push(rcgen::SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(PemPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// The DNS name a host's client certificate carries (for people and logs: a host is known by
/// its certificate's fingerprint, which the cluster map records when it is issued).
pub fn host_cert_name(host: &str) -> String {
    format!("host-{host}")
}

/// A host's public key as its holder sent it: an uncompressed ECDSA P-256 point (65 bytes,
/// `rcgen::KeyPair::public_key_raw` of a key made by `KeyPair::generate`). The host keeps its
/// private key; only this travels.
pub struct HostPublicKey(Vec<u8>);

impl HostPublicKey {
    pub fn from_raw(raw: Vec<u8>) -> Result<HostPublicKey, TlsError> {
        if raw.len() != 65 || raw[0] != 0x04 {
            return Err(TlsError::Config("a host's public key is an uncompressed P-256 point of 65 bytes".into()));
        }
        Ok(HostPublicKey(raw))
    }
}

impl rcgen::PublicKeyData for HostPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// A new key pair for a host (ECDSA P-256): its private key as PEM, which stays with the host,
/// and its public key as [`HostPublicKey`] expects it.
pub fn new_host_key() -> Result<(String, Vec<u8>), TlsError> {
    let key = KeyPair::generate()?;
    Ok((key.serialize_pem(), key.public_key_raw().to_vec()))
}

/// Issues a host's client certificate for `public_key`, signed by the cluster CA: its PEM text
/// and its DER bytes (what a fingerprint is taken of).
pub fn issue_host_cert(
    cluster_name: &str,
    ca_key_pem: &str,
    host: &str,
    public_key: &HostPublicKey,
) -> Result<(String, Vec<u8>), TlsError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let issuer = Issuer::new(ca_params(cluster_name)?, ca_key);
    let mut params = CertificateParams::new(vec![host_cert_name(host)])?;
    params.distinguished_name.push(DnType::CommonName, host_cert_name(host));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(public_key, &issuer)?;
    Ok((cert.pem(), cert.der().to_vec()))
}

/// A node's TLS material, loaded and checked.
pub struct Identity {
    pub node_id: NodeId,
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity { node_id: self.node_id, ca: self.ca.clone(), chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File { path: path.display().to_string(), reason: e.to_string() })
}

fn certs_from_pem(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut &pem[..]).collect();
    let certs = certs.map_err(|e| TlsError::File { path: path.display().to_string(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::File { path: path.display().to_string(), reason: "no PEM certificate in file".into() });
    }
    Ok(certs)
}

impl Identity {
    pub fn load(node_id: NodeId, ca_cert: &Path, cert: &Path, key: &Path) -> Result<Identity, TlsError> {
        let ca = certs_from_pem(ca_cert, &read(ca_cert)?)?;
        let chain = certs_from_pem(cert, &read(cert)?)?;
        let key_pem = read(key)?;
        let key = rustls_pemfile::private_key(&mut &key_pem[..])
            .map_err(|e| TlsError::File { path: key.display().to_string(), reason: e.to_string() })?
            .ok_or_else(|| TlsError::File {
                path: key.display().to_string(),
                reason: "no PEM private key in file".into(),
            })?;
        let identity = Identity { node_id, ca, chain, key };
        // Fail at start-up, naming the file, rather than at the first connection.
        identity.server_config()?;
        identity.client_config()?;
        Ok(identity)
    }

    pub fn from_pem(node_id: NodeId, ca_cert_pem: &str, node: &PemPair) -> Result<Identity, TlsError> {
        let path = Path::new("<memory>");
        let ca = certs_from_pem(path, ca_cert_pem.as_bytes())?;
        let chain = certs_from_pem(path, node.cert_pem.as_bytes())?;
        let key = rustls_pemfile::private_key(&mut node.key_pem.as_bytes())
            .map_err(|e| TlsError::Config(e.to_string()))?
            .ok_or_else(|| TlsError::Config("no PEM private key".into()))?;
        Ok(Identity { node_id, ca, chain, key })
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone()).map_err(|e| TlsError::Config(format!("bad CA certificate: {e}")))?;
        }
        Ok(Arc::new(roots))
    }

    /// Server side for hosts (NBD over TLS): the node's certificate. A client certificate is
    /// asked for and, when one is given, must be signed by the cluster CA; a client without one
    /// is anonymous (the access policy decides what it may do). No ALPN: NBD clients send none.
    pub fn host_server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, Self::provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let cfg = ServerConfig::builder_with_provider(Self::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(Arc::new(cfg))
    }

    /// Server side: requires a client certificate signed by the cluster CA.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, Self::provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut cfg = ServerConfig::builder_with_provider(Self::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Arc::new(cfg))
    }

    /// Client side: trusts only the cluster CA and presents this node's certificate.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let mut cfg = ClientConfig::builder_with_provider(Self::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// The name a client must find in the certificate of node `id`.
pub fn server_name(id: NodeId) -> ServerName<'static> {
    ServerName::try_from(node_cert_name(id)).expect("node-<id> is a valid DNS name")
}

/// Checks that an already CA-verified end-entity certificate was issued to node `id`.
pub fn cert_names_node(cert: &CertificateDer<'_>, id: NodeId) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    ee.verify_is_valid_for_subject_name(&server_name(id)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_name_their_node_and_load() {
        let ca = generate_ca("t").expect("ca");
        let n1 = issue_node_cert("t", &ca.key_pem, NodeId(1)).expect("cert");
        let id = Identity::from_pem(NodeId(1), &ca.cert_pem, &n1).expect("identity");
        id.server_config().expect("server config");
        id.client_config().expect("client config");
        assert!(cert_names_node(&id.chain[0], NodeId(1)));
        assert!(!cert_names_node(&id.chain[0], NodeId(2)));
    }
}
