//! Events built from the values an engine read at the hit (the TCG plugin's captures)
//! against the same events read from memory, and the syscall returns and failed execs,
//! which are read only at the hit.

use super::*;

/// What an engine that reads guest memory at the hit (the TCG plugin) carries: the reads of
/// `hit_reads` for the probe's kind, done against the synthetic guest now.
pub(super) fn with_reads(w: &World, s: &ArmSpec, mut h: ProbeHit) -> ProbeHit {
    use crate::probes::hit_reads;
    use ornament_engine::wire::{MemBase, Reg, MAX_MEM_READS};
    let reads = hit_reads(s.kind, &w.g.profile).expect("reads");
    let vm = VirtMem::new(
        &w.g.phys.mem,
        PageRoot::kernel_from_cr3(h.regs.cr3, h.regs.cr4),
    );
    let mut vals = [None; MAX_MEM_READS];
    for (i, m) in reads.iter().enumerate() {
        let base = match m.base {
            MemBase::None => continue,
            MemBase::Absolute => Some(0),
            MemBase::Reg(Reg::Rdi) => Some(h.regs.rdi),
            MemBase::Reg(Reg::GsBase) => Some(h.regs.gs_base),
            MemBase::Reg(r) => panic!("unexpected base register {r:?}"),
            MemBase::Mem(j) => vals[usize::from(j)],
        };
        vals[i] = base.and_then(|b| {
            let mut buf = [0u8; 8];
            vm.read(
                Gva(b.wrapping_add(m.offset)),
                &mut buf[..usize::from(m.len)],
            )
            .ok()
            .map(|()| u64::from_le_bytes(buf))
        });
    }
    h.mem = vals;
    // The byte range (exec's command line), through the task's own page tables as the
    // plugin reads it through CR3 of the task that runs exec.
    let b = crate::probes::hit_bytes(s.kind);
    h.bytes = b.range(|i| vals[i]).map(|(start, n, cut)| {
        // Exec's own read of the new mm; else the current task's (a failed exec's name).
        let mm = match s.kind {
            ProbeKind::Exec(_) => vals[crate::probes::MEM_EXEC_MM].expect("mm"),
            _ => {
                let cur = vals[crate::probes::MEM_CURRENT_TASK].expect("current");
                let off = w.g.off("task_struct", "mm").expect("mm");
                w.g.read_u64(Gva(cur).wrapping_add(off)).expect("mm")
            }
        };
        let pgd =
            w.g.read_u64(Gva(mm).wrapping_add(w.g.off("mm_struct", "pgd").expect("pgd")))
                .expect("pgd");
        let user = VirtMem::new(
            &w.g.phys.mem,
            PageRoot::kernel_from_cr3(pgd - w.g.page_offset_base, h.regs.cr4),
        );
        let mut data = vec![0u8; n];
        user.read(Gva(start), &mut data).expect("argv bytes");
        ornament_engine::wire::HitBytes {
            data,
            complete: !cut,
        }
    });
    h
}

