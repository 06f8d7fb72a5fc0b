//! The readers against synthetic guests of every committed profile, in both paging modes.

use super::*;
use crate::kaslr::{detect, Anchor};
use crate::paging::PagingMode;
use crate::profile::Profile;
use crate::testing::{committed_profiles, SynthConfig, SynthGuest, TaskSpec, USER_ARGS};

struct World {
    g: SynthGuest,
    kthreadd: Gva,
    init: Gva,
    child: Gva,
}

fn world(profile: Profile, mode: PagingMode) -> World {
    let cfg = SynthConfig {
        mode,
        ..SynthConfig::default()
    };
    let mut g = SynthGuest::new(profile, cfg).expect("guest");
    let kthreadd = g
        .add_task(&TaskSpec::kthread(2, "kthreadd"))
        .expect("kthreadd");
    let init = g
        .add_task(&TaskSpec::user(1, "init", "/sbin/init", &["/sbin/init"]))
        .expect("init");
    let mut spec = TaskSpec::user(
        42,
        "a-very-long-command-name",
        "/usr/bin/env",
        &["sh", "-c", "echo hi"],
    );
    spec.parent = Some(init);
    spec.creds = [1000, 1001, 1002, 1003];
    spec.cwd = Some("/srv/work".into());
    let child = g.add_task(&spec).expect("child");
    g.set_current(1, child).expect("current");
    World {
        g,
        kthreadd,
        init,
        child,
    }
}

fn each_world(f: impl Fn(&World)) {
    for p in committed_profiles() {
        for mode in [PagingMode::Level4, PagingMode::Level5] {
            f(&world(p.clone(), mode));
        }
    }
}

#[test]
fn reads_tasks_exactly_as_written() {
    each_world(|w| {
        let g = &w.g;
        let regs = g.regs_kernel(
            1,
            g.layout
                .virt(g.profile.symbol("do_syscall_64").expect("sym")),
        );
        let layout = detect(
            &g.phys.mem,
            &g.profile,
            &regs,
            Anchor::AtSymbol {
                name: "do_syscall_64",
                rip: regs.rip,
            },
        )
        .expect("layout");
        assert_eq!(layout, g.layout);
        let k = Kernel::new(&g.phys.mem, &g.profile, layout);
        assert_eq!(k.current_task(&regs).expect("current"), w.child);
        // From user mode: PTI user CR3, per-CPU base in kernel_gs_base.
        assert_eq!(k.current_task(&g.regs_user(1)).expect("user"), w.child);
        assert_eq!(
            k.current_task(&g.regs_kernel(0, Gva(0))).expect("cpu0"),
            g.init_task().expect("init_task")
        );
        let r = TaskReader::new(&k).expect("reader");
        let vm = k.kernel_vm(&regs);
        let info = r.read(&vm, w.child);
        assert_eq!(
            info,
            TaskInfo {
                task: w.child,
                pid: Ok(42),
                tgid: Ok(42),
                ppid: Ok(1),
                comm: Ok("a-very-long-com".into()),
                uid: Ok(1000),
                gid: Ok(1001),
                euid: Ok(1002),
                egid: Ok(1003),
                is_kernel_thread: Ok(false),
                exe_path: Ok(Some("/usr/bin/env".into())),
                cwd: Ok(Some("/srv/work".into())),
                argv: Ok(Some(Argv {
                    args: vec!["sh".into(), "-c".into(), "echo hi".into()],
                    truncated: false
                })),
            }
        );
        let kt = r.read(&vm, w.kthreadd);
        assert_eq!(kt.is_kernel_thread, Ok(true));
        assert_eq!(kt.exe_path, Ok(None));
        // No fs_struct written for it: as a task that has left its own on exit.
        assert_eq!(kt.cwd, Ok(None));
        assert_eq!(kt.argv, Ok(None));
        assert_eq!(kt.ppid, Ok(0));
        assert_eq!(kt.comm, Ok("kthreadd".into()));
        assert_eq!(r.read(&vm, w.init).exe_path, Ok(Some("/sbin/init".into())));
        let walk = r.processes(&vm, 100).expect("walk");
        assert_eq!(walk.tasks, vec![w.kthreadd, w.init, w.child]);
        assert_eq!(walk.end, WalkEnd::Complete);
        let want = UserRegs {
            di: 1,
            si: 2,
            dx: 3,
            r10: 4,
            r8: 5,
            r9: 6,
            ax: u64::MAX - 37,
            orig_ax: 110,
            ip: 0x40_1234,
            sp: 0x7ffc_0000_1000,
            cs: 0x33,
        };
        g.write_user_regs(w.child, &want).expect("pt_regs");
        assert_eq!(r.user_regs(&vm, w.child), Ok(want));
        assert_eq!(want.syscall_args(), [1, 2, 3, 4, 5, 6]);
        let stack_off = g.off("task_struct", "stack").expect("stack");
        let stack = vm.read_ptr(w.child.wrapping_add(stack_off)).expect("stack");
        assert_eq!(
            r.user_regs_addr(&vm, w.child),
            Ok(stack.wrapping_add(16384 - 0xa8))
        );
    });
}

