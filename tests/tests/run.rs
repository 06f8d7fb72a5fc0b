//! `ornament run` on real Debian guests through the QEMU engine: commands run,
//! their output and exit status come back, the guest sees its vCPUs.

use ornament_tests::{
    assert_nothing_left, can_build_images, has_qemu, ornament, require_host, run_in_guest,
    send_signal, wait_until, Background, GUEST_TIMEOUT_SECS,
};
use std::time::{Duration, Instant};

#[test]
fn echo_on_one_vcpu() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    let (r, rt) = run_in_guest(&["--vcpus", "1"], &["echo", "hello from ornament's guest"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stderr.contains("\nhello from ornament's guest\n"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("ornament: engine qemu"),
        "engine choice not said: {}",
        r.stderr
    );
    assert_nothing_left(&r, rt.path());
}

#[test]
fn two_vcpus_are_seen_and_exit_status_comes_back() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    let (r, rt) = run_in_guest(
        &["--vcpus", "2"],
        &["sh", "-c", "echo cpus=$(nproc); exit 7"],
    );
    assert_eq!(r.code, Some(7), "{}", r.stderr);
    assert!(r.stderr.contains("cpus=2"), "{}", r.stderr);
    assert_nothing_left(&r, rt.path());
}

#[test]
fn one_vcpu_is_seen_and_arguments_arrive_exactly() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    let (r, _rt) = run_in_guest(
        &[],
        &[
            "sh",
            "-c",
            "echo \"cpus=$(nproc) argc=$# [$1] [$2]\"",
            "sh",
            "a b",
            "it's $HOME",
        ],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stderr.contains("cpus=1 argc=2 [a b] [it's $HOME]"),
        "{}",
        r.stderr
    );
}

#[test]
fn killed_command_gives_128_plus_signal() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    let (r, _rt) = run_in_guest(&[], &["sh", "-c", "kill -9 $$"]);
    assert_eq!(r.code, Some(128 + 9), "{}", r.stderr);
}

#[test]
fn demo_runs_without_a_command() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    let timeout = GUEST_TIMEOUT_SECS.to_string();
    let (r, _rt) = ornament(&["run", "--timeout", &timeout]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    for i in 1..=2 {
        assert!(
            r.stderr.contains(&format!("exited with {i}\n")),
            "{}",
            r.stderr
        );
    }
    // The default image's kernel: the newest of its flavour when it was built.
    let img = ornament_images::build_image(
        ornament_images::DEFAULT_IMAGE,
        &ornament_images::BuildOptions::default(),
    )
    .expect("the default image, as the run used it");
    assert!(
        r.stderr.contains(&format!("{}\n", img.release)),
        "uname -r of the exec'd child, {}: {}",
        img.release,
        r.stderr
    );
    assert!(r.stderr.contains("demo: done"), "{}", r.stderr);
}

#[test]
fn added_file_is_in_the_guest() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join("note.txt");
    std::fs::write(&f, "carried into the guest\n").expect("write");
    let spec = format!("{}:/opt/ornament-test/note.txt", f.display());
    let (r, _rt) = run_in_guest(&["--add", &spec], &["cat", "/opt/ornament-test/note.txt"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stderr.contains("carried into the guest"), "{}", r.stderr);
}

#[test]
fn kernel_6_12_boots_and_runs_a_command() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    let (r, rt) = run_in_guest(
        &["--image", "debian-6.12-cloud", "--vcpus", "2"],
        &["sh", "-c", "uname -r; nproc"],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let img = ornament_images::build_image(
        "debian-6.12-cloud",
        &ornament_images::BuildOptions::default(),
    )
    .expect("the 6.12 image, as the run used it");
    assert!(img.release.starts_with("6.12."), "{}", img.release);
    assert!(
        r.stderr.contains(&format!("{}\n", img.release)),
        "{}: {}",
        img.release,
        r.stderr
    );
    assert!(r.stderr.contains("\n2\n"), "{}", r.stderr);
    assert_nothing_left(&r, rt.path());
}

/// `ornament run` in the background (its own process group, as a shell job) with a
/// guest command.
fn start_in_guest(extra: &[&str], cmd: &[&str]) -> Background {
    let timeout = GUEST_TIMEOUT_SECS.to_string();
    let mut args = vec!["run", "--engine", "qemu", "--timeout", &timeout];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(cmd);
    Background::start(&args, &[])
}

/// One Ctrl-C in a terminal: SIGINT to ornament's whole process group.
fn ctrl_c(run: &Background) {
    send_signal("INT", &format!("-{}", run.pid));
}

