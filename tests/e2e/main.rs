//! End-to-end tests: the real server and agent over real TLS on 127.0.0.1, real files,
//! archives extracted by the system `tar` and compared with their sources.

mod proxy;
mod smtp;
mod support;

mod cli;
mod console;
mod daemons;
mod enroll;
mod fidelity;
mod live_fs;
mod offsite;
mod package;
mod refusals;
mod resilience;
mod restore;
mod runtime;
mod security;
mod setup;
mod storage;
mod streams;
