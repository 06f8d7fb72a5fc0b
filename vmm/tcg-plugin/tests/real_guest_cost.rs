//! The TCG plugin's per-hit cost on a real guest: a measurement, ignored by default (see
//! `support` for the inputs).
#![allow(missing_docs, clippy::cast_possible_truncation)]

mod support;

use ornament_engine::wire::{MemRead, ProbeSpec, Reg, RegMask};
use ornament_engine::Action;
use ornament_test_gate::require;
use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;
use support::*;

/// Per-hit cost on a getppid loop, in one boot with the plugin (no probe at the address /
/// probe reporting registers and a memory read / callback present but disarmed / probe
/// reporting no registers / probe reporting registers only) and one boot without the plugin. Prints the numbers; run with
/// `cargo test --release -p ornament-tcg-plugin --test real_guest_cost -- --ignored --nocapture`.
#[test]
#[ignore = "measurement, prints numbers"]
fn measure_per_hit_cost() {
    let e = require!(INPUTS, env());
    let n = 20_000u64;
    let rounds: usize = std::env::var("ORNAMENT_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(2);
    let per_call = |o: &Outcome| -> Vec<i64> {
        o.serial
            .lines()
            .filter(|l| l.starts_with("WL getppid"))
            .map(|l| field(l, "min_chunk_ns_per_call"))
            .collect()
    };
    for round in 0..rounds {
        // Without the plugin: same kernel, same workload, same RAM file backend.
        let ram = PathBuf::from(format!(
            "/dev/shm/ornament-plugin-bench-{}",
            std::process::id()
        ));
        let t0 = Instant::now();
        let mut c = e.spawn_qemu(
            1,
            &format!("getppid {n} getppid {n} getppid {n} getppid {n}"),
            None,
            &ram,
        );
        let mut s = String::new();
        let _ = c.stdout.take().expect("stdout").read_to_string(&mut s);
        let _ = c.wait();
        let _ = std::fs::remove_file(&ram);
        let bare: Vec<i64> = s
            .lines()
            .filter(|l| l.starts_with("WL getppid"))
            .map(|l| field(l, "min_chunk_ns_per_call"))
            .collect();
        let bare_wall = t0.elapsed();

        let mut marks = 0;
        let full = {
            let mut sp = ProbeSpec::regs(RegMask::of(&[
                Reg::Rip,
                Reg::Rdi,
                Reg::Rsi,
                Reg::GsBase,
                Reg::Cr3,
            ]));
            sp.mem[0] = MemRead::at_reg(Reg::GsBase, e.current_task_offset(), 8);
            sp
        };
        let o = run(
            &e,
            "bench",
            1,
            &format!(
                "getppid {n} mark getppid {n} mark getppid {n} mark getppid {n} mark getppid {n}"
            ),
            |l, _| {
                e.arm_mark(l, RegMask::NONE);
            },
            |l, h| {
                if h.hit.probe == P_MARK {
                    marks += 1;
                    match marks {
                        1 => e.arm_getppid(l, full),
                        2 => l.disarm(P_GETPPID).expect("disarm"),
                        3 => e.arm_getppid(l, ProbeSpec::regs(RegMask::NONE)),
                        _ => e.arm_getppid(l, ProbeSpec::regs(full.regs)),
                    }
                }
                Action::Continue
            },
        );
        let got = o.hits.iter().filter(|h| h.hit.probe == P_GETPPID).count() as u64;
        assert_eq!(got, 3 * n);
        let p = per_call(&o);
        eprintln!(
            "round {round}: ns per getppid (fastest tenth of each loop): no plugin {bare:?} (boot+run {bare_wall:?}); plugin: no probe {}, \
             probe (5 regs + 1 mem read) {}, probe disarmed {}, probe (no regs) {}, probe (5 regs) {} \
             (boot+run {:?}); hits {got}",
            p[0], p[1], p[2], p[3], p[4], o.wall
        );
    }
}
