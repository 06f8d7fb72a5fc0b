//! List the tasks of a running guest from outside: `live_ps <profile.json> <guest RAM file>
//! <qemu 'info registers -a' output>`.
//!
//! The RAM file is QEMU's `memory-backend-file` (guest-physical address == file offset
//! below 3 GiB). Registers come from the QEMU monitor of a stopped guest. Only the
//! page tables (CR3) are needed to find the KASLR slides.

use ornament_engine::{Gpa, MemError, PhysMemory, Regs};
use ornament_introspect::identity::verify_banner;
use ornament_introspect::kaslr::detect_by_banner;
use ornament_introspect::kernel::Kernel;
use ornament_introspect::profile::Profile;
use ornament_introspect::task::TaskReader;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

/// Guest RAM read from a file with `pread`.
#[derive(Debug)]
struct FileMemory {
    file: std::fs::File,
    size: u64,
}

impl PhysMemory for FileMemory {
    fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), MemError> {
        let err = MemError::OutOfRange {
            gpa,
            len: buf.len() as u64,
        };
        match gpa.raw().checked_add(buf.len() as u64) {
            Some(end) if end <= self.size => {
                self.file.read_exact_at(buf, gpa.raw()).map_err(|_| err)
            }
            _ => Err(err),
        }
    }
    fn write_phys(&self, _: Gpa, _: &[u8]) -> Result<(), MemError> {
        Err(MemError::ReadOnly)
    }
    fn size(&self) -> u64 {
        self.size
    }
}

fn hex_after(text: &str, key: &str) -> Option<u64> {
    let rest = &text[text.find(key)? + key.len()..];
    let word = rest.split_whitespace().next()?;
    u64::from_str_radix(word, 16).ok()
}

/// Registers of each CPU from `info registers -a`.
fn parse_regs(text: &str) -> Vec<Regs> {
    text.split("CPU#")
        .skip(1)
        .filter_map(|block| {
            let gs_line = block.lines().find(|l| l.starts_with("GS ="))?;
            let gs_base = gs_line.split_whitespace().nth(2)?;
            let cs_line = block.lines().find(|l| l.starts_with("CS ="))?;
            Some(Regs {
                rip: hex_after(block, "RIP=")?,
                cs: u64::from_str_radix(cs_line.get(4..8)?, 16).ok()?,
                cr3: hex_after(block, "CR3=")?,
                cr4: hex_after(block, "CR4=")?,
                gs_base: u64::from_str_radix(gs_base, 16).ok()?,
                ..Regs::default()
            })
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [profile, ram, regs] = args.as_slice() else {
        return Err("usage: live_ps <profile.json> <ram file> <info-registers.txt>".into());
    };
    let profile = Profile::load(profile)?;
    let file = std::fs::File::open(ram)?;
    let size = file.metadata()?.len();
    let mem = FileMemory { file, size };
    let cpus = parse_regs(&std::fs::read_to_string(regs)?);
    let first = cpus.first().ok_or("no CPU registers found")?;

    let t = Instant::now();
    let layout = detect_by_banner(&mem, &profile, first)?;
    println!(
        "KASLR: virt_slide={:#x} phys_slide={:#x} ({:?})",
        layout.virt_slide,
        layout.phys_slide,
        t.elapsed()
    );
    verify_banner(&mem, &layout, &profile)?;
    println!("banner matches {}", profile.kernel.release);
    let kernel = Kernel::new(&mem, &profile, layout);
    println!("page_offset_base={:#x}", kernel.page_offset_base()?);
    let reader = TaskReader::new(&kernel)?;
    for (i, r) in cpus.iter().enumerate() {
        let vm = kernel.kernel_vm(r);
        let cur = kernel.current_task(r)?;
        println!(
            "cpu{i}: rip={:#x} current={cur} comm={:?} pid={:?}",
            r.rip,
            reader.comm(&vm, cur),
            reader.pid(&vm, cur)
        );
    }
    let vm = kernel.kernel_vm(first);
    let t = Instant::now();
    let walk = reader.processes(&vm, 100_000)?;
    let infos: Vec<_> = walk
        .tasks
        .iter()
        .map(|&task| reader.read(&vm, task))
        .collect();
    let took = t.elapsed();
    println!(
        "{:>5} {:>5} {:>5} {:>4} {:<16} {:<22} {:<16} ARGV",
        "PID", "TGID", "PPID", "UID", "COMM", "EXE", "IN SYSCALL"
    );
    for i in &infos {
        let argv = match &i.argv {
            Ok(Some(a)) => format!("{:?}{}", a.args, if a.truncated { "..." } else { "" }),
            Ok(None) => "[kernel thread]".into(),
            Err(u) => format!("<unreadable at {}>", u.at),
        };
        let exe = match &i.exe_path {
            Ok(Some(p)) => p.clone(),
            Ok(None) => "-".into(),
            Err(u) => format!("<unreadable at {}>", u.at),
        };
        let in_syscall = match (i.is_kernel_thread, reader.user_regs(&vm, i.task)) {
            (Ok(false), Ok(r)) => u32::try_from(r.orig_ax)
                .ok()
                .and_then(|nr| profile.syscall_name(nr))
                .unwrap_or("-")
                .to_owned(),
            _ => "-".into(),
        };
        println!(
            "{:>5} {:>5} {:>5} {:>4} {:<16} {:<22} {:<16} {}",
            i.pid.map_or("?".into(), |v| v.to_string()),
            i.tgid.map_or("?".into(), |v| v.to_string()),
            i.ppid.map_or("?".into(), |v| v.to_string()),
            i.uid.map_or("?".into(), |v| v.to_string()),
            i.comm.clone().unwrap_or_else(|_| "?".into()),
            exe,
            in_syscall,
            argv
        );
    }
    println!(
        "{} processes, walk ended {:?}; walk + full reads took {:?} ({:?} per task)",
        infos.len(),
        walk.end,
        took,
        took / u32::try_from(infos.len().max(1)).unwrap_or(1)
    );
    Ok(())
}