fn expect_interrupted(run: Background) {
    let (r, rt) = run.wait(Duration::from_secs(60));
    assert_eq!(r.code, Some(130), "{}", r.stderr);
    assert!(!r.stderr.contains("panic"), "{}", r.stderr);
    assert_nothing_left(&r, rt.path());
}

#[test]
fn ctrl_c_to_the_process_group_exits_130_at_every_stage() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    let (r, _rt) = ornament(&["image", "build"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    // Before QEMU runs (the engine is chosen, the image not yet prepared).
    let mut run = start_in_guest(&["--watch", "exit"], &["true"]);
    run.wait_for_stderr("ornament: engine", Duration::from_secs(30));
    ctrl_c(&run);
    expect_interrupted(run);
    // While the kernel is identified (QEMU is up, the guest not yet observed).
    let mut run = start_in_guest(&["--watch", "exit"], &["sleep", "60"]);
    assert!(
        wait_until(Duration::from_secs(60), || !run.qemu_pids().is_empty()
            || run.has_exited()),
        "{}",
        run.stderr()
    );
    std::thread::sleep(Duration::from_millis(700));
    ctrl_c(&run);
    expect_interrupted(run);
    // While the command runs, with and without events.
    for extra in [&["--watch", "exit"][..], &[]] {
        let mut run = start_in_guest(extra, &["sh", "-c", "echo ornament-test-ready; sleep 60"]);
        run.wait_for_stderr("ornament-test-ready", Duration::from_secs(240));
        ctrl_c(&run);
        expect_interrupted(run);
    }
}

#[test]
fn qemu_killed_by_a_signal_is_reported_as_such() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    for extra in [&["--watch", "exit"][..], &[]] {
        let mut run = start_in_guest(extra, &["sh", "-c", "echo ornament-test-ready; sleep 60"]);
        run.wait_for_stderr("ornament-test-ready", Duration::from_secs(240));
        let qemu = run.qemu_pids();
        assert_eq!(qemu.len(), 1, "{qemu:?}");
        send_signal("KILL", &qemu[0].to_string());
        let (r, rt) = run.wait(Duration::from_secs(60));
        assert_eq!(r.code, Some(125), "{}", r.stderr);
        assert!(
            r.stderr.contains(
                "QEMU was killed by signal 9 (SIGKILL) while the guest ran (QEMU itself died: not a guest kernel panic)"
            ),
            "{extra:?}: {}",
            r.stderr
        );
        assert!(!r.stderr.contains("kernel panic?"), "{}", r.stderr);
        assert_nothing_left(&r, rt.path());
    }
}

#[test]
fn guest_panic_is_detected_even_with_panic_0() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    // panic=0: the kernel would spin forever after the panic; ornament stops it.
    let begin = Instant::now();
    let (r, rt) = run_in_guest(
        &["--append", "panic=0"],
        &["sh", "-c", "echo c > /proc/sysrq-trigger"],
    );
    assert_eq!(r.code, Some(125), "{}", r.stderr);
    assert!(
        r.stderr.contains(
            "ornament: error: the guest kernel panicked: Kernel panic - not syncing: sysrq triggered crash"
        ),
        "{}",
        r.stderr
    );
    assert!(
        begin.elapsed() < Duration::from_secs(120),
        "{:?}",
        begin.elapsed()
    );
    assert_nothing_left(&r, rt.path());
    // The default (panic=-1: reboot, which ends QEMU) says the same.
    let (r, _rt) = run_in_guest(&[], &["sh", "-c", "echo c > /proc/sysrq-trigger"]);
    assert_eq!(r.code, Some(125), "{}", r.stderr);
    assert!(
        r.stderr.contains(
            "the guest kernel panicked: Kernel panic - not syncing: sysrq triggered crash"
        ),
        "{}",
        r.stderr
    );
}

#[test]
fn kernel_package_pins_the_kernel_the_guest_runs() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    let pin = ornament_tests::reference_package(ornament_images::DEFAULT_IMAGE);
    let (r, rt) = run_in_guest(&["--kernel-package", pin], &["uname", "-r"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stderr.contains("\n6.1.0-50-cloud-amd64\n"),
        "{}",
        r.stderr
    );
    assert_nothing_left(&r, rt.path());
    // --kernel boots a file: a package for it would mean nothing.
    let (r, _rt) = ornament(&[
        "run",
        "--kernel",
        "/nonexistent",
        "--kernel-package",
        pin,
        "--",
        "true",
    ]);
    assert_eq!(r.code, Some(125), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("the argument '--kernel <FILE>' cannot be used with '--kernel-package <NAME[=VERSION]>'"),
        "{}",
        r.stderr
    );
}
