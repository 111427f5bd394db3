//! Sizes as the command line writes them: bytes with an optional suffix K, M, G or T (powers
//! of 1024), parsed from flags and printed in tables.

/// Parses a size: plain bytes, or a number with a suffix K, M, G or T (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "size {s:?} is not a number of bytes with an optional suffix K, M, G or T (powers of 1024), e.g. 64M or 1G"
        )
    };
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| format!("size {s:?} is too large"))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("size {s:?} is too large"))
}

/// A size for people: exact with the largest suffix that divides it (`64M`, `12K`, `5000`),
/// else one decimal of the largest unit it reaches (`1.5G`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u32, &str); 4] = [(40, "T"), (30, "G"), (20, "M"), (10, "K")];
    for (shift, unit) in UNITS {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    for (shift, unit) in UNITS {
        if bytes >= 1 << shift {
            return format!("{:.1}{unit}", bytes as f64 / (1u64 << shift) as f64);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes_and_refuse_the_rest() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2t"), Ok(2 << 40));
        assert_eq!(parse_size("8k"), Ok(8192));
        for bad in ["", "M", "12Q", "1.5G", "-1", "64MB", "1 G", "0x10", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse_size("12Q").unwrap_err().contains("K, M, G or T"));
    }

    #[test]
    fn sizes_format_exactly_when_they_can() {
        assert_eq!(format_size(64 << 20), "64M");
        assert_eq!(format_size(1 << 30), "1G");
        assert_eq!(format_size(12288), "12K");
        assert_eq!(format_size(5000), "4.9K");
        assert_eq!(format_size(3 << 29), "1536M");
        assert_eq!(format_size(100), "100");
        assert_eq!(format_size(0), "0");
    }
}