#[test]
fn fork_exec_and_exit_events_from_values_read_at_the_hit() {
    use crate::probes::{captured_at_hit, MEM_HDR_PID, MEM_HDR_UID};
    each_world(|w| {
        let mut m = monitor(w, &everything());
        let task = |f| w.g.off("task_struct", f).expect("field");
        let cred = |t: Gva| Gva(w.g.read_u64(t.wrapping_add(task("cred"))).expect("cred"));

        // Fork: the same events from the values read at the hit as from memory, for a
        // process, a thread and a kernel thread.
        let s = spec(&m, |s| matches!(s.kind, ProbeKind::Fork(_)));
        assert!(captured_at_hit(s.kind));
        let mut captured = Vec::new();
        for child in [w.child, w.thread, w.kthread] {
            let plain = hit(w, &s, child.raw(), 0);
            let at_hit = with_reads(w, &s, plain.clone());
            for i in [MEM_CURRENT_TASK, MEM_HDR_PID, MEM_HDR_UID, 0, 1, 2, 3] {
                assert!(at_hit.mem[i].is_some(), "read {i} missing");
            }
            let from_ram = one(m.on_hit(&plain));
            assert_eq!(one(m.on_hit(&at_hit)), from_ram);
            captured.push((at_hit, from_ram));
        }

        // Exit: the same for a process and a thread, with a code and a signal.
        let se = spec(&m, |s| {
            s.kind == ProbeKind::Exit(ExitHook::ProcExitConnector)
        });
        assert!(captured_at_hit(se.kind));
        for (t, code) in [(w.child, 7u32 << 8), (w.thread, 0x80 | 11)] {
            w.g.write_u32(t.wrapping_add(task("exit_code")), code)
                .expect("w");
            let plain = hit(w, &se, t.raw(), 0);
            let at_hit = with_reads(w, &se, plain.clone());
            let from_ram = one(m.on_hit(&plain));
            assert_eq!(one(m.on_hit(&at_hit)), from_ram);
            captured.push((at_hit, from_ram));
        }

        // Exec: the same event from the values and bytes read at the hit.
        let sx = spec(&m, |s| {
            s.kind == ProbeKind::Exec(ExecHook::ProcExecConnector)
        });
        assert!(captured_at_hit(sx.kind));
        w.g.set_current(VCPU, w.child).expect("current");
        let plain = hit(w, &sx, w.child.raw(), 0);
        let at_hit = with_reads(w, &sx, plain.clone());
        assert!(at_hit.bytes.is_some(), "argv bytes read at the hit");
        let from_ram = one(m.on_hit(&plain));
        assert_eq!(one(m.on_hit(&at_hit)), from_ram);
        let Event::Exec(e) = &from_ram else {
            panic!("exec");
        };
        assert_eq!(e.argv, ["mkdir", "/tmp/newdir", "-p"]);
        assert_eq!(e.filename.as_deref(), Some("/usr/bin/mkdir"));
        assert_eq!(e.cwd.as_deref(), Some("/home/u"));
        assert!(at_hit.mem[crate::probes::MEM_EXEC_PWD_PARENT].is_some());
        // A working directory whose dentry was reused before the host read it (its
        // parent is no longer the one read at the hit): no cwd rather than a wrong one.
        let mut moved = at_hit.clone();
        moved.mem[crate::probes::MEM_EXEC_PWD_PARENT] = Some(0xffff_8880_dead_0000);
        let Event::Exec(e) = one(m.on_hit(&moved)) else {
            panic!("exec");
        };
        assert_eq!(
            (e.cwd, e.filename.as_deref()),
            (None, Some("/usr/bin/mkdir"))
        );
        // A cut range says so; an unreadable first page gives no argv, truncated.
        let mut cut = at_hit.clone();
        if let Some(b) = cut.bytes.as_mut() {
            b.data.truncate(6);
            b.complete = false;
        }
        let Event::Exec(e) = one(m.on_hit(&cut)) else {
            panic!("exec");
        };
        assert_eq!((e.argv, e.argv_truncated), (vec!["mkdir".to_owned()], true));
        let mut none = at_hit.clone();
        none.bytes = Some(ornament_engine::wire::HitBytes::default());
        let Event::Exec(e) = one(m.on_hit(&none)) else {
            panic!("exec");
        };
        assert!(e.argv.is_empty() && e.argv_truncated);
        // The executable's dentry freed and reused for another file before the path is
        // read (its name hash or parent differ from the stamps read at the hit): no
        // filename rather than a wrong one; argv is unaffected.
        let dentry = Gva(at_hit.mem[crate::probes::MEM_EXEC_DENTRY].expect("dentry"));
        let (hash_at, parent_at) = crate::probes::dentry_stamp(&w.g.profile).expect("stamp");
        assert!(at_hit.mem[crate::probes::MEM_EXEC_NAME_HASH].is_some());
        assert!(at_hit.mem[crate::probes::MEM_EXEC_PARENT].is_some());
        for at in [hash_at, parent_at] {
            let a = dentry.wrapping_add(at);
            let old = w.g.read_u64(a).expect("r");
            w.g.write_u64(a, old ^ 0x5a).expect("w");
            let Event::Exec(e) = one(m.on_hit(&at_hit)) else {
                panic!("exec");
            };
            assert_eq!(e.filename, None, "dentry field at {at:#x} changed");
            assert_eq!(e.argv, ["mkdir", "/tmp/newdir", "-p"]);
            w.g.write_u64(a, old).expect("w");
        }
        assert_eq!(one(m.on_hit(&at_hit)), from_ram);
        // The exec'd task's mm goes away (it exits at once): the event stays that of the hit.
        let mm_at = w.child.wrapping_add(task("mm"));
        let mm = w.g.read_u64(mm_at).expect("mm");
        w.g.write_u64(mm_at, 0).expect("w");
        assert_eq!(one(m.on_hit(&at_hit)), from_ram);
        let Event::Exec(gone) = one(m.on_hit(&plain)) else {
            panic!("exec");
        };
        assert!(
            gone.argv.is_empty() && gone.filename.is_none(),
            "memory did change"
        );
        w.g.write_u64(mm_at, mm).expect("w");
        captured.push((at_hit, from_ram));

        // The tasks change (reaped, reused, exec'd) after the vCPU ran on: the events built
        // from the values read at the hit stay those of the hit.
        for t in [w.parent, w.child, w.thread, w.kthread] {
            w.g.write_u32(t.wrapping_add(task("pid")), 999).expect("w");
            w.g.write_u32(t.wrapping_add(task("tgid")), 999).expect("w");
            w.g.write(t.wrapping_add(task("comm")), b"reaped\0")
                .expect("w");
            w.g.write_u32(t.wrapping_add(task("flags")), 0).expect("w");
            w.g.write_u32(t.wrapping_add(task("exit_code")), 0)
                .expect("w");
            w.g.write_u32(
                cred(t).wrapping_add(w.g.off("cred", "uid").expect("uid")),
                4242,
            )
            .expect("w");
        }
        for (at_hit, before) in &captured {
            assert_eq!(&one(m.on_hit(at_hit)), before);
            let mut plain = at_hit.clone();
            plain.mem = [None; ornament_engine::wire::MAX_MEM_READS];
            assert_ne!(&one(m.on_hit(&plain)), before, "memory did change");
        }
        // begin_new_exec, setid and do_exit are not captured.
        for kind in [
            ProbeKind::Exec(ExecHook::BeginNewExec),
            ProbeKind::Setid,
            ProbeKind::Exit(ExitHook::DoExit),
            ProbeKind::Syscall(SyscallHook::DoSyscall64),
        ] {
            assert!(!captured_at_hit(kind));
        }
    });
}

