//! AFL++ entry of the `policy` fuzz target; the body is `pdgate_fuzz::policy`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        pdgate_fuzz::policy(data);
    });
}
