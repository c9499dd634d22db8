//! AFL++ entry of the `descriptors` fuzz target; the body is `pdgate_fuzz::descriptors`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        pdgate_fuzz::descriptors(data);
    });
}
