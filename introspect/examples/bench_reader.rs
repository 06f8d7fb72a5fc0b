//! Cost of the readers on a synthetic guest (memory reads are plain copies, as with a
//! mapped RAM file): `cargo run --release -p ornament-introspect --example bench_reader`.

use ornament_engine::Gva;
use ornament_introspect::kernel::Kernel;
use ornament_introspect::paging::translate;
use ornament_introspect::profile::Profile;
use ornament_introspect::task::TaskReader;
use ornament_introspect::testing::{SynthConfig, SynthGuest, TaskSpec};
use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

fn per_op(n: u32, f: impl FnMut()) -> std::time::Duration {
    let mut f = f;
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed() / n
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles/6.1.0-50-cloud-amd64.json");
    let profile = Profile::load(&path)?;
    let mut g = SynthGuest::new(profile, SynthConfig::default())?;
    let init = g.add_task(&TaskSpec::user(1, "init", "/sbin/init", &["/sbin/init"]))?;
    let mut spec = TaskSpec::user(
        42,
        "worker",
        "/usr/local/bin/worker",
        &["worker", "--flag", "value"],
    );
    spec.parent = Some(init);
    let task = g.add_task(&spec)?;
    for pid in 100..200 {
        g.add_task(&TaskSpec::kthread(pid, "kworker"))?;
    }
    g.set_current(0, task)?;
    let kernel = Kernel::new(&g.phys.mem, &g.profile, g.layout);
    let reader = TaskReader::new(&kernel)?;
    let regs = g.regs_kernel(0, Gva(0));
    let vm = kernel.kernel_vm(&regs);
    let n = 20_000;
    let walk = per_op(n, || {
        black_box(translate(&g.phys.mem, g.root, black_box(task)).ok());
    });
    println!("page walk (4-level, no cache):        {walk:?}");
    println!(
        "current_task (cached walks):          {:?}",
        per_op(n, || {
            black_box(kernel.current_task(&regs).ok());
        })
    );
    println!(
        "pid + tgid + comm:                    {:?}",
        per_op(n, || {
            black_box((
                reader.pid(&vm, task).ok(),
                reader.tgid(&vm, task).ok(),
                reader.comm(&vm, task).ok(),
            ));
        })
    );
    println!(
        "user_regs (11 pt_regs fields):        {:?}",
        per_op(n, || {
            black_box(reader.user_regs(&vm, task).ok());
        })
    );
    println!(
        "full TaskInfo (exe path, argv, creds): {:?}",
        per_op(n, || {
            black_box(reader.read(&vm, task));
        })
    );
    let uncached = ornament_introspect::vmem::VirtMem::new(&g.phys.mem, vm.root());
    println!(
        "full TaskInfo, no translation cache:  {:?}",
        per_op(n, || {
            black_box(reader.read(&uncached, task));
        })
    );
    println!(
        "process list walk (102 tasks):        {:?}",
        per_op(2_000, || {
            black_box(reader.processes(&vm, 100_000).ok());
        })
    );
    Ok(())
}