#[test]
fn hostile_lists_end_cleanly() {
    let p = committed_profiles().remove(0);
    let w = world(p, PagingMode::Level4);
    let g = &w.g;
    let k = Kernel::new(&g.phys.mem, &g.profile, g.layout);
    let r = TaskReader::new(&k).expect("reader");
    let regs = g.regs_kernel(0, Gva(0));
    let vm = k.kernel_vm(&regs);
    let tasks = r.offsets().tasks;
    let budget = r.processes(&vm, 2).expect("walk");
    assert_eq!(budget.tasks, vec![w.kthreadd, w.init]);
    assert_eq!(budget.end, WalkEnd::BudgetExhausted);
    // child.tasks.next -> init.tasks: a cycle that never returns to the head.
    let child_next = w.child.wrapping_add(tasks);
    g.write_u64(child_next, w.init.wrapping_add(tasks).raw())
        .expect("w");
    let cyc = r.processes(&vm, 1000).expect("walk");
    assert_eq!(cyc.tasks, vec![w.kthreadd, w.init, w.child]);
    assert_eq!(
        cyc.end,
        WalkEnd::Cycle {
            at: w.init.wrapping_add(tasks)
        }
    );
    // A pointer into nowhere (direct map beyond RAM) and a non-canonical one.
    for bad in [0xffff_8880_3000_0000u64, 0x8000_0000_0000_0000, 0] {
        g.write_u64(child_next, bad).expect("w");
        let walk = r.processes(&vm, 1000).expect("walk");
        assert_eq!(walk.tasks.len(), 3);
        let end = if bad == 0xffff_8880_3000_0000 {
            WalkEnd::Unreadable { at: Gva(bad) }
        } else {
            WalkEnd::Unreadable { at: child_next }
        };
        assert_eq!(walk.end, end, "{bad:#x}");
        // Reading a task at that address gives Unreadable fields, not panics.
        let info = r.read(&vm, Gva(bad));
        assert!(info.pid.is_err() && info.comm.is_err() && info.argv.is_err());
    }
}

