//! End-to-end tests of the `distlock` binary: real processes against real `redis-server`
//! processes on free loopback ports, each test with servers of its own.

mod contention;
mod cron;
mod exit_codes;
mod fencing;
mod lost;
mod operators;
mod signals;
mod support;
mod usage;
