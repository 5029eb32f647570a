//! Showing text that came from an image (backing names, paths built from them) without
//! letting it drive the terminal or the log: control characters (C0, DEL, C1) and bytes
//! that are not UTF-8 become `\xNN` / `\u{NNNN}` escapes. Escaping is idempotent (its
//! output holds no control characters), so a message that quotes an already escaped
//! one is not mangled twice; backslashes are left alone for the same reason.

use std::borrow::Cow;
use std::fmt::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn needs_escape(c: char) -> bool {
    c.is_control()
}

fn push_escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        if needs_escape(c) {
            let n = c as u32;
            if n < 0x100 {
                let _ = write!(out, "\\x{n:02x}");
            } else {
                let _ = write!(out, "\\u{{{n:04x}}}");
            }
        } else {
            out.push(c);
        }
    }
}

/// `s` with control characters escaped.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    push_escaped(&mut out, s);
    Cow::Owned(out)
}

/// Bytes as text: valid UTF-8 escaped as by [`escape`], other bytes as `\xNN`.
pub fn escape_bytes(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        push_escaped(&mut out, chunk.valid());
        for x in chunk.invalid() {
            let _ = write!(out, "\\x{x:02x}");
        }
    }
    out
}

/// A path for messages: [`escape_bytes`] of its bytes (not `display()`'s lossy U+FFFD).
pub fn path(p: &Path) -> String {
    escape_bytes(p.as_os_str().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_and_bad_bytes_are_escaped() {
        assert_eq!(escape("base.qcow2"), "base.qcow2");
        assert!(matches!(escape("plain"), Cow::Borrowed(_)));
        assert_eq!(
            escape("a\x1b[2Jb\n\r\t\x7f"),
            "a\\x1b[2Jb\\x0a\\x0d\\x09\\x7f"
        );
        assert_eq!(escape("c1\u{9b}x"), "c1\\x9bx");
        assert_eq!(escape("é ok"), "é ok");
        assert_eq!(escape_bytes(b"a\xffb\x1b"), "a\\xffb\\x1b");
        assert_eq!(
            path(Path::new(std::ffi::OsStr::from_bytes(b"/x/\xfe\x07"))),
            "/x/\\xfe\\x07"
        );
        // Idempotent: an escaped text is left as it is.
        let once = escape("\x1b]0;title\x07").into_owned();
        assert_eq!(escape(&once), once);
    }
}
