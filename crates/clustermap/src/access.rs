//! Who may reach what: the cluster's access policy, the principals the API and the host
//! protocols know, the credentials a host holds (recorded here by fingerprint and id, never the
//! secrets themselves in clear), and the one rule every host path applies, [`ClusterMap::may_open`].
//!
//! The rule is written once, here, so that NBD, iSCSI and the primary of a proxied request all
//! decide alike: an identified host reaches only the volumes connected to it (LUN masking);
//! an anonymous client reaches every volume under the `open` and `tls` policies and none
//! under `tls-required`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::key::ObjectKey;
use crate::map::ClusterMap;
use crate::{HostRecord, MetaReply, VolumeRecord};

/// The setting that holds the cluster's [`AccessPolicy`] (`tandem setting`-style; when unset,
/// each node uses its config's `security.access`).
pub const ACCESS_SETTING: &str = "access";

/// Length of a credential id in hex digits (128 random bits, chosen by the node that issues it).
pub const CREDENTIAL_ID_HEX: usize = 32;
/// Length of a SHA-256 fingerprint in hex digits.
pub const SHA256_HEX: usize = 64;
/// The longest CHAP user name (RFC 7143 lets it be an iSCSI name, 223 bytes).
pub const CHAP_USER_BYTES_MAX: usize = 223;
/// The longest sealed CHAP secret (nonce, up to 255 secret bytes, tag).
pub const SEALED_SECRET_BYTES_MAX: usize = 12 + 255 + 16;

/// How much a client must prove before it reaches a volume over a host protocol (for NBD, as
/// nbdkit's `--tls=off|on|require`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AccessPolicy {
    /// No TLS: NBD clients are anonymous and reach every volume. An iSCSI initiator whose name
    /// is a host's still reaches only that host's volumes.
    Open,
    /// TLS is offered and optional: a client that identifies as a host (a host certificate
    /// over TLS, a host's iSCSI name) reaches only its volumes; one that does not is anonymous
    /// and reaches every volume. The stage for moving hosts to certificates one by one, and
    /// `tandem up`'s default.
    #[default]
    Tls,
    /// Every client must identify as a host: NBD only over TLS with a host certificate
    /// (anything else gets `NBD_REP_ERR_TLS_REQD`), iSCSI only from a host's initiator name
    /// (with CHAP when the host has a secret). Nobody is anonymous.
    TlsRequired,
}

impl AccessPolicy {
    pub const ALL: [AccessPolicy; 3] = [AccessPolicy::Open, AccessPolicy::Tls, AccessPolicy::TlsRequired];

    pub fn as_str(self) -> &'static str {
        match self {
            AccessPolicy::Open => "open",
            AccessPolicy::Tls => "tls",
            AccessPolicy::TlsRequired => "tls-required",
        }
    }

    /// Whether a client that does not identify as a host may reach volumes at all.
    pub fn allows_anonymous(self) -> bool {
        self != AccessPolicy::TlsRequired
    }
}

impl fmt::Display for AccessPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AccessPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<AccessPolicy, String> {
        AccessPolicy::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("access policy {s:?} is not one of open, tls, tls-required"))
    }
}

/// Who a request or a connection comes from, once its credential was checked.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Principal {
    /// An operator: may do everything.
    Admin(String),
    /// A host: its own path map, probe reports and credentials over the API; its own volumes
    /// over NBD and iSCSI.
    Host(String),
    /// A client that did not identify (only host protocols, and only where the policy allows).
    Anonymous,
}

impl Principal {
    /// The role's name, as the API's errors and the audit log write it.
    pub fn role(&self) -> &'static str {
        match self {
            Principal::Admin(_) => "admin",
            Principal::Host(_) => "host",
            Principal::Anonymous => "anonymous",
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Admin(name) => write!(f, "admin:{name}"),
            Principal::Host(name) => write!(f, "host:{name}"),
            Principal::Anonymous => f.write_str("anonymous"),
        }
    }
}

/// The credential a host holds now: its id (carried by its API token) and the fingerprint of
/// its client certificate (what NBD over TLS identifies it by). Issuing a new one replaces
/// both, so the old certificate and token stop working once the change is committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCredential {
    /// 32 lower-case hex digits, random.
    pub id: String,
    /// SHA-256 of the certificate's DER, 64 lower-case hex digits.
    pub cert_sha256: String,
}

/// A host's CHAP settings as Raft stores them: the secrets sealed with the cluster secret
/// (AES-256-GCM), so that neither the log, the snapshots nor a listing holds them in clear.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedChap {
    /// The name the initiator gives as CHAP_N.
    pub user: String,
    pub secret: Vec<u8>,
    /// Mutual CHAP: the name and sealed secret the target answers with.
    pub target_user: Option<String>,
    pub target_secret: Option<Vec<u8>>,
}

/// Why a client may not open a volume. The message says what to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    NotFound(String),
    /// The client did not identify, and the policy wants it to.
    IdentityRequired(String),
    /// The host is known, and the volume is not connected to it.
    NotConnected(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotFound(m) | Refusal::IdentityRequired(m) | Refusal::NotConnected(m) => f.write_str(m),
        }
    }
}

