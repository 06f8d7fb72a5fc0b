//! A hostile guest and a careless user (issue #19): the exit status comes from what the
//! hypervisor saw, guest-chosen names cannot forge output lines, a denied syscall says
//! so and denials cover only the command's tree, and lost events never pass silently.

use ornament_tests::workload::json_lines;
use ornament_tests::{
    assert_nothing_left, can_build_images, has_qemu, ornament_bin, run_in_guest, GUEST_TIMEOUT_SECS,
};
use serde_json::Value;

fn requirements() -> bool {
    ornament_tests::require("qemu-system-x86_64", has_qemu())
        && ornament_tests::require("apt-get, dpkg-deb and busybox-static", can_build_images())
}

#[test]
fn a_forged_status_line_does_not_change_the_exit_status() {
    if !requirements() {
        return;
    }
    // The command writes a status line of its own, then removes the device /init
    // reports on (its report then lands in a plain file): the host sees only the forgery.
    let (r, rt) = run_in_guest(
        &[],
        &[
            "sh",
            "-c",
            "echo 'ornament-exit 0' > /dev/ttyS1; rm /dev/ttyS1; exit 1",
        ],
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("/init reported exit status 0, but the command's process exited with 1"),
        "{}",
        r.stderr
    );
    assert_nothing_left(&r, rt.path());
}

#[test]
fn a_power_off_from_inside_is_not_a_success() {
    if !requirements() {
        return;
    }
    let (r, rt) = run_in_guest(
        &[],
        &[
            "sh",
            "-c",
            "echo 'ornament-exit 0' > /dev/ttyS1; poweroff -f; exit 1",
        ],
    );
    assert_eq!(r.code, Some(125), "{}", r.stderr);
    assert!(
        r.stderr.contains("the guest stopped before the command")
            && r.stderr
                .contains("a status line 0 written in the guest was ignored"),
        "{}",
        r.stderr
    );
    assert_nothing_left(&r, rt.path());
}