#[test]
fn syscall_returns_pair_with_their_entries_and_failed_execs() {
    each_world(|w| {
        let mut cfg = everything();
        cfg.results = true;
        let mut m = monitor(w, &cfg);
        let p = &w.g.profile;
        let (mkdirat, openat, execve, getpid) = (
            p.syscall_nr("mkdirat").expect("nr"),
            p.syscall_nr("openat").expect("nr"),
            p.syscall_nr("execve").expect("nr"),
            p.syscall_nr("getpid").expect("nr"),
        );
        let ret = spec(&m, |s| s.kind == ProbeKind::Return(ReturnHook::Syscall));
        let exec = spec(&m, |s| s.kind == ProbeKind::Return(ReturnHook::Exec));
        let exec_at = spec(&m, |s| s.kind == ProbeKind::Return(ReturnHook::ExecAt));
        assert_eq!(ret.syscall_filter, Some(vec![openat, mkdirat]));
        assert_eq!(exec.syscall_filter, Some(vec![execve]));
        let execveat = p.syscall_nr("execveat").expect("nr");
        assert_eq!(exec_at.syscall_filter, Some(vec![execveat]));
        assert!(!ret.hold && !exec.hold, "returns are read at the hit");
        let entry = spec(&m, |s| {
            s.kind == ProbeKind::Syscall(SyscallHook::Function { nr: mkdirat })
        });
        w.g.set_current(VCPU, w.child).expect("current");
        let k = Kernel::new(&w.g.phys.mem, &w.g.profile, w.g.layout);
        let r = TaskReader::new(&k).expect("reader");
        let pt = r
            .user_regs_addr(&k.kernel_vm(&w.g.regs_kernel(0, Gva(0))), w.child)
            .expect("pt_regs");
        let mut regs = UserRegs {
            di: 0xffff_ff9c,
            si: USER_ARGS + 6,
            orig_ax: u64::from(mkdirat),
            ..UserRegs::default()
        };
        w.g.write_user_regs(w.child, &regs).expect("pt_regs");
        let mut h = hit(w, &entry, pt.raw(), 0);
        h.time_ns = 100;
        assert!(matches!(one(m.on_hit(&h)), Event::Syscall(_)));
        // mkdirat returns -EEXIST: paired with its entry.
        regs.ax = (-17i64) as u64;
        w.g.write_user_regs(w.child, &regs).expect("pt_regs");
        let want = |ret: i64, errno: Option<&str>, entry: Option<u64>| {
            Event::SyscallReturn(SyscallReturnEvent {
                task: header(11, 11, 10, "mkdir", 1000),
                nr: mkdirat,
                name: Some("mkdirat".into()),
                ret: Some(ret),
                errno: errno.map(str::to_owned),
                entry_time_ns: entry,
            })
        };
        assert_eq!(
            one(m.on_hit(&hit(w, &ret, pt.raw(), 0))),
            want(-17, Some("EEXIST"), Some(100))
        );
        // The same from the values an engine reads at the hit; the entry is used up.
        let at_hit = with_reads(w, &ret, hit(w, &ret, pt.raw(), 0));
        assert_eq!(at_hit.mem[crate::probes::MEM_RET_AX], Some((-17i64) as u64));
        assert_eq!(one(m.on_hit(&at_hit)), want(-17, Some("EEXIST"), None));
        // A positive value has no errno; a syscall outside the filter (an engine that
        // cannot filter delivers it) and orig_ax -1 give nothing.
        regs.ax = 3;
        w.g.write_user_regs(w.child, &regs).expect("pt_regs");
        assert_eq!(
            one(m.on_hit(&hit(w, &ret, pt.raw(), 0))),
            want(3, None, None)
        );
        for orig in [u64::from(getpid), u64::MAX] {
            regs.orig_ax = orig;
            w.g.write_user_regs(w.child, &regs).expect("pt_regs");
            assert!(m.on_hit(&hit(w, &ret, pt.raw(), 0)).events.is_empty());
        }
        // A task that exits inside a watched syscall: its return says it never returned,
        // just before the exit event.
        regs.orig_ax = u64::from(mkdirat);
        w.g.write_user_regs(w.child, &regs).expect("pt_regs");
        let mut h = hit(w, &entry, pt.raw(), 0);
        h.time_ns = 200;
        let _ = m.on_hit(&h);
        let exit = spec(&m, |s| matches!(s.kind, ProbeKind::Exit(_)));
        let out = m.on_hit(&hit(w, &exit, w.child.raw(), 0));
        assert_eq!(out.events.len(), 2, "{out:?}");
        let Event::SyscallReturn(never) = &out.events[0] else {
            panic!("{out:?}")
        };
        assert_eq!(
            (never.ret, never.nr, never.entry_time_ns),
            (None, mkdirat, Some(200))
        );
        assert!(matches!(out.events[1], Event::Exit(_)));
        // The failed-exec probes are armed only while an exec is in flight: each attempt
        // (not held) opens its own return probe's window, which the engine keeps; the
        // monitor only closes the part of a task that died inside its exec.
        assert_eq!(
            (exec.window, exec_at.window),
            (Window::Closes, Window::Closes)
        );
        assert!(!exec.armed_at_start() && ret.armed_at_start());
        let attempt = spec(&m, |s| {
            s.kind == ProbeKind::ExecAttempt && s.symbol == "__x64_sys_execve"
        });
        let attempt_at = spec(&m, |s| {
            s.kind == ProbeKind::ExecAttempt && s.symbol == "__x64_sys_execveat"
        });
        assert_eq!(attempt.window, Window::Opens(exec.id.0));
        assert_eq!(attempt_at.window, Window::Opens(exec_at.id.0));
        assert!(!attempt.hold && !attempt_at.hold);
        regs = UserRegs {
            di: USER_ARGS + 6,
            orig_ax: u64::from(execve),
            ..UserRegs::default()
        };
        w.g.write_user_regs(w.child, &regs).expect("pt_regs");
        let out = m.on_hit(&hit(w, &attempt, pt.raw(), 0));
        assert!(out.events.is_empty() && out.close.is_empty());
        // It fails with ENOENT: an exec_failed with the name read at the hit (regs->di),
        // else from the caller's memory.
        regs.ax = (-2i64) as u64;
        w.g.write_user_regs(w.child, &regs).expect("pt_regs");
        let want = |filename: &str, syscall: &str| {
            Event::ExecFailed(ExecFailedEvent {
                task: header(11, 11, 10, "mkdir", 1000),
                syscall: syscall.into(),
                filename: Some(filename.into()),
                errno: 2,
                errno_name: "ENOENT".into(),
            })
        };
        let at_hit = with_reads(w, &exec, hit(w, &exec, pt.raw(), 0));
        assert_eq!(at_hit.mem[crate::probes::MEM_RET_NAME], Some(USER_ARGS + 6));
        let out = m.on_hit(&at_hit);
        assert!(out.close.is_empty());
        assert_eq!(one(out), want("/tmp/newdir", "execve"));
        assert_eq!(
            one(m.on_hit(&hit(w, &exec, pt.raw(), 0))),
            want("/tmp/newdir", "execve")
        );
        // execveat(dirfd, filename, ...): the name is regs->si.
        regs = UserRegs {
            di: 3,
            si: USER_ARGS + 6,
            ax: (-2i64) as u64,
            orig_ax: u64::from(execveat),
            ..UserRegs::default()
        };
        w.g.write_user_regs(w.child, &regs).expect("pt_regs");
        let at_hit = with_reads(w, &exec_at, hit(w, &exec_at, pt.raw(), 0));
        assert_eq!(one(m.on_hit(&at_hit)), want("/tmp/newdir", "execveat"));
        // One that succeeds (ret 0) gives nothing here.
        regs.ax = 0;
        w.g.write_user_regs(w.child, &regs).expect("pt_regs");
        assert!(m.on_hit(&hit(w, &exec_at, pt.raw(), 0)).events.is_empty());
        // A task that dies inside its exec: the session is told to close its part.
        let _ = m.on_hit(&hit(w, &attempt_at, pt.raw(), 0));
        let out = m.on_hit(&hit(w, &exit, w.child.raw(), 0));
        assert_eq!(out.close, vec![exec_at.id], "the task died inside its exec");
        // A task that returned is not closed again.
        let _ = m.on_hit(&hit(w, &attempt, pt.raw(), 0));
        let _ = m.on_hit(&hit(w, &exec, pt.raw(), 0));
        assert!(m.on_hit(&hit(w, &exit, w.child.raw(), 0)).close.is_empty());
        w.g.set_current(VCPU, w.parent).expect("current");
    });
}
