//! Operator tools that talk to the daemons only through their local admin API:
//! [`client`] (used by `nbackup ctl` and the console) and [`console`], the
//! terminal UI.

pub mod client;
pub mod console;
