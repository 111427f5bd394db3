//! The text format of Login and Text PDUs (RFC 7143 §6.1): `key=value` pairs, each ended by a
//! NUL byte, and the value syntaxes keys use (lists, numbers, booleans, the special answers).
//! Also [`TextAssembler`], which joins a text split over PDUs with the C bit.
//!
//! It parses and encodes; what a key means and how it is negotiated is [`crate::login`]'s
//! business. Every bound is a named constant, checked before the text is kept.

use thiserror::Error;

/// RFC 7143 §6.1: key names are at most 63 bytes.
pub const KEY_BYTES_MAX: usize = 63;
/// RFC 7143 §6.1: a value is at most 255 bytes unless its key says otherwise.
pub const VALUE_BYTES_MAX: usize = 255;
/// Keys whose values may be longer than [`VALUE_BYTES_MAX`]: CHAP's challenge and response,
/// binary values that RFC 7143 §12.1.3 lets reach 1024 bytes.
pub const LONG_VALUE_KEYS: [&str; 2] = ["CHAP_C", "CHAP_R"];
/// Longest value of a [`LONG_VALUE_KEYS`] key: 1024 binary bytes in hex, the longer of the two
/// encodings RFC 7143 allows (`0x` then two digits a byte; base64 takes fewer).
pub const LONG_VALUE_BYTES_MAX: usize = 2 + 2 * 1024;
/// Pairs in one text. A login with every RFC 7143 key is about 30 pairs; this leaves room for
/// vendor keys while bounding the work of the duplicate check (quadratic in the count).
pub const PAIRS_MAX: usize = 256;
/// Bytes of one text, however many PDUs it spans. Real texts are well under 8 KiB; the cap
/// bounds what a peer can make us buffer with the C bit.
pub const TEXT_BYTES_MAX: usize = 64 * 1024;
/// PDUs one text may span: [`TEXT_BYTES_MAX`] in 512-byte segments, the smallest
/// MaxRecvDataSegmentLength allowed. Stops a peer that sends empty continued PDUs forever.
pub const TEXT_PDUS_MAX: usize = TEXT_BYTES_MAX / 512;

/// Answer to a key the responder does not know (RFC 7143 §6.2).
pub const NOT_UNDERSTOOD: &str = "NotUnderstood";
/// Answer to a key that does not apply here, e.g. a session-wide key in a discovery session.
pub const IRRELEVANT: &str = "Irrelevant";
/// Answer to an offer the responder will not accept.
pub const REJECT: &str = "Reject";
pub const YES: &str = "Yes";
pub const NO: &str = "No";

/// One `key=value` pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextPair {
    pub key: String,
    pub value: String,
}

impl TextPair {
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        TextPair { key: key.into(), value: value.into() }
    }
}

/// The three answers that are not values (RFC 7143 §6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Special {
    NotUnderstood,
    Irrelevant,
    Reject,
}

impl Special {
    pub fn parse(value: &str) -> Option<Special> {
        match value {
            NOT_UNDERSTOOD => Some(Special::NotUnderstood),
            IRRELEVANT => Some(Special::Irrelevant),
            REJECT => Some(Special::Reject),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Special::NotUnderstood => NOT_UNDERSTOOD,
            Special::Irrelevant => IRRELEVANT,
            Special::Reject => REJECT,
        }
    }
}

/// Why a text, or a value in it, is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TextError {
    #[error("text of {len} bytes exceeds {max} bytes")]
    TooLong { len: usize, max: usize },
    #[error("text spans more than {TEXT_PDUS_MAX} PDUs")]
    TooManyPdus,
    #[error("more than {PAIRS_MAX} key=value pairs")]
    TooManyPairs,
    #[error("text does not end with a NUL byte")]
    Unterminated,
    #[error("pair without '='")]
    MissingEquals,
    #[error("invalid key name")]
    InvalidKey,
    #[error("key name of {len} bytes exceeds {KEY_BYTES_MAX}")]
    KeyTooLong { len: usize },
    #[error("value of {key} is not UTF-8")]
    NotUtf8 { key: String },
    #[error("value of {key} has {len} bytes, more than {max}")]
    ValueTooLong { key: String, len: usize, max: usize },
    #[error("key {key} appears twice")]
    DuplicateKey { key: String },
    #[error("not a number: {value:?}")]
    InvalidNumber { value: String },
    #[error("not Yes or No: {value:?}")]
    InvalidBool { value: String },
}

