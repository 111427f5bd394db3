//! The cluster secret and what it keys: API bearer tokens (HMAC-SHA256) and CHAP secrets sealed
//! for Raft (AES-256-GCM). Every node holds the same secret file (`security.secret` in the
//! config); it is as sensitive as a node's private key.
//!
//! A token reads `tdm1_<role>_<id>_<mac>_<name>`: role `a` (admin) or `h` (host), a 32-hex-digit
//! credential id, 64 hex digits of HMAC over the rest, and the principal's name (last, since
//! names may hold `_`). It proves who minted it (a holder of the secret) and for whom; a host's
//! token is valid only while its id is the host's current credential id in the cluster map,
//! so issuing new credentials revokes the old ones. Admin tokens are revoked by changing the
//! secret (docs/OPERATIONS.md, "Security").

use std::path::Path;

use ring::rand::{SecureRandom, SystemRandom};
use ring::{aead, digest, hmac};
use tandem_clustermap::access::{is_lower_hex, CREDENTIAL_ID_HEX};
use tandem_clustermap::{ClusterMap, Principal};
use tandem_types::validate_name;

/// Bytes of the cluster secret (written as hex in its file).
pub const SECRET_BYTES: usize = 32;
/// The longest token a request may carry; anything longer is refused unread.
pub const TOKEN_BYTES_MAX: usize = 512;
const TOKEN_PREFIX: &str = "tdm1";
const MAC_HEX: usize = 64;

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of lower- or upper-case hex text; `None` for anything else.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

/// SHA-256 of `bytes` in lower-case hex: a certificate's fingerprint.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, bytes).as_ref())
}

/// `n` random bytes from the system's generator.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    SystemRandom::new().fill(&mut out).expect("the system's random generator works");
    out
}

/// A new random credential id.
pub fn new_credential_id() -> String {
    hex(&random_bytes::<{ CREDENTIAL_ID_HEX / 2 }>())
}

/// Refuses a file holding a secret that others than its owner may read or write.
pub fn check_private_file(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{}: holds a secret but its mode is {mode:o}, open to others; chmod 600 it",
            path.display()
        ));
    }
    Ok(())
}

/// Why a bearer token was not accepted. Never says which part was wrong beyond the format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token is not valid for this cluster")]
    BadMac,
    #[error("the token was replaced by newer credentials, or its host was removed")]
    Revoked,
}

/// The cluster secret, loaded.
#[derive(Clone)]
pub struct ClusterSecret {
    token_key: hmac::Key,
    seal_key: [u8; 32],
    /// Keys the MAC of copy tokens (`copies.rs`).
    copy_key: hmac::Key,
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

/// A token's parts, parsed but not yet checked.
#[derive(Debug, PartialEq, Eq)]
struct TokenParts<'a> {
    admin: bool,
    id: &'a str,
    mac: &'a str,
    name: &'a str,
}

fn parse_token(token: &str) -> Result<TokenParts<'_>, TokenError> {
    if token.len() > TOKEN_BYTES_MAX {
        return Err(TokenError::Malformed);
    }
    let mut parts = token.splitn(5, '_');
    let (Some(TOKEN_PREFIX), Some(role), Some(id), Some(mac), Some(name)) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let admin = match role {
        "a" => true,
        "h" => false,
        _ => return Err(TokenError::Malformed),
    };
    if !is_lower_hex(id, CREDENTIAL_ID_HEX) || !is_lower_hex(mac, MAC_HEX) || validate_name(name).is_err() {
        return Err(TokenError::Malformed);
    }
    Ok(TokenParts { admin, id, mac, name })
}

impl ClusterSecret {
    /// A new random secret, as the text of its file.
    pub fn generate_file_text() -> String {
        format!("{}\n", hex(&random_bytes::<SECRET_BYTES>()))
    }

