//! The `ornament` command line.
fn main() {}