/// Whether `s` is `len` lower-case hex digits (credential ids, fingerprints, MACs).
pub fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl ClusterMap {
    /// The access policy in force: the committed setting, else `default` (the node's config).
    pub fn access_policy(&self, default: AccessPolicy) -> AccessPolicy {
        self.settings.get(ACCESS_SETTING).and_then(|v| v.parse().ok()).unwrap_or(default)
    }

    /// The host whose client certificate has this fingerprint.
    pub fn host_by_cert(&self, cert_sha256: &str) -> Option<&HostRecord> {
        self.hosts.values().find(|h| h.credential.as_ref().is_some_and(|c| c.cert_sha256 == cert_sha256))
    }

    /// Whether `who` may open the volume named `volume` over a host protocol under `policy`.
    /// Admins are not host principals and reach volumes only as anonymous clients would.
    pub fn may_open(&self, policy: AccessPolicy, who: &Principal, volume: &str) -> Result<&VolumeRecord, Refusal> {
        let vol = self.volume_by_name(volume);
        match who {
            Principal::Host(name) => {
                let Some(host) = self.hosts.get(name) else {
                    return Err(Refusal::IdentityRequired(format!(
                        "host {name:?} is not known to the cluster (removed?)"
                    )));
                };
                match vol {
                    Some(v) if host.volumes.contains(&v.id) => Ok(v),
                    // Masked: a host learns nothing of volumes that are not its own.
                    _ => Err(Refusal::NotConnected(format!(
                        "volume {volume:?} is not connected to host {name:?} (tandem host connect {name} VOLUME)"
                    ))),
                }
            }
            Principal::Admin(_) | Principal::Anonymous if !policy.allows_anonymous() => {
                Err(Refusal::IdentityRequired(format!(
                    "the cluster's access policy is {policy}: identify as a host (a host certificate over TLS, \
                     or a host's iSCSI initiator name)"
                )))
            }
            Principal::Admin(_) | Principal::Anonymous => {
                vol.ok_or_else(|| Refusal::NotFound(format!("no volume named {volume:?}")))
            }
        }
    }

    /// The volumes `who` may see, by name, sorted: what `NBD_OPT_LIST`, iSCSI discovery and
    /// REPORT LUNS show it.
    pub fn visible_volumes(&self, policy: AccessPolicy, who: &Principal) -> Vec<String> {
        let mut names: Vec<String> = match who {
            Principal::Host(name) => match self.hosts.get(name) {
                Some(h) => h.volumes.iter().filter_map(|id| self.volumes.get(id)).map(|v| v.name.clone()).collect(),
                None => Vec::new(),
            },
            _ if !policy.allows_anonymous() => Vec::new(),
            _ => self.volumes.values().map(|v| v.name.clone()).collect(),
        };
        names.sort();
        names
    }

    pub(crate) fn set_host_credential(&mut self, host: &str, credential: HostCredential) -> MetaReply {
        if !is_lower_hex(&credential.id, CREDENTIAL_ID_HEX) {
            return MetaReply::Invalid(format!("a credential id is {CREDENTIAL_ID_HEX} lower-case hex digits"));
        }
        if !is_lower_hex(&credential.cert_sha256, SHA256_HEX) {
            return MetaReply::Invalid(format!("a certificate fingerprint is {SHA256_HEX} lower-case hex digits"));
        }
        if let Some(other) = self.host_by_cert(&credential.cert_sha256).filter(|h| h.name != host) {
            return MetaReply::Invalid(format!("that certificate already belongs to host {:?}", other.name));
        }
        let Some(rec) = self.hosts.get_mut(host) else {
            return MetaReply::NotFound(format!("no host named {host:?}"));
        };
        if rec.credential.as_ref() == Some(&credential) {
            return MetaReply::Done { changed: false };
        }
        rec.credential = Some(credential);
        self.touched.push(ObjectKey::Host(host.to_string()));
        MetaReply::Done { changed: true }
    }

    pub(crate) fn set_host_chap(&mut self, host: &str, chap: Option<SealedChap>) -> MetaReply {
        if let Some(c) = &chap {
            let users = std::iter::once(&c.user).chain(c.target_user.as_ref());
            if let Some(u) = users.into_iter().find(|u| u.is_empty() || u.len() > CHAP_USER_BYTES_MAX) {
                return MetaReply::Invalid(format!(
                    "a CHAP user name is 1 to {CHAP_USER_BYTES_MAX} bytes, not {}",
                    u.len()
                ));
            }
            let secrets = std::iter::once(&c.secret).chain(c.target_secret.as_ref());
            if secrets.into_iter().any(|s| s.len() > SEALED_SECRET_BYTES_MAX) {
                return MetaReply::Invalid("a sealed CHAP secret is too long".into());
            }
            if c.target_user.is_some() != c.target_secret.is_some() {
                return MetaReply::Invalid("mutual CHAP needs both a target user and a target secret".into());
            }
        }
        let Some(rec) = self.hosts.get_mut(host) else {
            return MetaReply::NotFound(format!("no host named {host:?}"));
        };
        if rec.chap == chap {
            return MetaReply::Done { changed: false };
        }
        rec.chap = chap;
        self.touched.push(ObjectKey::Host(host.to_string()));
        MetaReply::Done { changed: true }
    }
}
