//! qemu-img and qemu-io: running them, writing into images, references, check, compare,
//! info and map.

use std::fs::{self, File};
use std::io::Read;
use std::ops::Range;
use std::path::Path;
use std::process::{Command, Output};

use super::environment::{ps, QEMU_TIMEOUT};
use super::processes::run_with_timeout;

/// Runs a tool with [`QEMU_TIMEOUT`] and returns stdout; panics with stderr on failure.
fn run_tool(tool: &str, args: &[&str]) -> String {
    let out = run_tool_output(tool, args);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a tool with [`QEMU_TIMEOUT`] and returns its raw output (no status check).
fn run_tool_output(tool: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(tool);
    cmd.args(args);
    run_with_timeout(cmd, QEMU_TIMEOUT)
}

/// `qemu-img ARGS`; returns stdout, panics with full stderr on failure.
pub fn qemu_img(args: &[&str]) -> String {
    run_tool("qemu-img", args)
}

/// `qemu-img ARGS` without the status check.
pub fn qemu_img_output(args: &[&str]) -> Output {
    run_tool_output("qemu-img", args)
}

/// True when qemu-io output reports a failed command: "... failed: ..." or a `-P` read's
/// "Pattern verification failed at ..." (which `aio_read` reports with exit status 0).
fn qemu_io_reports_failure(text: &str) -> bool {
    text.contains("failed:") || text.contains("Pattern verification failed")
}

/// `qemu-io ARGS`; returns stdout, panics with full stderr on failure (non-zero exit, a
/// command reporting "... failed:", or a pattern verification failure).
pub fn qemu_io(args: &[&str]) -> String {
    let out = run_tool_output("qemu-io", args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success()
            && !qemu_io_reports_failure(&stdout)
            && !qemu_io_reports_failure(&stderr),
        "qemu-io {args:?} failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

/// "qcow2" when `path` starts with the qcow2 magic, else "raw".
pub fn image_format(path: &Path) -> &'static str {
    let mut magic = [0u8; 4];
    let ok = File::open(path).and_then(|mut f| f.read_exact(&mut magic));
    if ok.is_ok() && &magic == b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    }
}

/// Runs qemu-io commands (`-c` each) on `image`, with its format given explicitly.
pub fn qemu_io_cmds(image: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", image_format(image)];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(ps(image));
    qemu_io(&args);
}

/// `write -P pattern off len`.
pub fn write_pattern(image: &Path, pattern: u8, off: u64, len: u64) {
    qemu_io_cmds(image, &[&format!("write -P {pattern:#x} {off} {len}")]);
}

/// `write -z off len` (zero clusters / subclusters where the format allows).
pub fn write_zeroes(image: &Path, off: u64, len: u64) {
    qemu_io_cmds(image, &[&format!("write -z {off} {len}")]);
}

/// `discard off len`.
pub fn discard(image: &Path, off: u64, len: u64) {
    qemu_io_cmds(image, &[&format!("discard {off} {len}")]);
}

/// `write -c -P pattern off len` (compressed; whole clusters only).
pub fn write_compressed(image: &Path, pattern: u8, off: u64, len: u64) {
    qemu_io_cmds(image, &[&format!("write -c -P {pattern:#x} {off} {len}")]);
}

/// `qemu-img convert -O raw image dst` (the whole chain flattened).
pub fn convert_to_raw(image: &Path, dst: &Path) {
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        image_format(image),
        "-O",
        "raw",
        ps(image),
        ps(dst),
    ]);
}

/// The flattened contents of the chain whose top is `image`, per qemu-img.
pub fn raw_reference(image: &Path) -> Vec<u8> {
    let dir = image.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".reference-")
        .suffix(".raw")
        .tempfile_in(dir)
        .expect("reference temp file");
    convert_to_raw(image, tmp.path());
    fs::read(tmp.path()).expect("read reference")
}

/// `qemu-img rebase -u -b backing -F fmt image` (rewrites the backing name only).
pub fn rebase_unsafe(image: &Path, backing_name: &str, backing_fmt: &str) {
    qemu_img(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        backing_name,
        "-F",
        backing_fmt,
        ps(image),
    ]);
}

