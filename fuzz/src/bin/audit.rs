//! AFL++ entry of the `audit` fuzz target; the body is `pdgate_fuzz::audit`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        pdgate_fuzz::audit(data);
    });
}
