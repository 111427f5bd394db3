//! CHAP (RFC 1994) as iSCSI runs it in the security stage of a login (RFC 7143 §12.1.3), target
//! side: one-way (the initiator proves it knows its secret) and mutual (the target then proves it
//! knows its own), as an [`Authenticator`] for [`crate::login::LoginMachine`].
//!
//! Pure: no I/O, no clock and no randomness of its own. The challenge and its identifier are
//! constructor arguments (the server draws them from the system's random source for every
//! connection), and the credentials come from a lookup by initiator name.
//!
//! The exchange, one Login Request and its response a line:
//! 1. `AuthMethod=CHAP,None` → `AuthMethod=CHAP`.
//! 2. `CHAP_A=<algorithms>` → `CHAP_A=<the first we support>`, `CHAP_I=<identifier>`,
//!    `CHAP_C=0x<challenge>`.
//! 3. `CHAP_N=<user>`, `CHAP_R=<response>`, and for mutual CHAP `CHAP_I` and `CHAP_C` of the
//!    initiator's own → nothing, or for mutual CHAP `CHAP_N=<target user>` and
//!    `CHAP_R=<the target's response>`.
//!
//! A response is H(identifier || secret || challenge), H being MD5 for `CHAP_A=5` (every
//! initiator has it) or SHA-256 for `CHAP_A=7`. The target checks the initiator's response
//! before it answers a mutual challenge, so it answers nobody who has not proved who it is.
//!
//! Policy, per initiator name: one with [`ChapCredentials`] must use CHAP (`AuthMethod=None`,
//! or skipping the security stage, fails with 0x0201 "Authentication failure"). One without is
//! refused when CHAP is required, and otherwise offered only `AuthMethod=None`, so its CHAP
//! attempt fails.

use std::fmt;

use md5::{Digest, Md5};

use crate::login::{AuthStatus, Authentication, Authenticator};
use crate::text::{list_items, parse_number, TextPair, VALUE_BYTES_MAX};

/// Shortest secret: RFC 7143 §12.1.3 recommends at least 96 bits, as some initiators
/// (open-iscsi among them) require.
pub const SECRET_BYTES_MIN: usize = 12;
/// Longest secret: what initiators accept (open-iscsi, Linux's target); it also bounds the hashing.
pub const SECRET_BYTES_MAX: usize = 255;
/// Shortest challenge the target sends: 128 bits, the size of an MD5 response, so that a
/// challenge never repeats in practice.
pub const CHALLENGE_BYTES_MIN: usize = 16;
/// Longest binary value (CHAP_C, CHAP_R) taken from an initiator or sent: RFC 7143 §12.1.3
/// lets a challenge reach 1024 bytes.
pub const CHAP_VALUE_BYTES_MAX: usize = 1024;

const CHAP: &str = "CHAP";
const NONE: &str = "None";

/// A hash CHAP can run with, by its CHAP_A number (the IANA PPP authentication algorithms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChapAlgorithm {
    /// CHAP_A=5, the one RFC 7143 requires and libiscsi knows.
    Md5,
    /// CHAP_A=7, offered first by recent open-iscsi and Linux targets.
    Sha256,
}

impl ChapAlgorithm {
    pub fn from_code(code: u64) -> Option<ChapAlgorithm> {
        match code {
            5 => Some(ChapAlgorithm::Md5),
            7 => Some(ChapAlgorithm::Sha256),
            _ => None,
        }
    }

    pub fn code(self) -> u8 {
        match self {
            ChapAlgorithm::Md5 => 5,
            ChapAlgorithm::Sha256 => 7,
        }
    }

    /// Bytes of a response.
    pub fn response_bytes(self) -> usize {
        match self {
            ChapAlgorithm::Md5 => 16,
            ChapAlgorithm::Sha256 => 32,
        }
    }

    /// The response to `challenge` sent with `identifier` by whoever knows `secret`:
    /// H(identifier || secret || challenge) (RFC 1994 §4.1).
    pub fn response(self, identifier: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
        match self {
            ChapAlgorithm::Md5 => {
                let mut md5 = Md5::new();
                md5.update([identifier]);
                md5.update(secret);
                md5.update(challenge);
                md5.finalize().to_vec()
            }
            ChapAlgorithm::Sha256 => {
                let mut sha256 = ring::digest::Context::new(&ring::digest::SHA256);
                sha256.update(&[identifier]);
                sha256.update(secret);
                sha256.update(challenge);
                sha256.finish().as_ref().to_vec()
            }
        }
    }
}

/// One initiator's CHAP credentials, as the node configures them (check them with
/// [`ChapCredentials::validate`] then). `Debug` does not show the secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct ChapCredentials {
    /// The name the initiator must send in CHAP_N.
    pub user: String,
    /// The secret the initiator proves it knows.
    pub secret: Vec<u8>,
    /// For mutual CHAP: the target's user name (sent in CHAP_N) and secret, with which the
    /// target answers the initiator's challenge. `None` refuses an initiator that asks the
    /// target to authenticate itself.
    pub mutual: Option<(String, Vec<u8>)>,
}

