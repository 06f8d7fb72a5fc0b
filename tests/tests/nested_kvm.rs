//! Issue #14: our own VMM on hardware-KVM semantics. The project's hosts have PVM, not
//! VT-x/AMD-V, so `scripts/nested-kvm` boots an L1 Linux under QEMU TCG with an emulated
//! AMD SVM CPU, where Debian's `kvm_amd` gives a real SVM `/dev/kvm`, and runs
//! `scripts/nested-kvm-suite` inside it: `ornament run --engine kvm` (no `--force`, the
//! default quiet command line) on 1, 2 and 4 vCPUs, the KVM crate's own test binaries,
//! and its real-kernel workload test with each trap backend on 2 vCPUs. One L1 boot
//! (4-8 minutes on 2 shared cores) serves every check below.

use ornament_tests::schema::{check_lineage, check_schema};
use ornament_tests::signals::check_signal_events;
use ornament_tests::threads::check_thread_exec;
use ornament_tests::workload::{check_workload_events, events};
use ornament_tests::{can_build_images, has_qemu, ornament_bin, require_host};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The whole nested run's time box, in seconds (issue budget: ~15 minutes).
const NESTED_TIMEOUT_SECS: &str = "900";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// Build the KVM crate's test binaries (a no-op when fresh) and return
/// (name without the hash, path) of each.
fn kvm_test_binaries() -> Vec<(String, PathBuf)> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace_root())
        .args([
            "test",
            "-p",
            "ornament-kvm",
            "--no-run",
            "--message-format=json",
        ])
        .output()
        .expect("run cargo test --no-run");
    assert!(
        out.status.success(),
        "building the KVM tests failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(m) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if m["reason"] != "compiler-artifact" || m["profile"]["test"] != true {
            continue;
        }
        if let Some(exe) = m["executable"].as_str() {
            let name = m["target"]["name"]
                .as_str()
                .expect("target name")
                .to_owned();
            bins.push((name, PathBuf::from(exe)));
        }
    }
    bins.sort();
    bins
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name))
        .unwrap_or_else(|e| panic!("{name} did not come back from L1: {e}"))
}