    /// Reads the secret file (hex, whitespace around it ignored), refusing one open to others.
    pub fn load(path: &Path) -> Result<ClusterSecret, String> {
        check_private_file(path)?;
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        ClusterSecret::from_text(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn from_text(text: &str) -> Result<ClusterSecret, String> {
        let bytes = unhex(text.trim())
            .filter(|b| b.len() == SECRET_BYTES)
            .ok_or_else(|| format!("a cluster secret is {} hex digits", SECRET_BYTES * 2))?;
        let master = hmac::Key::new(hmac::HMAC_SHA256, &bytes);
        let derive = |label: &str| hmac::sign(&master, label.as_bytes());
        let mut seal_key = [0u8; 32];
        seal_key.copy_from_slice(derive("tandem/seal-key/v1").as_ref());
        Ok(ClusterSecret {
            token_key: hmac::Key::new(hmac::HMAC_SHA256, derive("tandem/token-key/v1").as_ref()),
            seal_key,
            copy_key: hmac::Key::new(hmac::HMAC_SHA256, derive("tandem/copy-token-key/v1").as_ref()),
        })
    }

    fn mac_input(admin: bool, id: &str, name: &str) -> String {
        format!("{TOKEN_PREFIX}\0{}\0{id}\0{name}", if admin { "a" } else { "h" })
    }

    /// Mints a token for `principal` (an admin or a host) with credential id `id`.
    pub fn mint(&self, principal: &Principal, id: &str) -> Option<String> {
        let (admin, name) = match principal {
            Principal::Admin(n) => (true, n),
            Principal::Host(n) => (false, n),
            Principal::Anonymous => return None,
        };
        let mac = hex(hmac::sign(&self.token_key, Self::mac_input(admin, id, name).as_bytes()).as_ref());
        Some(format!("{TOKEN_PREFIX}_{}_{id}_{mac}_{name}", if admin { "a" } else { "h" }))
    }

    /// Checks a bearer token: minted with this secret, and for a host, still its current
    /// credential in `map`.
    pub fn verify(&self, token: &str, map: &ClusterMap) -> Result<Principal, TokenError> {
        let p = parse_token(token)?;
        let mac = unhex(p.mac).ok_or(TokenError::Malformed)?;
        hmac::verify(&self.token_key, Self::mac_input(p.admin, p.id, p.name).as_bytes(), &mac)
            .map_err(|_| TokenError::BadMac)?;
        if p.admin {
            return Ok(Principal::Admin(p.name.to_string()));
        }
        match map.hosts.get(p.name).and_then(|h| h.credential.as_ref()) {
            Some(c) if c.id == p.id => Ok(Principal::Host(p.name.to_string())),
            _ => Err(TokenError::Revoked),
        }
    }

    /// The HMAC-SHA256 of a copy token's covered bytes.
    pub fn copy_token_mac(&self, covered: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(hmac::sign(&self.copy_key, covered).as_ref());
        out
    }

    /// Whether `mac` is the MAC of a copy token's covered bytes (compared in constant time).
    pub fn verify_copy_token_mac(&self, covered: &[u8], mac: &[u8]) -> bool {
        hmac::verify(&self.copy_key, covered, mac).is_ok()
    }

    /// Seals `secret` for `host` (AES-256-GCM, random nonce, the host's name bound in): the
    /// form a CHAP secret takes in Raft.
    pub fn seal(&self, host: &str, secret: &[u8]) -> Vec<u8> {
        let key =
            aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, &self.seal_key).expect("32-byte key"));
        let nonce = random_bytes::<{ aead::NONCE_LEN }>();
        let mut out = secret.to_vec();
        key.seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(host.as_bytes()),
            &mut out,
        )
        .expect("sealing a short secret works");
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&out);
        sealed
    }

    /// Opens what [`ClusterSecret::seal`] sealed for `host`; `None` if it was sealed for another
    /// host, with another secret, or altered.
    pub fn open(&self, host: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < aead::NONCE_LEN + aead::AES_256_GCM.tag_len() {
            return None;
        }
        let key = aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, &self.seal_key).ok()?);
        let (nonce, body) = sealed.split_at(aead::NONCE_LEN);
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = body.to_vec();
        let plain = key.open_in_place(nonce, aead::Aad::from(host.as_bytes()), &mut buf).ok()?;
        Some(plain.to_vec())
    }
}