#[test]
fn hostile_task_fields() {
    let p = committed_profiles().remove(1);
    let w = world(p, PagingMode::Level4);
    let g = &w.g;
    let k = Kernel::new(&g.phys.mem, &g.profile, g.layout);
    let r = TaskReader::new(&k).expect("reader");
    let vm = k.kernel_vm(&g.regs_kernel(0, Gva(0)));
    let mm = r.mm(&vm, w.child).expect("mm").expect("has mm");
    let arg_end = mm.wrapping_add(r.offsets().mm_arg_end);
    // Huge length: capped, the unreadable tail marks it truncated.
    g.write_u64(arg_end, USER_ARGS + (1 << 40)).expect("w");
    let a = r.argv(&vm, w.child).expect("argv").expect("some");
    assert!(a.truncated);
    assert_eq!(&a.args[..3], &["sh", "-c", "echo hi"]);
    // End before start.
    g.write_u64(arg_end, USER_ARGS - 1).expect("w");
    assert_eq!(r.argv(&vm, w.child), Err(Unreadable { at: arg_end }));
    // Small cap: truncated.
    g.write_u64(arg_end, USER_ARGS + 14).expect("w");
    let small = TaskReader::new(&k).expect("r").with_limits(Limits {
        max_argv_bytes: 5,
        ..Limits::default()
    });
    assert_eq!(
        small.argv(&vm, w.child),
        Ok(Some(Argv {
            args: vec!["sh".into(), "-c".into()],
            truncated: true
        }))
    );
    // comm with no NUL: capped at the field size.
    let comm = w.child.wrapping_add(r.offsets().comm);
    g.write(comm, &[b'x'; 16]).expect("w");
    assert_eq!(r.comm(&vm, w.child), Ok("x".repeat(16)));
    // A d_parent cycle: bounded, unreadable.
    let file = vm
        .read_ptr(mm.wrapping_add(r.offsets().mm_exe_file))
        .expect("file");
    let dentry = vm
        .read_ptr(file.wrapping_add(r.offsets().file_f_path + r.offsets().path_dentry))
        .expect("dentry");
    let parent_at = dentry.wrapping_add(r.offsets().dentry_d_parent);
    let parent = vm.read_ptr(parent_at).expect("parent");
    g.write_u64(
        parent.wrapping_add(r.offsets().dentry_d_parent),
        dentry.raw(),
    )
    .expect("w");
    assert!(r.exe_path(&vm, w.child).is_err());
    // A non-kernel cred pointer.
    let cred = w.child.wrapping_add(r.offsets().cred);
    g.write_u64(cred, 0x1234).expect("w");
    assert_eq!(r.creds(&vm, w.child), Err(Unreadable { at: cred }));
    // A task whose mm is NULL but lacks PF_KTHREAD still counts as a kernel thread.
    g.write_u64(w.child.wrapping_add(r.offsets().mm), 0)
        .expect("w");
    assert_eq!(r.is_kernel_thread(&vm, w.child), Ok(true));
}

/// A three-thread group (leader `init`, threads 43 and 44) linked the kernel's way:
/// `signal->thread_head` through each task's `thread_node`. Any member lists the
/// whole group in list order; the budget, a cycle and a bad link end the walk.
#[test]
fn file_paths_cross_mounts_and_name_deleted_and_memfd_files() {
    for p in committed_profiles() {
        let mut g = SynthGuest::new(p, SynthConfig::default()).expect("guest");
        // / (the root mount), /tmp a directory on it, a tmpfs mounted there.
        let root = g.add_dentry(None, "/", false).expect("root");
        let tmp = g.add_dentry(Some(root), "tmp", false).expect("tmp");
        let root_mnt = g.add_mount(None, root).expect("root mount");
        let tmpfs_root = g.add_dentry(None, "/", false).expect("tmpfs root");
        let tmpfs = g
            .add_mount(Some((root_mnt, tmp)), tmpfs_root)
            .expect("tmpfs");
        let evil = g.add_dentry(Some(tmpfs_root), "evil", false).expect("evil");
        let gone = g.add_dentry(Some(tmpfs_root), "gone", true).expect("gone");
        // A memfd: a root dentry of its own on an internal mount whose root it is not.
        let shm_root = g.add_dentry(None, "/", false).expect("shm root");
        let shm = g.add_mount(None, shm_root).expect("shm");
        let memfd = g.add_dentry(None, "memfd:payload", true).expect("memfd");
        let files = [
            (g.add_file(tmpfs, evil).expect("f"), "/tmp/evil"),
            (g.add_file(tmpfs, gone).expect("f"), "/tmp/gone (deleted)"),
            (
                g.add_file(shm, memfd).expect("f"),
                "/memfd:payload (deleted)",
            ),
            (g.add_file(root_mnt, tmp).expect("f"), "/tmp"),
            (g.add_file(tmpfs, tmpfs_root).expect("f"), "/tmp"),
            (g.add_file(root_mnt, root).expect("f"), "/"),
        ];
        // Two mounts each mounted on the other's root: a cycle, bounded, unreadable.
        let (ra, rb) = (
            g.add_dentry(None, "/", false).expect("a"),
            g.add_dentry(None, "/", false).expect("b"),
        );
        let a = g.add_mount(None, ra).expect("mount a");
        let b = g.add_mount(Some((a, ra)), rb).expect("mount b");
        let mo = TaskOffsets::from_profile(&g.profile)
            .expect("offsets")
            .mounts
            .expect("the profile has the mount tree");
        let mount_a = a.wrapping_sub(mo.mnt);
        let mount_b = b.wrapping_sub(mo.mnt);
        g.write(
            mount_a.wrapping_add(mo.mnt_parent),
            &mount_b.raw().to_le_bytes(),
        )
        .expect("w");
        g.write(
            mount_a.wrapping_add(mo.mnt_mountpoint),
            &rb.raw().to_le_bytes(),
        )
        .expect("w");
        let looped = g.add_file(a, ra).expect("f");
        let k = Kernel::new(&g.phys.mem, &g.profile, g.layout);
        let r = TaskReader::new(&k).expect("reader");
        let vm = k.kernel_vm(&g.regs_kernel(0, Gva(0)));
        for (file, want) in files {
            assert_eq!(r.path_of_file(&vm, file).as_deref(), Ok(want));
        }
        assert!(r.path_of_file(&vm, looped).is_err());
    }
}

