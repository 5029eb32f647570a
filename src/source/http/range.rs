//! `Content-Range` (RFC 9110 §14.4): parsed strictly, and checked against what was
//! asked. The header comes from the network: every malformed or hostile value is an
//! error, never a panic or an overflow.

use std::fmt;

/// A parsed `Content-Range` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentRange {
    /// `bytes FIRST-LAST/TOTAL` (`total` is `None` for `*`, length unknown).
    Bytes {
        first: u64,
        last: u64,
        total: Option<u64>,
    },
    /// `bytes */TOTAL`, sent with 416 (the range is not satisfiable).
    Unsatisfied { total: u64 },
}

/// Why a `Content-Range` is not the one asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// The object has another size now: it changed.
    Total { want: u64, got: Option<u64> },
    /// Malformed, or another range than asked: the server is broken.
    Bad(String),
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Total { want, got: Some(g) } => {
                write!(f, "size {g} in Content-Range, {want} when opened")
            }
            Mismatch::Total { want, got: None } => {
                write!(f, "unknown size in Content-Range, {want} when opened")
            }
            Mismatch::Bad(m) => f.write_str(m),
        }
    }
}

/// A decimal number as HTTP writes one: ASCII digits only (no sign, no spaces), at
/// most what fits in u64.
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses a `Content-Range` value (`bytes 0-499/1234`, `bytes 0-499/*`, `bytes */1234`).
pub fn parse(value: &str) -> Result<ContentRange, String> {
    let bad = || format!("bad Content-Range '{}'", value.escape_debug());
    let v = value.trim();
    let (unit, rest) = v.split_once(' ').ok_or_else(bad)?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return Err(format!(
            "Content-Range in unit '{}', not bytes",
            unit.escape_debug()
        ));
    }
    let (range, total) = rest.trim_start().split_once('/').ok_or_else(bad)?;
    if range == "*" {
        let total = number(total).ok_or_else(bad)?;
        return Ok(ContentRange::Unsatisfied { total });
    }
    let (first, last) = range.split_once('-').ok_or_else(bad)?;
    let first = number(first).ok_or_else(bad)?;
    let last = number(last).ok_or_else(bad)?;
    let total = match total {
        "*" => None,
        t => Some(number(t).ok_or_else(bad)?),
    };
    if first > last {
        return Err(format!("{}: first byte past the last", bad()));
    }
    if let Some(t) = total {
        if last >= t {
            return Err(format!("{}: range past the end", bad()));
        }
    }
    Ok(ContentRange::Bytes { first, last, total })
}

/// Checks that `value` says exactly bytes `first..=last` of an object of `total` bytes.
pub fn expect(value: Option<&str>, first: u64, last: u64, total: u64) -> Result<(), Mismatch> {
    let value = value.ok_or_else(|| Mismatch::Bad("206 without Content-Range".into()))?;
    match parse(value).map_err(Mismatch::Bad)? {
        ContentRange::Bytes {
            first: f,
            last: l,
            total: t,
        } => {
            if t != Some(total) {
                return Err(Mismatch::Total {
                    want: total,
                    got: t,
                });
            }
            if (f, l) != (first, last) {
                return Err(Mismatch::Bad(format!(
                    "asked for bytes {first}-{last}, got {f}-{l}"
                )));
            }
            Ok(())
        }
        ContentRange::Unsatisfied { total: t } => Err(Mismatch::Total {
            want: total,
            got: Some(t),
        }),
    }
}

/// The `Range` header value for `len` (> 0) bytes from `off`, and the last byte.
pub fn request(off: u64, len: u64) -> (String, u64) {
    debug_assert!(len > 0);
    let last = off.saturating_add(len.max(1) - 1);
    (format!("bytes={off}-{last}"), last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_forms() {
        assert_eq!(
            parse("bytes 0-499/1234"),
            Ok(ContentRange::Bytes {
                first: 0,
                last: 499,
                total: Some(1234)
            })
        );
        assert_eq!(
            parse("bytes 5-5/*"),
            Ok(ContentRange::Bytes {
                first: 5,
                last: 5,
                total: None
            })
        );
        assert_eq!(
            parse("bytes */1234"),
            Ok(ContentRange::Unsatisfied { total: 1234 })
        );
        assert_eq!(
            parse(" BYTES 1-2/3 "),
            Ok(ContentRange::Bytes {
                first: 1,
                last: 2,
                total: Some(3)
            })
        );
        let max = u64::MAX;
        assert_eq!(
            parse(&format!("bytes 0-{}/{max}", max - 1)),
            Ok(ContentRange::Bytes {
                first: 0,
                last: max - 1,
                total: Some(max)
            })
        );
    }

    #[test]
    fn rejects_bad_syntax() {
        for v in [
            "",
            "bytes",
            "bytes ",
            "bytes 0-499",
            "bytes 0-/1234",
            "bytes -499/1234",
            "bytes 0499/1234",
            "bytes 0-499/",
            "bytes 0-499/12x4",
            "bytes +0-499/1234",
            "bytes 0-+499/1234",
            "bytes 0 - 499/1234",
            "bytes 0-4-99/1234",
            "bytes */*",
            "bytes */",
            "bytes=0-499/1234",
            "0-499/1234",
            "items 0-499/1234",
            "bytes ٠-٤/٥",
        ] {
            assert!(parse(v).is_err(), "{v:?} accepted");
        }
    }

    #[test]
    fn rejects_hostile_numbers() {
        for v in [
            "bytes 0-18446744073709551616/18446744073709551617",
            "bytes 99999999999999999999999-1/2",
            "bytes 0-1/99999999999999999999999999999999",
            "bytes 10-5/100",
            "bytes 0-100/100",
            "bytes 0-18446744073709551615/18446744073709551615",
            "bytes 0-0/0",
            "bytes -1-5/10",
        ] {
            assert!(parse(v).is_err(), "{v:?} accepted");
        }
    }

    #[test]
    fn expect_checks_start_end_and_total() {
        assert_eq!(expect(Some("bytes 10-19/100"), 10, 19, 100), Ok(()));
        assert_eq!(
            expect(Some("bytes 10-19/101"), 10, 19, 100),
            Err(Mismatch::Total {
                want: 100,
                got: Some(101)
            })
        );
        assert_eq!(
            expect(Some("bytes 10-19/*"), 10, 19, 100),
            Err(Mismatch::Total {
                want: 100,
                got: None
            })
        );
        assert!(matches!(
            expect(Some("bytes 0-19/100"), 10, 19, 100),
            Err(Mismatch::Bad(_))
        ));
        assert!(matches!(
            expect(Some("bytes 10-18/100"), 10, 19, 100),
            Err(Mismatch::Bad(_))
        ));
        assert!(matches!(
            expect(Some("bytes 10-20/100"), 10, 19, 100),
            Err(Mismatch::Bad(_))
        ));
        assert!(matches!(expect(None, 10, 19, 100), Err(Mismatch::Bad(_))));
        assert!(matches!(
            expect(Some("garbage"), 10, 19, 100),
            Err(Mismatch::Bad(_))
        ));
        assert!(matches!(
            expect(Some("bytes */50"), 10, 19, 100),
            Err(Mismatch::Total { .. })
        ));
    }

    #[test]
    fn request_header() {
        assert_eq!(request(0, 1), ("bytes=0-0".to_string(), 0));
        assert_eq!(request(4095, 3), ("bytes=4095-4097".to_string(), 4097));
    }
}