fn status(dir: &Path, step: &str) -> i32 {
    read(dir, &format!("{step}.status"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{step}.status: {e}"))
}

#[test]
fn our_vmm_on_nested_svm_gives_exit_status_events_and_passes_its_tests() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    let bins = kvm_test_binaries();
    let names: Vec<&str> = bins.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["boot", "engine", "guests", "linux", "ornament_kvm"]);
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("out");
    let mut c = Command::new(workspace_root().join("scripts/nested-kvm"));
    c.arg("--out")
        .arg(&out)
        .arg("--ornament")
        .arg(ornament_bin())
        .args(["--timeout", NESTED_TIMEOUT_SECS]);
    for (_, b) in &bins {
        c.arg("--bin").arg(b);
    }
    let started = std::time::Instant::now();
    let st = c.status().expect("run scripts/nested-kvm");
    let console = std::fs::read_to_string(out.join("console.log")).unwrap_or_default();
    eprintln!(
        "nested suite: {:.0} s; its log:\n{}",
        started.elapsed().as_secs_f64(),
        std::fs::read_to_string(out.join("suite.log")).unwrap_or_default()
    );
    assert_eq!(
        st.code(),
        Some(0),
        "scripts/nested-kvm; L1 console:\n{console}"
    );

    // L1 is what it should be: 2 vCPUs with SVM, kvm_amd loaded, /dev/kvm there.
    assert_eq!(read(&out, "svm-cpus").trim(), "2");
    let modules = read(&out, "modules");
    assert!(modules.lines().any(|m| m == "kvm_amd"), "{modules}");
    assert!(!modules.lines().any(|m| m == "kvm_pvm"), "{modules}");
    assert!(read(&out, "dev-kvm").contains("/dev/kvm"));

    // doctor: hardware KVM, every trap backend self-tested with its cost per hit, and
    // auto picking our VMM.
    let doctor = read(&out, "doctor.out");
    assert_eq!(status(&out, "doctor"), 0, "{doctor}");
    assert!(doctor.lines().any(|l| l == "kvm: hardware"), "{doctor}");
    for trap in ["patched-site", "debug-regs"] {
        let line = doctor
            .lines()
            .find(|l| l.starts_with(&format!("kvm trap {trap}:")))
            .unwrap_or_else(|| panic!("doctor reports no {trap} backend:\n{doctor}"));
        assert!(
            line.contains(": works (") && line.ends_with(" us per hit)"),
            "{line}"
        );
    }
    assert!(doctor.contains("kvm exit round trip: "), "{doctor}");
    assert!(
        doctor.contains("engine auto: engine kvm: KVM is hardware"),
        "{doctor}"
    );

    // The command's exit status, without --force, on our VMM, which auto picks, booting
    // the bzImage given as --kernel (decompressed by ornament; profile made from it).
    let err = read(&out, "exit7.err");
    assert_eq!(status(&out, "exit7"), 7, "{err}");
    assert!(
        err.contains("ornament: engine kvm: KVM is hardware virtualization here"),
        "{err}"
    );
    // The guest keeps time with kvmclock (KVM's paravirtual clock, offered through the
    // CPUID leaves KVM reports as supported), and the CMOS RTC gave it the date.
    assert!(
        err.contains("clocksource: Switched to clocksource kvm-clock"),
        "{err}"
    );
    assert!(err.contains("setting system clock to 20"), "{err}");
    // The profile made from the bzImage names the arm point, so probes are armed at
    // kernel_execve, not at the console's `Run /init`.
    assert!(!err.contains("no arm point"), "{err}");

    // The workload's events are exactly its ground truth, on 1, 2 and 4 vCPUs, with the
    // console quiet (the kernel never printed `Run /init`: arming did not need it).
    for v in ["1", "2", "4"] {
        let step = format!("events-{v}");
        let err = read(&out, &format!("{step}.err"));
        assert_eq!(status(&out, &step), 0, "{step}: {err}");
        assert!(
            !err.contains("Run /init"),
            "{step}: the console was not quiet"
        );
        let evs = events(&out.join(format!("{step}.json")));
        check_workload_events(&err, &evs, false);
        // Schema 2 holds on our VMM too: every event validates, and each exec_id
        // joins children to their parents.
        check_schema(&evs);
        check_lineage(&evs);
    }

    // Signals through our VMM's fentry traps: generated and delivered, exactly as the
    // workload says.
    let err = read(&out, "signals-2.err");
    assert_eq!(status(&out, "signals-2"), 0, "signals-2: {err}");
    let evs = events(&out.join("signals-2.json"));
    check_schema(&evs);
    check_signal_events(&err, &evs);

    // An exec by a thread that is not the leader: the same ground truth as on QEMU.
    let err = read(&out, "threadexec-2.err");
    assert_eq!(status(&out, "threadexec-2"), 0, "threadexec-2: {err}");
    let evs = events(&out.join("threadexec-2.json"));
    check_schema(&evs);
    check_thread_exec(&err, &evs);

    // --block-signal: the shell's kill -TERM was refused (EPERM, at kill's entry function)
    // and the target says it never got a signal.
    let err = read(&out, "block-signal.err");
    assert_eq!(status(&out, "block-signal"), 0, "block-signal: {err}");
    assert!(err.contains("W no-signal pid="), "{err}");
    assert!(err.contains("W kill rc=1"), "{err}");

    // The KVM crate's own tests, every one passing on SVM (L1 runs them with CI=true,
    // so a missing prerequisite fails them rather than skipping).
    let mut steps: Vec<String> = bins.iter().map(|(n, _)| format!("test-{n}")).collect();
    // The real kernel's workload with exact probe counts, each backend on 2 vCPUs
    // (an `#[ignore]`d test of the `linux` binary, opted in inside L1).
    steps.extend(["linux-patched-site-2".into(), "linux-debug-regs-2".into()]);
    for step in &steps {
        let text = read(&out, &format!("{step}.out"));
        let text = format!("{text}\n{}", read(&out, &format!("{step}.err")));
        assert_eq!(status(&out, step), 0, "{step}:\n{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("test result: ok.") && l.contains(" 0 failed")),
            "{step}:\n{text}"
        );
        if step.starts_with("linux-") {
            assert!(
                text.contains("test result: ok. 1 passed"),
                "{step}:\n{text}"
            );
            // A hung first attempt (killed, then run once more by the suite) is said
            // loudly: it passed, but the hang is a bug to find.
            if let Ok(why) = std::fs::read_to_string(out.join(format!("{step}.retried"))) {
                let hung = std::fs::read_to_string(out.join(format!("{step}.hung.err")))
                    .unwrap_or_default();
                eprintln!("WARNING nested-kvm: {}first attempt's stderr:\n{hung}", why);
            }
        }
    }
}
