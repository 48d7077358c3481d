//! Operator tools that talk to the daemons only through their local admin API:
//! [`client`] (used by `nbackup ctl` and the console).

pub mod client;