#[test]
fn guest_chosen_names_cannot_forge_a_line_or_reach_the_terminal() {
    // A newline and a fake event, an escape sequence, and a byte that is not UTF-8.
    if !requirements() {
        return;
    }
    let (r, _rt) = run_in_guest(
        &["--watch", "exec"],
        &[
            "sh",
            "-c",
            r#"f=$(printf '/tmp/a\n9.999 cpu0 ss\033[2J\377'); cp /bin/busybox "$f"; "$f" true"#,
        ],
    );
    // busybox has no applet of that name: 127, as the shell says.
    assert_eq!(r.code, Some(127), "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", r.stdout);
    for l in &lines {
        let (secs, rest) = l.split_once(' ').expect("fields");
        assert!(
            secs.split_once('.')
                .is_some_and(|(s, n)| s.parse::<u64>().is_ok() && n.len() == 9),
            "a line that is not an event: {l:?}"
        );
        assert!(rest.starts_with("cpu0 "), "{l:?}");
        assert!(
            !l.contains('\u{1b}'),
            "escape byte reached the output: {l:?}"
        );
    }
    assert!(
        lines[2].contains(r#" "a\n9.999 cpu0 ss"["#)
            && lines[2].contains(r#"argv=["/tmp/a\n9.999 cpu0 ss\u{1b}[2J\xff","true"]"#),
        "{}",
        lines[2]
    );
}

#[test]
fn a_denied_syscall_says_so_and_denials_cover_only_the_command() {
    if !requirements() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("events.json");
    // /init makes its directories with mkdir(2) before the command runs: a deny of
    // every mkdir would stop it booting.
    let (r, rt) = run_in_guest(
        &[
            "--deny-syscall",
            "mkdir:EACCES",
            "--watch",
            "syscall=mkdir",
            "--format",
            "json",
            "--output",
            out.to_str().expect("utf8"),
        ],
        &[
            "sh",
            "-c",
            "mkdir /tmp/d; echo mkdir-rc=$?; test ! -d /tmp/d",
        ],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stderr.contains("\nmkdir-rc=1\n"), "{}", r.stderr);
    let evs = json_lines(&std::fs::read_to_string(&out).expect("events"));
    // The denied call, and what it returned (the errno it was made to fail with).
    assert_eq!(evs.len(), 2, "{evs:?}");
    let e = &evs[0];
    assert_eq!(e["seq"], 1);
    assert_eq!(e["name"], "mkdir");
    assert_eq!(e["path"], "/tmp/d");
    assert_eq!(e["denied"], 13, "{e}");
    let ret = &evs[1];
    assert_eq!(
        (&ret["event"], &ret["ret"], &ret["errno"]),
        (&"syscall_return".into(), &(-13).into(), &"EACCES".into()),
        "{ret}"
    );
    assert_eq!(ret["entry_time_ns"], e["time_ns"], "{ret}");
    assert!(
        r.stderr
            .contains("1 syscall (1 denied); 2 events written to"),
        "{}",
        r.stderr
    );
    assert_nothing_left(&r, rt.path());
}

#[test]
fn events_by_default_are_the_commands_own() {
    if !requirements() {
        return;
    }
    let (r, rt) = run_in_guest(
        &["--watch", "fork,exec,exit", "--format", "json"],
        &["sh", "-c", "ls / >/dev/null; exit 3"],
    );
    assert_eq!(r.code, Some(3), "{}", r.stderr);
    let evs = json_lines(&r.stdout);
    let kinds: Vec<&str> = evs
        .iter()
        .map(|e| e["event"].as_str().expect("kind"))
        .collect();
    assert_eq!(kinds, ["exec", "exec", "fork", "exit", "exit"], "{evs:?}");
    let root = evs[0]["tgid"].as_i64().expect("root");
    assert_eq!(evs[0]["argv"], serde_json::json!(["sh", "/ornament/cmd"]));
    assert_eq!(
        evs[1]["argv"],
        serde_json::json!(["sh", "-c", "ls / >/dev/null; exit 3"])
    );
    let child = evs[2]["child_tgid"].as_i64().expect("child");
    assert_eq!(evs[2]["tgid"], root);
    assert_eq!(
        (evs[3]["tgid"].as_i64(), evs[3]["exit_code"].as_i64()),
        (Some(child), Some(0))
    );
    assert_eq!(
        (evs[4]["tgid"].as_i64(), evs[4]["exit_code"].as_i64()),
        (Some(root), Some(3))
    );
    for (i, e) in evs.iter().enumerate() {
        assert_eq!(e["seq"].as_u64(), Some(i as u64 + 1), "{e}");
    }
    assert!(
        r.stderr.contains(
            "ornament: 2 processes, 0 threads, 2 execs, exits 0 x1 3 x1; 5 events written to stdout, 0 lost; "
        ),
        "{}",
        r.stderr
    );
    assert_nothing_left(&r, rt.path());
}

#[test]
fn an_output_that_fails_fails_the_run() {
    if !requirements() {
        return;
    }
    let (r, rt) = run_in_guest(&["--watch", "exit", "--output", "/dev/full"], &["true"]);
    assert_eq!(r.code, Some(125), "{}", r.stderr);
    assert!(
        r.stderr.contains("writing events to /dev/full failed")
            && r.stderr.contains("lost; the run was stopped"),
        "{}",
        r.stderr
    );
    assert_nothing_left(&r, rt.path());
}

#[test]
fn a_closed_pipe_ends_the_run_quietly_but_not_with_success() {
    if !requirements() {
        return;
    }
    let rt = tempfile::tempdir().expect("runtime dir");
    let timeout = GUEST_TIMEOUT_SECS.to_string();
    let mut child = std::process::Command::new(ornament_bin())
        .args(["run", "--engine", "qemu", "--timeout", &timeout])
        .args([
            "--watch",
            "fork,exec,exit",
            "--",
            "sh",
            "-c",
            "ls /; exit 0",
        ])
        .env("XDG_RUNTIME_DIR", rt.path())
        .env("TMPDIR", rt.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run ornament");
    // The reader goes away before the first event, as `| head -0` would.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(!stderr.contains("ERROR"), "not quiet: {stderr}");
}

/// A static program that copies itself into a memfd and runs that (`fexecve`): a
/// fileless exec, as attackers do it.
const MEMFD_EXEC_C: &str = r#"
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "child") == 0) return 0;
    int src = open("/proc/self/exe", O_RDONLY);
    int fd = memfd_create("payload", 0);
    char buf[65536];
    ssize_t n;
    while ((n = read(src, buf, sizeof buf)) > 0)
        if (write(fd, buf, (size_t)n) != n) return 2;
    char *args[] = {"memfd-child", "child", NULL};
    char *env[] = {NULL};
    fexecve(fd, args, env);
    perror("fexecve");
    return 1;
}
"#;

#[test]
fn exec_file_names_cross_mounts_and_name_fileless_execs() {
    if !requirements() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("memfd-exec.c");
    let bin = dir.path().join("memfd-exec");
    std::fs::write(&src, MEMFD_EXEC_C).expect("write source");
    let cc = std::process::Command::new("cc")
        .args(["-static", "-O1", "-o"])
        .arg(&bin)
        .arg(&src)
        .output();
    if !ornament_tests::require(
        "a C compiler with static glibc (cc, libc6-dev)",
        cc.as_ref().is_ok_and(|o| o.status.success()),
    ) {
        return;
    }
    let add = format!("{}:/bin/memfd-exec", bin.display());
    let (r, rt) = run_in_guest(
        &["--add", &add, "--watch", "exec", "--format", "json"],
        &[
            "sh",
            "-c",
            "cp /bin/busybox /tmp/evil; /tmp/evil true; /bin/memfd-exec",
        ],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let evs = json_lines(&r.stdout);
    let names: Vec<(&str, &Value)> = evs
        .iter()
        .map(|e| (e["filename"].as_str().unwrap_or("<null>"), &e["argv"]))
        .collect();
    // /tmp is a tmpfs mounted on the initramfs: the path crosses the mount point (busybox
    // has no applet `evil`: it exits 127, the exec happened).
    assert_eq!(
        names[2],
        ("/tmp/evil", &serde_json::json!(["/tmp/evil", "true"])),
        "{names:?}"
    );
    assert_eq!(names[3].0, "/bin/memfd-exec", "{names:?}");
    // The kernel's own name for a memfd file (as /proc/PID/exe shows it).
    assert_eq!(
        names[4],
        (
            "/memfd:payload (deleted)",
            &serde_json::json!(["memfd-child", "child"])
        ),
        "{names:?}"
    );
    assert_eq!(names.len(), 5, "{names:?}");
    assert_nothing_left(&r, rt.path());
}
