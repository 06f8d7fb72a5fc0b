//! Real-guest tests of the host's control over the TCG plugin while the guest runs: arm and
//! disarm, held hits, deny, and a hold nobody answers (see `support` for the inputs).
#![allow(missing_docs, clippy::cast_possible_truncation)]

mod support;

use ornament_engine::wire::{ProbeSpec, Reg, RegMask};
use ornament_engine::Action;
use ornament_test_gate::require;
use std::sync::Arc;
use std::time::Duration;
use support::plugin_link::DenyConfig;
use support::*;

/// Arming a new address (not a candidate: needs retranslation) and disarming it while held at
/// a marker take effect: hits come only from the middle loop, and none from the 20000 calls
/// after the disarm (the guest runs them: the workload reports the loop). Disarming is exact
/// (a flag); arming a new address waits for QEMU's asynchronous `qemu_plugin_reset`, which
/// runs once every vCPU is outside guest code, so the first calls of the middle loop may run
/// before it (on a loaded 2-core host it took longer than a 200-call loop once).
#[test]
fn arm_new_address_and_disarm_while_running() {
    let e = require!(INPUTS, env());
    let mut marks = 0;
    let o = run(
        &e,
        "armnew",
        2,
        "getppid 100 mark getppid 20000 mark getppid 20000",
        |l, _| {
            e.arm_mark(l, RegMask::NONE);
        },
        |l, h| {
            if h.hit.probe == P_MARK {
                marks += 1;
                if marks == 1 {
                    e.arm_getppid(l, ProbeSpec::regs(RegMask::of(&[Reg::Rip])));
                } else {
                    l.disarm(P_GETPPID).expect("disarm");
                }
            }
            Action::Continue
        },
    );
    // getppid hits in each stretch between marks, in delivery order (hit order).
    let mut per_stretch = [0usize; 3];
    let mut stretch = 0;
    for h in &o.hits {
        match h.hit.probe {
            P_MARK => stretch += 1,
            P_GETPPID => per_stretch[stretch.min(2)] += 1,
            other => panic!("unexpected probe {other:?}"),
        }
    }
    assert_eq!(stretch, 2, "two marks");
    let loops: Vec<i64> = o
        .serial
        .lines()
        .filter(|l| l.starts_with("WL getppid"))
        .map(|l| field(l, "n"))
        .collect();
    assert_eq!(loops, [100, 20000, 20000], "the guest ran all three loops");
    let [before, middle, after] = per_stretch;
    assert_eq!(before, 0, "hits before the probe was armed");
    assert!(middle > 0, "arming at run time never took effect");
    assert!(middle <= 20000, "{middle} hits in a 20000-call loop");
    assert_eq!(after, 0, "hits after the disarm, over 20000 calls");
    eprintln!("armed at run time: {middle} of the middle loop's 20000 calls seen, 0 after");
}

/// A held hit on one vCPU: the workload on the other vCPU keeps running (and keeps hitting).
#[test]
fn hold_blocks_only_its_vcpu() {
    let e = require!(INPUTS, env());
    let hold = Duration::from_millis(1500);
    let mut window = None;
    let o = run(
        &e,
        "hold",
        2,
        "hold",
        |l, _| {
            e.arm_getppid(l, ProbeSpec::regs(RegMask::of(&[Reg::Rip])));
            l.arm(
                P_GETUID,
                e.sym("__x64_sys_getuid"),
                held(RegMask::of(&[Reg::Rip])),
            )
            .expect("arm");
        },
        |_, h| {
            if h.hit.probe == P_GETUID {
                let t0 = h.hit.time_ns;
                std::thread::sleep(hold);
                window = Some((h.hit.vcpu, t0, t0 + hold.as_nanos() as u64));
            }
            Action::Continue
        },
    );
    let (held_vcpu, t0, t1) = window.expect("getuid was hit");
    let line = o.wl_line("WL hold");
    let during = o
        .hits
        .iter()
        .filter(|h| h.hit.probe == P_GETPPID && h.hit.time_ns > t0 && h.hit.time_ns < t1)
        .collect::<Vec<_>>();
    eprintln!(
        "{line}; hits during the hold: {} (vcpu of hold: {held_vcpu})",
        during.len()
    );
    assert!(field(&line, "held_ms") >= 1400, "{line}");
    assert!(field(&line, "child_calls_during_hold") > 100, "{line}");
    assert!(during.len() > 100);
    assert!(during.iter().all(|h| h.hit.vcpu != held_vcpu));
}

