//! Probe placement, deny rules and watch lists on the committed profiles.

use super::*;
use crate::testing::committed_profiles;
use ornament_engine::wire::{MemBase, MemRead, Reg};

const LAYOUT: KernelLayout = KernelLayout {
    virt_slide: 0x1e00_0000,
    phys_slide: 0x0200_0000,
};

fn lifecycle() -> WatchConfig {
    WatchConfig {
        fork: true,
        exec: true,
        exit: true,
        setid: true,
        ..WatchConfig::default()
    }
}

#[test]
fn lifecycle_hooks_from_real_profiles() {
    for p in committed_profiles() {
        let set = ProbeSet::new(&p, LAYOUT, &lifecycle()).expect("set");
        assert!(set.warnings().is_empty(), "{:?}", set.warnings());
        let syms: Vec<_> = set.specs().iter().map(|s| s.symbol.as_str()).collect();
        assert_eq!(
            syms,
            [
                "proc_fork_connector",
                "proc_exec_connector",
                "proc_exit_connector",
                "proc_id_connector"
            ]
        );
        for (i, s) in set.specs().iter().enumerate() {
            assert_eq!(s.id, ProbeId(u32::try_from(i).expect("few probes")));
            assert!(s.hold);
            assert_eq!(s.syscall_filter, None);
            let link = p.symbol(&s.symbol).expect("sym");
            assert_eq!(s.at, link.wrapping_add(LAYOUT.virt_slide));
            assert_eq!(set.get(s.id), Some(s));
        }
        assert_eq!(set.get(ProbeId(99)), None);
        assert!(!set.reports_syscall(0));
        assert_eq!(set.events().len(), 4);
    }
}

#[test]
fn missing_symbols_disable_only_their_events() {
    let mut p = committed_profiles().remove(0);
    p.symbols.remove("proc_fork_connector");
    p.symbols.remove("proc_exec_connector");
    p.symbols.remove("begin_new_exec");
    p.symbols.remove("proc_id_connector");
    let set = ProbeSet::new(&p, LAYOUT, &lifecycle()).expect("set");
    let kinds: Vec<_> = set.specs().iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        [
            ProbeKind::Fork(ForkHook::WakeUpNewTask),
            ProbeKind::Exit(ExitHook::ProcExitConnector)
        ]
    );
    let w: Vec<String> = set.warnings().iter().map(|w| w.to_string()).collect();
    assert_eq!(
        w,
        [
            "the profile has no proc_fork_connector: fork events come from wake_up_new_task instead",
            "the profile has no proc_exec_connector: exec events come from begin_new_exec instead",
            "the profile has no begin_new_exec: exec events are disabled",
            "the profile has no proc_id_connector: setid events are disabled",
        ]
    );
    assert_eq!(
        set.events().into_iter().collect::<Vec<_>>(),
        [EventKind::Fork, EventKind::Exit]
    );
}

#[test]
fn named_syscalls_and_deny() {
    for p in committed_profiles() {
        let cfg = WatchConfig {
            syscalls: SyscallWatch::Named(vec!["openat".into(), "mkdirat".into()]),
            deny: vec![("mkdirat".into(), 1), ("unlinkat".into(), 13)],
            ..WatchConfig::default()
        };
        let set = ProbeSet::new(&p, LAYOUT, &cfg).expect("set");
        let openat = p.syscall_nr("openat").expect("openat");
        let mkdirat = p.syscall_nr("mkdirat").expect("mkdirat");
        let unlinkat = p.syscall_nr("unlinkat").expect("unlinkat");
        let specs = set.specs();
        assert_eq!(specs.len(), 2, "{specs:?}");
        assert_eq!(specs[0].symbol, "__x64_sys_openat");
        assert_eq!(
            specs[0].kind,
            ProbeKind::Syscall(SyscallHook::Function { nr: openat })
        );
        assert!(!specs[0].hold);
        assert_eq!(
            specs[0].at,
            LAYOUT.virt(p.syscall_entry_points["__x64_sys_openat"])
        );
        assert_eq!(specs[1].symbol, "do_syscall_64");
        assert!(specs[1].hold);
        let mut want = vec![mkdirat, unlinkat];
        want.sort_unstable();
        assert_eq!(specs[1].syscall_filter, Some(want));
        assert!(set.reports_syscall(openat) && set.reports_syscall(mkdirat));
        assert!(!set.reports_syscall(unlinkat));
        assert_eq!(set.deny_rules()[&unlinkat], 13);
    }
}