/// Asserts `qemu-img check image` exits 0.
pub fn qemu_img_check(image: &Path) {
    let out = qemu_img_output(&["check", "-f", image_format(image), ps(image)]);
    assert!(
        out.status.success(),
        "qemu-img check {image:?} -> {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Exit code of a tool run and its stdout followed by its stderr.
fn code_and_text(out: &Output) -> (i32, String) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Exit code and output of `qemu-img check -f qcow2 image` (0 clean, 3 leaks only, 2
/// corruption).
pub fn check_status(image: &Path) -> (i32, String) {
    code_and_text(&qemu_img_output(&["check", "-f", "qcow2", ps(image)]))
}

/// Like [`check_status`] for the qcow2 leaf alone: its backing files are not opened, so
/// this also works while a backing file is unreadable.
pub fn check_status_leaf_only(image: &Path) -> (i32, String) {
    let spec = serde_json::json!({
        "driver": "qcow2",
        "backing": null,
        "file": {"driver": "file", "filename": ps(image)},
    });
    code_and_text(&qemu_img_output(&["check", &format!("json:{spec}")]))
}

/// Asserts `qemu-img compare` finds the chain of the qcow2 `image` and the raw file `raw`
/// identical (`what` says which comparison failed). With -U, as one compares a running
/// VM's disk: streamfs locks a mounted leaf as QEMU does.
pub fn assert_identical_to_raw(what: &str, image: &Path, raw: &Path) {
    let out = qemu_img_output(&[
        "compare",
        "-U",
        "-f",
        "qcow2",
        "-F",
        "raw",
        ps(image),
        ps(raw),
    ]);
    assert!(
        out.status.success(),
        "{what}: qemu-img compare {image:?} {raw:?} -> {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img info --output=json` of `image` (without the backing chain).
pub fn qemu_img_info(image: &Path) -> serde_json::Value {
    let out = qemu_img(&[
        "info",
        "--output=json",
        "-f",
        image_format(image),
        ps(image),
    ]);
    serde_json::from_str(&out).expect("qemu-img info json")
}

/// Virtual size of `image`.
pub fn virtual_size(image: &Path) -> u64 {
    qemu_img_info(image)["virtual-size"]
        .as_u64()
        .expect("virtual-size")
}

/// One entry of `qemu-img map --output=json` (every field qemu-img prints, so equal maps
/// compare equal as vectors of entries).
#[derive(Clone, Debug, PartialEq)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    pub depth: u64,
    /// False where no layer of the chain allocates the range (true when not printed).
    pub present: bool,
    pub data: bool,
    pub zero: bool,
    pub compressed: bool,
    /// Host offset in the image file, when qemu-img reports one.
    pub offset: Option<u64>,
}

impl MapEntry {
    /// `start + length`.
    pub fn end(&self) -> u64 {
        self.start + self.length
    }
}

/// `qemu-img map --output=json image` (the whole chain, as qemu sees it).
pub fn qemu_img_map(image: &Path) -> Vec<MapEntry> {
    let out = qemu_img(&["map", "--output=json", "-f", image_format(image), ps(image)]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img map json");
    v.as_array()
        .expect("map is an array")
        .iter()
        .map(|e| MapEntry {
            start: e["start"].as_u64().unwrap(),
            length: e["length"].as_u64().unwrap(),
            depth: e["depth"].as_u64().unwrap_or(0),
            present: e["present"].as_bool().unwrap_or(true),
            data: e["data"].as_bool().unwrap_or(false),
            zero: e["zero"].as_bool().unwrap_or(false),
            compressed: e["compressed"].as_bool().unwrap_or(false),
            offset: e["offset"].as_u64(),
        })
        .collect()
}

/// Ranges qemu-img map reports as `"data": true`, adjacent ones merged.
pub fn map_data_extents(image: &Path) -> Vec<Range<u64>> {
    merge_ranges(
        qemu_img_map(image)
            .into_iter()
            .filter(|e| e.data)
            .map(|e| e.start..e.start + e.length),
    )
}

/// Merges touching or overlapping ranges (input in ascending order).
pub fn merge_ranges(ranges: impl IntoIterator<Item = Range<u64>>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in ranges {
        if r.is_empty() {
            continue;
        }
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}
