//! Generate a kernel profile: `gen_profile <System.map> <vmlinux|vmlinux.btf> <out.json>`.
//!
//! The CLI's `ornament profile generate` calls the same library function.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [map, btf, out] = args.as_slice() else {
        eprintln!("usage: gen_profile <System.map> <vmlinux|vmlinux.btf> <out.json>");
        return ExitCode::from(2);
    };
    let started = std::time::Instant::now();
    let result = ornament_introspect::profile::generate(map, btf).and_then(|p| {
        p.save(out)?;
        Ok(p)
    });
    match result {
        Ok(p) => {
            println!(
                "{}: {} symbols, {} syscalls, {} structs in {:?}",
                p.kernel.release,
                p.symbols.len(),
                p.syscall_numbers.len(),
                p.structs.len(),
                started.elapsed()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