/// Whether `key` is a syntactically valid key name: 1 to 63 letters, digits and `.-+@_`, and
/// `#` for the IANA-registered extension keys (`X#NodeArchitecture`, RFC 7143 §13.26).
pub fn is_valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= KEY_BYTES_MAX
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+' | b'@' | b'_' | b'#'))
}

/// The longest value `key` may carry.
pub fn value_bytes_max(key: &str) -> usize {
    if LONG_VALUE_KEYS.contains(&key) {
        LONG_VALUE_BYTES_MAX
    } else {
        VALUE_BYTES_MAX
    }
}

/// Parses a complete text (all its PDUs joined) into pairs, in order. Every pair must end
/// with a NUL; empty items between NULs are skipped (some initiators pad with extra NULs). A
/// key given twice is an error: RFC 7143 §6.2 forbids repeating a key in a negotiation.
pub fn parse_text(text: &[u8]) -> Result<Vec<TextPair>, TextError> {
    if text.len() > TEXT_BYTES_MAX {
        return Err(TextError::TooLong { len: text.len(), max: TEXT_BYTES_MAX });
    }
    if text.last().is_some_and(|&b| b != 0) {
        return Err(TextError::Unterminated);
    }
    let mut pairs: Vec<TextPair> = Vec::new();
    for item in text.split(|&b| b == 0).filter(|item| !item.is_empty()) {
        if pairs.len() == PAIRS_MAX {
            return Err(TextError::TooManyPairs);
        }
        let eq = item.iter().position(|&b| b == b'=').ok_or(TextError::MissingEquals)?;
        let (key, value) = (&item[..eq], &item[eq + 1..]);
        if key.len() > KEY_BYTES_MAX {
            return Err(TextError::KeyTooLong { len: key.len() });
        }
        let key = std::str::from_utf8(key).map_err(|_| TextError::InvalidKey)?;
        if !is_valid_key(key) {
            return Err(TextError::InvalidKey);
        }
        let max = value_bytes_max(key);
        if value.len() > max {
            return Err(TextError::ValueTooLong { key: key.to_string(), len: value.len(), max });
        }
        let value = std::str::from_utf8(value).map_err(|_| TextError::NotUtf8 { key: key.to_string() })?;
        if pairs.iter().any(|pair| pair.key == key) {
            return Err(TextError::DuplicateKey { key: key.to_string() });
        }
        pairs.push(TextPair::new(key, value));
    }
    Ok(pairs)
}

/// Appends `key=value` and its NUL.
///
/// Panics on an invalid key, a NUL in the value or a value over [`value_bytes_max`]: the
/// caller builds what it sends and must check values that come from configuration.
pub fn encode_pair(out: &mut Vec<u8>, key: &str, value: &str) {
    assert!(is_valid_key(key), "invalid key name {key:?}");
    assert!(!value.contains('\0'), "NUL in the value of {key}");
    assert!(value.len() <= value_bytes_max(key), "value of {key} has {} bytes", value.len());
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value.as_bytes());
    out.push(0);
}

/// Encodes pairs as a text (see [`encode_pair`]).
pub fn encode_text(pairs: &[TextPair]) -> Vec<u8> {
    let mut out = Vec::new();
    for pair in pairs {
        encode_pair(&mut out, &pair.key, &pair.value);
    }
    out
}

/// A numerical value: decimal, or hexadecimal after `0x`/`0X` (RFC 7143 §6.1). The base64
/// form (`0b`) is not accepted: no numeric key of RFC 7143 needs it and no initiator sends it.
pub fn parse_number(value: &str) -> Result<u64, TextError> {
    let invalid = || TextError::InvalidNumber { value: value.to_string() };
    let (digits, radix) = match value.strip_prefix("0x").or_else(|| value.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (value, 10),
    };
    // from_str_radix would also take a leading '+'.
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(invalid());
    }
    u64::from_str_radix(digits, radix).map_err(|_| invalid())
}

/// A boolean value: exactly `Yes` or `No`.
pub fn parse_bool(value: &str) -> Result<bool, TextError> {
    match value {
        YES => Ok(true),
        NO => Ok(false),
        _ => Err(TextError::InvalidBool { value: value.to_string() }),
    }
}

pub fn bool_value(value: bool) -> &'static str {
    if value {
        YES
    } else {
        NO
    }
}

