//! Tracing-cost benchmark (issues #5 and #7), all measured in one run and
//! printed as ratios against the untraced workload:
//!
//! - a getppid loop: untraced; the plugin reporting getppid (one event per call);
//!   the plugin reporting only getpriority (getppid itself untraced: must cost
//!   nothing); the plugin reporting every syscall; in-guest `strace -f`;
//! - a fork+exec+wait loop: untraced; lifecycle events (fork, exec, exit);
//!   lifecycle + every syscall; one selected syscall; in-guest `strace -f`.
//!
//! The guest workload times itself (`ornament-workload bench-*`), so boot time
//! does not count. `cargo bench -p ornament-tests --bench trace`
//! (BENCH_GETPPID=N, BENCH_FORKEXEC=N).

use std::process::Command;

fn run(label: &str, extra: &[String], cmd: &[&str], key: &str) -> f64 {
    let bin = ornament_tests::ornament_bin();
    let out = Command::new(&bin)
        .arg("run")
        .args([
            "--engine",
            "qemu",
            "--timeout",
            "600",
            "--output",
            "/dev/null",
        ])
        .args(extra)
        .arg("--")
        .args(cmd)
        .output()
        .expect("run ornament");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{label}: {err}");
    err.lines()
        .filter(|l| l.starts_with("W bench"))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{key}=")))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or_else(|| panic!("{label}: no {key} in output: {err}"))
}

/// `--add` arguments that put the host's strace and its libraries in the guest.
fn strace_files() -> Vec<String> {
    let out = Command::new("ldd")
        .arg("/usr/bin/strace")
        .output()
        .expect("ldd strace");
    let mut files = vec!["/usr/bin/strace".to_owned()];
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let path = l
            .split("=>")
            .last()
            .unwrap_or(l)
            .split_whitespace()
            .next()
            .unwrap_or("");
        if path.starts_with('/') {
            files.push(path.to_owned());
        }
    }
    files
        .iter()
        .flat_map(|f| ["--add".to_owned(), format!("{f}:{f}")])
        .collect()
}

fn main() {
    let n_getppid = std::env::var("BENCH_GETPPID").unwrap_or_else(|_| "20000".into());
    let n_fork = std::env::var("BENCH_FORKEXEC").unwrap_or_else(|_| "200".into());
    let w = "/ornament/bin/ornament-workload";
    let strace = strace_files();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();

    println!("== getppid loop, {n_getppid} calls (ns per call) ==");
    let g = ["bench-getppid", n_getppid.as_str()];
    let gcmd: Vec<&str> = [w].iter().chain(g.iter()).copied().collect();
    let base = run("untraced", &[], &gcmd, "ns_per_call");
    let rows = [
        (
            "plugin: getppid reported",
            s(&["--watch", "syscall=getppid"]),
            gcmd.clone(),
        ),
        (
            "plugin: only getpriority reported",
            s(&["--watch", "syscall=getpriority"]),
            gcmd.clone(),
        ),
        (
            "plugin: every syscall reported",
            s(&["--watch", "syscall"]),
            gcmd.clone(),
        ),
        (
            "in-guest strace -f",
            strace.clone(),
            [&["strace", "-f", "-o", "/dev/null"][..], &gcmd].concat(),
        ),
    ];
    println!("{:<40} {:>10.1} ns  1.00x", "untraced", base);
    for (label, extra, cmd) in rows {
        let v = run(label, &extra, &cmd, "ns_per_call");
        println!(
            "{label:<40} {v:>10.1} ns  {:.2}x  (+{:.2} us per call)",
            v / base,
            (v - base) / 1000.0
        );
    }
    // The gdbstub backend stops the guest at every hit: fewer calls.
    let v = run(
        "gdbstub",
        &s(&["--trap", "gdbstub", "--watch", "syscall=getppid"]),
        &[w, "bench-getppid", "500"],
        "ns_per_call",
    );
    println!(
        "{:<40} {v:>10.1} ns  {:.2}x  (+{:.2} us per call; 500 calls)",
        "gdbstub: getppid reported",
        v / base,
        (v - base) / 1000.0
    );

    println!("== fork+exec+wait loop, {n_fork} iterations (us per iteration) ==");
    let f = ["bench-forkexec", n_fork.as_str()];
    let fcmd: Vec<&str> = [w].iter().chain(f.iter()).copied().collect();
    let base = run("untraced", &[], &fcmd, "ns_per_iter");
    let rows = [
        (
            "plugin: fork,exec,exit (3 events/iter)",
            s(&["--watch", "fork,exec,exit"]),
            fcmd.clone(),
        ),
        (
            "plugin: lifecycle + every syscall",
            s(&["--watch", "fork,exec,exit,syscall"]),
            fcmd.clone(),
        ),
        (
            "plugin: only getpriority reported",
            s(&["--watch", "syscall=getpriority"]),
            fcmd.clone(),
        ),
        (
            "in-guest strace -f",
            strace.clone(),
            [&["strace", "-f", "-o", "/dev/null"][..], &fcmd].concat(),
        ),
    ];
    println!("{:<40} {:>10.1} us  1.00x", "untraced", base / 1000.0);
    for (label, extra, cmd) in rows {
        let v = run(label, &extra, &cmd, "ns_per_iter");
        println!(
            "{label:<40} {:>10.1} us  {:.2}x  (+{:.1} us per iteration)",
            v / 1000.0,
            v / base,
            (v - base) / 1000.0
        );
    }
    let v = run(
        "gdbstub",
        &s(&["--trap", "gdbstub", "--watch", "fork,exec,exit"]),
        &[w, "bench-forkexec", "20"],
        "ns_per_iter",
    );
    println!(
        "{:<40} {:>10.1} us  {:.2}x  (+{:.1} us per iteration; 20 iterations)",
        "gdbstub: fork,exec,exit",
        v / 1000.0,
        v / base,
        (v - base) / 1000.0
    );
}
