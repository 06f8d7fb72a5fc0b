//! The workspace's one rule for "this host lacks X" (`ornament_test_gate`), proved on
//! the QEMU probe the real-guest tests use: this file's `qemu_probe` test, run again
//! in a child process with QEMU made absent (`ORNAMENT_QEMU=/nonexistent`), fails
//! naming QEMU when `CI` is on and prints a `SKIPPED` line (and passes) when it is not.

use ornament_tests::{has_qemu, require_host};
use std::process::Command;

/// The probe every QEMU-booting test starts with. On its own it is one more gated
/// test (QEMU present: it passes; missing: the rule); `rule_*` below run it as a child.
#[test]
fn qemu_probe() {
    require_host!("QEMU (qemu-system-x86_64)", has_qemu());
    println!("PROBE PASSED: QEMU is runnable");
}

/// Run this test binary's `qemu_probe` alone with QEMU absent and `CI` as given
/// (`None`: unset); its exit success and its stdout+stderr.
fn probe_without_qemu(ci: Option<&str>) -> (bool, String) {
    let mut c = Command::new(std::env::current_exe().expect("test binary"));
    c.args(["--exact", "qemu_probe", "--nocapture", "--test-threads=1"])
        .env("ORNAMENT_QEMU", "/nonexistent/qemu-system-x86_64")
        .env("RUST_BACKTRACE", "0");
    match ci {
        Some(v) => c.env("CI", v),
        None => c.env_remove("CI"),
    };
    let out = c.output().expect("run the probe");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn rule_fails_under_ci_naming_qemu() {
    for ci in ["1", "true", "yes"] {
        let (ok, text) = probe_without_qemu(Some(ci));
        assert!(!ok, "CI={ci}: the probe passed without QEMU:\n{text}");
        assert!(
            text.contains("qemu_probe needs QEMU (qemu-system-x86_64): cannot run /nonexistent/qemu-system-x86_64"),
            "CI={ci}: the failure does not name QEMU and why:\n{text}"
        );
        assert!(text.contains("CI is set"), "CI={ci}:\n{text}");
        assert!(!text.contains("SKIPPED"), "CI={ci}:\n{text}");
        assert!(!text.contains("PROBE PASSED"), "CI={ci}:\n{text}");
        assert!(
            text.contains("test result: FAILED. 0 passed; 1 failed"),
            "CI={ci}:\n{text}"
        );
    }
}

#[test]
fn rule_skips_with_a_message_outside_ci() {
    for ci in [None, Some(""), Some("0"), Some("false")] {
        let (ok, text) = probe_without_qemu(ci);
        assert!(ok, "CI={ci:?}: the probe failed outside CI:\n{text}");
        assert!(
            text.contains("SKIPPED: qemu_probe needs QEMU (qemu-system-x86_64): cannot run /nonexistent/qemu-system-x86_64"),
            "CI={ci:?}: no SKIPPED line naming QEMU:\n{text}"
        );
        assert!(!text.contains("PROBE PASSED"), "CI={ci:?}:\n{text}");
        assert!(
            text.contains("test result: ok. 1 passed"),
            "CI={ci:?}:\n{text}"
        );
    }
}