/// `mkdir` denied with EPERM once (the directory is not created), then allowed.
#[test]
fn deny_syscall_returns_errno_and_next_runs() {
    let e = require!(INPUTS, env());
    let mut seen = 0;
    let cfg = DenyConfig {
        syscall_exit: e.sym("syscall_exit_to_user_mode"),
        current_task_offset: e.current_task_offset(),
        syscall_work_offset: e.syscall_work_offset,
        syscall_emu_bit: e.emu_bit,
        pt_regs_ax_offset: e.pt_regs_ax,
    };
    let o = run(
        &e,
        "deny",
        2,
        "deny",
        |l, ram| {
            l.enable_deny(cfg, Arc::new(ShmRam::open(ram)))
                .expect("enable deny");
            l.arm(
                P_SYSCALL,
                e.sym("do_syscall_64"),
                cfg.entry_spec(&[83], RegMask::NONE),
            )
            .expect("arm");
        },
        |l, h| {
            if h.hit.probe == P_SYSCALL && h.hit.regs.rsi == 83 {
                seen += 1;
                if seen == 1 {
                    return Action::DenySyscall { errno: 1 };
                }
            }
            let _ = l;
            Action::Continue
        },
    );
    let line = o.wl_line("WL deny");
    eprintln!("{line}; stats {:?}", o.link.stats());
    assert_eq!(seen, 2);
    assert_eq!(field(&line, "first"), -1, "{line}");
    assert_eq!(field(&line, "errno"), 1, "{line}");
    assert_eq!(field(&line, "exists_after_first"), 0, "{line}");
    assert_eq!(field(&line, "second"), 0, "{line}");
    assert_eq!(field(&line, "exists_after_second"), 1, "{line}");
    assert_eq!(o.link.stats().denied, 1);
    assert_eq!(o.link.stats().internal_hits, 1);
}

/// A held hit nobody answers: the vCPU goes on after the plugin's hold timeout, and the plugin
/// says so with a `HoldTimeout` error record.
#[test]
fn unanswered_hold_times_out_and_is_reported() {
    let e = require!(INPUTS, env());
    let o = run_with(
        &e,
        "holdtimeout",
        1,
        "mark getppid 10",
        &["hold_timeout_ms=700"],
        |l, _| {
            e.arm_mark(l, RegMask::NONE);
            e.arm_getppid(l, ProbeSpec::regs(RegMask::of(&[Reg::Rip])));
        },
        |_, _| Action::Continue,
        |h| h.hit.probe != P_MARK,
    );
    let mark = o
        .hits
        .iter()
        .find(|h| h.hit.probe == P_MARK)
        .expect("mark hit");
    let first = o
        .hits
        .iter()
        .find(|h| h.hit.probe == P_GETPPID)
        .expect("getppid hit");
    let waited = Duration::from_nanos(first.hit.time_ns - mark.hit.time_ns);
    let errs = o.link.plugin_errors();
    eprintln!("waited {waited:?}; plugin errors {errs:?}");
    assert!(waited >= Duration::from_millis(650), "{waited:?}");
    assert_eq!(errs.len(), 1);
    assert_eq!(
        errs[0].code,
        ornament_engine::wire::PluginErrorCode::HoldTimeout as u32
    );
    assert_eq!(errs[0].probe, P_MARK.0);
    assert_eq!(
        o.hits.iter().filter(|h| h.hit.probe == P_GETPPID).count(),
        10
    );
}

/// A window: each `getppid` entry opens the window of a return probe at
/// `syscall_exit_to_user_mode` (filtered on `orig_ax` to getppid and getpid), which the
/// plugin arms at once and disarms at the matching return. So every getppid call is seen
/// returning, and the marker's getpid, made with no window open, never is (a probe left
/// armed would see it); the return probe starts disarmed.
#[test]
fn a_window_arms_its_probe_from_opening_to_closing_hits() {
    use ornament_engine::wire::{FilterOn, MemRead, Window};
    use ornament_engine::ProbeId;
    const P_WIN: ProbeId = ProbeId(13);
    let e = require!(INPUTS, env());
    let p = e
        .profile
        .as_ref()
        .unwrap_or_else(|| panic!("no committed profile for kernel {}", e.release));
    let orig_ax = profile_offset(p, "pt_regs", "orig_ax");
    let (getppid, getpid) = (110u64, 39u64);
    let o = run(
        &e,
        "window",
        2,
        "mark getppid 300 mark getppid 200 mark",
        |l, _| {
            e.arm_mark(l, RegMask::NONE);
            let mut open = ProbeSpec::regs(RegMask::of(&[Reg::Rip]));
            open.window = Window::Opens(P_WIN.0);
            e.arm_getppid(l, open);
            let mut ret = ProbeSpec::regs(RegMask::of(&[Reg::Rdi]))
                .with_filter_on(FilterOn::Mem(0), &[getppid, getpid]);
            ret.mem[0] = MemRead::at_reg(Reg::Rdi, orig_ax, 8);
            ret.window = Window::Closes;
            l.add_candidate(P_WIN, e.sym("syscall_exit_to_user_mode"), ret)
                .expect("window probe");
        },
        |_, _| Action::Continue,
    );
    let count = |id| o.hits.iter().filter(|h| h.hit.probe == id).count();
    let returns: Vec<u64> = o
        .hits
        .iter()
        .filter(|h| h.hit.probe == P_WIN)
        .map(|h| h.hit.mem[0].expect("orig_ax"))
        .collect();
    assert_eq!(count(P_MARK), 3, "three marks");
    assert_eq!(count(P_GETPPID), 500, "getppid entries");
    assert_eq!(returns.len(), 500, "one return per getppid entry");
    assert!(
        returns.iter().all(|&nr| nr == getppid),
        "a return seen outside any window: {:?}",
        returns
            .iter()
            .filter(|&&nr| nr != getppid)
            .collect::<Vec<_>>()
    );
    eprintln!("window: 500 getppid entries, 500 returns, 0 of the 3 getpid returns");
}
