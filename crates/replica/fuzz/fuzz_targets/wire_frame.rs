//! The replication decoder on arbitrary peer bytes. It may refuse, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_replica::fuzz_wire(data);
});