#[test]
fn threads_of_a_group() {
    for p in committed_profiles() {
        let release = p.kernel.release.clone();
        let mut w = world(p, PagingMode::Level4);
        let sig_off = w.g.off("task_struct", "signal").expect("signal");
        let node = w.g.off("task_struct", "thread_node").expect("thread_node");
        let head =
            w.g.off("signal_struct", "thread_head")
                .expect("thread_head");
        let mut thread = |pid| {
            let mut spec = TaskSpec::user(pid, "worker", "/sbin/init", &["/sbin/init"]);
            spec.tgid = 1;
            w.g.add_task(&spec).expect("thread")
        };
        let (t43, t44) = (thread(43), thread(44));
        let signal = w.g.alloc(4096).expect("signal");
        let head_at = signal.wrapping_add(head);
        let group = [w.init, t43, t44];
        // head -> init -> 43 -> 44 -> head (next pointers; the walk reads only those).
        let mut prev = head_at;
        for t in group {
            let n = t.wrapping_add(node);
            w.g.write_u64(prev, n.raw()).expect("w");
            w.g.write_u64(t.wrapping_add(sig_off), signal.raw())
                .expect("w");
            prev = n;
        }
        w.g.write_u64(prev, head_at.raw()).expect("w");
        let walk = |g: &SynthGuest, from: Gva, budget: usize| {
            let k = Kernel::new(&g.phys.mem, &g.profile, g.layout);
            let r = TaskReader::new(&k).expect("reader");
            let vm = k.kernel_vm(&g.regs_kernel(0, Gva(0)));
            r.threads(&vm, from, budget).expect("supported")
        };
        for member in group {
            let t = walk(&w.g, member, 10);
            assert_eq!(t.tasks, group.to_vec(), "{release}");
            assert_eq!(t.end, WalkEnd::Complete, "{release}");
        }
        let t = walk(&w.g, t44, 2);
        assert_eq!(t.tasks, group[..2].to_vec(), "{release}");
        assert_eq!(t.end, WalkEnd::BudgetExhausted, "{release}");
        // 44 points back at 43: a cycle, reported at the node met again.
        let n43 = t43.wrapping_add(node);
        w.g.write_u64(t44.wrapping_add(node), n43.raw()).expect("w");
        let t = walk(&w.g, w.init, 10);
        assert_eq!(t.tasks, group.to_vec(), "{release}");
        assert_eq!(t.end, WalkEnd::Cycle { at: n43 }, "{release}");
        // 43's link is a user address: unreadable there.
        w.g.write_u64(n43, 0x1000).expect("w");
        let t = walk(&w.g, w.init, 10);
        assert_eq!(t.tasks, group[..2].to_vec(), "{release}");
        assert_eq!(t.end, WalkEnd::Unreadable { at: n43 }, "{release}");
        // The task of another group: its own signal, empty list (head -> head).
        let other = w.g.alloc(4096).expect("signal");
        let other_head = other.wrapping_add(head);
        w.g.write_u64(other_head, other_head.raw()).expect("w");
        w.g.write_u64(w.child.wrapping_add(sig_off), other.raw())
            .expect("w");
        let t = walk(&w.g, w.child, 10);
        assert_eq!((t.tasks, t.end), (vec![], WalkEnd::Complete), "{release}");
    }
}