impl ChapCredentials {
    /// Whether these credentials can be used: user names of 1 to 255 bytes without NUL
    /// (they travel as text values), secrets that [`validate_chap_secret`] accepts, and a
    /// target secret other than the initiator's (RFC 7143 §12.1.3: a secret that authenticates
    /// initiators must not authenticate a target, or the target's answers would serve as an
    /// initiator's).
    pub fn validate(&self) -> Result<(), String> {
        validate_user(&self.user).map_err(|err| format!("CHAP user: {err}"))?;
        validate_chap_secret(&self.secret).map_err(|err| format!("CHAP secret: {err}"))?;
        if let Some((target_user, target_secret)) = &self.mutual {
            validate_user(target_user).map_err(|err| format!("mutual CHAP target user: {err}"))?;
            validate_chap_secret(target_secret).map_err(|err| format!("mutual CHAP target secret: {err}"))?;
            if *target_secret == self.secret {
                return Err("the mutual CHAP target secret is the initiator's secret".into());
            }
        }
        Ok(())
    }
}

impl fmt::Debug for ChapCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChapCredentials")
            .field("user", &self.user)
            .field("secret", &format_args!("<{} bytes>", self.secret.len()))
            .field("mutual", &self.mutual.as_ref().map(|(user, _)| user))
            .finish()
    }
}

/// Whether `secret` can be a CHAP secret: [`SECRET_BYTES_MIN`] to [`SECRET_BYTES_MAX`] bytes.
/// For the node, when it takes a secret into its configuration.
pub fn validate_chap_secret(secret: &[u8]) -> Result<(), String> {
    if secret.len() < SECRET_BYTES_MIN {
        return Err(format!(
            "{} bytes is too short: at least {SECRET_BYTES_MIN} (96 bits, RFC 7143 §12.1.3)",
            secret.len()
        ));
    }
    if secret.len() > SECRET_BYTES_MAX {
        return Err(format!("{} bytes is too long: at most {SECRET_BYTES_MAX}", secret.len()));
    }
    Ok(())
}

fn validate_user(user: &str) -> Result<(), String> {
    if user.is_empty() || user.len() > VALUE_BYTES_MAX || user.contains('\0') {
        return Err(format!("{user:?} is not 1 to {VALUE_BYTES_MAX} bytes without NUL"));
    }
    Ok(())
}

/// Where the exchange of one login stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// CHAP was chosen; CHAP_A comes next.
    Algorithm,
    /// The challenge went out, to be answered with this algorithm.
    Response(ChapAlgorithm),
    /// Succeeded or failed; nothing more is taken.
    Over,
}

/// The target side of CHAP for one login. `L` looks up an initiator's credentials by its
/// InitiatorName: `None` when it has none.
pub struct Chap<L> {
    credentials: L,
    required: bool,
    identifier: u8,
    challenge: Vec<u8>,
    step: Step,
}

impl<L> Chap<L>
where
    L: Fn(&str) -> Option<ChapCredentials>,
{
    /// `required`: whether an initiator without credentials is refused (else it logs in with
    /// `AuthMethod=None`). `identifier` and `challenge` are sent in CHAP_I and CHAP_C: draw them
    /// at random for every login, so that a recorded response is worth nothing.
    ///
    /// Panics if the challenge is shorter than [`CHALLENGE_BYTES_MIN`] or longer than
    /// [`CHAP_VALUE_BYTES_MAX`]: the caller makes it.
    pub fn new(credentials: L, required: bool, identifier: u8, challenge: Vec<u8>) -> Self {
        assert!(
            (CHALLENGE_BYTES_MIN..=CHAP_VALUE_BYTES_MAX).contains(&challenge.len()),
            "a CHAP challenge of {} bytes",
            challenge.len()
        );
        Chap { credentials, required, identifier, challenge, step: Step::Algorithm }
    }

    /// CHAP_A: pick the initiator's first algorithm we support and send the challenge.
    fn on_algorithm(&mut self, keys: &[TextPair], reply: &mut Vec<TextPair>) -> AuthStatus {
        match keys {
            // The request that chose CHAP; CHAP_A comes with the next one.
            [] => AuthStatus::InProgress,
            [pair] if pair.key == "CHAP_A" => {
                let chosen =
                    list_items(&pair.value).find_map(|item| parse_number(item).ok().and_then(ChapAlgorithm::from_code));
                let Some(algorithm) = chosen else { return AuthStatus::Failed };
                reply.push(TextPair::new("CHAP_A", algorithm.code().to_string()));
                reply.push(TextPair::new("CHAP_I", self.identifier.to_string()));
                reply.push(TextPair::new("CHAP_C", encode_hex(&self.challenge)));
                self.step = Step::Response(algorithm);
                AuthStatus::InProgress
            }
            _ => AuthStatus::Failed,
        }
    }

    /// CHAP_N and CHAP_R, with CHAP_I and CHAP_C when the initiator wants the target to
    /// authenticate itself too.
    fn on_response(
        &self,
        algorithm: ChapAlgorithm,
        initiator_name: &str,
        keys: &[TextPair],
        reply: &mut Vec<TextPair>,
    ) -> AuthStatus {
        let (mut user, mut response, mut identifier, mut challenge) = (None, None, None, None);
        for pair in keys {
            let slot = match pair.key.as_str() {
                "CHAP_N" => &mut user,
                "CHAP_R" => &mut response,
                "CHAP_I" => &mut identifier,
                "CHAP_C" => &mut challenge,
                _ => return AuthStatus::Failed,
            };
            *slot = Some(pair.value.as_str());
        }
        let (Some(user), Some(response)) = (user, response) else { return AuthStatus::Failed };
        // Bad credentials from the node refuse the login rather than reach the wire.
        let Some(credentials) = (self.credentials)(initiator_name) else { return AuthStatus::Failed };
        if credentials.validate().is_err() || user != credentials.user {
            return AuthStatus::Failed;
        }
        let Some(response) = decode_binary(response, algorithm.response_bytes()) else { return AuthStatus::Failed };
        let expected = algorithm.response(self.identifier, &credentials.secret, &self.challenge);
        if !constant_time_eq(&response, &expected) {
            return AuthStatus::Failed;
        }
        let (identifier, challenge) = match (identifier, challenge) {
            (None, None) => {
                return AuthStatus::Succeeded(Authentication::Chap { user: credentials.user, mutual: false })
            }
            (Some(identifier), Some(challenge)) => (identifier, challenge),
            _ => return AuthStatus::Failed,
        };
        let Some((target_user, target_secret)) = &credentials.mutual else { return AuthStatus::Failed };
        let Some(identifier) = parse_number(identifier).ok().and_then(|i| u8::try_from(i).ok()) else {
            return AuthStatus::Failed;
        };
        let Some(challenge) = decode_binary(challenge, CHAP_VALUE_BYTES_MAX) else { return AuthStatus::Failed };
        // RFC 7143 §12.1.3: our own challenge sent back is a reflection attack, a way to have
        // the target compute the answer it expects.
        if challenge == self.challenge {
            return AuthStatus::Failed;
        }
        reply.push(TextPair::new("CHAP_N", target_user.clone()));
        reply.push(TextPair::new("CHAP_R", encode_hex(&algorithm.response(identifier, target_secret, &challenge))));
        AuthStatus::Succeeded(Authentication::Chap { user: credentials.user, mutual: true })
    }
}