/// The items of a list value (comma-separated), in the proposer's order of preference.
pub fn list_items(value: &str) -> impl Iterator<Item = &str> {
    value.split(',')
}

/// Joins the data segments of PDUs that continue a text (C bit set) until the one that ends it,
/// refusing to buffer more than [`TEXT_BYTES_MAX`] bytes or [`TEXT_PDUS_MAX`] PDUs.
#[derive(Debug, Default)]
pub struct TextAssembler {
    buf: Vec<u8>,
    pdus: usize,
}

impl TextAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one PDU's data segment. Returns the whole text when `continues` is false, `None`
    /// while more is to come. On error the partial text is dropped.
    pub fn push(&mut self, segment: &[u8], continues: bool) -> Result<Option<Vec<u8>>, TextError> {
        self.pdus += 1;
        if self.pdus > TEXT_PDUS_MAX {
            self.reset();
            return Err(TextError::TooManyPdus);
        }
        let len = self.buf.len() + segment.len();
        if len > TEXT_BYTES_MAX {
            self.reset();
            return Err(TextError::TooLong { len, max: TEXT_BYTES_MAX });
        }
        self.buf.extend_from_slice(segment);
        if continues {
            return Ok(None);
        }
        self.pdus = 0;
        Ok(Some(std::mem::take(&mut self.buf)))
    }

    /// Whether part of a text has been received and the rest is awaited.
    pub fn is_partial(&self) -> bool {
        self.pdus > 0
    }

    pub fn reset(&mut self) {
        self.buf = Vec::new();
        self.pdus = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<TextPair> {
        list.iter().map(|(k, v)| TextPair::new(*k, *v)).collect()
    }

    #[test]
    fn parses_a_login_text() {
        let text = b"InitiatorName=iqn.2005-03.org.open-iscsi:abc\0SessionType=Normal\0HeaderDigest=CRC32C,None\0";
        assert_eq!(
            parse_text(text),
            Ok(pairs(&[
                ("InitiatorName", "iqn.2005-03.org.open-iscsi:abc"),
                ("SessionType", "Normal"),
                ("HeaderDigest", "CRC32C,None"),
            ]))
        );
        assert_eq!(encode_text(&parse_text(text).unwrap()), text);
    }

    #[test]
    fn empty_values_and_extra_nuls() {
        assert_eq!(parse_text(b""), Ok(vec![]));
        assert_eq!(parse_text(b"SendTargets=\0\0\0"), Ok(pairs(&[("SendTargets", "")])));
        assert_eq!(parse_text(b"a=b=c\0"), Ok(pairs(&[("a", "b=c")])));
    }

    #[test]
    fn malformed_texts() {
        assert_eq!(parse_text(b"a=b"), Err(TextError::Unterminated));
        assert_eq!(parse_text(b"ab\0"), Err(TextError::MissingEquals));
        assert_eq!(parse_text(b"=b\0"), Err(TextError::InvalidKey));
        assert_eq!(parse_text(b"a b=c\0"), Err(TextError::InvalidKey));
        assert_eq!(parse_text(b"\xff=c\0"), Err(TextError::InvalidKey));
        assert_eq!(parse_text(b"a=\xff\0"), Err(TextError::NotUtf8 { key: "a".into() }));
        assert_eq!(parse_text(b"a=1\0b=2\0a=3\0"), Err(TextError::DuplicateKey { key: "a".into() }));
    }

    #[test]
    fn key_and_value_bounds() {
        let key = "K".repeat(KEY_BYTES_MAX);
        assert!(parse_text(format!("{key}=v\0").as_bytes()).is_ok());
        assert_eq!(parse_text(format!("{key}K=v\0").as_bytes()), Err(TextError::KeyTooLong { len: 64 }));

        let value = "v".repeat(VALUE_BYTES_MAX);
        assert!(parse_text(format!("k={value}\0").as_bytes()).is_ok());
        assert_eq!(
            parse_text(format!("k={value}v\0").as_bytes()),
            Err(TextError::ValueTooLong { key: "k".into(), len: 256, max: 255 })
        );

        let challenge = format!("0x{}", "ab".repeat(1024));
        assert_eq!(challenge.len(), LONG_VALUE_BYTES_MAX);
        assert!(parse_text(format!("CHAP_C={challenge}\0").as_bytes()).is_ok());
        assert!(parse_text(format!("CHAP_R={challenge}0\0").as_bytes()).is_err());
        assert!(parse_text(format!("CHAP_N={challenge}\0").as_bytes()).is_err());
    }

    #[test]
    fn pair_and_size_caps() {
        let mut text = Vec::new();
        for i in 0..PAIRS_MAX {
            encode_pair(&mut text, &format!("X-k{i}"), "v");
        }
        assert_eq!(parse_text(&text).map(|p| p.len()), Ok(PAIRS_MAX));
        encode_pair(&mut text, "X-one-more", "v");
        assert_eq!(parse_text(&text), Err(TextError::TooManyPairs));

        let huge = vec![0u8; TEXT_BYTES_MAX + 1];
        assert_eq!(parse_text(&huge), Err(TextError::TooLong { len: TEXT_BYTES_MAX + 1, max: TEXT_BYTES_MAX }));
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_number("0"), Ok(0));
        assert_eq!(parse_number("262144"), Ok(262_144));
        assert_eq!(parse_number("0x40000"), Ok(262_144));
        assert_eq!(parse_number("0XfF"), Ok(255));
        assert_eq!(parse_number("18446744073709551615"), Ok(u64::MAX));
        for bad in ["", "0x", "+1", "-1", "1.5", "12a", "0x+1", "18446744073709551616", "0b AAAA"] {
            assert!(parse_number(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn booleans_lists_and_specials() {
        assert_eq!(parse_bool("Yes"), Ok(true));
        assert_eq!(parse_bool("No"), Ok(false));
        assert!(parse_bool("yes").is_err());
        assert_eq!(bool_value(true), "Yes");
        assert_eq!(list_items("CRC32C,None").collect::<Vec<_>>(), ["CRC32C", "None"]);
        assert_eq!(Special::parse("NotUnderstood"), Some(Special::NotUnderstood));
        assert_eq!(Special::parse("Irrelevant"), Some(Special::Irrelevant));
        assert_eq!(Special::parse("Reject"), Some(Special::Reject));
        assert_eq!(Special::parse("None"), None);
        assert_eq!(Special::Reject.as_str(), REJECT);
    }

    #[test]
    fn assembler_joins_continued_segments() {
        let mut assembler = TextAssembler::new();
        assert_eq!(assembler.push(b"Initiator", true), Ok(None));
        assert!(assembler.is_partial());
        assert_eq!(assembler.push(b"Name=iqn.x", true), Ok(None));
        assert_eq!(assembler.push(b"\0", false), Ok(Some(b"InitiatorName=iqn.x\0".to_vec())));
        assert!(!assembler.is_partial());
        assert_eq!(assembler.push(b"a=b\0", false), Ok(Some(b"a=b\0".to_vec())));
    }

    #[test]
    fn assembler_caps_bytes_and_pdus() {
        let mut assembler = TextAssembler::new();
        let chunk = vec![b'x'; 8192];
        for _ in 0..TEXT_BYTES_MAX / chunk.len() {
            assert_eq!(assembler.push(&chunk, true), Ok(None));
        }
        assert_eq!(
            assembler.push(b"y", true),
            Err(TextError::TooLong { len: TEXT_BYTES_MAX + 1, max: TEXT_BYTES_MAX })
        );
        assert!(!assembler.is_partial(), "an error drops the partial text");

        for _ in 0..TEXT_PDUS_MAX {
            assert_eq!(assembler.push(b"", true), Ok(None));
        }
        assert_eq!(assembler.push(b"", true), Err(TextError::TooManyPdus));
    }

    proptest! {
        #[test]
        fn encoded_pairs_parse_back(
            list in prop::collection::btree_map("[A-Za-z0-9.+@_-]{1,63}", "[^\0]{0,60}", 0..20)
        ) {
            let pairs: Vec<TextPair> = list.into_iter().map(|(k, v)| TextPair::new(k, v)).collect();
            let pairs: Vec<TextPair> = pairs.into_iter().filter(|p| p.value.len() <= VALUE_BYTES_MAX).collect();
            prop_assert_eq!(parse_text(&encode_text(&pairs)), Ok(pairs));
        }

        #[test]
        fn arbitrary_text_never_panics(text in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(pairs) = parse_text(&text) {
                prop_assert!(pairs.len() <= PAIRS_MAX);
                prop_assert_eq!(parse_text(&encode_text(&pairs)), Ok(pairs));
            }
        }

        #[test]
        fn arbitrary_numbers_never_panic(value in "\\PC{0,24}") {
            let _ = parse_number(&value);
        }
    }
}
