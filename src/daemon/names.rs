//! Disk names in a mount: `[NAME=]IMAGE` arguments and what a name may contain.

use std::path::PathBuf;

use crate::fs::{CONTROL_NAME, EVENTS_NAME};
use crate::{Error, Result};

/// Splits `[NAME=]IMAGE` and derives the default name (`vm1.qcow2` -> `vm1.raw`).
pub fn parse_chain_arg(arg: &str) -> Result<(String, PathBuf)> {
    // The first '=' separates NAME; a path containing '=' is given as NAME=PATH.
    if let Some((name, image)) = arg.split_once('=') {
        validate_name(name)?;
        if image.is_empty() {
            return Err(Error::Invalid(format!("'{arg}': missing IMAGE after '='")));
        }
        return Ok((name.to_string(), PathBuf::from(image)));
    }
    let path = PathBuf::from(arg);
    let stem = path
        .file_stem()
        .ok_or_else(|| Error::Invalid(format!("'{arg}' is not an image file name")))?;
    let name = format!("{}.raw", stem.to_string_lossy());
    validate_name(&name)?;
    Ok((name, path))
}

pub fn validate_name(name: &str) -> Result<()> {
    let bad = if name.is_empty() {
        Some("is empty")
    } else if name.contains('/') {
        Some("contains '/'")
    } else if name == CONTROL_NAME || name == EVENTS_NAME {
        Some("is reserved for the mount's control and event files")
    } else if name == "." || name == ".." {
        Some("is not a file name")
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("contains white space or control characters")
    } else if name.len() > 255 {
        Some("is longer than 255 bytes")
    } else {
        None
    };
    match bad {
        Some(why) => Err(Error::Invalid(format!("disk name '{name}' {why}"))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_args_and_names() {
        assert_eq!(
            parse_chain_arg("/images/vm1.qcow2").unwrap(),
            ("vm1.raw".into(), "/images/vm1.qcow2".into())
        );
        assert_eq!(
            parse_chain_arg("disk").unwrap(),
            ("disk.raw".into(), "disk".into())
        );
        assert_eq!(parse_chain_arg("a.b.qcow2").unwrap().0, "a.b.raw");
        assert_eq!(
            parse_chain_arg("root=x/y.qcow2").unwrap(),
            ("root".into(), "x/y.qcow2".into())
        );
        assert!(
            parse_chain_arg("/tmp/a=b/c.qcow2").is_err(),
            "a NAME with '/'"
        );
        assert_eq!(
            parse_chain_arg("d=/tmp/a=b/c.qcow2").unwrap(),
            ("d".into(), "/tmp/a=b/c.qcow2".into())
        );
        assert!(parse_chain_arg(".control=x.qcow2").is_err());
        assert!(parse_chain_arg(".events=x.qcow2").is_err());
        assert!(parse_chain_arg("=x.qcow2").is_err());
        assert!(parse_chain_arg("a b=x.qcow2").is_err());
        assert!(parse_chain_arg("name=").is_err());
    }
}
