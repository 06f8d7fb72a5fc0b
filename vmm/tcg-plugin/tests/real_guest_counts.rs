//! Real-guest tests of the TCG plugin, counting: every hit of a known workload delivered
//! exactly once, on one and two vCPUs, and a byte range read at the hit (see `support` for
//! the inputs).
#![allow(missing_docs, clippy::cast_possible_truncation)]

mod support;

use ornament_engine::wire::{MemRead, ProbeSpec, Reg, RegMask};
use ornament_engine::{Action, Gva, ProbeId};
use ornament_test_gate::require;
use support::*;

fn counts_on(vcpus: u32) {
    let e = require!(INPUTS, env());
    let (n, m, pn) = (3000u64, 25u64, 2000u64);
    let mut marks = 0;
    let mut exits = 0u64;
    let conn = {
        let mut s = ProbeSpec::regs(RegMask::of(&[Reg::Rip, Reg::Rdi]));
        s.mem[0] = MemRead::at_reg(Reg::Rdi, e.comm_offset, 8);
        s
    };
    let o = run(
        &e,
        &format!("counts{vcpus}"),
        vcpus,
        &format!("mark fork {m} mark getppid {n} pgetppid {pn}"),
        |l, _| {
            e.arm_getppid(l, ProbeSpec::regs(RegMask::of(&[Reg::Rip])));
            l.add_candidate(P_FORK, e.sym("proc_fork_connector"), conn)
                .expect("cand");
            l.add_candidate(P_EXEC, e.sym("proc_exec_connector"), conn)
                .expect("cand");
            l.add_candidate(P_EXIT, e.sym("proc_exit_connector"), conn)
                .expect("cand");
            e.arm_mark(l, RegMask::of(&[Reg::Rip]));
        },
        |l, h| {
            // A child reaches `proc_exit_connector` only after `exit_notify` has woken its
            // parent, so with 2 vCPUs the parent's second mark can come before the last
            // child's exit hit. The exit probe is therefore disarmed at the later of the
            // second mark and the m-th exit; the pinned getppid child, forked after that,
            // exits after it and must not be counted.
            if h.hit.probe == P_EXIT && comm_is_init(h) {
                exits += 1;
                if marks == 2 && exits == m {
                    l.disarm(P_EXIT).expect("disarm");
                }
            }
            if h.hit.probe == P_MARK {
                marks += 1;
                for p in [P_FORK, P_EXEC, P_EXIT] {
                    if marks == 2 && p == P_EXIT && exits < m {
                        continue;
                    }
                    if marks == 1 {
                        l.arm(
                            p,
                            e.sym(match p {
                                P_FORK => "proc_fork_connector",
                                P_EXEC => "proc_exec_connector",
                                _ => "proc_exit_connector",
                            }),
                            conn,
                        )
                        .expect("arm");
                    } else {
                        l.disarm(p).expect("disarm");
                    }
                }
            }
            Action::Continue
        },
    );
    let count = |p: ProbeId, only_init: bool| {
        o.hits
            .iter()
            .filter(|h| h.hit.probe == p && (!only_init || comm_is_init(h)))
            .count() as u64
    };
    let line = o.wl_line("WL fork");
    assert_eq!(field(&line, "ok"), m as i64, "{line}");
    eprintln!(
        "vcpus={vcpus}: getppid {} fork {}/{} exec {}/{} exit {}/{} marks {} (init-only/all), wall {:?}, per-vcpu getppid {:?}",
        count(P_GETPPID, false),
        count(P_FORK, true),
        count(P_FORK, false),
        count(P_EXEC, true),
        count(P_EXEC, false),
        count(P_EXIT, true),
        count(P_EXIT, false),
        count(P_MARK, false),
        o.wall,
        (0..vcpus)
            .map(|v| o.hits.iter().filter(|h| h.hit.probe == P_GETPPID && h.hit.vcpu == v).count())
            .collect::<Vec<_>>()
    );
    assert_eq!(count(P_GETPPID, false), n + 2 * pn);
    if vcpus > 1 {
        let on1 = o
            .hits
            .iter()
            .filter(|h| h.hit.probe == P_GETPPID && h.hit.vcpu == 1)
            .count();
        assert!(on1 as u64 >= pn, "the pinned child ran on vCPU 1");
    }
    assert_eq!(count(P_FORK, true), m);
    assert_eq!(count(P_EXEC, true), m);
    assert_eq!(count(P_EXIT, true), m);
    assert_eq!(count(P_MARK, false), 2);
    for h in o.hits.iter().filter(|h| h.hit.probe == P_GETPPID) {
        assert_eq!(Gva(h.hit.regs.rip), e.sym("__x64_sys_getppid"));
    }
    // Per-vCPU sequence numbers have no gaps: no record was lost.
    for v in 0..vcpus {
        let seqs: Vec<u64> = o
            .hits
            .iter()
            .filter(|h| h.hit.vcpu == v)
            .map(|h| h.vcpu_seq)
            .collect();
        assert!(
            seqs.iter().enumerate().all(|(i, s)| *s == i as u64 + 1),
            "vcpu {v} seq gap"
        );
    }
    assert!(
        o.link.plugin_errors().is_empty(),
        "{:?}",
        o.link.plugin_errors()
    );
}

#[test]
fn exact_counts_one_vcpu() {
    counts_on(1);
}

#[test]
fn exact_counts_two_vcpus() {
    counts_on(2);
}

/// A byte range read at the hit: at `proc_exec_connector` the new command line between
/// `mm->arg_start` and `mm->arg_end` (chained reads), whole, and cut at the probe's `max`.
#[test]
fn byte_range_is_the_exec_command_line() {
    use ornament_engine::wire::BytesRead;
    let e = require!(INPUTS, env());
    let (mm, arg_start, arg_end) = mm_offsets(&e);
    let spec = |max: u32| {
        let mut s = ProbeSpec::regs(RegMask::of(&[Reg::Rip, Reg::Rdi, Reg::Cr3, Reg::Cr4]));
        s.mem[0] = MemRead::at_reg(Reg::Rdi, mm, 8);
        s.mem[1] = MemRead::at_mem(0, arg_start, 8);
        s.mem[2] = MemRead::at_mem(0, arg_end, 8);
        s.bytes = BytesRead {
            start: 1,
            end: 2,
            max,
        };
        s
    };
    for (max, want, complete) in [
        (4096, &b"/init\0child\0"[..], true),
        (8, &b"/init\0ch"[..], false),
    ] {
        let o = run(
            &e,
            &format!("bytes{max}"),
            1,
            "fork 3",
            |l, _| {
                l.arm(P_EXEC, e.sym("proc_exec_connector"), spec(max))
                    .expect("arm");
            },
            |_, _| Action::Continue,
        );
        // The kernel's exec of /init (its own command line), then three of `/init child`.
        let execs: Vec<_> = o.hits.iter().filter(|h| h.hit.probe == P_EXEC).collect();
        assert_eq!(execs.len(), 4, "/init, then three execs of /init child");
        for (i, h) in execs.iter().enumerate() {
            assert!(!h.hit.held);
            let b = h.hit.bytes.as_ref().expect("bytes read at the hit");
            let got = (b.data.as_slice(), b.complete);
            let text = String::from_utf8_lossy(&b.data);
            if i == 0 {
                assert!(b.data.starts_with(b"/init\0"), "{text:?}");
                assert_ne!(got, (want, complete), "{text:?}");
            } else {
                assert_eq!(got, (want, complete), "{text:?}");
            }
        }
        assert!(o.link.plugin_errors().is_empty());
    }
}
