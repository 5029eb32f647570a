//! Which version of the object was opened (its ETag or Last-Modified), the condition
//! every ranged GET carries so that a replaced object fails instead of mixing two
//! versions, and the check of each reply's validators against it.

/// The validators of the object as opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Version {
    /// The ETag as sent, quotes and any `W/` included.
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

/// Why a reply is not from the version that was opened.
pub const CHANGED: &str = "the object changed since it was opened";

fn is_weak(etag: &str) -> bool {
    etag.starts_with("W/")
}

/// The opaque part, for the weak comparison (RFC 9110 §8.8.3.2).
fn opaque(etag: &str) -> &str {
    etag.strip_prefix("W/").unwrap_or(etag)
}

impl Version {
    pub fn new(etag: Option<&str>, last_modified: Option<&str>) -> Version {
        let keep = |v: Option<&str>| v.map(str::trim).filter(|v| !v.is_empty()).map(String::from);
        Version {
            etag: keep(etag),
            last_modified: keep(last_modified),
        }
    }

    /// The precondition header for a ranged GET: `If-Match` with a strong ETag, or else
    /// `If-Unmodified-Since` with Last-Modified (`If-Match` never matches a weak ETag).
    /// `None` if the server gave neither: then only the replies' validators are checked.
    pub fn condition(&self) -> Option<(&'static str, &str)> {
        match (&self.etag, &self.last_modified) {
            (Some(e), _) if !is_weak(e) => Some(("If-Match", e)),
            (_, Some(lm)) => Some(("If-Unmodified-Since", lm)),
            _ => None,
        }
    }

    /// Whether the opening reply named its version at all.
    pub fn is_known(&self) -> bool {
        self.etag.is_some() || self.last_modified.is_some()
    }

    /// Checks a reply's validators against the opened version: a different ETag or
    /// Last-Modified means the object changed. A validator the reply leaves out is not
    /// held against it (some caches drop them).
    pub fn check(&self, etag: Option<&str>, last_modified: Option<&str>) -> Result<(), String> {
        let got = Version::new(etag, last_modified);
        if let (Some(want), Some(got)) = (&self.etag, &got.etag) {
            if opaque(want) != opaque(got) {
                return Err(format!("{CHANGED} (ETag {want} then, {got} now)"));
            }
        }
        if let (Some(want), Some(got)) = (&self.last_modified, &got.last_modified) {
            if want != got {
                return Err(format!("{CHANGED} (Last-Modified {want} then, {got} now)"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LM: &str = "Wed, 21 Oct 2015 07:28:00 GMT";

    #[test]
    fn strong_etag_preferred() {
        let v = Version::new(Some("\"abc\""), Some(LM));
        assert_eq!(v.condition(), Some(("If-Match", "\"abc\"")));
    }

    #[test]
    fn weak_etag_falls_back_to_last_modified() {
        let v = Version::new(Some("W/\"abc\""), Some(LM));
        assert_eq!(v.condition(), Some(("If-Unmodified-Since", LM)));
        assert_eq!(Version::new(Some("W/\"abc\""), None).condition(), None);
        assert_eq!(
            Version::new(None, Some(LM)).condition(),
            Some(("If-Unmodified-Since", LM))
        );
        assert_eq!(Version::new(None, None).condition(), None);
        assert!(!Version::new(Some(" "), None).is_known());
    }

    #[test]
    fn check_spots_a_changed_object() {
        let v = Version::new(Some("\"abc\""), Some(LM));
        assert_eq!(v.check(Some("\"abc\""), Some(LM)), Ok(()));
        assert_eq!(v.check(Some("W/\"abc\""), None), Ok(()));
        assert_eq!(v.check(None, None), Ok(()));
        let e = v.check(Some("\"abd\""), Some(LM)).unwrap_err();
        assert!(e.starts_with(CHANGED), "{e}");
        let e = v
            .check(None, Some("Thu, 22 Oct 2015 07:28:00 GMT"))
            .unwrap_err();
        assert!(e.starts_with(CHANGED), "{e}");
    }
}