impl<L> Authenticator for Chap<L>
where
    L: Fn(&str) -> Option<ChapCredentials>,
{
    fn methods(&self, initiator_name: &str) -> &[&'static str] {
        if self.required || (self.credentials)(initiator_name).is_some() {
            &[CHAP]
        } else {
            &[NONE]
        }
    }

    fn owns_key(&self, key: &str) -> bool {
        key.starts_with("CHAP_")
    }

    fn on_keys(
        &mut self,
        method: &str,
        initiator_name: &str,
        _target_name: Option<&str>,
        keys: &[TextPair],
        reply: &mut Vec<TextPair>,
    ) -> AuthStatus {
        let status = match (method, self.step) {
            (CHAP, Step::Algorithm) => self.on_algorithm(keys, reply),
            (CHAP, Step::Response(algorithm)) => self.on_response(algorithm, initiator_name, keys, reply),
            _ => AuthStatus::Failed,
        };
        if status != AuthStatus::InProgress {
            self.step = Step::Over;
        }
        status
    }
}

impl<L> fmt::Debug for Chap<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chap")
            .field("required", &self.required)
            .field("identifier", &self.identifier)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

/// Compares in a time that depends on the lengths only, so that how long a wrong response takes
/// to refuse tells nothing of how much of it was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// A binary value as `0x` and lowercase hex digits.
pub fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 + 2 * bytes.len());
    out.push_str("0x");
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

/// A binary value (RFC 7143 §6.1): `0x` or `0X` then hex digits, or `0b` or `0B` then base64
/// (RFC 4648, padded). `None` when it is malformed, empty, or longer than `bytes_max`, which is
/// checked before anything is allocated.
pub fn decode_binary(value: &str, bytes_max: usize) -> Option<Vec<u8>> {
    let value = value.as_bytes();
    if value.len() < 2 {
        return None;
    }
    let (prefix, body) = value.split_at(2);
    match prefix {
        b"0x" | b"0X" => decode_hex(body, bytes_max),
        b"0b" | b"0B" => decode_base64(body, bytes_max),
        _ => None,
    }
}

/// `n` hex digits are (n + 1) / 2 bytes: an odd count has an implied leading zero.
fn decode_hex(digits: &[u8], bytes_max: usize) -> Option<Vec<u8>> {
    let bytes = digits.len().div_ceil(2);
    if bytes == 0 || bytes > bytes_max {
        return None;
    }
    let mut out = Vec::with_capacity(bytes);
    let (head, pairs) = digits.split_at(digits.len() % 2);
    if let Some(&digit) = head.first() {
        out.push(hex_digit(digit)?);
    }
    for pair in pairs.chunks_exact(2) {
        out.push(hex_digit(pair[0])? << 4 | hex_digit(pair[1])?);
    }
    Some(out)
}

fn hex_digit(digit: u8) -> Option<u8> {
    char::from(digit).to_digit(16).map(|d| d as u8)
}

