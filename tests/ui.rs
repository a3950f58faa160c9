//! Compile-time behaviour of `#[redis_cached]`: what must compile, and the
//! exact error for each mistake (`tests/ui/fail/*.stderr`).

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
