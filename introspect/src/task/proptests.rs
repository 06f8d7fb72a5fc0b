//! Random bytes over task structures never make a reader panic.

use super::*;
use crate::testing::{committed_profiles, SynthConfig, SynthGuest, TaskSpec};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Random bytes over a task_struct, its mm and a dentry never make a reader panic.
    #[test]
    fn random_guest_bytes_never_panic(
        junk in proptest::collection::vec(any::<u8>(), 1..2048),
        task_at in 0u64..0x2000,
        mm_at in 0u64..0x400,
        walk_budget in 0usize..8,
    ) {
        let p = committed_profiles().remove(0);
        let mut g = SynthGuest::new(p, SynthConfig::default()).expect("guest");
        let t = g.add_task(&TaskSpec::user(7, "x", "/bin/x", &["x", "y"])).expect("task");
        let k = Kernel::new(&g.phys.mem, &g.profile, g.layout);
        let r = TaskReader::new(&k).expect("reader");
        let vm = k.kernel_vm(&g.regs_kernel(0, Gva(0)));
        let mm = r.mm(&vm, t).expect("mm").expect("some");
        g.write(t.wrapping_add(task_at), &junk).expect("w");
        g.write(mm.wrapping_add(mm_at), &junk).expect("w");
        let _ = r.read(&vm, t);
        let _ = r.user_regs_addr(&vm, t);
        let _ = r.threads(&vm, t, walk_budget);
        let w = r.processes(&vm, walk_budget).expect("walk");
        prop_assert!(w.tasks.len() <= walk_budget);
    }
}