/// The `Authorization` header's bearer token, if it has one.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tandem_clustermap::{HostCredential, MetaCmd};

    fn secret() -> ClusterSecret {
        ClusterSecret::from_text(&ClusterSecret::generate_file_text()).unwrap()
    }

    fn map_with_host(id: &str) -> ClusterMap {
        let mut map = ClusterMap::default();
        map.apply(MetaCmd::AddHost { name: "esx_1".into(), site: "s".into(), iqns: vec![] });
        let credential = HostCredential { id: id.into(), cert_sha256: "c".repeat(64) };
        map.apply(MetaCmd::SetHostCredential { host: "esx_1".into(), credential });
        map
    }

    #[test]
    fn tokens_verify_for_their_principal_and_only_with_their_secret() {
        let s = secret();
        let id = new_credential_id();
        let map = map_with_host(&id);
        let admin = s.mint(&Principal::Admin("ops".into()), &id).unwrap();
        assert_eq!(s.verify(&admin, &map), Ok(Principal::Admin("ops".into())));
        let host = s.mint(&Principal::Host("esx_1".into()), &id).unwrap();
        assert_eq!(s.verify(&host, &map), Ok(Principal::Host("esx_1".into())));
        assert_eq!(secret().verify(&host, &map), Err(TokenError::BadMac));
        // A new credential revokes the token of the old one.
        assert_eq!(s.verify(&host, &map_with_host(&new_credential_id())), Err(TokenError::Revoked));
        assert_eq!(s.verify(&host, &ClusterMap::default()), Err(TokenError::Revoked));
        // Changing the role, the name or the id breaks the MAC.
        let forged = host.replacen("_h_", "_a_", 1);
        assert_eq!(s.verify(&forged, &map), Err(TokenError::BadMac));
        let renamed = format!("{}x", host);
        assert_eq!(s.verify(&renamed, &map), Err(TokenError::BadMac));
        assert_eq!(s.mint(&Principal::Anonymous, &id), None);
    }

    #[test]
    fn sealed_secrets_open_only_for_their_host_and_secret() {
        let s = secret();
        let sealed = s.seal("h1", b"twelve bytes!");
        assert!(!sealed.windows(12).any(|w| w == b"twelve bytes"));
        assert_eq!(s.open("h1", &sealed).as_deref(), Some(&b"twelve bytes!"[..]));
        assert_eq!(s.open("h2", &sealed), None);
        assert_eq!(secret().open("h1", &sealed), None);
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert_eq!(s.open("h1", &altered), None);
        assert_eq!(s.open("h1", &sealed[..10]), None);
    }

    #[test]
    fn secret_files_open_to_others_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.secret");
        std::fs::write(&path, ClusterSecret::generate_file_text()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = ClusterSecret::load(&path).unwrap_err();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(ClusterSecret::load(&path).is_ok());
        std::fs::write(&path, "not hex").unwrap();
        assert!(ClusterSecret::load(&path).unwrap_err().contains("hex digits"));
    }

    #[test]
    fn bearer_headers_parse() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearer"), None);
    }

    proptest! {
        /// The token parser never panics and accepts nothing that was not minted.
        #[test]
        fn arbitrary_tokens_are_refused_without_panicking(token in ".{0,600}", tail in "[a-z0-9_]{0,80}") {
            let s = secret();
            let map = ClusterMap::default();
            prop_assert!(s.verify(&token, &map).is_err());
            let shaped = format!("tdm1_a_{}_{}_{}", "0".repeat(32), "1".repeat(64), tail);
            prop_assert!(s.verify(&shaped, &map).is_err());
            let _ = bearer(&token);
        }
    }
}
