//! Boot benchmark (issue #2): wall time from start to the guest's /init (first
//! output of the command) and to power-off, `ornament run` against plain
//! `qemu-system-x86_64` with the same kernel, initramfs and options, measured in
//! the same run and printed as ratios, each next to its target (ornament adds under
//! 10%: ratio < 1.10) with `met` or `missed`.
//!
//! `cargo bench -p ornament-tests --bench boot` (BENCH_RUNS=N, default 5).

use ornament_images::overlay::RunOverlay;
use ornament_images::{build_image, BuildOptions, DEFAULT_IMAGE};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MARK: &str = "ORNAMENT-BENCH-INIT";

/// Run `cmd`, timing the first line containing MARK on `stream` and the exit.
fn time_run(mut cmd: Command, marker_on_stderr: bool) -> (Duration, Duration) {
    cmd.stdin(Stdio::null());
    if marker_on_stderr {
        cmd.stderr(Stdio::piped()).stdout(Stdio::null());
    } else {
        cmd.stdout(Stdio::piped()).stderr(Stdio::null());
    }
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn");
    let reader: Box<dyn std::io::Read> = if marker_on_stderr {
        Box::new(child.stderr.take().expect("piped"))
    } else {
        Box::new(child.stdout.take().expect("piped"))
    };
    let mut to_init = None;
    for line in BufReader::new(reader).lines() {
        let Ok(line) = line else { break };
        if to_init.is_none() && line.contains(MARK) {
            to_init = Some(start.elapsed());
        }
    }
    let st = child.wait().expect("wait");
    let total = start.elapsed();
    assert!(st.success(), "run failed: {st}");
    (to_init.expect("marker seen"), total)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    ornament_tests::build_workspace_binaries();
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let img = build_image(DEFAULT_IMAGE, &BuildOptions::default()).expect("default image");
    let dir = tempfile::tempdir().expect("tmp");
    let initrd = dir.path().join("initramfs");
    RunOverlay {
        command: vec!["echo".into(), MARK.into()],
        add: vec![],
    }
    .write_combined(&img.initramfs(), &initrd)
    .expect("initramfs");
    let qemu = std::env::var("ORNAMENT_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let ornament = ornament_tests::ornament_bin();
    let cmdline = "console=ttyS0 panic=-1 quiet";
    let ram = dir.path().join("ram");
    let (mut plain, mut ours) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
    for i in 0..runs {
        let mut q = Command::new(&qemu);
        q.args([
            "-M",
            "pc",
            "-accel",
            "tcg,thread=multi",
            "-smp",
            "1",
            "-m",
            "512M",
        ])
        .arg("-object")
        .arg(format!(
            "memory-backend-file,id=m,size=512M,mem-path={},share=on",
            ram.display()
        ))
        .args([
            "-machine",
            "memory-backend=m",
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
        ])
        .args([
            "-display", "none", "-monitor", "none", "-serial", "stdio", "-serial", "null",
        ])
        .arg("-kernel")
        .arg(img.kernel())
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", cmdline]);
        let p = time_run(q, false);
        let _ = std::fs::remove_file(&ram);
        let mut o = Command::new(&ornament);
        o.args(["run", "--engine", "qemu", "--", "echo", MARK]);
        let r = time_run(o, true);
        println!(
            "run {i}: plain qemu {:>6.0} ms to /init, {:>6.0} ms total | ornament run {:>6.0} ms to /init, {:>6.0} ms total",
            p.0.as_secs_f64() * 1e3,
            p.1.as_secs_f64() * 1e3,
            r.0.as_secs_f64() * 1e3,
            r.1.as_secs_f64() * 1e3
        );
        plain.0.push(p.0);
        plain.1.push(p.1);
        ours.0.push(r.0);
        ours.1.push(r.1);
    }
    let (pi, pt, oi, ot) = (
        median(plain.0),
        median(plain.1),
        median(ours.0),
        median(ours.1),
    );
    println!(
        "median of {runs}: plain qemu {:.0} ms to /init, {:.0} ms to power-off",
        pi.as_secs_f64() * 1e3,
        pt.as_secs_f64() * 1e3
    );
    println!(
        "median of {runs}: ornament  {:.0} ms to /init, {:.0} ms to power-off",
        oi.as_secs_f64() * 1e3,
        ot.as_secs_f64() * 1e3
    );
    let (ri, rt) = (
        oi.as_secs_f64() / pi.as_secs_f64(),
        ot.as_secs_f64() / pt.as_secs_f64(),
    );
    println!("ratio ornament/plain: to /init {ri:.3}, to power-off {rt:.3}");
    for (what, r) in [("to /init", ri), ("to power-off", rt)] {
        println!(
            "{}",
            ornament_tests::target_line(
                &format!("boot {what}, ornament/plain"),
                "< 1.10",
                &format!("{r:.3}"),
                r < 1.10
            )
        );
    }
}
