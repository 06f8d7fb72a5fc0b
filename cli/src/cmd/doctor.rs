//! `ornament doctor`: what this host can do, one fact per line.

use crate::select::{self, kvm_kind, EngineChoice, KvmKind};
use anyhow::Result;
use serde::Serialize;

/// Print what this host can do (KVM, QEMU, which engine `auto` picks).
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Print one JSON object instead of lines.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    dev_kvm_present: bool,
    dev_kvm_accessible: bool,
    kvm: KvmKind,
    real_kernel_boots_under_kvm: bool,
    qemu: Option<String>,
    qemu_version: Option<String>,
    qemu_plugin_api: Option<u32>,
    auto_engine: String,
    auto_reason: String,
}

/// Run doctor.
pub fn run(a: DoctorArgs) -> Result<()> {
    let kind = kvm_kind();
    let qemu = ornament_qemu::probe(&ornament_qemu::qemu_binary(None));
    let (auto, reason) = match select::select(EngineChoice::Auto, false) {
        Ok((s, why)) => (format!("{s:?}"), why),
        Err(e) => ("none".to_owned(), e.to_string()),
    };
    let r = Report {
        dev_kvm_present: std::path::Path::new("/dev/kvm").exists(),
        dev_kvm_accessible: !matches!(kind, KvmKind::Absent | KvmKind::Inaccessible),
        kvm: kind,
        real_kernel_boots_under_kvm: kind == KvmKind::Hardware,
        qemu: qemu.as_ref().ok().map(|q| q.binary.display().to_string()),
        qemu_version: qemu.as_ref().ok().map(|q| {
            let (a, b, c) = q.version;
            format!("{a}.{b}.{c}")
        }),
        qemu_plugin_api: qemu.as_ref().ok().and_then(|q| q.plugin_api),
        auto_engine: auto,
        auto_reason: reason,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let yn = |b: bool| if b { "yes" } else { "no" };
    println!("/dev/kvm present: {}", yn(r.dev_kvm_present));
    println!("/dev/kvm accessible: {}", yn(r.dev_kvm_accessible));
    println!(
        "kvm: {}",
        serde_json::to_value(kind)?.as_str().unwrap_or("unknown")
    );
    println!(
        "real kernel boots under KVM: {}",
        yn(r.real_kernel_boots_under_kvm)
    );
    match &qemu {
        Ok(q) => {
            println!("qemu: {} ({})", q.binary.display(), q.version_line);
            match q.plugin_api {
                Some(v) => println!("qemu plugin api: v{v}"),
                None => println!("qemu plugin api: none"),
            }
        }
        Err(e) => println!("qemu: missing ({e})"),
    }
    println!("engine auto: {}", r.auto_reason);
    Ok(())
}
