//! Real-guest test of the TCG plugin's memory reads over the RAM file the host sends, against
//! QEMU's own accessor (see `support` for the inputs).
#![allow(missing_docs, clippy::cast_possible_truncation)]

mod support;

use ornament_engine::wire::{MemRead, ProbeSpec, Reg, RegMask};
use ornament_engine::Action;
use ornament_test_gate::require;
use std::path::PathBuf;
use support::plugin_link::PluginHit;
use support::*;

/// Memory reads before and after the host hands the plugin guest RAM (its own page walk over
/// the RAM file instead of QEMU's accessor) give the same values; chained reads follow the
/// pointer they name, and fail when it failed.
///
/// To show the later reads really come from the file the host sent, that file is a copy of
/// guest RAM taken while the guest is held at the mark, with one change: the task's `comm`
/// says `ramfile`. Only the plugin's own page walk can see it; every other value (the task,
/// its pid, tgid, parent, mm, page-table root, cred and uid, read through chains) must equal
/// what QEMU's accessor read before the mark, on every one of the hits.
#[test]
fn reads_through_the_ram_file_match_qemus() {
    use ornament_engine::wire::{MemBase, RamPaging, RamRegion};
    use std::cell::RefCell;
    let e = require!(INPUTS, env());
    let p = e
        .profile
        .as_ref()
        .unwrap_or_else(|| panic!("no committed profile for kernel {}", e.release));
    let off = |s: &str, f: &str| profile_offset(p, s, f);
    let n = 400u64;
    let mut spec = ProbeSpec::regs(RegMask::of(&[Reg::GsBase, Reg::Cr3, Reg::Cr4]));
    spec.mem[0] = MemRead::at_reg(Reg::GsBase, e.current_task_offset(), 8);
    let chain = |j: u8, offset: u64| MemRead::at_mem(j, offset, 8);
    spec.mem[1] = chain(0, e.comm_offset);
    // A read of the NULL page fails, and so does the read chained to it.
    spec.mem[2] = MemRead {
        base: MemBase::Absolute,
        offset: 0,
        len: 8,
    };
    spec.mem[3] = chain(2, 0);
    // A read that crosses into the next page (split by the plugin's walk).
    spec.mem[4] = chain(0, 0xffc);
    spec.mem[5] = MemRead::at_mem(0, 0xffc, 4);
    spec.mem[6] = chain(0, 0x1000);
    // Fields that stay put while the workload loops: pid, tgid, parent and its pid, mm and
    // its page-table root, cred and its uid.
    spec.mem[7] = MemRead::at_mem(0, off("task_struct", "pid"), 4);
    spec.mem[8] = MemRead::at_mem(0, off("task_struct", "tgid"), 4);
    spec.mem[9] = chain(0, off("task_struct", "real_parent"));
    spec.mem[10] = MemRead::at_mem(9, off("task_struct", "pid"), 4);
    spec.mem[11] = chain(0, off("task_struct", "mm"));
    spec.mem[12] = chain(11, off("mm_struct", "pgd"));
    spec.mem[13] = chain(0, off("task_struct", "cred"));
    spec.mem[14] = MemRead::at_mem(13, off("cred", "uid"), 4);
    const STABLE: [usize; 9] = [0, 7, 8, 9, 10, 11, 12, 13, 14];
    let snap = PathBuf::from(format!(
        "/dev/shm/ornament-plugin-test-{}-ramfile-copy",
        std::process::id()
    ));
    let ram_path = RefCell::new(PathBuf::new());
    let mut task = None;
    let mut sent = false;
    let o = run(
        &e,
        "ramfile",
        1,
        &format!("getppid {n} mark getppid {n}"),
        |l, ram| {
            *ram_path.borrow_mut() = ram.to_path_buf();
            e.arm_getppid(l, spec);
            e.arm_mark(l, RegMask::of(&[Reg::Rip]));
        },
        |l, h| {
            if h.hit.probe == P_GETPPID && !sent {
                task = h.mem[0];
            }
            if h.hit.probe == P_MARK && !sent {
                use std::os::fd::AsFd;
                use std::os::unix::fs::FileExt;
                // The only vCPU is held here: the copy is a still picture of guest RAM.
                std::fs::copy(&*ram_path.borrow(), &snap).expect("copy guest RAM");
                let task = task.expect("getppid hits before the mark");
                let comm_gpa = (task + e.comm_offset)
                    .checked_sub(DIRECT_MAP_NOKASLR)
                    .expect("task_struct in the direct map");
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&snap)
                    .expect("open the copy");
                f.write_all_at(b"ramfile\0", comm_gpa)
                    .expect("mark the copy");
                // -M pc, 512 MiB: low RAM below the VGA hole, then RAM from 1 MiB, at
                // file offset == guest-physical address.
                let regions = [
                    RamRegion {
                        gpa: 0,
                        len: 0xa_0000,
                        file_offset: 0,
                    },
                    RamRegion {
                        gpa: 0x10_0000,
                        len: (GUEST_MEM_MIB << 20) - 0x10_0000,
                        file_offset: 0x10_0000,
                    },
                ];
                l.send_ram(f.as_fd(), &regions, RamPaging::FromCr4)
                    .expect("send ram");
                sent = true;
            }
            Action::Continue
        },
    );
    let _ = std::fs::remove_file(&snap);
    assert!(sent, "no mark hit");
    let mut marked = false;
    let (mut before, mut after) = (Vec::new(), Vec::new());
    for h in &o.hits {
        if h.hit.probe == P_MARK {
            marked = true;
            continue;
        }
        assert_eq!(
            (h.mem[2], h.mem[3]),
            (None, None),
            "NULL page and its chain"
        );
        let split = h.mem[4].expect("page-crossing read");
        let (lo, hi) = (h.mem[5].expect("lo"), h.mem[6].expect("hi"));
        assert_eq!(split, lo | (hi << 32), "split read");
        (if marked { &mut after } else { &mut before }).push(h);
    }
    assert_eq!(before.len() as u64, n);
    assert_eq!(after.len() as u64, n);
    let comm = |h: &PluginHit| h.mem[1].map(u64::to_le_bytes);
    // Before: QEMU's accessor, the live guest. After: the marked copy, so the plugin's own walk.
    for h in &before {
        let c = comm(h).expect("comm");
        assert_eq!(&c[..5], b"init\0", "comm before the RAM file: {c:?}");
    }
    for h in &after {
        assert_eq!(
            comm(h),
            Some(*b"ramfile\0"),
            "reads after the mark did not come from the RAM file the host sent"
        );
    }
    // Every stable read of every hit, both ways, equals the first hit's; and they are what
    // they must be: pid 1 (/init), its own tgid, parent pid 0, uid 0, kernel pointers.
    let stable = |h: &PluginHit| STABLE.map(|i| h.mem[i]);
    let first = stable(before[0]);
    for h in before.iter().chain(&after) {
        assert_eq!(stable(h), first, "hit {}", h.hit.seq);
    }
    let v = |i: usize| first[STABLE.iter().position(|&j| j == i).expect("stable")];
    assert_eq!(
        (v(7), v(8), v(10), v(14)),
        (Some(1), Some(1), Some(0), Some(0))
    );
    for i in [0, 9, 11, 13] {
        assert!(
            v(i).is_some_and(|a| a >= DIRECT_MAP_NOKASLR),
            "read {i}: {first:x?}"
        );
    }
    assert!(
        v(12).is_some_and(|a| a >= DIRECT_MAP_NOKASLR),
        "pgd: {first:x?}"
    );
    assert!(
        o.link.plugin_errors().is_empty(),
        "{:?}",
        o.link.plugin_errors()
    );
}
