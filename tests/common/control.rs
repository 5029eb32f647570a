//! The `.control` file client: its status lines parsed, and the mount's accessors for
//! them.

use super::file_io::read_file;
use super::mounts::Mount;

impl Mount {
    /// Contents of `.control` (bounded).
    pub fn read_control(&self) -> String {
        String::from_utf8(read_file(&self.control())).expect(".control is not UTF-8")
    }

    /// `.control` parsed into one [`ControlLine`] per chain.
    pub fn control_lines(&self) -> Vec<ControlLine> {
        parse_control(&self.read_control())
    }
}

/// One line of `.control`: `NAME key=value ...`.
#[derive(Clone, Debug)]
pub struct ControlLine {
    pub name: String,
    pub fields: Vec<(String, String)>,
    pub raw: String,
}

impl ControlLine {
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses `.control` text (tokens without `=` after the name are kept with an empty value).
pub fn parse_control(text: &str) -> Vec<ControlLine> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut tokens = l.split_whitespace();
            let name = tokens.next().unwrap_or("").to_string();
            let fields = tokens
                .map(|t| match t.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (t.to_string(), String::new()),
                })
                .collect();
            ControlLine {
                name,
                fields,
                raw: l.to_string(),
            }
        })
        .collect()
}
