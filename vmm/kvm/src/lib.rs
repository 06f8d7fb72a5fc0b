//! ornament-kvm: our own KVM VMM.
