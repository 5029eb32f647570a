//! The harness's own rules (no FUSE needed): a test that cannot run skips on a developer's
//! machine but fails under CI.

mod common;

use common::*;

#[test]
fn unavailable_fails_under_ci_and_skips_elsewhere() {
    let reason = "cannot open /dev/fuse: No such file or directory (os error 2)";
    for ci in ["true", "TRUE", "True", "1", " true\n"] {
        match unavailable_verdict(Some(ci), "some_test", reason) {
            Unavailable::Fail(message) => {
                assert!(message.contains("some_test"), "{message}");
                assert!(message.contains(reason), "{message}");
            }
            other => panic!("CI={ci:?} must fail, got {other:?}"),
        }
    }
    for ci in [None, Some(""), Some("false"), Some("0"), Some("yes")] {
        assert_eq!(
            unavailable_verdict(ci, "some_test", reason),
            Unavailable::Skip(format!("SKIP: some_test: {reason}")),
            "CI={ci:?}"
        );
    }
}

#[test]
fn skip_or_fail_follows_the_ci_variable() {
    // The real environment decides: this checks that skip_or_fail reads `CI` the same way
    // as unavailable_verdict, without changing the process environment (tests run in
    // parallel threads).
    let ci = std::env::var("CI").ok();
    let outcome = std::panic::catch_unwind(|| skip_or_fail("no reason, just checking"));
    assert_eq!(outcome.is_err(), is_ci(ci.as_deref()), "CI={ci:?}");
}
