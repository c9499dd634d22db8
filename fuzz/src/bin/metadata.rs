//! AFL++ entry of the `metadata` fuzz target; the body is `pdgate_fuzz::metadata`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        pdgate_fuzz::metadata(data);
    });
}
