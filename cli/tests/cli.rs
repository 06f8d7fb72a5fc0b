//! The command line itself: help texts, argument errors (no guest needed).
//! Also makes `cargo test --workspace` build the `ornament` binary that the
//! real-guest tests in `tests/` run.

use std::process::Command;

fn ornament(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_ornament"))
        .args(args)
        .output()
        .expect("run ornament");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The names under `Commands:` in a help text, in order.
fn commands_in_help(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// `--help` lists exactly the README's subcommands (with clap's `help`), the two that
/// group others list exactly theirs, and every leaf answers its own `--help`.
#[test]
fn help_names_every_subcommand() {
    let (code, out, _) = ornament(&["--help"]);
    assert_eq!(code, 0);
    assert_eq!(
        commands_in_help(&out),
        ["run", "image", "doctor", "ps", "resume", "profile", "help"],
        "{out}"
    );
    let groups: [(&str, &[&str]); 2] = [
        ("image", &["build", "list", "verify", "help"]),
        ("profile", &["generate", "help"]),
    ];
    for (group, subs) in groups {
        let (code, out, _) = ornament(&[group, "--help"]);
        assert_eq!(code, 0, "{group} --help");
        assert_eq!(commands_in_help(&out), subs, "{group} --help:\n{out}");
    }
    for leaf in [
        &["run"][..],
        &["doctor"],
        &["ps"],
        &["resume"],
        &["image", "build"],
        &["image", "list"],
        &["image", "verify"],
        &["profile", "generate"],
    ] {
        let mut args = leaf.to_vec();
        args.push("--help");
        let (code, out, err) = ornament(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
        let usage = format!("Usage: ornament {}", leaf.join(" "));
        assert!(
            out.contains(&usage),
            "{args:?} does not print {usage:?}:\n{out}"
        );
    }
}

#[test]
fn run_help_explains_the_options() {
    let (code, out, _) = ornament(&["run", "--help"]);
    assert_eq!(code, 0);
    for opt in [
        "--image",
        "--kernel",
        "--kernel-package",
        "--vcpus",
        "--memory",
        "--engine",
        "--append",
        "--add",
        "[COMMAND]...",
    ] {
        assert!(out.contains(opt), "missing {opt}: {out}");
    }
}

#[test]
fn initrd_needs_kernel() {
    let (code, _, err) = ornament(&["run", "--initrd", "/x", "--", "true"]);
    // A usage error is ornament failing: 125, as the README says (not clap's 2).
    assert_eq!(code, 125);
    assert!(err.contains("--kernel"), "{err}");
}

#[test]
fn bad_add_spec() {
    let (code, _, err) = ornament(&["run", "--add", "nocolon", "--", "true"]);
    assert_eq!(code, 125);
    assert!(err.contains("--add nocolon: expected HOST:GUEST"), "{err}");
}

#[test]
fn image_list_names_both_images() {
    let (code, out, _) = ornament(&["image", "list"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("debian-6.1-cloud") && out.contains("debian-6.12-cloud"),
        "{out}"
    );
}

#[test]
fn doctor_json_is_json() {
    let (code, out, _) = ornament(&["doctor", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
    assert!(
        v.get("kvm").is_some() && v.get("auto_engine").is_some(),
        "{v}"
    );
}
