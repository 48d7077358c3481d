//! Operator tools that talk to the daemons only through their local admin API:
//! [`client`] (used by `nbackup ctl` and the console) and [`console`], the
//! terminal UI — and [`wizard`], the setup prompts, which talk to nothing and only
//! fill `protocol::setup::Answers`.

pub mod client;
pub mod console;
pub mod wizard;
