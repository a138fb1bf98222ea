//! The NBD server's parsers on arbitrary client bytes: request headers (checked against
//! an export size), option headers and NBD_OPT_GO data. None may panic.
#![no_main]

use ferry_replica::nbd::proto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_replica::fuzz_nbd(data);
    let _ = proto::parse_go(data);
});
