//! Bounded walks of the task list and of a thread group: step budget, cycle detection, and
//! how each walk ended.

use super::{at, TaskError, TaskReader, TaskWalk, WalkEnd};
use crate::profile::ProfileError;
use crate::vmem::VirtMem;
use ornament_engine::Gva;
use std::collections::HashSet;

impl TaskReader<'_> {
    /// Walk a circular `list_head` list whose nodes sit at `node_off` in each element,
    /// from the head at `head` (not itself an element), for at most `budget` elements.
    fn walk_list(&self, vm: &VirtMem<'_>, head: Gva, node_off: u64, budget: usize) -> TaskWalk {
        let mut tasks = Vec::new();
        let mut seen = HashSet::new();
        let mut cur = head;
        loop {
            let next = match Self::kptr_nonnull(vm, cur) {
                Ok(n) => n,
                Err(u) => {
                    return TaskWalk {
                        tasks,
                        end: WalkEnd::Unreadable { at: u.at },
                    }
                }
            };
            if next == head {
                return TaskWalk {
                    tasks,
                    end: WalkEnd::Complete,
                };
            }
            if !seen.insert(next) {
                return TaskWalk {
                    tasks,
                    end: WalkEnd::Cycle { at: next },
                };
            }
            if vm.read_u64(next).is_err() {
                return TaskWalk {
                    tasks,
                    end: WalkEnd::Unreadable { at: next },
                };
            }
            if tasks.len() >= budget {
                return TaskWalk {
                    tasks,
                    end: WalkEnd::BudgetExhausted,
                };
            }
            tasks.push(next.wrapping_sub(node_off));
            cur = next;
        }
    }

    /// Every process (thread-group leader) on `init_task.tasks`, as `for_each_process`
    /// sees them (`init_task` itself, pid 0, is not included), at most `budget`.
    pub fn processes(&self, vm: &VirtMem<'_>, budget: usize) -> Result<TaskWalk, TaskError> {
        let init = self.kernel.symbol("init_task").map_err(|e| match e {
            crate::kernel::KernelError::Profile(p) => TaskError::Profile(p),
            _ => TaskError::Profile(ProfileError::NoSymbol {
                release: self.kernel.profile().kernel.release.clone(),
                name: "init_task".into(),
            }),
        })?;
        Ok(self.walk_list(vm, at(init, self.off.tasks), self.off.tasks, budget))
    }

    /// The threads of `task`'s thread group (`signal->thread_head`, linked through
    /// `thread_node`); `None` when the kernel has no such lists.
    pub fn threads(&self, vm: &VirtMem<'_>, task: Gva, budget: usize) -> Option<TaskWalk> {
        let (node, head) = (self.off.thread_node?, self.off.thread_head?);
        let signal = match Self::kptr_nonnull(vm, at(task, self.off.signal)) {
            Ok(s) => s,
            Err(u) => {
                return Some(TaskWalk {
                    tasks: Vec::new(),
                    end: WalkEnd::Unreadable { at: u.at },
                })
            }
        };
        Some(self.walk_list(vm, at(signal, head), node, budget))
    }
}