fn decode_base64(chars: &[u8], bytes_max: usize) -> Option<Vec<u8>> {
    if chars.is_empty() || chars.len() % 4 != 0 {
        return None;
    }
    let padding = chars.iter().rev().take_while(|&&c| c == b'=').count();
    if padding > 2 {
        return None;
    }
    let data = &chars[..chars.len() - padding];
    let bytes = data.len() * 6 / 8;
    if bytes > bytes_max {
        return None;
    }
    let mut out = Vec::with_capacity(bytes);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in data {
        acc = acc << 6 | u32::from(base64_sextet(c)?);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // The bits left over are padding, zero in a canonical encoding (RFC 4648 §3.5).
    (acc == 0).then_some(out)
}

fn base64_sextet(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU16;
    use std::sync::Arc;

    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;
    use crate::login::{LoginHooks, LoginMachine, LoginOutcome, TargetConfig};
    use crate::pdu::{Isid, LoginRequest, LoginResponse, LoginStatus, Stage};
    use crate::text::{encode_pair, encode_text, parse_text};

    const INITIATOR: &str = "iqn.2026-01.io.tandem:host1";
    const STRANGER: &str = "iqn.2026-01.io.tandem:host2";
    const TARGET: &str = "iqn.2026-01.io.tandem:vol1";
    const USER: &str = "alice";
    const SECRET: &[u8] = b"initiator-secret";
    const TARGET_USER: &str = "tandem-target";
    const TARGET_SECRET: &[u8] = b"target-secret-99";
    const IDENTIFIER: u8 = 42;
    /// The target's challenge: bytes 0x00..=0x0f.
    const CHALLENGE_HEX: &str = "0x000102030405060708090a0b0c0d0e0f";
    /// MD5(42 || SECRET || challenge), computed apart: Python's
    /// `hashlib.md5(bytes([42]) + b"initiator-secret" + bytes(range(16))).hexdigest()`.
    const RESPONSE_MD5: &str = "0x146466a8b34b56526e0619fa9872f517";
    /// The same with `hashlib.sha256`.
    const RESPONSE_SHA256: &str = "0xc44227375bb64ad56d55fa56b9b06a4a43eff4f90ddc9a38d36491a68a948df6";
    /// RESPONSE_MD5 in base64.
    const RESPONSE_MD5_BASE64: &str = "0bFGRmqLNLVlJuBhn6mHL1Fw==";
    /// The initiator's challenge for mutual CHAP: bytes 0xa0..=0xbf, sent with identifier 1.
    const INITIATOR_CHALLENGE_HEX: &str = "0xa0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf";
    const INITIATOR_CHALLENGE_BASE64: &str = "0boKGio6SlpqeoqaqrrK2ur7CxsrO0tba3uLm6u7y9vr8=";
    /// MD5(1 || TARGET_SECRET || initiator's challenge), computed apart with hashlib.
    const TARGET_RESPONSE_MD5: &str = "0xe8a31780ab232aff14114504a0b54271";
    const TARGET_RESPONSE_SHA256: &str = "0x7eb67dd982adf6233f7d63ec8874011473ab5d528b8978c7a958e58e47e4d8d7";

    fn challenge() -> Vec<u8> {
        (0..16).collect()
    }

    fn one_way() -> ChapCredentials {
        ChapCredentials { user: USER.into(), secret: SECRET.to_vec(), mutual: None }
    }

    fn mutual() -> ChapCredentials {
        ChapCredentials { mutual: Some((TARGET_USER.into(), TARGET_SECRET.to_vec())), ..one_way() }
    }

    type Lookup = Box<dyn Fn(&str) -> Option<ChapCredentials>>;

    /// CHAP for INITIATOR with `credentials`; STRANGER has none.
    fn chap(credentials: ChapCredentials, required: bool) -> Chap<Lookup> {
        let lookup: Lookup = Box::new(move |name| (name == INITIATOR).then(|| credentials.clone()));
        Chap::new(lookup, required, IDENTIFIER, challenge())
    }

    struct Hooks;

    impl LoginHooks for Hooks {
        fn target_known(&self, target_name: &str) -> bool {
            target_name == TARGET
        }

        fn initiator_allowed(&self, _: &str, _: &str) -> bool {
            true
        }

        fn allocate_tsih(&mut self, _: &str, _: Isid) -> Option<NonZeroU16> {
            NonZeroU16::new(1)
        }
    }

    /// A login of `initiator` through the machine, one request at a time.
    struct Login {
        machine: LoginMachine<Chap<Lookup>>,
        initiator: &'static str,
        first: bool,
    }

    impl Login {
        fn new(auth: Chap<Lookup>, initiator: &'static str) -> Self {
            Login { machine: LoginMachine::new(Arc::new(TargetConfig::default()), auth, 1), initiator, first: true }
        }

        /// Sends `pairs` (after the leading keys, on the first request) and returns the answer.
        fn send(&mut self, current: Stage, next: Option<Stage>, pairs: &[(&str, &str)]) -> LoginResponse {
            let mut data = Vec::new();
            if std::mem::take(&mut self.first) {
                for (key, value) in
                    [("InitiatorName", self.initiator), ("TargetName", TARGET), ("SessionType", "Normal")]
                {
                    encode_pair(&mut data, key, value);
                }
            }
            for (key, value) in pairs {
                encode_pair(&mut data, key, value);
            }
            let request = LoginRequest {
                next_stage: next,
                continues: false,
                current_stage: current,
                version_max: 0,
                version_min: 0,
                isid: Isid([0x80, 0, 0, 0, 0, 1]),
                tsih: 0,
                itt: 1,
                cid: 0,
                cmd_sn: 1,
                exp_stat_sn: 0,
                data: Bytes::from(data),
            };
            self.machine.on_request(&request, &mut Hooks)
        }

        fn security(&mut self, pairs: &[(&str, &str)]) -> LoginResponse {
            self.send(Stage::SecurityNegotiation, Some(Stage::LoginOperationalNegotiation), pairs)
        }

        /// Ends the login through the operational stage; the session's authentication.
        fn finish(mut self) -> Authentication {
            let r = self.send(Stage::LoginOperationalNegotiation, Some(Stage::FullFeaturePhase), &[]);
            assert_eq!((r.status, r.next_stage), (LoginStatus::SUCCESS, Some(Stage::FullFeaturePhase)));
            self.machine.into_session_params().expect("complete").authentication
        }

        fn failed(&self) -> bool {
            self.machine.outcome() == &LoginOutcome::Failed(LoginStatus::AUTHENTICATION_FAILURE)
        }
    }

    fn answers(response: &LoginResponse) -> Vec<(String, String)> {
        parse_text(&response.data).unwrap().into_iter().map(|p| (p.key, p.value)).collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// The first two steps, as libiscsi and open-iscsi send them: AuthMethod, then CHAP_A.
    fn challenged(auth: Chap<Lookup>, algorithms: &str) -> (Login, LoginResponse) {
        let mut login = Login::new(auth, INITIATOR);
        let r = login.security(&[("AuthMethod", "CHAP,None")]);
        assert_eq!((r.status, r.next_stage), (LoginStatus::SUCCESS, None));
        assert_eq!(answers(&r), pairs(&[("AuthMethod", "CHAP"), ("TargetPortalGroupTag", "1")]));
        let r = login.send(Stage::SecurityNegotiation, None, &[("CHAP_A", algorithms)]);
        (login, r)
    }

    #[test]
    fn known_answers() {
        let hex = |value: &str| decode_binary(value, 64).unwrap();
        assert_eq!(ChapAlgorithm::Md5.response(IDENTIFIER, SECRET, &challenge()), hex(RESPONSE_MD5));
        assert_eq!(ChapAlgorithm::Sha256.response(IDENTIFIER, SECRET, &challenge()), hex(RESPONSE_SHA256));
        let initiator_challenge = hex(INITIATOR_CHALLENGE_HEX);
        assert_eq!(ChapAlgorithm::Md5.response(1, TARGET_SECRET, &initiator_challenge), hex(TARGET_RESPONSE_MD5));
        assert_eq!(ChapAlgorithm::Sha256.response(1, TARGET_SECRET, &initiator_challenge), hex(TARGET_RESPONSE_SHA256));
        assert_eq!(encode_hex(&challenge()), CHALLENGE_HEX);
    }

    #[test]
    fn one_way_chap_login() {
        let (mut login, r) = challenged(chap(one_way(), false), "5");
        assert_eq!((r.status, r.next_stage), (LoginStatus::SUCCESS, None));
        assert_eq!(answers(&r), pairs(&[("CHAP_A", "5"), ("CHAP_I", "42"), ("CHAP_C", CHALLENGE_HEX)]));
        let r = login.security(&[("CHAP_N", USER), ("CHAP_R", RESPONSE_MD5)]);
        assert_eq!((r.status, r.next_stage), (LoginStatus::SUCCESS, Some(Stage::LoginOperationalNegotiation)));
        assert!(answers(&r).is_empty(), "one-way: the target says nothing of itself");
        assert_eq!(login.finish(), Authentication::Chap { user: USER.into(), mutual: false });

        // The response in base64 and upper case hex, and a CHAP_R that waits for a later
        // request to leave the stage.
        let upper = RESPONSE_MD5.to_uppercase().replacen("0X", "0x", 1);
        for response in [RESPONSE_MD5_BASE64, upper.as_str()] {
            let (mut login, _) = challenged(chap(one_way(), true), "5");
            let r = login.send(Stage::SecurityNegotiation, None, &[("CHAP_N", USER), ("CHAP_R", response)]);
            assert_eq!((r.status, r.next_stage), (LoginStatus::SUCCESS, None), "{response}");
            let r = login.security(&[]);
            assert_eq!(r.next_stage, Some(Stage::LoginOperationalNegotiation));
            assert_eq!(login.finish(), Authentication::Chap { user: USER.into(), mutual: false });
        }
    }

    #[test]
    fn sha256_when_the_initiator_lists_it_first() {
        let (mut login, r) = challenged(chap(one_way(), false), "7,5");
        assert_eq!(answers(&r)[0], ("CHAP_A".to_string(), "7".to_string()));
        let r = login.security(&[("CHAP_N", USER), ("CHAP_R", RESPONSE_SHA256)]);
        assert_eq!(r.next_stage, Some(Stage::LoginOperationalNegotiation));

        // The initiator's order decides; unknown and unsupported algorithms are passed over.
        let (_, r) = challenged(chap(one_way(), false), "6,x,5,7");
        assert_eq!(answers(&r)[0], ("CHAP_A".to_string(), "5".to_string()));
        // An MD5 response to a SHA-256 exchange is wrong.
        let (mut login, _) = challenged(chap(one_way(), false), "7");
        login.security(&[("CHAP_N", USER), ("CHAP_R", RESPONSE_MD5)]);
        assert!(login.failed());
        // Nothing we support: refused.
        let (login, r) = challenged(chap(one_way(), false), "6,128");
        assert_eq!(r.status, LoginStatus::AUTHENTICATION_FAILURE);
        assert!(login.failed());
    }

    #[test]
    fn a_wrong_secret_or_user_fails() {
        let wrong_secret = ChapAlgorithm::Md5.response(IDENTIFIER, b"initiator-secreT", &challenge());
        let cases = [
            (USER, encode_hex(&wrong_secret)),
            ("bob", RESPONSE_MD5.to_string()),
            (USER, RESPONSE_MD5[..RESPONSE_MD5.len() - 2].to_string()),
            (USER, format!("{RESPONSE_MD5}00")),
            ("", RESPONSE_MD5.to_string()),
        ];
        for (user, response) in cases {
            let (mut login, _) = challenged(chap(one_way(), false), "5");
            let r = login.security(&[("CHAP_N", user), ("CHAP_R", &response)]);
            assert_eq!(r.status, LoginStatus::AUTHENTICATION_FAILURE, "{user} {response}");
            assert!(r.data.is_empty());
            assert!(login.failed());
        }
    }

    #[test]
    fn mutual_chap_login() {
        for (challenge, algorithms, answer) in [
            (INITIATOR_CHALLENGE_HEX, "5", TARGET_RESPONSE_MD5),
            (INITIATOR_CHALLENGE_BASE64, "5", TARGET_RESPONSE_MD5),
            (INITIATOR_CHALLENGE_HEX, "7", TARGET_RESPONSE_SHA256),
        ] {
            let (mut login, _) = challenged(chap(mutual(), false), algorithms);
            let response = if algorithms == "5" { RESPONSE_MD5 } else { RESPONSE_SHA256 };
            let r = login.security(&[("CHAP_N", USER), ("CHAP_R", response), ("CHAP_I", "1"), ("CHAP_C", challenge)]);
            assert_eq!((r.status, r.next_stage), (LoginStatus::SUCCESS, Some(Stage::LoginOperationalNegotiation)));
            assert_eq!(answers(&r), pairs(&[("CHAP_N", TARGET_USER), ("CHAP_R", answer)]));
            assert_eq!(login.finish(), Authentication::Chap { user: USER.into(), mutual: true });
        }

        // Target credentials configured, but the initiator does not ask: one-way.
        let (mut login, _) = challenged(chap(mutual(), false), "5");
        let r = login.security(&[("CHAP_N", USER), ("CHAP_R", RESPONSE_MD5)]);
        assert!(answers(&r).is_empty());
        assert_eq!(login.finish(), Authentication::Chap { user: USER.into(), mutual: false });
    }

    #[test]
    fn mutual_chap_refusals() {
        let cases: [(ChapCredentials, &[(&str, &str)]); 7] = [
            // Our own challenge reflected.
            (mutual(), &[("CHAP_I", "42"), ("CHAP_C", CHALLENGE_HEX)]),
            (mutual(), &[("CHAP_I", "7"), ("CHAP_C", "0bAAECAwQFBgcICQoLDA0ODw==")]),
            // No target credentials for this initiator.
            (one_way(), &[("CHAP_I", "1"), ("CHAP_C", INITIATOR_CHALLENGE_HEX)]),
            // Half a challenge.
            (mutual(), &[("CHAP_I", "1")]),
            (mutual(), &[("CHAP_C", INITIATOR_CHALLENGE_HEX)]),
            // An identifier that is not one octet, a challenge that is not binary.
            (mutual(), &[("CHAP_I", "256"), ("CHAP_C", INITIATOR_CHALLENGE_HEX)]),
            (mutual(), &[("CHAP_I", "1"), ("CHAP_C", "a0a1a2a3")]),
        ];
        for (credentials, extra) in cases {
            let (mut login, _) = challenged(chap(credentials, false), "5");
            let mut keys = vec![("CHAP_N", USER), ("CHAP_R", RESPONSE_MD5)];
            keys.extend_from_slice(extra);
            let r = login.security(&keys);
            assert_eq!(r.status, LoginStatus::AUTHENTICATION_FAILURE, "{extra:?}");
            assert!(r.data.is_empty(), "no target response leaks: {extra:?}");
        }

        // A wrong initiator response is refused before the target answers anything.
        let (mut login, _) = challenged(chap(mutual(), false), "5");
        let r = login.security(&[
            ("CHAP_N", USER),
            ("CHAP_R", "0x00000000000000000000000000000000"),
            ("CHAP_I", "1"),
            ("CHAP_C", INITIATOR_CHALLENGE_HEX),
        ]);
        assert_eq!((r.status, r.data.len()), (LoginStatus::AUTHENTICATION_FAILURE, 0));
    }

    #[test]
    fn malformed_binary_values() {
        assert_eq!(decode_binary("0x0102", 2), Some(vec![1, 2]));
        assert_eq!(decode_binary("0XaBc", 2), Some(vec![0x0a, 0xbc]), "an odd count has a leading zero");
        assert_eq!(decode_binary("0x1", 1), Some(vec![1]));
        assert_eq!(decode_binary("0bAQI=", 2), Some(vec![1, 2]));
        assert_eq!(decode_binary("0BAQID", 3), Some(vec![1, 2, 3]));
        assert_eq!(decode_binary("0bAQ==", 1), Some(vec![1]));
        let longest = format!("0x{}", "ab".repeat(CHAP_VALUE_BYTES_MAX));
        assert_eq!(decode_binary(&longest, CHAP_VALUE_BYTES_MAX).map(|v| v.len()), Some(CHAP_VALUE_BYTES_MAX));
        for bad in [
            "",
            "0",
            "0x",
            "0b",
            "0x0g",
            "0x 01",
            "0x+1",
            "x0102",
            "0102",
            "0y0102",
            "0x01020304",
            "0bAQI",
            "0bAQ=I",
            "0bA===",
            "0b====",
            "0bAR==",
            "0bAQID!A==",
            "0b AQI=",
            "0xé1",
            "0bAQIDBA==",
        ] {
            assert_eq!(decode_binary(bad, 3), None, "{bad:?}");
        }
        let too_long = format!("0x{}", "ab".repeat(CHAP_VALUE_BYTES_MAX + 1));
        assert_eq!(decode_binary(&too_long, CHAP_VALUE_BYTES_MAX), None);

        // In a login, each ends it.
        for response in ["0xZZ", "146466a8b34b56526e0619fa9872f517", "0b!!!!", "0x"] {
            let (mut login, _) = challenged(chap(one_way(), false), "5");
            login.security(&[("CHAP_N", USER), ("CHAP_R", response)]);
            assert!(login.failed(), "{response}");
        }
    }

    #[test]
    fn out_of_place_keys_fail() {
        let steps: [&[(&str, &str)]; 5] = [
            &[("CHAP_N", USER)],
            &[("CHAP_R", RESPONSE_MD5)],
            &[("CHAP_A", "5"), ("CHAP_N", USER), ("CHAP_R", RESPONSE_MD5)],
            &[("CHAP_N", USER), ("CHAP_R", RESPONSE_MD5), ("CHAP_X", "1")],
            &[("CHAP_A", "5")],
        ];
        for keys in steps {
            let (mut login, _) = challenged(chap(one_way(), false), "5");
            login.security(keys);
            assert!(login.failed(), "{keys:?}");
        }
        // A response before the challenge.
        let mut login = Login::new(chap(one_way(), false), INITIATOR);
        login.send(Stage::SecurityNegotiation, None, &[("AuthMethod", "CHAP")]);
        login.security(&[("CHAP_N", USER), ("CHAP_R", RESPONSE_MD5)]);
        assert!(login.failed());
        // After success the exchange is over, even for a correct repeat.
        let mut done = chap(one_way(), false);
        let mut reply = Vec::new();
        let algorithm = [TextPair::new("CHAP_A", "5")];
        assert_eq!(done.on_keys(CHAP, INITIATOR, None, &algorithm, &mut reply), AuthStatus::InProgress);
        let response = [TextPair::new("CHAP_N", USER), TextPair::new("CHAP_R", RESPONSE_MD5)];
        assert!(matches!(done.on_keys(CHAP, INITIATOR, None, &response, &mut reply), AuthStatus::Succeeded(_)));
        assert_eq!(done.on_keys(CHAP, INITIATOR, None, &response, &mut reply), AuthStatus::Failed);
        // Another method is not ours.
        let mut other = chap(one_way(), false);
        assert_eq!(other.on_keys("SRP", INITIATOR, None, &[], &mut reply), AuthStatus::Failed);
    }

    #[test]
    fn an_initiator_with_credentials_must_use_chap() {
        for required in [false, true] {
            let mut login = Login::new(chap(one_way(), required), INITIATOR);
            let r = login.security(&[("AuthMethod", "None")]);
            assert_eq!(r.status, LoginStatus::AUTHENTICATION_FAILURE);
            let mut login = Login::new(chap(one_way(), required), INITIATOR);
            let r = login.security(&[]);
            assert_eq!(r.status, LoginStatus::AUTHENTICATION_FAILURE, "no AuthMethod at all");
            // libiscsi without credentials skips the security stage.
            let mut login = Login::new(chap(one_way(), required), INITIATOR);
            let r = login.send(Stage::LoginOperationalNegotiation, Some(Stage::FullFeaturePhase), &[]);
            assert_eq!(r.status, LoginStatus::AUTHENTICATION_FAILURE);
        }
    }

    #[test]
    fn an_initiator_without_credentials() {
        // CHAP optional: it logs in with None, skips the stage, or is answered None to CHAP,None...
        let mut login = Login::new(chap(one_way(), false), STRANGER);
        let r = login.security(&[("AuthMethod", "None")]);
        assert_eq!(answers(&r)[0], ("AuthMethod".to_string(), "None".to_string()));
        assert_eq!(login.finish(), Authentication::None);
        let mut login = Login::new(chap(one_way(), false), STRANGER);
        login.send(Stage::LoginOperationalNegotiation, None, &[]);
        assert_eq!(login.finish(), Authentication::None);
        let mut login = Login::new(chap(one_way(), false), STRANGER);
        let r = login.security(&[("AuthMethod", "CHAP,None")]);
        assert_eq!(answers(&r)[0], ("AuthMethod".to_string(), "None".to_string()));
        assert_eq!(login.finish(), Authentication::None);
        // ...but CHAP alone fails: it has no secret to prove.
        let mut login = Login::new(chap(one_way(), false), STRANGER);
        login.security(&[("AuthMethod", "CHAP")]);
        assert!(login.failed());

        // CHAP required: None and skipping fail, and so does CHAP, at the response.
        let mut login = Login::new(chap(one_way(), true), STRANGER);
        login.security(&[("AuthMethod", "None")]);
        assert!(login.failed());
        let mut login = Login::new(chap(one_way(), true), STRANGER);
        login.send(Stage::LoginOperationalNegotiation, None, &[]);
        assert!(login.failed());
        let mut login = Login::new(chap(one_way(), true), STRANGER);
        let r = login.security(&[("AuthMethod", "CHAP,None")]);
        assert_eq!(answers(&r)[0], ("AuthMethod".to_string(), "CHAP".to_string()));
        let r = login.send(Stage::SecurityNegotiation, None, &[("CHAP_A", "5")]);
        assert_eq!(r.status, LoginStatus::SUCCESS, "an unknown initiator is not told so before its response");
        login.security(&[("CHAP_N", USER), ("CHAP_R", RESPONSE_MD5)]);
        assert!(login.failed());
    }

    #[test]
    fn credentials_and_secrets() {
        assert!(validate_chap_secret(b"12345678901").is_err());
        assert_eq!(validate_chap_secret(b"123456789012"), Ok(()));
        assert_eq!(validate_chap_secret(&[7; 255]), Ok(()));
        assert!(validate_chap_secret(&[7; 256]).is_err());
        assert_eq!(one_way().validate(), Ok(()));
        assert_eq!(mutual().validate(), Ok(()));
        let bad = [
            ChapCredentials { user: String::new(), ..one_way() },
            ChapCredentials { user: "a\0b".into(), ..one_way() },
            ChapCredentials { user: "u".repeat(256), ..one_way() },
            ChapCredentials { secret: b"short".to_vec(), ..one_way() },
            ChapCredentials { mutual: Some((TARGET_USER.into(), SECRET.to_vec())), ..one_way() },
            ChapCredentials { mutual: Some(("t\0".into(), TARGET_SECRET.to_vec())), ..one_way() },
            ChapCredentials { mutual: Some((TARGET_USER.into(), vec![1; 11])), ..one_way() },
        ];
        for credentials in bad {
            assert!(credentials.validate().is_err(), "{credentials:?}");
            // Handed to a login anyway, they fail it instead of reaching the wire.
            let (mut login, _) = challenged(chap(credentials.clone(), false), "5");
            let response = ChapAlgorithm::Md5.response(IDENTIFIER, &credentials.secret, &challenge());
            let r = login.security(&[
                ("CHAP_N", USER),
                ("CHAP_R", &encode_hex(&response)),
                ("CHAP_I", "1"),
                ("CHAP_C", INITIATOR_CHALLENGE_HEX),
            ]);
            assert_eq!(r.status, LoginStatus::AUTHENTICATION_FAILURE, "{credentials:?}");
        }
        let shown = format!("{:?}", mutual());
        assert!(!shown.contains("secret-") && shown.contains("<16 bytes>"), "{shown}");
    }

    #[test]
    #[should_panic(expected = "a CHAP challenge of 8 bytes")]
    fn a_short_challenge_is_a_bug() {
        let _ = Chap::new(|_: &str| None, false, 0, vec![0; 8]);
    }

    fn any_key() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(vec!["CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R", "CHAP_X"])
                .prop_map(String::from),
            "CHAP_[A-Z]{1,3}",
        ]
    }

    fn any_value() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(vec![
                "5",
                "7",
                "7,5",
                "0",
                "1",
                "42",
                "256",
                USER,
                "",
                CHALLENGE_HEX,
                RESPONSE_MD5,
                RESPONSE_SHA256,
                RESPONSE_MD5_BASE64,
                INITIATOR_CHALLENGE_HEX,
                INITIATOR_CHALLENGE_BASE64,
            ])
            .prop_map(String::from),
            "0x[0-9a-fA-FxX ]{0,80}",
            "0b[A-Za-z0-9+/=]{0,60}",
            "\\PC{0,20}",
        ]
    }

    proptest! {
        /// Whatever keys come in, in whatever order, CHAP neither panics nor answers what
        /// cannot be sent, nothing is taken once it has ended, and success needs the response.
        #[test]
        fn arbitrary_keys_never_panic(
            steps in prop::collection::vec(prop::collection::vec((any_key(), any_value()), 0..5), 1..6),
            with_mutual in any::<bool>(),
            required in any::<bool>(),
        ) {
            let mut auth = chap(if with_mutual { mutual() } else { one_way() }, required);
            prop_assert_eq!(auth.methods(INITIATOR), &[CHAP]);
            prop_assert_eq!(auth.methods(STRANGER), if required { &[CHAP] } else { &[NONE] });
            let mut over = false;
            for keys in &steps {
                let mut seen = Vec::new();
                let keys: Vec<TextPair> = keys
                    .iter()
                    .filter(|(key, _)| !seen.contains(key) && { seen.push(key.clone()); true })
                    .map(|(key, value)| TextPair::new(key.clone(), value.clone()))
                    .collect();
                let mut reply = Vec::new();
                let status = auth.on_keys(CHAP, INITIATOR, Some(TARGET), &keys, &mut reply);
                encode_text(&reply);
                if over {
                    prop_assert_eq!(&status, &AuthStatus::Failed);
                }
                if let AuthStatus::Succeeded(_) = &status {
                    prop_assert!(keys.iter().any(|pair| pair.key == "CHAP_R"));
                }
                over |= status != AuthStatus::InProgress;
            }
        }

        /// The same through the login machine, with its stages and other keys mixed in.
        #[test]
        fn arbitrary_chap_logins_never_panic(
            requests in prop::collection::vec((any_stage(), any_stage(), any::<bool>(), prop::collection::vec((any_login_key(), any_login_value()), 0..5)), 1..7),
            with_mutual in any::<bool>(),
            required in any::<bool>(),
            stranger in any::<bool>(),
        ) {
            let auth = chap(if with_mutual { mutual() } else { one_way() }, required);
            let mut login = Login::new(auth, if stranger { STRANGER } else { INITIATOR });
            for (current, next, transit, keys) in &requests {
                let keys: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let r = login.send(*current, transit.then_some(*next), &keys);
                prop_assert!(r.data.len() <= crate::login::LOGIN_DATA_SEGMENT_BYTES);
                if let LoginOutcome::Complete(params) = login.machine.outcome() {
                    // Only None for whom it is allowed, or a CHAP exchange that went through.
                    let none_allowed = stranger && !required;
                    prop_assert!(none_allowed || params.authentication != Authentication::None);
                }
            }
        }
    }

    fn any_stage() -> impl Strategy<Value = Stage> {
        prop_oneof![
            3 => Just(Stage::SecurityNegotiation),
            2 => Just(Stage::LoginOperationalNegotiation),
            1 => Just(Stage::FullFeaturePhase)
        ]
    }

    fn any_login_key() -> impl Strategy<Value = String> {
        prop_oneof![
            any_key(),
            proptest::sample::select(vec!["AuthMethod", "HeaderDigest", "InitiatorName", "X-a"]).prop_map(String::from),
        ]
    }

    fn any_login_value() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(vec!["CHAP", "None", "CHAP,None", "None,CHAP"]).prop_map(String::from),
            any_value()
        ]
    }
}