#[test]
fn all_syscalls_and_deny_only() {
    let p = committed_profiles().remove(1);
    let all = WatchConfig {
        syscalls: SyscallWatch::All,
        ..WatchConfig::default()
    };
    let set = ProbeSet::new(&p, LAYOUT, &all).expect("set");
    assert_eq!(set.specs().len(), 1);
    assert!(!set.specs()[0].hold && set.specs()[0].syscall_filter.is_none());
    assert!(set.reports_syscall(0) && set.reports_syscall(300));
    let deny_only = WatchConfig {
        deny: vec![("mkdirat".into(), 1)],
        ..WatchConfig::default()
    };
    let set = ProbeSet::new(&p, LAYOUT, &deny_only).expect("set");
    assert_eq!(set.specs().len(), 1);
    assert!(set.specs()[0].hold);
    assert_eq!(set.specs()[0].syscall_filter, Some(vec![258]));
    assert!(!set.reports_syscall(258));
    assert!(set.events().is_empty());
    // A named syscall with no entry point goes through do_syscall_64.
    let mut q = p.clone();
    q.syscall_entry_points.remove("__x64_sys_openat");
    let named = WatchConfig {
        syscalls: SyscallWatch::Named(vec!["openat".into()]),
        ..WatchConfig::default()
    };
    let set = ProbeSet::new(&q, LAYOUT, &named).expect("set");
    assert_eq!(set.specs().len(), 1);
    assert_eq!(set.specs()[0].syscall_filter, Some(vec![257]));
    assert!(!set.specs()[0].hold);
    assert_eq!(set.warnings().len(), 1);
    // Deny with no do_syscall_64 is refused, never silently dropped.
    q.symbols.remove("do_syscall_64");
    assert_eq!(
        ProbeSet::new(&q, LAYOUT, &deny_only),
        Err(ProbesError::NoDenyHook {
            symbol: "do_syscall_64"
        })
    );
}

