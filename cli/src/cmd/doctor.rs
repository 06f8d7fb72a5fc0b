//! `ornament doctor`: what this host can do, one fact per line.

use crate::select::{self, EngineChoice};
use anyhow::Result;
use serde::Serialize;

/// Print what this host can do: /dev/kvm, the kind of KVM, each KVM trap
/// backend (self-tested with a tiny guest), the exit cost, QEMU and its plugin
/// API, and which engine and trap backend `auto` picks, and why.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Print one JSON object instead of lines.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct QemuReport {
    binary: String,
    version: String,
    plugin_api: Option<u32>,
    plugin_library: Option<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    kvm: ornament_kvm::support::HostSupport,
    qemu: Option<QemuReport>,
    qemu_error: Option<String>,
    auto_engine: String,
    auto_engine_reason: String,
    auto_trap: String,
    auto_trap_reason: String,
}

fn trap_choice(q: Option<&QemuReport>) -> (String, String) {
    match q {
        None => ("none".into(), "no QEMU".into()),
        Some(q) => match (q.plugin_api, &q.plugin_library) {
            (Some(v), Some(lib)) if v >= 4 => (
                "plugin".into(),
                format!("QEMU offers TCG plugin API v{v} and ornament's plugin is at {lib}: hits never stop the guest"),
            ),
            (Some(v), None) if v >= 4 => (
                "none".into(),
                "QEMU offers plugin API v4 but libornament_tcg_plugin.so is missing (cargo build -p ornament-tcg-plugin)".into(),
            ),
            (api, _) => (
                "gdbstub".into(),
                format!(
                    "QEMU's plugin API is {} (ornament's plugin needs v4, QEMU >= 10.0): every hit would stop the guest",
                    api.map(|v| format!("v{v}")).unwrap_or_else(|| "absent".into())
                ),
            ),
        },
    }
}

/// Run doctor.
pub fn run(a: DoctorArgs) -> Result<()> {
    let kvm = ornament_kvm::support::host_support();
    let qemu = ornament_qemu::probe(&ornament_qemu::qemu_binary(None));
    let qemu_report = qemu.as_ref().ok().map(|q| QemuReport {
        binary: q.binary.display().to_string(),
        version: {
            let (a, b, c) = q.version;
            format!("{a}.{b}.{c}")
        },
        plugin_api: q.plugin_api,
        plugin_library: ornament_qemu::engine::find_plugin().map(|p| p.display().to_string()),
    });
    let (auto, reason) = match select::select(EngineChoice::Auto, false, None) {
        Ok((s, why)) => (format!("{s:?}"), why),
        Err(e) => ("none".to_owned(), e.to_string()),
    };
    let (trap, trap_reason) = trap_choice(qemu_report.as_ref());
    let r = Report {
        kvm,
        qemu_error: qemu.as_ref().err().map(|e| e.to_string()),
        qemu: qemu_report,
        auto_engine: auto,
        auto_engine_reason: reason,
        auto_trap: trap,
        auto_trap_reason: trap_reason,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let yn = |b: bool| if b { "yes" } else { "no" };
    let k = &r.kvm;
    println!("/dev/kvm present: {}", yn(k.dev_kvm_present));
    let access = serde_json::to_value(k.access)?;
    println!(
        "/dev/kvm accessible: {}",
        access.as_str().unwrap_or("failed")
    );
    println!(
        "kvm: {}",
        serde_json::to_value(k.kind)?.as_str().unwrap_or("unknown")
    );
    if let Some(v) = k.api_version {
        println!("kvm api version: {v}");
    }
    if !k.missing_caps.is_empty() {
        println!("kvm missing capabilities: {}", k.missing_caps.join(", "));
    }
    if let Some(m) = k.max_vcpus {
        println!("kvm max vcpus: {m}");
    }
    println!(
        "real kernel boots under kvm: {}",
        yn(k.can_boot_real_kernel)
    );
    for t in &k.traps {
        let kind = serde_json::to_value(t.kind)?;
        let name = kind.as_str().unwrap_or("?");
        match (t.works, &t.reason) {
            (true, _) => println!(
                "kvm trap {name}: works{}",
                t.hit_ns
                    .map(|n| format!(" ({:.1} us per hit)", n / 1000.0))
                    .unwrap_or_default()
            ),
            (false, Some(why)) => println!("kvm trap {name}: fails ({why})"),
            (false, None) => println!("kvm trap {name}: fails"),
        }
    }
    if let Some(p) = &k.pvm_compat {
        match (p.works, &p.reason) {
            (true, _) => println!("kvm pvm compatibility mode: works (self-test: int3, fwait, clac/stac, syscall entry completed by the VMM)"),
            (false, Some(why)) => println!("kvm pvm compatibility mode: fails ({why})"),
            (false, None) => println!("kvm pvm compatibility mode: fails"),
        }
    }
    if let Some(ns) = k.exit_round_trip_ns {
        println!("kvm exit round trip: {:.1} us", ns / 1000.0);
    }
    if let Some(p) = &k.problem {
        println!("kvm problem: {p}");
    }
    match (&r.qemu, &r.qemu_error) {
        (Some(q), _) => {
            println!("qemu: {} (version {})", q.binary, q.version);
            match q.plugin_api {
                Some(v) => println!("qemu plugin api: v{v}"),
                None => println!("qemu plugin api: none"),
            }
        }
        (None, Some(e)) => println!("qemu: missing ({e})"),
        (None, None) => println!("qemu: missing"),
    }
    println!("engine auto: {}", r.auto_engine_reason);
    println!("trap auto: {} ({})", r.auto_trap, r.auto_trap_reason);
    Ok(())
}
