//! Boot a kernel with the crate's recipe and copy its console to stdout.
//!
//! `cargo run -p ornament-kvm --example boot -- KERNEL [SECONDS] [VCPUS] [CMDLINE...]`
//! runs until the guest stops by itself or SECONDS (default 120) pass, then prints how
//! each vCPU ended. `ORNAMENT_INITRD=PATH` adds an initrd.

use ornament_kvm::builder::{build, ConsoleOutput, MachineConfig};
use ornament_kvm::machine::RunControl;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    // ORNAMENT_SAMPLE_MS=N: kick the vCPUs every N ms (with RUST_LOG=debug the run loop
    // logs each vCPU's RIP at the kick: a poor man's profiler).
    let sample_ms: Option<u64> = std::env::var("ORNAMENT_SAMPLE_MS")
        .ok()
        .and_then(|s| s.parse().ok());
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(kernel) = args.first() else {
        eprintln!("usage: boot KERNEL [SECONDS] [VCPUS] [CMDLINE...]");
        return ExitCode::FAILURE;
    };
    let secs: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(120);
    let vcpus: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let cmdline = if args.len() > 3 {
        args[3..].join(" ")
    } else {
        "earlyprintk=serial,ttyS0 console=ttyS0 noxsave nokaslr pci=off nowatchdog \
         clearcpuid=137,308,151 cryptomgr.notests panic=-1"
            .to_string()
    };
    let cfg = MachineConfig {
        kernel: kernel.into(),
        initrd: std::env::var_os("ORNAMENT_INITRD").map(Into::into),
        cmdline,
        vcpu_count: vcpus,
        mem_size_mib: 512,
        console: ConsoleOutput::CaptureAndStdout,
        pvm_compat: std::env::var_os("ORNAMENT_PVM_COMPAT").is_some(),
    };
    let mut m = match build(&cfg) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("build failed: {}", ornament_kvm::support::error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let control = RunControl::new();
    let done = AtomicBool::new(false);
    let start = Instant::now();
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                if start.elapsed() > Duration::from_secs(secs) {
                    control.request_stop();
                    return;
                }
                std::thread::sleep(Duration::from_millis(sample_ms.unwrap_or(100)));
                if sample_ms.is_some() {
                    control.kick();
                }
            }
        });
        let out = m.run(None, &|_, _| false, &control);
        done.store(true, Ordering::SeqCst);
        out
    });
    eprintln!("\n--- after {:?}:", start.elapsed());
    match out {
        Ok(v) => {
            for (i, o) in v.iter().enumerate() {
                let r = match &o.result {
                    Ok(r) => format!("{r:?}"),
                    Err(e) => ornament_kvm::support::error_chain(e),
                };
                eprintln!("vCPU {i}: {r}; {:?}", o.stats);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("run failed: {}", ornament_kvm::support::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
