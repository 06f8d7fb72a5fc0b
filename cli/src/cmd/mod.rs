//! One module per subcommand.

pub mod doctor;
pub mod image;
pub mod run;
