//! One module per subcommand.

pub mod doctor;
pub mod image;
pub mod profile;
pub mod ps;
pub mod resume;
pub mod run;