#[test]
fn hit_reads_layout() {
    for p in committed_profiles() {
        let kinds = [
            ProbeKind::Fork(ForkHook::ProcForkConnector),
            ProbeKind::Fork(ForkHook::WakeUpNewTask),
            ProbeKind::Exec(ExecHook::ProcExecConnector),
            ProbeKind::Exit(ExitHook::ProcExitConnector),
            ProbeKind::Exit(ExitHook::DoExit),
            ProbeKind::Setid,
            ProbeKind::Syscall(SyscallHook::DoSyscall64),
            ProbeKind::Return(ReturnHook::Syscall),
            ProbeKind::Return(ReturnHook::Exec),
            ProbeKind::Return(ReturnHook::ExecAt),
            ProbeKind::Signal(SignalHook::SendLocked),
            ProbeKind::Signal(SignalHook::SendLockedOuter),
            ProbeKind::Signal(SignalHook::Handler),
            ProbeKind::Signal(SignalHook::Stop),
            ProbeKind::Signal(SignalHook::Kill),
            ProbeKind::ExecAttempt,
        ];
        for kind in kinds {
            let m = hit_reads(kind, &p).expect("reads");
            // Every probe reads the current task; chains only reach back.
            assert_eq!(m[MEM_CURRENT_TASK].base, MemBase::Reg(Reg::GsBase));
            for (i, r) in m.iter().enumerate() {
                if let MemBase::Mem(j) = r.base {
                    assert!(usize::from(j) < i, "{kind:?} read {i} chains to {j}");
                }
                if r.base != MemBase::None {
                    assert!((1..=8).contains(&r.len));
                }
            }
            let used = m.iter().filter(|r| r.base != MemBase::None).count();
            let want = match kind {
                // The current task, its 9-read header (with euid), the child's 4 fields.
                ProbeKind::Fork(_) => 14,
                ProbeKind::Exit(ExitHook::ProcExitConnector) => 13,
                // The task's 8-read header (no euid), mm, exe_file, its dentry, arg_start,
                // arg_end, the dentry's name hash and parent; fs, the working directory's
                // mount and dentry, that dentry's name hash and parent.
                ProbeKind::Exec(ExecHook::ProcExecConnector) => 21,
                // Six arguments, the current task and its 9-read header.
                ProbeKind::Syscall(_) => 16,
                // ax, orig_ax, the current task and its header (and di for an exec).
                ProbeKind::Return(ReturnHook::Syscall) => 12,
                ProbeKind::Return(ReturnHook::Exec | ReturnHook::ExecAt) => 13,
                // The current task and its header, and: the target's pid, tgid, comm and the
                // siginfo's code and fields; ksig->sig; the current task again, its signal,
                // that one's flags and group exit code.
                ProbeKind::Signal(SignalHook::SendLocked | SignalHook::SendLockedOuter) => 16,
                ProbeKind::Signal(SignalHook::Handler) => 11,
                ProbeKind::Signal(SignalHook::Stop) => 10,
                ProbeKind::Signal(SignalHook::Kill) => 14,
                _ => 1,
            };
            assert_eq!(used, want, "{kind:?}");
            assert_eq!(
                captured_at_hit(kind),
                matches!(
                    kind,
                    ProbeKind::Fork(_)
                        | ProbeKind::Signal(_)
                        | ProbeKind::Exit(ExitHook::ProcExitConnector)
                        | ProbeKind::Exec(ExecHook::ProcExecConnector)
                )
            );
            // Exec reads its command line (between two of its own reads), a failed exec its file name.
            let b = hit_bytes(kind);
            if kind == ProbeKind::Exec(ExecHook::ProcExecConnector) {
                assert_eq!(m[usize::from(b.start)].base, MemBase::Mem(0));
                assert_eq!(m[usize::from(b.end)].base, MemBase::Mem(0));
                assert_eq!(b.max, MAX_ARGV_BYTES_AT_HIT);
                assert_eq!(m[MEM_EXEC_MM].base, MemBase::Reg(Reg::Rdi));
                // The working directory: task->fs, then its pwd, then that dentry's stamps.
                assert_eq!(m[MEM_EXEC_FS].base, MemBase::Reg(Reg::Rdi));
                let fs = MemBase::Mem(u8::try_from(MEM_EXEC_FS).expect("small"));
                assert_eq!(
                    (m[MEM_EXEC_PWD_MNT].base, m[MEM_EXEC_PWD_DENTRY].base),
                    (fs, fs)
                );
                let d = MemBase::Mem(u8::try_from(MEM_EXEC_PWD_DENTRY).expect("small"));
                assert_eq!(
                    (m[MEM_EXEC_PWD_HASH].base, m[MEM_EXEC_PWD_PARENT].base),
                    (d, d)
                );
            } else if let ProbeKind::Return(hook @ (ReturnHook::Exec | ReturnHook::ExecAt)) = kind {
                // The file name: a C string at regs->di (execve) or regs->si (execveat).
                assert_eq!((b.start, b.end), (2, 2));
                assert_eq!(m[2].base, MemBase::Reg(Reg::Rdi));
                let arg = if hook == ReturnHook::Exec { "di" } else { "si" };
                assert_eq!(m[2].offset, p.offset("pt_regs", arg).expect("arg"));
                assert_eq!(b.max, MAX_EXEC_NAME_AT_HIT);
            } else {
                assert!(!b.is_some(), "{kind:?}");
            }
        }
        let fork = hit_reads(ProbeKind::Fork(ForkHook::ProcForkConnector), &p).expect("r");
        let cur = u8::try_from(MEM_CURRENT_TASK).expect("small");
        assert_eq!(fork[MEM_HDR_PID].base, MemBase::Mem(cur));
        assert_eq!(
            fork[MEM_HDR_PPID],
            MemRead {
                base: MemBase::Mem(u8::try_from(MEM_HDR_REAL_PARENT).expect("small")),
                offset: p.offset("task_struct", "tgid").expect("tgid"),
                len: 4
            }
        );
        assert_eq!(fork[MEM_CHILD_PID].base, MemBase::Reg(Reg::Rdi));
        let sys = hit_reads(ProbeKind::Syscall(SyscallHook::DoSyscall64), &p).expect("r");
        assert_eq!(sys[MEM_HDR_PID].base, MemBase::Mem(cur));
        assert_eq!(sys[MEM_HDR_UID].base, fork[MEM_HDR_UID].base);
        // Each id pair in one word: uid and gid, euid and egid (side by side in `cred`).
        let cred = u8::try_from(MEM_HDR_CRED).expect("small");
        for (slot, first) in [(MEM_HDR_UID, "uid"), (MEM_HDR_EUID, "euid")] {
            assert_eq!(
                sys[slot],
                MemRead {
                    base: MemBase::Mem(cred),
                    offset: p.offset("cred", first).expect("cred"),
                    len: 8
                }
            );
        }
        let exit = hit_reads(ProbeKind::Exit(ExitHook::ProcExitConnector), &p).expect("r");
        assert_eq!(exit[MEM_HDR_PID].base, MemBase::Reg(Reg::Rdi));
        assert_eq!(
            exit[MEM_EXIT_LIVE].base,
            MemBase::Mem(u8::try_from(MEM_EXIT_SIGNAL).expect("small"))
        );
    }
}

#[test]
fn parsing_watch_lists_and_errnos() {
    let mut w = WatchConfig::default();
    w.add_watch_list("fork,exec,syscall=openat,mkdirat,exit")
        .expect("list");
    assert!(w.fork && w.exec && w.exit && !w.setid);
    assert_eq!(
        w.syscalls,
        SyscallWatch::Named(vec!["openat".into(), "mkdirat".into()])
    );
    w.add_watch_list("setid,syscall").expect("list");
    assert!(w.setid);
    assert_eq!(w.syscalls, SyscallWatch::All);
    assert_eq!(
        WatchConfig::default().add_watch_list("fork,openat"),
        Err(ProbesError::UnknownWatch {
            name: "openat".into()
        })
    );
    assert_eq!(parse_deny("mkdirat:EPERM"), Ok(("mkdirat".into(), 1)));
    assert_eq!(parse_deny("mkdirat:eacces"), Ok(("mkdirat".into(), 13)));
    assert_eq!(parse_deny("mkdirat:38"), Ok(("mkdirat".into(), 38)));
    assert_eq!(parse_deny("unlinkat"), Ok(("unlinkat".into(), 1)));
    for bad in ["mkdirat:EWHAT", "mkdirat:0", "mkdirat:4096", "mkdirat:-1"] {
        assert!(
            matches!(parse_deny(bad), Err(ProbesError::UnknownErrno { .. })),
            "{bad}"
        );
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    let p = committed_profiles().remove(0);
    let cfg = WatchConfig {
        syscalls: SyscallWatch::Named(vec!["openat".into(), "frobnicate".into()]),
        ..WatchConfig::default()
    };
    let e = ProbeSet::new(&p, LAYOUT, &cfg).expect_err("unknown");
    assert_eq!(
        e,
        ProbesError::UnknownSyscall {
            name: "frobnicate".into()
        }
    );
    assert_eq!(
        e.to_string(),
        "unknown syscall \"frobnicate\": this kernel has no such x86-64 syscall"
    );
    for errno in [0, -1, 4096] {
        let cfg = WatchConfig {
            deny: vec![("mkdirat".into(), errno)],
            ..WatchConfig::default()
        };
        assert_eq!(
            ProbeSet::new(&p, LAYOUT, &cfg),
            Err(ProbesError::BadErrno {
                syscall: "mkdirat".into(),
                errno
            })
        );
    }
    let cfg = WatchConfig {
        deny: vec![("nosuch".into(), 1)],
        ..WatchConfig::default()
    };
    assert!(matches!(
        ProbeSet::new(&p, LAYOUT, &cfg),
        Err(ProbesError::UnknownSyscall { .. })
    ));
}
